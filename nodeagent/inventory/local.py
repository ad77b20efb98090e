"""The local inventory: a YAML file describing a small cluster, parsed into `model.Inventory`.

Why this module exists: the lab builds its simulated cluster from this file, and the node agent and the
CA read the very same file as their workload source when there is no Kubernetes API. One strict parser
means the three never disagree about which pod has which IP, service account or node.

The schema (every field not listed is rejected, so a typo never silently means "default"):

    cluster:                     # required
      name: lab                  # required, DNS label
      trust_domain: cluster.local  # optional, default cluster.local
      fabric_cidr: 10.99.0.0/24  # required: the network the nodes talk over (prefix <= /30)
    nodes:                       # required, at least one
      - name: node1              # DNS label, unique
        pod_cidr: 10.10.1.0/24   # prefix <= /30; .1 is the node's gateway; no overlap with others/fabric
        address: 10.99.0.11      # the node's address on the fabric, inside fabric_cidr, unique
        token: <secret>          # optional: bearer token of node1's agent towards the CA (>= 16 chars)
    namespaces:                  # every namespace a pod or service uses must be declared
      - name: shop               # DNS label, unique
        labels: {istio.io/dataplane-mode: ambient}   # Kubernetes label syntax; values are strings
    pods:
      - name: frontend           # DNS subdomain, unique within its namespace
        namespace: shop          # a declared namespace
        node: node1              # a declared node
        service_account: frontend  # required (no silent "default"): it becomes the SPIFFE identity
        labels: {app: frontend}  # optional
        ip: 10.10.1.10           # optional, see below
        uid: <string>            # optional, default model.pod_uid(namespace, name)
        host_network: false      # optional; a host-network pod has its node's fabric address as IP
        phase: Running           # optional: Pending | Running | Succeeded | Failed
        workload: frontend       # optional: the Deployment (or other controller) it belongs to; metrics
                                 # label it so; default: the pod's own name
    services:
      - name: checkout           # DNS-1035 label, unique within its namespace
        namespace: shop
        selector: {app: checkout}  # optional; an empty selector selects nothing
        ports: [{port: 80, target_port: 8080, name: http}]   # target_port defaults to port
        vip: 10.96.0.10          # optional, unique, outside the fabric and every pod CIDR

Pod IPs: an explicit `ip` must lie in its node's pod CIDR and must not be the network, broadcast or
gateway (.1) address, nor another pod's. Pods without one get the lowest free address from .2 upward, in
file order, skipping every explicit address on that node - so the result depends only on the file.

What it deliberately does not do: no I/O beyond reading the one file in `load_inventory` (so it runs in
the pure core under mypy --strict), no watching for changes (the agent re-reads), no Kubernetes
objects (inventory/translate.py), and it stops at the first problem: the message names the field path,
e.g. `pods[2].node: unknown node 'node9' (known: node1, node2)`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import yaml

from nodeagent.model import (
    DEFAULT_TRUST_DOMAIN,
    Identity,
    IdentityError,
    Inventory,
    Namespace,
    Node,
    NodeAgentCredential,
    Pod,
    PodPhase,
    Service,
    ServicePort,
    is_dns_label,
    is_dns_subdomain,
    pod_uid,
)

MIN_TOKEN_LENGTH = 16
# A Kubernetes label name (the part after an optional `prefix/`), and label values.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_MAX_LABEL_NAME = 63
# IANA service names, which Kubernetes uses for port names.
_MAX_PORT_NAME = 15

_TOP_FIELDS = {"cluster", "nodes", "namespaces", "pods", "services"}
_CLUSTER_FIELDS = {"name", "trust_domain", "fabric_cidr"}
_NODE_FIELDS = {"name", "pod_cidr", "address", "token"}
_NAMESPACE_FIELDS = {"name", "labels"}
_POD_FIELDS = {
    "name",
    "namespace",
    "node",
    "service_account",
    "labels",
    "ip",
    "uid",
    "host_network",
    "phase",
    "workload",
}
_SERVICE_FIELDS = {"name", "namespace", "selector", "ports", "vip"}
_PORT_FIELDS = {"port", "target_port", "name"}


class InventoryError(ValueError):
    """The inventory is invalid. `path` names the field (`pods[2].node`), `problem` says what is wrong."""

    def __init__(self, path: str, problem: str, source: str = "", *, missing: bool = False) -> None:
        self.path = path
        self.problem = problem
        self.source = source
        self.missing = missing  # the file `source` does not exist (rather than holding something invalid)
        where = ": ".join(part for part in (source, path) if part)
        super().__init__(f"{where}: {problem}" if where else problem)


def lab_inventory_problem(exc: InventoryError) -> str:
    """What to tell a user whose lab inventory (the lab's copy of its topology) does not load: `lab status`,
    `lab exec` and `inspect redirects` say the same. No file: is the lab up? Anything else is an edit to
    fix (the field and the file are named) or a lab to build again; `lab up` would not help, it is up."""
    if exc.missing:
        return f"{exc} (is the lab up? `sudo nodeagent lab up`)"
    what = "that field" if exc.path else "it"
    return (
        f"the lab's inventory is invalid: {exc}\n"
        f"fix {what} in {exc.source}, or run `sudo nodeagent lab down` and `lab up` again"
    )


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and parse an inventory file; errors name the file and the field (or the YAML line)."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        missing = isinstance(exc, FileNotFoundError)
        raise InventoryError("", f"cannot read the inventory file: {exc}", source, missing=missing) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise InventoryError("", f"not valid YAML: {_describe_yaml_error(exc)}", source) from None
    try:
        return parse_inventory(data)
    except InventoryError as exc:
        raise InventoryError(exc.path, exc.problem, source) from None


def parse_inventory(data: object) -> Inventory:
    """Validate already-loaded YAML data (dicts, lists, scalars) and build the Inventory."""
    if data is None:
        raise InventoryError("", "the inventory is empty; it needs at least `cluster` and `nodes`")
    top = _fields(data, "", _TOP_FIELDS, required=("cluster", "nodes"))
    cluster = _fields(top["cluster"], "cluster", _CLUSTER_FIELDS, required=("name", "fabric_cidr"))
    cluster_name = _dns_label(cluster["name"], "cluster.name")
    trust_domain = _trust_domain(cluster.get("trust_domain", DEFAULT_TRUST_DOMAIN), "cluster.trust_domain")
    fabric = _network(cluster["fabric_cidr"], "cluster.fabric_cidr")

    nodes, credentials = _parse_nodes(top["nodes"], fabric)
    namespaces = _parse_namespaces(top.get("namespaces", []))
    pods = _parse_pods(top.get("pods", []), {n.name: n for n in nodes}, {ns.name for ns in namespaces})
    services = _parse_services(
        top.get("services", []), {ns.name for ns in namespaces}, [fabric, *(n.pod_cidr for n in nodes)]
    )
    return Inventory(
        cluster_name=cluster_name,
        trust_domain=trust_domain,
        fabric_cidr=fabric,
        nodes=nodes,
        namespaces=namespaces,
        pods=pods,
        services=services,
        node_credentials=credentials,
    )


# --- sections -------------------------------------------------------------------------------------------


def _parse_nodes(
    value: object, fabric: ipaddress.IPv4Network
) -> tuple[tuple[Node, ...], tuple[NodeAgentCredential, ...]]:
    items = _list(value, "nodes")
    if not items:
        raise InventoryError("nodes", "at least one node is required")
    nodes: list[Node] = []
    credentials: list[NodeAgentCredential] = []
    token_owner: dict[str, str] = {}
    for i, raw in enumerate(items):
        path = f"nodes[{i}]"
        f = _fields(raw, path, _NODE_FIELDS, required=("name", "pod_cidr", "address"))
        name = _dns_label(f["name"], f"{path}.name")
        if any(n.name == name for n in nodes):
            raise InventoryError(f"{path}.name", f"duplicate node name {name!r}")
        cidr = _network(f["pod_cidr"], f"{path}.pod_cidr")
        if cidr.overlaps(fabric):
            raise InventoryError(f"{path}.pod_cidr", f"{cidr} overlaps the fabric {fabric} (cluster.fabric_cidr)")
        for other in nodes:
            if cidr.overlaps(other.pod_cidr):
                raise InventoryError(f"{path}.pod_cidr", f"{cidr} overlaps node {other.name!r}'s {other.pod_cidr}")
        address = _ipv4(f["address"], f"{path}.address")
        if address not in fabric or address in (fabric.network_address, fabric.broadcast_address):
            raise InventoryError(f"{path}.address", f"{address} is not a usable address of the fabric {fabric}")
        for other in nodes:
            if other.address == address:
                raise InventoryError(f"{path}.address", f"{address} is already node {other.name!r}'s address")
        nodes.append(Node(name=name, pod_cidr=cidr, address=address))
        if "token" in f:
            token = _string(f["token"], f"{path}.token")
            if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
                raise InventoryError(
                    f"{path}.token", f"must be at least {MIN_TOKEN_LENGTH} characters without whitespace"
                )
            if token in token_owner:
                raise InventoryError(
                    f"{path}.token", f"same token as node {token_owner[token]!r}; tokens identify nodes"
                )
            token_owner[token] = name
            credentials.append(NodeAgentCredential(node=name, token=token))
    return tuple(nodes), tuple(credentials)


def _parse_namespaces(value: object) -> tuple[Namespace, ...]:
    namespaces: list[Namespace] = []
    for i, raw in enumerate(_list(value, "namespaces")):
        path = f"namespaces[{i}]"
        f = _fields(raw, path, _NAMESPACE_FIELDS, required=("name",))
        name = _dns_label(f["name"], f"{path}.name")
        if any(ns.name == name for ns in namespaces):
            raise InventoryError(f"{path}.name", f"duplicate namespace {name!r}")
        namespaces.append(Namespace(name=name, labels=_labels(f.get("labels", {}), f"{path}.labels")))
    return tuple(namespaces)


def _parse_pods(value: object, nodes: Mapping[str, Node], namespaces: set[str]) -> tuple[Pod, ...]:
    items = _list(value, "pods")
    drafts: list[tuple[str, Pod]] = []  # (field path, pod whose ip may still be None)
    keys: set[str] = set()
    uids: dict[str, str] = {}
    ip_owner: dict[ipaddress.IPv4Address, str] = {}
    for i, raw in enumerate(items):
        path = f"pods[{i}]"
        f = _fields(raw, path, _POD_FIELDS, required=("name", "namespace", "node", "service_account"))
        name = _dns_subdomain(f["name"], f"{path}.name")
        namespace = _reference(f["namespace"], f"{path}.namespace", "namespace", namespaces)
        node = nodes[_reference(f["node"], f"{path}.node", "node", set(nodes))]
        key = f"{namespace}/{name}"
        if key in keys:
            raise InventoryError(f"{path}.name", f"duplicate pod {key!r}")
        keys.add(key)
        uid = _string(f["uid"], f"{path}.uid") if "uid" in f else pod_uid(namespace, name)
        if uid in uids:
            raise InventoryError(f"{path}.uid", f"uid {uid!r} is already pod {uids[uid]!r}'s")
        uids[uid] = key
        host_network = _bool(f.get("host_network", False), f"{path}.host_network")
        ip: ipaddress.IPv4Address | None = None
        if "ip" in f:
            ip = _ipv4(f["ip"], f"{path}.ip")
            if host_network:
                if ip != node.address:
                    raise InventoryError(
                        f"{path}.ip", f"a host-network pod has its node's address {node.address}, not {ip}"
                    )
            else:
                _check_pod_ip(ip, node, f"{path}.ip")
                if ip in ip_owner:
                    raise InventoryError(f"{path}.ip", f"duplicate IP {ip}: already pod {ip_owner[ip]!r}'s")
                ip_owner[ip] = key
        elif host_network:
            ip = node.address
        pod = Pod(
            name=name,
            namespace=namespace,
            uid=uid,
            node=node.name,
            service_account=_dns_subdomain(f["service_account"], f"{path}.service_account"),
            ip=ip,
            labels=_labels(f.get("labels", {}), f"{path}.labels"),
            host_network=host_network,
            phase=_phase(f.get("phase", PodPhase.RUNNING.value), f"{path}.phase"),
            workload_name=_dns_subdomain(f["workload"], f"{path}.workload") if "workload" in f else "",
        )
        drafts.append((path, pod))

    # Second pass: only now are all explicit addresses known, so auto-assignment can skip them.
    free = {name: _free_addresses(node, set(ip_owner)) for name, node in nodes.items()}
    pods: list[Pod] = []
    for path, draft in drafts:
        if draft.ip is not None:
            pods.append(draft)
            continue
        ip = next(free[draft.node], None)
        if ip is None:
            cidr = nodes[draft.node].pod_cidr
            raise InventoryError(f"{path}.ip", f"node {draft.node!r}'s pod CIDR {cidr} has no free address left")
        pods.append(replace(draft, ip=ip))
    return tuple(pods)


def _parse_services(value: object, namespaces: set[str], reserved: list[ipaddress.IPv4Network]) -> tuple[Service, ...]:
    services: list[Service] = []
    vips: dict[ipaddress.IPv4Address, str] = {}
    for i, raw in enumerate(_list(value, "services")):
        path = f"services[{i}]"
        f = _fields(raw, path, _SERVICE_FIELDS, required=("name", "namespace", "ports"))
        name = _dns_label(f["name"], f"{path}.name")
        if not name[0].isalpha():
            raise InventoryError(f"{path}.name", f"service name {name!r} must start with a letter (DNS-1035)")
        namespace = _reference(f["namespace"], f"{path}.namespace", "namespace", namespaces)
        key = f"{namespace}/{name}"
        if any(s.namespace == namespace and s.name == name for s in services):
            raise InventoryError(f"{path}.name", f"duplicate service {key!r}")
        ports = _ports(f["ports"], f"{path}.ports")
        vip: ipaddress.IPv4Address | None = None
        if "vip" in f:
            vip = _ipv4(f["vip"], f"{path}.vip")
            for net in reserved:
                if vip in net:
                    raise InventoryError(f"{path}.vip", f"{vip} lies in {net}, which the fabric or a node uses")
            if vip in vips:
                raise InventoryError(f"{path}.vip", f"duplicate VIP {vip}: already service {vips[vip]!r}'s")
            vips[vip] = key
        services.append(
            Service(
                name=name,
                namespace=namespace,
                selector=_labels(f.get("selector", {}), f"{path}.selector"),
                ports=ports,
                vip=vip,
            )
        )
    return tuple(services)


def _ports(value: object, path: str) -> tuple[ServicePort, ...]:
    items = _list(value, path)
    if not items:
        raise InventoryError(path, "a service needs at least one port")
    ports: list[ServicePort] = []
    for i, raw in enumerate(items):
        p = f"{path}[{i}]"
        f = _fields(raw, p, _PORT_FIELDS, required=("port",))
        port = _port_number(f["port"], f"{p}.port")
        target = _port_number(f.get("target_port", port), f"{p}.target_port")
        name = ""
        if "name" in f:
            name = _string(f["name"], f"{p}.name")
            if not is_dns_label(name) or len(name) > _MAX_PORT_NAME or not any(c.isalpha() for c in name):
                raise InventoryError(
                    f"{p}.name", f"{name!r} is not a port name (<= 15 lowercase letters, digits, '-'; one letter)"
                )
            if any(sp.name == name for sp in ports):
                raise InventoryError(f"{p}.name", f"duplicate port name {name!r}")
        if any(sp.port == port for sp in ports):
            raise InventoryError(f"{p}.port", f"duplicate port {port}")
        ports.append(ServicePort(port=port, target_port=target, name=name))
    return tuple(ports)


# --- pod addresses ---------------------------------------------------------------------------------------


def _check_pod_ip(ip: ipaddress.IPv4Address, node: Node, path: str) -> None:
    cidr = node.pod_cidr
    if ip not in cidr:
        raise InventoryError(path, f"{ip} is outside node {node.name!r}'s pod CIDR {cidr}")
    reserved = {
        cidr.network_address: "network",
        cidr.broadcast_address: "broadcast",
        gateway_address(cidr): "gateway",
    }
    if ip in reserved:
        raise InventoryError(path, f"{ip} is the {reserved[ip]} address of node {node.name!r}'s pod CIDR {cidr}")


def gateway_address(cidr: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The node's own address on its pod network (.1): every pod's default route points here."""
    return cidr.network_address + 1


def _free_addresses(node: Node, taken: set[ipaddress.IPv4Address]) -> Iterator[ipaddress.IPv4Address]:
    cidr = node.pod_cidr
    for offset in range(2, cidr.num_addresses - 1):
        candidate = cidr.network_address + offset
        if candidate not in taken:
            yield candidate


# --- field helpers ---------------------------------------------------------------------------------------


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _fields(value: object, path: str, allowed: set[str], required: tuple[str, ...]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise InventoryError(path, f"must be a mapping, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            raise InventoryError(_join(path, str(key)), f"unknown field (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in value:
            raise InventoryError(_join(path, key), "required field is missing")
    return {str(k): v for k, v in value.items()}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _list(value: object, path: str) -> list[object]:
    if not isinstance(value, list):
        raise InventoryError(path, f"must be a list, got {_kind(value)}")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise InventoryError(path, f"must be a string, got {_kind(value)} (quote it)")
    if not value:
        raise InventoryError(path, "must not be empty")
    return value


def _dns_label(value: object, path: str) -> str:
    text = _string(value, path)
    if not is_dns_label(text):
        raise InventoryError(path, f"{text!r} is not a DNS label (<= 63 lowercase letters, digits, '-')")
    return text


def _dns_subdomain(value: object, path: str) -> str:
    text = _string(value, path)
    if not is_dns_subdomain(text):
        raise InventoryError(path, f"{text!r} is not a DNS name (lowercase letters, digits, '-', '.')")
    return text


def _trust_domain(value: object, path: str) -> str:
    text = _string(value, path)
    try:
        Identity(text, "ns", "sa")
    except IdentityError as exc:
        raise InventoryError(path, str(exc)) from None
    return text


def _reference(value: object, path: str, what: str, known: set[str]) -> str:
    text = _string(value, path)
    if text not in known:
        raise InventoryError(path, f"unknown {what} {text!r} (known: {', '.join(sorted(known)) or 'none'})")
    return text


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise InventoryError(path, f"must be true or false, got {_kind(value)}")
    return value


def _port_number(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InventoryError(path, f"must be a port number, got {_kind(value)}")
    if not 1 <= value <= 65535:
        raise InventoryError(path, f"port {value} is out of range 1-65535")
    return value


def _phase(value: object, path: str) -> PodPhase:
    text = _string(value, path)
    try:
        return PodPhase(text)
    except ValueError:
        raise InventoryError(path, f"unknown phase {text!r} (one of: {', '.join(p.value for p in PodPhase)})") from None


def _ipv4(value: object, path: str) -> ipaddress.IPv4Address:
    text = _string(value, path)
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise InventoryError(path, f"{text!r} is not an IPv4 address") from None


def _network(value: object, path: str) -> ipaddress.IPv4Network:
    text = _string(value, path)
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InventoryError(path, f"{text!r} is not an IPv4 network in CIDR form ({exc})") from None
    if net.prefixlen > 30:
        raise InventoryError(path, f"{net} is too small; use a prefix of /30 or shorter")
    return net


def _labels(value: object, path: str) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise InventoryError(path, f"must be a mapping of label names to values, got {_kind(value)}")
    labels: dict[str, str] = {}
    for key, raw in value.items():
        if not isinstance(key, str):
            raise InventoryError(path, f"label name {key!r} must be a string")
        where = f"{path}[{key!r}]"
        prefix, _, name = key.rpartition("/")
        if (prefix and not is_dns_subdomain(prefix)) or not _is_label_name(name):
            raise InventoryError(
                where, "not a label name: [prefix/]name, name <= 63 letters, digits, '-', '_', '.', alphanumeric ends"
            )
        if not isinstance(raw, str):
            raise InventoryError(where, f"label values are strings, got {_kind(raw)} (quote it)")
        if raw and not _is_label_name(raw):
            raise InventoryError(where, f"{raw!r} is not a label value (<= 63 letters, digits, '-', '_', '.')")
        labels[key] = raw
    return MappingProxyType(labels)


def _is_label_name(text: str) -> bool:
    return len(text) <= _MAX_LABEL_NAME and bool(_LABEL_NAME.fullmatch(text))


# --- YAML ------------------------------------------------------------------------------------------------


# libyaml's parser where PyYAML was built with it (the wheels are): parsing is most of an inventory
# reload, which the agent does on every change. The constructor (and so the checks below) stays Python.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that rejects duplicate mapping keys (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        mapping: dict[Hashable, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return str(exc)
