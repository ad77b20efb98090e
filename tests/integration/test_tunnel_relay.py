"""The relays on loopback TCP: client <-> relay <-> server, on asyncio and uvloop (tests/conftest.py).

Both implementations are checked against the same cases: `splice` (relay_tcp's SpliceRelay, the plain
TCP path) and `buffered` (Relay + two TcpSides, the path HBONE streams plug into). The oracles are the
client's and server's own sockets: bytes and hashes received, EOFs seen, resets raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from nodeagent.ztunnel import relay as r

MiB = 1024 * 1024


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected, non-blocking loopback TCP sockets (connector, accepted)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


@dataclass
class Rig:
    client: socket.socket
    server: socket.socket
    relay: r.Relay | r.SpliceRelay
    done: asyncio.Future[r.RelayResult]


async def start_buffered(down: socket.socket, up: socket.socket) -> tuple[r.Relay, asyncio.Future[r.RelayResult]]:
    relay = r.Relay()
    d = await r.tcp_side(down, relay.leg(r.DOWNSTREAM))
    u = await r.tcp_side(up, relay.leg(r.UPSTREAM))
    relay.start(d, u)
    return relay, relay.done


async def start_splice(down: socket.socket, up: socket.socket) -> tuple[r.SpliceRelay, asyncio.Future[r.RelayResult]]:
    relay = r.SpliceRelay(down, up)
    return relay, relay.done


Starter = Callable[
    [socket.socket, socket.socket], Awaitable[tuple[r.Relay | r.SpliceRelay, asyncio.Future[r.RelayResult]]]
]


@pytest.fixture(params=["splice", "buffered"])
def starter(request: pytest.FixtureRequest) -> Starter:
    return start_splice if request.param == "splice" else start_buffered  # type: ignore[return-value]


def open_fds() -> set[str]:
    """What this process's fds point at (`socket:[inode]`, `pipe:[inode]`, paths)."""
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd os.listdir itself used
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


@pytest.fixture
async def rig(starter: Starter) -> AsyncIterator[Rig]:
    before = open_fds()
    client, down = tcp_pair()
    up, server = tcp_pair()
    ours = {f"socket:[{os.fstat(s.fileno()).st_ino}]" for s in (client, down, up, server)}
    relay, done = await starter(down, up)
    rig = Rig(client, server, relay, done)
    yield rig
    if not done.done():
        relay.abort()
    await asyncio.wait_for(done, 5)
    client.close()
    server.close()
    for _ in range(50):  # transports close on a later loop turn
        gc.collect()
        # the relay's sockets and pipes must all be closed (other fds may come and go: pytest, loops)
        leaked = {t for t in open_fds() - before if t in ours or t.startswith("pipe:")}
        if not leaked:
            break
        await asyncio.sleep(0.01)
    assert not leaked, f"the relay leaked file descriptors: {leaked}"


