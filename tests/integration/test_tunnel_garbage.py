"""A finished connection is freed by reference counting: no reference cycles left for the cyclic GC.

Why: memory of closed connections should come back when they close, not at the next full GC pass — and
with 10 000 connections held, each full pass walks every live object (~100-200 ms in the tunnel). The
relay couples its two sides through legs that point back at it; it must let go of them when both
connections are gone. (Closing 10 000 connections at once still takes the tunnel ~0.4 s of loop time:
that is the per-connection teardown work itself, measured with the cycles gone.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import socket
import threading
from pathlib import Path

import pytest
from tunnel_harness import APP_PORT, cluster, connect_captured

from nodeagent.model import SocketAddress

CONNECTIONS = 50


class _EchoApp:
    """The app: one blocking thread, one connection at a time (asyncio's own stream transports form
    cycles, which would hide or blame the tunnel's)."""

    def __init__(self, ip: object) -> None:
        self._listener = socket.create_server((str(ip), APP_PORT))
        self._thread = threading.Thread(target=self._serve, name="echo-app", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: done
            while True:
                conn, _ = self._listener.accept()
                with conn:
                    while data := conn.recv(65536):
                        conn.sendall(data)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)


@pytest.mark.parametrize("path", ["hbone", "passthrough"])
async def test_closed_connections_leave_no_cyclic_garbage(tmp_path: Path, path: str) -> None:
    async with cluster(tmp_path) as c:
        await c.start_both()
        server = c.pod("server")
        assert server.ip is not None
        target_ip = server.ip if path == "hbone" else c.net.ip(99)  # .99: not in the mesh
        app = _EchoApp(target_ip)
        loop = asyncio.get_running_loop()

        async def one() -> None:
            sock = await connect_captured(c.net, c.pod("client"), SocketAddress(target_ip, APP_PORT))
            with sock:
                await loop.sock_sendall(sock, b"x")
                async with asyncio.timeout(5):
                    assert await loop.sock_recv(sock, 1) == b"x"

        async def settled() -> None:  # every connection's record is gone from both tunnels
            async with asyncio.timeout(5):
                while any(len(t.table) for t in c.tunnels.values()):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)

        try:
            await one()  # warm-up: the pooled HBONE connection, certificates, caches
            await settled()
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(CONNECTIONS):
                    await one()
                await settled()
                gc.collect()
                # Ours only: asyncio's selector transports keep a cycle through their bound read callback
                # (uvloop's do not), which is the loop's business.
                garbage = collections.Counter(
                    type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("nodeagent.")
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
            assert not garbage, garbage.most_common(10)
        finally:
            app.close()
