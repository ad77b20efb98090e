"""Hostile input on :15008, written as raw frames over mTLS (tests/integration/raw_h2.py, not h2).

Each case gets REFERENCE.md's documented answer (a 400/401 on its stream, or GOAWAY / close), the app
behind the tunnel never sees a byte it should not, and the tunnel keeps serving: a well-formed CONNECT
through the same tunnel works after every case.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from raw_h2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    Outcome,
    RawClient,
    connect_block,
    frame,
    hpack_int,
    literal,
)
from tunnel_harness import APP_PORT, ByteServer, Cluster, cluster
from tunnel_pki import Ca

from nodeagent.inventory.policies import parse_policies
from nodeagent.ztunnel import tls

ENHANCE_YOUR_CALM = 0xB
PROTOCOL_ERROR = 0x1


def client_ctx(c: Cluster, *, with_cert: bool = True, foreign: bool = False) -> ssl.SSLContext:
    """A TLS client for the hostile peer: the client pod's real certificate, none, or a foreign one."""
    certs = c.tunnels["node1"]._in.credentials
    roots = certs.bundle_pem.encode()
    if foreign:
        material = Ca.new("evil").material("spiffe://evil.example/ns/shop/sa/client", roots=roots)
    else:
        m = certs.material(c.identity("client"))
        material = tls.TlsMaterial(m.presented_chain_pem().encode(), m.key_pem, roots)
    ctx = tls.client_context(material)
    if not with_cert:
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.check_hostname = False
        bare.load_verify_locations(cadata=roots.decode())
        bare.set_alpn_protocols(["h2"])
        return bare
    return ctx


def server_addr(c: Cluster) -> tuple[str, int]:
    return (str(c.pod("server").ip), 15008)


def target(c: Cluster, port: int = APP_PORT) -> str:
    return f"{c.pod('server').ip}:{port}"


def has_status(stream: int) -> Callable[[Outcome], bool]:
    return lambda o: stream in o.statuses or o.goaway is not None


def ended(o: Outcome) -> bool:
    return o.goaway is not None


async def exchange(
    c: Cluster, payload: Callable[[Cluster], bytes], done: Callable[[Outcome], bool], **ctx: bool
) -> Outcome:
    def run() -> Outcome:
        client = RawClient(server_addr(c), client_ctx(c, **ctx))
        try:
            client.start()
            client.send(payload(c))
            return client.read_until(done)
        finally:
            client.close()

    return await asyncio.to_thread(run)


def headers(c: Cluster, blk: bytes, stream: int = 1, end_stream: bool = False) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream, blk)


BAD_REQUESTS = {
    "GET": lambda c: headers(c, connect_block(target(c), method=b"GET")),
    "lowercase connect": lambda c: headers(c, connect_block(target(c), method=b"connect")),
    ":path present": lambda c: headers(c, connect_block(target(c), extra=[(b":path", b"/")])),
    "bad authority": lambda c: headers(c, connect_block("not-an-address")),
    "mismatched authority": lambda c: headers(c, connect_block(f"{c.pod('client').ip}:{APP_PORT}")),
    "port 15001": lambda c: headers(c, connect_block(target(c, 15001))),
    "port 15006": lambda c: headers(c, connect_block(target(c, 15006))),
    "port 15008": lambda c: headers(c, connect_block(target(c, 15008))),
}


@pytest.fixture
async def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with cluster(tmp_path) as c:
        for node in ("node1", "node2"):
            await c.wait_ready(await c.start_tunnel(node))
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=2).start()
        try:
            yield c, app
            # The tunnel still serves a well-formed CONNECT after whatever the test sent.
            out = await exchange(
                c, lambda c: headers(c, connect_block(target(c))) + frame(DATA, END_STREAM, 1, b"ok"), has_status(1)
            )
            assert out.statuses.get(1) == 200, out
        finally:
            await app.close()


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_connect_is_400(rig, case: str) -> None:  # type: ignore[no-untyped-def]
    c, app = rig
    out = await exchange(c, BAD_REQUESTS[case], has_status(1))
    assert out.statuses == {1: 400}, out
    assert not app.accepted.is_set()


