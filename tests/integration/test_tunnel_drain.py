"""Drain and hand-over: the node agent's ZDS server (nodeagent.agent.zds_server) feeds two tunnels on the
same node; the old one drains while the new one, bound to the same ports via SO_REUSEPORT, takes new
connections. Established connections keep flowing until grace - margin, then end cleanly (EOF, not RST).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tunnel_harness import APP_PORT, ByteServer, Cluster, cluster, connect_captured

from nodeagent import admin
from nodeagent.agent.zds_server import ZdsServer
from nodeagent.model import IPAddress, SocketAddress
from nodeagent.ztunnel import inbound
from nodeagent.ztunnel.zds_client import Backoff

DAEMONSET = Path(__file__).resolve().parents[2] / "daemonset" / "daemonset.yaml"


@pytest.fixture
def zds_path() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="tunnel-zds-", dir="/tmp")
    yield os.path.join(root, "ztunnel.sock")
    shutil.rmtree(root)


async def roundtrip(c: Cluster, sock_payload: bytes = b"ping") -> bool:
    server = c.pod("server")
    assert server.ip is not None
    sock = await connect_captured(c.net, c.pod("client"), SocketAddress(server.ip, APP_PORT))
    loop = asyncio.get_running_loop()
    with sock:
        await loop.sock_sendall(sock, sock_payload)
        async with asyncio.timeout(5):
            return await loop.sock_recv(sock, 2) != b""


@contextlib.contextmanager
def full_accept_queue(ip: IPAddress) -> Iterator[socket.socket]:
    """An app on ip:APP_PORT whose accept queue is full (one filler connection in a backlog of 0): SYNs to it
    are dropped until the caller accepts from the yielded listener."""
    app = socket.socket()
    try:
        app.bind((str(ip), APP_PORT))
        app.listen(0)
        with socket.create_connection((str(ip), APP_PORT), timeout=5):
            yield app
    finally:
        app.close()


async def test_drain_hands_over_to_a_successor(tmp_path: Path, zds_path: str) -> None:
    async with cluster(tmp_path) as c:
        server_pod = c.pod("server")
        assert server_pod.ip is not None
        netns_stand_in = os.open("/dev/null", os.O_RDONLY)
        zds = ZdsServer(lambda: [(server_pod, netns_stand_in)], zds_path)
        await zds.start()
        app = ByteServer(server_pod.ip, size=2).start()
        try:
            await c.wait_ready(await c.start_tunnel("node1"))
            fast = Backoff(0.01, 0.05)
            old = await c.start_tunnel("node2", zds_socket=zds_path, zds_backoff=fast, grace=3.0, drain_margin=2.0)
            await c.wait_ready(old)
            assert list(old.pods) == [server_pod.uid]

            # A long-lived connection through the old tunnel.
            loop = asyncio.get_running_loop()
            long = await connect_captured(c.net, c.pod("client"), SocketAddress(server_pod.ip, APP_PORT))
            await loop.sock_sendall(long, b"hi")
            assert await loop.sock_recv(long, 2)
            assert len(old.table) == 1
            [(_, pooled)] = c.tunnels["node1"].pool.connections()  # node1 -> the old tunnel, carrying `long`

            old_registry = c.registries["node2"]
            new = c.tunnels["node2-new"] = await c.start_tunnel("node2", zds_socket=zds_path, zds_backoff=fast)
            c.tunnels["node2"] = old
            new_registry = c.registries["node2"]
            await c.wait_ready(new)
            assert list(new.pods) == [server_pod.uid]

            began = time.monotonic()
            draining = asyncio.ensure_future(old.drain())
            await asyncio.sleep(0.1)
            assert old.readiness.readiness() != []  # no longer ready
            # New connections succeed (served by the successor) while the old tunnel drains.
            for _ in range(5):
                assert await roundtrip(c)
            # The old tunnel said so with a graceful GOAWAY: node1 opened no stream there since (none was
            # refused and retried) and keeps the connection only for `long`.
            assert pooled.refusing and "graceful GOAWAY" in pooled.close_reason and not pooled.closed.is_set()
            assert pooled.streams_opened == 1
            # The established connection still works during the drain ...
            await loop.sock_sendall(long, b"more")
            # ... and ends cleanly (EOF) once grace - margin (1 s) has passed.
            async with asyncio.timeout(5):
                while await loop.sock_recv(long, 65536):
                    pass
            ended_after = time.monotonic() - began
            long.close()
            await draining
            assert 0.9 <= ended_after < 2.5, ended_after
            assert old_registry.get_sample_value("nodeagent_tunnel_connections_active", {"direction": "inbound"}) == 0
            served_new = sum(
                s.value
                for m in new_registry.collect()
                for s in m.samples
                if s.name == "istio_tcp_connections_opened_total"
            )
            assert served_new == 5
        finally:
            await app.close()
            await zds.close()
            os.close(netns_stand_in)


async def test_endpoints_taken_by_an_old_tunnel_are_bound_once_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hostNetwork rolling update: the old pod's tunnel holds :15020/:15021 until it stops. The new tunnel
    must start anyway (serving pods), and take the ports as soon as they are free."""
    monkeypatch.setattr(admin, "BIND_RETRY_S", 0.05)
    holders = []
    for _ in range(2):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        holders.append(holder)
    metrics, ready = (h.getsockname() for h in holders)
    async with cluster(tmp_path) as c:
        tunnel = await c.start_tunnel("node2", metrics=metrics, ready=ready)
        await c.wait_ready(tunnel)  # the data plane is up while the endpoints wait
        assert "metrics" not in tunnel.addresses and "ready" not in tunnel.addresses
        for holder in holders:
            holder.close()
        async with asyncio.timeout(5):
            while "ready" not in tunnel.addresses or "metrics" not in tunnel.addresses:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_connection(*ready)
        writer.write(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")
        writer.close()


def tunnel_probe(socket_path: str) -> list[str]:
    """The DaemonSet's readiness probe command for the tunnel, aimed at `socket_path` instead of the pod's."""
    [ds] = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d and d["kind"] == "DaemonSet"]
    [tunnel] = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "tunnel"]
    [arg] = [a for a in tunnel["args"] if a.startswith("--ready-socket=")]
    return [
        socket_path if part == arg.split("=", 1)[1] else part for part in tunnel["readinessProbe"]["exec"]["command"]
    ]


