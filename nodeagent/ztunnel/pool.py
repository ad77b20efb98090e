"""Pooled outbound HBONE connections, shared by proxied connections with the same four-part key.

Why this module exists: an mTLS handshake costs far more than an HTTP/2 stream, so the outbound side
keeps HBONE connections open and multiplexes CONNECT streams over them (REFERENCE.md, "Pooling"). A
connection is shared only between connections with equal (source identity, destination identity,
source IP, destination address) — the routing plan's `PoolKey` — so an identity never rides on a
connection authenticated as another. At most `max_streams` (100) streams per connection; a burst for
one key waits for a single connect instead of opening one connection each; a connection without streams
for `idle_timeout` (5 min) is closed with GOAWAY; connecting (TCP + TLS + peer check) is bounded by
`connect_timeout` (10 s), and the answer to a CONNECT by that plus ANSWER_MARGIN: the server may spend
its own connect timeout reaching the app, and its 503 then says more than our timeout. When a pod
leaves, the connections opened from its netns close with it (`close_from`): a new pod with the same IP
and identity has the same key, and must not inherit a socket living in the old pod's netns.

A connection takes new streams only while what its handshake rested on still holds (its `Trust`, set by the
connect edge): our certificate and the peer's within their validity, and the trust bundle the same as then.
A busy connection never goes idle, so without this one opened once would carry new streams for as long as
traffic flows — past either certificate's expiry, and past `nodeagent ca rotate finish` removing the root
it was verified with. A connection that fails the check is retired: a GOAWAY, no new stream, its open
streams carry on, and it closes (close_notify) as soon as the last one ends, not after the idle timeout; the
next stream for its key gets a new connection, authenticated with the current certificates and roots.
Upstream does not do this: ztunnel's pool reuses any connection h2 still calls ready and below its stream
limit (only a CRL revocation ends one, abruptly), and Envoy keeps its connections across SDS certificate
updates (istio/istio#7630). A destination that refuses a stream on such a connection (REFUSED_STREAM and
GOAWAY, inbound.py) is retried here like a drain. Two nodes see a new bundle at different times, so the
destination may refuse a stream on each pooled connection in turn while this side still finds them usable:
only refusals by connections opened for the stream count toward giving up (a refused one never takes a
stream again, so the others are tried at most once each).

What it deliberately does not do: no sockets or TLS itself — `connect(key, pod)` is the injected edge
that returns a verified `HboneProtocol` for a key and the local pod it starts from (outbound.py builds
it) — and no retries of failed connects: they fail the proxied connections waiting for them, which the
outbound side resets and logs. (A stream the peer refuses because it is draining, or no longer trusts
the connection, is retried on another connection: that is a hand-over, not a failure.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nodeagent.ztunnel.edges import LocalPod
from nodeagent.ztunnel.hbone import ConnectRequest
from nodeagent.ztunnel.hbone_transport import HboneProtocol, HboneStream, StreamRefused
from nodeagent.ztunnel.routing import PoolKey

log = logging.getLogger(__name__)

ANSWER_MARGIN = 5.0  # seconds a CONNECT's answer may take beyond the connect timeout (see above)

MAX_STREAMS_PER_CONNECTION = 100
IDLE_TIMEOUT = 300.0
CONNECT_TIMEOUT = 10.0

Connect = Callable[[PoolKey, LocalPod], Awaitable[HboneProtocol]]


class HbonePool:
    def __init__(
        self,
        connect: Connect,
        *,
        max_streams: int = MAX_STREAMS_PER_CONNECTION,
        idle_timeout: float = IDLE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._connect = connect
        self._max_streams = max_streams
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._conns: dict[PoolKey, list[HboneProtocol]] = {}
        self._connecting: dict[PoolKey, asyncio.Future[HboneProtocol]] = {}
        self._origins: dict[HboneProtocol, str] = {}  # connection -> uid of the pod whose netns it was made in
        self._idle_timers: dict[HboneProtocol, asyncio.TimerHandle] = {}
        self._closing = False

    async def open_stream(
        self, key: PoolKey, request: ConnectRequest, origin: LocalPod, early: bytes = b""
    ) -> tuple[HboneStream, HboneProtocol]:
        """A CONNECT stream to `request.target` on a pooled connection for `key`, opened from `origin`'s
        netns if none is usable; raises ConnectRefused (non-200), OSError or TimeoutError. `early` goes
        with the CONNECT (HboneProtocol.open), again with the retry if the peer refuses the stream."""
        refused = 0  # by connections opened for this call: a refusal by a pooled one leaves it refusing,
        # so going on to the next is bounded by the pool, however many it holds for `key` (a bundle change
        # the peer saw first refuses a stream on each of them in turn)
        while True:
            if self._closing:
                raise ConnectionAbortedError("the tunnel is draining; no new HBONE streams")
            conn = self._pick(key)
            fresh = conn is None
            if conn is None:
                conn = await self._wait_connection(key, origin)
                if not self._usable(conn):
                    refused += 1
                    if refused > 3:
                        raise ConnectionResetError(
                            f"every new HBONE connection to {key.destination} was unusable at once: "
                            f"{conn.close_reason or 'closed or refusing streams'}"
                        )
                    continue
            self._cancel_idle(conn)
            try:
                async with asyncio.timeout(self._connect_timeout + ANSWER_MARGIN):
                    stream = await conn.open(request, early)
            except TimeoutError:
                raise TimeoutError(
                    f"{key.destination} took the CONNECT but did not answer it within "
                    f"{self._connect_timeout + ANSWER_MARGIN:g} s"
                ) from None
            except StreamRefused:
                if fresh:
                    refused += 1
                    if refused > 3:
                        raise
                continue  # the peer is draining this connection or no longer trusts it: pick or open another
            return stream, conn

    def _usable(self, conn: HboneProtocol) -> bool:
        if (
            conn.closed.is_set()
            or conn.available_streams <= 0
            or conn.active_streams >= self._max_streams
            or conn.streams_opened >= 2**30
        ):
            return False
        stale = conn.trust.stale() if conn.trust is not None else None
        if stale is not None:
            self._retire(conn, stale)
            return False
        return True

    def _retire(self, conn: HboneProtocol, reason: str) -> None:
        """No new stream on `conn` (GOAWAY); it closes when its last stream ends (HboneProtocol._maybe_idle)."""
        log.info(
            "retiring an HBONE connection to %s from new streams: %s; it closes when its %d open streams end",
            conn.peername() or "its peer",
            reason,
            conn.active_streams,
        )
        self._cancel_idle(conn)
        conn.refuse_new_streams(reason)

    def _pick(self, key: PoolKey) -> HboneProtocol | None:
        for conn in self._conns.get(key, ()):
            if self._usable(conn):
                return conn
        return None

    async def _wait_connection(self, key: PoolKey, origin: LocalPod) -> HboneProtocol:
        pending = self._connecting.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._connecting[key] = pending
            try:
                async with asyncio.timeout(self._connect_timeout):
                    conn = await self._connect(key, origin)
            except BaseException as exc:
                self._connecting.pop(key, None)
                if not pending.done():
                    pending.set_exception(exc if isinstance(exc, Exception) else ConnectionAbortedError(str(exc)))
                    pending.exception()  # retrieved here; waiters re-raise it
                raise
            self._connecting.pop(key, None)
            self._conns.setdefault(key, []).append(conn)
            self._origins[conn] = origin.uid
            conn.closed_callbacks.append(lambda c: self._remove(key, c))
            pending.set_result(conn)
            return conn
        return await asyncio.shield(pending)

    def _remove(self, key: PoolKey, conn: HboneProtocol) -> None:
        self._cancel_idle(conn)
        self._origins.pop(conn, None)
        conns = self._conns.get(key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    def on_idle(self, conn: HboneProtocol) -> None:
        """The connection has no streams: close it unless one opens within the idle timeout."""
        if conn in self._idle_timers or conn.closed.is_set():
            return
        loop = asyncio.get_running_loop()
        self._idle_timers[conn] = loop.call_later(self._idle_timeout, self._expire, conn)

    def _expire(self, conn: HboneProtocol) -> None:
        self._idle_timers.pop(conn, None)
        if conn.active_streams == 0:
            log.debug("closing an HBONE connection idle for %.0f s", self._idle_timeout)
            conn.close("idle")

    def _cancel_idle(self, conn: HboneProtocol) -> None:
        timer = self._idle_timers.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def connections(self) -> list[tuple[PoolKey, HboneProtocol]]:
        return [(key, conn) for key, conns in self._conns.items() for conn in conns]

    def close_from(self, uid: str) -> None:
        """The pod `uid` has left: close (GOAWAY, close_notify) the connections made in its netns."""
        for conn in [c for c, origin in self._origins.items() if origin == uid]:
            conn.close("the pod it was opened from has left")

    def stop_new(self) -> None:
        """Drain: refuse new streams from now on."""
        self._closing = True

    def close_all(self) -> None:
        """Close every connection with GOAWAY and TLS close_notify."""
        self._closing = True
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        for _, conn in self.connections():
            conn.close("the tunnel is shutting down")

    def dump(self) -> list[dict[str, Any]]:
        return [
            {
                "sourceIdentity": str(key.source_identity),
                "destinationIdentity": str(key.destination_identity),
                "sourceIp": str(key.source_ip),
                "destination": str(key.destination),
                "activeStreams": conn.active_streams,
                "streamsOpened": conn.streams_opened,
            }
            for key, conn in self.connections()
        ]
