"""HBONE connections do not outlive the trust they were authenticated with (loopback, both loops, real time).

A pooled connection never idles while traffic flows, so without a check it would carry new streams long
after the client's certificate expired or the trust bundle changed. Each test keeps one proxied connection
open across such a change and checks that the next one is carried by a NEW HBONE connection (handshaken
again with the current certificate and roots), that the open one carries on, and that the old HBONE
connection closes as soon as its last stream ends instead of idling for minutes. Certificates here are
real, short-lived ones from the CA (`cert_ttl`), so the tests wait for a real expiry (about 3 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import time
from pathlib import Path

from tunnel_harness import APP_PORT, Cluster, cluster, connect_captured
from tunnel_pki import Ca

from nodeagent.model import IPAddress, SocketAddress
from nodeagent.ztunnel import hbone, sockets
from nodeagent.ztunnel.edges import LocalPod
from nodeagent.ztunnel.hbone_transport import HboneProtocol
from nodeagent.ztunnel.outbound import HboneConnector
from nodeagent.ztunnel.pool import HbonePool
from nodeagent.ztunnel.routing import PoolKey

CERT_TTL = 3  # seconds: the client workload's certificates


class Echo:
    """On ip:APP_PORT: echoes every connection until its EOF; `ended` gets what each sent, once it ended."""

    def __init__(self, ip: IPAddress) -> None:
        self.accepted = 0
        self.ended: asyncio.Queue[bytes] = asyncio.Queue()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((str(ip), APP_PORT))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self._tasks = {asyncio.get_running_loop().create_task(self._serve())}

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            self.accepted += 1
            self._tasks.add(loop.create_task(self._echo(sock)))

    async def _echo(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        got = b""
        with sock, contextlib.suppress(ConnectionError):
            while data := await loop.sock_recv(sock, 65536):
                got += data
                await loop.sock_sendall(sock, data)
        self.ended.put_nowait(got)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._listener.close()


async def _echoed(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)
    got = b""
    async with asyncio.timeout(5):
        while len(got) < len(data):
            more = await loop.sock_recv(sock, 65536)
            assert more, f"the proxied connection ended after {got!r}"
            got += more
    assert got == data


def _hbone_connections(c: Cluster) -> list[HboneProtocol]:
    return [conn for _, conn in c.tunnels["node1"].pool.connections()]


async def _old_goes_when_its_stream_ends(c: Cluster, long: socket.socket, old: HboneProtocol) -> None:
    """The proxied connection on the old HBONE connection still works, ends, and takes the old one with it."""
    await _echoed(long, b"still here")
    long.close()
    await asyncio.wait_for(old.closed.wait(), 3)  # not the pool's 5 min idle timeout
    assert old not in _hbone_connections(c)


def _server_app(c: Cluster) -> tuple[Echo, SocketAddress]:
    """The server pod's echo app, listening, and its address."""
    server = c.pod("server")
    assert server.ip is not None
    return Echo(server.ip), SocketAddress(server.ip, APP_PORT)


def _client_to_server_app(c: Cluster) -> tuple[PoolKey, LocalPod, hbone.ConnectRequest]:
    """What a pool needs to open streams from the client pod to the server's app, driven by the test."""
    client, server = c.pod("client"), c.pod("server")
    assert client.ip is not None and server.ip is not None
    key = PoolKey(c.identity("client"), c.identity("server"), client.ip, SocketAddress(server.ip, sockets.HBONE_PORT))
    origin = LocalPod(client.uid, client.name, client.namespace, c.identity("client"), None)
    return key, origin, hbone.ConnectRequest(SocketAddress(server.ip, APP_PORT))


