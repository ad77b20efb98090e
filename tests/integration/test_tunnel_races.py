"""Edges where an event lands between two steps of a proxied connection's set-up, on loopback, both loops.

Each test pins one such window open (an app that resets at once, a slow upstream connect, a peer that
dies while the server connects upstream, a pod that leaves, a process out of file descriptors) and
checks what a client and the tunnel's own bookkeeping see afterwards: the client is answered (reset or
EOF, never left hanging), nothing outlives its connection, and the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tunnel_harness import APP_PORT, ByteServer, cluster, connect_captured, deny_client, recv_all

from nodeagent.model import Identity, SocketAddress
from nodeagent.ztunnel import inbound, sockets
from nodeagent.ztunnel.edges import LocalPod
from nodeagent.ztunnel.pool import HbonePool

REPO = Path(__file__).resolve().parents[2]


class App:
    """On APP_PORT: resets every connection as it accepts it (`reset`: a crashing or overloaded server),
    or reads each until its end and counts the ends (`ended`)."""

    def __init__(self, ip: object, *, reset: bool) -> None:
        self.reset = reset
        self.ended = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((str(ip), APP_PORT))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.tasks = {asyncio.get_running_loop().create_task(self._run())}

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            if self.reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            else:
                self.tasks.add(loop.create_task(self._read(sock)))

    async def _read(self, sock: socket.socket) -> None:
        with sock, contextlib.suppress(ConnectionResetError):
            while await asyncio.get_running_loop().sock_recv(sock, 65536):
                pass
        self.ended += 1

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.listener.close()


async def _answer(sock: socket.socket, wait: float = 3.0) -> str:
    """What the client sees next: data, EOF or a reset; "nothing" if it is left hanging."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(wait):
            data = await loop.sock_recv(sock, 65536)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "nothing"
    return f"data {data!r}" if data else "EOF"


async def _wait_empty(*tunnels: object) -> None:
    async with asyncio.timeout(5):
        while any(len(t.table) for t in tunnels):  # type: ignore[attr-defined]  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("late", [0.0, 0.05], ids=["prompt", "late-attach"])
async def test_a_stream_lost_before_the_relay_attaches_resets_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: float
) -> None:
    """The 200 wakes the outbound task a loop turn later; a reset arriving meanwhile (the app resets as it
    accepts) found no relay leg and was dropped: the client was left hanging, its record open."""
    if late:
        real_open = HbonePool.open_stream

        async def open_late(self: HbonePool, *args: object, **kwargs: object) -> object:
            opened = await real_open(self, *args, **kwargs)  # type: ignore[arg-type]
            await asyncio.sleep(late)  # a busy loop: the reset lands before attach()
            return opened

        monkeypatch.setattr(HbonePool, "open_stream", open_late)
    async with cluster(tmp_path) as c:
        t1, t2 = await c.start_both()
        server = c.pod("server")
        assert server.ip is not None
        app = App(server.ip, reset=True)
        loop = asyncio.get_running_loop()
        try:
            answers = []
            for _ in range(5):
                with await connect_captured(c.net, c.pod("client"), SocketAddress(server.ip, APP_PORT)) as sock:
                    await loop.sock_sendall(sock, b"hello")
                    answers.append(await _answer(sock))
            assert "nothing" not in answers, answers
            await _wait_empty(t1, t2)
        finally:
            app.close()


async def test_a_deny_applied_while_the_upstream_connect_runs_refuses_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Authorized, then a DENY arrives during the (slow) connect to the app: a policy change re-checks the
    connections in the table, and this one was not in it yet, so it lived on under the DENY."""
    real_connect = sockets.connect
    connecting = asyncio.Event()

    async def slow_connect(sock: socket.socket, target: SocketAddress, *, connect_timeout: float) -> socket.socket:
        if target.port == APP_PORT:  # the inbound tunnel's connect to the app
            connecting.set()
            await asyncio.sleep(0.5)
        return await real_connect(sock, target, connect_timeout=connect_timeout)

    monkeypatch.setattr(sockets, "connect", slow_connect)
    async with cluster(tmp_path) as c:
        t1, t2 = await c.start_both()
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=5).start()
        loop = asyncio.get_running_loop()
        try:
            with await connect_captured(c.net, c.pod("client"), SocketAddress(server.ip, APP_PORT)) as sock:
                await loop.sock_sendall(sock, b"first")
                async with asyncio.timeout(5):
                    await connecting.wait()
                deny_client(c)
                await t2.refresh()
                assert await _answer(sock) == "reset"
            await _wait_empty(t1, t2)
            assert not app.received  # the app never saw a byte of it
        finally:
            await app.close()


async def test_a_stream_whose_connection_died_during_the_upstream_connect_is_not_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's HBONE connection dies after the server connected upstream but before it answered:
    accept() answered on a dead connection, the stream was never lost and the app connection leaked."""
    tunnels: list[object] = []
    real_tcp_side = inbound.tcp_side

    async def peer_dies_first(sock: socket.socket, leg: object) -> object:
        for _, conn in tunnels[0].pool.connections():  # type: ignore[attr-defined]
            conn.transport.abort()  # the client tunnel's connection goes away (RST)...
        await asyncio.sleep(0.05)  # ...and the server sees it before it answers
        return await real_tcp_side(sock, leg)  # type: ignore[arg-type]

    monkeypatch.setattr(inbound, "tcp_side", peer_dies_first)
    async with cluster(tmp_path) as c:
        t1, t2 = await c.start_both()
        tunnels.append(t1)
        server = c.pod("server")
        assert server.ip is not None
        app = App(server.ip, reset=False)
        loop = asyncio.get_running_loop()
        try:
            with await connect_captured(c.net, c.pod("client"), SocketAddress(server.ip, APP_PORT)) as sock:
                await loop.sock_sendall(sock, b"hi")
                assert await _answer(sock) == "reset"
            await _wait_empty(t1, t2)
            async with asyncio.timeout(5):
                while not app.ended:  # noqa: ASYNC110  # the app's connection was closed, not leaked
                    await asyncio.sleep(0.01)
        finally:
            app.close()


