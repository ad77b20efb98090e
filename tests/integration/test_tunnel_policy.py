"""L4 authorization through the whole tunnel: ALLOW/DENY by principal, namespace and port, STRICT on
:15006, and a policy change closing an open connection. Policies are written as Istio YAML and go
through nodeagent.inventory.policies; the oracle is what the apps see (bytes or a refused connection)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from tunnel_harness import (
    APP_PORT,
    ByteServer,
    Cluster,
    Net,
    answered,
    cluster,
    connect_captured,
    make_pod,
    recv_exactly,
    seconds_until_closed,
)

from nodeagent.inventory.policies import parse_policies
from nodeagent.model import Pod, SocketAddress
from nodeagent.policy import PolicySet
from nodeagent.ztunnel import sockets


def three_pods(net: Net) -> list[Pod]:
    return [
        make_pod(net, "client", "node1", 10),
        make_pod(net, "intruder", "node1", 11, ns="other"),
        make_pod(net, "server", "node2", 20),
    ]


def policies(text: str) -> PolicySet:
    return parse_policies(list(yaml.safe_load_all(text)))


def authz(action: str, rules: str, ns: str = "shop") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: test, namespace: {ns}}}
spec:
  action: {action}
  rules: {rules}
"""


async def attempt(c: Cluster, source: str, port: int = APP_PORT, via: int = sockets.OUTBOUND_PORT) -> bool:
    """One connection from `source` to the server app; True when the app's 5 bytes came back."""
    server = c.pod("server")
    assert server.ip is not None
    return await answered(connect_captured(c.net, c.pod(source), SocketAddress(server.ip, port), via), b"hello")


async def start(c: Cluster) -> list[ByteServer]:
    for node in ("node1", "node2"):
        await c.wait_ready(await c.start_tunnel(node))
    server = c.pod("server")
    assert server.ip is not None
    return [ByteServer(server.ip, APP_PORT, size=5).start(), ByteServer(server.ip, 9090, size=5).start()]


