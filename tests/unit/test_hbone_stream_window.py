"""nodeagent.ztunnel.hbone_transport.HboneStream: a finished stream gives back the connection window.

The HTTP/2 connection window is shared by every stream of an HBONE connection. Bytes a stream received
while its relay held it (or before its relay started) are acknowledged only later; a stream that ends in
between must still acknowledge them, or each such stream shrinks the connection window for good until
the whole connection stalls (seen with iperf3 -P 4 run a few times over one pooled connection).
"""

from __future__ import annotations

import asyncio

from nodeagent.ztunnel.hbone_transport import HboneStream


class FakeConnection:
    """The parts of HboneProtocol a stream calls."""

    def __init__(self) -> None:
        self.consumed: list[tuple[int, int]] = []
        self.forgotten: list[int] = []
        self.write_paused = False

    def _consumed(self, stream_id: int, nbytes: int) -> None:
        self.consumed.append((stream_id, nbytes))

    def _forget(self, stream_id: int) -> None:
        self.forgotten.append(stream_id)

    def _reset(self, stream_id: int, code: int, *, after_queued: bool) -> None:
        pass

    def _end(self, stream_id: int) -> None:
        pass

    def outbound_buffered(self, stream_id: int) -> int:
        return 0


class FakeLeg:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: list[BaseException | None] = []

    def data_received(self, data: bytes) -> None:
        self.data.append(bytes(data))

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)


def stream() -> tuple[HboneStream, FakeConnection, FakeLeg]:
    conn, leg = FakeConnection(), FakeLeg()
    s = HboneStream(conn, 7)  # type: ignore[arg-type]
    s.attach(leg)  # type: ignore[arg-type]
    return s, conn, leg


def test_bytes_held_back_are_acknowledged_when_the_peer_resets_the_stream() -> None:
    s, conn, leg = stream()
    s.resume_reading()  # the relay starts
    s.pause_reading()  # ... and holds this side: its upstream is full
    s._on_data(b"x" * 100)
    assert leg.data == [b"x" * 100] and conn.consumed == []  # relayed, not yet acknowledged
    s._on_lost(ConnectionResetError("reset by the peer"))
    assert conn.consumed == [(7, 100)]
    assert conn.forgotten == [7]


def test_bytes_held_back_are_acknowledged_when_the_relay_closes_the_stream() -> None:
    async def run() -> None:
        s, conn, _ = stream()
        s.resume_reading()
        s.pause_reading()
        s._on_data(b"y" * 10)
        s._on_end()
        s.close()
        assert conn.consumed == [(7, 10)]

    asyncio.run(run())


def test_early_bytes_of_a_stream_that_never_started_are_acknowledged() -> None:
    async def run() -> None:
        s, conn, _ = stream()
        s._on_data(b"early")  # before relay.start(): kept, not acknowledged
        assert conn.consumed == []
        s.abort()
        assert conn.consumed == [(7, 5)]

    asyncio.run(run())


def test_nothing_is_acknowledged_twice() -> None:
    s, conn, _ = stream()
    s.resume_reading()
    s._on_data(b"z" * 3)  # not held: acknowledged at once
    s._on_lost(None)
    s._on_lost(None)
    assert conn.consumed == [(7, 3)]
