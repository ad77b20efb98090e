"""Moving bytes both ways between two connections, with backpressure, half-close and byte counts.

Why this module exists: every proxied connection ends in a relay — passthrough (15001 to an unknown
destination), plaintext inbound (15006 to the app), and the raw-bytes phase of an HBONE stream. The relay
is the hot path, so it is written against asyncio's `BufferedProtocol`: the loop reads straight into one
scratch buffer per thread, each read is handed to the other side with a single `write()`, and flow control
is the transports' own: when one side's write buffer passes its high-water mark the loop calls
`pause_writing()` and the relay stops reading from the *other* side until `resume_writing()`. No
per-byte Python loops and no asyncio streams, and memory per connection is bounded by the write-buffer
limits (`HIGH_WATER` + one read) per direction, whatever the peers do.

The shape, and the seam for HBONE:

    downstream side  ──data/eof──►  Relay  ──write/write_eof──►  upstream sink
                     ◄──pause/resume_reading── (when the upstream sink is full)

A side is a `Sink` (seven small methods: where bytes for that side go and how to throttle reading from it)
that reports what happens on its connection to the relay through a `Leg`, in asyncio.Protocol's
vocabulary (`data_received`, `eof_received`, `pause_writing`, `resume_writing`, `connection_lost`). TCP
sides come from `tcp_side()`; the HBONE layer plugs a CONNECT stream in as the other side by implementing
`Sink` on the stream and calling the `Leg` it was given.

Half-close: an EOF from one side becomes `write_eof()` on the other (TCP FIN, HBONE END_STREAM); the
relay closes both sides once both directions have seen EOF. A reset or error on one side aborts the other
(a TCP side is aborted with SO_LINGER 0, so a reset stays a reset) and is reported in the result.

What it deliberately does not do: no connecting, no policy, no metrics objects and no logging — the
caller reads `RelayResult` (and `Relay.bytes_in/bytes_out` while it runs) and records what it needs. No
idle timeouts: closing a relay on policy change or drain is the caller's `Relay.close()`/`abort()`.

Two relays, one result type:
- `relay_tcp()` (plain TCP<->TCP: passthrough and 15006) moves bytes with `os.splice` through a pipe per
  direction (made on first data), so the payload never enters Python: the loop only sees readiness
  events. Loopback, 2 GiB in 1 MiB writes on the 2-vCPU reference VM, medians of 5: splice 1.6 (asyncio)
  / 2.1 (uvloop) GB/s at ~0.26 CPU-s per GiB, against 1.5 / 1.8 GB/s at ~0.38 CPU-s per GiB for the
  BufferedProtocol relay (direct TCP: 3.8 GB/s). The CPU saving is what matters on a shared node.
- `Relay` + `tcp_side()` (BufferedProtocol) for pairs where one side is not a socket — the HBONE stream.

`tune_allocator()` (glibc mallopt, once per process) keeps large freed blocks in the heap: without it
every ~1 MiB buffer of the TLS/HBONE path was a fresh mmap, and page faults plus page zeroing were a
third of the tunnel's CPU (bench/tunnel_loopback.py: 2x throughput, half the CPU per GB).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Protocol, cast

# One read's worth. The buffer is shared per thread (see _scratch_buffer), so its size costs nothing per
# connection; 1 MiB measured ~20% less CPU per byte than 256 KiB.
CHUNK = 1024 * 1024
# Write-buffer high-water mark per side: a paused direction holds at most HIGH_WATER + CHUNK bytes.
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024

DOWNSTREAM = 0
UPSTREAM = 1


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a relay ended.

    `bytes_in` went from downstream (the side that connected to the tunnel) to upstream; `bytes_out`
    from upstream back to downstream — Istio's received/sent bytes from the reporter's point of view.
    Counts are bytes handed to the other side's sink, so after an error they may include bytes the peer
    never read. `error` is the first error either side reported (None for a clean close both ways).
    """

    bytes_in: int
    bytes_out: int
    error: BaseException | None