CASES = [
    ("no policy", "", {"client": True, "intruder": True}),
    (
        "allow principal",
        authz("ALLOW", "[{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]"),
        {"client": True, "intruder": False},
    ),
    (
        "deny principal",
        authz("DENY", "[{from: [{source: {principals: ['*/sa/client']}}]}]"),
        {"client": False, "intruder": True},
    ),
    (
        "allow namespace",
        authz("ALLOW", "[{from: [{source: {namespaces: [other]}}]}]"),
        {"client": False, "intruder": True},
    ),
    (
        "deny namespace",
        authz("DENY", "[{from: [{source: {namespaces: [other]}}]}]"),
        {"client": True, "intruder": False},
    ),
    (
        "allow other port",
        authz("ALLOW", "[{to: [{operation: {ports: ['9090']}}]}]"),
        {"client": False, "intruder": False},
    ),
    ("deny this port", authz("DENY", "[{to: [{operation: {ports: ['8080']}}]}]"), {"client": False, "intruder": False}),
    ("allow this port", authz("ALLOW", "[{to: [{operation: {ports: ['8080']}}]}]"), {"client": True, "intruder": True}),
    (
        "allow with HTTP attributes is dropped",
        authz("ALLOW", "[{to: [{operation: {methods: [GET]}}]}]"),
        {"client": False, "intruder": False},
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_authorization(tmp_path: Path, text: str, expected: dict[str, bool]) -> None:
    async with cluster(tmp_path, three_pods) as c:
        c.set_policies(policies(text) if text else PolicySet())
        apps = await start(c)
        try:
            got = {source: await attempt(c, source) for source in expected}
        finally:
            for app in apps:
                await app.close()
        assert got == expected
        # Every refusal was the destination tunnel's (a 401), reported with Istio's DENY flag.
        denials = sum(
            s.value
            for m in c.registries["node2"].collect()
            for s in m.samples
            if s.name == "istio_tcp_connections_closed_total" and s.labels["response_flags"] == "DENY"
        )
        assert denials == list(expected.values()).count(False)


async def test_other_port_reaches_its_app(tmp_path: Path) -> None:
    async with cluster(tmp_path, three_pods) as c:
        c.set_policies(policies(authz("ALLOW", "[{to: [{operation: {ports: ['9090']}}]}]")))
        apps = await start(c)
        try:
            assert await attempt(c, "client", port=9090)
            assert not await attempt(c, "client", port=APP_PORT)
        finally:
            for app in apps:
                await app.close()


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""


@pytest.mark.parametrize(("text", "allowed"), [("", True), (STRICT, False)], ids=["permissive", "strict"])
async def test_strict_rejects_plaintext_on_15006(tmp_path: Path, text: str, allowed: bool) -> None:
    async with cluster(tmp_path, three_pods) as c:
        c.set_policies(policies(text) if text else PolicySet())
        apps = await start(c)
        try:
            # The legacy-style client: plaintext straight to the server pod, captured on its :15006.
            assert await attempt(c, "client", via=sockets.INBOUND_PLAINTEXT_PORT) is allowed
            # Through the mesh, STRICT is satisfied.
            assert await attempt(c, "client")
        finally:
            for app in apps:
                await app.close()
        flags = "-" if allowed else "DENY"
        value = c.registries["node2"].get_sample_value(
            "istio_tcp_connections_closed_total",
            {
                **{k: "unknown" for k in ("source_principal", "destination_service")},
                "reporter": "destination",
                "response_flags": flags,
                "connection_security_policy": "unknown",
            }
            | _fixed_labels(c),
        )
        assert value == 1


def _fixed_labels(c: Cluster) -> dict[str, str]:
    return {
        "source_workload": "client",
        "source_canonical_service": "client",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "shop",
        "source_app": "client",
        "source_version": "v1",
        "source_cluster": "test",
        "destination_service_namespace": "unknown",
        "destination_service_name": "unknown",
        "destination_workload": "server",
        "destination_canonical_service": "server",
        "destination_canonical_revision": "v1",
        "destination_workload_namespace": "shop",
        "destination_principal": c.identity("server").uri,
        "destination_app": "server",
        "destination_version": "v1",
        "destination_cluster": "test",
        "request_protocol": "tcp",
    }


DENY_SHOP = authz("DENY", "[{from: [{source: {namespaces: [shop]}}]}]")
DENY_IPS = authz("DENY", "[{from: [{source: {ipBlocks: [127.0.0.0/8]}}]}]")
DENY_DB = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{}]
"""


def adding(text: str) -> Callable[[Cluster], None]:
    return lambda c: c.set_policies(policies(text))


def relabel_server_as_db(c: Cluster) -> None:
    inventory = c.inventory[0]
    pods = tuple(replace(p, labels={**p.labels, "app": "db"}) if p.name == "server" else p for p in inventory.pods)
    c.inventory[0] = replace(inventory, pods=pods)


@pytest.mark.parametrize(
    ("via", "before", "change"),
    [
        (sockets.OUTBOUND_PORT, "", adding(DENY_SHOP)),
        (sockets.INBOUND_PLAINTEXT_PORT, "", adding(DENY_IPS)),
        (sockets.INBOUND_PLAINTEXT_PORT, "", adding(STRICT)),
        (sockets.OUTBOUND_PORT, DENY_DB, relabel_server_as_db),
        (sockets.INBOUND_PLAINTEXT_PORT, DENY_DB, relabel_server_as_db),
    ],
    ids=["hbone-deny-namespace", "plaintext-deny-ip", "plaintext-strict", "hbone-relabel", "plaintext-relabel"],
)
async def test_policy_or_label_change_while_open_closes_within_a_second(
    tmp_path: Path, via: int, before: str, change: Callable[[Cluster], None]
) -> None:
    """A change that denies an open connection closes it: a new policy, or new labels on the destination pod
    that bring it under a selector policy (the verdict is the destination's as it is now)."""
    async with cluster(tmp_path, three_pods) as c:
        c.set_policies(policies(before) if before else PolicySet())
        apps = await start(c)
        server = c.pod("server")
        assert server.ip is not None
        try:
            sock = await connect_captured(c.net, c.pod("client"), SocketAddress(server.ip, APP_PORT), via)
            with sock:
                await asyncio.get_running_loop().sock_sendall(sock, b"first")
                assert len(await recv_exactly(sock, 5)) == 5  # the app's greeting: the connection is up end to end
                change(c)
                closed_after = await seconds_until_closed(sock)
        finally:
            for app in apps:
                await app.close()
        assert closed_after is not None and closed_after < 1.0, closed_after


async def test_sources_are_read_off_the_loop_so_a_stuck_one_stalls_no_connection(tmp_path: Path) -> None:
    """Inventory and policies are read, and the view built, in a worker thread (at 5 000 pods that is
    ~30 ms of Python per change). While node1's policy source is stuck, both tunnels keep serving; were the
    source read on the loop, the connection below could not be made until the source gave up."""
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[bool, bool]] = []  # (read on the main thread, released by the test rather than timed out)

    async with cluster(tmp_path, three_pods) as c:

        def stuck_policies() -> PolicySet:
            if armed.is_set() and not entered.is_set():
                entered.set()
                seen.append((threading.current_thread() is threading.main_thread(), release.wait(20)))
            return c.policies[0]

        await c.wait_ready(await c.start_tunnel("node1", policies=stuck_policies))
        await c.wait_ready(await c.start_tunnel("node2"))
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, APP_PORT, size=5).start()
        try:
            armed.set()
            assert await asyncio.to_thread(entered.wait, 10), "the tunnel never read its policies again"
            assert await attempt(c, "client")  # served through node1 while its source is stuck
            release.set()
            async with asyncio.timeout(10):
                while not seen:  # noqa: ASYNC110 - the worker thread reports when the source returns
                    await asyncio.sleep(0.01)
        finally:
            release.set()
            await app.close()
    assert seen == [(False, True)]
