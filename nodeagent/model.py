"""Pure value types shared by every part of nodeagent.

Why this module exists: identities, workloads and the cluster inventory cross every boundary (the
CA, the agent, the tunnel, the lab). Giving them one parsed, immutable form means a raw SAN string or an
untyped dict never travels between subsystems, and every layer can be tested with plain values.

What it deliberately does not do: no I/O, no YAML, no Kubernetes objects. Parsing files lives in
nodeagent.inventory; this module only defines the shapes and the few rules that belong to the values
themselves (SPIFFE syntax, enrollment labels).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_TRUST_DOMAIN = "cluster.local"
SPIFFE_SCHEME = "spiffe://"
MAX_SPIFFE_ID_BYTES = 2048

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"  # the agent's record of a pod's capture (enabled|pending)

# Kubernetes DNS-1123 label: what namespace, service-account and node names must look like. Matched with
# fullmatch: `$` would also match before a trailing newline.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# DNS-1123 subdomain: pod and service names may contain dots.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


class IdentityError(ValueError):
    """A string that is not a workload SPIFFE ID of the form spiffe://<td>/ns/<ns>/sa/<sa>."""


def is_dns_label(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS_LABEL.fullmatch(value))


def is_dns_subdomain(value: str) -> bool:
    return len(value) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(value))


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    """A workload identity: spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not self.trust_domain or not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise IdentityError(
                f"trust domain {self.trust_domain!r} must be non-empty lowercase letters, digits, "
                "dots, dashes or underscores"
            )
        for what, value in (("namespace", self.namespace), ("service account", self.service_account)):
            if not value or "/" in value or not value.isprintable() or value != value.strip():
                raise IdentityError(f"{what} {value!r} is not a valid path segment of a SPIFFE ID")
        if len(self.uri.encode()) > MAX_SPIFFE_ID_BYTES:
            raise IdentityError(f"SPIFFE ID longer than {MAX_SPIFFE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse `spiffe://td/ns/NS/sa/SA`; the `spiffe://` prefix may be omitted (Istio principals)."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
            raise IdentityError(f"SPIFFE ID longer than {MAX_SPIFFE_ID_BYTES} bytes")
        body = text[len(SPIFFE_SCHEME) :] if text.startswith(SPIFFE_SCHEME) else text
        parts = body.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(
                f"{text!r} is not a workload identity; expected spiffe://<trust-domain>/ns/<namespace>/sa/<account>"
            )
        return cls(trust_domain=parts[0], namespace=parts[2], service_account=parts[4])

    @classmethod
    def parse_uri(cls, text: str) -> Identity:
        """Parse a SPIFFE ID as certificates, CSRs and the CA API carry it: the `spiffe://` scheme is required."""
        if not text.startswith(SPIFFE_SCHEME):
            raise IdentityError(f"{text[:100]!r} is not a SPIFFE ID: it must start with {SPIFFE_SCHEME}")
        return cls.parse(text)

    @property
    def uri(self) -> str:
        return f"{SPIFFE_SCHEME}{self.principal}"

    @property
    def principal(self) -> str:
        """The form Istio policies compare against: the URI without `spiffe://`."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


class PodPhase(enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    pod_cidr: ipaddress.IPv4Network
    # Address of the node on the cluster fabric (lab: the node's end of its fabric link).
    address: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _frozen(None))


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    namespace: str
    uid: str
    node: str
    service_account: str
    ip: ipaddress.IPv4Address | None
    labels: Mapping[str, str] = field(default_factory=lambda: _frozen(None))
    host_network: bool = False
    phase: PodPhase = PodPhase.RUNNING
    # REDIRECTION_ANNOTATION as the workload source last showed it (Kubernetes; None: absent), so that a
    # restarted agent can correct what an earlier run left. Not compared: the agent's own status writes
    # must not make the pod look changed (a changed pod is handed to the tunnel again).
    redirection: str | None = field(default=None, compare=False)
    # The workload the pod belongs to as Istio names it — a Deployment's name for the pods of its
    # ReplicaSets, a CronJob's for its Jobs' pods, else the controller's — for metric labels, which must
    # not grow a series per pod; "" when it has no controller (then `workload` is the pod's own name).
    workload_name: str = ""
    # Injected with Istio's sidecar (annotation sidecar.istio.io/status): never enrolled, as istio-cni's
    # PodRedirectionEnabled decides - two captures in one netns would fight over 15001/15006.
    sidecar: bool = False
    # Service routing only (not compared: a readiness flip must not make the agent re-deliver the pod):
    # the Ready condition, a deletion in progress, and the containers' named TCP ports (name -> port).
    ready: bool = field(default=True, compare=False)
    terminating: bool = field(default=False, compare=False)
    container_ports: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def workload(self) -> str:
        return self.workload_name or self.name

    @property
    def terminated(self) -> bool:
        """Succeeded or Failed: its sandbox is gone, but its status keeps the IP, which may be another pod's now."""
        return self.phase in (PodPhase.SUCCEEDED, PodPhase.FAILED)

    def identity(self, trust_domain: str) -> Identity:
        return Identity(trust_domain, self.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int  # 0 when the target port is named: each endpoint pod resolves `target_port_name`
    name: str = ""
    target_port_name: str = ""

    def target_on(self, pod: Pod) -> int | None:
        """The port on `pod` this service port forwards to; None when the pod has no such named port."""
        if not self.target_port_name:
            return self.target_port
        return pod.container_ports.get(self.target_port_name)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]
    vip: ipaddress.IPv4Address | None = None

    def selects(self, pod: Pod) -> bool:
        return (
            pod.namespace == self.namespace
            and bool(self.selector)
            and all(pod.labels.get(k) == v for k, v in self.selector.items())
        )


