"""nodeagent.ztunnel.hbone: the hand-written hot paths agree with h2 and keep frame order.

The core builds CONNECT and 200 header blocks by hand and receives plain DATA frames of open streams
without h2 (both measured to be most of a short connection's core cost). These tests hold them to what
h2 would have done: the header blocks decode to the same headers with any HPACK decoder and leave both
dynamic tables empty, h2's flow-control windows stay equal on both ends, events come out in wire order
when fast-path frames and h2 frames share a read, and everything unusual still goes through h2.
"""

from __future__ import annotations

import ipaddress

import h2.config
import h2.connection
import h2.stream
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame

from nodeagent.model import SocketAddress
from nodeagent.ztunnel import hbone
from nodeagent.ztunnel.hbone import (
    ConnectionTerminated,
    ConnectRequest,
    DataReceived,
    HboneConnection,
    Role,
    StreamEnded,
    StreamEstablished,
    StreamOpened,
    StreamReset,
)

POD = ipaddress.ip_address("10.0.0.2")
POD6 = ipaddress.ip_address("fd00::2")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def data(stream_id: int, payload: bytes, end: bool = False) -> bytes:
    return frame(0x0, 0x1 if end else 0, stream_id, payload)


def rst(stream_id: int, code: int = ErrorCodes.CANCEL) -> bytes:
    return frame(0x3, 0, stream_id, code.to_bytes(4, "big"))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(0x8, 0, stream_id, increment.to_bytes(4, "big"))


def pump(client: HboneConnection, server: HboneConnection) -> tuple[list[hbone.Event], list[hbone.Event]]:
    seen: tuple[list[hbone.Event], list[hbone.Event]] = ([], [])
    while True:
        a, b = client.data_to_send(), server.data_to_send()
        if not a and not b:
            return seen
        if a:
            seen[1].extend(server.receive_data(a))
        if b:
            seen[0].extend(client.receive_data(b))


def established(*ports: int) -> tuple[HboneConnection, HboneConnection, list[int]]:
    client = HboneConnection(Role.CLIENT, 0.0)
    server = HboneConnection(Role.SERVER, 0.0, local_addresses=frozenset({POD, POD6}))
    pump(client, server)
    sids = [client.open_stream(ConnectRequest(SocketAddress(POD, port))) for port in ports]
    pump(client, server)
    for sid in sids:
        server.accept(sid)
    client_events, _ = pump(client, server)
    assert client_events == [StreamEstablished(sid) for sid in sids]
    return client, server, sids


class CountingDispatch:
    """Counts the DATA frames h2 itself receives on a connection (the slow path)."""

    def __init__(self, conn: HboneConnection) -> None:
        table = conn._h2._frame_dispatch_table
        self.calls = 0
        for cls, handler in list(table.items()):
            if issubclass(cls, DataFrame):
                table[cls] = self._wrap(handler)

    def _wrap(self, handler):  # type: ignore[no-untyped-def]
        def counted(frame):  # type: ignore[no-untyped-def]
            self.calls += 1
            return handler(frame)

        return counted


