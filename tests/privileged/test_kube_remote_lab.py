"""`nodeagent inspect ... --node NODE --kubeconfig K` against the lab's real nodes, through the API server.

The lab's mesh runs in Kubernetes mode against the stand-in (as in test_kube_mode.py); the stand-in also
holds each node's nodeagent DaemonSet pod (hostNetwork: its IP is the node's address) and dials a
port-forward like the kubelet does — 127.0.0.1:PORT inside the pod's network namespace, here the node's.
So `inspect redirects --node` reaches the real agent's admin endpoint (127.0.0.1:15002 in the node), which
reads the real kernel, and `inspect workloads --node` the real tunnel's 15000.

Oracles: the kernel's own tools (iptables-save and ss in the pod netns) agree with what came back, and
the stand-in's request log shows the port-forwards.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kube_standin import KubeStandIn, namespace, pod, service

from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, teardown
from nodeagent.labmesh import NODEAGENT, Mesh

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

SHOP = ["shop/frontend", "shop/payments", "shop/checkout"]
TUNNEL_PORTS = [15001, 15006, 15008]
ANNOTATION = "ambient.istio.io/redirection"


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def kernel_jumps(netns: str) -> int:
    """Our jumps from the built-in chains in the pod's netns, by iptables-save (either flavour)."""
    lines = []
    for flavour in ("nft", "legacy"):
        lines += sh("ip", "netns", "exec", netns, f"iptables-{flavour}-save").stdout.splitlines()
    return sum(1 for line in lines if "NODEAGENT" in line and line.startswith(("-A PREROUTING", "-A OUTPUT")))


@dataclass
class Remote:
    lab: Lab
    api: KubeStandIn
    kubeconfig: Path

    def nodeagent(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh(*NODEAGENT, *args, "--kubeconfig", str(self.kubeconfig))


@pytest.fixture
def remote() -> Iterator[Remote]:
    if Path("/run/nodeagent/lab/state.json").exists():
        pytest.fail("a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests")
    run_dir = Path(tempfile.mkdtemp(prefix="na-kr-"))  # short: ZDS socket paths must fit 108 bytes
    api = KubeStandIn()
    mesh: Mesh | None = None
    try:
        lab = Lab.up(DEFAULT_TOPOLOGY)
        for ns in lab.inventory.namespaces:
            api.apply(namespace(ns.name, {k: v for k, v in ns.labels.items() if k != "istio.io/dataplane-mode"}))
        for p in lab.inventory.pods:
            api.apply(
                pod(p.name, p.namespace, p.node, str(p.ip), sa=p.service_account, labels=dict(p.labels), uid=p.uid)
            )
        for s in lab.inventory.services:
            api.apply(service(s.name, s.namespace, dict(s.selector), [(sp.port, sp.target_port) for sp in s.ports]))
        api.apply(namespace("nodeagent-system"))
        for node in lab.inventory.nodes:
            agent = pod(f"nodeagent-{node.name}", "nodeagent-system", node.name, str(node.address), sa="nodeagent")
            agent["metadata"]["labels"] = {"app": "nodeagent"}
            agent["spec"]["hostNetwork"] = True
            api.apply(agent)
            api.pod_netns[str(node.address)] = lab.node_netns(node.name)
        control_plane = lab.inventory.nodes[0]
        url = api.serve_in_netns(lab.node_netns(control_plane.name), str(control_plane.address))
        mesh = Mesh(lab, run_dir, kubeconfig=Path(api.kubeconfig(str(run_dir / "node.kubeconfig"), server=url)))
        mesh.start()
        for node in mesh.nodes:
            mesh.wait(f"the agent on {node} to be ready", functools.partial(mesh.agent_ready, node))
        yield Remote(lab, api, Path(api.kubeconfig(str(run_dir / "operator.kubeconfig"))))
    finally:
        if mesh is not None:
            mesh.stop()
        teardown()
        api.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_inspect_through_the_api_server_reads_the_nodes(remote: Remote) -> None:
    r = remote
    with r.api.api_client() as client:
        kubernetes.client.CoreV1Api(client).patch_namespace(
            "shop",
            {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}},
            _content_type="application/merge-patch+json",
        )

    def annotated() -> bool:
        objs = [r.api.get("Pod", key.split("/")[1], "shop") or {} for key in SHOP]
        return all((o.get("metadata", {}).get("annotations") or {}).get(ANNOTATION) == "enabled" for o in objs)

    wait_for("shop annotated enabled", annotated)

    done = r.nodeagent("inspect", "redirects", "--node", "node1", "--node", "node2", "-o", "json", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    rows = {f"{row['namespace']}/{row['pod']}": row for row in report["rows"]}
    agents = {f"nodeagent-system/nodeagent-{node}" for node in ("node1", "node2")}
    assert set(rows) == {p.key for p in r.lab.inventory.pods} | agents
    assert all(rows[key]["mode"] == "hostNetwork" for key in agents)
    for key in SHOP:
        row = rows[key]
        assert (row["mode"], row["rules"], row["status"], row["listeners"]) == (
            "ambient",
            "ok",
            "enabled",
            TUNNEL_PORTS,
        )
        assert row["problems"] == []
        node = r.lab.inventory.pod(key).node
        assert kernel_jumps(f"na-{node}.{key.replace('/', '.')}") == 4  # the kernel agrees
    assert (rows["legacy/batch"]["mode"], rows["legacy/batch"]["rules"]) == ("none", "none")
    assert kernel_jumps("na-node2.legacy.batch") == 0
    assert [n["agent"] for n in report["nodes"]] == ["running", "running"]

    done = r.nodeagent("inspect", "workloads", "--node", "node2", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert {w["name"] for w in json.loads(done.stdout)} >= {"frontend", "payments", "checkout"}

    forwarded = {path for _, path in r.api.requests if "/portforward" in path}
    assert forwarded == {
        "/api/v1/namespaces/nodeagent-system/pods/nodeagent-node1/portforward?ports=15002",
        "/api/v1/namespaces/nodeagent-system/pods/nodeagent-node2/portforward?ports=15002",
        "/api/v1/namespaces/nodeagent-system/pods/nodeagent-node2/portforward?ports=15000",
    }