async def send(sock: socket.socket, total: int, block: bytes, *, shutdown: bool = True) -> str:
    """Send `total` bytes made of `block` (a prefix of it at the end); return their sha256."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    sent = 0
    while sent < total:
        chunk = block[: min(len(block), total - sent)]
        await loop.sock_sendall(sock, chunk)
        digest.update(chunk)
        sent += len(chunk)
    if shutdown:
        sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


async def receive(sock: socket.socket) -> tuple[int, str]:
    """Read until EOF; return (bytes, sha256)."""
    loop = asyncio.get_running_loop()
    buf = bytearray(MiB)
    digest = hashlib.sha256()
    total = 0
    while n := await loop.sock_recv_into(sock, buf):
        digest.update(memoryview(buf)[:n])
        total += n
    return total, digest.hexdigest()


@pytest.mark.parametrize("size", [1, MiB, 256 * MiB], ids=["1B", "1MiB", "256MiB"])
async def test_equal_bytes_both_ways(rig: Rig, size: int) -> None:
    up_block, down_block = os.urandom(MiB), os.urandom(MiB)  # different streams each way, not all zeros
    sent_up, sent_down, got_at_server, got_at_client = await asyncio.wait_for(
        asyncio.gather(
            send(rig.client, size, up_block),
            send(rig.server, size, down_block),
            receive(rig.server),
            receive(rig.client),
        ),
        60,
    )
    assert got_at_server == (size, sent_up)
    assert got_at_client == (size, sent_down)
    result = await asyncio.wait_for(rig.done, 5)
    assert result == r.RelayResult(size, size, None)


async def test_counts_are_per_direction(rig: Rig) -> None:
    await asyncio.gather(send(rig.client, 3, b"abc"), send(rig.server, 5, b"vwxyz"))
    assert await receive(rig.server) == (3, hashlib.sha256(b"abc").hexdigest())
    assert await receive(rig.client) == (5, hashlib.sha256(b"vwxyz").hexdigest())
    assert await asyncio.wait_for(rig.done, 5) == r.RelayResult(3, 5, None)


@pytest.mark.parametrize("first", ["client", "server"])
async def test_half_close_is_honoured(rig: Rig, first: str) -> None:
    loop = asyncio.get_running_loop()
    closer, other = (rig.client, rig.server) if first == "client" else (rig.server, rig.client)
    await loop.sock_sendall(closer, b"hello")
    closer.shutdown(socket.SHUT_WR)
    assert await receive(other) == (5, hashlib.sha256(b"hello").hexdigest())  # data, then EOF
    # the other direction is still open: the half-closed side keeps receiving
    await loop.sock_sendall(other, b"still here")
    assert await asyncio.wait_for(loop.sock_recv(closer, 100), 5) == b"still here"
    assert not rig.done.done()
    other.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(loop.sock_recv(closer, 100), 5) == b""
    result = await asyncio.wait_for(rig.done, 5)
    assert result.error is None
    assert (result.bytes_in, result.bytes_out) == ((5, 10) if first == "client" else (10, 5))


async def test_urgent_data_is_stepped_over_not_a_stall_or_an_eof(rig: Rig) -> None:
    """TCP urgent data (send(MSG_OOB)): splice(2) stops in front of the urgent byte and returns EAGAIN (0
    once the FIN is in) while the socket stays readable - the splice relay used to spin on that and then
    report the FIN there as the end, dropping the rest. Like any recv()-based relay, the bytes after it
    are relayed; the urgent byte itself, out of band, is not (nor is it by the buffered relay)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(rig.client, b"hello")
    rig.client.send(b"!", socket.MSG_OOB)
    await loop.sock_sendall(rig.client, b"world")
    got = b""
    while len(got) < 10:  # the connection stays open: the bytes after the mark must come on their own
        got += await asyncio.wait_for(loop.sock_recv(rig.server, 100), 5)
    assert got == b"helloworld"
    await loop.sock_sendall(rig.client, b" more")
    rig.client.send(b"?", socket.MSG_OOB)
    rig.client.shutdown(socket.SHUT_WR)  # the FIN right behind the urgent byte: still not an early end
    assert await receive(rig.server) == (5, hashlib.sha256(b" more").hexdigest())
    rig.server.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(rig.done, 5) == r.RelayResult(15, 0, None)


