"""A sans-IO HBONE connection: HTTP/2 CONNECT tunnels, hardened against hostile peers, on python-h2.

Why this module exists: both ends of the tunnel speak HBONE (REFERENCE.md, "HBONE") — one CONNECT stream
per proxied TCP connection, multiplexed over one mTLS HTTP/2 connection. The protocol work (framing, flow
control, CONNECT validation, keepalive, abuse limits) is done here on plain bytes, so every hostile input of
REFERENCE.md ("Hostile HTTP/2 inputs") is tested by feeding raw frames, and the asyncio adapter only moves
bytes: `receive_data(bytes) -> events`, `data_to_send() -> bytes` (or `data_to_write()` -> buffers),
`tick(now) -> events`.

What it deliberately does not do: no sockets, TLS, clocks or logging (the caller passes `now`); no policy
or upstream connects — the server role reports a validated `StreamOpened` and the caller answers it with
`accept()` (200) or `reject(401 | 503)`; only the 400 cases are answered here. It does not pool
connections (pool.py). Graceful shutdown (RFC 9113 6.8) is handled here, not by h2, which ends the
connection on any GOAWAY (python-hyper/h2#1181): a peer's GOAWAY(NO_ERROR) is kept from h2 by the
reader and reported as `GoingAway` — the streams it covers carry on, ours above it are refused — and
`go_away()` sends one; a GOAWAY with an error code still ends the connection at once.

How it uses h2 (4.4), and why in these places:
- h2's receive path calls `repr(frame)` for every frame and hyperframe's repr hex-encodes the whole payload
  (REFERENCE.md, "Measured on these machines"): 1 MiB of DATA costs 2 MiB of hex. `_FrameReader` replaces
  h2's `incoming_buffer` and yields frame subclasses whose repr is a constant-time string; they are
  registered in h2's frame dispatch table next to their base classes. `tests/unit/test_hbone.py` fails if
  a hex repr is ever produced on the DATA path again, and `bench/hbone_core.py` measures the difference.
  The reader also copies a DATA payload twice (into its buffer, out as bytes) where h2's copies it three
  times. Measured with 1 MiB frames: h2 0.2-0.3 GB/s, this core about 7.5 GB/s.
- The same reader enforces what must be checked before h2 sees a frame: the raw header block size
  (HEADERS + CONTINUATION, before HPACK decoding), CONTINUATION counts, PING/SETTINGS replies and
  RST_STREAMs (h2 answers DATA on a stream the peer reset or ended with one) queued since the last
  `data_to_send()`, runs of empty DATA frames, WINDOW_UPDATE floods, and frames h2 only ignores (PRIORITY,
  ALTSVC, unknown types, PING ACKs for no PING we sent, and — counted by `_H2Connection` — RST_STREAM on a
  closed stream; `Limits.ignored_frames_per_stream` says why 100 per stream); a SETTINGS ACK for no
  SETTINGS we sent is a PROTOCOL_ERROR, as in Rust h2 and nghttp2. DATA that crossed our own RST_STREAM is
  ignored, not answered, up to the window the stream had left (`_H2Connection`). Violations become h2
  ProtocolErrors, so h2 queues the GOAWAY with our error code. It also hands h2 at most `_FRAMES_PER_STEP`
  frames at a time, so stream abuse (rapid reset, floods of malformed CONNECTs) is stopped within a large
  read rather than after it.
- h2's own header validation is off: a malformed CONNECT must be a 400 on its stream, not a connection
  error, so `parse_connect_request` validates pseudo-headers itself. For the same reason trailers without
  END_STREAM, which h2 makes a connection error, reset only their stream here (RFC 9113 8.1;
  `_H2Connection._receive_headers_frame`): one malformed stream must not end every other stream of a
  pooled connection.
- DATA frames we send are framed here, not by h2 (`_send_data_frame`): h2 copies a payload three times on
  its way out (memoryview.tobytes, header + body, its output bytearray, then `data_to_send()`), and those
  copies were most of the sender's user-space memmove in the tunnel profile. The payload is queued as-is
  behind a 9-byte header (`data_frame_header`); h2's connection and stream outbound windows are charged
  exactly as its `send_data()` would, and anything h2 has queued is taken out first, so the wire order is
  the call order. Only plain DATA, END_STREAM (an empty DATA frame, `_send_end_stream`) and the two header
  blocks below are built here: error responses, RST_STREAM, WINDOW_UPDATE, PING, SETTINGS and GOAWAY still
  go through h2, whose stream state machine stays the one source of truth — a stream h2 considers closed
  (e.g. reset by the peer earlier in the same read) gets nothing and its queue is dropped.
  `data_to_write()` returns the buffers for `writelines()`; `data_to_send()` joins them.
  `tests/unit/test_hbone.py` checks the header against hyperframe, the wire order, and that the sender's
  windows equal the receiving h2's after any mix of our DATA and h2's WINDOW_UPDATEs.
- Large unpadded DATA payloads are received directly: once a frame's header and 64 KiB of it are in,
  `receive_buffer()` offers a bytearray of the payload's size for the transport to decrypt into, and that
  bytearray becomes the event's data (handed over, never reused) — no copy into the reassembly buffer and
  none out of it. All pre-h2 checks still apply; `receive_data()` keeps working in between.
- The per-connection hot paths skip h2 where the tunnel profile (bench/tunnel_loopback.py, connection
  rate and 64 B ping-pong) showed h2's generality to be most of the cost, with h2's state advanced
  exactly as it would itself: the CONNECT request and the 200 are HPACK-encoded by hand
  (`connect_header_block`: static-table names and never-indexed literals, so neither end's dynamic table
  changes; a pending table size update falls back to h2's encoder) and sent by `_send_headers_block`;
  END_STREAM is framed by `_send_end_stream`; an unpadded DATA frame (non-empty, or empty with
  END_STREAM) on an answered stream that h2 has open for receiving is taken by the reader itself
  (`_FrameReader._fast_data`), charging h2's connection and stream inbound windows as h2 would (overruns
  are FLOW_CONTROL_ERROR as before) and, for END_STREAM, giving h2's stream state machine its
  RECV_END_STREAM, so a frame after it on that stream is h2's (a stream error) as before. Padded DATA,
  empty DATA without END_STREAM, and every stream h2 or we do not hold open and answered go through h2.
  A read step hands frames
  either all to h2 or all to the fast path and stops where that changes, so events keep wire order.
  `tests/unit/test_hbone_fastpath.py` holds both to h2's behaviour.
- Received data is acknowledged to the peer (WINDOW_UPDATE) only when the caller reports it consumed
  (`consumed()`), so a slow upstream pushes back on the sender instead of growing buffers here. Data that
  arrives before the server accepts a stream is held, unacknowledged, and handed out by `accept()`.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hpack import NeverIndexedHeaderTuple
from hyperframe.exceptions import HyperframeError, InvalidFrameError
from hyperframe.frame import FRAMES, ContinuationFrame, DataFrame, ExtensionFrame, Frame, HeadersFrame

from nodeagent.model import IPAddress, SocketAddress
from nodeagent.ztunnel.routing import TUNNEL_PORTS

MiB = 1 << 20
KiB = 1 << 10

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length split as 16+8, type, flags, stream id
_GOAWAY_BODY = struct.Struct(">LL")  # last stream id, error code (no debug data)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    range(10)
)
_FLAG_END_STREAM, _FLAG_ACK, _FLAG_END_HEADERS, _FLAG_PADDED = 0x1, 0x1, 0x4, 0x8
_FRAMES_PER_STEP = 64
_DIRECT_PAYLOAD = 64 * 1024  # DATA payloads with this much already in are received into their own buffer
_COALESCE_BELOW = 16 * 1024  # DATA payloads up to this size are copied behind their header (one record)
_SENDABLE = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE})
_RECEIVABLE = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})
# Streams we reset whose remaining receive window is remembered (_H2Connection._reset_windows): far more
# than can have frames in flight at once (200 concurrent streams); h2 itself remembers 65 536 closed ones.
_RESET_STREAMS_REMEMBERED = 1000


def data_frame_header(stream_id: int, length: int, end_stream: bool = False) -> bytes:
    """The 9-byte header of a DATA frame (RFC 9113 4.1, 6.1) carrying `length` payload bytes."""
    if not 0 <= length < 1 << 24 or not 0 < stream_id < 1 << 31:
        raise ValueError(f"no DATA frame of {length} bytes on stream {stream_id}")
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, _DATA, _FLAG_END_STREAM if end_stream else 0, stream_id)


@dataclass(frozen=True, slots=True)
class Limits:
    """HTTP/2 settings and abuse limits; the defaults are REFERENCE.md's (ztunnel's) values."""

    stream_window: int = 4 * MiB
    connection_window: int = 16 * MiB
    max_frame_size: int = 1 * MiB
    max_concurrent_streams: int = 200
    max_header_list_size: int = 64 * KiB  # decoded, with RFC 7541's 32 bytes per entry
    max_header_block_bytes: int = 64 * KiB  # raw HEADERS + CONTINUATION payload, checked before decoding
    max_header_block_frames: int = 16
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 20.0
    max_queued_control_replies: int = 1000  # PING/SETTINGS ACKs and RST_STREAMs queued since data_to_send()
    max_empty_data_run: int = 100  # consecutive DATA frames without payload (padding only) or END_STREAM
    window_update_allowance: int = 1000  # WINDOW_UPDATEs accepted beyond 4 per DATA frame we sent
    abusive_streams: int = 100  # streams reset before an answer or rejected with 400 before GOAWAY ...
    abusive_stream_ratio: float = 0.5  # ... once they exceed this share of all streams the peer opened
    # PRIORITY, ALTSVC and unknown-type frames change nothing here, yet h2 spends 4-10 µs of CPU on each
    # (CVE-2019-9513 class); so do PING ACKs that answer no PING of ours (only our keepalive's is not
    # counted): at most this many times (1 + the streams on the connection) over its lifetime,
    # then GOAWAY(ENHANCE_YOUR_CALM). It is Envoy's bound, counted the same way (PRIORITY frames against
    # max_inbound_priority_frames_per_stream = 100 x (1 + inbound streams)); nginx allows max(128, 100) +
    # 128 per stream, nghttp2 >= 1.67 a bucket of 10 000 refilled at 330/s. Rust h2 (ztunnel) ignores them
    # without a bound, and neither it nor python-h2 nor Envoy sends any on its own; RFC 9113 5.3.2
    # deprecates PRIORITY. A legitimate HBONE peer stays far below; a flood gets at most ~1 ms of CPU per
    # stream it had to open (a CONNECT answered, or counted by the rapid-reset rule) and per connection.
    ignored_frames_per_stream: int = 100


class HboneError(Exception):
    """Base of this module's errors; `error_code` is the HTTP/2 error code the condition maps to."""

    def __init__(self, message: str, error_code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        super().__init__(message)
        self.error_code = int(error_code)


class BadConnectRequest(HboneError):
    """A request the tunnel answers with 400 (REFERENCE.md): not CONNECT, bad or foreign authority, ..."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCodes.PROTOCOL_ERROR)


class StreamStateError(HboneError):
    """The caller used a stream id that is unknown, already answered or closed; check the events first."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCodes.STREAM_CLOSED)


class ConnectionClosedError(HboneError):
    """The connection has terminated (see the ConnectionTerminated event); open a new one."""


class _Abuse(h2.exceptions.ProtocolError):
    """Raised inside h2's receive loop so h2 sends GOAWAY with `error_code` (usually ENHANCE_YOUR_CALM)."""

    def __init__(self, message: str, error_code: ErrorCodes = ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        super().__init__(message)
        self.error_code = error_code


# --- CONNECT requests ------------------------------------------------------------------------------------

_REQUEST_PSEUDO = frozenset({b":method", b":authority", b":scheme", b":path", b":protocol"})
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A validated HBONE CONNECT: where to connect upstream, plus the optional metadata headers."""

    target: SocketAddress
    baggage: str | None = None
    forwarded: str | None = None
    traceparent: str | None = None


def parse_connect_request(
    headers: list[tuple[bytes, bytes]], local_addresses: frozenset[IPAddress] | None = None
) -> ConnectRequest:
    """Validate a decoded request header list; raise BadConnectRequest (status 400) with the reason.

    `local_addresses` are the IPs of the pod the connection arrived for; a target outside them is a 400.
    """
    pseudo: dict[bytes, bytes] = {}
    extra: dict[bytes, bytes] = {}
    regular_seen = False
    for name, value in headers:
        if name != name.lower():
            raise BadConnectRequest(f"header name {name!r} is not lowercase")
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise BadConnectRequest(f"header {name!r} has a CR, LF or NUL in its value")
        if name.startswith(b":"):
            if regular_seen:
                raise BadConnectRequest(f"pseudo-header {name!r} after a regular header")
            if name not in _REQUEST_PSEUDO:
                raise BadConnectRequest(f"unknown pseudo-header {name!r}")
            if name in pseudo:
                raise BadConnectRequest(f"pseudo-header {name!r} repeated")
            pseudo[name] = value
            continue
        regular_seen = True
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise BadConnectRequest(f"connection-specific header {name!r} is not allowed in HTTP/2")
        if name in (b"baggage", b"forwarded", b"traceparent"):
            extra[name] = value if name not in extra else extra[name] + b", " + value
    method = pseudo.get(b":method")
    if method != b"CONNECT":
        raise BadConnectRequest(f"method {method!r} is not CONNECT; HBONE carries only CONNECT tunnels")
    for forbidden in (b":path", b":scheme", b":protocol"):
        if forbidden in pseudo:
            raise BadConnectRequest(f"a plain CONNECT must not carry {forbidden.decode()}")
    authority = pseudo.get(b":authority")
    if not authority:
        raise BadConnectRequest("CONNECT without :authority; expected ip:port of the destination pod")
    target = _parse_authority(authority)
    if target.port in TUNNEL_PORTS:
        raise BadConnectRequest(f"target port {target.port} is a tunnel port; refusing a loop")
    if local_addresses is not None and target.ip not in local_addresses:
        raise BadConnectRequest(f"target {target} is not an address of the pod this connection arrived for")
    return ConnectRequest(
        target,
        *(extra[h].decode("latin-1") if h in extra else None for h in (b"baggage", b"forwarded", b"traceparent")),
    )


@functools.lru_cache(maxsize=1024)
def _parse_authority(authority: bytes) -> SocketAddress:
    """`ip:port` of a CONNECT. Cached: every connection to a pod port carries the same authority, and
    parsing it (ipaddress) was a third of the server's CONNECT handling; failures are not cached."""
    try:
        return SocketAddress.parse(authority.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadConnectRequest(f"bad :authority {authority[:100]!r}: {e}") from None


def connect_headers(request: ConnectRequest) -> list[tuple[bytes, bytes]]:
    """The header list a client sends for `request`.

    The metadata headers differ on nearly every connection (`forwarded` carries the client's port), so
    they are HPACK never-indexed: indexing them would only churn both ends' dynamic tables, and hpack
    searches its table linearly on every header it encodes (measured: most of a CONNECT's encode time).
    h2's outbound validation is off (HboneConnection), so values are checked here."""
    authority = str(request.target).encode("ascii")
    headers: list[tuple[bytes, bytes]] = [(b":method", b"CONNECT"), (b":authority", authority)]
    for name, value in (
        (b"baggage", request.baggage),
        (b"forwarded", request.forwarded),
        (b"traceparent", request.traceparent),
    ):
        if value is not None:
            raw = value.encode("latin-1")
            if b"\r" in raw or b"\n" in raw or b"\x00" in raw:
                raise ValueError(f"header {name.decode()} has a CR, LF or NUL in its value: {value[:100]!r}")
            headers.append(NeverIndexedHeaderTuple(name, raw))
    return headers


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: `value` with an N-bit prefix, `first` holding the representation's flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(raw: bytes) -> bytes:
    return _hpack_int(len(raw), 7, 0) + raw  # H=0: no Huffman (cheaper both ends; these are short)


# RFC 7541 Appendix A: static table indices used by the hand-written header blocks.
_STATIC_AUTHORITY, _STATIC_METHOD, _STATIC_STATUS_200 = 1, 2, 8
_CONNECT_METHOD = _hpack_int(_STATIC_METHOD, 4, 0x00) + _hpack_string(b"CONNECT")  # literal w/o indexing
_STATUS_200 = _hpack_int(_STATIC_STATUS_200, 7, 0x80)  # indexed field


def connect_header_block(request: ConnectRequest) -> bytes:
    """The HPACK block of `connect_headers(request)`, written by hand (RFC 7541): only static-table names
    and literals that are never indexed, so neither end's dynamic table changes and h2's encoder and the
    peer's decoder stay in step whatever h2 encodes later. Measured: a third of h2's send_headers cost.
    """
    parts = [_CONNECT_METHOD, _hpack_int(_STATIC_AUTHORITY, 4, 0x00), _hpack_string(str(request.target).encode())]
    for name, value in connect_headers(request)[2:]:
        parts.append(b"\x10" + _hpack_string(name) + _hpack_string(value))  # literal never indexed, new name
    return b"".join(parts)


# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """Server: a valid CONNECT arrived. Authorize and connect upstream, then accept() or reject()."""

    stream_id: int
    request: ConnectRequest


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """Server: a CONNECT this core answered itself with `status` (400); for logs and metrics only. (Not
    answered on the wire if the peer closed the stream in the same read; it still counts as abuse.)"""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamEstablished:
    """Client: the server answered 200; the tunnel is up."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """Client: the server answered `status` (400 bad request, 401 denied by policy, 503 no upstream)."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel bytes. Report them with consumed(stream_id, len(data)) once written upstream. A bytearray
    (a large payload received directly, or what accept() hands out) is the caller's to keep: the core
    never touches it again."""

    stream_id: int
    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed its direction (END_STREAM): shut down the write side upstream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone: reset by the peer (`remote`), or by this core for a protocol violation."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class SendDrained:
    """Everything queued with send_data() on this stream has been framed; resume reading upstream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoingAway:
    """The peer sent a graceful GOAWAY (NO_ERROR): it takes no new streams on this connection. Streams up to
    `last_stream_id` carry on to their end; ours above it were never processed (each reported as a remote
    REFUSED_STREAM reset, so the caller may retry it elsewhere). Close the connection once the rest are done."""

    last_stream_id: int
    reason: str  # the GOAWAY's debug data, if any


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over: flush data_to_send() (it may hold our GOAWAY) and close the transport."""

    error_code: int
    reason: str
    remote: bool


Event = (
    StreamOpened
    | StreamRejected
    | StreamEstablished
    | ConnectFailed
    | DataReceived
    | StreamEnded
    | StreamReset
    | SendDrained
    | GoingAway
    | ConnectionTerminated
)


# --- the frame reader ------------------------------------------------------------------------------------


def _constant_repr(self: Frame) -> str:
    # h2 formats every received frame for a trace log it usually discards; keep that O(1).
    return f"{type(self).__bases__[0].__name__}(stream_id={self.stream_id})"


F = TypeVar("F", bound=Frame)


def _quiet(cls: type[F]) -> type[F]:
    return type(cls.__name__, (cls,), {"__repr__": _constant_repr, "__module__": __name__})


_QuietDataFrame = _quiet(DataFrame)
_QuietExtensionFrame = _quiet(ExtensionFrame)
_QUIET_FRAMES: dict[int, type[Frame]] = {
    kind: _QuietDataFrame if kind == _DATA else _quiet(cls) for kind, cls in FRAMES.items() if kind is not None
}


class _FrameReader(FrameBuffer):
    """Frames from bytes for h2, with the pre-decode limits of REFERENCE.md (see the module docstring)."""

    def __init__(self, server: bool, limits: Limits) -> None:
        super().__init__(server=server)
        self._buf = bytearray()
        self._preface = _PREFACE if server else b""
        self._limits = limits
        self._block: list[Frame] = []
        self._block_bytes = 0
        self.control_replies = 0  # PING/SETTINGS ACKs and RST_STREAMs queued; reset by data_to_write()
        self.data_frames_sent = 0  # maintained by HboneConnection
        self.streams = 0  # streams opened on the connection, by either end; maintained by HboneConnection
        self._ignored_frames = 0  # frames that change nothing and get no reply: see ignored()
        # What the peer's ACKs may answer: our one SETTINGS frame (initiate_connection; we never send another)
        # and the payload of our keepalive PING in flight (set by HboneConnection.tick), if any.
        self.settings_unacked = 1
        self.ping_payload: bytes | None = None
        self._empty_data_run = 0
        self._window_updates = 0
        self.budget = 0  # frames h2 may take in this step; set by HboneConnection.receive_data()
        self._payload: bytearray | None = None  # a large DATA payload being received directly
        self._filled = 0
        self._payload_header = (0, 0)
        self._ready: Frame | None = None  # ... and its frame once complete, next for h2
        # The DATA fast path (see HboneConnection._fast_stream): a step hands frames either all to h2 or
        # all to the fast path, and stops where the kind changes (`more`), so events keep frame order.
        self.fast_stream: Callable[[int], Any] | None = None  # stream id -> h2 stream, or None: use h2
        self.fast_end: Callable[[int, list[Event]], None] | None = None  # the connection's END_STREAM bookkeeping
        self.fast_events: list[Event] = []
        self.fast_windows: Any = None  # h2's connection-level inbound window manager
        self._step_fast: bool | None = None  # None: no frame yet in this step
        self.more = False  # the step stopped early because the kind of frame changed
        self.goaway: tuple[int, bytes] | None = None  # a graceful GOAWAY kept from h2: last stream, debug data

    def new_step(self, budget: int) -> None:
        self.budget = budget
        self._step_fast = None
        self.more = False

    def clear(self) -> None:
        """Drop buffered input (the connection has terminated)."""
        self._buf = bytearray()
        self._block = []
        self._payload = None
        self._ready = None

    # -- direct receive of large DATA payloads --------------------------------------------------------
    # Once the header of a large unpadded DATA frame has been read, the rest of its payload goes straight
    # from the TLS layer into a buffer of exactly its size (`payload_buffer()`/`payload_received()`), and
    # that buffer becomes the frame's data: no copy into `_buf`, no copy out of it. Every check of
    # `_next_frame` (frame size, budget, header-block interruption) still applies; only the bytes skip
    # the reassembly buffer.

    def payload_buffer(self) -> memoryview | None:
        if self._payload is None:
            return None
        return memoryview(self._payload)[self._filled :]

    def payload_received(self, nbytes: int) -> None:
        assert self._payload is not None and 0 < nbytes <= len(self._payload) - self._filled
        self._filled += nbytes
        if self._filled == len(self._payload):
            flags, stream_id = self._payload_header
            frame = _QuietDataFrame(stream_id)
            frame.parse_flags(flags)
            frame.data = self._payload  # type: ignore[assignment]  # a bytearray handed over, never reused
            frame.body_len = len(self._payload)
            self._empty_data_run = 0
            self._ready = frame
            self._payload = None

    def _start_payload(self, buf: bytearray, flags: int, stream_id: int, length: int) -> None:
        payload = bytearray(length)
        have = len(buf) - 9
        payload[:have] = memoryview(buf)[9:]
        del buf[:]
        self._payload = payload
        self._filled = have
        self._payload_header = (flags, stream_id)

    def add_data(self, data: Any) -> None:
        if self._payload is not None:  # bytes fed the ordinary way while a payload is received directly
            view = memoryview(data)
            take = min(len(self._payload) - self._filled, len(view))
            if take:
                self._payload[self._filled : self._filled + take] = view[:take]
                self.payload_received(take)
            if take == len(view):
                return
            data = view[take:]
        if self._preface:
            view = memoryview(data)
            n = min(len(self._preface), len(view))
            if view[:n] != self._preface[:n]:
                raise _Abuse(
                    "the client did not start with the HTTP/2 preface (cleartext or not HTTP/2?)",
                    ErrorCodes.PROTOCOL_ERROR,
                )
            self._preface = self._preface[n:]
            self._buf += view[n:]
        else:
            self._buf += data

    def __next__(self) -> Frame:
        if self.control_replies > self._limits.max_queued_control_replies:
            # RST_STREAMs are counted as h2 queues them (_H2Connection), after the frame that caused them.
            raise _Abuse(self._too_many_replies())
        ready = self._ready
        if ready is not None:
            if self.budget <= 0 or not self._h2_step():
                raise StopIteration
            self._ready = None
            self.budget -= 1
            out = self._assemble(ready, _DATA, 0, ready.stream_id, ready.body_len)
            assert out is ready  # not a header block frame
            return out
        if self._payload is not None:
            raise StopIteration
        while True:
            if self.budget <= 0:
                raise StopIteration
            frame = self._next_frame()
            if frame is not None:
                self.budget -= 1
                return frame

    def _h2_step(self) -> bool:
        """The next frame goes to h2: False (stop the step) if this step has taken the fast path."""
        if self._step_fast:
            self.more = True
            return False
        self._step_fast = False
        return True

    def _fast_data(self, buf: bytearray, stream_id: int, end: int, end_stream: bool) -> bool:
        """An unpadded DATA frame on an open, answered stream, handled without h2 (see the module docstring):
        True if taken, False if h2 must see it. h2's windows are charged exactly as its own receive would
        (a peer overrunning one is a FLOW_CONTROL_ERROR, raised into h2's receive loop as usual); with
        END_STREAM, h2's stream state machine takes the input its receive would give it (RECV_END_STREAM:
        half-closed or closed by the peer), so any frame after it on the stream is h2's again."""
        if self.fast_stream is None or self._block:
            return False
        h2_stream = self.fast_stream(stream_id)
        if h2_stream is None:
            return False
        if self._step_fast is False:  # h2 has frames of this step still to report: stop here
            self.more = True
            raise StopIteration
        self._step_fast = True
        n = end - 9
        if n:
            self.fast_windows.window_consumed(n)
            h2_stream._inbound_window_manager.window_consumed(n)
            h2_stream._actual_content_length += n
            with memoryview(buf) as view, view[9:end] as payload:
                self.fast_events.append(DataReceived(stream_id, payload.tobytes()))
        if end_stream:
            h2_stream.state_machine.process_input(h2.stream.StreamInputs.RECV_END_STREAM)
            assert self.fast_end is not None
            self.fast_end(stream_id, self.fast_events)
        del buf[:end]
        self._empty_data_run = 0
        self.budget -= 1
        return True

    def _next_frame(self) -> Frame | None:
        buf = self._buf
        if len(buf) < 9:
            raise StopIteration
        high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(buf)
        length = (high << 8) | low
        stream_id &= 0x7FFFFFFF
        if length > self.max_frame_size:
            raise h2.exceptions.FrameTooLargeError(f"frame of {length} bytes exceeds {self.max_frame_size}")
        end = 9 + length
        if len(buf) < end:
            # Direct receive only once 64 KiB of the payload are in: a peer cannot make us allocate a
            # max-size buffer for a bare 9-byte header (at most 16x what it sent, one frame at a time).
            # Never on stream 0: that DATA frame is a connection error, refused below once complete
            # (payload_received() builds its frame outside those checks).
            if (
                kind == _DATA
                and stream_id
                and len(buf) - 9 >= _DIRECT_PAYLOAD
                and not flags & _FLAG_PADDED
                and not self._block
            ):
                self._start_payload(buf, flags, stream_id, length)
            raise StopIteration
        if (
            kind == _DATA
            and not flags & _FLAG_PADDED
            and (length or flags & _FLAG_END_STREAM)
            and self._fast_data(buf, stream_id, end, bool(flags & _FLAG_END_STREAM))
        ):
            return None
        if not self._h2_step():
            raise StopIteration
        try:
            if kind == _DATA:
                frame = self._data_frame(buf, flags, stream_id, length)
            else:
                self._check_control(buf, kind, flags, stream_id, length)
                cls = _QUIET_FRAMES.get(kind)
                frame = cls(stream_id) if cls is not None else _QuietExtensionFrame(kind, stream_id)
                frame.parse_flags(flags)
                frame.parse_body(memoryview(bytes(buf[9:end])))
        except HyperframeError as e:
            # As h2's own reader: a body too short or long for its type (PING, SETTINGS, WINDOW_UPDATE,
            # RST_STREAM, ...) is FRAME_SIZE_ERROR (RFC 9113 4.2 and each frame's section), other bad
            # contents PROTOCOL_ERROR.
            code = ErrorCodes.FRAME_SIZE_ERROR if isinstance(e, InvalidFrameError) else ErrorCodes.PROTOCOL_ERROR
            raise _Abuse(f"malformed frame of type {kind}: {e}", code) from None
        del buf[:end]
        if kind == _GOAWAY and not stream_id and not frame.error_code and not self._block:  # type: ignore[attr-defined]
            # Graceful: h2 would close the whole connection on it (python-hyper/h2#1181); the connection
            # handles it instead, between this step's frames and the next (`more`), so events keep order.
            self.goaway = (frame.last_stream_id, frame.additional_data)  # type: ignore[attr-defined]
            self.more = True
            raise StopIteration
        return self._assemble(frame, kind, flags, stream_id, length)

    def _data_frame(self, buf: bytearray, flags: int, stream_id: int, length: int) -> Frame:
        frame = _QuietDataFrame(stream_id)
        frame.parse_flags(flags)
        start, stop = 9, 9 + length
        if flags & _FLAG_PADDED:
            if not length:  # no room for the Pad Length field (RFC 9113 4.2; h2 says the same)
                raise _Abuse("PADDED DATA frame without a Pad Length", ErrorCodes.FRAME_SIZE_ERROR)
            pad = buf[9]
            if pad >= length:  # RFC 9113 6.1
                raise _Abuse("DATA padding longer than the frame", ErrorCodes.PROTOCOL_ERROR)
            frame.pad_length = pad
            start, stop = 10, stop - pad
        with memoryview(buf) as view, view[start:stop] as payload:
            frame.data = payload.tobytes()
        frame.body_len = length
        if start == stop and not flags & _FLAG_END_STREAM:  # no payload byte, be it padded or not
            self._empty_data_run += 1
            if self._empty_data_run > self._limits.max_empty_data_run:
                raise _Abuse(f"more than {self._limits.max_empty_data_run} empty DATA frames in a row")
        else:
            self._empty_data_run = 0
        return frame

    def _check_control(self, buf: bytearray, kind: int, flags: int, stream_id: int, length: int) -> None:
        if kind in (_PING, _SETTINGS):
            if not flags & _FLAG_ACK:
                self.control_replies += 1
                if self.control_replies > self._limits.max_queued_control_replies:
                    raise _Abuse(self._too_many_replies())
            elif kind == _SETTINGS:
                if length:  # RFC 9113 6.5 (h2 says PROTOCOL_ERROR)
                    raise _Abuse(f"SETTINGS ACK with {length} bytes of payload", ErrorCodes.FRAME_SIZE_ERROR)
                if not self.settings_unacked:
                    # h2 would just apply nothing; Rust h2 (ztunnel) and nghttp2 (Envoy) end the connection.
                    raise _Abuse("SETTINGS ACK for no SETTINGS we sent", ErrorCodes.PROTOCOL_ERROR)
                self.settings_unacked -= 1
            elif self.ping_payload is not None and length == 8 and buf[9:17] == self.ping_payload:
                self.ping_payload = None  # our keepalive answered: the only PING ACK that is not a flood
            else:
                self.ignored("PING ACK for no PING we sent")
        elif kind == _WINDOW_UPDATE:
            self._window_updates += 1
            if self._window_updates > self._limits.window_update_allowance + 4 * self.data_frames_sent:
                raise _Abuse("WINDOW_UPDATE flood: far more updates than DATA frames sent")
        elif kind == _PUSH_PROMISE:
            raise _Abuse("PUSH_PROMISE received although push is disabled", ErrorCodes.PROTOCOL_ERROR)
        elif kind == _PRIORITY or kind > _CONTINUATION:  # frames h2 ignores: PRIORITY, ALTSVC, unknown types
            self.ignored("PRIORITY/unknown frames")

    def ignored(self, what: str) -> None:
        """One more frame that h2 processes for nothing — no state change, no reply to bound it — counted
        against `Limits.ignored_frames_per_stream` x (1 + streams): PRIORITY, ALTSVC and unknown types, PING
        ACKs that answer no PING of ours (Rust h2 ignores them, unbounded), and from `_H2Connection`
        RST_STREAM on a closed stream and empty DATA on a stream we reset."""
        self._ignored_frames += 1
        if self._ignored_frames > self._limits.ignored_frames_per_stream * (1 + self.streams):
            raise _Abuse(
                f"flood of frames that change nothing ({what}): more than "
                f"{self._limits.ignored_frames_per_stream} per stream ({self.streams} streams)"
            )

    def _too_many_replies(self) -> str:
        limit = self._limits.max_queued_control_replies
        return f"more than {limit} PING/SETTINGS ACKs and RST_STREAMs queued before the output was drained"

    def _assemble(self, frame: Frame, kind: int, flags: int, stream_id: int, length: int) -> Frame | None:
        """Join HEADERS + CONTINUATION into one HEADERS frame, within the raw size and frame-count caps."""
        limits = self._limits
        if self._block:
            if kind != _CONTINUATION or stream_id != self._block[0].stream_id:
                raise _Abuse("a header block was interrupted by another frame", ErrorCodes.PROTOCOL_ERROR)
            self._block.append(frame)
            self._block_bytes += length
        elif kind == _HEADERS:
            self._block = [frame]
            self._block_bytes = length
        else:
            return frame
        if self._block_bytes > limits.max_header_block_bytes:
            raise _Abuse(f"header block larger than {limits.max_header_block_bytes} bytes before decoding")
        if len(self._block) > limits.max_header_block_frames:
            raise _Abuse(f"header block split over more than {limits.max_header_block_frames} frames")
        if not flags & _FLAG_END_HEADERS:
            return None
        first, rest = self._block[0], self._block[1:]
        self._block = []
        if rest and isinstance(first, HeadersFrame):
            first.data = first.data + b"".join(f.data for f in rest if isinstance(f, ContinuationFrame))
            first.flags.add("END_HEADERS")
        return first


# --- the connection --------------------------------------------------------------------------------------


class _H2Connection(h2.connection.H2Connection):
    """h2, with what it does for frames on closed streams bounded or corrected:

    - The RST_STREAM frames it queues count into the reader's reply budget: h2 answers frames on a stream
      the peer reset with one, so one read of tiny DATA frames there would otherwise queue thousands (30%
      more bytes out than in). Ours (`_reset`) count too. DATA after the peer's END_STREAM gets one such
      reply too, but h2 resets the stream with it (closed_by SEND_RST_STREAM): what follows there is
      handled as on a stream we reset (next item).
    - DATA on a stream *we* reset is ignored, not answered (RFC 9113 5.1: the peer sent it before our
      RST_STREAM arrived; Rust h2 and nghttp2 ignore it too). h2 answered each frame with RST_STREAM, so
      a busy honest peer — an interactive app's small frames in flight when the upstream failed — could
      fill the reply budget and end the connection with every other stream on it. The bound instead is
      the stream's receive window when our RST_STREAM left (`_reset_windows`): the peer cannot have sent
      more before it arrived, and we never reopen that window; a peer that goes on sending on the stream
      runs past it, a FLOW_CONTROL_ERROR. Empty DATA frames there, which carry no window, count as
      ignored frames (`_FrameReader.ignored`).
    - RST_STREAM on a stream that is already closed (or never opened) changes nothing in h2 and gets no
      reply: it counts as an ignored frame. One per stream is normal (the peer's reset crossed ours, or
      followed our END_STREAM); the budget allows 100 per stream."""

    def __init__(self, config: h2.config.H2Configuration, reader: _FrameReader) -> None:
        self._replies = reader
        # Stream id -> the bytes its peer may still send on it: the receive window when our RST_STREAM
        # left, less what arrived since. The last _RESET_STREAMS_REMEMBERED streams; DATA on one reset
        # before those gets h2's RST_STREAM(STREAM_CLOSED) reply again, counted in the reply budget.
        self._reset_windows: dict[int, int] = {}
        super().__init__(config)

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        # h2's body, not a super() call: every consumed() comes through here (measured: super() cost
        # 180 ns a call, 4% of a 64-byte frame's send + receive + acknowledge).
        if not frames:
            return
        for f in frames:
            if f.type == _RST_STREAM:
                self._replies.control_replies += 1
                if f.stream_id not in self._reset_windows:
                    self._remember_reset(f.stream_id)
        self._data_to_send += b"".join(f.serialize() for f in frames)
        assert all(f.body_len <= self.max_outbound_frame_size for f in frames)

    def _remember_reset(self, stream_id: int) -> None:
        """Our RST_STREAM is leaving for `stream_id`: if we reset the stream (our `_reset`, or h2's own
        reset of a stream the peer sent DATA on after its END_STREAM), not h2's reply on a stream the peer
        reset, remember how much the peer may still send on it."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.closed_by is not h2.stream.StreamClosedBy.SEND_RST_STREAM:
            return
        windows = self._reset_windows
        windows[stream_id] = stream._inbound_window_manager.current_window_size
        if len(windows) > _RESET_STREAMS_REMEMBERED:
            del windows[next(iter(windows))]  # the oldest

    def _handle_data_on_closed_stream(
        self, events: list[h2.events.Event], exc: h2.exceptions.StreamClosedError, frame: DataFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        """h2's (the bytes go back to the connection window), without the RST_STREAM for a stream we reset."""
        stream_id = frame.stream_id
        window = self._reset_windows.get(stream_id)
        if window is None:
            return super()._handle_data_on_closed_stream(events, exc, frame)
        n = frame.flow_controlled_length
        if n > window:
            raise _Abuse(
                f"DATA on stream {stream_id}, which we reset, beyond the {window} bytes its window still allowed",
                ErrorCodes.FLOW_CONTROL_ERROR,
            )
        if not n:
            self._replies.ignored("empty DATA on a stream we reset")
        self._reset_windows[stream_id] = window - n
        frames, events = super()._handle_data_on_closed_stream(events, exc, frame)
        return [f for f in frames if f.type != _RST_STREAM], events

    def _receive_rst_stream_frame(self, frame: Frame) -> tuple[list[Frame], list[h2.events.Event]]:
        stream = self.streams.get(frame.stream_id)
        if stream is None or stream.closed:  # h2 does nothing for it and sends nothing back
            self._replies.ignored("RST_STREAM on a closed or idle stream")
        return super()._receive_rst_stream_frame(frame)  # type: ignore[arg-type]

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        """h2's, except that trailers without END_STREAM end only their stream. h2 raises a plain
        ProtocolError for them ("Trailers must have END_STREAM set", h2/stream.py receive_headers), which
        its receive loop turns into GOAWAY: every other stream of a pooled connection would die with it.
        RFC 9113 8.1 makes such a message malformed, a stream error of type PROTOCOL_ERROR (as Rust h2
        treats it: "trailers frame was not EOS"). Caught here, on the error path only, after h2 has decoded
        the block (so both ends' HPACK tables stay in step) and taken it as trailers: the stream is reset
        with RST_STREAM(PROTOCOL_ERROR), as h2's reset_stream() would, and reported as h2 reports a stream
        error it resets itself (StreamReset, not remote). Any other failure stays a connection error."""
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as e:
            stream = self.streams.get(frame.stream_id)
            if (
                type(e) is not h2.exceptions.ProtocolError
                or "END_STREAM" in frame.flags
                or stream is None
                # In these states a HEADERS frame on a stream with headers is taken as trailers, and one
                # taken before would have ended the stream (or reset it, here): this one set the flag.
                or stream.state_machine.state not in _RECEIVABLE
                or not stream.state_machine.trailers_received
            ):
                raise
            self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_RST_STREAM)
            reset = h2.events.StreamReset(
                stream_id=frame.stream_id, error_code=ErrorCodes.PROTOCOL_ERROR, remote_reset=False
            )
            return stream.reset_stream(ErrorCodes.PROTOCOL_ERROR), [reset]


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(slots=True)
class _Stream:
    stream_id: int
    answered: bool = False  # server: 200 sent; client: 200 received
    # Both made only when needed and dropped when empty: thousands of idle streams hold neither.
    held: bytearray | None = None  # server: data received before accept(), in one buffer (see _on_data)
    held_end: bool = False
    queue: deque[memoryview] | None = None  # data waiting for flow-control window
    queued: int = 0
    end_queued: bool = False  # END_STREAM to send once the queue is empty
    local_closed: bool = False
    remote_closed: bool = False


@dataclass(slots=True)
class _Batch:
    """Bookkeeping for one receive_data() call."""

    opened: set[int] = field(default_factory=set)  # StreamOpened emitted in this read
    hidden: set[int] = field(default_factory=set)  # ... and reset in it too: withdrawn
    drained: set[int] = field(default_factory=set)


class HboneConnection:
    """One HTTP/2 connection carrying HBONE CONNECT streams, as client or server. Not thread-safe.

    Use: feed every received byte to receive_data(), handle the events, and after every call write
    data_to_send() to the transport. Call tick(now) at next_deadline for keepalive.
    """

    def __init__(
        self,
        role: Role,
        now: float,
        *,
        limits: Limits | None = None,
        local_addresses: frozenset[IPAddress] | None = None,
    ) -> None:
        self.role = role
        self.limits = limits = limits or Limits()
        self._local_addresses = local_addresses
        client = role is Role.CLIENT
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            # We only send headers we build (connect_headers, :status): nothing to validate or normalize.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._reader = _FrameReader(server=not client, limits=limits)
        conn = _H2Connection(config, self._reader)
        # Our limits as *current* values, so they hold before the peer acknowledges our SETTINGS.
        conn.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            },
        )
        conn.max_inbound_frame_size = limits.max_frame_size
        conn.decoder.max_header_list_size = limits.max_header_list_size
        conn.incoming_buffer = self._reader
        table = conn._frame_dispatch_table
        for kind, quiet in _QUIET_FRAMES.items():
            table[quiet] = table[FRAMES[kind]]
        table[_QuietExtensionFrame] = table[ExtensionFrame]
        conn.initiate_connection()
        if limits.connection_window > 65535:
            conn.increment_flow_control_window(limits.connection_window - 65535)
        self._h2 = conn
        self._reader.fast_stream = self._fast_stream
        self._reader.fast_end = self._on_end
        self._reader.fast_windows = conn._inbound_flow_control_window_manager
        self._out: list[bytes | memoryview] = []  # our DATA frames and h2's output before them, in order
        self._streams: dict[int, _Stream] = {}
        self._closed = False
        self._ping_due = now + limits.keepalive_interval
        self._ping_sent_at: float | None = None
        self._ping_payload = b""
        self._pings = 0
        self._peer_streams = 0
        self._abusive_streams = 0
        self._peer_last_stream: int | None = None  # the peer's graceful GOAWAY: no new streams from us
        self._our_last_stream: int | None = None  # ours (go_away()): the peer opens no more here

    # -- I/O surface -------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport now (possibly empty). Joins data_to_write()."""
        return b"".join(self.data_to_write())

    def data_to_write(self, *, unsent: bool = False) -> list[bytes | memoryview]:
        """What to write to the transport now, in order, as buffers for `writelines()`: DATA payloads
        are views of the buffers given to send_data(), not copies (possibly an empty list).

        `unsent`: the transport is over its high-water mark (the peer is not reading), so what is handed
        out now is not on the wire yet: the PING/SETTINGS/RST_STREAM replies keep counting against
        `max_queued_control_replies` until a write with room, and a peer that sends but never reads
        cannot grow our output without bound (CVE-2019-9512/9514/9515)."""
        if not unsent:
            self._reader.control_replies = 0
        pending = self._h2.data_to_send()
        out = self._out
        if not out:
            return [pending] if pending else []
        self._out = []
        if pending:
            out.append(pending)
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Process bytes from the transport. Never raises on peer input: fatal problems end the list with
        ConnectionTerminated, after which the connection ignores input.

        h2 is fed at most `_FRAMES_PER_STEP` frames at a time so abuse is caught early in a large read;
        a stream opened and reset within the same read is never surfaced (CVE-2023-44487)."""
        if self._closed:
            return []
        out: list[Event] = []
        batch = _Batch()
        chunk: bytes | bytearray | memoryview = data
        reader = self._reader
        fast = reader.fast_events
        while not self._closed:
            reader.new_step(_FRAMES_PER_STEP)
            try:
                h2_events = self._h2.receive_data(chunk)
                chunk = b""
                if fast:  # a step of fast-path DATA frames (then h2_events is empty)
                    out.extend(fast)
                    fast.clear()
                for event in h2_events:
                    if self._closed:
                        break
                    self._translate(event, batch, out)
                if reader.goaway is not None and not self._closed:
                    out.extend(self._peer_going_away(*reader.goaway))
                reader.goaway = None
            except h2.exceptions.ProtocolError as e:  # h2 has usually queued GOAWAY with e.error_code already
                fast.clear()
                out.extend(self._terminated(int(e.error_code), str(e), remote=False))
                break
            self._check_abuse(out)
            if reader.budget and not reader.more:  # the reader ran out of complete frames
                break
        if batch.hidden:
            out = [e for e in out if not (isinstance(e, StreamOpened) and e.stream_id in batch.hidden)]
        if not self._closed:
            streams = self._streams
            out.extend(SendDrained(sid) for sid in batch.drained if sid in streams and not streams[sid].queued)
        return out

    def receive_buffer(self) -> memoryview | None:
        """Where the transport may write the next bytes directly: the rest of a large DATA payload whose
        header has arrived (its bytes then need no copy here), or None (use receive_data()). Report what
        was written with receive_into(); the view must not be used after that."""
        return None if self._closed else self._reader.payload_buffer()

    def receive_into(self, nbytes: int) -> list[Event]:
        """`nbytes` were written at the start of receive_buffer(): process them like receive_data()."""
        if self._closed:
            return []
        self._reader.payload_received(nbytes)
        return self.receive_data(b"")

    def _fast_stream(self, stream_id: int) -> Any:
        """The h2 stream if a plain DATA frame for `stream_id` may skip h2 (the receive fast path): the
        stream is answered and open for receiving, in h2's state machine as in ours, and has no
        content-length to track; a DATA frame changes no state there, only the windows the reader charges.
        Everything else (END_STREAM, padding, closed or unknown streams, errors) still goes through h2.
        Measured: h2's receive of a small DATA frame costs about 8 µs, this path about 2 µs."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.answered or self._closed:
            return None
        h2_stream = self._h2.streams.get(stream_id)
        if (
            h2_stream is None
            or h2_stream.state_machine.state not in _RECEIVABLE
            or h2_stream._expected_content_length is not None
            or self._h2.state_machine.state is h2.connection.ConnectionState.CLOSED
        ):
            return None
        return h2_stream

    def _check_abuse(self, out: list[Event]) -> None:
        limits = self.limits
        if (
            not self._closed
            and self._abusive_streams >= limits.abusive_streams
            and self._abusive_streams > limits.abusive_stream_ratio * self._peer_streams
        ):
            out.extend(
                self._terminate(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"{self._abusive_streams} of {self._peer_streams} streams were reset before an answer "
                    "or malformed (rapid reset?)",
                )
            )

    def tick(self, now: float) -> list[Event]:
        """Keepalive: send a PING every interval; terminate when one stays unanswered for the timeout."""
        if self._closed:
            return []
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= self.limits.keepalive_timeout:
                return self._terminate(
                    ErrorCodes.NO_ERROR,
                    f"no PING reply for {self.limits.keepalive_timeout:g} s; the peer or the path is dead",
                )
        elif now >= self._ping_due:
            self._pings += 1
            self._ping_payload = self._pings.to_bytes(8, "big")
            self._ping_sent_at = now
            self._reader.ping_payload = self._ping_payload
            self._h2.ping(self._ping_payload)
        return []

    @property
    def next_deadline(self) -> float:
        """When tick() next has something to do."""
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self.limits.keepalive_timeout
        return self._ping_due

    def go_away(self) -> None:
        """Stop taking new streams, gracefully (RFC 9113 6.8): a GOAWAY (NO_ERROR) naming the last stream the
        peer has opened. Those streams carry on; the peer opens new ones on another connection (a CONNECT
        that crossed the GOAWAY is reset with REFUSED_STREAM here, never surfaced: the client retries it
        elsewhere). close() ends the connection.
        Flush data_to_send() afterwards. Why not h2's close_connection(): h2 treats any GOAWAY it sends or
        receives as the end of the connection (python-hyper/h2#1181), so it is framed here."""
        self._check_open()
        if self._our_last_stream is not None:
            return
        last = self._our_last_stream = self._h2.highest_inbound_stream_id
        frame = _FRAME_HEADER.pack(0, 8, _GOAWAY, 0, 0) + _GOAWAY_BODY.pack(last, ErrorCodes.NO_ERROR)
        self._h2._data_to_send += frame

    @property
    def going_away(self) -> bool:
        """Either end has sent a graceful GOAWAY: no new streams on this connection."""
        return self._peer_last_stream is not None or self._our_last_stream is not None

    def _peer_going_away(self, last_stream_id: int, debug: bytes) -> list[Event]:
        """A graceful GOAWAY from the peer (kept from h2 by the reader). Repeats may only lower the id."""
        if self._peer_last_stream is not None:
            last_stream_id = min(last_stream_id, self._peer_last_stream)
        self._peer_last_stream = last_stream_id
        out: list[Event] = []
        if self.role is Role.CLIENT:  # our streams above it were never processed: retryable elsewhere
            for sid in [sid for sid in self._streams if sid > last_stream_id]:
                self._forget(self._streams.pop(sid))
                self._reset(sid, ErrorCodes.CANCEL)
                out.append(StreamReset(sid, ErrorCodes.REFUSED_STREAM, remote=True))
        out.append(GoingAway(last_stream_id, debug[:200].decode("latin-1")))
        return out

    def close(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY and stop; every open stream is gone. Flush data_to_send() afterwards."""
        if not self._closed:
            self._terminate(error_code, reason or "closed locally")

    # -- streams -------------------------------------------------------------------------------------------

    def open_stream(self, request: ConnectRequest) -> int:
        """Client: send a CONNECT; wait for StreamEstablished or ConnectFailed. Data may be queued meanwhile."""
        self._require(Role.CLIENT)
        if self._peer_last_stream is not None:
            raise HboneError("the peer is going away (GOAWAY); open another connection", ErrorCodes.REFUSED_STREAM)
        if self.available_streams <= 0:
            raise HboneError(
                "the peer's concurrent stream limit is reached; open another connection",
                ErrorCodes.REFUSED_STREAM,
            )
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            raise HboneError(
                "this connection has used up its stream ids; open another connection", ErrorCodes.REFUSED_STREAM
            ) from None
        block = connect_header_block(request)
        if not self._send_headers_block(stream_id, block):
            self._h2.send_headers(stream_id, connect_headers(request))
        else:
            h2_stream = self._h2.streams[stream_id]
            h2_stream._authority = str(request.target).encode()
            h2_stream.request_method = b"CONNECT"
        self._streams[stream_id] = _Stream(stream_id)
        self._reader.streams += 1
        return stream_id

    @property
    def available_streams(self) -> int:
        """Client: how many more streams the peer allows now (0 once closed or going away)."""
        if self._closed or self.going_away:
            return 0
        return self._h2.remote_settings.max_concurrent_streams - self._h2.open_outbound_streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def accept(self, stream_id: int) -> list[Event]:
        """Server: answer 200 and return the data (and END_STREAM) that arrived before, now to forward."""
        self._require(Role.SERVER)
        stream = self._pending(stream_id)
        if not self._send_headers_block(stream_id, _STATUS_200):
            self._h2.send_headers(stream_id, [(b":status", b"200")])
        stream.answered = True
        out: list[Event] = [DataReceived(stream_id, stream.held)] if stream.held else []
        stream.held = None
        if stream.held_end:
            stream.remote_closed = True
            out.append(StreamEnded(stream_id))
        return out

    def reject(self, stream_id: int, status: int) -> None:
        """Server: answer `status` (401 denied, 503 no upstream, ...) and forget the stream."""
        self._require(Role.SERVER)
        if not 400 <= status <= 599:
            raise ValueError(f"reject() needs a 4xx or 5xx status, not {status}; use accept() for 200")
        self._pending(stream_id)
        self._answer_error(stream_id, status)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False) -> None:
        """Queue bytes for the peer; they go out as the flow-control window allows. The buffer must not be
        modified afterwards. Check outbound_buffered() for backpressure; SendDrained says when it is empty."""
        stream = self._open(stream_id)
        if self.role is Role.SERVER and not stream.answered:
            raise StreamStateError(f"stream {stream_id} has not been accepted; accept() before sending data")
        if stream.end_queued:
            raise StreamStateError(f"stream {stream_id} is already half-closed by us")
        if data:
            view = memoryview(data).cast("B")
            if stream.queue is None and not end_stream and self._send_now(stream_id, view):
                return  # the usual case: nothing queued and the windows admit it as one frame
            if stream.queue is None:
                stream.queue = deque()
            stream.queue.append(view)
            stream.queued += len(view)
        stream.end_queued = end_stream
        self._flush(stream)

    def _send_now(self, stream_id: int, view: memoryview) -> bool:
        """One DATA frame for `view` at once if h2 lets the stream send and the windows admit it whole."""
        conn = self._h2
        h2_stream = conn.streams.get(stream_id)
        if (
            h2_stream is None
            or h2_stream.state_machine.state not in _SENDABLE
            or len(view) > conn.outbound_flow_control_window
            or len(view) > h2_stream.outbound_flow_control_window
            or len(view) > conn.max_outbound_frame_size
        ):
            return False
        self._send_data_frame(h2_stream, view)
        return True

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (END_STREAM) after the queued data."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort a stream (upstream failed or went away). Unknown or finished streams are ignored."""
        self._check_open()
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._forget(stream)
            self._reset(stream_id, error_code)

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """The caller has written `nbytes` of this stream's DataReceived upstream: reopen the window."""
        if nbytes and not self._closed:
            self._h2.acknowledge_received_data(nbytes, stream_id)

    def outbound_buffered(self, stream_id: int) -> int:
        """Bytes queued on the stream that the peer's window has not admitted yet."""
        stream = self._streams.get(stream_id)
        return stream.queued if stream is not None else 0

    # -- internals -----------------------------------------------------------------------------------------

    def _require(self, role: Role) -> None:
        self._check_open()
        if self.role is not role:
            raise HboneError(f"only a {role.value} connection can do that; this one is a {self.role.value}")

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosedError("the HBONE connection has terminated; open a new one")

    def _pending(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.answered:
            raise StreamStateError(f"stream {stream_id} is not a CONNECT awaiting an answer (reset or answered?)")
        return stream

    def _open(self, stream_id: int) -> _Stream:
        self._check_open()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamStateError(f"stream {stream_id} is not open (reset, finished or never opened)")
        return stream

    def _answer_error(self, stream_id: int, status: int) -> None:
        """Answer `status` and end the stream, unless h2 has closed it already: h2 hands over a whole step
        of frames before its events, so the peer may have reset the stream (or h2 reset it for a stream
        error) after the CONNECT in the same read. Answering then would be h2's StreamClosedError, a
        connection error for what is a stream matter; the stream is gone, so there is nothing to answer."""
        stream = self._streams.pop(stream_id, None)
        h2_stream = self._h2.streams.get(stream_id)
        if h2_stream is not None and h2_stream.state_machine.state in _SENDABLE:
            self._h2.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=True)
            # RFC 9113 8.1: a complete response may be followed by RST_STREAM(NO_ERROR) to stop the upload.
            self._reset(stream_id, ErrorCodes.NO_ERROR)
        if stream is not None:
            self._forget(stream)

    def _send_headers_block(self, stream_id: int, block: bytes) -> bool:
        """Send a hand-encoded header block (a CONNECT, or a 200) as one HEADERS frame, with h2's
        connection and stream state machines advanced exactly as its send_headers() would; False (nothing
        done) when h2 must encode instead: a pending HPACK table size update must lead the next block.
        Why: h2's send_headers (validation, HPACK search and Huffman, frame objects) was the largest
        per-connection cost of the CONNECT path in the tunnel profile."""
        conn = self._h2
        if conn.encoder.header_table.resized or len(block) > conn.max_outbound_frame_size:
            return False
        conn.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        h2_stream = conn.streams.get(stream_id)
        if h2_stream is None:
            h2_stream = conn._begin_new_stream(stream_id, h2.connection.AllowedStreamIDs(conn.config.client_side))
        h2_stream.state_machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
        n = len(block)
        header = _FRAME_HEADER.pack(n >> 8, n & 0xFF, _HEADERS, _FLAG_END_HEADERS, stream_id)
        conn._data_to_send += header + block
        return True

    def _reset(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM unless h2 already considers the stream closed (the peer may have finished it)."""
        h2_stream = self._h2.streams.get(stream_id)
        if h2_stream is not None and not h2_stream.closed:
            self._h2.reset_stream(stream_id, error_code)

    def _forget(self, stream: _Stream) -> None:
        """Return held, never-delivered bytes to the connection window."""
        if stream.held:
            self._h2.acknowledge_received_data(len(stream.held), stream.stream_id)
        stream.held = None

    def _flush(self, stream: _Stream) -> None:
        conn = self._h2
        queue = stream.queue
        sid = stream.stream_id
        h2_stream = conn.streams.get(sid)
        if h2_stream is None or h2_stream.state_machine.state not in _SENDABLE:
            # h2 has closed the stream (the peer reset it, possibly earlier in the read being processed:
            # its StreamReset event follows). Sending now would be a connection error; drop the queue.
            stream.queue = None
            stream.queued = 0
            return
        while queue:
            window = min(conn.outbound_flow_control_window, h2_stream.outbound_flow_control_window)
            window = min(window, conn.max_outbound_frame_size)
            if window <= 0:
                return
            chunk = queue[0]
            if len(chunk) <= window:
                queue.popleft()
            else:
                queue[0] = chunk[window:]
                chunk = chunk[:window]
            self._send_data_frame(h2_stream, chunk)
            stream.queued -= len(chunk)
        stream.queue = None
        if stream.end_queued and not stream.local_closed:
            self._send_end_stream(h2_stream)
            stream.local_closed = True
        if stream.local_closed and stream.remote_closed:
            del self._streams[sid]

    def _send_data_frame(self, h2_stream: Any, chunk: memoryview) -> None:
        """One DATA frame (never END_STREAM, never padded) framed here instead of by h2, with h2's
        outbound windows charged exactly as its send_data() would. Why: h2 copies a payload three times
        on its way out (tobytes, header + body, its output bytearray, then data_to_send()); here it is
        queued as-is behind a 9-byte header. Anything h2 has queued before is taken out first, so frame
        order on the wire is the order of the calls. END_STREAM and everything else still go through h2,
        so its stream state machine stays the single source of truth."""
        n = len(chunk)
        conn = self._h2
        conn.outbound_flow_control_window -= n
        h2_stream.outbound_flow_control_window -= n
        pending = conn.data_to_send()
        if pending:
            self._out.append(pending)
        header = data_frame_header(h2_stream.stream_id, n)
        if n <= _COALESCE_BELOW:
            self._out.append(header + chunk)  # small frames: one buffer, one TLS record
        else:
            self._out.append(header)
            self._out.append(chunk)
        self._reader.data_frames_sent += 1

    def _send_end_stream(self, h2_stream: Any) -> None:
        """END_STREAM (an empty DATA frame) framed here, with h2's connection and stream state machines
        given exactly the inputs its end_stream() would (SEND_DATA, SEND_END_STREAM: the stream becomes
        half-closed or closed in h2 as before). Why: h2's end_stream() builds, serializes and re-parses frame
        objects for 9 bytes; once per connection, both ends, it was a measurable share of the connection
        rate. Queued behind anything h2 has queued, as h2 would."""
        conn = self._h2
        conn.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
        h2_stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
        conn._data_to_send += _FRAME_HEADER.pack(0, 0, _DATA, _FLAG_END_STREAM, h2_stream.stream_id)

    def _translate(self, event: h2.events.Event, batch: _Batch, out: list[Event]) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event, out)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event, batch, out)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event, out)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for stream in list(self._streams.values()):
                if stream.queue or (stream.end_queued and not stream.local_closed):
                    was = stream.queued
                    self._flush(stream)
                    if was and not stream.queued:
                        batch.drained.add(stream.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            self._on_end(event.stream_id, out)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self._gone(event.stream_id, int(event.error_code or 0), event.remote_reset, batch, out)
        elif isinstance(event, h2.events.TrailersReceived):
            # RFC 9113 8.5: a CONNECT stream carries DATA and stream management frames only; anything else
            # is a stream error. Trailers make it a malformed request (8.1.1): RST_STREAM(PROTOCOL_ERROR),
            # and the stream ends exactly as if the peer had reset it (held bytes, rapid reset, this read).
            # (Trailers without END_STREAM arrive as h2's StreamReset instead: _H2Connection.)
            assert event.stream_id is not None
            if event.stream_id in self._streams:
                self._reset(event.stream_id, ErrorCodes.PROTOCOL_ERROR)
                self._gone(event.stream_id, ErrorCodes.PROTOCOL_ERROR, False, batch, out)
        elif isinstance(event, h2.events.PingAckReceived):
            if self._ping_sent_at is not None and event.ping_data == self._ping_payload:
                self._ping_due = self._ping_sent_at + self.limits.keepalive_interval
                self._ping_sent_at = None
        elif isinstance(event, h2.events.ConnectionTerminated):
            code = int(event.error_code or 0)
            debug = (event.additional_data or b"")[:200].decode("latin-1")
            out.extend(self._terminated(code, f"peer sent GOAWAY ({debug})" if debug else "peer sent GOAWAY", True))
        # Everything else (PING and SETTINGS bookkeeping, priorities, unknown frames, 1xx) needs nothing here.

    def _gone(self, stream_id: int, error_code: int, remote: bool, batch: _Batch, out: list[Event]) -> None:
        """A stream reset (by the peer, or by h2 or us for its protocol error) is forgotten: its held bytes
        go back to the connection window, one never answered counts as abuse (rapid reset), and one opened
        in this read is withdrawn without a word (its StreamOpened is never surfaced)."""
        gone = self._streams.pop(stream_id, None)
        if gone is None:
            return
        self._forget(gone)
        if not gone.answered and self.role is Role.SERVER:
            self._abusive_streams += 1
        if stream_id in batch.opened:
            batch.hidden.add(stream_id)
        else:
            out.append(StreamReset(stream_id, error_code, remote=remote))

    def _on_request(self, event: h2.events.RequestReceived, batch: _Batch, out: list[Event]) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        self._peer_streams += 1
        self._reader.streams += 1
        if self._our_last_stream is not None and stream_id > self._our_last_stream:
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)  # it crossed our graceful GOAWAY (RFC 9113 6.8)
            return
        try:
            request = parse_connect_request(list(event.headers or ()), self._local_addresses)
        except BadConnectRequest as e:
            self._abusive_streams += 1
            self._answer_error(stream_id, e.status)
            out.append(StreamRejected(stream_id, e.status, str(e)))
            return
        self._streams[stream_id] = _Stream(stream_id)
        batch.opened.add(stream_id)
        out.append(StreamOpened(stream_id, request))

    def _on_response(self, event: h2.events.ResponseReceived, out: list[Event]) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        status = dict(event.headers or ()).get(b":status", b"")
        if status == b"200":
            stream.answered = True
            out.append(StreamEstablished(stream_id))
            return
        del self._streams[stream_id]
        self._reset(stream_id, ErrorCodes.CANCEL)
        code = int(status) if status.isdigit() and len(status) == 3 else 502
        out.append(ConnectFailed(stream_id, code))

    def _on_data(self, event: h2.events.DataReceived, out: list[Event]) -> None:
        stream_id = event.stream_id
        assert stream_id is not None and event.data is not None
        data = event.data
        padding = (event.flow_controlled_length or 0) - len(data)
        if padding:
            self._h2.acknowledge_received_data(padding, stream_id)
        stream = self._streams.get(stream_id)
        if stream is None:  # rejected or reset meanwhile: give the window back, drop the bytes
            self.consumed(stream_id, len(data))
        elif stream.answered:
            if data:
                out.append(DataReceived(stream_id, data))
        elif data:  # server before accept() (h2 refuses DATA before the response on a client)
            # One buffer, not one object per frame: bounded by the unacknowledged stream window in bytes
            # of memory too (1-byte DATA frames held as a list cost ~43 bytes of heap per byte).
            if stream.held is None:
                stream.held = data if isinstance(data, bytearray) else bytearray(data)  # a direct payload is ours
            else:
                stream.held += data

    def _on_end(self, stream_id: int, out: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not stream.answered:
            stream.held_end = True  # server: delivered by accept(); client: a failed CONNECT follows
            return
        stream.remote_closed = True
        out.append(StreamEnded(stream_id))
        if stream.local_closed:
            del self._streams[stream_id]

    def _terminate(self, error_code: int, reason: str) -> list[Event]:
        self._h2.close_connection(error_code, additional_data=reason.encode("ascii", "replace")[:256])
        return self._terminated(int(error_code), reason, remote=False)

    def _terminated(self, code: int, reason: str, remote: bool) -> list[Event]:
        if not remote and self._h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            self._h2.close_connection(code)
        self._closed = True
        self._streams.clear()
        self._reader.clear()
        return [ConnectionTerminated(code, reason, remote)]
