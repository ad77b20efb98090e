"""The Istio-YAML -> PolicySet translator, checked by evaluating the result (policy.evaluate) on plain
connections: the oracle is Istio's documented behaviour, not the shape of the translated values."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest
import yaml

from nodeagent.inventory.policies import PolicyError, load_policies, parse_policies
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


def ap(spec: str, ns: str = "shop", annotations: str = "") -> str:
    extra = f", annotations: {annotations}" if annotations else ""
    return f"kind: AuthorizationPolicy\nmetadata: {{name: p, namespace: {ns}{extra}}}\nspec: {spec}\n"


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
        # A missing or null action is ALLOW (the API's default).
        ("{action: null, rules: [{from: [{source: {namespaces: [shop]}}]}]}", True, False),
        ("{action: ALLOW, rules: [{from: [{source: {namespaces: [shop]}}]}]}", True, False),
        # source.serviceAccount is no L4 `when` key for istiod (l4WhenAttributes): an ALLOW rule using it is
        # dropped whole; a DENY rule loses it, like any HTTP-only part (REFERENCE.md).
        ("{rules: [{when: [{key: source.serviceAccount, values: [shop/client]}]}]}", False, False),
        ("{rules: [{when: [{key: source.serviceAccount, notValues: [other/intruder]}]}]}", False, False),
        ("{action: DENY, rules: [{when: [{key: source.serviceAccount, values: [shop/client]}]}]}", False, False),
        (
            "{action: DENY, rules: [{from: [{source: {namespaces: [other]}}], "
            "when: [{key: source.serviceAccount, values: [shop/client]}]}]}",
            True,
            False,
        ),
        # CUSTOM and AUDIT never reach ztunnel: ignored, not an ALLOW that matches nothing (a deny-all).
        ("{action: AUDIT, rules: [{}]}", True, True),
        ("{action: CUSTOM, provider: {name: ext-authz}, rules: [{to: [{operation: {paths: [/admin]}}]}]}", True, True),
    ],
)
def test_authorization_translation(spec: str, client: bool, other: bool) -> None:
    assert (allowed(ap(spec), CLIENT), allowed(ap(spec), OTHER)) == (client, other)


@pytest.mark.parametrize(
    ("annotation", "enforced"),
    [
        ("{istio.io/dry-run: 'true'}", False),
        ("{istio.io/dry-run: 'True'}", False),
        ("{istio.io/dry-run: '1'}", False),
        ("{istio.io/dry-run: true}", False),  # unquoted in a local file
        ("{istio.io/dry-run: 'false'}", True),
        ("{istio.io/dry-run: ''}", True),
        ("{istio.io/dry-run: 'yes'}", True),  # not a Go boolean: istiod enforces it (with a note, below)
        ("{other: 'true'}", True),
    ],
)
def test_dry_run_policies_are_not_enforced(annotation: str, enforced: bool) -> None:
    text = ap("{action: DENY, rules: [{}]}", annotations=annotation)
    assert allowed(text, CLIENT) is not enforced
    assert len(parse_policies(list(yaml.safe_load_all(text))).authorization) == int(enforced)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (ap("{action: AUDIT, rules: [{}]}", ns="istio-system"), "action AUDIT"),
        (ap("{action: CUSTOM, provider: {name: x}}"), "action CUSTOM"),
        (ap("{action: DENY}", annotations="{istio.io/dry-run: 'true'}"), "dry-run"),
        (ap("{targetRefs: [{kind: Service, group: '', name: wp}]}"), "targetRef"),
        (ap("{action: DENY}", annotations="{istio.io/dry-run: 'yes'}"), "is not a boolean"),
    ],
)
def test_left_out_policies_are_noted(text: str, words: str) -> None:
    notes: list[str] = []
    parse_policies(list(yaml.safe_load_all(text)), notes=notes)
    assert len(notes) == 1 and notes[0].startswith("AuthorizationPolicy ") and words in notes[0], notes


def test_load_policies_logs_what_it_leaves_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(ap("{action: AUDIT, rules: [{}]}", ns="istio-system") + "---\n" + ap("{action: DENY}"))
    with caplog.at_level(logging.WARNING, logger="nodeagent.inventory.policies"):
        policies = load_policies(path)
    assert [p.action.value for p in policies.authorization] == ["DENY"]
    assert "istio-system/p: action AUDIT" in caplog.text and str(path) in caplog.text


def pa(name: str, mode: str, created: str = "", selector: str = "") -> str:
    stamp = f", creationTimestamp: {created}" if created else ""
    sel = f"selector: {{matchLabels: {selector}}}, " if selector else ""
    meta = f"{{name: {name}, namespace: shop{stamp}}}"
    return f"kind: PeerAuthentication\nmetadata: {meta}\nspec: {{{sel}mtls: {{mode: {mode}}}}}\n"


@pytest.mark.parametrize(
    ("docs", "plaintext_allowed"),
    [
        # The oldest wins, whatever the names and the documents' order (Istio: getOldestPeerAuthn).
        ([pa("aa", "PERMISSIVE", "'2025-01-01T00:00:00Z'"), pa("zz", "STRICT", "'2024-01-01T00:00:00Z'")], False),
        ([pa("aa", "STRICT", "'2025-01-01T00:00:00Z'"), pa("zz", "PERMISSIVE", "'2024-01-01T00:00:00Z'")], True),
        ([pa("aa", "PERMISSIVE", "2025-01-01T00:00:00Z"), pa("zz", "STRICT", "2024-06-01T10:00:00+02:00")], False),
        (
            [
                pa("aa", "PERMISSIVE", "'2025-01-01T00:00:00Z'", "{app: s}"),
                pa("zz", "STRICT", "'2024-01-01T00:00:00Z'", "{app: s}"),
            ],
            False,
        ),
        # Same second: the name decides; no timestamps (the usual local file): the name decides.
        ([pa("b", "PERMISSIVE", "'2024-01-01T00:00:00Z'"), pa("a", "STRICT", "'2024-01-01T00:00:00Z'")], False),
        ([pa("b", "PERMISSIVE"), pa("a", "STRICT")], False),
    ],
)
def test_conflicting_peer_authentications_oldest_wins(docs: list[str], plaintext_allowed: bool) -> None:
    assert allowed("---\n".join(docs), None) is plaintext_allowed


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
        ap("{action: REJECT}"),
        ap("{action: deny}"),
        ap("{}", annotations="[not, a, mapping]"),
        pa("a", "STRICT", "'last tuesday'"),
        ap("{rules: [{from: [{source: {principal: [typo]}}]}]}"),
        ap("{rules: [{to: [{operation: {ports: ['http']}}]}]}"),
        ap("{rules: [{from: [{source: {ipBlocks: [not-an-ip]}}]}]}"),
        "kind: AuthorizationPolicy\nspec: {}",
    ],
)
def test_errors_name_the_problem(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policies(list(yaml.safe_load_all(text)))
