"""daemonset/rbac.yaml against every API call the code makes: enough, and nothing more.

The agent, the tunnel, the CA and the operator's commands run through the real `kubernetes` client against
the API-server stand-in with RBAC on (tests/kube_standin.py: `Rbac` of daemonset/rbac.yaml's own roles and
bindings; the operator is bound to the nodeagent-operator roles as rbac.yaml's comment tells operators to
do). Each runs until it has done its whole job - listed and watched what it needs, patched a pod's status,
reviewed a token, labelled a namespace, port-forwarded to a node's admin port - and then:

- no request was denied: a call the manifests do not grant is a 403 in a real cluster (an agent that never
  turns Ready, a tunnel that never serves), which no other test would see: the stand-in authorizes nothing
  unless asked to;
- every rule of every role is used by some request of its subject: a grant nothing needs is privilege a
  compromised node agent would hold for nothing (`nodeagent-system/nodeagent` runs on every node).

Oracles: the stand-in's record of each request's authorization attributes, and its store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_standin import (
    KubeStandIn,
    Rbac,
    RbacRule,
    RequestAttributes,
    authorization_policy,
    namespace,
    pod,
    request_attributes,
    service,
)

from nodeagent.agent import service as agent_service
from nodeagent.agent.kube_agent import KubeAgent, KubeSettings
from nodeagent.agent.kube_status import REDIRECTION_ANNOTATION
from nodeagent.ca.kube import kubernetes_edges
from nodeagent.capture.iptables import Flavour
from nodeagent.cli import main
from nodeagent.inventory import kube
from nodeagent.kube_remote import TUNNEL_ADMIN_PORT, all_config_dumps, fetch_config_dump
from nodeagent.ztunnel.zds_client import Backoff, ZdsClient

RBAC_YAML = Path(__file__).resolve().parents[2] / "daemonset" / "rbac.yaml"
NODE_ACCOUNT = "system:serviceaccount:nodeagent-system:nodeagent"  # the DaemonSet's agent and tunnel
CA_ACCOUNT = "system:serviceaccount:nodeagent-system:nodeagent-ca"
OPERATOR = "alice"
TOKENS = {"node-token": NODE_ACCOUNT, "ca-token": CA_ACCOUNT, "alice-token": OPERATOR}
NODE_IP = "10.250.0.1"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def rbac() -> Rbac:
    """rbac.yaml as applied, plus the operator's bindings its comment tells operators to create."""
    r = Rbac([d for d in yaml.safe_load_all(RBAC_YAML.read_text()) if d])
    r.bind(OPERATOR, {"kind": "ClusterRole", "name": "nodeagent-operator"})
    r.bind(OPERATOR, {"kind": "Role", "name": "nodeagent-operator"}, "nodeagent-system")
    return r


@pytest.fixture
def api() -> Iterator[KubeStandIn]:
    s = KubeStandIn(bookmark_interval=0.2)
    s.rbac = rbac()
    s.users.update(TOKENS)
    s.apply(namespace("nodeagent-system"))
    s.apply(namespace("shop", AMBIENT))
    s.apply(namespace("legacy"))
    agent_pod = pod(
        "nodeagent-x7k2p", "nodeagent-system", "node1", NODE_IP, sa="nodeagent", labels={"app": "nodeagent"}
    )
    agent_pod["spec"]["hostNetwork"] = True
    s.apply(agent_pod)
    s.apply(pod("web-1", "shop", "node1", "10.1.0.5", sa="web", uid="uid-web-1", labels={"app": "web"}))
    s.apply(pod("batch-1", "legacy", "node1", "10.1.0.6"))
    s.apply(service("web", "shop", {"app": "web"}, [(80, 8080)], "10.96.0.10"))
    s.apply(authorization_policy("allow-web", "shop", {"action": "ALLOW", "rules": [{}]}))
    yield s
    s.close()


