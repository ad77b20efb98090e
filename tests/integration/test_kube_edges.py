"""The agent's, the CA's and the CLI's Kubernetes edges through the real client against the stand-in.

- agent/kube_agent.KubeWorkloads: hands over this node's pods (and namespaces) only after a full sync;
- agent/kube_status.PodStatusWriter: ambient.istio.io/redirection via pods/status, UID-guarded, retried;
  and a restarted agent (agent/kube_agent.KubeAgent) corrects the annotations an earlier run left;
- ca/kube.kubernetes_edges + TokenReview: a token bound to a pod on node 1 cannot get an identity that only
  runs on node 2;
- `nodeagent enroll|unenroll`: the namespace label and the summary of pods that change.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agent_fakes import AckingTunnel, FakeCapture, NoProbes
from identity_support import NODE_AGENT, TD, make_csr, start_ca
from kube_standin import KubeStandIn, forbidden, namespace, pod, status_body

from nodeagent.agent import service
from nodeagent.agent.enrollment import Status, desired_pods
from nodeagent.agent.kube_agent import KubeAgent, KubeSettings, KubeWorkloads
from nodeagent.agent.kube_status import REDIRECTION_ANNOTATION, PodAnnotation, PodStatusWriter
from nodeagent.ca.client import CAClient, CARequestError
from nodeagent.ca.kube import kubernetes_edges
from nodeagent.capture.iptables import Flavour
from nodeagent.cli import main
from nodeagent.model import Identity, Inventory
from nodeagent.ztunnel.zds_client import Backoff, ZdsClient

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.fixture
def api() -> Iterator[KubeStandIn]:
    server = KubeStandIn(bookmark_interval=0.2)
    server.apply(namespace("shop"))
    server.apply(pod("web-1", "shop", "node1", "10.1.0.5", sa="web", uid="uid-web-1"))
    server.apply(pod("web-2", "shop", "node2", "10.2.0.5", sa="web", uid="uid-web-2"))
    server.apply(pod("db-1", "shop", "node2", "10.2.0.6", sa="db", uid="uid-db-1"))
    server.apply(pod("opt-out", "shop", "node1", "10.1.0.7", labels={"istio.io/dataplane-mode": "none"}))
    yield server
    server.close()


async def until(check: Any, limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


# --- agent: workload source --------------------------------------------------------------------------


async def test_kube_workloads_enroll_by_namespace_label(api: KubeStandIn, tmp_path: Path) -> None:
    seen: list[Inventory] = []
    workloads = KubeWorkloads(api.api_client(), "node1", seen.append, backoff_initial=0.05)
    assert not workloads.check() and workloads.current is None  # nothing before the first full list
    task = asyncio.create_task(workloads.run(), name="kube-workloads")
    try:
        await asyncio.wait_for(workloads.loaded.wait(), 5)
        assert {p.name for p in seen[-1].pods} == {"web-1", "opt-out"}  # node1's pods only
        assert desired_pods(seen[-1], "node1") == {}

        # `nodeagent enroll shop` (the CLI, through a kubeconfig) -> the next inventory enrolls web-1
        kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
        assert await asyncio.to_thread(main, ["enroll", "shop", "--kubeconfig", kubeconfig]) == 0
        await until(lambda: set(desired_pods(seen[-1], "node1").keys()) == {"uid-web-1"})

        assert await asyncio.to_thread(main, ["unenroll", "shop", "--kubeconfig", kubeconfig]) == 0
        await until(lambda: desired_pods(seen[-1], "node1") == {})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_node_name_with_no_pods_is_called_out(api: KubeStandIn, caplog: pytest.LogCaptureFixture) -> None:
    """`--node $(hostname)` where the node is named otherwise: the field selector matches nothing and the agent
    turned ready with nothing to do, saying only "0 pods". A node always runs the DaemonSet's own pod."""
    for node, said in (("node1", False), ("ip-10-1-0-1.internal", True)):
        caplog.clear()
        workloads = KubeWorkloads(api.api_client(), node, lambda inventory: None, backoff_initial=0.05)
        task = asyncio.create_task(workloads.run(), name="kube-workloads")
        try:
            with caplog.at_level(logging.WARNING, logger="nodeagent.agent.kube_agent"):
                await asyncio.wait_for(workloads.loaded.wait(), 5)
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert bool(warnings) is said, warnings
            if said:
                [warning] = warnings
                assert repr(node) in warning and "kubectl get nodes" in warning and "spec.nodeName" in warning
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_kube_workloads_keep_state_when_the_api_fails(api: KubeStandIn) -> None:
    api.apply(namespace("shop", AMBIENT))
    seen: list[Inventory] = []
    errors: list[str] = []
    workloads = KubeWorkloads(api.api_client(), "node1", seen.append, on_error=errors.append, backoff_initial=0.05)
    task = asyncio.create_task(workloads.run(), name="kube-workloads")
    try:
        await asyncio.wait_for(workloads.loaded.wait(), 5)
        enrolled = set(desired_pods(seen[-1], "node1"))
        assert enrolled == {"uid-web-1"}
        await until(lambda: api.watch_count() >= 2)
        api.fail(r"^/api/v1/", 200, b"<html>proxy error</html>\n", times=20)
        api.drop_watches()
        await until(lambda: workloads.error is not None)
        assert (errors and "not Kubernetes JSON" in errors[-1]) or "cannot reach" in errors[-1]
        assert set(desired_pods(workloads.current, "node1")) == enrolled  # type: ignore[arg-type]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- agent: pod status ---------------------------------------------------------------------------------


