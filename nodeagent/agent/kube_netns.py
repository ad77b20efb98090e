"""Finding a Kubernetes pod's netns by its IP: the NetnsResolver for Kubernetes mode.

Why this module exists: on a Kubernetes node the CNI names pod namespaces after nothing the agent knows
(containerd: /var/run/netns/cni-<uuid>), so a name pattern cannot work. Every pod has an IP, though, and
every network namespace shows its local addresses in its fib_trie. A scan (for a pod seen for the
first time, then at most every `refresh_s` while it is not found) maps pod IP -> netns from two places:

- the bind mounts in `netns_dir` (containerd's and CRI-O's sandboxes, `ip netns`, the lab): a worker
  thread enters each one it has not read yet and reads /proc/thread-self/net/fib_trie; a mount outlives
  any process, so it is the path handed out whenever one exists. A sandbox's addresses do not change
  once the CNI set them up, so a mount is read once, unless it had no address yet (the kubelet reports a
  pod IP only after the CNI's set-up, but a scan can fall in between);
- the processes in `proc`: /proc/<pid>/net/fib_trie of each netns not seen through a mount (runtimes
  that mount nothing); the path is /proc/<pid>/ns/net (the reconciler holds an fd from then on). Such a
  path outlives its process: once the pid is reused it names the new process's netns (the node's, say),
  so a path is handed out again only while it names the netns (inode) it named when found, and never
  when that is the node's or the agent's own - checked at every lookup, not only by the scan.

The mapping itself is a pure function (`map_addresses`): an IP held by two different namespaces (an old
sandbox still alive after its IP was reused) maps to neither — capture waits rather than guessing — and
the agent's own netns (the node's) is never a pod's. A finished pod (Succeeded/Failed) is never resolved:
its sandbox is gone but its status keeps its IP, which the node may have handed to a live pod.

Needs: the host's mount namespace for `netns_dir`, the host's /proc (hostPID) for the process scan,
CAP_SYS_ADMIN to enter namespaces and CAP_SYS_PTRACE to read other users' ns/net files. setns() happens
only on the scan's own short-lived thread; the calling thread never moves.

What it deliberately does not do: no CRI calls (the IP is enough and is in the pod's status), no netns
creation, no IPv6 (the model's pod IPs are IPv4).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from nodeagent.model import Pod
from nodeagent.netns import netns_inode, setns

log = logging.getLogger(__name__)


def local_ipv4s(fib_trie: str) -> Iterator[ipaddress.IPv4Address]:
    """The addresses marked `host LOCAL` in a /proc/net/fib_trie dump (pure)."""
    last: str | None = None
    for line in fib_trie.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--") or stripped.startswith("+--"):
            last = stripped[3:].strip().split("/")[0]
        elif stripped.startswith("/32 host LOCAL") and last is not None:
            try:
                ip = ipaddress.IPv4Address(last)
            except ValueError:
                continue
            if not ip.is_loopback:
                yield ip


@dataclass(frozen=True, slots=True)
class NetnsSighting:
    """One network namespace seen by a scan: its inode, the path to hand out, its fib_trie."""

    inode: int
    path: str
    fib_trie: str


def map_addresses(
    sightings: Iterable[NetnsSighting], exclude: frozenset[int] = frozenset()
) -> tuple[dict[ipaddress.IPv4Address, str], set[ipaddress.IPv4Address]]:
    """IP -> netns path, and the IPs held by more than one namespace (mapped to none). Pure.

    The first sighting of an inode wins (callers list bind mounts before processes); namespaces whose
    inode is in `exclude` (the host's, the agent's own) are skipped.
    """
    owner: dict[ipaddress.IPv4Address, tuple[int, str]] = {}
    ambiguous: set[ipaddress.IPv4Address] = set()
    seen: set[int] = set()
    for s in sightings:
        if s.inode in exclude or s.inode in seen:
            continue
        seen.add(s.inode)
        for ip in local_ipv4s(s.fib_trie):
            previous = owner.get(ip)
            if previous is not None and previous[0] != s.inode:
                ambiguous.add(ip)
            elif previous is None:
                owner[ip] = (s.inode, s.path)
    return {ip: path for ip, (_, path) in owner.items() if ip not in ambiguous}, ambiguous


class ProcNetnsResolver:
    """NetnsResolver by pod IP. A pod seen for the first time always gets a fresh scan, so a sandbox that
    still holds a reused IP is noticed (ambiguous: nothing handed out) instead of served from a cache;
    a pod already found keeps its path while it names the same netns (inode); a pod not found is scanned
    for again at most every `refresh_s` (the reconciler retries it with every verify).

    Scans run on the calling thread, except the setns() reads, which run on a short-lived worker thread
    that the caller joins: mounts already read are not read again, so a scan costs a directory listing,
    one stat per mount and per process, and the reads of new namespaces.
    """

    def __init__(
        self,
        proc: str = "/proc",
        netns_dir: str = "/var/run/netns",
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc = proc
        self.netns_dir = netns_dir
        self.refresh_s = refresh_s
        self._clock = clock
        self._by_ip: dict[ipaddress.IPv4Address, str] = {}
        self._ambiguous: set[ipaddress.IPv4Address] = set()
        # pod uid -> (IP, path, netns inode) handed out; the path is handed out again only while its inode holds
        self._found: dict[str, tuple[ipaddress.IPv4Address, str, int]] = {}
        self._missed: dict[str, float] = {}  # pod uid -> when it was last scanned for in vain
        self._mounts: dict[int, NetnsSighting] = {}  # inode -> a mount read once, with addresses
        self._scanned: dict[str, int] = {}  # path -> the inode it named when the last scan read it
        self.scans = 0
        own = {netns_inode(os.path.join(proc, "1", "ns", "net")), netns_inode("/proc/self/ns/net")}
        self._exclude = frozenset(i for i in own if i is not None)

    def resolve(self, pod: Pod) -> str | None:
        if pod.ip is None or pod.host_network or pod.terminated:
            return None
        found = self._found.get(pod.uid)
        if found is not None and found[0] == pod.ip and self._still(found[1], found[2]):
            return found[1]
        now = self._clock()
        last = self._missed.get(pod.uid)
        if found is None and last is not None and now - last < self.refresh_s:
            return None  # scanned for in vain a moment ago
        self.scan()
        path = self._by_ip.get(pod.ip)
        inode = self._scanned.get(path) if path is not None else None
        if path is not None and (inode is None or not self._still(path, inode)):
            path = None  # it names another netns since the scan (a pid reused), or it is gone
        if path is None:
            self._missed[pod.uid] = now
            if pod.ip in self._ambiguous:
                log.error(
                    "%s: IP %s is held by more than one network namespace; capture waits until only one holds it",
                    pod.key,
                    pod.ip,
                )
            return None
        assert inode is not None
        self._missed.pop(pod.uid, None)
        self._found[pod.uid] = (pod.ip, path, inode)
        return path

    def _still(self, path: str, inode: int) -> bool:
        """Whether `path` still names the netns it named when handed out: a /proc/<pid>/ns/net path
        outlives the process once the pid is reused, then naming another netns (the node's, maybe)."""
        now = netns_inode(path)
        return now == inode and now not in self._exclude

    def scan(self) -> None:
        """Map every namespace's local IPs afresh (bind mounts first, then processes)."""
        self.scans += 1
        now = self._clock()
        mounts = self._mount_sightings()
        known = {s.inode for s in mounts}
        sightings = [*mounts, *self._process_sightings(known)]
        self._by_ip, self._ambiguous = map_addresses(sightings, self._exclude)
        self._scanned = {s.path: s.inode for s in sightings}
        # Forget pods whose namespace is gone, and misses too old to matter (bounded by the pods alive).
        self._found = {uid: f for uid, f in self._found.items() if self._still(f[1], f[2])}
        self._missed = {uid: t for uid, t in self._missed.items() if now - t < 60 * self.refresh_s}

    def _mount_sightings(self) -> list[NetnsSighting]:
        try:
            names = sorted(os.listdir(self.netns_dir))
        except OSError:
            return []
        known: dict[int, NetnsSighting] = {}
        paths = []
        for name in names:
            path = os.path.join(self.netns_dir, name)
            inode = netns_inode(path)
            cached = self._mounts.get(inode) if inode is not None else None
            if cached is not None and cached.path == path:
                known[cached.inode] = cached
            elif inode is not None and inode not in self._exclude:
                paths.append(path)
        found: list[NetnsSighting] = []

        def read_all() -> None:  # on its own thread: it moves between namespaces and then ends
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    inode = os.fstat(fd).st_ino
                    if inode in self._exclude:
                        continue
                    setns(fd)
                    with open("/proc/thread-self/net/fib_trie") as f:
                        found.append(NetnsSighting(inode, path, f.read()))
                except OSError as exc:  # not a netns mount, or no CAP_SYS_ADMIN
                    log.debug("cannot read the addresses of %s: %s", path, exc)
                finally:
                    os.close(fd)

        if paths:
            worker = threading.Thread(target=read_all, name="netns-scan", daemon=True)
            worker.start()
            worker.join()
        known.update((s.inode, s) for s in found if any(local_ipv4s(s.fib_trie)))
        self._mounts = known  # mounts that are gone are forgotten
        return [*known.values(), *(s for s in found if s.inode not in known)]

    def _process_sightings(self, known: set[int]) -> Iterator[NetnsSighting]:
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError as exc:
            log.error("cannot list %s: %s; is the host's /proc mounted (hostPID)?", self.proc, exc)
            return
        seen = set(known) | self._exclude
        for pid in pids:
            ns = os.path.join(self.proc, pid, "ns", "net")
            inode = netns_inode(ns)
            if inode is None or inode in seen:
                continue
            seen.add(inode)
            try:
                with open(os.path.join(self.proc, pid, "net", "fib_trie")) as f:
                    text = f.read()
            except OSError:
                continue
            yield NetnsSighting(inode, ns, text)
