"""Same-node fast path (nodeagent.ztunnel.local) on loopback: two pods served by one tunnel.

What must hold when the destination pod is this tunnel's own: the bytes arrive intact both ways with a
half-close, the app sees the client pod's IP, policy is the destination's (a DENY denies, a DENY added
while open closes it within a second), and the connection is reported like an HBONE one — an outbound
and an inbound record, Istio's labels with both principals and mutual_tls, /config_dump entries — while
no HBONE connection exists at all. Oracles: the apps' byte counts and digests, the address the server's
accept() returned, the Prometheus registry, the admin endpoint, the access log.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path

import pytest
from tunnel_harness import (
    APP_PORT,
    ByteServer,
    Cluster,
    Net,
    answered,
    cluster,
    connect_captured,
    deny_client,
    make_pod,
    pattern,
    recv_all,
    recv_exactly,
    seconds_until_closed,
    send_all,
)

from nodeagent.model import Pod, SocketAddress

MiB = 1 << 20


def one_node(net: Net) -> list[Pod]:
    return [make_pod(net, "client", "node1", 10), make_pod(net, "server", "node1", 20)]


def hbone_connections(c: Cluster) -> float:
    registry = c.registries["node1"]
    return sum(
        registry.get_sample_value("nodeagent_tunnel_hbone_connections", {"role": r}) or 0 for r in ("client", "server")
    )


def istio_samples(c: Cluster, reporter: str, flags: str = "-") -> dict[str, float]:
    labels = {
        "reporter": reporter,
        "source_workload": "client",
        "source_principal": c.identity("client").uri,
        "destination_workload": "server",
        "destination_principal": c.identity("server").uri,
        "connection_security_policy": "mutual_tls",
        "response_flags": flags,
    }
    return {
        s.name: s.value
        for m in c.registries["node1"].collect()
        for s in m.samples
        if s.name.startswith("istio_tcp") and all(s.labels.get(k) == v for k, v in labels.items())
    }


async def get_json(endpoint: tuple[str, int], path: str) -> dict:  # type: ignore[type-arg]
    def fetch() -> dict:  # type: ignore[type-arg]
        with urllib.request.urlopen(f"http://{endpoint[0]}:{endpoint[1]}{path}", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    return await asyncio.to_thread(fetch)


async def test_bytes_both_ways_reported_like_hbone_without_hbone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="nodeagent.access")
    size = 8 * MiB
    async with cluster(tmp_path, one_node) as c:
        tunnel = await c.start_ready("node1")
        server_pod, client_pod = c.pod("server"), c.pod("client")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=size).start()
        try:
            sock = await connect_captured(c.net, client_pod, SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                receiving = asyncio.ensure_future(recv_all(sock))
                sent_digest = await send_all(sock, size, pattern(MiB))
                async with asyncio.timeout(10):
                    while len(tunnel.table) < 2:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                dump = (await get_json(tunnel.addresses["admin"], "/config_dump"))["connections"]
                sock.shutdown(socket.SHUT_WR)  # half-close: the server still answers
                async with asyncio.timeout(60):
                    got = await receiving
            async with asyncio.timeout(10):
                while not app.received or len(tunnel.table):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            await app.close()
        server_got = app.received[0]
        assert (server_got.nbytes, server_got.digest, server_got.eof) == (size, sent_digest, True)
        assert (got.nbytes, got.digest, got.eof) == (size, app.sent_digests[0], True)
        assert server_got.peer is not None and server_got.peer[0] == str(client_pod.ip)
        # No HBONE at all: no pooled connection, no TLS connection either way.
        assert tunnel.pool.connections() == [] and hbone_connections(c) == 0

        target = f"{server_pod.ip}:{APP_PORT}"
        for direction in ("outbound", "inbound"):
            [entry] = dump[direction]
            assert (entry["originalDst"], entry["actualDst"]) == (target, target)
            assert (entry["srcIdentity"], entry["dstIdentity"]) == (c.identity("client").uri, c.identity("server").uri)
        for reporter in ("source", "destination"):
            samples = istio_samples(c, reporter)
            assert samples["istio_tcp_connections_opened_total"] == 1, reporter
            assert samples["istio_tcp_connections_closed_total"] == 1, reporter
            assert samples["istio_tcp_received_bytes_total"] == size, reporter
            assert samples["istio_tcp_sent_bytes_total"] == size, reporter

    lines = [r.getMessage() for r in caplog.records if r.name == "nodeagent.access"]
    assert sorted(line.split('direction="')[1].split('"')[0] for line in lines) == ["inbound", "outbound"]
    for line in lines:
        assert f'src.identity="{c.identity("client").uri}"' in line and "dst.hbone_addr=-" in line
        assert f"bytes_sent={size} bytes_recv={size}" in line and "error=" not in line


async def attempt(c: Cluster) -> bool:
    server = c.pod("server")
    assert server.ip is not None
    return await answered(connect_captured(c.net, c.pod("client"), SocketAddress(server.ip, APP_PORT)), b"hello")


async def test_deny_policy_denies(tmp_path: Path) -> None:
    async with cluster(tmp_path, one_node) as c:
        deny_client(c)
        tunnel = await c.start_ready("node1")
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=5).start()
        try:
            assert await attempt(c) is False
        finally:
            await app.close()
        assert not app.accepted.is_set()  # the app never saw a connection
        assert tunnel.pool.connections() == []
        assert istio_samples(c, "source", "DENY")["istio_tcp_connections_closed_total"] == 1
        assert istio_samples(c, "destination", "DENY")["istio_tcp_connections_closed_total"] == 1


async def test_deny_added_while_open_closes_within_a_second(tmp_path: Path) -> None:
    async with cluster(tmp_path, one_node) as c:
        await c.start_ready("node1")
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=5).start()
        try:
            sock = await connect_captured(c.net, c.pod("client"), SocketAddress(server.ip, APP_PORT))
            with sock:
                assert len(await recv_exactly(sock, 5)) == 5  # the app's bytes: the connection is up end to end
                deny_client(c)
                closed_after = await seconds_until_closed(sock)
        finally:
            await app.close()
        assert closed_after < 1.0, closed_after


async def test_fast_path_off_takes_hbone(tmp_path: Path) -> None:
    async with cluster(tmp_path, one_node) as c:
        tunnel = await c.start_ready("node1", same_node_fast_path=False)
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=5).start()
        try:
            assert await attempt(c)
        finally:
            await app.close()
        [(key, _)] = tunnel.pool.connections()
        assert key.destination.port == 15008
