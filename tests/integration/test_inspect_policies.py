"""`nodeagent inspect policies` against a running tunnel: every row's SCOPE is where the policy applies.

istioctl's policies table is NAMESPACE, POLICY NAME, ACTION, SCOPE, and SCOPE is ztunnel's RbacScope
(Global, Namespace, WorkloadSelector). PeerAuthentication rows printed their kind there instead, so a
mesh-wide STRICT in the root namespace, a namespace's PERMISSIVE and one workload's STRICT looked alike.
The oracle is the policy file itself: which PeerAuthentication has a selector, which sits in the root
namespace.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from tunnel_harness import cluster

from nodeagent.cli import main
from nodeagent.inventory.policies import parse_policies

POLICIES = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh-strict, namespace: ROOT}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop-permissive, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db-strict, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}
"""


@pytest.mark.parametrize("root", ["istio-system", "mesh-root"])
async def test_peer_authentication_rows_show_their_scope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root: str
) -> None:
    policies = parse_policies(list(yaml.safe_load_all(POLICIES.replace("ROOT", root))), root_namespace=root)
    async with cluster(tmp_path) as c:
        c.set_policies(policies)
        tunnel = await c.start_tunnel("node1")
        host, port = tunnel.addresses["admin"]
        admin = f"{host}:{port}"
        assert await asyncio.to_thread(main, ["inspect", "policies", "--admin", admin]) == 0
        table = capsys.readouterr().out.splitlines()
        assert await asyncio.to_thread(main, ["inspect", "policies", "--admin", admin, "-o", "json"]) == 0
        dumped = json.loads(capsys.readouterr().out)
    assert table[0].split() == ["NAMESPACE", "POLICY", "NAME", "ACTION", "SCOPE"]
    assert sorted(tuple(line.split()) for line in table[1:]) == [
        (root, "mesh-strict", "STRICT", "Global"),
        ("shop", "db-strict", "STRICT", "WorkloadSelector"),
        ("shop", "deny-legacy", "Deny", "Namespace"),
        ("shop", "shop-permissive", "PERMISSIVE", "Namespace"),
    ]
    # JSON keeps what the table leaves out: which rows are PeerAuthentications
    assert sorted(p["name"] for p in dumped if p.get("kind") == "PeerAuthentication") == [
        "db-strict",
        "mesh-strict",
        "shop-permissive",
    ]