async def test_an_expired_client_certificate_moves_new_streams_to_a_new_connection(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await c.start_both(node1={"cert_ttl": CERT_TTL})
        client = c.pod("client")
        app, target = _server_app(c)
        try:
            certs = c.certs["node1"]
            used_before = certs.material(c.identity("client")).not_after
            long = await connect_captured(c.net, client, target)
            await _echoed(long, b"first")
            [old] = _hbone_connections(c)
            # Whichever certificate the connection presented, it has expired once both of these have.
            expired_at = max(used_before, certs.material(c.identity("client")).not_after)
            assert expired_at - time.time() <= CERT_TTL
            await asyncio.sleep(expired_at - time.time() + 0.2)
            assert certs.material(c.identity("client")).not_after > time.time()  # renewed meanwhile

            second = await connect_captured(c.net, client, target)
            await _echoed(second, b"second")
            conns = _hbone_connections(c)
            assert len(conns) == 2, "the new stream rode the connection authenticated with the expired certificate"
            [new] = [conn for conn in conns if conn is not old]
            assert (old.active_streams, new.active_streams) == (1, 1)
            assert "our certificate on it has expired" in old.close_reason  # retired by the pool itself
            assert old.refusing and not old.closed.is_set()

            await _old_goes_when_its_stream_ends(c, long, old)
            await _echoed(second, b"and on")
            second.close()
            assert app.accepted == 2
        finally:
            app.close()


async def test_a_trust_bundle_change_moves_new_streams_to_a_new_connection(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        bundle = tmp_path / "node1-bundle.pem"
        shutil.copy(c.ca.store.bundle_path, bundle)
        await c.start_both(node1={"bundle_path": bundle})
        client = c.pod("client")
        app, target = _server_app(c)
        try:
            long = await connect_captured(c.net, client, target)
            await _echoed(long, b"first")
            [old] = _hbone_connections(c)

            # `ca rotate start`: node1 now trusts a second root too (any change of the set counts).
            with bundle.open("ab") as f:
                f.write(Ca.new("next root").pem)
            assert c.certs["node1"].reload_bundle()
            await asyncio.sleep(1.2)  # the tunnel looks at the bundle at most once a second per connection

            second = await connect_captured(c.net, client, target)
            await _echoed(second, b"second")
            conns = _hbone_connections(c)
            assert len(conns) == 2, "the new stream rode a connection verified against the previous bundle"
            [new] = [conn for conn in conns if conn is not old]
            assert (old.active_streams, new.active_streams) == (1, 1)
            assert "the trust bundle has changed" in old.close_reason

            await _old_goes_when_its_stream_ends(c, long, old)
            await _echoed(second, b"and on")
            second.close()
        finally:
            app.close()


async def test_the_server_refuses_new_streams_from_an_expired_client_and_the_client_retries(tmp_path: Path) -> None:
    """The client here does not look at its own certificate's expiry (ztunnel's pool does not either): the
    destination's tunnel refuses the CONNECT that reaches it on the stale connection (REFUSED_STREAM, then a
    graceful GOAWAY) and the pool, as for a draining peer, retries it on a new connection, which succeeds."""
    async with cluster(tmp_path) as c:
        t1, _ = await c.start_both(node1={"cert_ttl": CERT_TTL})
        app, _ = _server_app(c)
        connector = HboneConnector(t1.deps)

        async def connect_unchecked(key: PoolKey, pod: LocalPod) -> HboneProtocol:
            conn = await connector(key, pod)
            conn.trust = None  # this client never retires a connection itself
            return conn

        pool = HbonePool(connect_unchecked)
        connector.pool = pool
        key, origin, request = _client_to_server_app(c)
        try:
            certs = c.certs["node1"]
            used_before = certs.material(c.identity("client")).not_after
            long, old = await pool.open_stream(key, request, origin)
            expired_at = max(used_before, certs.material(c.identity("client")).not_after)
            await asyncio.sleep(expired_at - time.time() + 0.2)

            _, new = await pool.open_stream(key, request, origin)  # refused on `old`, retried on a new one
            assert new is not old, "the server took a new stream from a client whose certificate has expired"
            assert old.refusing and "GOAWAY" in old.close_reason
            assert not old.closed.is_set() and old.active_streams == 1  # the open stream carries on

            long.write(b"still here")
            long.write_eof()
            assert await asyncio.wait_for(app.ended.get(), 3) == b"still here"
            long.close()
            await asyncio.wait_for(old.closed.wait(), 3)
            assert app.accepted == 2
        finally:
            pool.close_all()
            app.close()


async def test_a_bundle_change_the_server_sees_first_moves_streams_past_every_stale_pooled_connection(
    tmp_path: Path,
) -> None:
    """Nodes see a new bundle at different times (it reaches each node's file on its own schedule): the
    destination's tunnel then refuses a stream on each of the client's old connections in turn, while the
    client, its own bundle unchanged, still finds them usable. Each refusal leaves that connection refusing,
    so the pool must go on until it opens a new connection however many old ones it pooled — it used to give
    up after 3 refusals, and with 4 or more pooled connections for a key the proxied connection failed."""
    async with cluster(tmp_path) as c:
        bundle = tmp_path / "node2-bundle.pem"
        shutil.copy(c.ca.store.bundle_path, bundle)
        t1, _ = await c.start_both(node2={"bundle_path": bundle})
        app, _ = _server_app(c)
        connector = HboneConnector(t1.deps)
        pool = HbonePool(connector, max_streams=2)
        connector.pool = pool
        key, origin, request = _client_to_server_app(c)
        try:
            opened = [await pool.open_stream(key, request, origin) for _ in range(8)]
            old = list(dict.fromkeys(conn for _, conn in opened))
            assert len(old) == 4
            for conn in old:  # one stream ends on each: every old connection has room for one more
                next(stream for stream, on in opened if on is conn).close()
            assert [conn.active_streams for conn in old] == [1, 1, 1, 1]

            with bundle.open("ab") as f:  # only the destination's node has the new root so far
                f.write(Ca.new("next root").pem)
            assert c.certs["node2"].reload_bundle()
            await asyncio.sleep(1.2)  # the server looks at the bundle at most once a second per connection

            _, new = await pool.open_stream(key, request, origin)
            assert new not in old
            assert all(conn.refusing for conn in old)
            assert app.accepted == 9
        finally:
            pool.close_all()
            app.close()