async def test_authority_is_checked_per_stream_when_the_pod_ip_comes_late(rig) -> None:  # type: ignore[no-untyped-def]
    """The inventory may learn a pod's IP only after a client has connected to the pod's :15008, and the
    client's pooled connection lives on: no CONNECT is admitted while the IP is unknown, and once it is
    known a CONNECT on that same connection for another address is still a 400 (it would be connected from
    inside the pod's netns, with the tunnel's mark)."""
    c, _ = rig
    known, server = c.inventory[0], c.pod("server")
    address, good = server_addr(c), target(c)
    elsewhere = ByteServer(c.net.ip(30)).start()  # reachable from the server pod, not the server pod
    c.inventory[0] = dataclasses.replace(
        known, pods=tuple(dataclasses.replace(p, ip=None) if p is server else p for p in known.pods)
    )
    await asyncio.sleep(0.2)  # the tunnel polls the inventory every 50 ms here
    client = await asyncio.to_thread(RawClient, address, client_ctx(c))

    def ask(stream: int, authority: str) -> int | None:
        client.send(headers(c, connect_block(authority), stream))
        return client.read_until(has_status(stream)).statuses.get(stream)

    try:
        await asyncio.to_thread(client.start)
        assert await asyncio.to_thread(ask, 1, good) == 503  # not ready yet
        c.inventory[0] = known
        await asyncio.sleep(0.2)
        assert await asyncio.to_thread(ask, 3, str(elsewhere.address)) == 400
        assert await asyncio.to_thread(ask, 5, good) == 200
    finally:
        client.close()
        c.inventory[0] = known
        await elsewhere.close()
    assert not elsewhere.accepted.is_set()


async def test_data_before_200_is_never_forwarded_when_denied(rig) -> None:  # type: ignore[no-untyped-def]
    c, app = rig
    c.set_policies(
        parse_policies(
            list(
                yaml.safe_load_all(
                    "kind: AuthorizationPolicy\nmetadata: {name: deny, namespace: shop}\n"
                    "spec: {action: DENY, rules: [{}]}"
                )
            )
        )
    )
    await asyncio.sleep(0.2)  # the tunnel polls policies every 50 ms here
    out = await exchange(
        c, lambda c: headers(c, connect_block(target(c))) + frame(DATA, 0, 1, b"SECRET" * 1000), has_status(1)
    )
    assert out.statuses == {1: 401}, out
    await asyncio.sleep(0.1)
    assert not app.accepted.is_set()
    c.set_policies(parse_policies([]))
    await asyncio.sleep(0.2)


async def test_data_before_200_arrives_after_it_exactly_once(rig) -> None:  # type: ignore[no-untyped-def]
    c, app = rig
    out = await exchange(
        c,
        lambda c: headers(c, connect_block(target(c))) + frame(DATA, 0, 1, b"early") + frame(DATA, END_STREAM, 1, b"!"),
        lambda o: 1 in o.data and len(o.data[1]) >= 2,
    )
    assert out.statuses[1] == 200
    async with asyncio.timeout(5):
        while not app.received:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert app.received[0].nbytes == 6


async def test_rapid_reset_gets_goaway_and_no_upstream_flood(rig) -> None:  # type: ignore[no-untyped-def]
    c, app = rig

    def flood(c: Cluster) -> bytes:
        blk = connect_block(target(c))
        return b"".join(
            headers(c, blk, stream=sid) + frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big"))
            for sid in range(1, 20001, 2)
        )

    out = await exchange(c, flood, ended)
    assert out.goaway == ENHANCE_YOUR_CALM, out
    await asyncio.sleep(0.2)
    assert len(app.received) == 0


def hpack_bomb(c: Cluster) -> bytes:
    # One 4 KiB header enters the dynamic table (index 62), then 1000 one-byte references to it:
    # ~1 KB on the wire, 4 MB decoded.
    blk = connect_block(target(c)) + literal(b"x-bomb", b"a" * 4000, index=True) + hpack_int(62, 7, 0x80) * 1000
    return headers(c, blk)


def empty_headers(c: Cluster) -> bytes:
    return headers(c, connect_block(target(c)) + literal(b"", b"") * 10000)


def continuation_flood(c: Cluster) -> bytes:
    out = frame(HEADERS, 0, 1, connect_block(target(c)))
    return out + b"".join(frame(CONTINUATION, 0, 1, literal(b"x-a", b"b")) for _ in range(5000))


def ping_flood(c: Cluster) -> bytes:
    return b"".join(frame(PING, 0, 0, i.to_bytes(8, "big")) for i in range(100_000))


