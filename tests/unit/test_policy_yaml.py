"""The Istio-YAML -> PolicySet translator, checked by evaluating the result (policy.evaluate) on plain
connections: the oracle is Istio's documented behaviour, not the shape of the translated values."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from nodeagent.inventory.policies import PolicyError, parse_policies
from nodeagent.model import Identity, SocketAddress
from nodeagent.policy import Connection, MtlsMode, Scope, evaluate

SERVER = SocketAddress(ipaddress.IPv4Address("10.0.0.2"), 8080)
CLIENT = Identity("cluster.local", "shop", "client")
OTHER = Identity("cluster.local", "other", "intruder")


def allowed(text: str, identity: Identity | None, port: int = 8080, labels: dict[str, str] | None = None) -> bool:
    policies = parse_policies(list(yaml.safe_load_all(text)))
    conn = Connection(
        ipaddress.IPv4Address("10.0.0.1"), SocketAddress(SERVER.ip, port), identity, "shop", labels or {"app": "s"}
    )
    return evaluate(conn, policies).allowed


def ap(spec: str, ns: str = "shop") -> str:
    return f"kind: AuthorizationPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec: {spec}\n"


@pytest.mark.parametrize(
    ("spec", "client", "other"),
    [
        ("{rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}", True, False),
        ("{action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}]}]}", True, False),
        ("{rules: [{from: [{source: {serviceAccounts: [client]}}]}]}", True, False),
        ("{rules: [{when: [{key: source.namespace, values: [other]}]}]}", False, True),
        ("{}", False, False),  # an ALLOW policy without rules allows nothing
        ("{rules: [{}]}", True, True),  # a rule without clauses matches everything
        ("{rules: [{to: [{operation: {paths: [/admin]}}]}]}", False, False),  # HTTP-only ALLOW rule: dropped
        (
            "{action: DENY, rules: [{from: [{source: {namespaces: [other]}}], to: [{operation: {methods: [GET]}}]}]}",
            True,
            False,
        ),
        # An empty list is an unset field (protobuf): `methods: []` does not make the rule an HTTP rule.
        ("{rules: [{to: [{operation: {ports: ['8080'], methods: []}}]}]}", True, True),
        (
            "{rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client], requestPrincipals: []}}]}]}",
            True,
            False,
        ),
        # A waypoint's (targetRefs) or gateway's (targetRef) policy is not the node tunnel's: an ALLOW that would
        # bind the whole namespace with its HTTP rule dropped, i.e. deny everything, is left out instead.
        (
            "{targetRefs: [{kind: Service, group: '', name: wp}], rules: [{to: [{operation: {methods: [GET]}}]}]}",
            True,
            True,
        ),
        ("{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}, action: DENY}", True, True),
    ],
)
def test_authorization_translation(spec: str, client: bool, other: bool) -> None:
    assert (allowed(ap(spec), CLIENT), allowed(ap(spec), OTHER)) == (client, other)


def test_ports_and_selector_scope() -> None:
    text = ap("{selector: {matchLabels: {app: s}}, rules: [{to: [{operation: {ports: ['9090']}}]}]}")
    [policy] = parse_policies(list(yaml.safe_load_all(text))).authorization
    assert policy.scope is Scope.WORKLOAD_SELECTOR
    assert (allowed(text, CLIENT, 9090), allowed(text, CLIENT, 8080)) == (True, False)
    assert allowed(text, CLIENT, 8080, labels={"app": "unselected"})  # the policy does not apply there
    [root] = parse_policies(list(yaml.safe_load_all(ap("{}", ns="istio-system")))).authorization
    assert root.scope is Scope.GLOBAL
    gateway = ap("{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]}", ns="istio-system")
    assert parse_policies(list(yaml.safe_load_all(gateway))).authorization == ()  # not a mesh-wide deny-all


def test_peer_authentication_strict_with_port_exception() -> None:
    text = (
        "kind: PeerAuthentication\nmetadata: {name: d, namespace: shop}\n"
        "spec: {selector: {matchLabels: {app: s}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: PERMISSIVE}}}"
    )
    [pa] = parse_policies(list(yaml.safe_load_all(text))).peer_authentication
    assert pa.mode is MtlsMode.STRICT and pa.port_modes == {9090: MtlsMode.PERMISSIVE}
    assert not allowed(text, None, 8080)
    assert allowed(text, None, 9090)
    assert allowed(text, CLIENT, 8080)


@pytest.mark.parametrize(
    "text",
    [
        "kind: Sidecar\nmetadata: {name: a, namespace: b}",
        ap("{action: CUSTOM}"),
        ap("{rules: [{from: [{source: {principal: [typo]}}]}]}"),
        ap("{rules: [{to: [{operation: {ports: ['http']}}]}]}"),
        ap("{rules: [{from: [{source: {ipBlocks: [not-an-ip]}}]}]}"),
        "kind: AuthorizationPolicy\nspec: {}",
    ],
)
def test_errors_name_the_problem(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policies(list(yaml.safe_load_all(text)))
