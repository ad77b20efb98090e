"""`nodeagent inspect ... --node NODE --kubeconfig K`: the real CLI, the real `kubernetes` client's
pods/portforward (websocket, v4.channel.k8s.io) through the API-server stand-in, which really connects
to the "pod's" port — a real tunnel's admin endpoint holding a real open connection, and the agent's
admin endpoint (agent/admin_endpoint.py) computing redirects with inspect.collect.

Oracles: the tunnel's own /config_dump read directly over HTTP, the stand-in's request log (which pod
and port were forwarded), and the pods the stand-in holds. Errors: no agent pod on the node, RBAC 403 on
the list and on the port-forward, a refused port, a kubeconfig that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_standin import KubeStandIn, forbidden, namespace, pod, status_body
from tunnel_harness import APP_PORT, ByteServer, cluster, connect_captured, recv_all, send_all

from nodeagent import admin
from nodeagent.agent import admin_endpoint
from nodeagent.agent.admin_endpoint import redirects_server
from nodeagent.agent.inspect import Layout
from nodeagent.inventory import translate
from nodeagent.kube_remote import AGENT_ADMIN_PORT, TUNNEL_ADMIN_PORT
from nodeagent.model import SocketAddress

ROOT = Path(__file__).resolve().parents[2]
NODE_IP = "10.250.0.1"  # the DaemonSet pod is hostNetwork: its IP is the node's


def agent_pod(node: str, ip: str, name: str = "nodeagent-x7k2p", phase: str = "Running") -> dict[str, Any]:
    p = pod(name, "nodeagent-system", node, ip, sa="nodeagent", labels={"app": "nodeagent"}, phase=phase)
    p["spec"]["hostNetwork"] = True
    return p


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nodeagent.cli",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def get_json(address: tuple[str, int], path: str) -> Any:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=5) as response:
        return json.load(response)


@pytest.fixture
async def standin(tmp_path: Path) -> AsyncIterator[tuple[KubeStandIn, str]]:
    s = KubeStandIn()
    s.apply(namespace("nodeagent-system"))
    s.apply(agent_pod("node1", NODE_IP))
    s.apply(agent_pod("node2", "10.250.0.2", name="nodeagent-other"))
    try:
        yield s, s.kubeconfig(str(tmp_path / "kubeconfig"))
    finally:
        s.close()


async def test_tunnel_sections_through_port_forward(tmp_path: Path, standin: tuple[KubeStandIn, str]) -> None:
    s, kubeconfig = standin
    async with cluster(tmp_path) as c:
        t1, _ = await c.start_both()
        s.forwards[(NODE_IP, TUNNEL_ADMIN_PORT)] = t1.addresses["admin"]
        server_pod, client_pod = c.pod("server"), c.pod("client")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=100).start()
        try:
            sock = await connect_captured(c.net, client_pod, SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                receiving = asyncio.ensure_future(recv_all(sock))
                await send_all(sock, 10, b"x" * 10)
                async with asyncio.timeout(10):
                    while not len(t1.table):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                direct = await asyncio.to_thread(get_json, t1.addresses["admin"], "/config_dump")
                rc, out, err = await cli(
                    "inspect", "connections", "--node", "node1", "--kubeconfig", kubeconfig, "-o", "json"
                )
                assert rc == 0, err
                remote = json.loads(out)
                assert remote["outbound"] == direct["connections"]["outbound"] != []
                assert [e["originalDst"] for e in remote["outbound"]] == [f"{server_pod.ip}:{APP_PORT}"]

                rc, out, err = await cli("inspect", "workloads", "--node", "node1", "--kubeconfig", kubeconfig)
                assert rc == 0, err
                lines = out.splitlines()
                assert lines[0].split()[:2] == ["NAMESPACE", "POD"]
                assert sorted(line.split()[1] for line in lines[1:]) == ["client", "server"]

                rc, out, err = await cli(
                    "inspect", "certificates", "--node", "node1", "--kubeconfig", kubeconfig, "-o", "yaml"
                )
                assert rc == 0, err
                assert [e["identity"] for e in yaml.safe_load(out)] == [c.identity("client").uri]

                # -n scopes every output form, by the local workload's (or the identity's) namespace.
                for ns, want in (("shop", 1), ("billing", 0)):
                    rc, out, err = await cli(
                        "inspect", "connections", "--node", "node1", "--kubeconfig", kubeconfig, "-n", ns, "-o", "json"
                    )
                    assert rc == 0, err
                    assert len(json.loads(out)["outbound"]) == want, ns
                    rc, out, err = await cli(
                        "inspect", "certificates", "--node", "node1", "--kubeconfig", kubeconfig, "-n", ns, "-o", "yaml"
                    )
                    assert rc == 0, err
                    assert len(yaml.safe_load(out)) == want, ns
                sock.shutdown(socket.SHUT_WR)
                async with asyncio.timeout(10):
                    await receiving
        finally:
            await app.close()
    forwarded = [p for m, p in s.requests if "/portforward" in p]
    assert forwarded and all(
        p == f"/api/v1/namespaces/nodeagent-system/pods/nodeagent-x7k2p/portforward?ports={TUNNEL_ADMIN_PORT}"
        for p in forwarded
    )
    lists = [p for m, p in s.requests if p.startswith("/api/v1/namespaces/nodeagent-system/pods?")]
    assert lists and all("labelSelector=app%3Dnodeagent" in p and "spec.nodeName%3Dnode1" in p for p in lists)


async def test_redirects_through_the_agent_endpoint(tmp_path: Path, standin: tuple[KubeStandIn, str]) -> None:
    """The agent's endpoint runs inspect.collect at request time; without root or netns every pod is `gone`
    and --verify says so — what matters here is that the kernel report crosses the API server intact."""
    s, kubeconfig = standin
    s.apply(namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    s.apply(pod("cart-1", "shop", "node1", "10.0.1.5"))
    s.apply(pod("web-1", "shop", "node1", "10.0.1.6"))
    s.apply(pod("elsewhere", "shop", "node2", "10.0.2.5"))
    objects = [*s.objects("Pod"), *s.objects("Namespace")]
    inventory = translate.inventory(
        pods=[translate.pod(o) for o in objects if o["kind"] == "Pod"],
        namespaces=[translate.namespace(o) for o in objects if o["kind"] == "Namespace"],
        nodes=["node1", "node2"],
    )
    layout = Layout(str(tmp_path / "netns"), "na-{node}.{namespace}.{name}", "na-{node}", tmp_path / "state")
    server = redirects_server("node1", lambda: inventory, layout, None)
    address = await server.start("127.0.0.1", 0)
    s.forwards[(NODE_IP, AGENT_ADMIN_PORT)] = address
    try:
        rc, out, err = await cli("inspect", "redirects", "--node", "node1", "--kubeconfig", kubeconfig, "-o", "json")
        assert rc == 0, err
        report = json.loads(out)
        rows = {(r["namespace"], r["pod"]): r for r in report["rows"]}
        assert set(rows) >= {("shop", "cart-1"), ("shop", "web-1")} and ("shop", "elsewhere") not in rows
        assert rows[("shop", "cart-1")]["mode"] == "ambient" and rows[("shop", "cart-1")]["rules"] == "gone"
        assert [n["node"] for n in report["nodes"]] == ["node1"]
        assert report["nodes"][0]["agent"] == "no status file"
        assert rows[("nodeagent-system", "nodeagent-x7k2p")]["mode"] == "hostNetwork"

        rc, out, err = await cli(
            "inspect", "redirects", "--node", "node1", "--kubeconfig", kubeconfig, "-n", "shop", "-o", "json"
        )
        assert rc == 0, err
        assert sorted(r["pod"] for r in json.loads(out)["rows"]) == ["cart-1", "web-1"]

        rc, out, err = await cli("inspect", "redirects", "--node", "node1", "--kubeconfig", kubeconfig, "--verify")
        assert rc == 1, (out, err)  # problems found: exit 1, like on the node
        assert "PROBLEM shop/cart-1: capture is incomplete: no network namespace at" in out
        assert "PROBLEM node node1: the node agent has never run here" in out
    finally:
        await server.stop()
    assert any(p.endswith(f"/pods/nodeagent-x7k2p/portforward?ports={AGENT_ADMIN_PORT}") for _, p in s.requests)


async def test_errors_say_what_to_do(tmp_path: Path, standin: tuple[KubeStandIn, str]) -> None:
    s, kubeconfig = standin
    # No agent pod on that node (node3 has only a pending one).
    s.apply(agent_pod("node3", "10.250.0.3", name="nodeagent-pending", phase="Pending"))
    rc, _, err = await cli("inspect", "connections", "--node", "node3", "--kubeconfig", kubeconfig)
    assert rc == 1
    assert "no running nodeagent pod on node 'node3'" in err and "nodeagent-pending (Pending)" in err
    assert "kubectl -n nodeagent-system get pods -l app=nodeagent -o wide" in err

    # Nothing listens on the pod's port: the kubelet's error channel, with what to check.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    s.forwards[(NODE_IP, TUNNEL_ADMIN_PORT)] = closed.getsockname()
    closed.close()
    rc, _, err = await cli("inspect", "workloads", "--node", "node1", "--kubeconfig", kubeconfig)
    assert rc == 1
    assert "the kubelet could not connect: error forwarding port 15000 to pod nodeagent-x7k2p" in err
    assert "connection refused" in err

    # RBAC: the port-forward is forbidden.
    message = (
        'pods "nodeagent-x7k2p" is forbidden: User "alice" cannot create resource "pods/portforward" in API '
        'group "" in the namespace "nodeagent-system"'
    )
    s.fail(r"/portforward", 403, json.dumps(status_body(403, "Forbidden", message)).encode())
    rc, _, err = await cli("inspect", "certificates", "--node", "node1", "--kubeconfig", kubeconfig)
    assert rc == 1
    assert f"forbidden by RBAC ({message})" in err and "nodeagent-operator Role" in err

    # RBAC: listing the agent pods is forbidden.
    s.fail(r"/namespaces/nodeagent-system/pods\?", 403, forbidden("Pod", user="alice"))
    rc, _, err = await cli("inspect", "redirects", "--node", "node1", "--kubeconfig", kubeconfig)
    assert rc == 1
    assert "pods in namespace nodeagent-system: forbidden by RBAC" in err and 'User "alice"' in err

    # A kubeconfig that is not there.
    rc, _, err = await cli("inspect", "connections", "--node", "node1", "--kubeconfig", str(tmp_path / "nope"))
    assert rc == 1 and "cannot configure the Kubernetes client" in err


async def test_agent_endpoint_waits_for_its_port_and_says_when_it_has_no_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rolling update's surge agent finds the port taken: it retries (never stops the agent) and serves
    once the old one is gone; before its first list it answers with what is missing, not an empty report."""
    monkeypatch.setattr(admin, "BIND_RETRY_S", 0.05)
    layout = Layout()
    old = redirects_server("node1", lambda: None, layout, None)
    address = await old.start("127.0.0.1", 0)
    new = redirects_server("node1", lambda: None, layout, None)
    serving = asyncio.ensure_future(admin_endpoint.serve(new, address))
    try:
        await asyncio.sleep(0.3)
        assert not serving.done()  # still retrying, not crashed
        await old.stop()
        async with asyncio.timeout(10):
            while True:
                try:
                    dump = await asyncio.to_thread(get_json, address, "/config_dump")
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        assert dump == {
            "redirects": {"error": "RuntimeError: the agent has not listed its pods yet; try again once it is ready"}
        }
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