class Sink(Protocol):
    """One side of a relay, as the relay drives it.

    `write(data)`: queue bytes for this side's peer. A memoryview is only valid during the call (it may
    be a view of a reused buffer): a sink that keeps it must copy it. `bytes` and `bytearray` are handed
    over: the caller never touches them again (the HBONE core receives large DATA payloads into a
    bytearray of their own), so a sink may keep them as they are. Must not raise for a closed side.
    `write_eof()`: no more bytes will be written (TCP shutdown(SHUT_WR), HBONE END_STREAM).
    `pause_reading()/resume_reading()`: stop/restart delivering `Leg.data_received` (the other side is
    full). Idempotent.
    `close()`: flush what is queued, then close. `abort()`: close now, discarding queued bytes, signalling
    an error to the peer where the protocol can (TCP RST, HBONE RST_STREAM).
    `buffered()`: bytes queued and not yet handed to the kernel or peer (for bounds and metrics).
    """

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def buffered(self) -> int: ...


class Relay:
    """Couples two sinks. Create it, make both sides with `leg(DOWNSTREAM)`/`leg(UPSTREAM)`, `start()`."""

    __slots__ = ("_counts", "_eof", "_error", "_loop", "_lost", "_sinks", "done")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *, bytes_in: int = 0) -> None:
        """`bytes_in`: downstream bytes already sent upstream before the relay existed (the outbound's
        early data, sent with the CONNECT), so the counts and metrics include them."""
        self._loop = loop or asyncio.get_running_loop()
        self.done: asyncio.Future[RelayResult] = self._loop.create_future()
        self._sinks: list[Sink | None] = [None, None]
        self._counts = [bytes_in, 0]
        self._eof = 0  # bit (1 << side): that side has sent EOF
        self._lost = 0  # bit (1 << side): that side's connection is gone
        self._error: BaseException | None = None

    @property
    def bytes_in(self) -> int:
        return self._counts[DOWNSTREAM]

    @property
    def bytes_out(self) -> int:
        return self._counts[UPSTREAM]

    def leg(self, side: int) -> Leg:
        """The callbacks a side (DOWNSTREAM or UPSTREAM) reports its connection's events to."""
        return Leg(self, side)

    def start(self, downstream: Sink, upstream: Sink) -> None:
        """Connect the two sides and start reading from both. Sides must not read before this."""
        if self._sinks != [None, None]:
            raise RuntimeError("relay already started")
        self._sinks = [downstream, upstream]
        for side in (DOWNSTREAM, UPSTREAM):
            if self._lost & (1 << side):  # a side died before the relay started: finish the other one too
                self._connection_lost(side, self._error)
                return
        downstream.resume_reading()
        upstream.resume_reading()

    def buffered(self) -> int:
        """Bytes queued inside the relay's sinks right now (bounded by the write-buffer limits)."""
        return sum(s.buffered() for s in self._sinks if s is not None)

    def close(self) -> None:
        """Close both sides gracefully (flush queued bytes first, then FIN; see LINGER), e.g. when draining."""
        for side, sink in enumerate(self._sinks):
            if sink is not None and not self._lost & (1 << side):
                sink.close()

    def abort(self, reason: BaseException | None = None) -> None:
        """Close both sides at once (reset), e.g. when a policy now denies the connection."""
        if self._error is None:
            self._error = reason
        for side, sink in enumerate(self._sinks):
            if sink is not None and not self._lost & (1 << side):
                sink.abort()

    # -- events from the legs -------------------------------------------------------------------------

    def _data(self, side: int, data: bytes | bytearray | memoryview) -> None:
        other = self._sinks[1 - side]
        if other is None or self._lost & (2 >> side):
            return
        self._counts[side] += len(data)
        other.write(data)

    def _eof_received(self, side: int) -> None:
        if self._eof & (1 << side):
            return
        self._eof |= 1 << side
        other = self._sinks[1 - side]
        if other is not None and not self._lost & (2 >> side):
            other.write_eof()
        if self._eof == 3:
            self.close()

    def _pause(self, side: int) -> None:
        other = self._sinks[1 - side]
        if other is not None:
            other.pause_reading()

    def _resume(self, side: int) -> None:
        other = self._sinks[1 - side]
        if other is not None:
            other.resume_reading()

    def _connection_lost(self, side: int, exc: BaseException | None) -> None:
        self._lost |= 1 << side
        if exc is not None and self._error is None:
            self._error = exc
        other = self._sinks[1 - side]
        if other is not None and not self._lost & (2 >> side):
            if exc is not None:
                other.abort()
            elif self._eof != 3:
                other.close()  # closed from outside before both directions ended: finish gracefully
        if self._lost == 3 and not self.done.done():
            # Both connections are gone: drop the sinks, which hold this relay through their legs, so the
            # whole connection is freed by reference counting rather than left to the cyclic GC (whose
            # full passes over 10 000 held connections took ~100 ms each in the tunnel).
            self._sinks = [None, None]
            self.done.set_result(RelayResult(self._counts[DOWNSTREAM], self._counts[UPSTREAM], self._error))


