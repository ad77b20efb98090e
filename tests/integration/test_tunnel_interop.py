"""HBONE interop with HTTP/2 code that is not ours: Node.js's built-in http2 module (nghttp2 inside).

The tunnel's own tests talk to it with its own HBONE client and python-h2; a shared misreading of
HBONE (header shape, flow control, END_STREAM mapping, TLS settings, SPIFFE checks) would pass them.
Here the peer on the other side is tests/integration/interop/*.cjs run by `node`:

- `hbone_client.cjs` opens mTLS 1.3 + ALPN h2 to a tunnel's :15008 with a CA-issued certificate and
  no SNI, checks the server's SPIFFE URI SAN itself, sends CONNECT and relays random bytes both ways;
- `connect_server.cjs` is an HTTP/2 CONNECT server (client certificate required and verified against
  the mesh root) that the tunnel's *outbound* client relays through, instead of a second tunnel.

Oracles: the apps' byte counts and SHA-256 digests, what the Node processes report about the TLS session
and the peer certificate they received, the address the app's accept() returned, and the tunnel's
access log and Istio metrics. Node.js is required, not optional: a missing `node` fails with the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from identity_support import NODE1_TOKEN, NODE2_TOKEN, RunningCA
from tunnel_harness import (
    APP_PORT,
    ByteServer,
    Cluster,
    cluster,
    connect_captured,
    pattern,
    recv_all,
    send_all,
    uri_san,
)

from nodeagent.ca.client import CAClient
from nodeagent.model import Identity, Pod, SocketAddress
from nodeagent.ztunnel import sockets
from nodeagent.ztunnel.certs import CertMaterial, make_csr
from nodeagent.ztunnel.proxy.tunnel import Tunnel
from nodeagent.ztunnel.tls import CIPHER_SUITES

MiB = 1 << 20
INTEROP = Path(__file__).parent / "interop"


def node_binary() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail(
            "Node.js is required for the HBONE interop tests (its built-in http2 module is the independent "
            "peer): install it with `apt-get install nodejs` (Debian 12's nodejs 18 is enough) — it belongs in "
            "scripts/setup.sh's apt package list"
        )
    return path


@dataclass(frozen=True)
class PemFiles:
    identity: Identity
    cert: Path  # leaf + intermediates
    key: Path
    ca: Path  # the mesh trust bundle


async def issue(ca: RunningCA, identity: Identity, node_token: str, directory: Path) -> PemFiles:
    """A certificate for `identity` from the real CA, asked for by the node agent of the pod's node."""
    client = CAClient(ca.target, token=lambda: node_token, bundle_pem=ca.bundle)
    try:
        key, csr = make_csr(identity)
        material = CertMaterial.from_response(identity, await client.fetch(identity, csr), key)
    finally:
        await client.close()
    return _write_pem(material, ca.bundle(), directory)


