"""The asyncio side of HBONE: one `HboneProtocol` per mTLS connection, one `HboneStream` per CONNECT.

Why this module exists: hbone.py decides everything about HTTP/2 on plain bytes; something has to move
those bytes between a TLS transport and the core, run the keepalive timer, and let a CONNECT stream take
part in a relay (relay.py) like a TCP socket would. This is that thin adapter:

- `HboneProtocol` is an `asyncio.BufferedProtocol` under asyncio's (or uvloop's) TLS transport. Every
  read goes to `HboneConnection.receive_data` — or, while a large DATA payload is arriving, the TLS layer
  decrypts straight into the core's `receive_buffer()` — every event is routed to its stream, and
  whatever the core wants to send is written once per call with `writelines()` (DATA payloads as views
  of immutable bytes, not joined into one copy). The transport's pause/resume_writing pauses every
  stream's upstream reader (the relay's `Leg.pause_writing`).
- `HboneStream` implements relay.Sink for one stream. Bytes from the relay are queued with `send_data`
  (the core frames them as the peer's window allows); a stream whose queue passes `HIGH_WATER` pauses the
  other side of its relay until `SendDrained`. Received bytes are handed on at once but acknowledged to the
  peer (`consumed`) only while the relay is not holding this side, so a slow upstream pushes back on the
  sender through HTTP/2 flow control: memory per stream is bounded by the stream window.

- `Trust` answers, once per new stream, whether the connection may still take one: not once either
  certificate of its handshake has expired or the trust bundle has changed (tls.stale). The owner sets
  `HboneProtocol.trust` right after its peer check; the pool retires a client connection that fails it
  (`refuse_new_streams`: GOAWAY, closed when its last stream ends) and the server refuses a CONNECT on one
  (`refuse_stream`: REFUSED_STREAM and a graceful GOAWAY, so the client retries on a new connection).

What it deliberately does not do: no TLS settings or peer checks (tls.py, called by the owner right after
the handshake), no policy, no pooling, no upstream connects (inbound.py, outbound.py, pool.py). A server
protocol only reports `StreamOpened` to its owner's callback; the owner answers with `accept()`,
`reject()` or `refuse_stream()`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import ClassVar, cast

from h2.errors import ErrorCodes

from nodeagent.model import IPAddress
from nodeagent.ztunnel import hbone, tls
from nodeagent.ztunnel.relay import Leg, set_nodelay, tune_allocator

log = logging.getLogger(__name__)

HIGH_WATER = 1024 * 1024  # bytes queued on one stream before its relay stops reading the other side
LOW_WATER = 256 * 1024
TRANSPORT_HIGH_WATER = 1024 * 1024
TRANSPORT_LOW_WATER = 256 * 1024
READ_CHUNK = 256 * 1024
_ONE_RECORD = 16 * 1024  # TLS's largest record: output up to this size is joined into one
# How often (seconds, at most, per connection taking streams) Trust looks at the current trust bundle; the
# certificate manager itself looks at the bundle file once a second.
TRUST_RECHECK = 1.0

_scratch = threading.local()


def _read_buffer() -> memoryview:
    """One read buffer per thread: every read is copied into the core's frame buffer before the next."""
    view: memoryview | None = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(READ_CHUNK))
    return view


class ConnectRefused(ConnectionError):
    """The HBONE server answered a CONNECT with `status`; the message says what that means."""

    _MEANING: ClassVar[dict[int, str]] = {
        400: "the destination tunnel rejected the request as malformed",
        401: "denied by an authorization policy at the destination",
        503: "the destination tunnel has no such workload or could not reach the application",
    }

    def __init__(self, status: int, target: str) -> None:
        meaning = self._MEANING.get(status, "unexpected answer from the destination tunnel")
        super().__init__(f"CONNECT {target} answered {status}: {meaning}")
        self.status = status


class StreamRefused(ConnectionError):
    """The server did not process the stream (REFUSED_STREAM, or above the last stream of its graceful GOAWAY,
    e.g. while draining): retry on another connection."""