async def test_reset_propagates_and_is_reported(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(rig.client, b"x" * 1000)
    assert await loop.sock_recv(rig.server, 1000)
    rig.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rig.client.close()  # RST
    result = await asyncio.wait_for(rig.done, 5)
    assert isinstance(result.error, ConnectionResetError), result.error
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(loop.sock_recv(rig.server, 100), 5)


async def test_abort_resets_both_sides(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    reason = PermissionError("denied by policy")
    rig.relay.abort(reason)
    assert (await asyncio.wait_for(rig.done, 5)).error is reason
    for sock in (rig.client, rig.server):
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(loop.sock_recv(sock, 100), 5)


async def test_close_delivers_queued_bytes_then_ends_both_ways(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(rig.client, b"last words")
    await asyncio.sleep(0.05)  # let the relay pick them up
    rig.relay.close()
    assert await receive(rig.server) == (10, hashlib.sha256(b"last words").hexdigest())
    assert await asyncio.wait_for(loop.sock_recv(rig.client, 100), 5) == b""
    for sock in (rig.client, rig.server):
        sock.shutdown(socket.SHUT_WR)  # each answers the FIN with its own: the relay's close ends there
    assert (await asyncio.wait_for(rig.done, 1.5)).error is None  # not after the LINGER


async def test_a_peer_that_never_sends_its_fin_is_closed_after_the_linger(rig: Rig) -> None:
    rig.relay.close()
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(rig.client, 100), 5) == b""
    began = loop.time()
    assert (await asyncio.wait_for(rig.done, r.LINGER + 2)).error is None
    assert loop.time() - began >= r.LINGER - 0.5


async def send_until_stalled(sock: socket.socket, total: int) -> int:
    """Send up to `total` bytes without the peer reading: stops when nothing moves for 0.3 s."""
    sent, stalled = 0, 0
    while sent < total and stalled < 30:
        try:
            sent += sock.send(b"d" * min(65536, total - sent))
            stalled = 0
        except BlockingIOError:
            stalled += 1
            await asyncio.sleep(0.01)
    return sent


async def read_to_the_end(sock: socket.socket) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    total = 0
    try:
        while n := len(await asyncio.wait_for(loop.sock_recv(sock, MiB), 5)):
            total += n
    except OSError as exc:
        return total, type(exc).__name__
    return total, "EOF"


async def test_close_with_input_still_unread_delivers_what_it_relayed_then_eof(rig: Rig) -> None:
    """The drain's graceful close() while both peers are still sending (the relay stalled both ways): what
    the relay took from one side (and counts) reaches the other, then EOF. Closing a socket with unread
    input makes the kernel send RST and drop its unsent queue: the peers used to get a reset and lose
    bytes counted as relayed. Now the relay reads and discards until the peer's FIN (or a short linger)."""
    await asyncio.gather(send_until_stalled(rig.client, 8 * MiB), send_until_stalled(rig.server, 8 * MiB))
    rig.relay.close()
    at_client, at_server = await asyncio.gather(read_to_the_end(rig.client), read_to_the_end(rig.server))
    assert (at_server[1], at_client[1]) == ("EOF", "EOF")
    for sock in (rig.client, rig.server):
        sock.shutdown(socket.SHUT_WR)  # what they still had to send is discarded; their FIN ends the linger
    result = await asyncio.wait_for(rig.done, 5)
    assert result.error is None
    assert (at_server, at_client) == ((result.bytes_in, "EOF"), (result.bytes_out, "EOF"))
    assert result.bytes_in > 0 and result.bytes_out > 0


async def test_slow_reader_bounds_relay_memory(rig: Rig) -> None:
    """The server reads nothing: the client must stall (backpressure) with the relay holding a bounded amount."""
    total = 128 * MiB
    sender = asyncio.create_task(send(rig.client, total, os.urandom(MiB)))
    last, stalled_for = -1, 0
    while stalled_for < 5:  # wait until the relay's buffer stops changing (the whole path is full)
        await asyncio.sleep(0.05)
        now = rig.relay.buffered()
        stalled_for = stalled_for + 1 if now == last else 0
        last = now
    assert not sender.done(), "the client sent everything while nobody read: no backpressure"
    bound = r.PIPE_SIZE if isinstance(rig.relay, r.SpliceRelay) else r.HIGH_WATER + r.CHUNK
    assert 0 < rig.relay.buffered() <= bound
    sent_hash = asyncio.ensure_future(sender)
    got = await asyncio.wait_for(receive(rig.server), 30)
    assert got == (total, await sent_hash)
    rig.server.shutdown(socket.SHUT_WR)
    assert (await asyncio.wait_for(rig.done, 5)).bytes_in == total


async def test_bytes_sent_before_the_relay_starts_are_kept(starter: Starter) -> None:
    client, down = tcp_pair()
    up, server = tcp_pair()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(client, b"early")
    client.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.01)
    _, done = await starter(down, up)
    try:
        assert await asyncio.wait_for(receive(server), 5) == (5, hashlib.sha256(b"early").hexdigest())
        server.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(done, 5) == r.RelayResult(5, 0, None)
    finally:
        client.close()
        server.close()


class MemorySink:
    """A stand-in for the HBONE stream side: records writes and reports pressure like a real sink would."""

    def __init__(self, leg: r.Leg) -> None:
        self.leg = leg
        self.data = bytearray()
        self.eof = False
        self.reading = False
        self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        self.data += data

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True
        self.leg.connection_lost(None)

    def abort(self) -> None:
        self.close()

    def buffered(self) -> int:
        return len(self.data)


async def test_a_non_socket_sink_plugs_into_the_relay() -> None:
    """The HBONE seam: a stream-like sink on one side, TCP on the other, with pressure both ways."""
    loop = asyncio.get_running_loop()
    client, down = tcp_pair()
    relay = r.Relay()
    tcp = await r.tcp_side(down, relay.leg(r.DOWNSTREAM))
    stream = MemorySink(relay.leg(r.UPSTREAM))
    relay.start(tcp, stream)
    try:
        assert stream.reading
        await loop.sock_sendall(client, b"to the stream")
        for _ in range(100):
            if len(stream.data) == 13:
                break
            await asyncio.sleep(0.01)
        assert bytes(stream.data) == b"to the stream"
        # the stream's window is full: reading from TCP must stop, and restart when it opens
        stream.leg.pause_writing()
        await loop.sock_sendall(client, b"held")
        await asyncio.sleep(0.05)
        assert bytes(stream.data) == b"to the stream"
        stream.leg.resume_writing()
        for _ in range(100):
            if stream.data.endswith(b"held"):
                break
            await asyncio.sleep(0.01)
        assert stream.data.endswith(b"held")
        # stream -> TCP, then END_STREAM -> FIN
        stream.leg.data_received(memoryview(b"from the stream"))
        stream.leg.eof_received()
        assert await asyncio.wait_for(receive(client), 5) == (15, hashlib.sha256(b"from the stream").hexdigest())
        client.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(relay.done, 5)
        assert stream.eof and stream.closed
        assert result == r.RelayResult(17, 15, None)
    finally:
        with contextlib.suppress(OSError):
            client.close()
