"""The tunnel's edges to the outside world, as small interfaces, and the state its proxies share.

Why this module exists: the proxies (inbound.py, outbound.py) must run unchanged in three places — in
pod network namespaces on a node, inside the lab, and on loopback in tests without root — so everything
that depends on where they run is passed in: how sockets are made (`SocketFactory`: listeners in a pod's
netns with SO_MARK/SO_REUSEPORT, upstream sockets, the original destination of a redirected connection),
where TLS material comes from (`Credentials`), and what the cluster looks like now (`ProxyState`, read
by the proxies, written only by the tunnel process).

`NetnsSocketFactory` is the production edge (nodeagent.ztunnel.sockets underneath); tests supply their
own factory that binds 127.0.0.x addresses instead. It works under both capture backends: the original
destination is SO_ORIGINAL_DST after an iptables REDIRECT, else (eBPF capture) the pod's pinned
map_orig_dst for :15001 and the accepted socket's own address for :15006 (sk_lookup steers without NAT);
and in eBPF mode it registers each pod's :15006 listener in the pod's pinned SOCKMAP.

What it deliberately does not do: no decisions (routing.py, policy.py) and no connection handling.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from nodeagent.ebpf import maps as ebpf_maps
from nodeagent.model import Identity, Inventory, IPAddress, Pod, SocketAddress
from nodeagent.netns import setns
from nodeagent.policy import PolicySet
from nodeagent.ztunnel import sockets, tls
from nodeagent.ztunnel.certs import CertMaterial
from nodeagent.ztunnel.routing import RoutingSnapshot, Workload


class NetnsWorker:
    """A long-lived thread inside one netns that makes bare TCP sockets there, keeping a few spare.

    A socket keeps the netns it was created in, and only its creation needs a thread inside that netns:
    options, bind() and connect() act on the socket's own netns from any thread. So the event loop takes a
    spare socket (no thread hand-off at all) and configures it itself; the worker refills the spares in
    the background, and makes one on request (the loop waits, GIL released) when none is left. Bounded:
    one thread per netns that makes connections (it exits after IDLE_EXIT seconds without work and starts
    again on demand), SPARES sockets per address family in use. `close()` (the pod left) closes the
    spares and the worker's own reference to the netns; the event loop's thread never calls setns.
    """

    SPARES = 8
    IDLE_EXIT = 30.0
    WAIT = 5.0

    def __init__(self, netns_fd: int, name: str) -> None:
        self._fd: int | None = os.dup(netns_fd)  # our own reference: the pod's fd may close first
        self._name = name
        self._cond = threading.Condition()
        self._spares: dict[socket.AddressFamily, list[socket.socket]] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    def socket(self, family: socket.AddressFamily) -> socket.socket:
        """A bare, unbound TCP socket of `family` in this netns."""
        with self._cond:
            if self._closed:
                raise OSError(errno.EBADF, f"pod {self._name} has left; no sockets in its netns")
            spares = self._spares.setdefault(family, [])
            if spares:
                sock = spares.pop()
                if len(spares) <= self.SPARES // 2:
                    self._wake()
                return sock
            self._wake()
            deadline = time.monotonic() + self.WAIT
            while not spares:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._closed:
                    raise OSError(errno.EBADF, f"pod {self._name} has left; no sockets in its netns")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OSError(errno.ETIMEDOUT, f"no socket from pod {self._name}'s netns within {self.WAIT:g} s")
                self._cond.wait(remaining)
            return spares.pop()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for spares in self._spares.values():
                for sock in spares:
                    sock.close()
            self._spares.clear()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._cond.notify_all()

    def _wake(self) -> None:  # with the lock held
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"netns {self._name}", daemon=True)
            self._thread.start()
        else:
            self._cond.notify_all()

    def _run(self) -> None:
        with self._cond:
            try:
                if self._closed or self._fd is None:
                    return
                setns(self._fd)  # this thread only, for the rest of its life
            except BaseException as exc:
                self._error = exc
                self._thread = None
                self._cond.notify_all()
                return
            while not self._closed:
                short = [(f, self.SPARES - len(s)) for f, s in self._spares.items() if len(s) < self.SPARES]
                if not short:
                    if not self._cond.wait(self.IDLE_EXIT) and not self._closed:
                        short = [(f, self.SPARES - len(s)) for f, s in self._spares.items() if len(s) < self.SPARES]
                        if not short:
                            break  # idle: a new thread enters the netns again when needed
                    continue
                self._cond.release()  # make sockets without holding up the event loop
                made: list[tuple[socket.AddressFamily, socket.socket]] = []
                error: BaseException | None = None
                try:
                    for family, n in short:
                        made += [(family, socket.socket(family, socket.SOCK_STREAM)) for _ in range(n)]
                except OSError as exc:  # EMFILE, ...: report it to a waiting caller
                    error = exc
                finally:
                    self._cond.acquire()
                for family, sock in made:
                    if self._closed:
                        sock.close()
                    else:
                        self._spares.setdefault(family, []).append(sock)
                if error is not None:
                    self._error = error
                    self._cond.notify_all()
                    break
                self._cond.notify_all()
            self._thread = None


@dataclass(eq=False)
class LocalPod:
    """A pod this tunnel serves (from ZDS): who it is and the netns its sockets are made in."""

    uid: str
    name: str
    namespace: str
    identity: Identity
    netns_fd: int | None  # owned (a dup of the fd ZDS lent); None when sockets need no netns (tests)
    _worker: NetnsWorker | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def netns_socket(self, family: socket.AddressFamily) -> socket.socket:
        """A bare TCP socket made in this pod's netns, by the pod's NetnsWorker (started on first use)."""
        worker = self._worker
        if worker is None:
            if self.netns_fd is None:  # an OSError, as every socket failure: callers reject or reset
                raise OSError(errno.EBADF, f"pod {self.key} has no netns here: it has left, or its ZDS Add had none")
            worker = self._worker = NetnsWorker(self.netns_fd, self.key)
        return worker.socket(family)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self.netns_fd is not None:
            os.close(self.netns_fd)
            self.netns_fd = None


class SocketFactory(Protocol):
    """How the tunnel gets its sockets for a pod; every method may block briefly (run off the loop)."""

    def listener(self, pod: LocalPod, ip: IPAddress | None, port: int, *, transparent: bool) -> socket.socket:
        """A listening non-blocking socket for `pod` on `port` (`ip`: the pod's address if known)."""
        ...

    def outbound(self, pod: LocalPod, target: SocketAddress) -> socket.socket:
        """An unconnected socket from `pod` towards `target` (HBONE to a peer tunnel, or passthrough)."""
        ...

    def upstream(self, pod: LocalPod, target: SocketAddress, client: IPAddress | None) -> socket.socket:
        """An unconnected socket to the application in `pod`, from the client's IP where that works."""
        ...

    def original_dst(self, sock: socket.socket) -> SocketAddress:
        """Where an accepted, captured connection was going."""
        ...

    def reclaim_inbound(self, pod: LocalPod, listener: socket.socket) -> bool:
        """Put the pod's :15006 `listener` back where the capture steers plaintext, if nothing is there
        (eBPF: an empty map_listener slot); True if it did. Called periodically by the tunnel."""
        ...


def _netns_cookie(sock: socket.socket) -> int:
    """Which netns a socket lives in (SO_NETNS_COOKIE): an accepted socket shares its listener's."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, ebpf_maps.SO_NETNS_COOKIE, 8), "little")


def _socket_address(addr: tuple[str, int] | tuple[str, int, int, int]) -> SocketAddress:
    return SocketAddress(ipaddress.ip_address(addr[0]), addr[1])


@dataclass(frozen=True)
class NetnsSocketFactory:
    """Sockets in each pod's netns with SO_MARK 0x539; `spoof` connects to apps from the client's IP.

    Spoofing needs the capture backend's mark/connmark/route rules in the pod (REFERENCE.md) for the
    app's replies to reach the tunnel; without them leave it off and the app sees the pod's own IP.
    """

    spoof: bool = False
    mark: int | None = sockets.TUNNEL_MARK
    bpf_pin_root: str | None = None  # eBPF pins (default /sys/fs/bpf/nodeagent)
    _uids: dict[int, str] = field(default_factory=dict, compare=False, repr=False)  # netns cookie -> pod uid

    def listener(self, pod: LocalPod, ip: IPAddress | None, port: int, *, transparent: bool) -> socket.socket:
        any_ip = ipaddress.IPv4Address("0.0.0.0")
        sock = sockets.listener_in_netns(
            self._netns(pod), any_ip, port, transparent=transparent and self.spoof, mark=self.mark
        )
        try:
            self._uids[_netns_cookie(sock)] = pod.uid
            if port == sockets.INBOUND_PLAINTEXT_PORT:
                ebpf_maps.register_inbound_listener(pod.uid, sock.fileno(), self.bpf_pin_root)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"pod {pod.key}: cannot register the :{port} listener for eBPF capture: {exc}"
            ) from None
        return sock

    def reclaim_inbound(self, pod: LocalPod, listener: socket.socket) -> bool:
        return ebpf_maps.reclaim_inbound_listener(pod.uid, listener.fileno(), self.bpf_pin_root)

    def outbound(self, pod: LocalPod, target: SocketAddress) -> socket.socket:
        family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
        return sockets.connect_socket(family, mark=self.mark, make_socket=pod.netns_socket)

    def upstream(self, pod: LocalPod, target: SocketAddress, client: IPAddress | None) -> socket.socket:
        family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
        spoof = self.spoof and client is not None and client.version == target.ip.version and client != target.ip
        ebpf = spoof and ebpf_maps.ebpf_captured(pod.uid, self.bpf_pin_root)
        # eBPF capture: the app's socket inherits the SYN's mark (tcp_fwmark_accept in the pod), so mark
        # the spoofed connection with the bypass mark that the pod's policy routing delivers locally.
        mark = sockets.BYPASS_MARK if ebpf else self.mark
        sock = sockets.connect_socket(
            family,
            mark=mark,
            source=client if spoof else None,
            transparent=spoof,
            make_socket=pod.netns_socket,
            port_at_connect=not ebpf,  # announce_bypass needs the port now
        )
        if ebpf:
            try:
                bound = sock.getsockname()
                ebpf_maps.announce_bypass(pod.uid, bound[0], bound[1], self.bpf_pin_root)
            except OSError:
                sock.close()
                raise
        return sock

    def original_dst(self, sock: socket.socket) -> SocketAddress:
        local = _socket_address(sock.getsockname())
        try:
            nat = sockets.original_dst(sock)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            nat = None
        if nat is not None and nat != local:
            return nat  # iptables REDIRECT: conntrack's original tuple
        if local.port != sockets.OUTBOUND_PORT:
            return local  # eBPF sk_lookup (no NAT): the accepted socket's address is the original destination
        peer = _socket_address(sock.getpeername())
        uid = self._uids.get(_netns_cookie(sock))
        found = ebpf_maps.original_dst(uid, str(peer.ip), peer.port, self.bpf_pin_root) if uid else None
        if found is None:
            raise OSError(
                errno.ENOENT,
                f"connection {peer} -> :{local.port} has no original destination: neither an iptables REDIRECT "
                "nor an eBPF map entry - is capture installed in this pod?",
            )
        return SocketAddress(ipaddress.ip_address(found[0]), found[1])

    @staticmethod
    def _netns(pod: LocalPod) -> int:
        if pod.netns_fd is None:
            raise RuntimeError(f"pod {pod.key} has no netns fd; the ZDS Add must carry one")
        return pod.netns_fd


class Credentials(Protocol):
    """The certificate manager as the tunnel uses it (nodeagent.ztunnel.certs.CertificateManager)."""

    def material(self, identity: Identity) -> CertMaterial: ...

    @property
    def bundle_pem(self) -> str: ...


class TlsContexts:
    """HBONE TLS contexts (tls.py's settings) per identity, rebuilt when the certificate or roots change."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._cache: dict[tuple[Identity, bool], tuple[bytes, ssl.SSLContext]] = {}

    def context(self, identity: Identity, *, server_side: bool) -> ssl.SSLContext:
        """Raises the certificate manager's CertUnavailable when `identity` has no valid certificate."""
        m = self._credentials.material(identity)
        chain = m.presented_chain_pem().encode()
        roots = self._credentials.bundle_pem.encode()
        stamp = hashlib.sha256(chain + b"\0" + roots).digest()
        cached = self._cache.get((identity, server_side))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        material = tls.TlsMaterial(chain, m.key_pem, roots)
        ctx = tls.server_context(material) if server_side else tls.client_context(material)
        self._cache[(identity, server_side)] = (stamp, ctx)
        return ctx

    def forget(self, identity: Identity) -> None:
        for side in (True, False):
            self._cache.pop((identity, side), None)


@dataclass(frozen=True)
class ClusterView:
    """Inventory, routing snapshot and policies at one moment; swapped whole by the tunnel process."""

    inventory: Inventory
    routing: RoutingSnapshot
    policies: PolicySet
    pods_by_uid: Mapping[str, Pod] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, inventory: Inventory, policies: PolicySet) -> ClusterView:
        return cls(
            inventory,
            RoutingSnapshot.from_inventory(inventory),
            policies,
            MappingProxyType({p.uid: p for p in inventory.pods}),
        )

    @property
    def trust_domain(self) -> str:
        return self.inventory.trust_domain

    @property
    def cluster(self) -> str:
        return self.inventory.cluster_name

    def workload_at(self, ip: IPAddress) -> Workload | None:
        return self.routing.workloads.get(ip)

    def pod_at(self, ip: IPAddress) -> Pod | None:
        workload = self.routing.workloads.get(ip)
        return workload.pod if workload is not None else None

    def pod_of(self, local: LocalPod) -> Pod | None:
        """The inventory's view of a local pod (its IP and labels), by uid, else by namespace/name."""
        pod = self.pods_by_uid.get(local.uid)
        if pod is not None:
            return pod
        for candidate in self.inventory.pods:
            if candidate.namespace == local.namespace and candidate.name == local.name:
                return candidate
        return None


class ProxyState:
    """What the proxies read: the current ClusterView. One writer (the tunnel process)."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view
