"""Outbound decision: where a connection captured on an enrolled pod's :15001 goes, and how.

Why this module exists: "decide, then act". The outbound listener learns the original destination of a
captured connection; this pure function turns it, together with a frozen view of the cluster, into a plan
(HBONE to the destination pod's :15008 with the identities and pool key to use; or plain TCP passthrough)
or a denial. The executor in outbound.py only carries the plan out, and the rules are tested with a table.

Rules (ztunnel src/proxy/outbound.rs, simplified to L4 without waypoints):
- the destination is a pod IP: HBONE to `pod:15008` with `:authority pod:port` when the pod is enrolled,
  passthrough to it when it is not;
- the destination is a service VIP on one of its ports: pick a ready endpoint pod (the caller supplies the
  `balance` counter, so the function stays pure) and treat `endpoint:target_port` as above — a named
  targetPort is resolved on each endpoint from its containers' ports, and an endpoint without it is not
  one for that port. Endpoints are the running, Ready, not terminating pods the selector matches,
  host-network ones included (they are reached in plain TCP, as any pod outside the mesh). A service
  with a selector and no ready endpoint is a denial; a service without a selector (`kubernetes.default`,
  manual EndpointSlices: its endpoints are nothing the mesh knows) and an unknown port on a VIP are
  passed through unchanged, to the cluster's service routing;
- anything else (outside the cluster, unknown IPs): passthrough to the original destination;
- the tunnel's own ports (15001/15006/15008) on a pod are loop targets: denial.

Who a captured connection is from (`source_address`): the source pod's own IP, whatever local address
the app's socket was bound to (see that function for why).

The inbound side asks one question of the same snapshot: which service to report a connection under
(`inbound_service`, ztunnel's guess: it never sees the VIP the client dialled).

What it deliberately does not do: no sockets, no certificates, no pooling, no authorization (the inbound
side decides that), no DNS, no waypoints, no multi-network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nodeagent.model import (
    DEFAULT_EXCLUDED_NAMESPACES,
    Identity,
    Inventory,
    IPAddress,
    Namespace,
    Pod,
    PodPhase,
    Service,
    SocketAddress,
    enrolled,
)

HBONE_PORT = 15008
TUNNEL_PORTS = frozenset({15001, 15006, HBONE_PORT})


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod as routing sees it: its identity and whether it is in the mesh."""

    pod: Pod
    identity: Identity
    enrolled: bool

    @property
    def key(self) -> str:
        return self.pod.key


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    service: Service
    # Ready pods the service selects (Running, Ready, not terminating, with an IP; host-network ones too,
    # never enrolled), in inventory order.
    endpoints: tuple[Workload, ...]


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """A frozen view of the cluster for routing: workloads by pod IP and services by VIP.

    Build it with `from_inventory` whenever the inventory changes and swap it whole; it is never mutated.
    Pods that are finished (Succeeded/Failed), have no IP or share the host's network are left out, so a
    recycled IP always resolves to the live pod.
    """

    trust_domain: str
    workloads: Mapping[IPAddress, Workload]
    services: Mapping[IPAddress, ServiceRoute]
    # The services whose selector matches the pod at an IP (ready or not, headless ones too), in inventory
    # order: what `inbound_service` guesses from.
    services_of: Mapping[IPAddress, tuple[Service, ...]]

    @classmethod
    def from_inventory(
        cls, inventory: Inventory, excluded: frozenset[str] = DEFAULT_EXCLUDED_NAMESPACES
    ) -> RoutingSnapshot:
        namespaces: dict[str, Namespace] = {}
        for ns in inventory.namespaces:
            namespaces.setdefault(ns.name, ns)  # the first of a name, as Inventory.namespace() answers
        workloads: dict[IPAddress, Workload] = {}
        identities: dict[tuple[str, str], Identity] = {}  # pods share a few accounts: validate each once
        # Services through an index of pods by (namespace, label, value): a service is matched
        # only against the pods that carry its first selector pair. Matching every service against every
        # pod took 5 M label checks, ~0.9 s at 5 000 pods / 1 000 services, on the tunnel's event loop at
        # every change of the cluster. Candidates keep inventory order (host-network pods last).
        host_pods: list[Workload] = []  # their IP is their node's: endpoints, never workload addresses
        for pod in inventory.pods:
            if pod.ip is None or pod.terminated:
                continue
            in_mesh = enrolled(pod, namespaces.get(pod.namespace), excluded)  # never a host-network pod
            account = (pod.namespace, pod.service_account)
            identity = identities.get(account)
            if identity is None:
                identity = identities[account] = pod.identity(inventory.trust_domain)
            if pod.host_network:
                host_pods.append(Workload(pod, identity, in_mesh))
            else:
                workloads[pod.ip] = Workload(pod, identity, in_mesh)
        labelled: dict[tuple[str, str, str], list[Workload]] = {}
        for w in (*workloads.values(), *host_pods):
            for key, value in w.pod.labels.items():
                labelled.setdefault((w.pod.namespace, key, value), []).append(w)
        services: dict[IPAddress, ServiceRoute] = {}
        services_of: dict[IPAddress, list[Service]] = {}
        for svc in inventory.services:
            first = next(iter(svc.selector.items()), None)  # an empty selector selects nothing
            candidates = labelled.get((svc.namespace, *first), ()) if first is not None else ()
            selected = [w for w in candidates if svc.selects(w.pod)]
            for w in selected:
                if not w.pod.host_network:
                    assert w.pod.ip is not None  # the snapshot only holds pods with an IP
                    services_of.setdefault(w.pod.ip, []).append(svc)
            if svc.vip is not None:
                ready = tuple(w for w in selected if serving(w.pod))
                services[svc.vip] = ServiceRoute(svc, ready)
        return cls(
            inventory.trust_domain,
            MappingProxyType(workloads),
            MappingProxyType(services),
            MappingProxyType({addr: tuple(found) for addr, found in services_of.items()}),
        )


