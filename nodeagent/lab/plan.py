"""What a lab consists of, computed from an inventory before anything is touched: names and commands.

Why this module exists: "decide, then act". Every network namespace, interface, address, route and
cgroup of a lab follows from the inventory alone, so it is computed here as plain values and iproute2
batch scripts. The executor (nodeagent.lab.cluster) only runs them, and everything a lab would create
is known - and recorded - before the first object exists, which is what makes rollback and `lab down`
complete.

Layout (all names fixed by this module; tests and tools may rely on them):

    na-fabric                  netns of the fabric: bridge `br0`, one port `n<i>` per node (alias: node)
    na-<node>                  netns of a node: `fabric0` (node.address, the fabric prefix) into the
                               fabric bridge; bridge `br0` holding the pod CIDR's .1; one port `p<j>`
                               per pod (alias: namespace/pod); ip_forward on; a route to each other
                               node's pod CIDR via that node's fabric address
    na-<node>.<ns>.<pod>       netns of a pod: `eth0` with the pod IP (the pod CIDR's prefix), lo up,
                               default route via the .1; host-network pods use their node's netns
    <cgroup2>/nodeagent-lab/<node>/<ns>.<pod>   the pod's cgroup v2 directory

Namespace and node names are DNS labels (no dots), so the dotted pod netns names can never collide with
a node's; interface names are short indices because Linux limits them to 15 bytes.

What it deliberately does not do: no I/O and no checking of the host (existing namespaces, mounts):
that is the executor's preflight.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nodeagent.inventory.local import gateway_address
from nodeagent.model import Inventory

PREFIX = "na-"
FABRIC_NETNS = f"{PREFIX}fabric"
BRIDGE = "br0"
NODE_FABRIC_IF = "fabric0"
POD_IF = "eth0"
CGROUP_BASE = "nodeagent-lab"
NAME_MAX = 255  # bytes of one file name: a netns name and a cgroup directory name are each one


class PlanError(ValueError):
    """The inventory is valid but cannot be built as a lab."""


@dataclass(frozen=True, slots=True)
class NodePlan:
    name: str
    netns: str
    address: ipaddress.IPv4Address
    fabric_prefixlen: int
    pod_cidr: ipaddress.IPv4Network
    fabric_port: str  # the node's port on the fabric bridge, inside na-fabric

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return gateway_address(self.pod_cidr)


@dataclass(frozen=True, slots=True)
class PodPlan:
    key: str  # namespace/name
    node: str
    netns: str  # its own, or its node's for a host-network pod
    host_network: bool
    ip: ipaddress.IPv4Address
    host_port: str | None  # the pod's port on its node's bridge (None for host-network pods)
    cgroup: str  # relative to the cgroup2 root


@dataclass(frozen=True, slots=True)
class LabPlan:
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]

    @property
    def netns_names(self) -> tuple[str, ...]:
        """Every namespace the lab creates, in creation order."""
        pod_ns = (p.netns for p in self.pods if not p.host_network)
        return (FABRIC_NETNS, *(n.netns for n in self.nodes), *pod_ns)

    @property
    def cgroups(self) -> tuple[str, ...]:
        """Every cgroup directory the lab creates (relative, parents first)."""
        return (CGROUP_BASE, *(f"{CGROUP_BASE}/{n.name}" for n in self.nodes), *(p.cgroup for p in self.pods))

    def node(self, name: str) -> NodePlan:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def fabric_batch(self) -> list[str]:
        """Run in na-fabric: the bridge, and one veth per node whose other end lands in the node's netns."""
        lines = ["link set lo up", f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
        for node in self.nodes:
            lines += [
                f"link add {node.fabric_port} type veth peer name {NODE_FABRIC_IF} netns {node.netns}",
                f"link set {node.fabric_port} alias {node.name} master {BRIDGE} up",
            ]
        return lines

    def node_batch(self, name: str) -> list[str]:
        """Run in the node's netns, after fabric_batch and after every pod netns exists."""
        node = self.node(name)
        lines = [
            "link set lo up",
            f"addr add {node.address}/{node.fabric_prefixlen} dev {NODE_FABRIC_IF}",
            f"link set {NODE_FABRIC_IF} up",
            f"link add {BRIDGE} type bridge",
            f"addr add {node.gateway}/{node.pod_cidr.prefixlen} dev {BRIDGE}",
            f"link set {BRIDGE} up",
        ]
        for pod in self.pods:
            if pod.node == name and pod.host_port is not None:
                lines += [
                    f"link add {pod.host_port} type veth peer name {POD_IF} netns {pod.netns}",
                    f"link set {pod.host_port} alias {pod.key} master {BRIDGE} up",
                ]
        for other in self.nodes:
            if other.name != name:
                lines.append(f"route add {other.pod_cidr} via {other.address} dev {NODE_FABRIC_IF}")
        return lines

    def pod_batch(self, key: str) -> list[str]:
        """Run in the pod's own netns, after its node's batch created eth0 there."""
        pod = next(p for p in self.pods if p.key == key)
        node = self.node(pod.node)
        return [
            "link set lo up",
            f"addr add {pod.ip}/{node.pod_cidr.prefixlen} dev {POD_IF}",
            f"link set {POD_IF} up",
            f"route add default via {node.gateway} dev {POD_IF}",
        ]


def plan_lab(inventory: Inventory) -> LabPlan:
    """Name everything the lab for `inventory` consists of."""
    nodes: list[NodePlan] = []
    for i, node in enumerate(inventory.nodes):
        netns = f"{PREFIX}{node.name}"
        if netns == FABRIC_NETNS:
            raise PlanError(f"nodes[{i}].name: {node.name!r} is reserved by the lab (its netns is the fabric's)")
        nodes.append(
            NodePlan(
                name=node.name,
                netns=netns,
                address=node.address,
                fabric_prefixlen=inventory.fabric_cidr.prefixlen,
                pod_cidr=node.pod_cidr,
                fabric_port=f"n{i}",
            )
        )
    pods: list[PodPlan] = []
    ports_used: dict[str, int] = {}
    for pod in inventory.pods:
        if pod.ip is None:  # local.parse_inventory assigns every pod an IP; other sources may not
            raise PlanError(f"pod {pod.key} has no IP; the lab needs one for every pod")
        host_port: str | None = None
        if pod.host_network:
            netns = f"{PREFIX}{pod.node}"
        else:
            netns = f"{PREFIX}{pod.node}.{pod.namespace}.{pod.name}"
            index = ports_used.get(pod.node, 0)
            ports_used[pod.node] = index + 1
            host_port = f"p{index}"
        leaf = f"{pod.namespace}.{pod.name}"
        if max(len(netns), len(leaf)) > NAME_MAX:
            raise PlanError(f"pod {pod.key}: names this long do not fit a netns or cgroup name; shorten them")
        pods.append(
            PodPlan(
                key=pod.key,
                node=pod.node,
                netns=netns,
                host_network=pod.host_network,
                ip=pod.ip,
                host_port=host_port,
                cgroup=f"{CGROUP_BASE}/{pod.node}/{leaf}",
            )
        )
    return LabPlan(nodes=tuple(nodes), pods=tuple(pods))
