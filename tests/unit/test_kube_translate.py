"""inventory/translate.py: Kubernetes object dicts -> model values, as tables of plain dicts."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any

import pytest

from nodeagent.inventory import translate
from nodeagent.model import PodPhase, enrolled
from nodeagent.policy import Action, MtlsMode, PeerAuthentication, Policy, Scope, effective_mtls


def _pod(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
        "spec": {"nodeName": "node1", "serviceAccountName": "web", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}]},
    }
    for path, value in over.items():
        section, _, key = path.partition("__")
        if value is None:
            obj[section].pop(key, None)
        else:
            obj[section][key] = value
    return obj


@pytest.mark.parametrize(
    ("over", "field", "expected"),
    [
        ({}, "ip", ipaddress.IPv4Address("10.1.0.5")),
        ({"status__podIP": None, "status__podIPs": None}, "ip", None),
        (
            {"status__podIP": "fd00::5", "status__podIPs": [{"ip": "fd00::5"}, {"ip": "10.1.0.9"}]},
            "ip",
            ipaddress.IPv4Address("10.1.0.9"),
        ),
        ({}, "service_account", "web"),
        ({"spec__serviceAccountName": None}, "service_account", "default"),
        ({"spec__hostNetwork": True}, "host_network", True),
        ({}, "phase", PodPhase.RUNNING),
        ({"status__phase": None}, "phase", PodPhase.PENDING),
        ({"status__phase": "Unknown"}, "phase", PodPhase.RUNNING),
        ({"status__phase": "Succeeded"}, "phase", PodPhase.SUCCEEDED),
        ({"spec__nodeName": None}, "node", ""),
        ({}, "uid", "u-1"),
        ({}, "redirection", None),
        ({"metadata__annotations": {"ambient.istio.io/redirection": "enabled", "x": "y"}}, "redirection", "enabled"),
    ],
)
def test_pod_fields(over: dict[str, Any], field: str, expected: object) -> None:
    assert getattr(translate.pod(_pod(**over)), field) == expected


def _owned(kind: str, name: str, controller: object = True) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "o-1", "controller": controller}


_RS = "web-7d9f8c6b5"  # a Deployment "web"'s ReplicaSet, pod-template-hash 7d9f8c6b5


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        # Istio's GetDeployMetaFromPod: a Deployment's pods carry the Deployment's name...
        (
            {
                "generateName": f"{_RS}-",
                "labels": {"pod-template-hash": "7d9f8c6b5"},
                "ownerReferences": [_owned("ReplicaSet", _RS)],
            },
            "web",
        ),
        # ...a bare ReplicaSet's (no hash label, or one its name does not end with) the ReplicaSet's.
        ({"generateName": f"{_RS}-", "ownerReferences": [_owned("ReplicaSet", _RS)]}, _RS),
        (
            {
                "generateName": f"{_RS}-",
                "labels": {"pod-template-hash": "other"},
                "ownerReferences": [_owned("ReplicaSet", _RS)],
            },
            _RS,
        ),
        # A CronJob's Job is named <cronjob>-<8..10 digits>; any other Job is its own workload.
        ({"generateName": "backup-29012345-", "ownerReferences": [_owned("Job", "backup-29012345")]}, "backup"),
        ({"generateName": "migrate-", "ownerReferences": [_owned("Job", "migrate")]}, "migrate"),
        ({"generateName": "db-", "ownerReferences": [_owned("StatefulSet", "db")]}, "db"),
        # Only the controller counts; without one, or without a generated name, the pod is its own workload.
        ({"generateName": "x-", "ownerReferences": [_owned("ReplicaSet", "rs", controller=False)]}, "web-1"),
        ({"generateName": "x-"}, "web-1"),
        ({"ownerReferences": [_owned("StatefulSet", "db")]}, "web-1"),
    ],
)
def test_pod_workload_name_follows_istio(meta: dict[str, Any], expected: str) -> None:
    obj = _pod()
    obj["metadata"].update(meta)
    assert translate.pod(obj).workload == expected


def test_pod_labels_are_frozen_strings() -> None:
    p = translate.pod(_pod())
    assert dict(p.labels) == {"app": "web"}
    with pytest.raises(TypeError):
        p.labels["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"status__phase": "Exploded"}, "status.phase"),
        ({"status__podIP": "ten.one"}, "is not an IP address"),
        ({"spec__hostNetwork": "yes"}, "spec.hostNetwork"),
        ({"metadata__uid": None}, "metadata.uid"),
        ({"metadata__labels": {"a": 1}}, "metadata.labels"),
        ({"metadata__annotations": {"ambient.istio.io/redirection": True}}, "metadata.annotations"),
        ({"metadata__generateName": "w-", "metadata__ownerReferences": {"kind": "Job"}}, "ownerReferences"),
        ({"metadata__generateName": "w-", "metadata__ownerReferences": [{"controller": True}]}, "ownerReferences"),
    ],
)
def test_bad_pods_name_the_field(over: dict[str, Any], message: str) -> None:
    with pytest.raises(translate.TranslateError, match=message):
        translate.pod(_pod(**over))


def test_the_redirection_annotation_is_read_but_does_not_make_the_pod_differ() -> None:
    """The agent's own status writes come back through the watch; they must not look like a pod change."""
    annotated = translate.pod(_pod(metadata__annotations={"ambient.istio.io/redirection": "pending"}))
    assert annotated.redirection == "pending" and annotated == translate.pod(_pod())


