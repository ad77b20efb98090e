"""Outbound: connections captured on a local pod's :15001, carried out according to routing's plan.

Why this module exists: "decide, then act". For each captured connection this module reads the
original destination (the socket factory's edge: SO_ORIGINAL_DST in pods), asks the pure
`routing.plan_outbound` what to do with the current cluster view, and executes the plan:

- `Hbone`: a CONNECT stream on a pooled mTLS connection to the destination pod's :15008 (pool.py),
  presenting the *source* workload's certificate and accepting only the destination's SPIFFE ID
  (tls.verify_server_peer). Whatever the client has already sent when its connection is handled (up
  to one TLS record, `EARLY_MAX`) goes with the CONNECT, in the same record: the destination's tunnel
  — the peer whose SPIFFE ID was just verified — holds it until its own 200 and drops it otherwise
  (REFERENCE.md: never forwarded upstream before the 200). A client-first protocol (HTTP) so reaches
  the server one tunnel round trip sooner, and the pair writes and reads one TLS record less. The rest
  is relayed onto the stream after the 200;
- `Passthrough`: plain TCP from the pod's netns to the original destination, spliced;
- `Denial`: the captured connection is reset and the reason logged.

The connection is attributed to the source pod's own IP (`routing.source_address`), never to another local
address the app bound its socket to (127.0.0.1 under eBPF capture): that address is what the same-node
path authorizes and what the destination app sees as its peer.

An `Hbone` plan whose destination pod this tunnel serves itself goes to local.py's same-node path
instead (authorized here with the source's identity, spliced by the kernel), when the tunnel enables it.

`HboneConnector` is the pool's connect edge: socket from the source pod (so the HBONE connection's
source IP is the pod's), TCP connect, TLS handshake without SNI, then the peer check, and the
connection's `Trust` (until when it may take new streams: both certificates valid, the same bundle).

Every pod shares this one process's file descriptors: a captured connection counts against its pod's
share (fdshare.py) until it is finished (its relay ends, half-closed ones too; the record carries the
count); while the descriptors are under pressure, a pod over its share has its new connections reset
(response flag UO in the access log and metrics), with a warning at most once a minute per pod.

What it deliberately does not do: no decisions of its own (routing.py), no authorization (the
destination decides), no retries (a failed connect resets the captured connection; the app retries), no
idle timeouts (as ztunnel: an open connection lives as long as its two ends keep it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time

from nodeagent.model import SocketAddress
from nodeagent.ztunnel import hbone, sockets, tls
from nodeagent.ztunnel.edges import LocalPod
from nodeagent.ztunnel.hbone_transport import HboneProtocol
from nodeagent.ztunnel.inbound import (
    ProxyDeps,
    _addr,
    _track,
    accept_loop,
    connection_trust,
    finish_when_done,
    reset_socket,
)
from nodeagent.ztunnel.local import SameNodePath
from nodeagent.ztunnel.metrics import ConnectionRecord, Direction, Flags, Peer
from nodeagent.ztunnel.pool import HbonePool
from nodeagent.ztunnel.relay import DOWNSTREAM, UPSTREAM, Relay, SpliceRelay, tcp_side
from nodeagent.ztunnel.routing import Denial, Hbone, Passthrough, PoolKey, plan_outbound, source_address

log = logging.getLogger(__name__)

OVER_SHARE_WARN_EVERY = 60.0  # seconds between two warnings about one pod over its descriptor share
EARLY_MAX = 16 * 1024 - 64  # the CONNECT's HEADERS frame and the early DATA frame share one TLS record


def _early_bytes(sock: socket.socket) -> bytes:
    """What the client has sent so far (b"" if nothing yet), without waiting. An EOF read here is seen
    again by the relay's own read later (a TCP FIN stays readable)."""
    try:
        return sock.recv(EARLY_MAX, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return b""


class HboneConnector:
    """Open and verify one outbound HBONE connection for a pool key (the pool's connect edge)."""

    def __init__(self, deps: ProxyDeps, hbone_port: int = sockets.HBONE_PORT) -> None:
        self._deps = deps
        self._hbone_port = hbone_port
        self.pool: HbonePool | None = None  # set by whoever builds the pool, for idle tracking

    async def __call__(self, key: PoolKey, pod: LocalPod) -> HboneProtocol:
        deps = self._deps
        ctx = deps.contexts.context(key.source_identity, server_side=False)
        dest = SocketAddress(key.destination.ip, self._hbone_port)
        sock = deps.socket_factory.outbound(pod, dest)
        sock = await sockets.connect(sock, dest, connect_timeout=deps.connect_timeout)
        pool = self.pool

        def factory() -> HboneProtocol:
            return HboneProtocol(
                hbone.Role.CLIENT,
                limits=deps.limits,
                on_idle=pool.on_idle if pool is not None else None,
                on_closed=lambda _: deps.metrics.hbone_connections.labels("client").dec(),
            )

        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(
                factory, sock=sock, ssl=ctx, server_hostname="", ssl_handshake_timeout=deps.handshake_timeout
            )
        except BaseException:
            sock.close()
            raise
        deps.metrics.hbone_connections.labels("client").inc()
        try:
            tls.verify_server_peer(proto.peer_ssl(), key.destination_identity)  # type: ignore[arg-type]
            proto.trust = connection_trust(deps, proto, key.source_identity, server_side=False)
        except tls.PeerVerificationError as exc:
            deps.metrics.peer_failures.labels(reason=exc.reason.value).inc()
            proto.abort(str(exc))
            raise ConnectionRefusedError(f"HBONE peer {dest} is not acceptable: {exc}") from None
        return proto


class Outbound:
    """The :15001 listeners of every local pod share one pool and one executor of plans."""

    def __init__(self, deps: ProxyDeps, pool: HbonePool, same_node: SameNodePath | None = None) -> None:
        self._deps = deps
        self.pool = pool
        self.same_node = same_node  # None: same-node destinations take HBONE like any other
        self._balance = itertools.count()
        self._warned: dict[str, float] = {}  # pod uid -> when it was last warned of being over its share

    async def serve(self, pod: LocalPod, listener: socket.socket) -> None:
        spawn, name = self._deps.tasks.spawn, f"outbound {pod.key}"
        await accept_loop(listener, lambda sock: spawn(self._handle(pod, sock), name=name))

    def _over_share(self, pod: LocalPod) -> str:
        """Count a refusal for being over its share; warn at most once a minute per pod. The reason."""
        deps = self._deps
        deps.metrics.refused_over_share.labels("outbound").inc()
        now = time.monotonic()
        if now - self._warned.get(pod.uid, -OVER_SHARE_WARN_EVERY) >= OVER_SHARE_WARN_EVERY:
            # Forget pods warned long ago (they may have left): this runs at most once a minute per pod.
            self._warned = {uid: t for uid, t in self._warned.items() if now - t < OVER_SHARE_WARN_EVERY}
            self._warned[pod.uid] = now
            log.warning(
                "pod %s has %d connections open through the tunnel while the tunnel's file descriptors run "
                "short: resetting its new ones until some end — is it leaking connections, or holding ones its "
                "servers never close?",
                pod.key,
                deps.shares.held(pod.uid),
            )
        return f"pod {pod.key} holds more than its share of the tunnel's file descriptors, which are running short"

    async def _handle(self, pod: LocalPod, sock: socket.socket) -> None:
        deps = self._deps
        view = deps.state.view
        try:
            client = _addr(sock.getpeername())
            original = deps.socket_factory.original_dst(sock)
        except (OSError, ValueError) as exc:
            log.info("dropping a captured connection of %s: %s", pod.key, exc)
            reset_socket(sock)
            return
        source = view.pod_of(pod)
        if source is not None and client is not None:
            client = source_address(source, client)
        plan = (
            plan_outbound(view.routing, source, original, balance=next(self._balance))
            if source is not None
            else Denial(f"pod {pod.key} is not in the inventory (yet); its traffic cannot be routed")
        )
        dst_workload = view.workload_at(plan.target.ip) if not isinstance(plan, Denial) else None
        record = ConnectionRecord(
            Direction.OUTBOUND,
            src_addr=str(client),
            dst_addr=str(original if isinstance(plan, Denial) else plan.target),
            original_addr=str(original),
            src=Peer.of(source, pod.identity, view.cluster),
            dst=Peer.of(
                dst_workload.pod if dst_workload else None,
                plan.expected_identity if isinstance(plan, Hbone) else None,
                view.cluster,
            ),
            service=None if isinstance(plan, Denial) else plan.service,
            hbone_addr=str(plan.pool_key.destination) if isinstance(plan, Hbone) else "",
            mutual_tls=isinstance(plan, Hbone),
        )
        deps.table.pending(record)
        if isinstance(plan, Denial):
            reset_socket(sock)
            deps.table.finished(record, 0, 0, plan.reason, Flags.NO_ROUTE)
            return
        if not deps.shares.admit(pod.uid, sock.fileno()):
            reset_socket(sock)
            deps.table.finished(record, 0, 0, self._over_share(pod), Flags.OVERFLOW)
            return
        record.shares, record.holder = deps.shares, pod.uid  # finished() gives it back
        try:
            if isinstance(plan, Passthrough):
                await self._passthrough(pod, sock, plan, record)
            elif self.same_node and client and (local := self.same_node.destination(plan, dst_workload)):
                await self.same_node.deliver(sock, client, plan, local, record)  # no HBONE to ourselves
            else:
                await self._hbone(pod, sock, plan, record)
        except asyncio.CancelledError:
            if not record.established:
                reset_socket(sock)
                deps.table.finished(record, 0, 0, "cancelled", Flags.DOWNSTREAM_CLOSED)
            raise

    async def _passthrough(
        self, pod: LocalPod, sock: socket.socket, plan: Passthrough, record: ConnectionRecord
    ) -> None:
        deps = self._deps
        try:
            upstream = deps.socket_factory.outbound(pod, plan.target)
            upstream = await sockets.connect(upstream, plan.target, connect_timeout=deps.connect_timeout)
        except OSError as exc:
            reset_socket(sock)
            deps.table.finished(record, 0, 0, str(exc), Flags.UPSTREAM_FAILURE)
            return
        relay = SpliceRelay(sock, upstream)
        _track(record, relay)
        deps.table.established(record)
        finish_when_done(deps.table, record, relay)

    async def _hbone(self, pod: LocalPod, sock: socket.socket, plan: Hbone, record: ConnectionRecord) -> None:
        deps = self._deps
        request = hbone.ConnectRequest(plan.target, forwarded=f'for="{record.src_addr}"')
        try:
            early = _early_bytes(sock)
            stream, _ = await self.pool.open_stream(plan.pool_key, request, pod, early)
        except (OSError, TimeoutError, hbone.HboneError, Exception) as exc:
            reset_socket(sock)
            status = getattr(exc, "status", None)
            flags = Flags.DENIED if status == 401 else Flags.UPSTREAM_FAILURE
            if isinstance(exc, TimeoutError) and not str(exc):  # connecting timed out (not the answer)
                exc = TimeoutError(
                    f"timed out connecting to {plan.pool_key.destination} — is a NetworkPolicy blocking the HBONE port?"
                )
            log.info("outbound %s -> %s failed: %s", record.src_addr, plan.target, exc)
            deps.table.finished(record, 0, 0, str(exc) or type(exc).__name__, flags)
            return
        relay = Relay(bytes_in=len(early))
        stream.attach(relay.leg(UPSTREAM))
        try:
            down = await tcp_side(sock, relay.leg(DOWNSTREAM))
        except OSError as exc:
            stream.abort()
            deps.table.finished(record, 0, 0, str(exc), Flags.DOWNSTREAM_CLOSED)
            return
        relay.start(down, stream)
        _track(record, relay)
        deps.table.established(record)
        finish_when_done(deps.table, record, relay)
