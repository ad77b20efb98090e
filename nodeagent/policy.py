"""L4 authorization with Istio's semantics: AuthorizationPolicy (ALLOW/DENY) and PeerAuthentication (mTLS mode).

Why this module exists: the inbound side of the tunnel (:15008 HBONE and :15006 plaintext) must decide, for
every connection, whether the destination workload accepts it, with exactly the answers Istio's ztunnel
gives (src/rbac.rs, src/state.rs) for policies istiod would send it (pilot/.../ambient/authorization.go).
Deciding here, as a pure function of plain values, lets the rules be tested with tables and lets the tunnel
re-check open connections whenever the policy set or a destination's labels change (`revalidate`).

The evaluation order:

1. PeerAuthentication: if the effective mTLS mode for the destination workload and port is STRICT and the
   connection has no peer identity (plaintext on :15006), deny.
2. Any applicable DENY policy that matches -> deny.
3. No applicable ALLOW policy -> allow.
4. Any applicable ALLOW policy matches -> allow; otherwise deny.

A policy matches when any of its rules matches; a rule when all its clauses match (a rule without clauses
matches everything); a clause when any of its match groups matches (a clause without groups matches); a
match group when every field it sets matches (values OR'ed, `not_*` meaning none of them may match). A match
group that sets no field matches nothing. A policy without rules matches nothing.

Applicable policies: GLOBAL ones (from the root namespace), NAMESPACE ones of the destination's namespace,
and WORKLOAD_SELECTOR ones in the destination's namespace or the root namespace whose selector the
destination's labels satisfy.

PeerAuthentication (`effective_mtls`), as istiod computes it for ztunnel (ambient/authorization.go,
convertedSelectorPeerAuthentications): one policy per level — mesh (root namespace, no selector), namespace
(no selector), workload (a selector in the destination's namespace; selector policies in the root namespace
are ignored) — and a level whose mode is UNSET inherits the one above; the default is PERMISSIVE. When
several policies compete at one level (two namespace-wide ones, two workload ones selecting the same pod),
the OLDEST wins, by `created` (metadata.creationTimestamp), then by name — what Istio's
getOldestPeerAuthn does, with the name making ties (timestamps have one-second resolution) deterministic.
A policy without a timestamp (local policy files usually have none) counts as the oldest, as Go's zero
time does, so among such policies the name decides. The tuple's order never matters.

Port-level modes (workload policies only) override the workload's effective mode for that target port.
DISABLE counts as PERMISSIVE for an inbound check (plaintext accepted). One deliberate difference from
istiod: for a workload policy WITHOUT a mode under an inherited STRICT, istiod's
convertedSelectorPeerAuthentications looks only for PERMISSIVE port overrides, so a lone DISABLE port stays
STRICT — yet the same DISABLE port is exempted as soon as any other port of that policy is PERMISSIVE
(convertPeerAuthentication treats DISABLE and PERMISSIVE alike), and a STRICT workload policy's DISABLE
port is exempted too. We follow the API's meaning (DISABLE: plaintext accepted on that port) in every
case, so the answer for one port never depends on another port's entry:

| mesh/namespace | workload mode | port 8080 override | 8080 here  | 8080 from istiod   |
|----------------|---------------|--------------------|------------|--------------------|
| STRICT         | UNSET         | PERMISSIVE         | PERMISSIVE | PERMISSIVE         |
| STRICT         | UNSET         | DISABLE            | PERMISSIVE | STRICT (differs)   |
| STRICT         | UNSET         | DISABLE, 9090 PERM | PERMISSIVE | PERMISSIVE         |
| any            | STRICT        | DISABLE            | PERMISSIVE | PERMISSIVE         |

What it deliberately does not do: no parsing of Kubernetes AuthorizationPolicy objects (that translation,
including dropping ALLOW rules with HTTP-only attributes and the HTTP parts of DENY rules, and leaving out
CUSTOM, AUDIT, dry-run and waypoint-bound policies, belongs to nodeagent.inventory), no HTTP attributes,
no I/O, no logging.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TypeVar

from nodeagent.model import Identity, IPAddress, Pod, SocketAddress

DEFAULT_ROOT_NAMESPACE = "istio-system"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _no_labels() -> Mapping[str, str]:
    return MappingProxyType({})


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class Scope(enum.Enum):
    """Where a policy applies (ztunnel's RbacScope)."""

    GLOBAL = "global"  # every workload in the mesh (policies in the root namespace without a selector)
    NAMESPACE = "namespace"  # every workload in the policy's namespace
    WORKLOAD_SELECTOR = "workload-selector"  # workloads whose labels satisfy the selector


class MatchType(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One Istio string pattern: `*` (any non-empty value), `prefix*`, `*suffix` or an exact value."""

    type: MatchType
    value: str = ""

    @classmethod
    def parse(cls, pattern: str) -> StringMatch:
        if pattern == "*":
            return cls(MatchType.PRESENCE)
        if pattern.startswith("*"):
            return cls(MatchType.SUFFIX, pattern[1:])
        if pattern.endswith("*"):
            return cls(MatchType.PREFIX, pattern[:-1])
        return cls(MatchType.EXACT, pattern)

    def matches(self, text: str) -> bool:
        if self.type is MatchType.EXACT:
            return text == self.value
        if self.type is MatchType.PREFIX:
            return text.startswith(self.value)
        if self.type is MatchType.SUFFIX:
            return text.endswith(self.value)
        return text != ""

    def __str__(self) -> str:
        if self.type is MatchType.PRESENCE:
            return "*"
        if self.type is MatchType.PREFIX:
            return f"{self.value}*"
        if self.type is MatchType.SUFFIX:
            return f"*{self.value}"
        return self.value


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """`ns/sa`, or a bare `sa` meaning the policy's own namespace (Istio's serviceAccounts field)."""

    namespace: str
    service_account: str

    @classmethod
    def parse(cls, text: str, policy_namespace: str) -> ServiceAccountMatch:
        namespace, sep, account = text.partition("/")
        return cls(namespace, account) if sep else cls(policy_namespace, text)

    def matches(self, identity: Identity | None) -> bool:
        return (
            identity is not None
            and identity.namespace == self.namespace
            and identity.service_account == self.service_account
        )


@dataclass(frozen=True, slots=True)
class Connection:
    """What authorization sees of one inbound connection.

    `destination` is the real target (pod IP and the port the application listens on, after any service
    port mapping); `source_identity` is the verified peer SPIFFE ID, or None for plaintext (:15006).
    """

    source_ip: IPAddress
    destination: SocketAddress
    source_identity: Identity | None
    destination_namespace: str
    destination_labels: Mapping[str, str] = field(default_factory=_no_labels)


def _field_matches(positive: tuple[object, ...], negative: tuple[object, ...], hit: bool, neg_hit: bool) -> bool:
    return (not positive or hit) and (not negative or not neg_hit)


@dataclass(frozen=True, slots=True)
class Match:
    """A match group: every field that is set must match (its values OR'ed); `not_*` fields must not match."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()  # compared with the SPIFFE ID without `spiffe://`
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not (
            self.namespaces
            or self.not_namespaces
            or self.service_accounts
            or self.not_service_accounts
            or self.principals
            or self.not_principals
            or self.source_ips
            or self.not_source_ips
            or self.destination_ips
            or self.not_destination_ips
            or self.destination_ports
            or self.not_destination_ports
        )

    def matches(self, conn: Connection) -> bool:
        if self.is_empty():
            return False
        identity = conn.source_identity
        # ztunnel compares principals and namespaces with the empty string when there is no identity:
        # no positive pattern can match it, and every `not_*` pattern is satisfied.
        principal = identity.principal if identity else ""
        namespace = identity.namespace if identity else ""
        dst_ip, dst_port, src_ip = conn.destination.ip, conn.destination.port, conn.source_ip
        return (
            _field_matches(
                self.destination_ips,
                self.not_destination_ips,
                any(dst_ip in n for n in self.destination_ips),
                any(dst_ip in n for n in self.not_destination_ips),
            )
            and _field_matches(
                self.source_ips,
                self.not_source_ips,
                any(src_ip in n for n in self.source_ips),
                any(src_ip in n for n in self.not_source_ips),
            )
            and _field_matches(
                self.destination_ports,
                self.not_destination_ports,
                dst_port in self.destination_ports,
                dst_port in self.not_destination_ports,
            )
            and _field_matches(
                self.service_accounts,
                self.not_service_accounts,
                any(m.matches(identity) for m in self.service_accounts),
                any(m.matches(identity) for m in self.not_service_accounts),
            )
            and _field_matches(
                self.principals,
                self.not_principals,
                bool(principal) and any(m.matches(principal) for m in self.principals),
                bool(principal) and any(m.matches(principal) for m in self.not_principals),
            )
            and _field_matches(
                self.namespaces,
                self.not_namespaces,
                bool(namespace) and any(m.matches(namespace) for m in self.namespaces),
                bool(namespace) and any(m.matches(namespace) for m in self.not_namespaces),
            )
        )


@dataclass(frozen=True, slots=True)
class Clause:
    """Matches when any of its groups matches; a clause without groups matches everything."""

    matches: tuple[Match, ...] = ()

    def match(self, conn: Connection) -> bool:
        return not self.matches or any(m.matches(conn) for m in self.matches)


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches when all of its clauses (from / to / when, after translation) match."""

    clauses: tuple[Clause, ...] = ()

    def match(self, conn: Connection) -> bool:
        return all(c.match(conn) for c in self.clauses)


@dataclass(frozen=True, slots=True)
class Policy:
    """An L4 AuthorizationPolicy as ztunnel holds it."""

    name: str
    namespace: str
    action: Action
    scope: Scope
    rules: tuple[Rule, ...] = ()
    selector: Mapping[str, str] = field(default_factory=_no_labels)

    def __post_init__(self) -> None:
        if (self.scope is Scope.WORKLOAD_SELECTOR) != bool(self.selector):
            raise ValueError(
                f"policy {self.key}: a non-empty selector goes with scope workload-selector and only with it"
            )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def applies_to(self, namespace: str, labels: Mapping[str, str], root_namespace: str) -> bool:
        if self.scope is Scope.GLOBAL:
            return True
        if self.scope is Scope.NAMESPACE:
            return self.namespace == namespace
        return self.namespace in (namespace, root_namespace) and all(
            labels.get(k) == v for k, v in self.selector.items()
        )

    def matching_rule(self, conn: Connection) -> int | None:
        """Index of the first rule that matches `conn`, or None."""
        for index, rule in enumerate(self.rules):
            if rule.match(conn):
                return index
        return None


class MtlsMode(enum.Enum):
    UNSET = "UNSET"  # inherit from the enclosing level
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """Mesh (root namespace, no selector), namespace (no selector) or workload (selector) mTLS mode.

    `port_modes` are the port-level exceptions of a workload policy, keyed by the workload's target port.
    `created` (metadata.creationTimestamp, timezone-aware) decides between policies at the same level: the
    oldest wins; None counts as the oldest (Go's zero time), the name breaking ties.
    """

    name: str
    namespace: str
    mode: MtlsMode = MtlsMode.UNSET
    selector: Mapping[str, str] = field(default_factory=_no_labels)
    port_modes: Mapping[int, MtlsMode] = field(default_factory=lambda: MappingProxyType({}))
    created: datetime | None = None

    def __post_init__(self) -> None:
        if self.created is not None and self.created.utcoffset() is None:
            raise ValueError(f"PeerAuthentication {self.key}: created must be timezone-aware")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def age_order(self) -> tuple[datetime, str]:
        """Sorts the oldest first: (creation time, None as the oldest; then the name)."""
        return (self.created or _ZERO_TIME, self.name)


_ZERO_TIME = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every policy the tunnel knows at one moment; swapped whole when anything changes."""

    authorization: tuple[Policy, ...] = ()
    peer_authentication: tuple[PeerAuthentication, ...] = ()
    root_namespace: str = DEFAULT_ROOT_NAMESPACE


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision and why, for the access log and the 401 / close reason."""

    allowed: bool
    reason: str
    policy: str | None = None  # "namespace/name" of the deciding policy, when one decided
    rule: int | None = None  # index of the matching rule inside that policy


@dataclass(frozen=True, slots=True)
class EffectiveMtls:
    mode: MtlsMode  # STRICT or PERMISSIVE (DISABLE counts as PERMISSIVE for an inbound check)
    source: str | None  # "namespace/name" of the PeerAuthentication that decided, None for the default


def effective_mtls(namespace: str, labels: Mapping[str, str], port: int, policies: PolicySet) -> EffectiveMtls:
    """Istio's PeerAuthentication inheritance: mesh -> namespace -> workload -> workload port; at each level
    the oldest applicable policy (`PeerAuthentication.age_order`)."""
    root = policies.root_namespace
    pas = policies.peer_authentication
    mesh = _oldest(pa for pa in pas if not pa.selector and pa.namespace == root)
    ns_level = _oldest(pa for pa in pas if not pa.selector and pa.namespace == namespace != root)
    workload = _oldest(
        pa
        for pa in pas
        if pa.selector and pa.namespace == namespace != root and all(labels.get(k) == v for k, v in pa.selector.items())
    )
    strict, source = False, None
    if mesh is not None:
        strict, source = mesh.mode is MtlsMode.STRICT, mesh.key
    for level in (ns_level, workload):
        if level is not None and level.mode is not MtlsMode.UNSET:
            strict, source = level.mode is MtlsMode.STRICT, level.key
    if workload is not None:
        port_mode = workload.port_modes.get(port, MtlsMode.UNSET)
        if port_mode is not MtlsMode.UNSET:
            strict, source = port_mode is MtlsMode.STRICT, workload.key
    return EffectiveMtls(MtlsMode.STRICT if strict else MtlsMode.PERMISSIVE, source)


def _oldest(candidates: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    return min(candidates, key=lambda pa: pa.age_order, default=None)


def evaluate(conn: Connection, policies: PolicySet) -> Verdict:
    """Decide one connection. Pure; cheap enough to run per connection and again on every policy change."""
    mtls = effective_mtls(conn.destination_namespace, conn.destination_labels, conn.destination.port, policies)
    if mtls.mode is MtlsMode.STRICT and conn.source_identity is None:
        return Verdict(
            False,
            f"mTLS is STRICT for port {conn.destination.port} of a workload in {conn.destination_namespace} "
            f"({mtls.source}) and the connection has no peer identity; send it through the mesh",
            policy=mtls.source,
        )
    applicable = [
        p
        for p in policies.authorization
        if p.applies_to(conn.destination_namespace, conn.destination_labels, policies.root_namespace)
    ]
    for policy in applicable:
        if policy.action is Action.DENY:
            index = policy.matching_rule(conn)
            if index is not None:
                return Verdict(False, f"denied by DENY policy {policy.key} rule {index}", policy.key, index)
    allows = [p for p in applicable if p.action is Action.ALLOW]
    if not allows:
        return Verdict(True, f"allowed: no ALLOW policy applies to this workload in {conn.destination_namespace}")
    for policy in allows:
        index = policy.matching_rule(conn)
        if index is not None:
            return Verdict(True, f"allowed by ALLOW policy {policy.key} rule {index}", policy.key, index)
    names = ", ".join(p.key for p in allows)
    return Verdict(False, f"denied: ALLOW policies apply ({names}) and none matches {_describe(conn)}")


def _describe(conn: Connection) -> str:
    who = conn.source_identity.uri if conn.source_identity else "no identity"
    return f"{conn.source_ip} ({who}) -> {conn.destination}"


K = TypeVar("K", bound=Hashable)


def revalidate(
    connections: Mapping[K, Connection], policies: PolicySet, pod_at: Callable[[IPAddress], Pod | None]
) -> dict[K, Verdict]:
    """The open connections that `policies` now deny, with the reason; the tunnel closes exactly these.

    Each is judged with its destination as it is now — `pod_at(destination ip)`, the pod it was authorized
    for — since new labels can bring a pod under a selector policy or out of one; a destination no longer
    known is judged as it was (its connections end when its pod leaves). The source end is the peer's
    identity and IP, which a connection keeps for its life."""
    denied: dict[K, Verdict] = {}
    for key, then in connections.items():
        pod = pod_at(then.destination.ip)
        now = then if pod is None else replace(then, destination_namespace=pod.namespace, destination_labels=pod.labels)
        verdict = evaluate(now, policies)
        if not verdict.allowed:
            denied[key] = verdict
    return denied
