"""hbone_transport.HboneProtocol on a stand-in transport: the adapter's own bookkeeping, fed raw frames.

The core's behaviour is tested in test_hbone.py; here, what the asyncio adapter keeps per stream must go
when the stream does, whichever way the core ends it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, RstStreamFrame
from test_hbone import LOCAL, PREFACE, TRAILERS, Peer, data, parse_frames, ping, settings_frame, window_update

from nodeagent.ztunnel import hbone, hbone_transport


class StandInTransport(asyncio.Transport):
    """Collects what the protocol writes; never pushes back."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: Any) -> None:
        self.out += data

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.out += chunk

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Leg:
    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        pass


def feed(protocol: hbone_transport.HboneProtocol, wire: bytes) -> None:
    while wire:
        buf = protocol.get_buffer(len(wire))
        n = min(len(buf), len(wire))
        buf[:n] = wire[:n]
        protocol.buffer_updated(n)
        wire = wire[n:]


def server() -> tuple[hbone_transport.HboneProtocol, StandInTransport]:
    transport = StandInTransport()
    protocol = hbone_transport.HboneProtocol(hbone.Role.SERVER, local_addresses=LOCAL, on_stream=lambda *_: None)
    protocol.connection_made(transport)
    feed(protocol, PREFACE + settings_frame())
    return protocol, transport


async def test_closing_a_stream_the_peer_still_sends_on_resets_it_after_the_queued_bytes() -> None:
    protocol, transport = server()
    feed(protocol, Peer().request(1))
    stream = protocol.accept(1)
    stream.attach(Leg())  # type: ignore[arg-type]
    stream.resume_reading()
    stream.write(b"r" * 100_000)  # more than the peer's 65 535-byte window: the rest is queued
    stream.close()
    transport.out.clear()
    feed(protocol, window_update(1, 100_000) + window_update(0, 100_000))
    frames = parse_frames(bytes(transport.out))
    *queued, last, reset = frames
    assert all(isinstance(f, DataFrame) for f in [*queued, last]) and isinstance(reset, RstStreamFrame)
    assert "END_STREAM" in last.flags and reset.error_code == ErrorCodes.NO_ERROR
    assert sum(len(f.data) for f in [*queued, last]) == 100_000 - 65_535
    assert protocol._pending_resets == {}


async def test_a_reset_waiting_for_a_queue_the_peer_then_took_whole_is_forgotten() -> None:
    """close() on a stream with bytes queued resets the still-sending peer only once they are framed. When
    the peer half-closes meanwhile and then opens its window, the core frames the rest with END_STREAM and
    forgets the stream (no SendDrained for it): the pending reset used to stay, one entry per such stream
    for the life of the (pooled) connection."""
    protocol, _ = server()
    peer = Peer()
    for stream_id in range(1, 101, 2):
        feed(protocol, peer.request(stream_id))
        stream = protocol.accept(stream_id)
        stream.attach(Leg())  # type: ignore[arg-type]
        stream.resume_reading()
        stream.write(b"r" * 100_000)  # more than the peer's 65 535-byte window: the rest is queued
        stream.close()  # END_STREAM after the queue; the peer, still sending, is reset then
        feed(protocol, data(stream_id, b"", end=True))  # ... but it half-closes first
        feed(protocol, window_update(stream_id, 100_000) + window_update(0, 100_000))  # the queue goes out
    assert protocol.core.open_streams == 0 and protocol.active_streams == 0
    assert protocol._pending_resets == {}


async def test_a_peer_that_sends_pings_but_never_reads_is_cut_off() -> None:
    """While the transport is over its high-water mark (pause_writing), the PING ACKs written to it are not
    on the wire: they must not renew the core's reply budget after every read, or a peer that never reads
    grows our output without bound (CVE-2019-9512, measured: 3.7 MiB over a 1 MiB high-water mark)."""
    protocol, transport = server()
    protocol.pause_writing()  # as the transport reports it when the peer does not read
    for _ in range(20):
        feed(protocol, ping() * 100)
    assert protocol.core.closed
    assert len(transport.out) < (protocol.core.limits.max_queued_control_replies + 200) * 17


class RecordingLeg(Leg):
    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: list[BaseException | None] = []

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)


async def test_trailers_without_end_stream_reset_that_relay_only() -> None:
    """The relay of the stream the peer sent malformed trailers on sees a reset; the relays of the other
    streams of the (pooled) connection carry on. h2 used to end the whole connection for it."""
    protocol, transport = server()
    peer = Peer()
    legs: dict[int, RecordingLeg] = {}
    for stream_id in (1, 3):
        feed(protocol, peer.request(stream_id))
        stream = protocol.accept(stream_id)
        stream.attach(legs.setdefault(stream_id, RecordingLeg()))  # type: ignore[arg-type]
        stream.resume_reading()
    feed(protocol, peer.request(1, TRAILERS) + data(3, b"after"))
    [lost] = legs[1].lost
    assert isinstance(lost, ConnectionResetError) and "reset by the tunnel" in str(lost), lost
    assert legs[3].lost == [] and legs[3].received == b"after"
    assert not protocol.core.closed and protocol.core.open_streams == 1
    transport.out.clear()
    feed(protocol, data(3, b"more"))
    assert legs[3].received == b"aftermore"
    assert protocol._streams.keys() == {3}
