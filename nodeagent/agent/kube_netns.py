"""Finding a Kubernetes pod's netns by its IP, from /proc: the NetnsResolver for real nodes.

Why this module exists: on a Kubernetes node the CNI names pod namespaces after nothing the agent knows
(containerd: /var/run/netns/cni-<uuid>), so the lab's name pattern cannot work. Every pod has an IP,
though, and every process shows the local addresses of its netns in /proc/<pid>/net/fib_trie. Scanning
the processes once (at most every `refresh_s`, and only when a pod is not found) maps pod IP -> netns;
the path handed out is the CNI's bind mount in `netns_dir` when one has the same inode (it outlives any
process), else /proc/<pid>/ns/net of a process inside (the reconciler holds an fd from then on).

Needs: the host's /proc (hostPID, or /proc mounted at `proc`), CAP_SYS_PTRACE to open other users'
ns/net files. Pure file reads: no subprocess, no setns.

What it deliberately does not do: no CRI calls (the IP is enough and is in the pod's status), no netns
creation, no IPv6 (the model's pod IPs are IPv4).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterator

from nodeagent.model import Pod

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


class ProcNetnsResolver:
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
        self._scanned = -1e9
        self._host_inode = self._inode(os.path.join(proc, "1", "ns", "net"))

    def resolve(self, pod: Pod) -> str | None:
        if pod.ip is None or pod.host_network:
            return None
        path = self._by_ip.get(pod.ip)
        if path is not None and os.path.exists(path):
            return path
        if self._clock() - self._scanned >= self.refresh_s:
            self.scan()
        return self._by_ip.get(pod.ip)

    def scan(self) -> None:
        self._scanned = self._clock()
        mounts: dict[int, str] = {}
        try:
            for name in os.listdir(self.netns_dir):
                inode = self._inode(os.path.join(self.netns_dir, name))
                if inode is not None:
                    mounts[inode] = os.path.join(self.netns_dir, name)
        except OSError:
            pass
        by_ip: dict[ipaddress.IPv4Address, str] = {}
        seen: set[int] = set()
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError as exc:
            log.error("cannot list %s: %s; is the host's /proc mounted (hostPID)?", self.proc, exc)
            return
        for pid in pids:
            ns = os.path.join(self.proc, pid, "ns", "net")
            inode = self._inode(ns)
            if inode is None or inode in seen or inode == self._host_inode:
                continue
            seen.add(inode)
            try:
                with open(os.path.join(self.proc, pid, "net", "fib_trie")) as f:
                    text = f.read()
            except OSError:
                continue
            for ip in local_ipv4s(text):
                by_ip[ip] = mounts.get(inode, ns)
        self._by_ip = by_ip

    @staticmethod
    def _inode(path: str) -> int | None:
        try:
            return os.stat(path).st_ino
        except OSError:
            return None