def probe_socket(command: list[str]) -> str:
    return command[command.index("--unix-socket") + 1]


async def run_probe(command: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL)
    return await proc.wait()


async def test_the_readiness_probe_answers_for_its_own_tunnel_only(tmp_path: Path, zds_path: str) -> None:
    """A rolling update on hostNetwork: the old pod's tunnel holds the node's :15021 and is ready. The new
    pod's probe (the manifest's exec command, run as the kubelet would) must fail until the new tunnel is
    ready itself — else the old pod is stopped while the new one serves nothing — and fail again when
    it drains."""
    old_ready = admin.AdminServer(routes=(admin.READY,))  # stands in for the old tunnel: ready
    endpoint = await old_ready.start("127.0.0.1", 0)
    probe = tunnel_probe(str(tmp_path / "run" / "ready.sock"))
    old_port_probe = ["curl", "-sf", f"http://127.0.0.1:{endpoint[1]}/healthz/ready"]
    async with cluster(tmp_path) as c:
        server_pod = c.pod("server")
        netns_stand_in = os.open("/dev/null", os.O_RDONLY)
        try:
            fast = Backoff(0.01, 0.05)
            new = await c.start_tunnel(
                "node2", zds_socket=zds_path, zds_backoff=fast, ready=endpoint, ready_socket=probe_socket(probe)
            )
            assert new.readiness.readiness() != []  # no agent yet: not ready
            assert await run_probe(old_port_probe) == 0  # what an httpGet probe on :15021 would have seen
            assert await run_probe(probe) != 0
            async with ZdsServer(lambda: [(server_pod, netns_stand_in)], zds_path):
                await c.wait_ready(new)
                assert await run_probe(probe) == 0
                draining = asyncio.ensure_future(new.drain())
                await asyncio.sleep(0.1)
                assert await run_probe(probe) != 0
                await draining
        finally:
            os.close(netns_stand_in)
            await old_ready.stop()


