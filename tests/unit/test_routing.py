"""Tables for nodeagent.ztunnel.routing (plan_outbound, inbound_service); properties for RoutingSnapshot's indexes."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.model import (
    DATAPLANE_MODE_LABEL,
    Identity,
    Inventory,
    Namespace,
    Node,
    Pod,
    PodPhase,
    Service,
    ServicePort,
    SocketAddress,
)
from nodeagent.ztunnel.routing import (
    Denial,
    Hbone,
    Passthrough,
    PoolKey,
    RoutingSnapshot,
    inbound_service,
    plan_outbound,
)

TD = "cluster.local"
ip = ipaddress.IPv4Address


def pod(name: str, ns: str, addr: str | None, sa: str = "default", **kw: object) -> Pod:
    return Pod(name, ns, f"uid-{name}", "node1", sa, ip(addr) if addr else None, **kw)  # type: ignore[arg-type]


MESH_NS = Namespace("mesh", MappingProxyType({DATAPLANE_MODE_LABEL: "ambient"}))
PLAIN_NS = Namespace("plain")
CLIENT = pod("client", "mesh", "10.1.0.5", sa="client-sa")
SERVER = pod("server", "mesh", "10.2.0.7", sa="server-sa", labels=MappingProxyType({"app": "web"}))
SERVER2 = pod("server2", "mesh", "10.2.0.8", sa="server-sa", labels=MappingProxyType({"app": "web"}))
LEGACY = pod("legacy", "plain", "10.2.0.9", labels=MappingProxyType({"app": "legacy"}))
OPTED_OUT = pod("optout", "mesh", "10.2.0.10", labels=MappingProxyType({DATAPLANE_MODE_LABEL: "none"}))
OPTED_IN = pod("optin", "plain", "10.2.0.11", labels=MappingProxyType({DATAPLANE_MODE_LABEL: "ambient"}))
FINISHED = pod("done", "mesh", "10.2.0.12", phase=PodPhase.SUCCEEDED)
PENDING_WEB = pod("starting", "mesh", "10.2.0.13", labels=MappingProxyType({"app": "web"}), phase=PodPhase.PENDING)
NO_IP = pod("noip", "mesh", None)
# Behind the "api" service: named ports, readiness, deletion, host network.
API_LABELS = MappingProxyType({"app": "api"})
API_A = pod("api-a", "mesh", "10.2.0.20", sa="api", labels=API_LABELS, container_ports=MappingProxyType({"grpc": 9000}))
API_B = pod("api-b", "mesh", "10.2.0.21", sa="api", labels=API_LABELS)  # does not define "grpc"
API_UNREADY = pod("api-c", "mesh", "10.2.0.22", sa="api", labels=API_LABELS, ready=False)
API_GOING = pod("api-d", "mesh", "10.2.0.23", sa="api", labels=API_LABELS, terminating=True)
HOSTNET = pod("agent", "plain", "192.168.0.1", labels=MappingProxyType({"app": "hostnet"}), host_network=True)

WEB = Service("web", "mesh", MappingProxyType({"app": "web"}), (ServicePort(80, 8080, "http"),), ip("10.96.0.10"))
LEGACY_SVC = Service("legacy", "plain", MappingProxyType({"app": "legacy"}), (ServicePort(80, 8080),), ip("10.96.0.11"))
EMPTY_SVC = Service("empty", "mesh", MappingProxyType({"app": "nothing"}), (ServicePort(80, 8080),), ip("10.96.0.12"))
LOOP_SVC = Service("loop", "mesh", MappingProxyType({"app": "web"}), (ServicePort(80, 15008),), ip("10.96.0.13"))
API_SVC = Service(
    "api", "mesh", API_LABELS, (ServicePort(80, 8080), ServicePort(90, 0, "rpc", "grpc")), ip("10.96.0.14")
)
NOSEL_SVC = Service("kubernetes", "default", MappingProxyType({}), (ServicePort(443, 6443),), ip("10.96.0.1"))
HOSTNET_SVC = Service(
    "hostnet", "plain", MappingProxyType({"app": "hostnet"}), (ServicePort(80, 9100),), ip("10.96.0.15")
)

INVENTORY = Inventory(
    cluster_name="test",
    trust_domain=TD,
    fabric_cidr=ipaddress.IPv4Network("192.168.0.0/24"),
    nodes=(Node("node1", ipaddress.IPv4Network("10.1.0.0/16"), ip("192.168.0.1")),),
    namespaces=(MESH_NS, PLAIN_NS),
    pods=(
        CLIENT,
        SERVER,
        SERVER2,
        LEGACY,
        OPTED_OUT,
        OPTED_IN,
        FINISHED,
        PENDING_WEB,
        NO_IP,
        API_A,
        API_B,
        API_UNREADY,
        API_GOING,
        HOSTNET,
    ),
    services=(WEB, LEGACY_SVC, EMPTY_SVC, LOOP_SVC, API_SVC, NOSEL_SVC, HOSTNET_SVC),
)
SNAP = RoutingSnapshot.from_inventory(INVENTORY)
CLIENT_ID = Identity(TD, "mesh", "client-sa")
SERVER_ID = Identity(TD, "mesh", "server-sa")
API_ID = Identity(TD, "mesh", "api")


def addr(text: str) -> SocketAddress:
    return SocketAddress.parse(text)


def hbone(target: str, dst_id: Identity, workload: str, service: str | None = None) -> Hbone:
    t = addr(target)
    return Hbone(t, PoolKey(CLIENT_ID, dst_id, ip("10.1.0.5"), SocketAddress(t.ip, 15008)), workload, service)


CASES: list[tuple[str, str, int, Hbone | Passthrough | Denial]] = [
    ("enrolled pod ip", "10.2.0.7:8080", 0, hbone("10.2.0.7:8080", SERVER_ID, "mesh/server")),
    (
        "pod enrolled by its own label",
        "10.2.0.11:80",
        0,
        hbone("10.2.0.11:80", Identity(TD, "plain", "default"), "plain/optin"),
    ),
    (
        "pod in plain namespace",
        "10.2.0.9:8080",
        0,
        Passthrough(addr("10.2.0.9:8080"), "pod plain/legacy is not in the mesh", "plain/legacy"),
    ),
    (
        "pod opted out",
        "10.2.0.10:80",
        0,
        Passthrough(addr("10.2.0.10:80"), "pod mesh/optout is not in the mesh", "mesh/optout"),
    ),
    (
        "finished pod's ip is unknown",
        "10.2.0.12:80",
        0,
        Passthrough(addr("10.2.0.12:80"), "destination is not a known workload"),
    ),
    ("outside the cluster", "1.1.1.1:443", 0, Passthrough(addr("1.1.1.1:443"), "destination is not a known workload")),
    (
        "unknown port 15008 outside is not a loop",
        "1.1.1.1:15008",
        0,
        Passthrough(addr("1.1.1.1:15008"), "destination is not a known workload"),
    ),
    ("service vip -> first endpoint", "10.96.0.10:80", 0, hbone("10.2.0.7:8080", SERVER_ID, "mesh/server", "mesh/web")),
    (
        "service vip -> second endpoint",
        "10.96.0.10:80",
        1,
        hbone("10.2.0.8:8080", SERVER_ID, "mesh/server2", "mesh/web"),
    ),
    ("balance wraps", "10.96.0.10:80", 2, hbone("10.2.0.7:8080", SERVER_ID, "mesh/server", "mesh/web")),
    (
        "service of unenrolled pods",
        "10.96.0.11:80",
        0,
        Passthrough(addr("10.2.0.9:8080"), "pod plain/legacy is not in the mesh", "plain/legacy", "plain/legacy"),
    ),
    (
        "service port not declared",
        "10.96.0.10:81",
        0,
        Passthrough(addr("10.96.0.10:81"), "port 81 is not a port of service mesh/web", service="mesh/web"),
    ),
    (
        "service without endpoints",
        "10.96.0.12:80",
        0,
        Denial("service mesh/empty has no ready endpoints; check its selector and its pods"),
    ),
    (
        "loop 15001 on pod",
        "10.2.0.7:15001",
        0,
        Denial("10.2.0.7:15001 is a tunnel port of pod mesh/server; refusing to loop through the tunnel"),
    ),
    (
        "loop 15006 on pod",
        "10.2.0.7:15006",
        0,
        Denial("10.2.0.7:15006 is a tunnel port of pod mesh/server; refusing to loop through the tunnel"),
    ),
    (
        "loop 15008 on unenrolled pod",
        "10.2.0.9:15008",
        0,
        Denial("10.2.0.9:15008 is a tunnel port of pod plain/legacy; refusing to loop through the tunnel"),
    ),
    # Only Ready, not terminating pods are endpoints: the two others of "api" never come up.
    ("endpoints: ready ones only", "10.96.0.14:80", 0, hbone("10.2.0.20:8080", API_ID, "mesh/api-a", "mesh/api")),
    ("endpoints: ready ones, next", "10.96.0.14:80", 1, hbone("10.2.0.21:8080", API_ID, "mesh/api-b", "mesh/api")),
    ("endpoints: ready ones wrap", "10.96.0.14:80", 2, hbone("10.2.0.20:8080", API_ID, "mesh/api-a", "mesh/api")),
    # A named targetPort resolves on each pod; a pod that does not define it is not an endpoint of the port.
    ("named target port", "10.96.0.14:90", 0, hbone("10.2.0.20:9000", API_ID, "mesh/api-a", "mesh/api")),
    ("named target port, next", "10.96.0.14:90", 1, hbone("10.2.0.20:9000", API_ID, "mesh/api-a", "mesh/api")),
    (
        "service without selector (kubernetes.default)",
        "10.96.0.1:443",
        0,
        Passthrough(
            addr("10.96.0.1:443"),
            "service default/kubernetes has no selector: its endpoints are not pods",
            None,
            "default/kubernetes",
        ),
    ),
    (
        "host-network endpoint, reached in plain TCP",
        "10.96.0.15:80",
        0,
        Passthrough(addr("192.168.0.1:9100"), "destination is not a known workload", service="plain/hostnet"),
    ),
    (
        "loop via service target port",
        "10.96.0.13:80",
        0,
        Denial("10.2.0.7:15008 is a tunnel port of pod mesh/server; refusing to loop through the tunnel"),
    ),
]


@pytest.mark.parametrize(("dst", "balance", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_outbound(dst: str, balance: int, expected: Hbone | Passthrough | Denial) -> None:
    assert plan_outbound(SNAP, CLIENT, addr(dst), balance=balance) == expected


def test_hbone_plan_carries_identities_and_pool_key() -> None:
    plan = plan_outbound(SNAP, CLIENT, addr("10.2.0.7:8080"))
    assert isinstance(plan, Hbone)
    assert plan.expected_identity == SERVER_ID and plan.source_identity == CLIENT_ID
    assert plan.pool_key.destination == addr("10.2.0.7:15008")
    # two connections to different ports of the same pod share the HBONE connection
    other = plan_outbound(SNAP, CLIENT, addr("10.2.0.7:9090"))
    assert isinstance(other, Hbone) and other.pool_key == plan.pool_key


def test_source_without_ip_is_denied() -> None:
    assert isinstance(plan_outbound(SNAP, NO_IP, addr("10.2.0.7:8080")), Denial)


def test_snapshot_leaves_out_pending_endpoints_and_ipless_pods() -> None:
    assert [w.key for w in SNAP.services[ip("10.96.0.10")].endpoints] == ["mesh/server", "mesh/server2"]
    assert ip("10.2.0.13") in SNAP.workloads  # a pending pod is still a known workload
    assert all(w.pod.ip is not None for w in SNAP.workloads.values())


# -- inbound: the service a connection to a pod is reported under (ztunnel's guess_inbound_service) ---------

INBOUND_CASES: list[tuple[str, str, str | None, str | None]] = [
    ("numeric target port", "10.2.0.7:8080", None, "mesh/web"),
    ("the first service whose port forwards there", "10.2.0.7:15008", None, "mesh/loop"),
    ("no service port forwards there", "10.2.0.7:9999", None, None),
    ("named target port resolved on the pod", "10.2.0.20:9000", None, "mesh/api"),
    ("pod without the named port", "10.2.0.21:9000", None, None),
    ("unready pod still belongs to its service", "10.2.0.22:8080", None, "mesh/api"),
    ("pending pod", "10.2.0.13:8080", None, "mesh/web"),
    ("pod no service selects", "10.1.0.5:8080", None, None),
    ("not a workload", "1.1.1.1:80", None, None),
    ("host-network pod's IP is its node's", "192.168.0.1:9100", None, None),
    ("told service selecting the pod wins", "10.2.0.7:8080", "mesh/loop", "mesh/loop"),
    ("told service not selecting the pod is ignored", "10.2.0.7:8080", "plain/legacy", "mesh/web"),
]


@pytest.mark.parametrize(
    ("target", "told", "expected"), [c[1:] for c in INBOUND_CASES], ids=[c[0] for c in INBOUND_CASES]
)
def test_inbound_service(target: str, told: str | None, expected: str | None) -> None:
    assert inbound_service(SNAP, addr(target), told) == expected


# -- service endpoints: the label index must answer exactly what matching every pod would -------------------

_names = st.sampled_from(["a", "b", "c"])
_labels = st.dictionaries(st.sampled_from(["app", "tier", "v"]), st.sampled_from(["x", "y"]), max_size=3)


@st.composite
def _inventories(draw: st.DrawFn) -> Inventory:
    pods = tuple(
        pod(
            f"p{i}",
            draw(_names),
            f"10.3.0.{draw(st.integers(1, 12))}",  # shared IPs: the later pod wins, as for a recycled IP
            labels=MappingProxyType(draw(_labels)),
            phase=draw(st.sampled_from(list(PodPhase))),
            host_network=draw(st.booleans()),
            ready=draw(st.booleans()),
            terminating=draw(st.booleans()),
        )
        for i in range(draw(st.integers(0, 12)))
    )
    services = tuple(
        Service(f"s{i}", draw(_names), MappingProxyType(draw(_labels)), (ServicePort(80, 8080),), ip(f"10.96.1.{i}"))
        for i in range(draw(st.integers(0, 6)))
    )
    return Inventory("t", TD, INVENTORY.fabric_cidr, INVENTORY.nodes, (MESH_NS, PLAIN_NS), pods, services)


@given(_inventories())
def test_service_endpoints_are_the_ready_pods_the_selector_matches(inventory: Inventory) -> None:
    """Running, Ready, not terminating; a recycled IP's later pod; host-network pods too (after the others)."""
    snap = RoutingSnapshot.from_inventory(inventory)
    host = [p for p in inventory.pods if p.host_network and p.ip is not None and not p.terminated]
    candidates = [*(w.pod for w in snap.workloads.values()), *host]
    for svc in inventory.services:
        assert svc.vip is not None
        expected = [
            p for p in candidates if p.phase is PodPhase.RUNNING and p.ready and not p.terminating and svc.selects(p)
        ]
        assert [w.pod for w in snap.services[svc.vip].endpoints] == expected


@given(_inventories())
def test_services_of_a_pod_are_those_whose_selector_matches_it(inventory: Inventory) -> None:
    """Ready or not, in inventory order; host-network pods have none (their IP is their node's)."""
    snap = RoutingSnapshot.from_inventory(inventory)
    for address, workload in snap.workloads.items():
        expected = tuple(svc for svc in inventory.services if svc.selects(workload.pod))
        assert snap.services_of.get(address, ()) == expected
    assert set(snap.services_of) <= set(snap.workloads)
