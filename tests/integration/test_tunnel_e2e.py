"""client -> outbound (tunnel 1) -> HBONE/mTLS -> inbound (tunnel 2) -> server, on loopback, both loops.

Oracles are independent of the tunnel: the apps' own byte counts and SHA-256 digests, the source address
the server's accept() returned, and the peer certificates of the HBONE connections parsed with
`cryptography` from DER.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tunnel_harness import APP_PORT, ByteServer, cluster, connect_captured, pattern, recv_all, send_all, uri_san

from nodeagent.model import Service, ServicePort, SocketAddress
from nodeagent.ztunnel import hbone

MiB = 1 << 20


@pytest.mark.parametrize("size", [1, MiB, 1024 * MiB], ids=["1B", "1MiB", "1GiB"])
async def test_bytes_both_ways_with_half_close(tmp_path: Path, size: int) -> None:
    async with cluster(tmp_path) as c:
        t1, t2 = await c.start_both()
        server_pod, client_pod = c.pod("server"), c.pod("client")
        assert server_pod.ip is not None and client_pod.ip is not None
        app = ByteServer(server_pod.ip, size=size).start()
        try:
            sock = await connect_captured(c.net, client_pod, SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                receiving = asyncio.ensure_future(recv_all(sock))
                sent_digest = await send_all(sock, size, pattern(min(size, MiB)))
                sock.shutdown(socket.SHUT_WR)  # half-close: the server must still be able to answer
                async with asyncio.timeout(120):
                    got = await receiving
            async with asyncio.timeout(10):
                while not app.received:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            await app.close()
        server_got = app.received[0]
        assert (server_got.nbytes, server_got.digest, server_got.eof) == (size, sent_digest, True)
        assert (got.nbytes, got.digest, got.eof) == (size, app.sent_digests[0], True)
        # The app saw the client pod's own IP as the source (the inbound side connects from it).
        assert server_got.peer is not None and server_got.peer[0] == str(client_pod.ip)

        # Peer identities, from the certificates each side actually received.
        [(key, client_conn)] = t1.pool.connections()
        assert uri_san(client_conn.peer_ssl().getpeercert(binary_form=True)) == c.identity("server").uri  # type: ignore[attr-defined]
        [server_conn] = next(iter(t2._pods.values())).hbone.connections  # type: ignore[union-attr]
        assert uri_san(server_conn.peer_ssl().getpeercert(binary_form=True)) == c.identity("client").uri  # type: ignore[attr-defined]
        assert key.source_identity == c.identity("client") and key.destination_identity == c.identity("server")


async def test_metrics_access_log_and_config_dump(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="nodeagent.access")
    async with cluster(tmp_path) as c:
        t1, t2 = await c.start_both()
        server_pod, client_pod = c.pod("server"), c.pod("client")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=1000).start()
        try:
            sock = await connect_captured(c.net, client_pod, SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                receiving = asyncio.ensure_future(recv_all(sock))
                await send_all(sock, 300, b"x" * 300)
                # While open: both tunnels list the connection in /config_dump.
                async with asyncio.timeout(5):
                    while not (len(t1.table) and len(t2.table)):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                dump = await _get_json(t1.addresses["admin"], "/config_dump")
                assert [e["originalDst"] for e in dump["connections"]["outbound"]] == [f"{server_pod.ip}:{APP_PORT}"]
                assert {w["name"] for w in dump["workloads"]} == {"client", "server"}
                assert {w["workloadName"] for w in dump["workloads"]} == {"client", "server"}
                assert [e["identity"] for e in dump["certificates"]] == [c.identity("client").uri]
                # Byte counters move while the connection is open (a scrape brings them up to date).
                for tunnel in (t1, t2):
                    async with asyncio.timeout(5):
                        while _received_bytes(await _get(tunnel.addresses["metrics"], "/metrics")) != 300:  # noqa: ASYNC110
                            await asyncio.sleep(0.05)
                sock.shutdown(socket.SHUT_WR)
                async with asyncio.timeout(10):
                    await receiving
            async with asyncio.timeout(5):
                while len(t1.table) or len(t2.table):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            await app.close()

        for node, reporter in (("node1", "source"), ("node2", "destination")):
            registry = c.registries[node]
            labels = {
                "reporter": reporter,
                "source_workload": "client",
                "source_workload_namespace": "shop",
                "source_principal": c.identity("client").uri,
                "destination_workload": "server",
                "destination_principal": c.identity("server").uri,
                "connection_security_policy": "mutual_tls",
                "request_protocol": "tcp",
                "response_flags": "-",
                "source_app": "client",
                "destination_version": "v1",
                "destination_service": "unknown",
            }
            samples = {
                s.name: s
                for m in registry.collect()
                for s in m.samples
                if s.name.startswith("istio_tcp") and all(s.labels.get(k) == v for k, v in labels.items())
            }
            assert samples["istio_tcp_connections_opened_total"].value == 1, node
            assert samples["istio_tcp_connections_closed_total"].value == 1, node
            assert samples["istio_tcp_received_bytes_total"].value == 300, node
            assert samples["istio_tcp_sent_bytes_total"].value == 1000, node
            for direction in ("inbound", "outbound"):
                assert registry.get_sample_value("nodeagent_tunnel_connections_pending", {"direction": direction}) == 0
                assert registry.get_sample_value("nodeagent_tunnel_connections_active", {"direction": direction}) == 0
        metrics_text = await _get(t1.addresses["metrics"], "/metrics")
        assert "istio_tcp_connections_opened_total{" in metrics_text

    lines = [r.getMessage() for r in caplog.records if r.name == "nodeagent.access"]
    assert len(lines) == 2, lines
    outbound = next(line for line in lines if 'direction="outbound"' in line)
    inbound = next(line for line in lines if 'direction="inbound"' in line)
    for line in (outbound, inbound):
        assert 'src.workload="client"' in line and 'dst.workload="server"' in line
        assert f'src.identity="{c.identity("client").uri}"' in line
        # As ztunnel logs it: the L4 address (the destination's HBONE port), then the CONNECT target inside.
        assert f"dst.addr={server_pod.ip}:15008 dst.hbone_addr={server_pod.ip}:{APP_PORT}" in line
        assert "error=" not in line
    # ... and each side's own bytes: the client's tunnel sent the request, the server's sent the response.
    assert "bytes_sent=300 bytes_recv=1000" in outbound
    assert "bytes_sent=1000 bytes_recv=300" in inbound


def _received_bytes(metrics_text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.name == "istio_tcp_received_bytes_total"
    )


async def test_idle_connection_pings_every_interval(tmp_path: Path) -> None:
    """Both ends of an idle HBONE connection PING every keepalive interval (REFERENCE.md: every 10 s, drop
    after 20 s without a reply; shortened here). The timer waits for the reply deadline after each PING,
    so the reply must bring it forward to the interval again, or PINGs go out only every timeout."""
    limits = hbone.Limits(keepalive_interval=0.2, keepalive_timeout=1.0)
    async with cluster(tmp_path) as c:
        t1 = await c.start_tunnel("node1", limits=limits)
        t2 = await c.start_tunnel("node2", limits=limits)
        for tunnel in (t1, t2):
            await c.wait_ready(tunnel)
        server_pod, client_pod = c.pod("server"), c.pod("client")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip).start()
        try:
            sock = await connect_captured(c.net, client_pod, SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                async with asyncio.timeout(5):
                    await app.accepted.wait()
                [(_, client_conn)] = t1.pool.connections()
                [server_conn] = next(iter(t2._pods.values())).hbone.connections  # type: ignore[union-attr]
                ends = (client_conn.core, server_conn.core)
                before = [core._pings for core in ends]
                await asyncio.sleep(1.5)
                pings = [core._pings - n for core, n in zip(ends, before, strict=True)]
                assert not any(core.closed for core in ends)
        finally:
            await app.close()
    assert min(pings) >= 5, pings  # 7 at 0.2 s; 1 or 2 when each PING waits for the previous one's deadline


async def _get(endpoint: tuple[str, int], path: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{endpoint[0]}:{endpoint[1]}{path}", timeout=5) as r:
            return r.read().decode()

    return await asyncio.to_thread(fetch)


async def _get_json(endpoint: tuple[str, int], path: str) -> dict:  # type: ignore[type-arg]
    return json.loads(await _get(endpoint, path))  # type: ignore[no-any-return]


async def test_the_config_dump_shows_what_the_app_dialled_as_the_original_destination(tmp_path: Path) -> None:
    """Outbound connections in /config_dump (and `inspect connections` REMOTE TARGET): originalDst is the
    address the app connected to - a service's VIP - and actualDst where the tunnel took it (the chosen
    endpoint's HBONE address), as ztunnel's connection dump has them."""
    vip = SocketAddress.parse("10.96.0.10:80")
    async with cluster(tmp_path) as c:
        service = Service("server", "shop", {"app": "server"}, (ServicePort(80, APP_PORT),), vip.ip)  # type: ignore[arg-type]  # an IPv4 VIP
        c.inventory[0] = dataclasses.replace(c.inventory[0], services=(service,))
        t1, _ = await c.start_both()
        server_pod = c.pod("server")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=10).start()
        try:
            sock = await connect_captured(c.net, c.pod("client"), vip)
            with sock:
                await send_all(sock, 3, b"abc")
                async with asyncio.timeout(5):
                    while not len(t1.table):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                dump = await _get_json(t1.addresses["admin"], "/config_dump")
                [entry] = dump["connections"]["outbound"]
                assert (entry["originalDst"], entry["actualDst"]) == (str(vip), f"{server_pod.ip}:15008")
        finally:
            await app.close()