class Leg:
    """What one side tells the relay about its connection (asyncio.Protocol's names, same meaning)."""

    __slots__ = ("_relay", "_side")

    def __init__(self, relay: Relay, side: int) -> None:
        if side not in (DOWNSTREAM, UPSTREAM):
            raise ValueError(f"side must be DOWNSTREAM ({DOWNSTREAM}) or UPSTREAM ({UPSTREAM}), not {side}")
        self._relay = relay
        self._side = side

    def data_received(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from this side; valid only during the call."""
        self._relay._data(self._side, data)

    def eof_received(self) -> None:
        """This side will send no more bytes (FIN / END_STREAM)."""
        self._relay._eof_received(self._side)

    def pause_writing(self) -> None:
        """This side's sink is over its high-water mark: the relay stops reading the other side."""
        self._relay._pause(self._side)

    def resume_writing(self) -> None:
        """This side's sink drained below its low-water mark."""
        self._relay._resume(self._side)

    def connection_lost(self, exc: BaseException | None) -> None:
        """This side is closed (exc is None) or failed (exc says why). Called exactly once."""
        self._relay._connection_lost(self._side, exc)


# glibc serves allocations above its mmap threshold (128 KiB, raised dynamically) with a fresh mmap and
# returns heap tops above its trim threshold to the kernel. A data path that allocates and frees ~1 MiB
# objects per read (bytes from a TLS BIO, frames) then pays page faults and page zeroing on every chunk:
# perf on the tunnel pair showed ~35% of the sender's cycles in clear_page/exc_page_fault/munmap. Keeping
# such blocks in the heap instead halved the tunnel's CPU per GB (see bench/tunnel_loopback.py).
MALLOC_MMAP_THRESHOLD = 8 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 32 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def tune_allocator() -> bool:
    """Make glibc keep large freed blocks (up to MALLOC_MMAP_THRESHOLD each, MALLOC_TRIM_THRESHOLD in
    all) for reuse instead of unmapping them. Process-wide and idempotent; the data path calls it once
    (HboneProtocol). Returns False where there is no glibc mallopt (musl, other libcs): nothing changes.
    Environment settings (MALLOC_MMAP_THRESHOLD_ etc.) win: they are left alone."""
    if any(k.startswith("MALLOC_") and k.endswith("_THRESHOLD_") for k in os.environ):
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


_scratch = threading.local()


def _scratch_buffer() -> memoryview:
    """The per-thread read buffer. Safe to share: each read is handed on (and copied if kept) before the
    loop can start the next one, and idle connections then cost no buffer memory at all."""
    view: memoryview | None = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(CHUNK))
    return view


