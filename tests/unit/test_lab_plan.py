"""The lab's plan: names and iproute2 batches computed from an inventory, before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodeagent.inventory.local import load_inventory, parse_inventory
from nodeagent.lab.plan import PlanError, plan_lab

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "nodeagent" / "lab" / "default.yaml"


def test_default_layout() -> None:
    plan = plan_lab(load_inventory(DEFAULT_TOPOLOGY))
    assert plan.netns_names == (
        "na-fabric",
        "na-node1",
        "na-node2",
        "na-node1.shop.frontend",
        "na-node1.shop.payments",
        "na-node2.shop.checkout",
        "na-node2.legacy.batch",
    )
    assert plan.cgroups[:3] == ("nodeagent-lab", "nodeagent-lab/node1", "nodeagent-lab/node2")
    assert plan.cgroups[3:] == (
        "nodeagent-lab/node1/shop.frontend",
        "nodeagent-lab/node1/shop.payments",
        "nodeagent-lab/node2/shop.checkout",
        "nodeagent-lab/node2/legacy.batch",
    )
    assert [(p.key, p.host_port) for p in plan.pods] == [
        ("shop/frontend", "p0"),
        ("shop/payments", "p1"),
        ("shop/checkout", "p0"),
        ("legacy/batch", "p1"),
    ]


def test_batches_wire_pods_nodes_and_fabric() -> None:
    plan = plan_lab(load_inventory(DEFAULT_TOPOLOGY))
    fabric = plan.fabric_batch()
    assert "link add n1 type veth peer name fabric0 netns na-node2" in fabric
    assert "link set n1 alias node2 master br0 up" in fabric
    node1 = plan.node_batch("node1")
    assert "addr add 10.99.0.11/24 dev fabric0" in node1
    assert "addr add 10.10.1.1/24 dev br0" in node1
    assert "link add p1 type veth peer name eth0 netns na-node1.shop.payments" in node1
    assert node1[-1] == "route add 10.10.2.0/24 via 10.99.0.12 dev fabric0"
    assert not any("na-node2." in line for line in node1)
    assert plan.pod_batch("legacy/batch") == [
        "link set lo up",
        "addr add 10.10.2.11/24 dev eth0",
        "link set eth0 up",
        "route add default via 10.10.2.1 dev eth0",
    ]


def _inventory(**pod_extra: Any) -> dict[str, Any]:
    return {
        "cluster": {"name": "lab", "fabric_cidr": "10.99.0.0/24"},
        "nodes": [{"name": "node1", "pod_cidr": "10.10.1.0/24", "address": "10.99.0.11"}],
        "namespaces": [{"name": "ns"}],
        "pods": [{"name": "a", "namespace": "ns", "node": "node1", "service_account": "sa", **pod_extra}],
    }


def test_host_network_pod_lives_in_its_nodes_netns_with_its_own_cgroup() -> None:
    plan = plan_lab(parse_inventory(_inventory(host_network=True)))
    (pod,) = plan.pods
    assert (pod.netns, pod.host_port, pod.cgroup) == ("na-node1", None, "nodeagent-lab/node1/ns.a")
    assert "na-node1" in plan.netns_names
    assert len(plan.netns_names) == 2
    assert not any("veth" in line for line in plan.node_batch("node1"))


def test_node_named_fabric_is_refused() -> None:
    data = _inventory()
    data["nodes"][0]["name"] = "fabric"
    data["pods"][0]["node"] = "fabric"
    with pytest.raises(PlanError, match=r"nodes\[0\]\.name: 'fabric' is reserved"):
        plan_lab(parse_inventory(data))


def test_names_too_long_for_a_netns_are_refused() -> None:
    data = _inventory()
    data["pods"][0]["name"] = ".".join(["x" * 62] * 4)
    with pytest.raises(PlanError, match="shorten"):
        plan_lab(parse_inventory(data))