def annotation(api: KubeStandIn, name: str, ns: str = "shop") -> str | None:
    obj = api.get("Pod", name, ns)
    assert obj is not None
    return (obj["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION)


async def test_pod_status_writer(api: KubeStandIn) -> None:
    writer = PodStatusWriter(api.api_client(), retry_initial=0.05)
    task = asyncio.create_task(writer.run(), name="pod-status")
    try:
        writer.publish({"uid-web-1": ("shop", "web-1", Status.PENDING)})
        await until(lambda: annotation(api, "web-1") == "pending")
        writer.publish({"uid-web-1": ("shop", "web-1", Status.ENABLED)})
        await until(lambda: annotation(api, "web-1") == "enabled")
        patched = [path for path, _ in api.patches]
        assert patched and all(p == "/api/v1/namespaces/shop/pods/web-1/status" for p in patched)

        # a failed capture, then the pod leaving the agent's records: the annotation goes away
        api.fail(r"/pods/web-1/status", 500, times=2, method="PATCH")
        writer.publish({"uid-web-1": ("shop", "web-1", Status.FAILED)})
        await until(lambda: annotation(api, "web-1") is None)  # retried through two 500s
        writer.publish({"uid-web-1": ("shop", "web-1", Status.ENABLED)})
        await until(lambda: annotation(api, "web-1") == "enabled")
        writer.publish({})
        await until(lambda: annotation(api, "web-1") is None)

        # a 409 that is not our UID precondition (a patch that kept losing a race with the kubelet) is retried
        conflict = status_body(
            409, "Conflict", 'Operation cannot be fulfilled on pods "web-1": the object has been modified'
        )
        api.fail(r"/pods/web-1/status", 409, body=json.dumps(conflict).encode(), times=1, method="PATCH")
        writer.publish({"uid-web-1": ("shop", "web-1", Status.PENDING)})
        await until(lambda: annotation(api, "web-1") == "pending")

        # a pod recreated under the same name (new UID) is never annotated for the old one
        api.delete("Pod", "web-2", "shop")
        api.apply(pod("web-2", "shop", "node2", "10.2.0.5", uid="uid-web-2-new"))
        writer.publish({"uid-web-2": ("shop", "web-2", Status.ENABLED)})
        await asyncio.sleep(0.3)
        assert annotation(api, "web-2") is None
        assert writer.error is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(60)
async def test_a_restarted_agent_corrects_the_annotations_an_earlier_run_left(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pods unenrolled while no agent ran still say `enabled` (istio#61182's lie) until an agent reads the
    annotation back: the new agent removes it from every pod of its node that is not enrolled, and makes
    an enrolled pod's agree with its status (here pending: no tunnel)."""
    monkeypatch.setattr(service.IptablesBackend, "for_host", lambda flavour: FakeCapture())
    monkeypatch.setattr(service, "ProbeBypass", NoProbes)
    stale = {REDIRECTION_ANNOTATION: "enabled"}
    api.apply(namespace("shop", AMBIENT))
    api.apply(namespace("legacy"))
    api.apply(pod("web-1", "shop", "node1", "10.1.0.5", sa="web", uid="uid-web-1", annotations=stale))
    api.apply(
        pod("opt-out", "shop", "node1", "10.1.0.7", labels={"istio.io/dataplane-mode": "none"}, annotations=stale)
    )
    api.apply(pod("batch", "legacy", "node1", "10.1.0.8", annotations=stale))
    api.apply(pod("job", "shop", "node1", "10.1.0.9", phase="Succeeded", annotations=stale))
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    (netns_dir / "na-node1.shop.web-1").touch()  # the resolver only needs a file to hold open
    config = service.AgentConfig(
        node="node1", inventory=tmp_path / "unused.yaml", zds_socket=str(tmp_path / "zds.sock"),
        state_dir=tmp_path / "state", netns_dir=str(netns_dir), verify_interval=600,
    )  # fmt: skip
    settings = KubeSettings(client=api.api_client, netns="pattern", admin=None)
    agent = KubeAgent(config, Flavour.NFT, settings=settings)
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        await until(lambda: annotation(api, "web-1") == "pending", 10)
        await until(
            lambda: (
                [annotation(api, "opt-out"), annotation(api, "job"), annotation(api, "batch", "legacy")] == [None] * 3
            )
        )
        await asyncio.sleep(0.3)  # the watch brings the agent's own writes back: they must not be written again
        assert sorted(path.split("/")[-2] for path, _ in api.patches) == ["batch", "job", "opt-out", "web-1"]
        assert annotation(api, "web-2") is None  # another node's pod is never touched
    finally:
        stop.set()
        assert await running == 0


@pytest.mark.timeout(60)
async def test_a_restarted_agent_leaves_enabled_pods_enabled_while_their_tunnel_reconnects(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tunnel serves every pod across an agent restart. The new agent knows of no ack until the tunnel
    reconnects to its socket (opened after its first pass), so its pods were all `pending` for that moment,
    and the annotation went enabled -> pending -> enabled: two pods/status writes per pod and a lie."""
    monkeypatch.setattr(service.IptablesBackend, "for_host", lambda flavour: FakeCapture())
    monkeypatch.setattr(service, "ProbeBypass", NoProbes)
    api.apply(namespace("shop", AMBIENT))
    enabled = {REDIRECTION_ANNOTATION: "enabled"}
    api.apply(pod("web-1", "shop", "node1", "10.1.0.5", sa="web", uid="uid-web-1", annotations=enabled))
    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "na-node1.shop.web-1").touch()
    sock = str(tmp_path / "zds.sock")
    config = service.AgentConfig(
        node="node1", inventory=tmp_path / "unused.yaml", zds_socket=sock,
        state_dir=tmp_path / "state", netns_dir=str(tmp_path / "netns"), verify_interval=600,
    )  # fmt: skip
    tunnel = ZdsClient(AckingTunnel(), sock, backoff=Backoff(0.05, 0.2))  # reconnects once the socket is there
    tunnel.start()
    agent = KubeAgent(config, Flavour.NFT, settings=KubeSettings(client=api.api_client, netns="pattern", admin=None))
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        await until(lambda: "uid-web-1" in agent.reconciler.records, 10)
        await until(lambda: agent.reconciler.status("uid-web-1") is Status.ENABLED, 10)
        await asyncio.sleep(0.5)  # what the agent publishes now reaches the API server
        assert api.patches == []  # enabled before, enabled after, served throughout: nothing to write
    finally:
        stop.set()
        assert await running == 0
        await tunnel.close()


# --- CA: TokenReview + pods of the caller's node ------------------------------------------------------------


def _review(pod_name: str, pod_uid: str, node: str) -> dict[str, Any]:
    return {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": {
            "username": "system:serviceaccount:nodeagent-system:nodeagent",
            "extra": {
                "authentication.kubernetes.io/pod-name": [pod_name],
                "authentication.kubernetes.io/pod-uid": [pod_uid],
                "authentication.kubernetes.io/node-name": [node],
            },
        },
    }


async def test_ca_node_authorization_from_the_api_server(api: KubeStandIn, tmp_path: Path) -> None:
    api.apply(namespace("nodeagent-system"))
    api.apply(pod("agent-n1", "nodeagent-system", "node1", "192.168.0.1", sa="nodeagent", uid="agent-uid-1"))
    api.tokens["node1-token"] = _review("agent-n1", "agent-uid-1", "node1")
    api.tokens["forged-token"] = _review("agent-n1", "some-other-uid", "node1")
    edges = await asyncio.to_thread(kubernetes_edges, trust_domain=TD, client=api.api_client(), sync_timeout=5)
    ca = start_ca(tmp_path / "ca", source=edges.source.current, authenticator=edges.authenticator)
    clients: list[CAClient] = []

    def client(token: str) -> CAClient:
        c = CAClient(ca.target, token=lambda: token, bundle_pem=ca.bundle)
        clients.append(c)
        return c

    web = Identity(TD, "shop", "web")  # runs on node1 and node2
    db = Identity(TD, "shop", "db")  # runs only on node2
    try:
        chain = await client("node1-token").fetch(web, make_csr([web.uri]))
        assert chain
        with pytest.raises(CARequestError) as denied:
            await client("node1-token").fetch(db, make_csr([db.uri]))
        assert denied.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert ca.count("denied", "identity_not_on_node") == 1
        with pytest.raises(CARequestError):
            await client("forged-token").fetch(web, make_csr([web.uri]))
        assert ca.count("denied", "caller_pod_mismatch") == 1
        # db is scheduled on node1 too: the watch lets the CA grant it without a restart
        api.apply(pod("db-2", "shop", "node1", "10.1.0.8", sa="db"))
        for _ in range(100):
            if any(p.name == "db-2" for p in edges.pods_on_node("node1")):
                break
            await asyncio.sleep(0.02)
        assert await client("node1-token").fetch(db, make_csr([db.uri]))
        assert any(r[1] == "/apis/authentication.k8s.io/v1/tokenreviews" for r in api.requests)
        assert NODE_AGENT.namespace == "nodeagent-system"
    finally:
        for c in clients:
            await c.close()
        ca.stop()
        edges.source.stop()


# --- CLI -------------------------------------------------------------------------------------------------


def test_enroll_summary_and_label(api: KubeStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
    assert main(["enroll", "-n", "shop", "--kubeconfig", kubeconfig, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "3 joins" in out and "1 stays out" in out and "opts out" in out
    assert "istio.io/dataplane-mode" not in (api.get("Namespace", "shop") or {})["metadata"].get("labels", {})

    assert main(["enroll", "shop", "--kubeconfig", kubeconfig, "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"] == "labelled"
    assert {p["pod"] for p in doc["pods"] if p["change"] == "joins"} == {"web-1", "web-2", "db-1"}
    assert (api.get("Namespace", "shop") or {})["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"

    assert main(["unenroll", "shop", "--kubeconfig", kubeconfig]) == 0
    assert "3 leaves" in capsys.readouterr().out
    assert "istio.io/dataplane-mode" not in (api.get("Namespace", "shop") or {})["metadata"]["labels"]


def test_kubeconfig_path_list_is_merged_like_kubectl(
    api: KubeStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """KUBECONFIG=a:b: every file is read (a context of the second file is found) and, as kubectl does, the
    first file's current-context is the one in force."""
    standin = api.kubeconfig(str(tmp_path / "standin.yaml"))
    other = tmp_path / "other.yaml"
    other.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "nowhere", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "nobody", "user": {"token": "x"}}],
                "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nobody"}}],
                "current-context": "nowhere",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    for kubeconfig, context in (
        (f"{other}:{standin}", ["--context", "standin"]),  # the context is in the second file
        (f"{standin}:{other}", []),  # standin's current-context, not the last file's
        (f"{tmp_path / 'missing.yaml'}:{standin}", []),  # a missing file is skipped
    ):
        monkeypatch.setenv("KUBECONFIG", kubeconfig)
        assert main(["enroll", "shop", *context, "--dry-run"]) == 0, (kubeconfig, capsys.readouterr().err)
        assert "3 joins" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["enroll", "nowhere"], "namespace 'nowhere' not found"),
        (["enroll", "kube-system"], "excluded from the mesh"),
        (["enroll"], "name exactly one namespace"),
    ],
)
def test_enroll_errors(
    api: KubeStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
    assert main([*argv, "--kubeconfig", kubeconfig]) != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("failing", "method", "step"),
    [
        (r"^/api/v1/namespaces/shop$", "GET", "reading namespace shop"),
        (r"^/api/v1/namespaces/shop/pods", "GET", "listing the pods of namespace shop"),
        (r"^/api/v1/namespaces/shop$", "PATCH", "labelling namespace shop"),
    ],
)
def test_enroll_forbidden_names_the_operator_role(
    api: KubeStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str], *, failing: str, method: str, step: str
) -> None:
    """`enroll` runs as the operator's own user: a 403 told them to grant list/watch "to this service account",
    the agent's advice - the wrong verbs for the wrong subject. It names the step, the verbs and the role."""
    kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
    api.fail(failing, 403, method=method, body=forbidden("Namespace", user="alice"))
    assert main(["enroll", "shop", "--kubeconfig", kubeconfig]) == 1
    err = capsys.readouterr().err
    assert f"error: {step}: forbidden by RBAC" in err, err
    assert "get and patch on namespaces and list on pods" in err and "nodeagent-operator ClusterRole" in err, err
    assert "service account" not in err, err


async def test_a_forbidden_status_patch_names_the_permission_it_needs(api: KubeStandIn) -> None:
    """A 403 on the pods/status patch advised granting list/watch: the wrong verb for the operator to add."""
    writer = PodStatusWriter(api.api_client(), retry_initial=0.05)
    api.fail(r"/pods/web-1/status", 403, times=1, method="PATCH", body=forbidden("Pod"))

    written = await writer._write("uid-web-1", PodAnnotation("shop", "web-1", "enabled"), asyncio.Semaphore(1))
    assert written is False
    assert writer.error is not None and "grant patch on pods/status" in writer.error, writer.error
