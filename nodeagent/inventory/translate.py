"""Kubernetes objects (dicts, as the API server returns them) -> nodeagent.model values. Pure.

Why this module exists: the Kubernetes workload source (inventory/kube.py) must turn Pods, Namespaces,
Services and Istio's security.istio.io/v1 AuthorizationPolicy / PeerAuthentication objects into the
same `Inventory` and `PolicySet` the local YAML source produces, so the agent, the tunnel and the CA never
know which source fed them. Keeping the translation free of I/O lets a table of plain dicts test it.

Rules applied:
- Pod: metadata.{name,namespace,uid,labels}, the agent's own `ambient.istio.io/redirection` annotation
  (so a restarted agent can correct it), Istio's `sidecar.istio.io/status` (an injected pod is never
  enrolled); spec.nodeName (empty: not scheduled yet), spec.hostNetwork,
  spec.serviceAccountName (Kubernetes' default is `default`); status.podIP (the IPv4 one of podIPs when
  the pod is dual-stack; none yet is fine); status.phase (missing -> Pending; `Unknown` -> Running, so a
  node that lost contact never unenrolls its pods); for service routing, the Ready condition, a
  deletionTimestamp and the containers' named TCP ports (not compared: no pod change for the agent).
- Service: spec.selector, spec.ports (TCP; a missing targetPort is the port; a *named* one is resolved
  per endpoint pod from its container ports, at routing), spec.clusterIP (IPv4 only: the IPv4 one of
  spec.clusterIPs when the service is dual-stack with IPv6 first; `None`/headless -> no VIP).
- Policies: the L4 subset through inventory/policies.py, with metadata.creationTimestamp (the oldest
  PeerAuthentication wins a conflict) and annotations. AuthorizationPolicies istiod never sends ztunnel
  are ignored and reported (value None, the reason in `problem`): dry-run (`istio.io/dry-run`), action
  CUSTOM or AUDIT, bound with targetRef(s) to a waypoint or gateway; this is decided before the fields
  are checked, as such a policy cannot change what the node tunnel allows. Fields of the spec this
  translator does not know are an error naming them. A policy that cannot be translated FAILS CLOSED
  rather than disappearing: an ALLOW policy (a missing or null action is ALLOW) becomes an ALLOW with no
  rules (its scope becomes default-deny, other ALLOW policies still apply), a DENY policy denies
  everything in its scope, a PeerAuthentication becomes STRICT (keeping its creation time). The problem
  is returned so the caller logs it.

What it deliberately does not do: no Kubernetes client types (dicts only), no I/O, no logging (problems
are returned), no Node objects: the Kubernetes source knows nodes only by name, so `Inventory.nodes`
carries placeholder CIDR/address values (UNKNOWN_NETWORK, UNKNOWN_ADDRESS) that only the lab reads.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from nodeagent.inventory.policies import PolicyError, creation_time, not_enforced, parse_policies
from nodeagent.model import (
    DEFAULT_TRUST_DOMAIN,
    REDIRECTION_ANNOTATION,
    Inventory,
    Namespace,
    Node,
    Pod,
    PodPhase,
    Service,
    ServicePort,
)
from nodeagent.policy import (
    DEFAULT_ROOT_NAMESPACE,
    Action,
    MtlsMode,
    PeerAuthentication,
    Policy,
    PolicySet,
    Rule,
    Scope,
)

UNKNOWN_NETWORK = ipaddress.IPv4Network("0.0.0.0/32")
UNKNOWN_ADDRESS = ipaddress.IPv4Address("0.0.0.0")
DEFAULT_SERVICE_ACCOUNT = "default"

_AUTHZ_SPEC = {"selector", "action", "rules", "provider", "targetRef", "targetRefs"}
_PEER_SPEC = {"selector", "mtls", "portLevelMtls"}
_PHASES = {p.value: p for p in PodPhase}


class TranslateError(ValueError):
    """A Kubernetes object this translator cannot use; the message names the object and the field."""


@dataclass(frozen=True, slots=True)
class TranslatedPolicy:
    """One policy object's contribution: `value` is None when it does not apply to ztunnel at all."""

    value: Policy | PeerAuthentication | None
    problem: str | None = None  # why it was replaced by a fail-closed stand-in or ignored, or a caveat


