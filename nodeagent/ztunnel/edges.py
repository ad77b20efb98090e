"""The tunnel's edges to the outside world, as small interfaces, and the state its proxies share.

Why this module exists: the proxies (inbound.py, outbound.py) must run unchanged in three places — in
pod network namespaces on a node, inside the lab, and on loopback in tests without root — so everything
that depends on where they run is passed in: how sockets are made (`SocketFactory`: listeners in a pod's
netns with SO_MARK/SO_REUSEPORT, upstream sockets, the original destination of a redirected connection),
where TLS material comes from (`Credentials`), and what the cluster looks like now (`ProxyState`, read
by the proxies, written only by the tunnel process).

`NetnsSocketFactory` is the production edge (nodeagent.ztunnel.sockets underneath); tests supply their
own factory that binds 127.0.0.x addresses instead.

What it deliberately does not do: no decisions (routing.py, policy.py) and no connection handling.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from nodeagent.model import Identity, Inventory, IPAddress, Pod, SocketAddress
from nodeagent.policy import PolicySet
from nodeagent.ztunnel import sockets, tls
from nodeagent.ztunnel.certs import CertMaterial
from nodeagent.ztunnel.routing import RoutingSnapshot, Workload


@dataclass(eq=False)
class LocalPod:
    """A pod this tunnel serves (from ZDS): who it is and the netns its sockets are made in."""

    uid: str
    name: str
    namespace: str
    identity: Identity
    netns_fd: int | None  # owned (a dup of the fd ZDS lent); None when sockets need no netns (tests)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def close(self) -> None:
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


@dataclass(frozen=True)
class NetnsSocketFactory:
    """Sockets in each pod's netns with SO_MARK 0x539; `spoof` connects to apps from the client's IP.

    Spoofing needs the capture backend's mark/connmark/route rules in the pod (REFERENCE.md) for the
    app's replies to reach the tunnel; without them leave it off and the app sees the pod's own IP.
    """

    spoof: bool = False
    mark: int | None = sockets.TUNNEL_MARK

    def listener(self, pod: LocalPod, ip: IPAddress | None, port: int, *, transparent: bool) -> socket.socket:
        any_ip = ipaddress.IPv4Address("0.0.0.0")
        return sockets.listener_in_netns(
            self._netns(pod), any_ip, port, transparent=transparent and self.spoof, mark=self.mark
        )

    def outbound(self, pod: LocalPod, target: SocketAddress) -> socket.socket:
        family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
        return sockets.connect_socket(family, netns=self._netns(pod), mark=self.mark)

    def upstream(self, pod: LocalPod, target: SocketAddress, client: IPAddress | None) -> socket.socket:
        family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
        spoof = self.spoof and client is not None and client.version == target.ip.version and client != target.ip
        return sockets.connect_socket(
            family, netns=self._netns(pod), mark=self.mark, source=client if spoof else None, transparent=spoof
        )

    def original_dst(self, sock: socket.socket) -> SocketAddress:
        return sockets.original_dst(sock)

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