class Trust:
    """Whether one HBONE connection may still take new streams, cheap enough to ask for every one.

    `auth` is what its handshake rested on (tls.authentication), `clock` the wall clock (certificates are
    wall-time objects, as in nodeagent.ztunnel.certs), `current_roots()` the roots trusted now — the owner's
    TLS context for the same identity as it would be built now. Per stream this costs a clock read and one
    float comparison: the bundle is looked at only once `TRUST_RECHECK` has passed since the last look, and
    the first expiry is itself the deadline. Once stale it stays so (`retired`): the connection never
    takes a new stream again, even if the bundle changes back."""

    __slots__ = ("_auth", "_clock", "_current_roots", "_recheck", "_until", "retired")

    def __init__(
        self,
        auth: tls.Authentication,
        clock: Callable[[], float],
        current_roots: Callable[[], frozenset[bytes]],
        recheck: float = TRUST_RECHECK,
    ) -> None:
        self._auth = auth
        self._clock = clock
        self._current_roots = current_roots
        self._recheck = recheck
        self._until = min(auth.expires, clock() + recheck)
        self.retired: str | None = None

    def stale(self) -> str | None:
        """Why no new stream may use the connection now; None while one may."""
        if self.retired is not None:
            return self.retired
        now = self._clock()
        if now < self._until:
            return None
        try:
            reason = tls.stale(self._auth, now, self._current_roots())
        except Exception as exc:  # e.g. no valid certificate of ours now: fail closed, new streams go elsewhere
            reason = f"the current trust cannot be checked: {exc}"
        if reason is None:
            self._until = min(self._auth.expires, now + self._recheck)
        else:
            self.retired = reason
        return reason


