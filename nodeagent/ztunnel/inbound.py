"""Inbound: HBONE on :15008 and captured plaintext on :15006, per local pod, to the pod's application.

Why this module exists: this is where the mesh's promises are kept for the destination. On :15008 a
client must complete TLS 1.3 with a certificate from our roots (OpenSSL, with the *destination pod's*
certificate presented — one listener per pod, so the identity is known before the handshake) and be a
workload of our trust domain (tls.verify_client_peer); every CONNECT is validated by the HBONE core
(400s), must be for this pod's own address (400: never anywhere else from inside the pod's netns), is
authorized with Istio's L4 semantics (policy.evaluate: 401), and only then is the application connected —
from the client's real IP when the socket factory spoofs — and answered 200 (503 when the workload or its
address is not known yet, or the app cannot be reached). Nothing the client sends reaches the app before
the 200: the core holds it and the relay starts only after accept(). On :15006 the same authorization runs
without a peer identity (so PeerAuthentication STRICT refuses it) and the bytes are spliced.

A client connection takes new streams only while it could still be made: once the client's certificate or
ours has expired, or the trust bundle has changed since its handshake (a root rotation's step), the next
CONNECT on it is refused with REFUSED_STREAM and a graceful GOAWAY follows, so the client retries on a new
connection, authenticated again; its open streams carry on (hbone_transport.Trust, tls.stale).

Decide, then act: `authorize()` is a pure decision over the current ClusterView; the coroutines here
carry it out. A CONNECT that the client resets while we are still connecting upstream cancels that work
(rapid reset). Open inbound connections are registered with their policy view so the tunnel can close
the ones that new policies, or new labels on the destination pod, deny.

What it deliberately does not do: no listeners or pod lifecycle (the tunnel process owns them), no
certificate fetching (the certificate manager), no outbound traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ipaddress
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nodeagent.model import Identity, IPAddress, Pod, SocketAddress
from nodeagent.policy import Connection, evaluate
from nodeagent.zds.tasks import TaskSet
from nodeagent.ztunnel import hbone, sockets, tls
from nodeagent.ztunnel.certs import CertUnavailable
from nodeagent.ztunnel.edges import ClusterView, LocalPod, ProxyState, SocketFactory, TlsContexts
from nodeagent.ztunnel.fdshare import DescriptorShares
from nodeagent.ztunnel.hbone_transport import HboneProtocol, Trust
from nodeagent.ztunnel.metrics import ConnectionRecord, ConnectionTable, Direction, Flags, Peer, TunnelMetrics
from nodeagent.ztunnel.relay import DOWNSTREAM, UPSTREAM, Relay, RelayResult, SpliceRelay, tcp_side
from nodeagent.ztunnel.routing import inbound_service

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# An HBONE connection without streams this long is closed (GOAWAY, close_notify): a peer holding idle
# connections open must not pin their memory for good. Longer than the clients' pool release (5 min),
# so a well-behaved client closes its idle connection first.
SERVER_IDLE_TIMEOUT = 360.0
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class ProxyDeps:
    """What inbound and outbound proxies share; built once by the tunnel process."""

    state: ProxyState
    socket_factory: SocketFactory
    contexts: TlsContexts
    table: ConnectionTable
    metrics: TunnelMetrics
    tasks: TaskSet
    limits: hbone.Limits = field(default_factory=hbone.Limits)
    connect_timeout: float = sockets.CONNECT_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    server_idle_timeout: float = SERVER_IDLE_TIMEOUT
    wall_clock: Callable[[], float] = time.time  # certificate validity is wall time (as in certs.py)
    shares: DescriptorShares = field(default_factory=DescriptorShares)  # the process's file descriptors


def connection_trust(deps: ProxyDeps, proto: HboneProtocol, identity: Identity, *, server_side: bool) -> Trust:
    """The Trust of a connection whose handshake presented `identity` and whose peer was just checked. Its
    bundle is compared with that of the context a new connection for the same identity and side would get
    now (the same rule that builds contexts, so any credentials source works)."""
    contexts = deps.contexts
    return Trust(
        tls.authentication(proto.peer_ssl()),  # type: ignore[arg-type]
        deps.wall_clock,
        lambda: tls.trusted_roots(contexts.context(identity, server_side=server_side)),
    )


@dataclass(frozen=True, slots=True)
class Admit:
    pod: Pod
    connection: Connection


@dataclass(frozen=True, slots=True)
class Refuse:
    status: int  # the HBONE answer: 401 or 503 (400s are the core's)
    flags: Flags
    reason: str


def authorize(
    view: ClusterView, local: LocalPod, source: IPAddress, target: SocketAddress, peer: Identity | None
) -> Admit | Refuse:
    """Decide one inbound connection to `local` (pure): only to `local`'s own address, never elsewhere from
    inside its netns."""
    pod = view.pod_of(local)
    if pod is None or pod.ip is None:
        # 503 (no such local workload, yet), not 400: the request may well be right, but until the inventory
        # has the pod's address nothing shows that its target is this pod, so nothing is admitted.
        return Refuse(503, Flags.NO_ROUTE, f"pod {local.key} is not in the inventory (yet); no address to serve")
    if target.ip != pod.ip:
        return Refuse(400, Flags.NO_ROUTE, f"{target} is not an address of pod {local.key} ({pod.ip})")
    if target.port in sockets.TUNNEL_PORTS:
        return Refuse(400, Flags.NO_ROUTE, f"{target} is a tunnel port; refusing a loop")
    conn = Connection(source, target, peer, pod.namespace, pod.labels)
    verdict = evaluate(conn, view.policies)
    if not verdict.allowed:
        return Refuse(401, Flags.DENIED, verdict.reason)
    return Admit(pod, conn)


ACCEPT_BATCH = 64  # connections taken from a listener's queue per wakeup
ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX = 0.05, 1.0  # after a failed accept (e.g. out of file descriptors)


def _listener_name(listener: socket.socket) -> str:
    with contextlib.suppress(OSError):
        host, port = listener.getsockname()[:2]
        return f"{host}:{port}"
    return "a listener"


async def accept_loop(listener: socket.socket, handle: Callable[[socket.socket], object]) -> None:
    """Hand every connection accepted on `listener` to `handle` until the listener is closed.

    Waits for one connection, then takes what else is already queued (up to ACCEPT_BATCH) without going
    back to the event loop: under a burst that saves a future, a reader registration and a wakeup each.
    """
    loop = asyncio.get_running_loop()
    backoff = ACCEPT_BACKOFF_MIN
    while True:
        try:
            sock, _ = await loop.sock_accept(listener)
        except OSError as exc:
            if listener.fileno() < 0:
                return  # closed: draining or the pod left
            # EMFILE/ENFILE/ENOBUFS, or an error accept(2) says to retry: the listener is still bound and
            # its queue fills, so it must not stop for good. Back off (the queue waits), then accept again.
            log.warning("accept on %s failed: %s; retrying in %.2f s", _listener_name(listener), exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
            continue
        backoff = ACCEPT_BACKOFF_MIN
        handle(sock)
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if listener.fileno() < 0:
                    return
                break  # e.g. ECONNABORTED for one connection, EMFILE: sock_accept reports the persistent ones
            handle(sock)


def reset_socket(sock: socket.socket) -> None:
    """Close with RST, so the client sees a refusal rather than an orderly end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _addr(peer: tuple[str, int] | None) -> SocketAddress | None:
    """A socket's address as the kernel reports it (getpeername/getsockname)."""
    if peer is None:
        return None
    if "%" in peer[0]:  # a zone id: SocketAddress.parse says what it does not accept
        return SocketAddress.parse(f"[{peer[0]}]:{peer[1]}")
    return SocketAddress(_ip(peer[0]), peer[1])