def _write_pem(material: CertMaterial, bundle: str, directory: Path) -> PemFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = PemFiles(material.identity, directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
    files.cert.write_text(material.presented_chain_pem())
    files.key.write_bytes(material.key_pem)
    files.key.chmod(0o600)
    files.ca.write_text(bundle)
    return files


async def run_node_client(
    config: dict[str, Any], within: float = 120, on_pause: Callable[[], Awaitable[None]] | None = None
) -> dict[str, Any]:
    """Run hbone_client.cjs; with `on_pause`, it pauses after config["pauseAt"] bytes and resumes once
    on_pause() has returned."""
    resume = None
    if on_pause is not None:
        resume = Path(config["key"]).parent / "resume"
        config = {**config, "resumeWhen": str(resume)}
    proc = await asyncio.create_subprocess_exec(
        node_binary(),
        str(INTEROP / "hbone_client.cjs"),
        json.dumps(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(within):
            if on_pause is not None and resume is not None:
                assert proc.stdout is not None
                first = await proc.stdout.readline()
                assert json.loads(first) == {"event": "paused"}, first
                await on_pause()
                resume.touch()
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = out.decode().strip().splitlines()
    assert lines, f"the Node client printed nothing (exit {proc.returncode}); stderr: {err.decode()}"
    result: dict[str, Any] = json.loads(lines[-1])
    result["exit"] = proc.returncode
    result["stderr"] = err.decode()
    return result


async def node_client_to_server(
    c: Cluster,
    tmp_path: Path,
    *,
    size: int,
    port: int = APP_PORT,
    expect: str = "server",
    within: float = 120,
    pause_at: int | None = None,
    on_pause: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Node's http2 client, as the client pod (its certificate and address), CONNECTs through the server pod's
    :15008 to `server:port`, expecting the SPIFFE ID of `expect` from the TLS peer."""
    server_pod, client_pod = c.pod("server"), c.pod("client")
    assert server_pod.ip is not None and client_pod.ip is not None
    pem = await issue(c.ca, c.identity("client"), NODE1_TOKEN, tmp_path / "node-client")
    config = {
        "host": str(server_pod.ip),
        "port": sockets.HBONE_PORT,
        "localAddress": str(client_pod.ip),
        "authority": f"{server_pod.ip}:{port}",
        "ca": str(pem.ca),
        "cert": str(pem.cert),
        "key": str(pem.key),
        "expectId": c.identity(expect).uri,
        "size": size,
    }
    if pause_at is not None:
        config["pauseAt"] = pause_at
    return await run_node_client(config, within=within, on_pause=on_pause)


@dataclass
class NodeServer:
    proc: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()


@contextlib.asynccontextmanager
async def node_connect_server(files: PemFiles, host: str, port: int) -> AsyncIterator[NodeServer]:
    config = {"host": host, "port": port, "ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}
    proc = await asyncio.create_subprocess_exec(
        node_binary(),
        str(INTEROP / "connect_server.cjs"),
        json.dumps(config),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    server = NodeServer(proc)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(15):
            first = await proc.stdout.readline()
        if not first:
            raise AssertionError(f"the Node CONNECT server did not start: {(await proc.stderr.read()).decode()}")
        server.events.append(json.loads(first))
        assert server.events[0] == {"event": "listening", "port": port}, server.events

        async def read_events() -> None:
            assert proc.stdout is not None
            async for line in proc.stdout:
                server.events.append(json.loads(line))

        reader = asyncio.ensure_future(read_events())
        try:
            yield server
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def _until(condition: Any, within: float = 10) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 (conditions spread over processes and tunnels)
            await asyncio.sleep(0.01)


def _istio_sample(c: Cluster, node: str, name: str, labels: dict[str, str]) -> float:
    values = [
        s.value
        for m in c.registries[node].collect()
        for s in m.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) == 1, (name, labels, values)
    return values[0]


def _access_lines(caplog: pytest.LogCaptureFixture, direction: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "nodeagent.access" and f'direction="{direction}"' in r.getMessage()
    ]


# -- a: Node's http2 client -> the tunnel's inbound :15008 -> app -------------------------------------------


@pytest.mark.parametrize("size", [MiB, 20 * MiB], ids=["1MiB", "20MiB"])
async def test_node_http2_client_relays_through_inbound(
    tmp_path: Path, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """20 MiB exceeds the tunnel's 16 MiB connection window both ways: WINDOW_UPDATEs must interoperate."""
    caplog.set_level("INFO", logger="nodeagent.access")
    async with cluster(tmp_path) as c:
        t2 = await c.start_tunnel("node2")
        await c.wait_ready(t2)
        server_pod, client_pod = c.pod("server"), c.pod("client")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=size).start()
        try:
            out = await node_client_to_server(c, tmp_path, size=size)
            assert out["exit"] == 0 and "error" not in out, out
            await _until(lambda: app.received and not len(t2.table))
        finally:
            await app.close()

        # The Node client's view: a 200, HBONE's TLS settings, and the server's SVID.
        assert out["status"] == 200
        assert (out["alpn"], out["tlsVersion"]) == ("h2", "TLSv1.3")
        assert out["cipher"] in CIPHER_SUITES
        assert out["peerId"] == c.identity("server").uri
        # Equal bytes both ways, and the half-close (END_STREAM -> FIN) reached the app.
        got = app.received[0]
        assert (got.nbytes, got.digest, got.eof) == (size, out["sentSha256"], True)
        assert (out["received"], out["receivedSha256"]) == (size, app.sent_digests[0])
        assert got.peer is not None and got.peer[0] == str(client_pod.ip)

        # The tunnel recorded the Node client's SPIFFE identity (from its certificate) in metrics and log.
        labels = {
            "reporter": "destination",
            "source_principal": c.identity("client").uri,
            "source_workload": "client",
            "destination_principal": c.identity("server").uri,
            "connection_security_policy": "mutual_tls",
            "response_flags": "-",
        }
        assert _istio_sample(c, "node2", "istio_tcp_connections_opened_total", labels) == 1
        assert _istio_sample(c, "node2", "istio_tcp_connections_closed_total", labels) == 1
        assert _istio_sample(c, "node2", "istio_tcp_received_bytes_total", labels) == size
        assert _istio_sample(c, "node2", "istio_tcp_sent_bytes_total", labels) == size
        [line] = _access_lines(caplog, "inbound")
        assert f'src.identity="{c.identity("client").uri}"' in line
        assert f"src.addr={client_pod.ip}:" in line
        assert f"bytes_sent={size} bytes_recv={size}" in line
        assert "error=" not in line


async def test_node_http2_client_keeps_its_stream_through_the_tunnels_drain(tmp_path: Path) -> None:
    """The tunnel drains with a graceful GOAWAY (framed by hand, not by h2): nghttp2 must parse it as one,
    name the stream it covers, and let that stream finish both ways."""
    size = 2 * MiB
    async with cluster(tmp_path) as c:
        t2 = await c.start_tunnel("node2", grace=10.0, drain_margin=2.0)  # connections may run 8 s into a drain
        await c.wait_ready(t2)
        server_pod = c.pod("server")
        assert server_pod.ip is not None
        app = ByteServer(server_pod.ip, size=size).start()
        draining: list[asyncio.Future[None]] = []

        async def drain_meanwhile() -> None:
            await _until(lambda: len(t2.table) == 1)
            draining.append(asyncio.ensure_future(t2.drain()))
            await asyncio.sleep(0.2)  # the GOAWAY reaches the client while it is paused

        try:
            out = await node_client_to_server(c, tmp_path, size=size, pause_at=MiB, on_pause=drain_meanwhile)
            await draining[0]
            await _until(lambda: bool(app.received))
        finally:
            await app.close()
        assert out["exit"] == 0 and "error" not in out, out
        assert out["goaway"] == {"code": 0, "lastStreamID": 1}  # NO_ERROR, covering the client's stream 1
        assert (out["status"], out["sent"], out["received"]) == (200, size, size)
        got = app.received[0]
        assert (got.nbytes, got.digest, got.eof) == (size, out["sentSha256"], True)
        assert out["receivedSha256"] == app.sent_digests[0]


@pytest.mark.parametrize(
    ("port", "status"),
    [(sockets.HBONE_PORT, 400), (sockets.OUTBOUND_PORT, 400), (APP_PORT + 1, 503)],
    ids=["hbone-port-400", "outbound-port-400", "nothing-listening-503"],
)
async def test_node_http2_client_gets_documented_status(tmp_path: Path, port: int, status: int) -> None:
    async with cluster(tmp_path) as c:
        t2 = await c.start_tunnel("node2")
        await c.wait_ready(t2)
        out = await node_client_to_server(c, tmp_path, size=10, port=port, within=30)
        assert (out["exit"], out["status"]) == (0, status), out
        if status == 503:  # the app could not be reached: ztunnel's response flag for it is CONNECT
            labels = {"reporter": "destination", "response_flags": "CONNECT"}
            assert _istio_sample(c, "node2", "istio_tcp_connections_closed_total", labels) == 1


async def test_node_http2_client_checks_the_server_spiffe_id(tmp_path: Path) -> None:
    """The Node client's own SPIFFE check is live (so its peerId assertion above means something)."""
    async with cluster(tmp_path) as c:
        t2 = await c.start_tunnel("node2")
        await c.wait_ready(t2)
        out = await node_client_to_server(c, tmp_path, size=10, expect="client", within=30)  # not who listens
        assert out["exit"] == 1 and "is not spiffe://cluster.local/ns/shop/sa/client" in out["error"], out


# -- b: app -> the tunnel's outbound -> Node's http2 CONNECT server -> app -----------------------------------


async def outbound_only(c: Cluster) -> tuple[Tunnel, Pod, Pod]:
    """node1's tunnel, ready, and no tunnel on node2 (Node.js stands in for it); the server and client pods,
    both with addresses."""
    t1 = await c.start_tunnel("node1")
    await c.wait_ready(t1)
    server_pod, client_pod = c.pod("server"), c.pod("client")
    assert server_pod.ip is not None and client_pod.ip is not None
    return t1, server_pod, client_pod


async def test_outbound_relays_through_node_connect_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="nodeagent.access")
    size = 4 * MiB
    async with cluster(tmp_path) as c:
        t1, server_pod, client_pod = await outbound_only(c)
        pem = await issue(c.ca, c.identity("server"), NODE2_TOKEN, tmp_path / "node-server")
        app = ByteServer(server_pod.ip, size=size).start()
        try:
            async with node_connect_server(pem, str(server_pod.ip), sockets.HBONE_PORT) as node:
                sock = await connect_captured(c.net, client_pod, SocketAddress(server_pod.ip, APP_PORT))
                with sock:
                    receiving = asyncio.ensure_future(recv_all(sock))
                    sent_digest = await send_all(sock, size, pattern(MiB))
                    sock.shutdown(socket.SHUT_WR)
                    async with asyncio.timeout(60):
                        got = await receiving
                await _until(lambda: app.received and not len(t1.table) and node.of("closed"))
                # The tunnel's outbound verified the Node server's SVID: the pool holds the connection
                # under the server's identity, and the certificate it received says so.
                [(key, conn)] = t1.pool.connections()
                assert key.destination_identity == c.identity("server")
                assert uri_san(conn.peer_ssl().getpeercert(binary_form=True)) == c.identity("server").uri  # type: ignore[attr-defined]
        finally:
            await app.close()

        server_got = app.received[0]
        assert (server_got.nbytes, server_got.digest, server_got.eof) == (size, sent_digest, True)
        assert (got.nbytes, got.digest, got.eof) == (size, app.sent_digests[0], True)
        # What the independent server saw: a well-formed HBONE CONNECT from the client pod's identity.
        [connect] = node.of("connect")
        assert connect == {
            "event": "connect",
            "method": "CONNECT",
            "authority": f"{server_pod.ip}:{APP_PORT}",
            "path": None,
            "forwarded": connect["forwarded"],
            "clientId": c.identity("client").uri,
            "authorized": True,
            "alpn": "h2",
            "tlsVersion": "TLSv1.3",
        }
        assert connect["forwarded"].startswith(f'for="{client_pod.ip}:')
        [closed] = node.of("closed")
        assert (closed["up"], closed["down"], closed["rstCode"]) == (size, size, 0)
        labels = {
            "reporter": "source",
            "source_principal": c.identity("client").uri,
            "destination_principal": c.identity("server").uri,
            "connection_security_policy": "mutual_tls",
            "response_flags": "-",
        }
        assert _istio_sample(c, "node1", "istio_tcp_received_bytes_total", labels) == size
        assert _istio_sample(c, "node1", "istio_tcp_sent_bytes_total", labels) == size
        [line] = _access_lines(caplog, "outbound")
        assert f"dst.addr={server_pod.ip}:{sockets.HBONE_PORT} dst.hbone_addr={server_pod.ip}:{APP_PORT}" in line
        assert "error=" not in line


async def test_outbound_streams_outlive_a_graceful_goaway_from_the_connect_server(tmp_path: Path) -> None:
    """The peer drains as ztunnel does (GOAWAY NO_ERROR, open streams run to their end): the tunnel's
    stream keeps relaying both ways after it and ends cleanly, and the next connection opens a new HBONE
    connection. (python-h2 alone ends every stream on any GOAWAY: python-hyper/h2#1181.)"""
    async with cluster(tmp_path) as c:
        t1, server_pod, client_pod = await outbound_only(c)
        pem = await issue(c.ca, c.identity("server"), NODE2_TOKEN, tmp_path / "node-server")
        block = pattern(MiB)
        app = ByteServer(server_pod.ip, size=2 * MiB).start()
        try:
            async with node_connect_server(pem, str(server_pod.ip), sockets.HBONE_PORT) as node:
                target = SocketAddress(server_pod.ip, APP_PORT)
                loop = asyncio.get_running_loop()
                sock = await connect_captured(c.net, client_pod, target)
                with sock:
                    receiving = asyncio.ensure_future(recv_all(sock))
                    await loop.sock_sendall(sock, block)
                    await _until(lambda: node.of("connect"))
                    [(_, conn)] = t1.pool.connections()
                    await node.command("goaway")
                    await _until(lambda: node.of("goaway") and conn.refusing)
                    assert not conn.closed.is_set()
                    await loop.sock_sendall(sock, block)  # after the GOAWAY, on the same stream
                    sock.shutdown(socket.SHUT_WR)
                    async with asyncio.timeout(30):
                        got = await receiving
                await _until(lambda: len(app.received) == 1 and node.of("closed"))
                await _until(conn.closed.is_set)  # no streams left: the tunnel closed its side too
                assert "graceful GOAWAY" in conn.close_reason
                # A new connection: a new HBONE connection (the GOAWAY'd one takes no more streams).
                second = await connect_captured(c.net, client_pod, target)
                with second:
                    second.shutdown(socket.SHUT_WR)
                    async with asyncio.timeout(30):
                        again = await recv_all(second)
                assert again.nbytes == 2 * MiB
                assert len(node.of("session")) == 2
        finally:
            await app.close()
        assert node.of("goaway")[0]["sessions"] == 1
        assert (app.received[0].nbytes, app.received[0].digest) == (2 * MiB, hashlib.sha256(block * 2).hexdigest())
        assert (got.nbytes, got.digest, got.eof) == (2 * MiB, app.sent_digests[0], True)
        first = node.of("closed")[0]
        assert (first["up"], first["down"], first["rstCode"]) == (2 * MiB, 2 * MiB, 0)


async def test_outbound_refuses_a_connect_server_with_the_wrong_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA-issued certificate of the same trust domain, but not the destination's SPIFFE ID: no relay."""
    caplog.set_level("INFO", logger="nodeagent.access")
    async with cluster(tmp_path) as c:
        t1, server_pod, client_pod = await outbound_only(c)
        impostor = await issue(c.ca, c.identity("client"), NODE1_TOKEN, tmp_path / "impostor")
        app = ByteServer(server_pod.ip, size=100).start()
        try:
            async with node_connect_server(impostor, str(server_pod.ip), sockets.HBONE_PORT) as node:
                sock = await connect_captured(c.net, client_pod, SocketAddress(server_pod.ip, APP_PORT))
                with sock:
                    await send_all(sock, 100, b"x" * 100)
                    try:
                        async with asyncio.timeout(15):
                            got = await recv_all(sock)
                        assert got.nbytes == 0
                    except ConnectionResetError:
                        pass  # the tunnel resets the captured connection: the expected outcome
                await _until(lambda: not len(t1.table))
                await asyncio.sleep(0.2)
                assert not node.of("connect"), node.events  # no CONNECT was ever sent to the impostor
        finally:
            await app.close()
        assert not app.accepted.is_set()
        failures = c.registries["node1"].get_sample_value(
            "nodeagent_tunnel_peer_verification_failures_total", {"reason": "identity_mismatch"}
        )
        assert failures == 1
        assert not t1.pool.connections()
        [line] = _access_lines(caplog, "outbound")
        assert f"expected {c.identity('server').uri}" in line and "error=" in line
