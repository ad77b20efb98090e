"""Tables for nodeagent.policy: Istio's L4 authorization and PeerAuthentication semantics."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime
from types import MappingProxyType

import pytest

from nodeagent.model import Identity, IPAddress, Pod, SocketAddress
from nodeagent.policy import (
    Action,
    Clause,
    Connection,
    Match,
    MtlsMode,
    PeerAuthentication,
    Policy,
    PolicySet,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    effective_mtls,
    evaluate,
    revalidate,
)

ROOT = "istio-system"
CLIENT = Identity("cluster.local", "client-ns", "client-sa")
OTHER = Identity("cluster.local", "other-ns", "other-sa")
FOREIGN_TD = Identity("example.org", "client-ns", "client-sa")


def conn(
    identity: Identity | None = CLIENT,
    *,
    src: str = "10.1.0.5",
    dst: str = "10.2.0.7",
    port: int = 8080,
    ns: str = "server-ns",
    labels: dict[str, str] | None = None,
) -> Connection:
    return Connection(
        source_ip=ipaddress.ip_address(src),
        destination=SocketAddress(ipaddress.ip_address(dst), port),
        source_identity=identity,
        destination_namespace=ns,
        destination_labels=MappingProxyType(labels if labels is not None else {"app": "server"}),
    )


def s(*patterns: str) -> tuple[StringMatch, ...]:
    return tuple(StringMatch.parse(p) for p in patterns)


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def policy(
    action: Action,
    *groups: Match,
    name: str = "p",
    ns: str = "server-ns",
    scope: Scope = Scope.NAMESPACE,
    selector: dict[str, str] | None = None,
) -> Policy:
    """One rule with one clause holding `groups` (the shape of a `from:` list)."""
    return Policy(name, ns, action, scope, (Rule((Clause(groups),)),), MappingProxyType(selector or {}))


def allow(*groups: Match, **kw: object) -> Policy:
    return policy(Action.ALLOW, *groups, **kw)  # type: ignore[arg-type]


def deny(*groups: Match, **kw: object) -> Policy:
    return policy(Action.DENY, *groups, **kw)  # type: ignore[arg-type]


def pset(*policies: Policy, pa: tuple[PeerAuthentication, ...] = ()) -> PolicySet:
    return PolicySet(policies, pa, ROOT)


CASES: list[tuple[str, PolicySet, Connection, bool]] = [
    ("no policies allow", pset(), conn(), True),
    ("no policies allow plaintext", pset(), conn(None), True),
    # principals: exact, presence, prefix, suffix; compared without spiffe://
    ("principal exact", pset(allow(Match(principals=s(CLIENT.principal)))), conn(), True),
    ("principal exact other", pset(allow(Match(principals=s(OTHER.principal)))), conn(), False),
    ("principal with spiffe:// never matches", pset(allow(Match(principals=s(CLIENT.uri)))), conn(), False),
    ("principal presence", pset(allow(Match(principals=s("*")))), conn(), True),
    ("principal presence needs identity", pset(allow(Match(principals=s("*")))), conn(None), False),
    ("principal prefix", pset(allow(Match(principals=s("cluster.local/ns/client-ns/*")))), conn(), True),
    ("principal prefix miss", pset(allow(Match(principals=s("cluster.local/ns/other/*")))), conn(), False),
    ("principal suffix", pset(allow(Match(principals=s("*/sa/client-sa")))), conn(), True),
    (
        "principal suffix trust domain agnostic",
        pset(allow(Match(principals=s("*/sa/client-sa")))),
        conn(FOREIGN_TD),
        True,
    ),
    ("principal values are OR'ed", pset(allow(Match(principals=s(OTHER.principal, CLIENT.principal)))), conn(), True),
    ("not_principals excludes", pset(allow(Match(not_principals=s(CLIENT.principal)))), conn(), False),
    ("not_principals admits others", pset(allow(Match(not_principals=s(OTHER.principal)))), conn(), True),
    ("not_principals admits plaintext", pset(allow(Match(not_principals=s("*")))), conn(None), True),
    # namespaces
    ("namespace", pset(allow(Match(namespaces=s("client-ns")))), conn(), True),
    ("namespace miss", pset(allow(Match(namespaces=s("other-ns")))), conn(), False),
    ("namespace prefix", pset(allow(Match(namespaces=s("client-*")))), conn(), True),
    ("namespace needs identity", pset(allow(Match(namespaces=s("*")))), conn(None), False),
    ("not_namespaces", pset(allow(Match(not_namespaces=s("client-ns")))), conn(), False),
    # service accounts
    (
        "service account",
        pset(allow(Match(service_accounts=(ServiceAccountMatch("client-ns", "client-sa"),)))),
        conn(),
        True,
    ),
    (
        "service account other ns",
        pset(allow(Match(service_accounts=(ServiceAccountMatch("x", "client-sa"),)))),
        conn(),
        False,
    ),
    (
        "service account needs identity",
        pset(allow(Match(service_accounts=(ServiceAccountMatch("client-ns", "client-sa"),)))),
        conn(None),
        False,
    ),
    (
        "not_service_accounts",
        pset(allow(Match(not_service_accounts=(ServiceAccountMatch("client-ns", "client-sa"),)))),
        conn(),
        False,
    ),
    # ports are the real target port
    ("port", pset(allow(Match(destination_ports=(8080,)))), conn(), True),
    ("port miss", pset(allow(Match(destination_ports=(9090,)))), conn(), False),
    ("not_port", pset(allow(Match(not_destination_ports=(8080,)))), conn(), False),
    ("not_port other", pset(allow(Match(not_destination_ports=(9090,)))), conn(), True),
    # ip blocks
    ("source cidr", pset(allow(Match(source_ips=nets("10.1.0.0/16")))), conn(), True),
    ("source cidr miss", pset(allow(Match(source_ips=nets("10.9.0.0/16")))), conn(), False),
    ("source host", pset(allow(Match(source_ips=nets("10.1.0.5/32")))), conn(), True),
    ("source v6 block never matches v4", pset(allow(Match(source_ips=nets("::/0")))), conn(), False),
    ("not source cidr", pset(allow(Match(not_source_ips=nets("10.1.0.0/16")))), conn(), False),
    ("destination ip", pset(allow(Match(destination_ips=nets("10.2.0.7/32")))), conn(), True),
    ("not destination ip", pset(allow(Match(not_destination_ips=nets("10.2.0.0/24")))), conn(), False),
    ("v6 source", pset(allow(Match(source_ips=nets("fd00::/8")))), conn(src="fd00::5", dst="fd01::7"), True),
    # all fields of a group must match
    ("group AND ok", pset(allow(Match(namespaces=s("client-ns"), destination_ports=(8080,)))), conn(), True),
    ("group AND one fails", pset(allow(Match(namespaces=s("client-ns"), destination_ports=(1,)))), conn(), False),
    ("positive and negative", pset(allow(Match(namespaces=s("*"), not_namespaces=s("client-ns")))), conn(), False),
    # groups in a clause are OR'ed; an empty group matches nothing
    ("groups OR'ed", pset(allow(Match(destination_ports=(1,)), Match(namespaces=s("client-ns")))), conn(), True),
    ("empty group matches nothing (ALLOW)", pset(allow(Match())), conn(), False),
    ("empty group matches nothing (DENY)", pset(deny(Match())), conn(), True),
    ("empty group beside a matching one", pset(allow(Match(), Match(principals=s("*")))), conn(), True),
    # rule / clause structure
    (
        "rule without clauses matches all",
        pset(Policy("all", "server-ns", Action.ALLOW, Scope.NAMESPACE, (Rule(),))),
        conn(None),
        True,
    ),
    (
        "clause without groups matches",
        pset(Policy("c", "server-ns", Action.ALLOW, Scope.NAMESPACE, (Rule((Clause(),)),))),
        conn(),
        True,
    ),
    (
        "policy without rules: ALLOW matches nothing",
        pset(Policy("none", "server-ns", Action.ALLOW, Scope.NAMESPACE)),
        conn(),
        False,
    ),
    (
        "policy without rules: DENY matches nothing",
        pset(Policy("none", "server-ns", Action.DENY, Scope.NAMESPACE)),
        conn(),
        True,
    ),
    (
        "clauses AND'ed",
        pset(
            Policy(
                "and",
                "server-ns",
                Action.ALLOW,
                Scope.NAMESPACE,
                (Rule((Clause((Match(destination_ports=(8080,)),)), Clause((Match(namespaces=s("other-ns")),)))),),
            )
        ),
        conn(),
        False,
    ),
    (
        "rules OR'ed",
        pset(
            Policy(
                "or",
                "server-ns",
                Action.ALLOW,
                Scope.NAMESPACE,
                (
                    Rule((Clause((Match(destination_ports=(1,)),)),)),
                    Rule((Clause((Match(destination_ports=(8080,)),)),)),
                ),
            )
        ),
        conn(),
        True,
    ),
    # DENY first, then ALLOW
    ("deny match", pset(deny(Match(namespaces=s("client-ns")))), conn(), False),
    ("deny no match -> no allow policies -> allow", pset(deny(Match(namespaces=s("x")))), conn(), True),
    ("deny beats allow", pset(allow(Match(principals=s("*"))), deny(Match(destination_ports=(8080,)))), conn(), False),
    (
        "allow any of several",
        pset(allow(Match(destination_ports=(1,)), name="a"), allow(Match(destination_ports=(8080,)), name="b")),
        conn(),
        True,
    ),
    (
        "allow none of several",
        pset(allow(Match(destination_ports=(1,)), name="a"), allow(Match(destination_ports=(2,)), name="b")),
        conn(),
        False,
    ),
    # scope
    (
        "namespace policy of another namespace ignored",
        pset(deny(Match(principals=s("*")), ns="elsewhere")),
        conn(),
        True,
    ),
    (
        "allow in another namespace does not restrict",
        pset(allow(Match(destination_ports=(1,)), ns="elsewhere")),
        conn(),
        True,
    ),
    ("global deny applies", pset(deny(Match(principals=s("*")), ns=ROOT, scope=Scope.GLOBAL)), conn(), False),
    ("global allow restricts", pset(allow(Match(destination_ports=(1,)), ns=ROOT, scope=Scope.GLOBAL)), conn(), False),
    ("root namespace-scoped policy is not global", pset(deny(Match(principals=s("*")), ns=ROOT)), conn(), True),
    (
        "selector match",
        pset(deny(Match(principals=s("*")), scope=Scope.WORKLOAD_SELECTOR, selector={"app": "server"})),
        conn(),
        False,
    ),
    (
        "selector miss",
        pset(deny(Match(principals=s("*")), scope=Scope.WORKLOAD_SELECTOR, selector={"app": "db"})),
        conn(),
        True,
    ),
    (
        "selector needs all labels",
        pset(deny(Match(principals=s("*")), scope=Scope.WORKLOAD_SELECTOR, selector={"app": "server", "v": "2"})),
        conn(),
        True,
    ),
    (
        "selector in root namespace applies",
        pset(deny(Match(principals=s("*")), ns=ROOT, scope=Scope.WORKLOAD_SELECTOR, selector={"app": "server"})),
        conn(),
        False,
    ),
    (
        "selector in third namespace ignored",
        pset(deny(Match(principals=s("*")), ns="third", scope=Scope.WORKLOAD_SELECTOR, selector={"app": "server"})),
        conn(),
        True,
    ),
]


@pytest.mark.parametrize(("policies", "connection", "allowed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_evaluate(policies: PolicySet, connection: Connection, allowed: bool) -> None:
    assert evaluate(connection, policies).allowed is allowed


def _pa(
    name: str,
    ns: str,
    mode: MtlsMode,
    selector: dict[str, str] | None = None,
    ports: dict[int, MtlsMode] | None = None,
    *,
    created: int | None = None,  # a year, for readable tables
) -> PeerAuthentication:
    when = None if created is None else datetime(created, 1, 1, tzinfo=UTC)
    return PeerAuthentication(
        name, ns, mode, MappingProxyType(selector or {}), MappingProxyType(ports or {}), created=when
    )


MESH_STRICT = _pa("mesh", ROOT, MtlsMode.STRICT)
NS_STRICT = _pa("ns", "server-ns", MtlsMode.STRICT)
NS_PERMISSIVE = _pa("ns", "server-ns", MtlsMode.PERMISSIVE)
NS_UNSET = _pa("ns", "server-ns", MtlsMode.UNSET)
WL = {"app": "server"}

MTLS_CASES: list[tuple[str, tuple[PeerAuthentication, ...], int, MtlsMode]] = [
    ("none -> permissive", (), 8080, MtlsMode.PERMISSIVE),
    ("mesh strict", (MESH_STRICT,), 8080, MtlsMode.STRICT),
    ("namespace strict", (NS_STRICT,), 8080, MtlsMode.STRICT),
    ("namespace strict in other ns", (_pa("ns", "elsewhere", MtlsMode.STRICT),), 8080, MtlsMode.PERMISSIVE),
    ("namespace permissive overrides mesh", (MESH_STRICT, NS_PERMISSIVE), 8080, MtlsMode.PERMISSIVE),
    ("namespace unset inherits mesh", (MESH_STRICT, NS_UNSET), 8080, MtlsMode.STRICT),
    (
        "workload strict over permissive ns",
        (NS_PERMISSIVE, _pa("wl", "server-ns", MtlsMode.STRICT, WL)),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "workload permissive over strict mesh",
        (MESH_STRICT, _pa("wl", "server-ns", MtlsMode.PERMISSIVE, WL)),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "workload selector miss",
        (MESH_STRICT, _pa("wl", "server-ns", MtlsMode.PERMISSIVE, {"app": "db"})),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "workload policy in root ns ignored",
        (MESH_STRICT, _pa("wl", ROOT, MtlsMode.PERMISSIVE, WL)),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "port exception permissive",
        (NS_STRICT, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {8080: MtlsMode.PERMISSIVE})),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "port exception on another port",
        (NS_STRICT, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {9090: MtlsMode.PERMISSIVE})),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "port exception disable",
        (MESH_STRICT, _pa("wl", "server-ns", MtlsMode.STRICT, WL, {8080: MtlsMode.DISABLE})),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "strict port in permissive workload",
        (_pa("wl", "server-ns", MtlsMode.PERMISSIVE, WL, {8080: MtlsMode.STRICT}),),
        8080,
        MtlsMode.STRICT,
    ),
    # Conflicts at one level: the oldest (creationTimestamp) wins, then the name; never the tuple's order.
    (
        "no timestamps: the name decides",
        (NS_PERMISSIVE, _pa("ns2", "server-ns", MtlsMode.STRICT)),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "no timestamps: the name decides, whatever the order",
        (_pa("ns2", "server-ns", MtlsMode.STRICT), NS_PERMISSIVE),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "oldest namespace policy wins over the name",
        (
            _pa("aa", "server-ns", MtlsMode.PERMISSIVE, created=2025),
            _pa("zz", "server-ns", MtlsMode.STRICT, created=2024),
        ),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "oldest workload policy wins over the name",
        (
            _pa("aa", "server-ns", MtlsMode.PERMISSIVE, WL, created=2025),
            _pa("zz", "server-ns", MtlsMode.STRICT, WL, created=2024),
        ),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "oldest workload policy's port modes, not a newer one's",
        (
            NS_STRICT,
            _pa("aa", "server-ns", MtlsMode.UNSET, WL, {8080: MtlsMode.PERMISSIVE}, created=2025),
            _pa("zz", "server-ns", MtlsMode.UNSET, WL, created=2024),
        ),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "oldest mesh policy wins over the name",
        (_pa("aa", ROOT, MtlsMode.PERMISSIVE, created=2025), _pa("zz", ROOT, MtlsMode.STRICT, created=2024)),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "same timestamp: the name decides",
        (
            _pa("b", "server-ns", MtlsMode.PERMISSIVE, created=2024),
            _pa("a", "server-ns", MtlsMode.STRICT, created=2024),
        ),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "no timestamp counts as the oldest (Go's zero time)",
        (_pa("a", "server-ns", MtlsMode.STRICT, created=2024), _pa("z", "server-ns", MtlsMode.PERMISSIVE)),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "an older policy of another level does not compete",
        (_pa("m", ROOT, MtlsMode.STRICT, created=2020), _pa("n", "server-ns", MtlsMode.PERMISSIVE, created=2025)),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    # Port DISABLE under an inherited STRICT, workload mode unset: plaintext accepted on that port, as the API
    # says and as istiod does beside a PERMISSIVE port; istiod alone leaves a lone DISABLE port STRICT
    # (policy.py's docstring, "One deliberate difference").
    (
        "port disable under inherited strict, workload mode unset",
        (NS_STRICT, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {8080: MtlsMode.DISABLE})),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "port disable under inherited mesh strict, workload mode unset",
        (MESH_STRICT, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {8080: MtlsMode.DISABLE})),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "port disable beside a permissive port, workload mode unset",
        (NS_STRICT, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {8080: MtlsMode.DISABLE, 9090: MtlsMode.PERMISSIVE})),
        8080,
        MtlsMode.PERMISSIVE,
    ),
    (
        "port disable leaves the other ports strict",
        (NS_STRICT, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {9090: MtlsMode.DISABLE})),
        8080,
        MtlsMode.STRICT,
    ),
    (
        "port strict under a permissive namespace, workload mode unset",
        (NS_PERMISSIVE, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {8080: MtlsMode.STRICT})),
        8080,
        MtlsMode.STRICT,
    ),
]


@pytest.mark.parametrize(("pas", "port", "mode"), [c[1:] for c in MTLS_CASES], ids=[c[0] for c in MTLS_CASES])
def test_effective_mtls(pas: tuple[PeerAuthentication, ...], port: int, mode: MtlsMode) -> None:
    assert effective_mtls("server-ns", WL, port, pset(pa=pas)).mode is mode


def test_effective_mtls_names_the_oldest_policy() -> None:
    older, newer = (
        _pa("zz", "server-ns", MtlsMode.STRICT, created=2024),
        _pa("aa", "server-ns", MtlsMode.STRICT, created=2025),
    )
    assert effective_mtls("server-ns", WL, 8080, pset(pa=(newer, older))).source == "server-ns/zz"


def test_peer_authentication_creation_time_must_name_its_zone() -> None:
    with pytest.raises(ValueError, match="timezone"):
        PeerAuthentication("pa", "ns", created=datetime(2024, 1, 1))  # naive: refused


@pytest.mark.parametrize("identity", [None, CLIENT], ids=["plaintext", "mtls"])
@pytest.mark.parametrize(
    ("pas", "port", "plaintext_allowed"),
    [
        ((), 8080, True),
        ((MESH_STRICT,), 8080, False),
        ((NS_STRICT, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {8080: MtlsMode.PERMISSIVE})), 8080, True),
        ((NS_STRICT, _pa("wl", "server-ns", MtlsMode.UNSET, WL, {8080: MtlsMode.PERMISSIVE})), 9090, False),
    ],
)
def test_strict_denies_only_plaintext(
    identity: Identity | None, pas: tuple[PeerAuthentication, ...], port: int, plaintext_allowed: bool
) -> None:
    verdict = evaluate(conn(identity, port=port), pset(pa=pas))
    assert verdict.allowed is (identity is not None or plaintext_allowed)
    if not verdict.allowed:
        assert "STRICT" in verdict.reason and verdict.policy is not None


def test_verdict_names_policy_and_rule() -> None:
    p = Policy(
        "ports",
        "server-ns",
        Action.DENY,
        Scope.NAMESPACE,
        (Rule((Clause((Match(destination_ports=(1,)),)),)), Rule((Clause((Match(destination_ports=(8080,)),)),))),
    )
    verdict = evaluate(conn(), pset(p))
    assert (verdict.allowed, verdict.policy, verdict.rule) == (False, "server-ns/ports", 1)
    assert "server-ns/ports" in verdict.reason
    allowed = evaluate(conn(), pset(allow(Match(principals=s("*")), name="ok")))
    assert (allowed.allowed, allowed.policy, allowed.rule) == (True, "server-ns/ok", 0)
    no_match = evaluate(conn(), pset(allow(Match(destination_ports=(1,)), name="narrow")))
    assert not no_match.allowed and "server-ns/narrow" in no_match.reason and CLIENT.uri in no_match.reason


def no_pod(ip: IPAddress) -> Pod | None:
    return None


def test_revalidate_returns_exactly_the_now_denied() -> None:
    open_conns = {
        "a": conn(CLIENT, port=8080),
        "b": conn(OTHER, port=8080),
        "c": conn(CLIENT, port=9090),
        "d": conn(None, port=8080),
    }
    assert revalidate(open_conns, pset(), no_pod) == {}
    new = pset(deny(Match(principals=s(CLIENT.principal), destination_ports=(8080,))), pa=(MESH_STRICT,))
    denied = revalidate(open_conns, new, no_pod)
    assert sorted(denied) == ["a", "d"]
    assert denied["a"].policy == "server-ns/p"
    assert "STRICT" in denied["d"].reason


def test_revalidate_judges_the_destination_as_it_is_now() -> None:
    """The destination pod's current labels decide, not those it had when the connection was authorized."""
    open_conns = {"a": conn(labels={"app": "server"})}
    deny_db = pset(deny(Match(principals=s("*")), scope=Scope.WORKLOAD_SELECTOR, selector={"app": "db"}))

    def server(labels: dict[str, str]) -> Callable[[IPAddress], Pod | None]:
        return lambda ip: Pod("server", "server-ns", "uid", "node", "sa", ip, MappingProxyType(labels))  # type: ignore[arg-type]

    assert revalidate(open_conns, deny_db, server({"app": "server"})) == {}
    assert revalidate(open_conns, deny_db, server({"app": "db"}))["a"].policy == "server-ns/p"
    assert revalidate({"b": conn(labels={"app": "db"})}, deny_db, server({"app": "server"})) == {}
    assert revalidate(open_conns, deny_db, no_pod) == {}  # no longer known: judged as it was


def test_string_match_parse_round_trips() -> None:
    for pattern in ("*", "abc*", "*abc", "abc", ""):
        assert str(StringMatch.parse(pattern)) == pattern


def test_service_account_match_defaults_to_policy_namespace() -> None:
    assert ServiceAccountMatch.parse("sa", "pol-ns") == ServiceAccountMatch("pol-ns", "sa")
    assert ServiceAccountMatch.parse("ns/sa", "pol-ns") == ServiceAccountMatch("ns", "sa")


@pytest.mark.parametrize(
    ("scope", "selector"),
    [(Scope.WORKLOAD_SELECTOR, {}), (Scope.NAMESPACE, {"app": "x"}), (Scope.GLOBAL, {"app": "x"})],
)
def test_scope_and_selector_must_agree(scope: Scope, selector: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="selector"):
        Policy("bad", "ns", Action.ALLOW, scope, (), MappingProxyType(selector))