# The kernel's text for an address is canonical, and the same few pod IPs come back on every connection:
# parsing them once (ipaddress is slow) saves several µs per connection. Bounded.
_ip = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


class HboneInbound:
    """The :15008 server of one local pod."""

    def __init__(self, deps: ProxyDeps, pod: LocalPod) -> None:
        self._deps = deps
        self._pod = pod
        self._connections: set[HboneProtocol] = set()
        # Per connection: the client's identity, address and its text, shared by all of its streams.
        self._peers: dict[HboneProtocol, tuple[Identity, SocketAddress | None, str]] = {}
        self._pending: dict[tuple[HboneProtocol, int], asyncio.Task[None]] = {}
        self._idle: dict[HboneProtocol, asyncio.TimerHandle] = {}  # connections without streams, till when

    @property
    def connections(self) -> set[HboneProtocol]:
        return self._connections

    async def serve(self, listener: socket.socket) -> None:
        """Accept until the listener is closed."""
        spawn, name = self._deps.tasks.spawn, f"hbone-handshake {self._pod.key}"
        await accept_loop(listener, lambda sock: spawn(self._handshake(sock), name=name))

    async def _handshake(self, sock: socket.socket) -> None:
        deps, pod = self._deps, self._pod
        try:
            ctx = deps.contexts.context(pod.identity, server_side=True)
        except CertUnavailable as exc:
            log.warning("refusing an HBONE connection to %s: %s", pod.key, exc)
            reset_socket(sock)
            return
        # With the pod's address already known, the core answers a CONNECT for another address with 400 itself
        # (no task, and counted toward its limit of malformed streams); authorize() checks every stream
        # against the current view either way, so a connection made before the address was known is held to it.
        view = deps.state.view
        local = view.pod_of(pod)
        addresses = frozenset({local.ip}) if local is not None and local.ip is not None else None
        loop = asyncio.get_running_loop()

        def factory() -> HboneProtocol:
            return HboneProtocol(
                hbone.Role.SERVER,
                limits=deps.limits,
                local_addresses=addresses,
                on_ready=self._on_ready,
                on_stream=self._on_stream,
                on_rejected=self._on_rejected,
                on_stream_reset=self._on_stream_reset,
                on_closed=self._on_closed,
                on_idle=self._on_idle,
            )

        try:
            await loop.connect_accepted_socket(factory, sock, ssl=ctx, ssl_handshake_timeout=deps.handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # No client certificate, an unknown root, not TLS at all (cleartext h2c), too slow: closed.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            deps.metrics.peer_failures.labels(reason=str(reason).lower()).inc()
            log.info("HBONE handshake to %s failed: %s", pod.key, exc)
            sock.close()

    def _on_ready(self, proto: HboneProtocol) -> None:
        try:
            peer = tls.verify_client_peer(proto.peer_ssl(), self._deps.state.view.trust_domain)  # type: ignore[arg-type]
            proto.trust = connection_trust(self._deps, proto, self._pod.identity, server_side=True)
        except tls.PeerVerificationError as exc:
            self._deps.metrics.peer_failures.labels(reason=exc.reason.value).inc()
            log.info("dropping an HBONE client of %s: %s", self._pod.key, exc)
            proto.abort(str(exc))
            return
        client = _addr(proto.peername())
        self._peers[proto] = (peer, client, str(client) if client else "-")
        self._connections.add(proto)
        self._deps.metrics.hbone_connections.labels("server").inc()
        self._on_idle(proto)  # no stream yet

    def _on_idle(self, proto: HboneProtocol) -> None:
        """The connection has no streams: close it unless one opens within the server idle timeout."""
        if proto not in self._idle and not proto.closed.is_set():
            loop = asyncio.get_running_loop()
            self._idle[proto] = loop.call_later(self._deps.server_idle_timeout, self._expire, proto)

    def _expire(self, proto: HboneProtocol) -> None:
        self._idle.pop(proto, None)
        if not proto.active_streams and not any(key[0] is proto for key in self._pending):
            log.debug(
                "closing an HBONE connection to %s idle for %.0f s", self._pod.key, self._deps.server_idle_timeout
            )
            proto.close("idle")

    def _busy(self, proto: HboneProtocol) -> None:
        timer = self._idle.pop(proto, None)
        if timer is not None:
            timer.cancel()

    def _on_closed(self, proto: HboneProtocol) -> None:
        self._busy(proto)
        if proto in self._connections:
            self._connections.discard(proto)
            self._deps.metrics.hbone_connections.labels("server").dec()
        self._peers.pop(proto, None)
        for key in [k for k in self._pending if k[0] is proto]:
            self._pending.pop(key).cancel()

    def _on_rejected(self, proto: HboneProtocol, event: hbone.StreamRejected) -> None:
        self._deps.metrics.rejected_streams.labels(str(event.status)).inc()
        log.info("CONNECT to %s answered %d: %s", self._pod.key, event.status, event.reason)

    def _on_stream_reset(self, proto: HboneProtocol, stream_id: int) -> None:
        task = self._pending.pop((proto, stream_id), None)
        if task is not None:
            task.cancel()

    def _on_stream(self, proto: HboneProtocol, event: hbone.StreamOpened) -> None:
        peer = self._peers.get(proto)
        if peer is None:  # data raced the peer check's abort
            proto.reject(event.stream_id, 401)
            return
        trust = proto.trust
        if trust is not None and (stale := trust.stale()) is not None:
            if not proto.core.going_away:
                log.info(
                    "refusing new streams on an HBONE connection from %s to %s: %s; the client retries on a new "
                    "connection, its %d open streams carry on",
                    peer[2],
                    self._pod.key,
                    stale,
                    proto.active_streams,
                )
            proto.refuse_stream(event.stream_id, stale)
            return
        self._busy(proto)
        key = (proto, event.stream_id)
        self._pending[key] = self._deps.tasks.spawn(
            self._serve_stream(proto, *peer, event), name=f"hbone-inbound {self._pod.key} stream {event.stream_id}"
        )

    async def _serve_stream(
        self,
        proto: HboneProtocol,
        peer: Identity,
        client: SocketAddress | None,
        client_text: str,
        event: hbone.StreamOpened,
    ) -> None:
        deps, pod = self._deps, self._pod
        view = deps.state.view
        source_ip = client.ip if client is not None else None
        target = event.request.target
        src_workload = view.workload_at(source_ip) if source_ip is not None else None
        dst_text, hbone_text = _target_texts(target)
        record = ConnectionRecord(
            Direction.INBOUND,
            src_addr=client_text,
            dst_addr=dst_text,
            src=Peer.of(src_workload.pod if src_workload else None, peer, view.cluster),
            dst=Peer.of(view.pod_of(pod), pod.identity, view.cluster),
            hbone_addr=hbone_text,
            service=inbound_service(view.routing, target),
            mutual_tls=True,
        )
        deps.table.pending(record)
        key = (proto, event.stream_id)
        upstream: socket.socket | None = None

        def refuse(refusal: Refuse) -> None:
            self._pending.pop(key, None)
            proto.reject(event.stream_id, refusal.status)
            deps.table.finished(record, 0, 0, refusal.reason, refusal.flags)

        try:
            decision = (
                authorize(view, pod, source_ip, target, peer)
                if source_ip is not None
                else Refuse(503, Flags.NO_ROUTE, "the HBONE connection has no peer address")
            )
            if isinstance(decision, Refuse):
                refuse(decision)
                return
            assert source_ip is not None
            try:
                upstream = deps.socket_factory.upstream(pod, target, source_ip)
                if not deps.shares.admit(source_ip, upstream.fileno()):
                    upstream.close()
                    upstream = None
                    deps.metrics.refused_over_share.labels("inbound").inc()
                    refuse(Refuse(503, Flags.OVERFLOW, _OVER_SHARE.format(source_ip)))
                    return
                record.shares, record.holder = deps.shares, source_ip  # finished() gives it back
                upstream = await sockets.connect(upstream, target, connect_timeout=deps.connect_timeout)
            except OSError as exc:
                upstream = None
                refuse(Refuse(503, Flags.UPSTREAM_FAILURE, str(exc)))
                return
            decision = reauthorize(deps, view, decision, lambda now: authorize(now, pod, source_ip, target, peer))
            if isinstance(decision, Refuse):
                upstream.close()
                upstream = None
                refuse(decision)
                return
            self._pending.pop(key, None)
            relay = Relay()
            up = await tcp_side(upstream, relay.leg(UPSTREAM))
            upstream = None  # the transport owns it now
            try:
                stream = proto.accept(event.stream_id)
            except hbone.HboneError:  # reset or connection gone while we connected
                up.abort()
                deps.table.finished(
                    record, 0, 0, "the client reset the stream before it was answered", Flags.DOWNSTREAM_CLOSED
                )
                return
            stream.attach(relay.leg(DOWNSTREAM))
            relay.start(stream, up)
            record.policy_view = decision.connection
            _track(record, relay)
            deps.table.established(record)
            finish_when_done(deps.table, record, relay)
        except asyncio.CancelledError:
            if upstream is not None:
                upstream.close()
            if not record.established:
                deps.table.finished(
                    record, 0, 0, "the client reset the stream before it was answered", Flags.DOWNSTREAM_CLOSED
                )
            raise
        except Exception as exc:  # e.g. the accepted app socket failing as the transport takes it
            if upstream is not None:
                upstream.close()
            if not record.established:  # else the relay's end finishes it
                self._pending.pop(key, None)
                with contextlib.suppress(Exception):  # the stream may be gone or answered already
                    proto.reject(event.stream_id, 503)
                deps.table.finished(record, 0, 0, f"{type(exc).__name__}: {exc}", Flags.UPSTREAM_FAILURE)
            raise

    def refuse_new_streams(self) -> None:
        """Draining: a graceful GOAWAY on every connection; open streams carry on, new CONNECTs go to a new
        connection (which the successor tunnel accepts)."""
        for proto in self._connections:
            proto.refuse_new_streams()

    def close(self) -> None:
        """Close every HBONE connection of this pod cleanly (GOAWAY, close_notify)."""
        for proto in list(self._connections):
            proto.close("the tunnel is closing this pod's connections")


_OVER_SHARE = (
    "{} holds more than its share of the tunnel's file descriptors, which are running short; "
    "refusing its new streams until some of its connections end"
)


@functools.lru_cache(maxsize=1024)
def _target_texts(target: SocketAddress) -> tuple[str, str]:
    """A CONNECT target as the record shows it, and its HBONE address; one string pair per target."""
    return str(target), f"{target.ip}:{sockets.HBONE_PORT}"


def reauthorize(
    deps: ProxyDeps, view: ClusterView, decision: Admit, judge: Callable[[ClusterView], Admit | Refuse]
) -> Admit | Refuse:
    """`decision` again, made with the view in force now if it changed since `view` (while the upstream
    connect ran, up to the connect timeout). A policy change re-checks the connections in the table,
    and one still connecting is not there yet: without this it would live on under a new DENY."""
    now = deps.state.view
    return decision if now is view else judge(now)


def _track(record: ConnectionRecord, relay: Relay | SpliceRelay) -> None:
    record.relay = relay


def finish_when_done(table: ConnectionTable, record: ConnectionRecord, relay: Relay | SpliceRelay) -> None:
    """Record the end of an established connection when its relay finishes, without a task waiting for
    it: an idle connection then keeps no Task and no coroutine frames (about 2 KB each side), and the
    relay is closed from the table (drain, policy change) rather than by cancelling a task."""
    relay.done.add_done_callback(functools.partial(_relay_done, table, record), context=_NO_CONTEXT)


_NO_CONTEXT = contextvars.Context()  # _relay_done reads no context variables: skip a copy per connection


def _relay_done(table: ConnectionTable, record: ConnectionRecord, done: asyncio.Future[RelayResult]) -> None:
    record.relay = None  # the record and the relay referred to each other
    if done.cancelled():
        table.finished(record, 0, 0, "cancelled", Flags.DOWNSTREAM_CLOSED)
        return
    result = done.result()
    table.finished(record, result.bytes_in, result.bytes_out, _error(result))


def _error(result: RelayResult) -> str:
    return "" if result.error is None else f"{type(result.error).__name__}: {result.error}"


class PlaintextInbound:
    """The :15006 listener of one local pod: captured plaintext, authorized without a peer identity."""

    def __init__(self, deps: ProxyDeps, pod: LocalPod) -> None:
        self._deps = deps
        self._pod = pod

    async def serve(self, listener: socket.socket) -> None:
        spawn, name = self._deps.tasks.spawn, f"plaintext-inbound {self._pod.key}"
        await accept_loop(listener, lambda sock: spawn(self._handle(sock), name=name))

    async def _handle(self, sock: socket.socket) -> None:
        deps, pod = self._deps, self._pod
        view = deps.state.view
        try:
            client = _addr(sock.getpeername())
            target = deps.socket_factory.original_dst(sock)
        except (OSError, ValueError) as exc:  # ValueError: a peer address with a zone id (fe80::1%eth0)
            log.info("dropping a plaintext connection to %s: %s", pod.key, exc)
            reset_socket(sock)
            return
        assert client is not None
        src_workload = view.workload_at(client.ip)
        record = ConnectionRecord(
            Direction.INBOUND_PLAINTEXT,
            src_addr=str(client),
            dst_addr=str(target),
            src=Peer.of(src_workload.pod if src_workload else None, None, view.cluster),
            dst=Peer.of(view.pod_of(pod), pod.identity, view.cluster),
            service=inbound_service(view.routing, target),
        )
        deps.table.pending(record)
        if not deps.shares.admit(client.ip, sock.fileno()):
            reset_socket(sock)
            deps.metrics.refused_over_share.labels("inbound").inc()
            deps.table.finished(record, 0, 0, _OVER_SHARE.format(client.ip), Flags.OVERFLOW)
            return
        record.shares, record.holder = deps.shares, client.ip  # finished() gives it back
        decision = authorize(view, pod, client.ip, target, None)
        if isinstance(decision, Refuse):
            reset_socket(sock)
            deps.table.finished(record, 0, 0, decision.reason, decision.flags)
            return
        try:
            upstream = deps.socket_factory.upstream(pod, target, client.ip)
            upstream = await sockets.connect(upstream, target, connect_timeout=deps.connect_timeout)
        except OSError as exc:
            reset_socket(sock)
            deps.table.finished(record, 0, 0, str(exc), Flags.UPSTREAM_FAILURE)
            return
        except asyncio.CancelledError:
            reset_socket(sock)
            deps.table.finished(record, 0, 0, "cancelled", Flags.DOWNSTREAM_CLOSED)
            raise
        decision = reauthorize(deps, view, decision, lambda now: authorize(now, pod, client.ip, target, None))
        if isinstance(decision, Refuse):
            upstream.close()
            reset_socket(sock)
            deps.table.finished(record, 0, 0, decision.reason, decision.flags)
            return
        relay = SpliceRelay(sock, upstream)
        record.policy_view = decision.connection
        _track(record, relay)
        deps.table.established(record)
        finish_when_done(deps.table, record, relay)