REQUESTS = [
    ConnectRequest(SocketAddress(POD, 8080)),
    ConnectRequest(SocketAddress(POD6, 443), forwarded='for="10.0.0.1:40000"'),
    ConnectRequest(
        SocketAddress(POD, 9), baggage="k8s.namespace.name=" + "x" * 300, forwarded="for=a", traceparent="00-ab-cd-01"
    ),
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_connect_block_decodes_to_the_connect_headers_and_indexes_nothing(request_: ConnectRequest) -> None:
    decoder = hpack.Decoder()
    assert decoder.decode(hbone.connect_header_block(request_), raw=True) == hbone.connect_headers(request_)
    assert len(decoder.header_table.dynamic_entries) == 0


@pytest.mark.parametrize("request_", REQUESTS)
def test_hand_written_connect_and_200_round_trip_through_h2(request_: ConnectRequest) -> None:
    client = HboneConnection(Role.CLIENT, 0.0)
    server = HboneConnection(Role.SERVER, 0.0)
    pump(client, server)
    for _ in range(3):  # several streams: the HPACK contexts stay in step
        sid = client.open_stream(request_)
        _, server_events = pump(client, server)
        assert server_events == [StreamOpened(sid, request_)]
        server.accept(sid)
        client_events, _ = pump(client, server)
        assert client_events == [StreamEstablished(sid)]
    assert len(server._h2.decoder.header_table.dynamic_entries) == 0
    assert len(client._h2.decoder.header_table.dynamic_entries) == 0


def test_a_pending_table_size_update_goes_through_h2() -> None:
    """A peer that shrank its HPACK table must see the size update first: h2 encodes that CONNECT."""
    client = HboneConnection(Role.CLIENT, 0.0)
    server = HboneConnection(Role.SERVER, 0.0)
    pump(client, server)
    client._h2.encoder.header_table_size = 1024  # as after the peer's SETTINGS_HEADER_TABLE_SIZE
    request_ = REQUESTS[1]
    sid = client.open_stream(request_)
    wire = client.data_to_send()
    assert not client._h2.encoder.header_table.resized  # h2 emitted the update
    assert server.receive_data(wire) == [StreamOpened(sid, request_)]


def test_plain_data_skips_h2_and_windows_stay_equal() -> None:
    client, server, [sid] = established(8080)
    counter = CountingDispatch(server)
    for size in (1, 1000, 16384):
        client.send_data(sid, bytes(size))
    _, events = pump(client, server)
    assert [len(e.data) for e in events if isinstance(e, DataReceived)] == [1, 1000, 16384]
    assert counter.calls == 0
    server.consumed(sid, 17385)
    pump(client, server)
    assert client._h2.outbound_flow_control_window == server._h2.inbound_flow_control_window
    assert client._h2.local_flow_control_window(sid) == server._h2.remote_flow_control_window(sid)
    assert server._h2.streams[sid]._inbound_window_manager.current_window_size == client._h2.local_flow_control_window(
        sid
    )


def test_fast_and_h2_frames_in_one_read_keep_wire_order() -> None:
    _, server, [a, b] = established(8080, 8081)
    counter = CountingDispatch(server)
    wire = (
        data(a, b"1")
        + window_update(0, 1000)
        + data(a, b"2")
        + data(b, b"3")
        + rst(b)
        + data(b, b"late")  # after the reset: h2's business (dropped), not the fast path's
        + data(a, b"4", end=True)
        + data(a, b"5")  # after END_STREAM: a stream error for h2, never delivered
    )
    events = server.receive_data(wire)
    assert [e for e in events if not isinstance(e, ConnectionTerminated)][:5] == [
        DataReceived(a, b"1"),
        DataReceived(a, b"2"),
        DataReceived(b, b"3"),
        StreamReset(b, ErrorCodes.CANCEL, remote=True),
        DataReceived(a, b"4"),
    ]
    assert events[5] == StreamEnded(a)
    assert not any(isinstance(e, DataReceived) and e.data in (b"late", b"5") for e in events)
    assert counter.calls >= 2  # the two frames after the reset and after END_STREAM went through h2


def test_overrunning_the_stream_window_on_the_fast_path_is_a_flow_control_error() -> None:
    _, server, [sid] = established(8080)
    chunk = bytes(hbone.MiB - 9)  # within the 1 MiB frame limit; the stream window is 4 MiB
    for _ in range(4):
        events = server.receive_data(data(sid, chunk))
        assert not any(isinstance(e, ConnectionTerminated) for e in events)
    events = server.receive_data(data(sid, bytes(100)))
    [end] = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert end.error_code == ErrorCodes.FLOW_CONTROL_ERROR
    assert server._h2.state_machine.state is h2.connection.ConnectionState.CLOSED


def test_data_before_the_answer_is_held_not_fast_pathed() -> None:
    client = HboneConnection(Role.CLIENT, 0.0)
    server = HboneConnection(Role.SERVER, 0.0, local_addresses=frozenset({POD}))
    pump(client, server)
    request_ = ConnectRequest(SocketAddress(POD, 8080))
    sid = client.open_stream(request_)
    events = server.receive_data(client.data_to_send() + data(sid, b"early"))
    assert events == [StreamOpened(sid, request_)]  # held until accept(): nothing forwarded before the 200
    assert server.accept(sid) == [DataReceived(sid, b"early")]


def plain_h2_exchange() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection, int]:
    """The same CONNECT, 200, DATA and END_STREAM both ways between two unmodified h2 connections."""
    config = {"header_encoding": None, "validate_inbound_headers": False}
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, **config))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, **config))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:8080")])
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(b":status", b"200")])
    client.receive_data(server.data_to_send())
    client.send_data(sid, b"last")
    client.end_stream(sid)
    server.receive_data(client.data_to_send())
    server.end_stream(sid)
    client.receive_data(server.data_to_send())
    return client, server, sid


def test_end_stream_both_ways_skips_h2_and_leaves_its_streams_as_h2_would() -> None:
    client, server, [sid] = established(8080)
    counted = CountingDispatch(server), CountingDispatch(client)
    client.send_data(sid, b"last", end_stream=True)
    wire = client.data_to_send()
    assert wire == data(sid, b"last") + data(sid, b"", end=True)  # END_STREAM framed exactly as h2 frames it
    assert server.receive_data(wire) == [DataReceived(sid, b"last"), StreamEnded(sid)]
    server.end_stream(sid)
    assert client.receive_data(server.data_to_send()) == [StreamEnded(sid)]
    assert [c.calls for c in counted] == [0, 0]
    reference_client, reference_server, ref = plain_h2_exchange()
    for ours, theirs in ((client, reference_client), (server, reference_server)):
        stream, expected = ours._h2.streams[sid], theirs.streams[ref]
        assert stream.state_machine.state is expected.state_machine.state is h2.stream.StreamState.CLOSED
        assert stream.closed_by is expected.closed_by
        assert ours._h2.state_machine.state is theirs.state_machine.state
        assert ours._h2.open_outbound_streams == theirs.open_outbound_streams
        assert ours._h2.open_inbound_streams == theirs.open_inbound_streams
    assert sid not in client._streams and sid not in server._streams


def test_end_stream_on_a_half_closed_stream_then_data_is_h2s_stream_error() -> None:
    client, server, [sid] = established(8080)
    counter = CountingDispatch(server)
    server.end_stream(sid)  # the server is done first: the client's END_STREAM closes the stream
    client.receive_data(server.data_to_send())
    events = server.receive_data(data(sid, b"", end=True) + data(sid, b"more"))
    assert events[0] == StreamEnded(sid)
    assert server._h2.streams[sid].closed_by is h2.stream.StreamClosedBy.RECV_END_STREAM
    assert counter.calls == 1  # DATA on the closed stream: h2 answers it, as before
    assert not any(isinstance(e, DataReceived) for e in events)
    assert not any(isinstance(e, ConnectionTerminated) for e in events)


def test_empty_data_without_end_stream_still_goes_through_h2() -> None:
    _, server, [sid] = established(8080)
    counter = CountingDispatch(server)
    assert server.receive_data(data(sid, b"")) == []
    assert counter.calls == 1  # counted toward the empty-DATA run limit there