async def until(check: Any, limit: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def watching(api: KubeStandIn, *kinds: str) -> bool:
    return all(api.watch_count(kind) >= 1 for kind in kinds)


async def run_agent(api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nodeagent agent --kubernetes`: this node's pods and every namespace, the redirection annotation."""
    from agent_fakes import AckingTunnel, FakeCapture, NoProbes

    monkeypatch.setattr(agent_service.IptablesBackend, "for_host", lambda flavour: FakeCapture())
    monkeypatch.setattr(agent_service, "ProbeBypass", NoProbes)
    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "na-node1.shop.web-1").touch()
    sock = str(tmp_path / "zds.sock")
    config = agent_service.AgentConfig(
        node="node1", inventory=tmp_path / "unused.yaml", zds_socket=sock, state_dir=tmp_path / "state",
        netns_dir=str(tmp_path / "netns"), verify_interval=600, metrics=None,
    )  # fmt: skip
    settings = KubeSettings(client=lambda: api.api_client("node-token"), netns="pattern", admin=None)
    agent = KubeAgent(config, Flavour.NFT, settings=settings)
    tunnel = ZdsClient(AckingTunnel(), sock, backoff=Backoff(0.05, 0.2))
    tunnel.start()
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        await until(lambda: agent.readiness_pending() is None, what="the agent to be ready")
        await until(lambda: watching(api, "Pod", "Namespace"), what="the agent's watches")
        web = lambda: (api.get("Pod", "web-1", "shop") or {})["metadata"].get("annotations") or {}  # noqa: E731
        await until(lambda: web().get(REDIRECTION_ANNOTATION) == "enabled", what="web-1's annotation")
    finally:
        stop.set()
        assert await running == 0
        await tunnel.close()


def run_tunnel(api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nodeagent tunnel --kubernetes` (its kubeconfig here; in the pod, the same account's token)."""
    started: list[kube.KubeSource] = []

    class Recorded(kube.KubeSource):
        def start(self) -> kube.KubeSource:
            started.append(self)
            return super().start()

    monkeypatch.setattr(kube, "KubeSource", Recorded)
    kubeconfig = api.kubeconfig(str(tmp_path / "tunnel.kubeconfig"), token="node-token")
    try:
        current, policies = kube.kube_tunnel_source(Path(kubeconfig), None, "cluster.local", sync_timeout=5)
        assert {p.name for p in current().pods} >= {"web-1", "batch-1"} and len(current().services) == 1
        assert [p.name for p in policies().authorization] == ["allow-web"]
        asyncio.run(_until_watching(api, "Pod", "Namespace", "Service", "AuthorizationPolicy", "PeerAuthentication"))
    finally:
        for source in started:
            source.stop()


async def _until_watching(api: KubeStandIn, *kinds: str) -> None:
    await until(lambda: watching(api, *kinds), what=f"watches of {kinds}")


def run_ca(api: KubeStandIn) -> None:
    """`nodeagent ca serve --kubernetes`: every pod (node authorization), a TokenReview per request."""
    api.tokens["agent-projected-token"] = {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": {
            "username": NODE_ACCOUNT,
            "extra": {
                "authentication.kubernetes.io/pod-name": ["nodeagent-x7k2p"],
                "authentication.kubernetes.io/pod-uid": [
                    api.get("Pod", "nodeagent-x7k2p", "nodeagent-system")["metadata"]["uid"]
                ],  # type: ignore[index]
                "authentication.kubernetes.io/node-name": ["node1"],
            },
        },
    }
    edges = kubernetes_edges(trust_domain="cluster.local", client=api.api_client("ca-token"), sync_timeout=5)
    try:
        caller = edges.authenticator.authenticate("agent-projected-token")
        assert caller.node == "node1" and caller.pod_name == "nodeagent-x7k2p"
        assert any(p.name == "web-1" for p in edges.pods_on_node("node1"))
        asyncio.run(_until_watching(api, "Pod", "Namespace"))
    finally:
        edges.source.stop()


class ConfigDump(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"workloads": []}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def run_operator(api: KubeStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`nodeagent enroll|unenroll NS`, `nodeagent inspect ... --node NODE` and `ca rotate status`, as the
    operator."""
    kubeconfig = api.kubeconfig(str(tmp_path / "alice.kubeconfig"), token="alice-token")
    assert main(["enroll", "legacy", "--kubeconfig", kubeconfig]) == 0, capsys.readouterr().err
    assert (api.get("Namespace", "legacy") or {})["metadata"]["labels"] == AMBIENT
    assert main(["unenroll", "legacy", "--kubeconfig", kubeconfig]) == 0, capsys.readouterr().err
    server = ThreadingHTTPServer(("127.0.0.1", 0), ConfigDump)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api.forwards[(NODE_IP, TUNNEL_ADMIN_PORT)] = server.server_address[:2]  # type: ignore[assignment]
    try:
        assert fetch_config_dump("node1", TUNNEL_ADMIN_PORT, kubeconfig=kubeconfig) == {"workloads": []}
        # `ca rotate status` reads every node's tunnel the same way
        assert all_config_dumps(TUNNEL_ADMIN_PORT, kubeconfig=kubeconfig)["node1"] == {"workloads": []}
    finally:
        server.shutdown()
        server.server_close()


def unused_grants(api: KubeStandIn, r: Rbac) -> list[str]:
    """Each verb on each resource of each rule bound to a subject that no request of that subject needed."""
    used: set[tuple[str, RbacRule, str, str]] = set()
    for user, attributes in api.authorized:
        for rule in r.rules_for(user, attributes):
            used.add((user, rule, attributes.resource, attributes.verb))
    return [
        f"{key} rule {rule.index}: {verb} on {resource}, granted to {user}"
        for user, key, _ in r.grants
        for rule in r.roles[key]
        for resource in sorted(rule.resources)
        for verb in sorted(rule.verbs)
        if (user, rule, resource, verb) not in used
    ]


@pytest.mark.timeout(90)
async def test_rbac_yaml_grants_every_call_and_nothing_unused(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        await run_agent(api, tmp_path, monkeypatch)
        await asyncio.to_thread(run_tunnel, api, tmp_path, monkeypatch)
        await asyncio.to_thread(run_ca, api)
        await asyncio.to_thread(run_operator, api, tmp_path, capsys)
    except AssertionError as exc:  # a component stuck on a 403 times out: say which call was denied
        raise AssertionError(f"{exc}; denied: {api.denied}") from None

    assert not api.denied, "\n".join(f"{user}: {a}" for user, a in api.denied)
    assert api.rbac is not None
    unused = unused_grants(api, api.rbac)
    assert not unused, "granted but never needed:\n" + "\n".join(unused)
    # Each subject did exercise its own grants (not someone else's): the agent's pods/status patch, the CA's
    # review, the operator's port-forward.
    assert (NODE_ACCOUNT, RequestAttributes("patch", "", "pods/status", "shop", "web-1")) in api.authorized
    assert any(u == CA_ACCOUNT and a.resource == "tokenreviews" for u, a in api.authorized)
    assert any(u == OPERATOR and a.resource == "pods/portforward" for u, a in api.authorized)


async def test_a_call_the_roles_do_not_grant_is_denied_as_the_api_server_does(
    api: KubeStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check above can fail: the node account may not label namespaces, the CA may not patch pod status;
    the answer is the API server's 403 Status, which the commands turn into what to grant."""
    kubeconfig = api.kubeconfig(str(tmp_path / "node.kubeconfig"), token="node-token")
    assert await asyncio.to_thread(main, ["enroll", "legacy", "--kubeconfig", kubeconfig]) == 1
    err = capsys.readouterr().err
    assert 'User "system:serviceaccount:nodeagent-system:nodeagent" cannot get resource "namespaces"' in err, err
    assert "nodeagent-operator ClusterRole" in err
    assert api.denied == [(NODE_ACCOUNT, RequestAttributes("get", "", "namespaces", "legacy", "legacy"))]
    ca = api.api_client("ca-token")
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as denied:
        await asyncio.to_thread(
            CoreV1Api(ca).patch_namespaced_pod_status,
            "web-1",
            "shop",
            {"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}},
        )
    assert denied.value.status == 403
    with contextlib.suppress(Exception):
        ca.close()


@pytest.mark.parametrize(
    ("method", "path", "websocket", "expected"),
    [
        ("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&limit=500", False, [("list", "", "pods", "")]),
        ("GET", "/api/v1/pods?watch=True&resourceVersion=5", False, [("watch", "", "pods", "")]),
        ("GET", "/api/v1/namespaces/shop", False, [("get", "", "namespaces", "shop")]),
        ("PATCH", "/api/v1/namespaces/shop/pods/web-1/status", False, [("patch", "", "pods/status", "shop")]),
        (
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            False,
            [("create", "authentication.k8s.io", "tokenreviews", "")],
        ),
        (
            "GET",
            "/apis/security.istio.io/v1/authorizationpolicies?limit=500",
            False,
            [("list", "security.istio.io", "authorizationpolicies", "")],
        ),
        (
            "GET",
            "/api/v1/namespaces/nodeagent-system/pods/x/portforward?ports=15000",
            True,
            [
                ("get", "", "pods/portforward", "nodeagent-system"),
                ("create", "", "pods/portforward", "nodeagent-system"),
            ],
        ),
    ],
)
def test_request_attributes(method: str, path: str, websocket: bool, expected: list[tuple[str, ...]]) -> None:
    """The stand-in's request -> attributes mapping, as k8s.io/apiserver's RequestInfo resolves them."""
    got = [(a.verb, a.group, a.resource, a.namespace) for a in request_attributes(method, path, websocket=websocket)]
    assert got == expected