async def test_drain_delivers_what_the_server_sent_then_ends_with_eof(tmp_path: Path) -> None:
    """At the drain deadline the server tunnel ends each stream with END_STREAM after its queued data and
    then RST_STREAM(NO_ERROR) (it reads no more of the upload): RFC 9113 8.1, "clients MUST NOT discard
    responses as a result". The client tunnel used to take that reset as a failure and reset the app's
    connection, throwing away the response bytes still buffered towards an app that had not read them."""
    size = 4 * 1024 * 1024
    async with cluster(tmp_path) as c:
        server_pod = c.pod("server")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=size).start()
        try:
            _, node2 = await c.start_both(node2={"grace": 3.0, "drain_margin": 2.0})
            loop = asyncio.get_running_loop()
            sock = await connect_captured(c.net, c.pod("client"), SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # the rest waits in the tunnels
                await loop.sock_sendall(sock, b"upload, still open")
                async with asyncio.timeout(5):
                    await app.accepted.wait()
                await node2.drain()  # the deadline (1 s) passes with most of the response not read yet
                got = 0
                async with asyncio.timeout(10):
                    while n := len(await loop.sock_recv(sock, 1 << 20)):
                        got += n
                assert got == size  # all of it, then EOF (a reset would have raised)
        finally:
            await app.close()


async def test_a_connection_still_being_set_up_when_the_drain_starts_comes_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The app's connect() returned when the listener accepted it; the drain must not cut it while its
    CONNECT waits for an answer - even with no drain window at all (grace = margin), as long as the grace
    leaves time for it. The tunnel used to wait for established connections only, then stop() cancelled
    the one in setup: the app saw its connection close before a byte (a rolling update's failure in the
    lab's capture-mode-switch test)."""
    caplog.set_level("INFO", logger="nodeagent.access")
    async with cluster(tmp_path) as c:
        server_pod = c.pod("server")
        assert server_pod.ip is not None
        loop = asyncio.get_running_loop()
        # The server tunnel's SYN is dropped and retried after ~1 s, so the CONNECT's 200 (and the client
        # tunnel's connection) waits that long - until the app accepts one below.
        with full_accept_queue(server_pod.ip) as app:
            node1, _ = await c.start_both(node1={"grace": 3.0, "drain_margin": 3.0})
            sock = await connect_captured(c.net, c.pod("client"), SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                await asyncio.sleep(0.2)
                assert node1.table.in_setup == 1  # waiting for the CONNECT's answer
                draining = asyncio.ensure_future(node1.drain())
                await asyncio.sleep(0.2)
                app.accept()[0].close()  # room in the accept queue: the retried SYN gets through
                async with asyncio.timeout(10):
                    await draining
                    assert await loop.sock_recv(sock, 10) == b""  # came up, then closed cleanly by the drain
            async with asyncio.timeout(5):
                while len(node1.table) or node1.table.in_setup:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
    outbound = [r.getMessage() for r in caplog.records if 'direction="outbound"' in r.getMessage()]
    assert len(outbound) == 1 and "error=" not in outbound[0], outbound


async def test_the_drain_ends_within_the_grace_even_with_a_connection_stuck_in_setup(tmp_path: Path) -> None:
    """The kubelet kills the tunnel `grace` seconds after SIGTERM: waiting longer for a connection to come
    up only trades the clean closes for a kill. With a grace of 1 s and an upstream that never accepts, the
    drain used to wait 2 s for the connection in setup (and up to 1 s more for the closes)."""
    async with cluster(tmp_path) as c:
        server_pod = c.pod("server")
        assert server_pod.ip is not None
        with full_accept_queue(server_pod.ip):  # never emptied: the server tunnel's SYNs are all dropped
            node1, _ = await c.start_both(node1={"grace": 1.0, "drain_margin": 1.0})
            sock = await connect_captured(c.net, c.pod("client"), SocketAddress(server_pod.ip, APP_PORT))
            with sock:
                await asyncio.sleep(0.2)
                assert node1.table.in_setup == 1
                started = time.monotonic()
                await node1.drain()
                took = time.monotonic() - started
                assert took < 1.0 + 0.2, f"the drain took {took:.2f} s with a grace of 1 s"


async def test_an_unexpected_failure_setting_up_an_inbound_stream_still_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails between a CONNECT's arrival and its relay, the connection is answered (503) and
    finished: one left "in setup" kept the pending gauge up for good and made every later drain wait its
    whole window (the outbound side handled it; the inbound side only handled cancellation)."""
    real, calls = inbound.tcp_side, 0

    async def failing_once(sock: socket.socket, leg: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return await real(sock, leg)

    monkeypatch.setattr(inbound, "tcp_side", failing_once)
    async with cluster(tmp_path) as c:
        server_pod = c.pod("server")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=2).start()
        try:
            _, node2 = await c.start_both(node2={"grace": 1.0, "drain_margin": 1.0})
            loop = asyncio.get_running_loop()
            sock = await connect_captured(c.net, c.pod("client"), SocketAddress(server_pod.ip, APP_PORT))
            with sock, contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(5):
                    assert await loop.sock_recv(sock, 10) == b""  # answered 503: the client tunnel resets it
            assert calls == 1
            async with asyncio.timeout(5):
                while node2.table.in_setup:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert (
                c.registries["node2"].get_sample_value("nodeagent_tunnel_connections_pending", {"direction": "inbound"})
                == 0
            )
            assert await roundtrip(c)  # the next connection is served
        finally:
            await app.close()