class HboneStream:
    """One CONNECT stream as a relay side (relay.Sink); reports its events to the `Leg` it is given."""

    __slots__ = (
        "_conn",
        "_early",
        "_early_eof",
        "_finished",
        "_held",
        "_leg",
        "_loss",
        "_lost",
        "_pause_reported",
        "_started",
        "_unacked",
        "local_ended",
        "remote_ended",
        "stream_id",
    )

    def __init__(self, conn: HboneProtocol, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._leg: Leg | None = None
        self._started = False
        self._early: list[bytes | bytearray] | None = None  # made if bytes arrive before the relay starts
        self._early_eof = False
        self._finished = False  # the peer reset it with NO_ERROR after its END_STREAM, before the relay started
        self._held = False
        self._unacked = 0
        self._pause_reported = False
        self._lost = False
        self._loss: BaseException | None = None  # why it was lost, while no leg could be told
        self.local_ended = False
        self.remote_ended = False

    def attach(self, leg: Leg) -> None:
        """Give the stream its relay leg; events before relay.start() are kept until then. A stream lost
        before it had a leg (reset, or its connection gone, between the 200 and this call: the task that
        opened it runs a loop turn later) tells the leg now, so the relay finishes the other side too
        instead of relaying into nothing."""
        self._leg = leg
        if self._lost:
            leg.connection_lost(self._loss)
            self._loss = None

    # -- events from the connection -------------------------------------------------------------------

    def _on_data(self, data: bytes | bytearray) -> None:
        if self._lost:
            self._conn._consumed(self.stream_id, len(data))
            return
        if not self._started or self._leg is None:
            if self._early is None:
                self._early = []
            self._early.append(data)
            return
        self._leg.data_received(data)
        if self._held:
            self._unacked += len(data)
        else:
            self._conn._consumed(self.stream_id, len(data))

    def _on_end(self) -> None:
        self.remote_ended = True
        if not self._started or self._leg is None:
            self._early_eof = True
            return
        self._leg.eof_received()

    def _on_finished(self) -> None:
        """The peer ended its side, then reset ours with NO_ERROR: it wants no more (RFC 9113 8.1, "clients
        MUST NOT discard responses as a result"; our server does this when it closes a stream whose client
        still sends). Not a failure: what arrived is delivered, then the relay finishes the other side
        cleanly; bytes that arrived before the relay started are delivered first."""
        if not self._started or self._leg is None:
            self._finished = True  # resume_reading() reports it after the early bytes and EOF
            return
        self._on_lost(None)

    def _on_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._release_window()
        self._conn._forget(self.stream_id)
        if self._leg is not None:
            self._leg.connection_lost(exc)
        else:
            self._loss = exc

    def _release_window(self) -> None:
        """The stream is over: acknowledge what it received but never reported consumed (held back while
        the relay paused it, or early bytes never relayed). The stream's own window dies with it, but the
        connection window is shared: without this every stream ending under backpressure shrank it for
        good, until the whole HBONE connection stalled (iperf3 -P 4, a few tests in a row)."""
        n = self._unacked + sum(len(chunk) for chunk in self._early or ())
        self._unacked = 0
        self._early = None
        if n:
            self._conn._consumed(self.stream_id, n)

    def _check_pressure(self) -> None:
        if self._leg is None or self._lost:
            return
        queued = self._conn.outbound_buffered(self.stream_id)
        if not self._pause_reported and (queued > HIGH_WATER or self._conn.write_paused):
            self._pause_reported = True
            self._leg.pause_writing()
        elif self._pause_reported and queued <= LOW_WATER and not self._conn.write_paused:
            self._pause_reported = False
            self._leg.resume_writing()

    # -- relay.Sink -----------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost or self.local_ended:
            return
        # bytes(): the core keeps the buffer until framed and `data` may be the relay's scratch buffer.
        self._conn._send(self.stream_id, bytes(data))
        self._check_pressure()

    def write_eof(self) -> None:
        if self._lost or self.local_ended:
            return
        self.local_ended = True
        self._conn._end(self.stream_id)

    def pause_reading(self) -> None:
        self._held = True

    def resume_reading(self) -> None:
        self._held = False
        if not self._started:
            self._started = True
            early, self._early = self._early, None
            for chunk in early or ():
                self._on_data(chunk)
            if self._early_eof and self._leg is not None and not self._lost:
                self._leg.eof_received()
            if self._finished:
                self._on_lost(None)
                return
        if self._unacked and not self._held:
            n, self._unacked = self._unacked, 0
            self._conn._consumed(self.stream_id, n)

    def close(self) -> None:
        """Finish the stream: END_STREAM after queued data; a peer that is still sending is reset."""
        if self._lost:
            return
        if not self.local_ended:
            self.local_ended = True
            self._conn._end(self.stream_id)
        if not self.remote_ended:
            self._conn._reset(self.stream_id, ErrorCodes.NO_ERROR, after_queued=True)
        self._lost_soon(None)

    def abort(self) -> None:
        if self._lost:
            return
        self._conn._reset(self.stream_id, ErrorCodes.CANCEL, after_queued=False)
        self._lost_soon(None)

    def buffered(self) -> int:
        return self._conn.outbound_buffered(self.stream_id)

    def _lost_soon(self, exc: BaseException | None) -> None:
        self._lost = True
        self._release_window()
        self._conn._forget(self.stream_id)
        leg = self._leg
        if leg is not None:
            asyncio.get_running_loop().call_soon(leg.connection_lost, exc)


class HboneProtocol(asyncio.BufferedProtocol):
    """One HBONE connection (client or server role) on a TLS transport.

    `on_ready(protocol)` runs once the transport is up (after the TLS handshake) — the owner checks the
    peer there and may `abort()`. Server: `on_stream(protocol, StreamOpened)` for every validated CONNECT.
    `on_closed(protocol)` runs once when the connection is gone.
    """

    def __init__(
        self,
        role: hbone.Role,
        *,
        limits: hbone.Limits | None = None,
        local_addresses: frozenset[IPAddress] | None = None,
        on_ready: Callable[[HboneProtocol], None] | None = None,
        on_stream: Callable[[HboneProtocol, hbone.StreamOpened], None] | None = None,
        on_rejected: Callable[[HboneProtocol, hbone.StreamRejected], None] | None = None,
        on_stream_reset: Callable[[HboneProtocol, int], None] | None = None,
        on_closed: Callable[[HboneProtocol], None] | None = None,
        on_idle: Callable[[HboneProtocol], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        tune_allocator()  # once per process; see relay.tune_allocator
        self.role = role
        self.core = hbone.HboneConnection(role, self._loop.time(), limits=limits, local_addresses=local_addresses)
        self.transport: asyncio.Transport | None = None
        self._buf = _read_buffer()
        self._direct = False  # get_buffer() handed out the core's receive_buffer()
        self._streams: dict[int, HboneStream] = {}
        self._opening: dict[int, asyncio.Future[None]] = {}
        self._on_ready = on_ready
        self._on_stream = on_stream
        self._on_rejected = on_rejected
        self._on_stream_reset = on_stream_reset
        self.closed_callbacks: list[Callable[[HboneProtocol], None]] = [on_closed] if on_closed else []
        self._on_idle = on_idle
        self._timer: asyncio.TimerHandle | None = None
        # When _timer fires, as asked: uvloop's TimerHandle.when() is rounded to the millisecond (up, too),
        # so comparing the core's deadline with it would reschedule the timer on every read.
        self._deadline = 0.0
        self._flush_pending = False
        self._reading = False  # inside buffer_updated: writes wait for its end
        self._pending_resets: dict[int, int] = {}  # stream -> error code, sent once its queue is framed
        self.write_paused = False
        self._refused = False  # client: the peer reset a stream with REFUSED_STREAM (it is draining)
        self.trust: Trust | None = None  # set by the owner after its peer check; None: not checked
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.streams_opened = 0

    # -- asyncio.BufferedProtocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER, low=TRANSPORT_LOW_WATER)
        set_nodelay(transport)
        self._flush()
        self._schedule()
        if self._on_ready is not None:
            self._on_ready(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        # The rest of a large DATA payload is decrypted straight into the buffer that becomes its data.
        direct = self.core.receive_buffer()
        self._direct = direct is not None
        return direct if direct is not None else self._buf

    def buffer_updated(self, nbytes: int) -> None:
        self._reading = True
        try:
            if self._direct:
                self._direct = False
                self._handle(self.core.receive_into(nbytes))
            else:
                self._handle(self.core.receive_data(self._buf[:nbytes]))
        finally:
            self._reading = False
        if self.core.next_deadline < self._deadline:
            # A PING reply: the next PING is due an interval after the last one, before the reply deadline
            # the timer waits for. One comparison per read; timers move only when the deadline does.
            self._schedule()
        self._flush_now()  # what this read produced (WINDOW_UPDATEs, answers) leaves now, never a turn later

    def eof_received(self) -> bool:
        self._terminate(ConnectionResetError("the peer closed the HBONE connection"))
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self._streams.values()):
            stream._check_pressure()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self._streams.values()):
            stream._check_pressure()

    def connection_lost(self, exc: Exception | None) -> None:
        self._terminate(exc or ConnectionResetError("the HBONE connection closed"))

    # -- owner API --------------------------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def refusing(self) -> bool:
        """No new stream here: the peer refused one, or either end sent a graceful GOAWAY (draining)."""
        return self._refused or self.core.going_away

    @property
    def available_streams(self) -> int:
        if self.core.closed or self.closed.is_set() or self.refusing:
            return 0
        return self.core.available_streams

    def peer_ssl(self) -> object:
        assert self.transport is not None
        return self.transport.get_extra_info("ssl_object")

    def peername(self) -> tuple[str, int] | None:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    async def open(self, request: hbone.ConnectRequest, early: bytes = b"") -> HboneStream:
        """Client: CONNECT and wait for the 200; ConnectRefused for any other answer. `early`: the client's
        first bytes, sent right behind the CONNECT (in the same TLS record when small); the server holds
        them until its 200 and drops them with any other answer."""
        if self.closed.is_set():  # nothing would ever answer the waiter
            raise ConnectionResetError(f"HBONE connection closed: {self.close_reason or 'gone'}")
        sid = self.core.open_stream(request)
        stream = HboneStream(self, sid)
        self._streams[sid] = stream
        self.streams_opened += 1
        waiter = self._loop.create_future()
        self._opening[sid] = waiter
        if early:
            self.core.send_data(sid, early)
        self._flush()
        try:
            await waiter
        except BaseException:
            self._opening.pop(sid, None)
            if not stream._lost:
                stream.abort()
            raise
        return stream

    def accept(self, stream_id: int) -> HboneStream:
        """Server: answer 200; the stream delivers what arrived before to its leg once the relay starts.
        Raises an HboneError when the stream was reset or the connection is gone meanwhile (a stream
        accepted on a dead connection would never be lost, and its upstream would leak)."""
        if self.closed.is_set():
            raise hbone.ConnectionClosedError(f"HBONE connection closed: {self.close_reason or 'gone'}")
        events = self.core.accept(stream_id)
        stream = HboneStream(self, stream_id)
        self._streams[stream_id] = stream
        self.streams_opened += 1
        self._handle(events)
        self._flush()
        return stream

    def reject(self, stream_id: int, status: int) -> None:
        """Server: answer `status`; a stream the peer already reset is ignored."""
        if self.core.closed:
            return
        try:
            self.core.reject(stream_id, status)
        except hbone.StreamStateError:
            return
        self._flush()
        self._maybe_idle()

    def refuse_new_streams(self, reason: str = "") -> None:
        """Take no new streams here: a graceful GOAWAY (server, draining: it tells the client to open new
        streams elsewhere, and a CONNECT that crossed it is reset with REFUSED_STREAM; client: its pool
        retired the connection). Open streams carry on, and the connection closes once they are done."""
        if self.core.closed:
            return
        if reason:
            self.close_reason = self.close_reason or reason
        self.core.go_away()
        self._flush()
        self._maybe_idle()

    def refuse_stream(self, stream_id: int, reason: str) -> None:
        """Server: this connection takes no new streams (`reason`): the CONNECT `stream_id`, not answered yet,
        is reset with REFUSED_STREAM — the client retries it on another connection (pool.py) — and a graceful
        GOAWAY follows (`refuse_new_streams`). Its last stream id is the highest the client has opened, this
        one included, which the reset has already refused."""
        if self.core.closed:
            return
        self.core.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        self.refuse_new_streams(reason)

    def close(self, reason: str = "closed by the tunnel") -> None:
        """GOAWAY (NO_ERROR), then TLS close_notify and FIN once the queued bytes are written."""
        if self.transport is None:
            return
        if not self.core.closed:
            self.core.close(ErrorCodes.NO_ERROR, reason)
        self._flush_now()  # before close(): the GOAWAY and anything queued go first
        self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection now (peer verification failed, hostile peer)."""
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.abort()

    # -- stream plumbing ---------------------------------------------------------------------------------

    def outbound_buffered(self, stream_id: int) -> int:
        return self.core.outbound_buffered(stream_id)

    def _send(self, stream_id: int, data: bytes) -> None:
        if self.core.closed:
            return
        try:
            self.core.send_data(stream_id, data)
        except hbone.HboneError as exc:
            log.debug("dropping data for stream %d: %s", stream_id, exc)
            return
        if len(data) >= _ONE_RECORD and not self._reading:
            self._flush_now()  # bulk: nothing to batch it with (see _flush)
        else:
            self._flush()

    def _end(self, stream_id: int) -> None:
        if self.core.closed:
            return
        try:
            self.core.end_stream(stream_id)
        except hbone.HboneError:
            return
        self._flush()

    def _reset(self, stream_id: int, code: int, *, after_queued: bool) -> None:
        if self.core.closed:
            return
        if after_queued and self.core.outbound_buffered(stream_id):
            self._pending_resets[stream_id] = code
            return
        self.core.reset_stream(stream_id, code)
        self._flush()

    def _consumed(self, stream_id: int, nbytes: int) -> None:
        if not self.core.closed:
            self.core.consumed(stream_id, nbytes)
            self._flush()

    def _forget(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self._streams or self.closed.is_set():
            return
        if self.core.going_away:  # no stream will open here again: close once none is pending either
            if not self.core.open_streams and not self._opening:
                self._loop.call_soon(self.close, "graceful GOAWAY and no streams left")
        elif self._on_idle is not None:
            self._on_idle(self)

    # -- internals ----------------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write what the core has queued — batched where that saves syscalls without adding latency:
        - while a read is being processed nothing is written; buffer_updated writes once at its end;
        - with several streams open, at the end of this event-loop turn (call_soon runs before the loop
          polls again), so what all of them produce in one turn leaves in one send(2), and one TLS record
          while small, instead of one per event (loopback pair, 8 concurrent connects: ~10% more
          connections per second);
        - with one stream, at once: a lone request/response exchange has nothing to batch with, and the
          extra turn measured ~5 µs of p50 latency (sockperf 64 B);
        - a write of a full TLS record or more, at once (`_send`): deferring it let the TCP side read on
          (libuv reads a socket up to 32 times per wakeup) and pile up megabytes before any left, and
          iperf3's two connections (control + data) made every bulk write deferred: 1-stream throughput
          was 10-18% lower (loopback pair, A/B)."""
        if self._reading or self._flush_pending:
            return
        if len(self._streams) > 1:
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)
        else:
            self._flush_now()

    def _flush_now(self) -> None:
        self._flush_pending = False
        chunks = self.core.data_to_write(unsent=self.write_paused)
        if chunks and self.transport is not None and not self.transport.is_closing():
            if len(chunks) > 1 and sum(len(c) for c in chunks) <= _ONE_RECORD:
                chunks = [b"".join(chunks)]  # small: one TLS record rather than one per buffer
            # One call: the TLS transport encrypts every buffer straight from the list (DATA payloads are
            # the immutable bytes HboneStream.write made, so the transport may keep them).
            self.transport.writelines(chunks)

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.core.closed:
            self._deadline = self.core.next_deadline
            self._timer = self._loop.call_at(self._deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._handle(self.core.tick(self._loop.time()))
        self._flush()
        self._schedule()

    def _handle(self, events: list[hbone.Event]) -> None:
        streams = self._streams
        for event in events:
            if isinstance(event, hbone.DataReceived):
                stream = streams.get(event.stream_id)
                if stream is None:
                    self.core.consumed(event.stream_id, len(event.data))
                else:
                    stream._on_data(event.data)
            elif isinstance(event, hbone.StreamOpened):
                if self._on_stream is None:
                    self.core.reject(event.stream_id, 503)
                else:
                    self._on_stream(self, event)
            elif isinstance(event, hbone.StreamRejected):
                if self._on_rejected is not None:
                    self._on_rejected(self, event)
            elif isinstance(event, hbone.StreamEstablished):
                waiter = self._opening.pop(event.stream_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(event, hbone.ConnectFailed):
                self._fail_open(event.stream_id, ConnectRefused(event.status, self._describe_peer()))
            elif isinstance(event, hbone.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_end()
            elif isinstance(event, hbone.StreamReset):
                self._pending_resets.pop(event.stream_id, None)
                stream = streams.get(event.stream_id)
                if (
                    event.remote
                    and event.error_code == ErrorCodes.NO_ERROR
                    and stream is not None
                    and stream.remote_ended
                ):
                    stream._on_finished()  # a complete response; see _on_finished
                    continue
                if event.remote and event.error_code == ErrorCodes.REFUSED_STREAM:
                    self._refused = True
                    exc: ConnectionError = StreamRefused(f"HBONE stream {event.stream_id} refused by the peer")
                else:
                    exc = ConnectionResetError(
                        f"HBONE stream {event.stream_id} reset by the {'peer' if event.remote else 'tunnel'} "
                        f"(HTTP/2 error {event.error_code})"
                    )
                if not self._fail_open(event.stream_id, exc):
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream._on_lost(exc)
                    elif self._on_stream_reset is not None:  # server: reset before we answered
                        self._on_stream_reset(self, event.stream_id)
            elif isinstance(event, hbone.SendDrained):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._check_pressure()
            elif isinstance(event, hbone.GoingAway):
                why = f" ({event.reason})" if event.reason else ""
                self.close_reason = self.close_reason or f"the peer sent a graceful GOAWAY{why}"
                self._maybe_idle()
            elif isinstance(event, hbone.ConnectionTerminated):
                self.close_reason = self.close_reason or event.reason
                self._flush_now()
                if self.transport is not None:
                    self.transport.close()
                self._terminate(
                    None
                    if event.error_code == ErrorCodes.NO_ERROR and not self._streams
                    else ConnectionResetError(f"HBONE connection terminated: {event.reason}")
                )
        if self._pending_resets:
            self._send_pending_resets()

    def _send_pending_resets(self) -> None:
        """Resets waiting for their stream's queue (`_reset(after_queued=True)`) go once it is framed: at
        its SendDrained, or when the core framed it and forgot the stream (the peer had half-closed: no
        SendDrained then, and the reset is moot - reset_stream() ignores a stream the core has done with)."""
        if self.core.closed:
            self._pending_resets.clear()
            return
        for stream_id in [s for s in self._pending_resets if not self.core.outbound_buffered(s)]:
            self.core.reset_stream(stream_id, self._pending_resets.pop(stream_id))

    def _fail_open(self, stream_id: int, exc: BaseException) -> bool:
        waiter = self._opening.pop(stream_id, None)
        if waiter is None:
            return False
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream._lost = True
        if not waiter.done():
            waiter.set_exception(exc)
        self._maybe_idle()
        return True

    def _describe_peer(self) -> str:
        peer = self.peername()
        return f"via {peer[0]}:{peer[1]}" if peer else "via the HBONE peer"

    def _terminate(self, exc: BaseException | None) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if exc is not None and not self.close_reason:
            self.close_reason = str(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sid in list(self._opening):
            self._fail_open(sid, ConnectionResetError(f"HBONE connection closed: {self.close_reason or exc}"))
        for stream in list(self._streams.values()):
            stream._on_lost(exc if exc is not None else ConnectionResetError("HBONE connection closed"))
        self._streams.clear()
        for callback in self.closed_callbacks:
            callback(self)