def serving(pod: Pod) -> bool:
    """An endpoint a service sends new connections to (ztunnel's Healthy): running, Ready, not being deleted."""
    return pod.phase is PodPhase.RUNNING and pod.ready and not pod.terminating


@dataclass(frozen=True, slots=True)
class PoolKey:
    """HBONE connections are shared only between connections with all four equal (REFERENCE.md, Pooling)."""

    source_identity: Identity
    destination_identity: Identity
    source_ip: IPAddress
    destination: SocketAddress  # the HBONE endpoint, pod IP:15008


@dataclass(frozen=True, slots=True)
class Hbone:
    """Open (or reuse) mTLS+HTTP/2 to `pool_key.destination`, CONNECT to `target`, expect that peer identity."""

    target: SocketAddress  # the :authority: destination pod IP and the port its application listens on
    pool_key: PoolKey
    destination_workload: str  # "namespace/name", for logs and metrics
    service: str | None = None  # "namespace/name" when reached through a service VIP

    @property
    def expected_identity(self) -> Identity:
        return self.pool_key.destination_identity

    @property
    def source_identity(self) -> Identity:
        return self.pool_key.source_identity


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Plain TCP to `target` from the source pod's netns (the destination is outside the mesh)."""

    target: SocketAddress
    reason: str
    destination_workload: str | None = None
    service: str | None = None


OutboundPlan = Hbone | Passthrough


@dataclass(frozen=True, slots=True)
class Denial:
    """Refuse the captured connection (reset it); `reason` says why and goes to the access log."""

    reason: str