def test_namespace_and_enrollment() -> None:
    ns = translate.namespace(
        {"kind": "Namespace", "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}
    )
    assert enrolled(translate.pod(_pod()), ns)
    assert not enrolled(translate.pod(_pod(spec__hostNetwork=True)), ns)
    # Injected with Istio's sidecar: istio-cni never redirects it (two captures would fight over 15001/15006).
    injected = _pod(metadata__annotations={"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'})
    assert not enrolled(translate.pod(injected), ns)


def test_service_ports_vip_and_named_target_ports() -> None:
    svc = translate.service(
        {
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "selector": {"app": "web"},
                "clusterIP": "10.96.0.10",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"port": 81},
                    {"port": 82, "targetPort": "http-alt"},
                    {"port": 53, "protocol": "UDP"},
                ],
            },
        }
    )
    assert [(p.port, p.target_port, p.target_port_name) for p in svc.ports] == [
        (80, 8080, ""),
        (81, 81, ""),
        (82, 0, "http-alt"),  # resolved per endpoint pod, from its containers' named ports
    ]
    assert svc.vip == ipaddress.IPv4Address("10.96.0.10")


@pytest.mark.parametrize(
    ("spec", "vip"),
    [
        ({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::a"]}, "10.96.0.10"),
        # Dual-stack, IPv6 first (ipFamilies [IPv6, IPv4]): the IPv4 VIP reaches the service just as well. Left
        # out, a meshed client's connection to it was passed through in plaintext (kube-proxy then picks a pod).
        ({"clusterIP": "fd00:96::a", "clusterIPs": ["fd00:96::a", "10.96.0.10"]}, "10.96.0.10"),
        ({"clusterIP": "fd00:96::a", "clusterIPs": ["fd00:96::a"]}, None),  # IPv6 only
        ({"clusterIP": "None", "clusterIPs": ["None"]}, None),  # headless
        ({"clusterIPs": ["10.96.0.11"]}, "10.96.0.11"),
    ],
)
def test_service_vip_is_its_ipv4_cluster_ip(spec: dict[str, Any], vip: str | None) -> None:
    svc = translate.service({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": spec})
    assert svc.vip == (ipaddress.IPv4Address(vip) if vip else None)


def test_service_cluster_ips_must_be_addresses() -> None:
    with pytest.raises(translate.TranslateError, match=r"spec\.clusterIP 'x' is not an IP address"):
        translate.service(
            {"kind": "Service", "metadata": {"name": "w", "namespace": "s"}, "spec": {"clusterIPs": ["x"]}}
        )


def test_pod_readiness_deletion_and_named_ports() -> None:
    """What service routing needs of a pod (not compared: a readiness flip is not a pod change)."""
    ready = translate.pod(_pod())
    assert (ready.ready, ready.terminating, dict(ready.container_ports)) == (True, False, {})
    pod = translate.pod(
        _pod(
            metadata__deletionTimestamp="2026-11-21T10:00:00Z",
            status__conditions=[{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
            spec__containers=[
                {"name": "app", "ports": [{"name": "http-alt", "containerPort": 9090}, {"containerPort": 7}]},
                {"name": "dns", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
            ],
            spec__initContainers=[{"name": "proxy", "ports": [{"name": "admin", "containerPort": 15000}]}],
        )
    )
    assert (pod.ready, pod.terminating) == (False, True)
    assert dict(pod.container_ports) == {"http-alt": 9090, "admin": 15000}
    assert pod == ready


def test_headless_service_has_no_vip() -> None:
    svc = translate.service(
        {"kind": "Service", "metadata": {"name": "h", "namespace": "s"}, "spec": {"clusterIP": "None"}}
    )
    assert svc.vip is None and svc.ports == ()


def _authz(spec: Any, ns: str = "shop", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": ns}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"kind": "AuthorizationPolicy", "metadata": meta, "spec": spec}


def test_policy_translates_through_policies_module() -> None:
    result = translate.policy(_authz({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}))
    assert result.problem is None
    assert isinstance(result.value, Policy)
    assert result.value.action is Action.DENY and result.value.scope is Scope.NAMESPACE


@pytest.mark.parametrize(
    ("spec", "action", "rules"),
    [
        ({"action": "DENY", "surprise": 1}, Action.DENY, 1),  # unknown field -> deny-all in scope
        ({"action": "ALLOW", "surprise": 1}, Action.ALLOW, 0),  # -> ALLOW that matches nothing
        ({"action": "DENY", "rules": [{"from": [{"source": {"typo": ["x"]}}]}]}, Action.DENY, 1),
        ({"action": None, "surprise": 1}, Action.ALLOW, 0),  # a null action is ALLOW
        ({"action": "REJECT"}, Action.ALLOW, 0),
        ({"action": ["DENY"]}, Action.ALLOW, 0),
        ("not a mapping", Action.ALLOW, 0),
    ],
)
def test_untranslatable_policies_fail_closed(spec: Any, action: Action, rules: int) -> None:
    result = translate.policy(_authz(spec))
    assert result.problem is not None and "until fixed" in result.problem
    assert result.problem.count("AuthorizationPolicy shop/p") == 1, result.problem  # named once
    assert isinstance(result.value, Policy)
    assert result.value.action is action and len(result.value.rules) == rules


@pytest.mark.parametrize(
    ("spec", "ns", "annotations", "words"),
    [
        # One AUDIT policy in the root namespace used to become a global ALLOW matching nothing: a mesh-wide deny.
        ({"action": "AUDIT", "rules": [{}]}, "istio-system", None, "action AUDIT"),
        ({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]}, "shop", None, "action CUSTOM"),
        ({"action": "CUSTOM", "surprise": 1}, "shop", None, "action CUSTOM"),  # ignored before the fields
        ({"action": "DENY", "rules": [{}]}, "shop", {"istio.io/dry-run": "true"}, "dry-run"),
        ({"action": "DENY", "surprise": 1}, "shop", {"istio.io/dry-run": "TRUE"}, "dry-run"),
        ({"targetRefs": [{"kind": "Service", "name": "wp"}], "surprise": 1}, "shop", None, "targetRef"),
    ],
)
def test_policies_istiod_never_sends_ztunnel_are_ignored_and_reported(
    spec: dict[str, Any], ns: str, annotations: dict[str, str] | None, words: str
) -> None:
    result = translate.policy(_authz(spec, ns, annotations))
    assert result.value is None
    assert result.problem is not None and words in result.problem and "ignored" in result.problem
    assert result.problem.startswith(f"AuthorizationPolicy {ns}/p: ")


@pytest.mark.parametrize(
    ("annotations", "problem"),
    [
        ({"istio.io/dry-run": "false"}, None),
        ({"istio.io/dry-run": ""}, None),
        ({"istio.io/dry-run": "yes"}, "is not a boolean"),  # istiod enforces it, logging the error
    ],
)
def test_policies_not_in_dry_run_are_enforced(annotations: dict[str, str], problem: str | None) -> None:
    result = translate.policy(_authz({"action": "DENY", "rules": [{}]}, annotations=annotations))
    assert isinstance(result.value, Policy) and result.value.action is Action.DENY
    assert result.problem is None if problem is None else problem in (result.problem or "")


@pytest.mark.parametrize("spec", [{"rules": [{}]}, {"action": None, "rules": [{}]}])
def test_a_missing_or_null_action_is_allow(spec: dict[str, Any]) -> None:
    result = translate.policy(_authz(spec))
    assert result.problem is None
    assert isinstance(result.value, Policy) and result.value.action is Action.ALLOW and len(result.value.rules) == 1


def _peer(name: str, mode: str, created: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop"}
    if created is not None:
        meta["creationTimestamp"] = created
    return {"kind": "PeerAuthentication", "metadata": meta, "spec": {"mtls": {"mode": mode}}}


def test_peer_authentication_creation_time_decides_conflicts() -> None:
    """The oldest of two namespace-wide PeerAuthentications wins (Istio), not the first by name."""
    older = translate.policy(_peer("zz-strict", "STRICT", "2024-01-01T00:00:00Z"))
    newer = translate.policy(_peer("aa-permissive", "PERMISSIVE", "2025-01-01T00:00:00Z"))
    assert isinstance(older.value, PeerAuthentication)
    assert older.value.created == datetime(2024, 1, 1, tzinfo=UTC)
    policies = translate.policy_set([newer.value, older.value])  # type: ignore[list-item]
    mtls = effective_mtls("shop", {}, 8080, policies)
    assert (mtls.mode, mtls.source) == (MtlsMode.STRICT, "shop/zz-strict")
    # A broken PeerAuthentication, enforced STRICT, keeps its creation time: a newer one still loses.
    broken = translate.policy(_peer("aa-broken", "SOMETIMES", "2026-01-01T00:00:00Z"))
    assert isinstance(broken.value, PeerAuthentication) and broken.value.created == datetime(2026, 1, 1, tzinfo=UTC)
    assert broken.problem is not None and broken.problem.count("PeerAuthentication shop/aa-broken") == 1
    permissive = translate.policy(_peer("zz", "PERMISSIVE", "2024-01-01T00:00:00Z"))
    both = translate.policy_set([broken.value, permissive.value])  # type: ignore[list-item]
    assert effective_mtls("shop", {}, 8080, both).mode is MtlsMode.PERMISSIVE
    # An unreadable timestamp: the stand-in counts as the oldest, so STRICT wins its level.
    bad_time = translate.policy(_peer("zz-bad", "PERMISSIVE", "last tuesday"))
    assert isinstance(bad_time.value, PeerAuthentication) and bad_time.value.mode is MtlsMode.STRICT
    assert bad_time.problem is not None and "creationTimestamp" in bad_time.problem
    with_bad = translate.policy_set([bad_time.value, permissive.value])  # type: ignore[list-item]
    assert effective_mtls("shop", {}, 8080, with_bad).mode is MtlsMode.STRICT


def test_waypoint_bound_policies_are_ignored() -> None:
    result = translate.policy(_authz({"targetRefs": [{"kind": "Gateway", "name": "wp"}], "action": "DENY"}))
    assert result.value is None and result.problem is not None and "waypoint" in result.problem
    # An empty targetRefs (templates emit it; the API server keeps it) or a null targetRef binds nothing: the
    # policy is the node tunnel's, in this path as in the file path (a DENY was dropped here before).
    for unbound in ({"targetRefs": []}, {"targetRef": None}):
        result = translate.policy(_authz({**unbound, "action": "DENY"}))
        assert isinstance(result.value, Policy) and result.value.action is Action.DENY, result


def test_peer_authentication_and_fail_closed_strict() -> None:
    ok = translate.policy(
        {
            "kind": "PeerAuthentication",
            "metadata": {"name": "pa", "namespace": "shop"},
            "spec": {"mtls": {"mode": "STRICT"}},
        }
    )
    assert isinstance(ok.value, PeerAuthentication) and ok.value.mode is MtlsMode.STRICT
    bad = translate.policy(
        {
            "kind": "PeerAuthentication",
            "metadata": {"name": "pa", "namespace": "shop"},
            "spec": {"mtls": {"mode": "SOMETIMES"}},
        }
    )
    assert isinstance(bad.value, PeerAuthentication) and bad.value.mode is MtlsMode.STRICT and bad.problem


def test_inventory_assembly_is_sorted_and_names_nodes() -> None:
    pods = [
        translate.pod(_pod()),
        translate.pod(_pod(metadata__name="a-0", metadata__uid="u-0", spec__nodeName="node2")),
    ]
    inv = translate.inventory(pods=pods, namespaces=[], nodes=("node9",), trust_domain="example.org")
    assert [p.name for p in inv.pods] == ["a-0", "web-1"]
    assert [n.name for n in inv.nodes] == ["node1", "node2", "node9"]
    assert inv.trust_domain == "example.org"
    assert inv.pods_on("node2")[0].name == "a-0"
    ps = translate.policy_set(
        [
            translate.policy(_authz({"action": "DENY"}, ns="b")).value,
            translate.policy(_authz({"action": "DENY"}, ns="a")).value,
        ]
    )  # type: ignore[list-item]
    assert [p.namespace for p in ps.authorization] == ["a", "b"]
