"""`nodeagent ca rotate status`: the real CLI reads every node's tunnel through the API-server stand-in
(pods/portforward to the tunnels' real admin endpoints) and says when the next rotation step is safe.

The rotation runs on the CA the tunnels get their certificates from (tunnel_harness: a real CA and two
real tunnels); a tunnel reads its trust bundle when it starts, so "restarted" below is a tunnel that has
caught up with the published bundle, or has renewed its certificate. The oracles: the exit status
(0 only when the next step is safe), the verdict and each node's row.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from identity_support import TD
from kube_standin import KubeStandIn, namespace, pod
from tunnel_harness import Cluster, cluster

from nodeagent.kube_remote import TUNNEL_ADMIN_PORT

ROOT = Path(__file__).resolve().parents[2]
NODE_IPS = {"node1": "10.250.0.1", "node2": "10.250.0.2"}  # the hostNetwork DaemonSet pods' (= nodes') IPs


@pytest.fixture
def standin() -> Iterator[KubeStandIn]:
    s = KubeStandIn()
    s.apply(namespace("nodeagent-system"))
    for node, ip in NODE_IPS.items():
        p = pod(f"nodeagent-{node}", "nodeagent-system", node, ip, sa="nodeagent", labels={"app": "nodeagent"})
        p["spec"]["hostNetwork"] = True
        s.apply(p)
    yield s
    s.close()


async def restart(c: Cluster, s: KubeStandIn, node: str) -> None:
    """(Re)start node's tunnel: it reads the trust bundle and fetches its certificates as it starts."""
    if node in c.tunnels:
        await c.tunnels.pop(node).stop()
    tunnel = await c.start_tunnel(node)
    await c.wait_ready(tunnel)
    s.forwards[(NODE_IPS[node], TUNNEL_ADMIN_PORT)] = tunnel.addresses["admin"]


async def status(c: Cluster, kubeconfig: str, output: str = "json") -> tuple[int, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nodeagent.cli", "ca", "rotate", "status", "--state-dir", str(c.ca.store.state_dir),
        "--trust-domain", TD, "--kubeconfig", kubeconfig, "-o", output,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode in (0, 1), err.decode()
    return proc.returncode, json.loads(out) if output == "json" else out.decode()


def problems(doc: Any) -> dict[str, str]:
    return {row["node"]: row["problem"] for row in doc["nodes"]}


async def test_status_says_when_each_step_is_safe(tmp_path: Path, standin: KubeStandIn) -> None:
    kubeconfig = standin.kubeconfig(str(tmp_path / "kubeconfig"))
    async with cluster(tmp_path) as c:
        for node in NODE_IPS:
            await restart(c, standin, node)
        rc, doc = await status(c, kubeconfig)
        assert (rc, doc["rotation"]) == (0, "none") and "no rotation in progress" in doc["verdict"]
        assert [row["certificates"] for row in doc["nodes"]] == ["1 signing", "1 signing"]  # client, server

        c.ca.store.rotate_prepare()  # published to the bundle file; the running tunnels have not read it
        rc, doc = await status(c, kubeconfig)
        assert rc == 1 and "`nodeagent ca rotate activate` is not safe yet: 2 of 2 nodes" in doc["verdict"]
        assert all("does not trust the next root yet" in p for p in problems(doc).values())
        await restart(c, standin, "node1")
        rc, doc = await status(c, kubeconfig)
        assert rc == 1 and problems(doc)["node1"] == "" and problems(doc)["node2"]
        await restart(c, standin, "node2")
        rc, doc = await status(c, kubeconfig)
        assert rc == 0 and "`nodeagent ca rotate activate` is safe now" in doc["verdict"]

        c.ca.store.rotate_activate()  # the new root signs; certificates in use still chain to the old one
        await asyncio.sleep(1.5)  # the CA reloads its state (reload_interval 1 s)
        rc, doc = await status(c, kubeconfig)
        assert rc == 1 and "`nodeagent ca rotate finish` is not safe yet" in doc["verdict"]
        assert problems(doc)["node1"].startswith("1 certificate still chains to the previous root")
        for node in NODE_IPS:
            await restart(c, standin, node)  # renewed: from the new root
        rc, doc = await status(c, kubeconfig)
        assert rc == 0 and "`nodeagent ca rotate finish` is safe now" in doc["verdict"], doc
        assert [row["certificates"] for row in doc["nodes"]] == ["1 signing", "1 signing"]


async def test_an_unreachable_tunnel_is_named_and_not_safe(tmp_path: Path, standin: KubeStandIn) -> None:
    kubeconfig = standin.kubeconfig(str(tmp_path / "kubeconfig"))
    async with cluster(tmp_path) as c:
        await restart(c, standin, "node1")  # node2's pod runs, but nothing answers on its port 15000
        rc, doc = await status(c, kubeconfig)
        assert rc == 1 and problems(doc)["node1"] == ""
        assert problems(doc)["node2"].startswith("unreachable: pod nodeagent-system/nodeagent-node2 (node node2)")
        rc, text = await status(c, kubeconfig, "table")
        lines = text.splitlines()
        assert (
            rc == 1
            and lines[0] == "rotation: none; roots of the bundle:"
            and lines[1].split()[:2]
            == [
                "signing",
                "sha256",
            ]
        )
        assert lines[2].split() == ["NODE", "TRUSTS", "CERTIFICATES", "PROBLEM"]
        assert lines[3].split()[:4] == ["node1", "signing", "1", "signing"] and lines[3].endswith(" -")
        assert lines[4].startswith("node2") and "unreachable: " in lines[4]
        assert lines[-1] == "the mesh's trust is inconsistent: 1 of 2 nodes have a problem (above)"