def ping_ack_flood(c: Cluster) -> bytes:
    """ACKs of PINGs the tunnel never sent: h2 processes each for nothing and sends nothing back."""
    return frame(PING, ACK, 0, bytes(8)) * 2000


def settings_ack_flood(c: Cluster) -> bytes:
    """One SETTINGS ACK answers the tunnel's SETTINGS; the rest answer nothing."""
    return frame(SETTINGS, ACK, 0) * 2000


def rst_on_closed_stream_flood(c: Cluster) -> bytes:
    """RST_STREAM on a stream that is already closed (here: answered 400 and reset by the tunnel)."""
    return headers(c, connect_block(target(c), method=b"GET")) + frame(RST_STREAM, 0, 1, bytes(4)) * 2000


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (ping_ack_flood, ENHANCE_YOUR_CALM),
        (settings_ack_flood, PROTOCOL_ERROR),
        (rst_on_closed_stream_flood, ENHANCE_YOUR_CALM),
    ],
    ids=["ping-ack", "settings-ack", "rst-closed"],
)
async def test_floods_without_replies_end_the_connection(rig, payload: Callable[[Cluster], bytes], code: int) -> None:  # type: ignore[no-untyped-def]
    """Frames that h2 processes for nothing and answers with nothing: no reply budget ever stops them, so
    they must be counted as they arrive. 2000 frames, far over each bound, and few enough to be all sent
    before the tunnel closes (a close with unread input is a TCP reset, which can eat the GOAWAY)."""
    c, app = rig
    out = await exchange(c, payload, ended)
    assert out.goaway == code, out
    assert not app.accepted.is_set()


@pytest.mark.parametrize(
    "payload", [hpack_bomb, empty_headers, continuation_flood, ping_flood], ids=["hpack", "empty", "cont", "ping"]
)
async def test_floods_and_bombs_end_the_connection(rig, payload: Callable[[Cluster], bytes]) -> None:  # type: ignore[no-untyped-def]
    c, app = rig
    out = await exchange(c, payload, ended)
    assert out.goaway in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR, 0x9) or out.closed, out  # 0x9: COMPRESSION_ERROR
    assert 1 not in out.statuses or out.statuses[1] != 200
    assert not app.accepted.is_set()


async def test_data_in_flight_when_the_tunnel_resets_is_ignored(rig) -> None:  # type: ignore[no-untyped-def]
    """A client's small writes still on their way when the tunnel ends the stream (here: 503, nothing
    listens on the port) are ignored (RFC 9113 5.1), not each answered with RST_STREAM: the tunnel used to
    count those replies as a flood and end the connection, and every other stream on it."""
    c, app = rig

    def run() -> Outcome:
        client = RawClient(server_addr(c), client_ctx(c))
        try:
            client.start()
            client.send(headers(c, connect_block(target(c, APP_PORT + 1))))
            assert client.read_until(has_status(1)).statuses == {1: 503}
            client.send(frame(DATA, 0, 1, b"k" * 64) * 20_000)  # 1.3 MB in 20 000 frames, inside the window
            client.send(headers(c, connect_block(target(c)), stream=3) + frame(DATA, END_STREAM, 3, b"ok"))
            return client.read_until(has_status(3))
        finally:
            client.close()

    out = await asyncio.to_thread(run)
    assert out.statuses == {1: 503, 3: 200}, out
    assert out.goaway is None and not out.closed, out
    assert out.resets.get(1) == 0, out  # the tunnel's RST_STREAM(NO_ERROR) after the 503; no STREAM_CLOSED replies
    assert app.accepted.is_set()


@pytest.mark.parametrize("case", ["h2c", "no client cert", "foreign trust domain"])
async def test_bad_transport_is_closed(rig, case: str) -> None:  # type: ignore[no-untyped-def]
    c, app = rig

    def run() -> Outcome:
        ctx = (
            None
            if case == "h2c"
            else client_ctx(c, with_cert=case != "no client cert", foreign=case != "no client cert")
        )
        try:
            client = RawClient(server_addr(c), ctx)
        except (ssl.SSLError, ConnectionResetError) as exc:  # refused during the handshake
            return Outcome(closed=True, data={0: str(exc).encode()})
        try:
            client.send(PREFACE + frame(SETTINGS, 0, 0) + headers(c, connect_block(target(c))))
            return client.read_until(has_status(1))
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return Outcome(closed=True)
        finally:
            client.close()

    out = await asyncio.to_thread(run)
    assert out.closed and not out.statuses, out
    assert not app.accepted.is_set()


