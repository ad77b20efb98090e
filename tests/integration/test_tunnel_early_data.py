"""Client-first bytes go with the CONNECT (outbound.py, EARLY_MAX) and reach the server exactly once.

The client writes before the tunnel's outbound has handled its connection (the tunnels run on this
test's event loop, so a synchronous send before the next await is in the socket when the outbound reads
it). Oracles: the server's own byte count and SHA-256 digest, both tunnels' istio_tcp_received_bytes,
and what the outbound's early read returned (spied on, so the test fails if the early path is not taken).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import pytest
from tunnel_harness import APP_PORT, ByteServer, cluster, connect_captured, pattern, recv_all

from nodeagent.model import SocketAddress
from nodeagent.ztunnel import outbound


@pytest.mark.parametrize("size", [5, outbound.EARLY_MAX, 100_000], ids=["small", "one-record", "more-than-early"])
async def test_client_first_bytes_arrive_once_and_are_counted(
    tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    early_reads: list[int] = []
    real = outbound._early_bytes

    def spy(sock: socket.socket) -> bytes:
        data = real(sock)
        early_reads.append(len(data))
        return data

    monkeypatch.setattr(outbound, "_early_bytes", spy)
    async with cluster(tmp_path) as c:
        t1, t2 = await c.start_both()
        server_pod, client_pod = c.pod("server"), c.pod("client")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=10).start()
        payload = pattern(size)
        try:
            sock = await connect_captured(c.net, client_pod, SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                sent = sock.send(payload)  # before the outbound has run: in the socket when it reads
                rest = memoryview(payload)[sent:]
                await asyncio.get_running_loop().sock_sendall(sock, rest)
                sock.shutdown(socket.SHUT_WR)
                async with asyncio.timeout(10):
                    got = await recv_all(sock)
            async with asyncio.timeout(10):
                while not app.received or len(t1.table) or len(t2.table):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            await app.close()

    assert early_reads == [min(sent, outbound.EARLY_MAX)] and early_reads[0] > 0
    server_got = app.received[0]
    assert (server_got.nbytes, server_got.digest, server_got.eof) == (size, hashlib.sha256(payload).hexdigest(), True)
    assert (got.nbytes, got.eof) == (10, True)
    for node, reporter in (("node1", "source"), ("node2", "destination")):
        total = sum(
            s.value
            for m in c.registries[node].collect()
            for s in m.samples
            if s.name == "istio_tcp_received_bytes_total" and s.labels.get("reporter") == reporter
        )
        assert total == size, node