def object_key(obj: Mapping[str, Any]) -> str:
    """`namespace/name` (or `name` for cluster-scoped objects), for messages and store keys."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise TranslateError(f"{obj.get('kind', 'object')} without metadata")
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        raise TranslateError(f"{obj.get('kind', 'object')} without metadata.name")
    return f"{namespace}/{name}" if isinstance(namespace, str) and namespace else name


# --- core objects ----------------------------------------------------------------------------------------


def pod(obj: Mapping[str, Any]) -> Pod:
    where = f"Pod {object_key(obj)}"
    meta = _mapping(obj.get("metadata"), f"{where}: metadata")
    spec = _mapping(obj.get("spec"), f"{where}: spec")
    status = _mapping(obj.get("status"), f"{where}: status")
    namespace = _string(meta.get("namespace"), f"{where}: metadata.namespace")
    phase_text = status.get("phase")
    if phase_text is None:
        phase = PodPhase.PENDING
    elif phase_text == "Unknown":
        phase = PodPhase.RUNNING
    elif isinstance(phase_text, str) and phase_text in _PHASES:
        phase = _PHASES[phase_text]
    else:
        raise TranslateError(f"{where}: status.phase {phase_text!r} is not a pod phase")
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise TranslateError(f"{where}: spec.hostNetwork must be a boolean")
    node = spec.get("nodeName") or ""
    if not isinstance(node, str):
        raise TranslateError(f"{where}: spec.nodeName must be a string")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or DEFAULT_SERVICE_ACCOUNT
    annotations = _mapping(meta.get("annotations"), f"{where}: metadata.annotations")
    redirection = annotations.get(REDIRECTION_ANNOTATION)
    if redirection is not None and not isinstance(redirection, str):
        raise TranslateError(f"{where}: metadata.annotations[{REDIRECTION_ANNOTATION}] must be a string")
    return Pod(
        name=_string(meta.get("name"), f"{where}: metadata.name"),
        namespace=namespace,
        uid=_string(meta.get("uid"), f"{where}: metadata.uid"),
        node=node,
        service_account=_string(account, f"{where}: spec.serviceAccountName"),
        ip=_pod_ip(status, where),
        labels=_labels(meta.get("labels"), f"{where}: metadata.labels"),
        host_network=host_network,
        phase=phase,
        redirection=redirection,
        workload_name=workload_name(meta, where),
        sidecar=bool(annotations.get(SIDECAR_STATUS_ANNOTATION)),
        ready=_ready(status, where),
        terminating=meta.get("deletionTimestamp") is not None,
        container_ports=_container_ports(spec, where),
    )


def _ready(status: Mapping[str, Any], where: str) -> bool:
    """The Ready condition; a pod the kubelet has not reported conditions for yet counts as ready."""
    for raw in _list(status.get("conditions"), f"{where}: status.conditions"):
        condition = _mapping(raw, f"{where}: status.conditions[]")
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return True


def _container_ports(spec: Mapping[str, Any], where: str) -> Mapping[str, int]:
    """Named TCP container ports (name -> port), what a Service's named targetPort resolves to per pod.
    initContainers count too (a restartable init container is a sidecar serving ports)."""
    ports: dict[str, int] = {}
    for section in ("initContainers", "containers"):
        for raw in _list(spec.get(section), f"{where}: spec.{section}"):
            container = _mapping(raw, f"{where}: spec.{section}[]")
            for raw_port in _list(container.get("ports"), f"{where}: spec.{section}[].ports"):
                entry = _mapping(raw_port, f"{where}: spec.{section}[].ports[]")
                name = entry.get("name")
                if isinstance(name, str) and name and entry.get("protocol", "TCP") == "TCP":
                    ports.setdefault(name, _port(entry.get("containerPort"), f"{where}: ports[{name}].containerPort"))
    return MappingProxyType(ports)


SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"  # set by Istio's sidecar injector

# A Job a CronJob made is named <cronjob>-<scheduled time in minutes>.
_CRONJOB_JOB = re.compile(r"(.+)-\d{8,10}")


def workload_name(meta: Mapping[str, Any], where: str) -> str:
    """The pod's workload name by Istio's heuristic (pkg/kube GetDeployMetaFromPod): only for a pod with a
    generated name, from its controller reference — the Deployment of a ReplicaSet (its name minus the
    pod-template-hash), the CronJob of a Job (minus the schedule suffix), else the controller itself;
    "" when there is none."""
    if not meta.get("generateName"):
        return ""
    for item in _list(meta.get("ownerReferences"), f"{where}: metadata.ownerReferences"):
        ref = _mapping(item, f"{where}: metadata.ownerReferences[]")
        if ref.get("controller") is not True:
            continue
        name = _string(ref.get("name"), f"{where}: metadata.ownerReferences[].name")
        kind = ref.get("kind")
        if kind == "ReplicaSet":
            template_hash = _labels(meta.get("labels"), f"{where}: metadata.labels").get("pod-template-hash", "")
            if template_hash and name.endswith(template_hash):
                return name.removesuffix(f"-{template_hash}")
        elif kind == "Job" and (cron := _CRONJOB_JOB.fullmatch(name)):
            return cron[1]
        return name
    return ""


def _pod_ip(status: Mapping[str, Any], where: str) -> ipaddress.IPv4Address | None:
    candidates: list[object] = [status.get("podIP")]
    for entry in _list(status.get("podIPs"), f"{where}: status.podIPs"):
        if isinstance(entry, Mapping):
            candidates.append(entry.get("ip"))
    return _first_ipv4(candidates, f"{where}: status.podIP")


def _first_ipv4(candidates: list[object], field: str) -> ipaddress.IPv4Address | None:
    """The first IPv4 address among `candidates` (a dual-stack object's addresses, the primary first); empty
    ones ("", None, "None": a headless service) are skipped; anything else not an address is an error."""
    for text in candidates:
        if text in (None, "", "None"):
            continue
        if not isinstance(text, str):
            raise TranslateError(f"{field} must be a string")
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise TranslateError(f"{field} {text!r} is not an IP address") from None
        if isinstance(address, ipaddress.IPv4Address):
            return address
    return None


def namespace(obj: Mapping[str, Any]) -> Namespace:
    where = f"Namespace {object_key(obj)}"
    meta = _mapping(obj.get("metadata"), f"{where}: metadata")
    return Namespace(
        name=_string(meta.get("name"), f"{where}: metadata.name"),
        labels=_labels(meta.get("labels"), f"{where}: metadata.labels"),
    )


def service(obj: Mapping[str, Any]) -> Service:
    """The service: its TCP ports (a named targetPort is resolved per endpoint pod, at routing)."""
    where = f"Service {object_key(obj)}"
    meta = _mapping(obj.get("metadata"), f"{where}: metadata")
    spec = _mapping(obj.get("spec"), f"{where}: spec")
    ports: list[ServicePort] = []
    for i, raw in enumerate(_list(spec.get("ports"), f"{where}: spec.ports")):
        at = f"{where}: spec.ports[{i}]"
        entry = _mapping(raw, at)
        if entry.get("protocol", "TCP") != "TCP":
            continue
        port = _port(entry.get("port"), f"{at}.port")
        target = entry.get("targetPort", port)
        name = str(entry.get("name") or "")
        if isinstance(target, str) and not target.isdigit():
            ports.append(ServicePort(port=port, target_port=0, name=name, target_port_name=target))
            continue
        ports.append(ServicePort(port=port, target_port=_port(target, f"{at}.targetPort"), name=name))
    return Service(
        name=_string(meta.get("name"), f"{where}: metadata.name"),
        namespace=_string(meta.get("namespace"), f"{where}: metadata.namespace"),
        selector=_labels(spec.get("selector"), f"{where}: spec.selector"),
        ports=tuple(ports),
        vip=_cluster_ipv4(spec, where),
    )


def _cluster_ipv4(spec: Mapping[str, Any], where: str) -> ipaddress.IPv4Address | None:
    """The service's IPv4 VIP: spec.clusterIP, or on a dual-stack service whose primary family is IPv6 the
    IPv4 one of spec.clusterIPs - that address reaches the service too, and a VIP the tunnels do not know is
    passed through in plaintext (kube-proxy then forwards it to a pod, in the mesh or not)."""
    candidates: list[object] = [spec.get("clusterIP"), *_list(spec.get("clusterIPs"), f"{where}: spec.clusterIPs")]
    return _first_ipv4(candidates, f"{where}: spec.clusterIP")


# --- policies --------------------------------------------------------------------------------------------


def policy(obj: Mapping[str, Any], root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> TranslatedPolicy:
    """An AuthorizationPolicy or PeerAuthentication object -> its L4 value (fail closed on problems)."""
    kind = obj.get("kind")
    key = object_key(obj)
    where = f"{kind} {key}"
    meta = _mapping(obj.get("metadata"), f"{where}: metadata")
    name = _string(meta.get("name"), f"{where}: metadata.name")
    ns = _string(meta.get("namespace"), f"{where}: metadata.namespace")

    def fail(problem: str, spec: Mapping[str, Any]) -> TranslatedPolicy:
        created = _created_or_none(meta, where)
        return _fail_closed(kind, name, ns, spec, root=root_namespace, problem=problem, created=created)

    raw_spec = obj.get("spec") or {}
    if not isinstance(raw_spec, Mapping):
        return fail(f"{where}: spec must be a mapping", {})
    spec: Mapping[str, Any] = raw_spec
    known = _AUTHZ_SPEC if kind == "AuthorizationPolicy" else _PEER_SPEC
    if kind not in ("AuthorizationPolicy", "PeerAuthentication"):
        raise TranslateError(f"{where}: unsupported kind; expected AuthorizationPolicy or PeerAuthentication")
    if kind == "AuthorizationPolicy":
        try:
            skipped = not_enforced(meta, spec, where)
        except PolicyError as exc:
            return fail(_prefixed(where, exc), spec)
        if skipped is not None:
            return TranslatedPolicy(None, f"{where}: {skipped}")
    unknown = sorted(set(spec) - known)
    if unknown:
        return fail(f"{where}: unknown spec fields {unknown} (known: {sorted(known)})", spec)
    doc = {"kind": kind, "metadata": dict(meta), "spec": dict(spec)}
    notes: list[str] = []
    try:
        parsed = parse_policies([doc], root_namespace, notes)
    except (PolicyError, ValueError) as exc:
        return fail(_prefixed(where, exc), spec)
    value: Policy | PeerAuthentication = (
        parsed.authorization[0] if kind == "AuthorizationPolicy" else parsed.peer_authentication[0]
    )
    return TranslatedPolicy(value, "; ".join(notes) or None)


def _prefixed(where: str, exc: Exception) -> str:
    """The error, naming the policy once: errors from inventory/policies.py already start with `where`,
    followed by ":" or by the field path ("AuthorizationPolicy ns/p.rules[0]: ...")."""
    text = str(exc)
    return text if text.startswith(where) and text[len(where) : len(where) + 1] in (":", ".") else f"{where}: {text}"


def _created_or_none(meta: Mapping[str, Any], where: str) -> datetime | None:
    """The creation time of a policy being replaced by its fail-closed stand-in; an unreadable one is None
    (the oldest), so a broken PeerAuthentication, enforced STRICT, wins its level."""
    try:
        return creation_time(meta, where)
    except PolicyError:
        return None


def _fail_closed(
    kind: object,
    name: str,
    ns: str,
    spec: Mapping[str, Any],
    *,
    root: str,
    problem: str,
    created: datetime | None = None,
) -> TranslatedPolicy:
    selector: Mapping[str, str] = MappingProxyType({})
    raw_selector = spec.get("selector")
    if isinstance(raw_selector, Mapping) and isinstance(raw_selector.get("matchLabels"), Mapping):
        selector = MappingProxyType({str(k): str(v) for k, v in raw_selector["matchLabels"].items()})
    if kind == "PeerAuthentication":
        return TranslatedPolicy(
            PeerAuthentication(name, ns, MtlsMode.STRICT, selector, created=created),
            f"{problem}; enforced as STRICT until fixed",
        )
    scope = Scope.WORKLOAD_SELECTOR if selector else Scope.GLOBAL if ns == root else Scope.NAMESPACE
    if spec.get("action") == "DENY":
        return TranslatedPolicy(
            Policy(name, ns, Action.DENY, scope, (Rule(()),), selector),
            f"{problem}; enforced as deny-all in its scope until fixed",
        )
    return TranslatedPolicy(
        Policy(name, ns, Action.ALLOW, scope, (), selector),
        f"{problem}; enforced as an ALLOW that matches nothing (its scope is default-deny) until fixed",
    )


def policy_set(
    values: Iterable[Policy | PeerAuthentication], root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> PolicySet:
    """Collect translated policies into a PolicySet, in a stable (namespace, name) order."""
    ordered = sorted(values, key=lambda v: (v.namespace, v.name))
    return PolicySet(
        tuple(v for v in ordered if isinstance(v, Policy)),
        tuple(v for v in ordered if isinstance(v, PeerAuthentication)),
        root_namespace,
    )


# --- the inventory ---------------------------------------------------------------------------------------


def inventory(
    *,
    pods: Iterable[Pod],
    namespaces: Iterable[Namespace],
    services: Iterable[Service] = (),
    nodes: Iterable[str] = (),
    cluster_name: str = "kubernetes",
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> Inventory:
    """An Inventory from translated objects; nodes are every node a pod runs on plus `nodes`."""
    pod_list = sorted(pods, key=lambda p: (p.namespace, p.name))
    node_names = sorted({*nodes, *(p.node for p in pod_list if p.node)})
    return Inventory(
        cluster_name=cluster_name,
        trust_domain=trust_domain,
        fabric_cidr=UNKNOWN_NETWORK,
        nodes=tuple(Node(name=n, pod_cidr=UNKNOWN_NETWORK, address=UNKNOWN_ADDRESS) for n in node_names),
        namespaces=tuple(sorted(namespaces, key=lambda n: n.name)),
        pods=tuple(pod_list),
        services=tuple(sorted(services, key=lambda s: (s.namespace, s.name))),
    )


# --- field helpers ---------------------------------------------------------------------------------------


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TranslateError(f"{where} must be a mapping")
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TranslateError(f"{where} must be a list")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TranslateError(f"{where} must be a non-empty string")
    return value


def _port(value: object, where: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise TranslateError(f"{where} {value!r} is not a port number")
    return value


def _labels(value: object, where: str) -> Mapping[str, str]:
    raw = _mapping(value, where)
    labels: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TranslateError(f"{where} must map strings to strings")
        labels[k] = v
    return MappingProxyType(labels)