async def test_a_connection_without_streams_is_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    """A peer holding HBONE connections open without using them (REFERENCE.md: slow clients, idle timeouts)
    must not pin their memory for good: no stream for the server idle timeout -> GOAWAY and close. An open
    stream keeps the connection however long it lasts."""
    async with cluster(tmp_path) as c:
        await c.wait_ready(await c.start_tunnel("node1"))
        await c.wait_ready(await c.start_tunnel("node2", server_idle_timeout=0.5))
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=2).start()

        def run() -> tuple[Outcome, Outcome, float]:
            idle = RawClient(server_addr(c), client_ctx(c))
            busy = RawClient(server_addr(c), client_ctx(c))
            try:
                idle.start()
                busy.start()
                busy.send(headers(c, connect_block(target(c))))
                assert busy.read_until(has_status(1)).statuses == {1: 200}
                idle.read_until(lambda o: o.closed, limit=5)  # never opened a stream
                busy.read_until(ended, limit=1.5)  # its stream stays open past the timeout: no GOAWAY
                still_open = dataclasses.replace(busy.outcome)
                started = time.monotonic()
                busy.send(frame(DATA, END_STREAM, 1, b"ok"))  # the stream ends (the app answers and closes)
                busy.read_until(lambda o: o.closed, limit=5)
                return idle.outcome, still_open, time.monotonic() - started
            finally:
                idle.close()
                busy.close()

        try:
            idle, still_open, after_stream = await asyncio.to_thread(run)
        finally:
            await app.close()
        assert idle.goaway == 0 and idle.closed, idle  # NO_ERROR
        assert still_open.goaway is None and not still_open.closed, still_open
        assert after_stream < 3, after_stream  # GOAWAY and close one idle timeout after the stream ended


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_tunnel_process_survives_everything_with_bounded_memory(tmp_path: Path) -> None:
    """The whole hostile list against a tunnel running as its own process (uvloop, like production)."""
    here = Path(__file__).parent
    async with cluster(tmp_path) as c:
        await c.wait_ready(await c.start_tunnel("node1"))  # its certificate is the hostile client's
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(here / "loopback_tunnel.py"),
            c.net.base,
            c.ca.target,
            str(c.ca.store.bundle_path),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": f"{here.parent.parent}:{here.parent}:{here}"},
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(20):
                assert (await proc.stdout.readline()).strip() == b"ready"
            server = c.pod("server")
            assert server.ip is not None
            app = ByteServer(server.ip, size=2).start()
            good = lambda c: headers(c, connect_block(target(c))) + frame(DATA, END_STREAM, 1, b"ok")  # noqa: E731
            try:
                assert (await exchange(c, good, has_status(1))).statuses == {1: 200}
                before = rss_kib(proc.pid)
                for _ in range(3):
                    for payload in BAD_REQUESTS.values():
                        await exchange(c, payload, has_status(1))
                    for flood in (hpack_bomb, empty_headers, continuation_flood, ping_flood):
                        await exchange(c, flood, ended)
                    await exchange(c, rapid_reset, ended)
                    for case in ("no client cert", "foreign", "h2c"):
                        await asyncio.to_thread(_bad_transport, c, case)
                assert proc.returncode is None, "the tunnel process died"
                assert (await exchange(c, good, has_status(1))).statuses == {1: 200}
                grown = rss_kib(proc.pid) - before
            finally:
                await app.close()
            assert grown < 20 * 1024, f"RSS grew by {grown} KiB"
        finally:
            if proc.returncode is None:
                proc.terminate()
            async with asyncio.timeout(15):
                await proc.wait()


def rapid_reset(c: Cluster) -> bytes:
    blk = connect_block(target(c))
    return b"".join(
        headers(c, blk, stream=sid) + frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big")) for sid in range(1, 20001, 2)
    )


def _bad_transport(c: Cluster, case: str) -> None:
    try:
        ctx = None if case == "h2c" else client_ctx(c, with_cert=case != "no client cert", foreign=case == "foreign")
        client = RawClient(server_addr(c), ctx)
        client.send(PREFACE + frame(SETTINGS, 0, 0) + headers(c, connect_block(target(c))))
        client.read_until(has_status(1))
        client.close()
    except (ssl.SSLError, OSError):
        pass