_LINGER_RESET = struct.pack("ii", 1, 0)
# A graceful close of a socket whose peer is still sending: closing it with unread input makes the kernel
# send RST and drop whatever of ours is still unsent (bytes the relay counted as relayed). So close() sends
# FIN after the queued bytes, then reads and discards until the peer's FIN, at most this long (s), and only
# then closes - a lingering close, as HTTP servers do.
LINGER = 2.0


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a transport's socket: a relay forwards each read at once, so Nagle would only add
    a round trip to small writes (64-byte ping-pong). uvloop sets it on its TCP transports, asyncio's
    connect_accepted_socket() and create_connection(sock=...) do not; set it either way."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # already closed: nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpSide(asyncio.BufferedProtocol):
    """A TCP connection as a relay side: the protocol reads into the scratch buffer, the sink writes."""

    __slots__ = ("_buf", "_early", "_early_eof", "_eof_in", "_held", "_leg", "_linger", "_started", "_transport")

    def __init__(self, leg: Leg) -> None:
        self._leg = leg
        self._transport: asyncio.Transport | None = None
        self._buf = _scratch_buffer()
        self._started = False
        # What arrived before the relay started (uvloop starts reading right after connection_made).
        self._early: bytes = b""
        self._early_eof = False
        self._held = False  # the relay asked us to stop reading (the other side is full)
        self._eof_in = False  # the peer's FIN has arrived
        self._linger: asyncio.TimerHandle | None = None  # set while close() waits for the peer's FIN

    # -- asyncio.BufferedProtocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        set_nodelay(transport)
        if not self._started:
            self._transport.pause_reading()  # nothing may be read before the relay has both sides

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        if self._linger is not None:
            return  # closing: what the peer still sends is read only to be dropped (see LINGER)
        if self._started:
            self._leg.data_received(self._buf[:nbytes])
        else:
            assert self._transport is not None
            self._early += self._buf[:nbytes]
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof_in = True
        if self._linger is not None:
            return False  # the lingering close is over: the transport closes (after what it still holds)
        if self._started:
            self._leg.eof_received()
        else:
            self._early_eof = True
        return True  # keep the transport open: the other direction may still be flowing

    def pause_writing(self) -> None:
        self._leg.pause_writing()

    def resume_writing(self) -> None:
        self._leg.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self._leg.connection_lost(exc)

    # -- Sink ------------------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._transport is not None
        if not self._transport.is_closing():
            # Transports may keep a reference to what they are given until it is sent (uvloop does), and
            # a memoryview may be of the scratch buffer the next read overwrites: copy those. bytes and
            # bytearrays are handed over (see Sink.write) and go as they are.
            self._transport.write(data if type(data) is not memoryview else bytes(data))

    def write_eof(self) -> None:
        assert self._transport is not None
        if not self._transport.is_closing():
            self._transport.write_eof()

    def pause_reading(self) -> None:
        assert self._transport is not None
        self._held = True
        if not self._transport.is_closing() and self._transport.is_reading():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        assert self._transport is not None
        self._held = False
        if not self._started:
            self._started = True
            early, self._early = self._early, b""
            if early:
                self._leg.data_received(early)  # may hold us again if the other side is full
            if self._early_eof:
                self._leg.eof_received()
                return
        if not self._held and not self._transport.is_closing() and not self._transport.is_reading():
            self._transport.resume_reading()

    def close(self) -> None:
        transport = self._transport
        assert transport is not None
        if transport.is_closing() or self._linger is not None:
            return
        if self._eof_in or not transport.can_write_eof():
            transport.close()  # nothing unread can come: a plain close sends FIN after the queued bytes
            return
        transport.write_eof()  # FIN once the queued bytes are out; then read to the peer's FIN (LINGER)
        self._linger = asyncio.get_running_loop().call_later(LINGER, transport.close)
        if not transport.is_reading():
            transport.resume_reading()

    def abort(self) -> None:
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed by the kernel; abort() still releases it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._transport.abort()

    def buffered(self) -> int:
        assert self._transport is not None
        return self._transport.get_write_buffer_size()