async def test_a_pod_leaving_closes_the_pooled_connections_made_in_its_netns(tmp_path: Path) -> None:
    """A new pod with the same IP and identity has the same pool key: it must not inherit a connection
    whose socket lives in the old pod's netns."""
    async with cluster(tmp_path) as c:
        t1, _ = await c.start_both()
        server, client = c.pod("server"), c.pod("client")
        assert server.ip is not None
        app = ByteServer(server.ip, size=5).start()
        loop = asyncio.get_running_loop()
        try:
            with await connect_captured(c.net, client, SocketAddress(server.ip, APP_PORT)) as sock:
                await loop.sock_sendall(sock, b"x")
                sock.shutdown(socket.SHUT_WR)
                async with asyncio.timeout(5):
                    await recv_all(sock)
            [(_, conn)] = t1.pool.connections()
            await t1.remove_pod(client.uid)
            async with asyncio.timeout(5):
                await conn.closed.wait()
            assert t1.pool.connections() == []
        finally:
            await app.close()


ACCEPT_UNDER_EMFILE = textwrap.dedent(
    """
    import asyncio, json, resource, socket, sys
    import uvloop
    from nodeagent.ztunnel.inbound import accept_loop

    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        listener.setblocking(False)
        address = listener.getsockname()
        accepted = []
        task = asyncio.get_running_loop().create_task(accept_loop(listener, accepted.append))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        clients = await asyncio.create_subprocess_exec(
            sys.executable, "-c",
            "import socket, sys, time; a = (sys.argv[1], int(sys.argv[2]));"
            "s = [socket.create_connection(a) for _ in range(100)]; time.sleep(2)",
            *map(str, address),
        )
        await asyncio.sleep(1)  # the process is out of file descriptors: accept fails with EMFILE
        for sock in accepted:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        accepted.clear()
        late = socket.create_connection(address)
        for _ in range(300):
            if accepted and not task.done():
                break
            await asyncio.sleep(0.01)
        print(json.dumps({"task_done": task.done(), "accepted_after": len(accepted)}))
        late.close()
        await clients.wait()

    (uvloop.run if sys.argv[1] == "uvloop" else asyncio.run)(main())
    """
)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_accept_loop_survives_running_out_of_file_descriptors(loop_name: str) -> None:
    """EMFILE (or any error accept(2) says to retry) ended the accept task for good, while the listener
    stayed bound and its queue filled: the pod's port was dead until the tunnel restarted."""
    out = subprocess.run(
        [sys.executable, "-c", ACCEPT_UNDER_EMFILE, loop_name],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"task_done": False, "accepted_after": result["accepted_after"]}, out.stderr[-2000:]
    assert result["accepted_after"] >= 1, out.stderr[-2000:]
    assert "retrying in" in out.stderr  # and it says so


def test_a_left_pods_sockets_fail_as_socket_errors() -> None:
    """A connection still being set up when its pod leaves asks the closed pod for a socket: that failed
    with RuntimeError, which the handlers (catching OSError) let through — the CONNECT unanswered, the
    captured socket not reset, the pending record never finished."""
    pod = LocalPod("uid-1", "client", "shop", Identity("cluster.local", "shop", "client"), os.open("/", os.O_RDONLY))
    pod.close()
    with pytest.raises(OSError, match="has left"):
        pod.netns_socket(socket.AF_INET)


async def test_a_slow_app_is_reported_by_the_server_not_as_a_client_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both ends used one connect timeout: the server spends it reaching a slow app, and the client, which
    started waiting earlier, gave up first and blamed the network ("a NetworkPolicy blocking the HBONE
    port?") instead of reporting the server's 503."""
    caplog.set_level("INFO", logger="nodeagent.access")
    real_connect = sockets.connect

    async def app_never_answers(sock: socket.socket, target: SocketAddress, *, connect_timeout: float) -> socket.socket:
        if target.port != APP_PORT:
            return await real_connect(sock, target, connect_timeout=connect_timeout)
        await asyncio.sleep(connect_timeout)
        sock.close()
        raise sockets.ConnectError(errno.ETIMEDOUT, f"timed out connecting to {target}")

    monkeypatch.setattr(sockets, "connect", app_never_answers)
    async with cluster(tmp_path) as c:
        t1 = await c.start_tunnel("node1", connect_timeout=0.3)
        t2 = await c.start_tunnel("node2", connect_timeout=0.3)
        await c.wait_ready(t1)
        await c.wait_ready(t2)
        server = c.pod("server")
        assert server.ip is not None
        with await connect_captured(c.net, c.pod("client"), SocketAddress(server.ip, APP_PORT)) as sock:
            assert await _answer(sock) == "reset"
        await _wait_empty(t1, t2)
    [outbound] = [r.getMessage() for r in caplog.records if 'direction="outbound"' in r.getMessage()]
    assert "503" in outbound and "NetworkPolicy" not in outbound, outbound