def plan_outbound(
    snapshot: RoutingSnapshot, source: Pod, original_dst: SocketAddress, *, balance: int = 0
) -> OutboundPlan | Denial:
    """Decide the route of one captured outbound connection; `balance` picks among service endpoints."""
    if source.ip is None:
        return Denial(f"source pod {source.key} has no IP yet; it cannot originate mesh traffic")
    service: str | None = None
    dst = original_dst
    route = snapshot.services.get(dst.ip)
    if route is not None:
        svc = route.service
        service = f"{svc.namespace}/{svc.name}"
        port = next((p for p in svc.ports if p.port == dst.port), None)
        if port is None:
            return Passthrough(dst, f"port {dst.port} is not a port of service {service}", service=service)
        if not svc.selector:
            return Passthrough(dst, f"service {service} has no selector: its endpoints are not pods", service=service)
        # A numeric target port is every endpoint's; a named one only of the pods that define it.
        endpoints, target_port = route.endpoints, port.target_port
        if port.target_port_name:
            endpoints = tuple(w for w in endpoints if port.target_on(w.pod) is not None)
        if not endpoints:
            named = f" defining port {port.target_port_name!r}" if port.target_port_name else ""
            return Denial(f"service {service} has no ready endpoints{named}; check its selector and its pods")
        endpoint = endpoints[balance % len(endpoints)]
        if port.target_port_name:
            target_port = endpoint.pod.container_ports[port.target_port_name]
        assert endpoint.pod.ip is not None  # the snapshot only holds pods with an IP
        dst = SocketAddress(endpoint.pod.ip, target_port)
    workload = snapshot.workloads.get(dst.ip)
    if workload is None:
        return Passthrough(dst, "destination is not a known workload", service=service)
    if dst.port in TUNNEL_PORTS:
        return Denial(f"{dst} is a tunnel port of pod {workload.key}; refusing to loop through the tunnel")
    if not workload.enrolled:
        return Passthrough(dst, f"pod {workload.key} is not in the mesh", workload.key, service)
    source_identity = source.identity(snapshot.trust_domain)
    key = PoolKey(source_identity, workload.identity, source.ip, SocketAddress(dst.ip, HBONE_PORT))
    return Hbone(dst, key, workload.key, service)


def source_address(source: Pod, peer: SocketAddress) -> SocketAddress:
    """The address a connection captured from `source` is attributed to: `peer` (the accepted socket's remote
    end) when it is the pod's IP, else the pod's IP with the peer's port.

    Only `source`'s own netns reaches its :15001, but an app there may bind any local address of that netns
    before it connects. Under eBPF capture the destination is rewritten before the route is chosen, so a
    socket bound to 127.0.0.1 (or any 127/8 address) reaches the tunnel from there — and so does every
    connection while the pod's IP is not yet in the BPF config (then the hook redirects to 127.0.0.1).
    Such an address must not travel: the same-node path authorizes with the client's address (a DENY on the
    pod's IP in `ipBlocks` would not match 127.0.0.1) and connects to the destination app *from* it
    (IP_TRANSPARENT), so that app would see a localhost peer — a pod could pose as the destination's own
    localhost. Upstream ztunnel (in-pod mode) attributes outbound traffic to the netns's workload whatever
    its source; its iptables capture cannot produce a loopback source (connect() to a pod address from
    127/8 fails with EINVAL), ours can.
    """
    if source.ip is None or peer.ip == source.ip:
        return peer
    return SocketAddress(source.ip, peer.port)


def inbound_service(snapshot: RoutingSnapshot, target: SocketAddress, told: str | None = None) -> str | None:
    """The destination service an inbound connection to `target` (a pod's IP and port) is reported under.

    The inbound side never sees the VIP the client dialled: the HBONE `:authority` and the captured
    original destination are the pod's own address. So, as ztunnel does (proxy.rs
    guess_inbound_service), the service is `told` when the caller knows it and it selects the pod, else
    the first service selecting the pod with a port that forwards to `target.port` (a numeric targetPort,
    or a named one the pod resolves to it); None when no service does. A best guess: a pod behind two
    services with the same target port is reported under the first.
    """
    workload = snapshot.workloads.get(target.ip)
    if workload is None:
        return None
    candidates = snapshot.services_of.get(target.ip, ())
    for svc in candidates:
        if f"{svc.namespace}/{svc.name}" == told:
            return told
    for svc in candidates:
        if any(port.target_on(workload.pod) == target.port for port in svc.ports):
            return f"{svc.namespace}/{svc.name}"
    return None