async def tcp_side(sock: socket.socket, leg: Leg) -> TcpSide:
    """Wrap a connected socket as a relay side (the transport owns the socket from here on)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.connect_accepted_socket(lambda: TcpSide(leg), sock)
    return protocol


# -- the splice relay -------------------------------------------------------------------------------------

PIPE_SIZE = 1024 * 1024  # per direction; also the most a stalled direction holds (in the kernel)
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ is Python 3.10+ but missing from typeshed's fcntl on some versions
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_URGENT_READ = 65536  # what a recv() past TCP urgent data takes (<= any pipe's capacity)


class _Direction:
    """src socket -> pipe -> dst socket. Reads only when the pipe is empty, so it holds <= one pipe."""

    def __init__(self, relay: SpliceRelay, src: socket.socket, dst: socket.socket) -> None:
        self._relay: SpliceRelay | None = relay  # None once stopped: no cycle outlives the relay
        self._loop = relay._loop
        self._src = src.fileno()
        self._src_sock = src
        self._dst = dst.fileno()
        self._dst_sock = dst
        self._pipe: tuple[int, int] | None = None  # made on first data: idle connections hold no pipe
        self._capacity = PIPE_SIZE
        self.pending = 0
        self.count = 0
        self.eof = False
        self.input_ended = False  # the source's own EOF (not finish_input's)
        self.done = False
        self._reading = False
        self._writing = False

    def start(self) -> None:
        self._read_on()

    def finish_input(self) -> None:
        """Treat the source as ended (graceful close): flush the pipe, then shut the destination down."""
        self._read_off()
        if not self.eof:
            self.eof = True
            self._flush()

    def stop(self) -> None:
        self._read_off()
        self._write_off()
        self._close_pipe()
        self._relay = None

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _fail(self, exc: OSError) -> None:
        if self._relay is not None:
            self._relay._fail(exc)

    def _read_on(self) -> None:
        if not self._reading:
            self._reading = True
            self._loop.add_reader(self._src, self._readable)

    def _read_off(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._src)

    def _write_on(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._dst, self._writable)

    def _write_off(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._dst)

    def _make_pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._capacity = fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # Over /proc/sys/fs/pipe-max-size or the per-user pipe budget: the default size still works.
            self._capacity = 65536
        return r, w

    def _readable(self) -> None:
        if self._pipe is None:
            try:
                self._pipe = self._make_pipe()
            except OSError as exc:
                self._fail(exc)
                return
        try:
            n = os.splice(self._src, self._pipe[1], self._capacity, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            n = -1
        except OSError as exc:
            self._fail(exc)
            return
        if n <= 0:
            got = self._recv_past_urgent()
            if got is None:
                return
            n = got
        if n == 0:
            self.eof = self.input_ended = True
            self._read_off()
        self.pending += n
        self._flush()

    def _recv_past_urgent(self) -> int | None:
        """splice(2) found nothing (EAGAIN) or the end (0) though the socket was readable: look with recv().

        splice never reads past TCP urgent data (send(MSG_OOB)): at the urgent byte it returns EAGAIN, or 0
        once the FIN is in, and the socket stays readable, so the loop would call it forever and a FIN
        behind the byte would end the stream early. recv() steps over the urgent byte (out of band, it is
        not relayed, as by the buffered relay and any recv()-based proxy) and returns what follows, which
        goes into the (empty: reads happen only then) pipe. Otherwise the same answer as splice's: a
        spurious wake-up (None) or the end (0). One recv() per EAGAIN or EOF, never per byte."""
        assert self._pipe is not None and self.pending == 0
        try:
            data = self._src_sock.recv(_URGENT_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._fail(exc)
            return None
        if data and os.write(self._pipe[1], data) != len(data):  # an empty pipe takes 64 KiB at least
            self._fail(OSError(errno.EIO, "the relay's pipe took part of the bytes after TCP urgent data"))
            return None
        return len(data)

    def _flush(self) -> None:
        while self.pending:
            assert self._pipe is not None
            try:
                n = os.splice(self._pipe[0], self._dst, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self._read_off()  # backpressure: the destination is full
                self._write_on()
                return
            except OSError as exc:
                self._fail(exc)
                return
            self.pending -= n
            self.count += n
        self._write_off()
        if not self.eof:
            self._read_on()
        elif not self.done:
            self.done = True
            try:
                self._dst_sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._fail(exc)
                return
            # Ended and empty: its pipe goes now, not with the relay. A half-closed connection whose other
            # direction stays open (a silent server) would otherwise hold two more descriptors for good.
            self._close_pipe()
            if self._relay is not None:
                self._relay._direction_done()

    def _writable(self) -> None:
        self._flush()


class SpliceRelay:
    """Relay two connected TCP sockets with splice(2); owns and finally closes both sockets.

    Same contract as `Relay`: `done` resolves to a `RelayResult` once both directions have ended (EOF
    forwarded as shutdown(SHUT_WR)) or either side failed (the other is then reset).
    """

    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[RelayResult] = self._loop.create_future()
        self._socks = (downstream, upstream)
        for sock in self._socks:
            sock.setblocking(False)
        self._dirs = (_Direction(self, downstream, upstream), _Direction(self, upstream, downstream))
        self._error: BaseException | None = None
        self._lingering: set[socket.socket] = set()  # closed gracefully with unread input (see LINGER)
        self._linger_timer: asyncio.TimerHandle | None = None
        for d in self._dirs:
            d.start()

    @property
    def bytes_in(self) -> int:
        return self._dirs[DOWNSTREAM].count

    @property
    def bytes_out(self) -> int:
        return self._dirs[UPSTREAM].count

    def buffered(self) -> int:
        """Bytes read from one side and not yet written to the other (they sit in the pipes)."""
        return sum(d.pending for d in self._dirs)

    def close(self) -> None:
        """Stop reading, deliver what is already read, shut both sides down, then close (a side still
        sending is read and dropped until its FIN, for at most LINGER s, rather than reset)."""
        for d in self._dirs:
            if not self.done.done():
                d.finish_input()

    def abort(self, reason: BaseException | None = None) -> None:
        """Reset both sides now."""
        self._fail(reason)

    def _direction_done(self) -> None:
        if all(d.done for d in self._dirs) and not self._lingering:
            # Both shut down. A side whose own EOF has not come (close() stopped reading it) may still be
            # sending: read and drop that until its FIN before closing it (LINGER), not reset it.
            for d in self._dirs:
                d.stop()
            self._lingering = {sock for sock, d in zip(self._socks, self._dirs, strict=True) if not d.input_ended}
            for sock in self._lingering:
                self._loop.add_reader(sock.fileno(), self._discard, sock)
            if self._lingering:
                self._linger_timer = self._loop.call_later(LINGER, self._finish)
            else:
                self._finish()

    def _discard(self, sock: socket.socket) -> None:
        try:
            ended = not sock.recv_into(_scratch_buffer())
        except BlockingIOError:
            return
        except OSError:
            ended = True
        if ended:
            self._loop.remove_reader(sock.fileno())
            self._lingering.discard(sock)
            if not self._lingering:
                self._finish()

    def _fail(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if self._error is None:
            self._error = exc
        for sock in self._socks:
            with contextlib.suppress(OSError):  # already dead; closing it below is all that is left
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._finish()

    def _finish(self) -> None:
        if self.done.done():
            return
        for d in self._dirs:
            d.stop()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        for sock in self._lingering:
            self._loop.remove_reader(sock.fileno())
        self._lingering = set()
        for sock in self._socks:
            sock.close()
        self.done.set_result(RelayResult(self.bytes_in, self.bytes_out, self._error))


async def relay_tcp(downstream: socket.socket, upstream: socket.socket) -> RelayResult:
    """Relay two connected TCP sockets until both directions end (splice fast path); closes both."""
    relay = SpliceRelay(downstream, upstream)
    try:
        return await relay.done
    except asyncio.CancelledError:
        relay.abort()
        raise