@dataclass(frozen=True, slots=True)
class NodeAgentCredential:
    """A bearer token that authenticates the node agent of `node` to the CA (lab inventories)."""

    node: str
    token: str


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything a workload source knows about the cluster at one moment."""

    cluster_name: str
    trust_domain: str
    fabric_cidr: ipaddress.IPv4Network
    nodes: tuple[Node, ...]
    namespaces: tuple[Namespace, ...]
    pods: tuple[Pod, ...]
    services: tuple[Service, ...] = ()
    node_credentials: tuple[NodeAgentCredential, ...] = ()

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in the inventory")

    def namespace(self, name: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        return None

    def pod(self, key: str) -> Pod:
        """Look a pod up by `namespace/name`, or by bare name when that is unambiguous."""
        matches = [p for p in self.pods if p.key == key or ("/" not in key and p.name == key)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise KeyError(f"no pod {key!r} in the inventory; `nodeagent lab status` lists them")
        raise KeyError(f"pod name {key!r} is ambiguous; write it as namespace/name")

    def pods_on(self, node: str) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if p.node == node)

    def pod_by_ip(self, ip: ipaddress.IPv4Address) -> Pod | None:
        for pod in self.pods:
            if pod.ip == ip and not pod.host_network:
                return pod
        return None


def pod_uid(namespace: str, name: str) -> str:
    """A stable UID for an inventory pod that gives none (Kubernetes assigns random ones)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"nodeagent/{namespace}/{name}"))


DEFAULT_EXCLUDED_NAMESPACES = frozenset({"kube-system", "istio-system", "nodeagent-system"})


def enrolled(pod: Pod, namespace: Namespace | None, excluded: frozenset[str] = DEFAULT_EXCLUDED_NAMESPACES) -> bool:
    """Istio's ambient enrollment rule for one pod (REFERENCE.md, "Enrollment and status"; a pod with an
    injected sidecar never, as istio-cni's PodRedirectionEnabled)."""
    if pod.host_network or pod.sidecar or pod.namespace in excluded or pod.terminated:
        return False
    pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == DATAPLANE_MODE_NONE:
        return False
    if pod_mode == DATAPLANE_MODE_AMBIENT:
        return True
    return namespace is not None and namespace.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """An IP literal and a TCP port, written `10.1.2.3:8080` or `[fd00::1]:8080` (HTTP/2 CONNECT authority form)."""

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 1..65535")

    @classmethod
    def parse(cls, text: str) -> SocketAddress:
        """Parse `ip:port` or `[v6]:port` strictly: IP literals only, no host names, zones or leading zeros."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"{text!r} is not [ipv6]:port")
            version = 6
        else:
            host, sep, port = text.rpartition(":")
            if not sep:
                raise ValueError(f"{text!r} has no port; expected ip:port or [ipv6]:port")
            version = 4
        if not (port.isascii() and port.isdigit()) or len(port) > 5 or (len(port) > 1 and port[0] == "0"):
            raise ValueError(f"{text!r} does not end in a decimal port")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IP address literal") from None
        if ip.version != version:
            raise ValueError(f"{text!r}: IPv6 addresses must be bracketed, IPv4 ones must not")
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise ValueError(f"{text!r}: zone ids are not allowed")
        return cls(ip, int(port))

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"
