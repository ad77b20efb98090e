"""The local inventory parser: every bad input is rejected with the field that is wrong."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.inventory.local import InventoryError, load_inventory, parse_inventory
from nodeagent.model import Namespace, Pod, PodPhase, enrolled, pod_uid

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "nodeagent" / "lab" / "default.yaml"


def valid() -> dict[str, Any]:
    return {
        "cluster": {"name": "lab", "fabric_cidr": "10.99.0.0/24"},
        "nodes": [
            {"name": "node1", "pod_cidr": "10.10.1.0/24", "address": "10.99.0.11", "token": "t" * 16 + "1"},
            {"name": "node2", "pod_cidr": "10.10.2.0/24", "address": "10.99.0.12", "token": "t" * 16 + "2"},
        ],
        "namespaces": [{"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}, {"name": "legacy"}],
        "pods": [
            {"name": "frontend", "namespace": "shop", "node": "node1", "service_account": "frontend"},
            {"name": "checkout", "namespace": "shop", "node": "node2", "service_account": "checkout"},
            {"name": "batch", "namespace": "legacy", "node": "node2", "service_account": "batch"},
        ],
        "services": [
            {"name": "checkout", "namespace": "shop", "selector": {"app": "checkout"}, "ports": [{"port": 80}]}
        ],
    }


def setter(*path: str | int, value: object) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        target: Any = data
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return apply


def deleter(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        target: Any = data
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return apply


def appender(section: str, item: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda data: data[section].append(copy.deepcopy(item))


NODE3 = {"name": "node3", "pod_cidr": "10.10.3.0/24", "address": "10.99.0.13"}
POD = {"name": "extra", "namespace": "shop", "node": "node1", "service_account": "extra"}

BAD = [
    # (id, mutation, field path, words the problem must contain)
    ("unknown top field", setter("extra", value=1), "extra", "unknown field"),
    ("no cluster", deleter("cluster"), "cluster", "required"),
    ("cluster not mapping", setter("cluster", value=["lab"]), "cluster", "mapping"),
    ("cluster name", setter("cluster", "name", value="Lab_1"), "cluster.name", "DNS label"),
    ("trust domain", setter("cluster", "trust_domain", value="Cluster.Local"), "cluster.trust_domain", "lowercase"),
    ("fabric host bits", setter("cluster", "fabric_cidr", value="10.99.0.1/24"), "cluster.fabric_cidr", "CIDR"),
    ("fabric too small", setter("cluster", "fabric_cidr", value="10.99.0.0/31"), "cluster.fabric_cidr", "/30"),
    ("cluster unknown field", setter("cluster", "zone", value="a"), "cluster.zone", "unknown field"),
    ("no nodes", setter("nodes", value=[]), "nodes", "at least one"),
    ("nodes not list", setter("nodes", value={"node1": {}}), "nodes", "list"),
    ("duplicate node", setter("nodes", 1, "name", value="node1"), "nodes[1].name", "duplicate"),
    ("node name", setter("nodes", 0, "name", value="node_1"), "nodes[0].name", "DNS label"),
    ("node unknown field", setter("nodes", 0, "color", value="red"), "nodes[0].color", "unknown field"),
    ("overlapping cidrs", setter("nodes", 1, "pod_cidr", value="10.10.0.0/16"), "nodes[1].pod_cidr", "overlaps"),
    ("cidr overlaps fabric", setter("nodes", 0, "pod_cidr", value="10.99.0.0/25"), "nodes[0].pod_cidr", "fabric"),
    ("cidr not ipv4", setter("nodes", 0, "pod_cidr", value="fd00::/64"), "nodes[0].pod_cidr", "IPv4"),
    ("address off fabric", setter("nodes", 0, "address", value="10.98.0.11"), "nodes[0].address", "fabric"),
    ("address = broadcast", setter("nodes", 0, "address", value="10.99.0.255"), "nodes[0].address", "usable"),
    ("duplicate address", setter("nodes", 1, "address", value="10.99.0.11"), "nodes[1].address", "node1"),
    ("address not string", setter("nodes", 0, "address", value=10), "nodes[0].address", "string"),
    ("short token", setter("nodes", 0, "token", value="abc"), "nodes[0].token", "16"),
    ("duplicate token", setter("nodes", 1, "token", value="t" * 16 + "1"), "nodes[1].token", "node1"),
    ("namespace name", setter("namespaces", 0, "name", value="Shop"), "namespaces[0].name", "DNS label"),
    ("duplicate namespace", setter("namespaces", 1, "name", value="shop"), "namespaces[1].name", "duplicate"),
    (
        "label value bool",
        setter("namespaces", 0, "labels", "istio.io/dataplane-mode", value=True),
        "namespaces[0].labels['istio.io/dataplane-mode']",
        "quote",
    ),
    (
        "label key",
        setter("namespaces", 1, "labels", value={"bad key": "x"}),
        "namespaces[1].labels['bad key']",
        "label",
    ),
    (
        "label prefix",
        setter("namespaces", 1, "labels", value={"Bad_/x": "y"}),
        "namespaces[1].labels['Bad_/x']",
        "label",
    ),
    ("label value", setter("namespaces", 1, "labels", value={"a": "-x"}), "namespaces[1].labels['a']", "label value"),
    ("labels not map", setter("namespaces", 1, "labels", value=["a"]), "namespaces[1].labels", "mapping"),
    ("pods not list", setter("pods", value={}), "pods", "list"),
    ("pod not mapping", setter("pods", 0, value="frontend"), "pods[0]", "mapping"),
    (
        "unknown node",
        setter("pods", 2, "node", value="node9"),
        "pods[2].node",
        "unknown node 'node9' (known: node1, node2)",
    ),
    ("unknown namespace", setter("pods", 0, "namespace", value="kube"), "pods[0].namespace", "unknown namespace"),
    ("no service account", deleter("pods", 0, "service_account"), "pods[0].service_account", "required"),
    ("service account name", setter("pods", 0, "service_account", value="Front End"), "pods[0].service_account", "DNS"),
    ("pod name", setter("pods", 0, "name", value="Front_End"), "pods[0].name", "DNS"),
    ("duplicate pod", setter("pods", 1, "name", value="frontend"), "pods[1].name", "duplicate pod 'shop/frontend'"),
    ("pod unknown field", setter("pods", 0, "image", value="x"), "pods[0].image", "unknown field"),
    ("phase", setter("pods", 0, "phase", value="Crashing"), "pods[0].phase", "Running"),
    ("workload name", setter("pods", 0, "workload", value="Web_UI"), "pods[0].workload", "DNS"),
    ("host_network string", setter("pods", 0, "host_network", value="yes"), "pods[0].host_network", "true or false"),
    ("ip outside cidr", setter("pods", 0, "ip", value="10.10.2.5"), "pods[0].ip", "outside"),
    ("ip = network", setter("pods", 0, "ip", value="10.10.1.0"), "pods[0].ip", "network"),
    ("ip = broadcast", setter("pods", 0, "ip", value="10.10.1.255"), "pods[0].ip", "broadcast"),
    ("ip = gateway", setter("pods", 0, "ip", value="10.10.1.1"), "pods[0].ip", "gateway"),
    ("ip not an address", setter("pods", 0, "ip", value="10.10.1.300"), "pods[0].ip", "IPv4"),
    (
        "duplicate ip",
        lambda d: (d["pods"][1].update(ip="10.10.2.7"), d["pods"][2].update(ip="10.10.2.7")),
        "pods[2].ip",
        "duplicate IP",
    ),
    (
        "host network wrong ip",
        lambda d: d["pods"][0].update(host_network=True, ip="10.10.1.5"),
        "pods[0].ip",
        "node's address",
    ),
    ("duplicate uid", lambda d: [p.update(uid="u-1") for p in d["pods"]], "pods[1].uid", "already"),
    ("empty uid", setter("pods", 0, "uid", value=""), "pods[0].uid", "empty"),
    (
        "cidr exhausted",
        lambda d: (
            d["nodes"][0].update(pod_cidr="10.10.1.0/30"),
            d["pods"].append({**POD, "name": "one-more"}),
        ),
        "pods[3].ip",
        "no free address",
    ),
    ("service name", setter("services", 0, "name", value="1checkout"), "services[0].name", "letter"),
    ("service namespace", setter("services", 0, "namespace", value="nope"), "services[0].namespace", "unknown"),
    ("no ports", setter("services", 0, "ports", value=[]), "services[0].ports", "at least one"),
    ("port 0", setter("services", 0, "ports", 0, "port", value=0), "services[0].ports[0].port", "out of range"),
    ("port 65536", setter("services", 0, "ports", 0, "port", value=65536), "services[0].ports[0].port", "range"),
    ("port string", setter("services", 0, "ports", 0, "port", value="80"), "services[0].ports[0].port", "number"),
    ("port bool", setter("services", 0, "ports", 0, "port", value=True), "services[0].ports[0].port", "number"),
    (
        "target port",
        setter("services", 0, "ports", 0, "target_port", value=70000),
        "services[0].ports[0].target_port",
        "range",
    ),
    (
        "port name",
        setter("services", 0, "ports", 0, "name", value="a-very-long-port-name"),
        "services[0].ports[0].name",
        "port name",
    ),
    (
        "duplicate port",
        setter("services", 0, "ports", value=[{"port": 80}, {"port": 80, "target_port": 81}]),
        "services[0].ports[1].port",
        "duplicate",
    ),
    ("vip in pod cidr", setter("services", 0, "vip", value="10.10.1.50"), "services[0].vip", "lies in"),
    (
        "duplicate service",
        appender("services", {"name": "checkout", "namespace": "shop", "ports": [{"port": 81}]}),
        "services[1].name",
        "duplicate service",
    ),
    ("service unknown field", setter("services", 0, "type", value="NodePort"), "services[0].type", "unknown field"),
]


@pytest.mark.parametrize(("mutate", "path", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_field(mutate: Callable[[dict[str, Any]], None], path: str, words: str) -> None:
    data = valid()
    mutate(data)
    with pytest.raises(InventoryError) as err:
        parse_inventory(data)
    assert err.value.path == path
    assert words in err.value.problem
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("data", [None, [], "cluster: lab", 42], ids=["empty", "list", "string", "number"])
def test_not_a_mapping(data: object) -> None:
    with pytest.raises(InventoryError):
        parse_inventory(data)


def test_valid_inventory() -> None:
    data = valid()
    data["pods"][0]["labels"] = {"app": "frontend"}
    data["pods"][1]["labels"] = {"app": "checkout"}
    data["pods"][1]["workload"] = "checkout-v2"
    inv = parse_inventory(data)
    assert inv.cluster_name == "lab"
    assert inv.trust_domain == "cluster.local"
    assert [n.name for n in inv.nodes] == ["node1", "node2"]
    assert [c.node for c in inv.node_credentials] == ["node1", "node2"]
    frontend = inv.pod("shop/frontend")
    assert frontend.uid == pod_uid("shop", "frontend")
    assert frontend.ip == ipaddress.IPv4Address("10.10.1.2")
    assert frontend.phase is PodPhase.RUNNING
    assert dict(frontend.labels) == {"app": "frontend"}
    assert (frontend.workload, inv.pod("shop/checkout").workload) == ("frontend", "checkout-v2")  # default: itself
    assert [p.ip for p in inv.pods_on("node2")] == [ipaddress.IPv4Address(a) for a in ("10.10.2.2", "10.10.2.3")]
    (svc,) = inv.services
    assert svc.ports[0].target_port == 80
    assert svc.selects(inv.pod("shop/checkout"))
    assert not svc.selects(inv.pod("shop/frontend"))


def test_auto_ips_skip_explicit_ones_in_file_order() -> None:
    data = valid()
    data["pods"] = [
        {"name": f"p{i}", "namespace": "shop", "node": "node1", "service_account": "sa", **extra}
        for i, extra in enumerate([{}, {"ip": "10.10.1.2"}, {}, {"ip": "10.10.1.4"}, {}])
    ]
    inv = parse_inventory(data)
    assert [str(p.ip) for p in inv.pods] == ["10.10.1.3", "10.10.1.2", "10.10.1.5", "10.10.1.4", "10.10.1.6"]


def test_host_network_pod_has_its_nodes_address_and_takes_no_pod_ip() -> None:
    data = valid()
    data["pods"].insert(0, {**POD, "name": "hostpod", "host_network": True})
    inv = parse_inventory(data)
    assert inv.pod("shop/hostpod").ip == ipaddress.IPv4Address("10.99.0.11")
    assert inv.pod("shop/frontend").ip == ipaddress.IPv4Address("10.10.1.2")
    assert inv.pod_by_ip(ipaddress.IPv4Address("10.99.0.11")) is None


def test_tokens_are_optional() -> None:
    data = valid()
    for node in data["nodes"]:
        del node["token"]
    assert parse_inventory(data).node_credentials == ()


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.integers(min_value=24, max_value=29),
    plan=st.lists(st.tuples(st.sampled_from(["node1", "node2"]), st.booleans()), max_size=40),
    seed=st.randoms(use_true_random=False),
)
def test_auto_assigned_ips_are_unique_usable_and_deterministic(
    prefix: int, plan: list[tuple[str, bool]], seed: Any
) -> None:
    data = valid()
    cidrs = {
        "node1": ipaddress.IPv4Network(f"10.10.1.0/{prefix}"),
        "node2": ipaddress.IPv4Network(f"10.10.2.0/{prefix}"),
    }
    data["nodes"][0]["pod_cidr"], data["nodes"][1]["pod_cidr"] = str(cidrs["node1"]), str(cidrs["node2"])
    pods: list[dict[str, Any]] = []
    explicit: dict[str, ipaddress.IPv4Address] = {}
    for i, (node, give_ip) in enumerate(plan):
        pod: dict[str, Any] = {"name": f"p{i}", "namespace": "shop", "node": node, "service_account": "sa"}
        usable = [a for a in list(cidrs[node].hosts())[1:] if a not in explicit.values()]
        if give_ip and usable:
            pod["ip"] = str(seed.choice(usable))
            explicit[pod["name"]] = ipaddress.IPv4Address(pod["ip"])
        pods.append(pod)
    data["pods"] = pods
    capacity = {n: c.num_addresses - 3 for n, c in cidrs.items()}
    wanted = {n: sum(1 for node, _ in plan if node == n) for n in cidrs}
    if any(wanted[n] > capacity[n] for n in cidrs):
        with pytest.raises(InventoryError, match="no free address"):
            parse_inventory(data)
        return
    inv = parse_inventory(data)
    assert inv == parse_inventory(copy.deepcopy(data))
    ips = [p.ip for p in inv.pods]
    assert len(set(ips)) == len(ips)
    for p in inv.pods:
        cidr = cidrs[p.node]
        assert p.ip in cidr
        assert p.ip not in (cidr.network_address, cidr.network_address + 1, cidr.broadcast_address)
        if p.name in explicit:
            assert p.ip == explicit[p.name]


def test_load_default_topology() -> None:
    inv = load_inventory(DEFAULT_TOPOLOGY)
    assert [n.name for n in inv.nodes] == ["node1", "node2"]
    assert {p.key: p.node for p in inv.pods} == {
        "shop/frontend": "node1",
        "shop/payments": "node1",
        "shop/checkout": "node2",
        "legacy/batch": "node2",
    }
    assert {p.key: p.service_account for p in inv.pods} == {
        "shop/frontend": "frontend",
        "shop/payments": "payments",
        "shop/checkout": "checkout",
        "legacy/batch": "batch",
    }
    assert [f"{s.namespace}/{s.name}" for s in inv.services] == [
        "shop/checkout",
        "shop/payments",
    ]
    assert all(s.ports[0].port == 80 and s.ports[0].target_port == 8080 for s in inv.services)
    assert {c.node for c in inv.node_credentials} == {"node1", "node2"}
    enrolled_pods = {p.key for p in inv.pods if enrolled(p, inv.namespace(p.namespace))}
    assert enrolled_pods == {"shop/frontend", "shop/payments", "shop/checkout"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("cluster: {name: lab\nnodes: []\n", "line 2"),
        ("cluster:\n  name: lab\n  name: lab2\n", "line 3, column 3: duplicate key 'name'"),
        ("\t- a\n", "line 1"),
    ],
    ids=["unclosed flow mapping", "duplicate key", "tab"],
)
def test_bad_yaml_names_the_line(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    assert str(path) in str(err.value)
    assert "not valid YAML" in str(err.value)
    assert words in str(err.value)


def test_load_prefixes_the_file_to_field_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("cluster: {name: lab, fabric_cidr: 10.99.0.0/24}\nnodes: []\n")
    with pytest.raises(InventoryError, match=rf"^{path}: nodes: at least one node"):
        load_inventory(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read"):
        load_inventory(tmp_path / "nope.yaml")


def _pod(**kw: Any) -> Pod:
    base: dict[str, Any] = {
        "name": "p",
        "namespace": "shop",
        "uid": "u",
        "node": "node1",
        "service_account": "sa",
        "ip": ipaddress.IPv4Address("10.10.1.2"),
    }
    return Pod(**{**base, **kw})


AMBIENT_NS = Namespace("shop", {"istio.io/dataplane-mode": "ambient"})
PLAIN_NS = Namespace("shop")
MODE = "istio.io/dataplane-mode"


@pytest.mark.parametrize(
    ("pod", "namespace", "expected"),
    [
        (_pod(), AMBIENT_NS, True),
        (_pod(), PLAIN_NS, False),
        (_pod(), None, False),
        (_pod(labels={MODE: "ambient"}), PLAIN_NS, True),
        (_pod(labels={MODE: "none"}), AMBIENT_NS, False),
        (_pod(labels={MODE: "sidecar"}), AMBIENT_NS, True),
        (_pod(host_network=True), AMBIENT_NS, False),
        (_pod(host_network=True, labels={MODE: "ambient"}), AMBIENT_NS, False),
        (_pod(namespace="kube-system", labels={MODE: "ambient"}), AMBIENT_NS, False),
        (_pod(phase=PodPhase.SUCCEEDED), AMBIENT_NS, False),
        (_pod(phase=PodPhase.FAILED), AMBIENT_NS, False),
        (_pod(phase=PodPhase.PENDING), AMBIENT_NS, True),
    ],
    ids=[
        "ns labelled",
        "ns plain",
        "ns unknown",
        "pod opts in",
        "pod opts out",
        "other pod value, ns decides",
        "host network",
        "host network even if labelled",
        "excluded namespace",
        "succeeded",
        "failed",
        "pending",
    ],
)
def test_enrolled(pod: Pod, namespace: Namespace | None, expected: bool) -> None:
    assert enrolled(pod, namespace) is expected
