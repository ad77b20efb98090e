"""The agent's side of ZDS: hand every enrolled pod's netns to the node's tunnel(s), and know who acked.

Why this module exists: the agent decides which pods are enrolled, but only the tunnel can serve them,
and a pod counts as `enabled` only once a tunnel has acked it (`pending` otherwise: captured, no
traffic). Tunnels come and go (restart, upgrade, hand-over with two running at once), so per connection
this server: waits for the tunnel's hello (version 1, within the deadline); sends the current snapshot,
an Add with the netns fd for every pod the agent hands over and a Keep for the others, each acked
within the deadline, then SnapshotSent. Afterwards `add()` goes to the newest connection only (a
starting tunnel takes over new pods) and `delete()` to all. A connection that breaks, times out or
breaks the protocol is dropped and reported; the listening socket stays up. Every request's waiter gets
an answer whatever fails: a request that cannot be sent (one that does not encode, or a bug) fails alone
when nothing of it reached the tunnel, else its connection is dropped - never an add() waiting forever.

What it deliberately does not do: it keeps no pod list of its own (the caller's `snapshot()` is the
truth, asked once per new connection), it does not open netns files (the caller passes fds; the server
duplicates them while it needs them), and it does not write pod status (it reports acks; the agent
decides enabled/pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from nodeagent.metrics import AgentMetrics
from nodeagent.model import Pod
from nodeagent.zds import wire
from nodeagent.zds.codec import (
    ZDS_VERSION,
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    Workload,
    ZdsClosed,
    ZdsError,
    ZdsProtocolError,
    ZdsTimeout,
    describe,
)
from nodeagent.zds.tasks import TaskSet

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 5.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one request: ok when a tunnel acked it without error; otherwise why not."""

    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class TunnelReady:
    """A tunnel acked the whole snapshot; `acked` are the pods it now serves, `rejected` uid -> its error."""

    peer: str
    acked: frozenset[str]
    rejected: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class TunnelDropped:
    peer: str
    reason: str


ServerEvent = TunnelReady | TunnelDropped
# One pod and the netns fd the agent holds for it (borrowed for the duration of the snapshot() call),
# or None when it has none to give now (the tunnel then gets a Keep: it keeps what it has).
SnapshotEntry = tuple[Pod, int | None]


def workload_of(pod: Pod) -> Workload:
    return Workload(uid=pod.uid, name=pod.name, namespace=pod.namespace, service_account=pod.service_account)


class _Outgoing:
    """A queued request; owns the duplicated netns fd of an Add until it has been sent (or dropped)."""

    __slots__ = ("_owned_fd", "future", "request")

    def __init__(self, request: Request, future: asyncio.Future[Delivery] | None) -> None:
        self.request = request
        self.future = future
        self._owned_fd = request.netns_fd if isinstance(request, AddWorkload) else None

    @property
    def abandoned(self) -> bool:
        return self.future is not None and self.future.cancelled()

    def resolve(self, delivery: Delivery) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(delivery)

    def release(self) -> None:
        if self._owned_fd is not None:
            os.close(self._owned_fd)
            self._owned_fd = None


class _Tunnel:
    """One accepted connection after a valid hello: its queue, its acks, its failure."""

    def __init__(self, channel: wire.ZdsChannel, deadline: float) -> None:
        self.channel = channel
        self.peer = channel.peer
        self.deadline = deadline
        self.acked: set[str] = set()
        self.rejected: dict[str, str] = {}
        self.ready = False
        self.failure: ZdsError | None = None
        self._queue: deque[_Outgoing] = deque()
        self._wakeup = asyncio.Event()
        self._pending: asyncio.Future[Ack] | None = None
        self._sent = False  # the request being exchanged reached the socket

    def enqueue(self, item: _Outgoing) -> None:
        if self.failure is not None:
            item.release()
            item.resolve(Delivery(False, str(self.failure)))
            return
        self._queue.append(item)
        self._wakeup.set()

    def fail(self, exc: ZdsError) -> None:
        """Drop the connection: close it, fail the request in flight and everything queued. Idempotent."""
        if self.failure is not None:
            return
        self.failure = exc
        self.channel.close()
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(exc)
        while self._queue:
            item = self._queue.popleft()
            item.release()
            item.resolve(Delivery(False, str(exc)))
        self._wakeup.set()

    async def read_acks(self) -> None:
        """Runs for the connection's life: acks go to the request in flight; anything else drops it."""
        try:
            while True:
                ack = await self.channel.recv_ack()
                if self._pending is None or self._pending.done():
                    raise ZdsProtocolError(
                        f"{self.peer} sent an Ack with no request outstanding; closing the connection"
                    )
                self._pending.set_result(ack)
        except ZdsError as exc:
            self.fail(exc)

    async def run(self, on_ready: Callable[[_Tunnel], None]) -> None:
        """Send queued requests one at a time, each acked within the deadline. Returns only by raising."""
        while True:
            if self.failure is not None:
                raise self.failure
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = self._queue.popleft()
            self._sent = False
            try:
                if item.abandoned:
                    continue
                ack = await self._exchange(item.request)
            except ZdsError as exc:
                item.resolve(Delivery(False, str(exc)))
                self.fail(exc)
                raise
            except Exception as exc:  # a bug, or a request that cannot be encoded: its waiter must not hang
                why = f"could not send {describe(item.request)} to {self.peer}: {exc!r}"
                item.resolve(Delivery(False, why))
                if self._sent:  # an ack may still come for it: the exchange is out of step, drop the connection
                    self.fail(ZdsProtocolError(why))
                    raise
                log.exception("%s; the connection stays up", why)  # nothing reached the tunnel
                continue
            finally:
                item.release()
            self._record(item.request, ack)
            item.resolve(Delivery(ack.ok, ack.error))
            if isinstance(item.request, SnapshotSent):
                if not ack.ok:
                    log.warning("%s reported an error after the snapshot: %s", self.peer, ack.error)
                self.ready = True
                on_ready(self)

    async def _exchange(self, request: Request) -> Ack:
        pending: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending = pending
        try:
            await self.channel.send_request(request)
            self._sent = True
            async with asyncio.timeout(self.deadline):
                return await pending
        except TimeoutError:
            raise ZdsTimeout(
                f"{self.peer} did not ack {describe(request)} within {self.deadline:g} s; dropping the connection "
                "(is the tunnel stuck or overloaded?)"
            ) from None
        finally:
            self._pending = None

    def _record(self, request: Request, ack: Ack) -> None:
        match request:
            case AddWorkload(workload=Workload(uid=uid)) | KeepWorkload(uid=uid):
                if ack.ok:
                    self.acked.add(uid)
                    self.rejected.pop(uid, None)
                else:
                    self.acked.discard(uid)
                    self.rejected[uid] = ack.error
            case DelWorkload(uid=uid):
                self.acked.discard(uid)
                self.rejected.pop(uid, None)
            case SnapshotSent():
                pass


class ZdsServer:
    """Listen on `path` for tunnels and keep each one told about the node's pods.

    `snapshot()` returns the pods the agent currently enrolls, each with its netns fd or None; it is
    called once per tunnel connection, right after the hello. `on_event` hears TunnelReady and
    TunnelDropped (after the server's own logging). `deadline` bounds the hello and every ack. `metrics`
    counts accepted connections and shows how many tunnels are connected (None: a registry of its own).
    """

    def __init__(
        self,
        snapshot: Callable[[], Iterable[SnapshotEntry]],
        path: str = wire.DEFAULT_SOCKET_PATH,
        *,
        deadline: float = DEFAULT_DEADLINE,
        on_event: Callable[[ServerEvent], None] | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.path = path
        self._metrics = metrics if metrics is not None else AgentMetrics(CollectorRegistry())
        self._snapshot = snapshot
        self._deadline = deadline
        self._on_event = on_event
        self._tasks = TaskSet(log)
        self._tunnels: list[_Tunnel] = []
        self._listener: socket.socket | None = None
        self._inode: int | None = None

    async def __aenter__(self) -> ZdsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the socket (parent directory created, stale socket replaced, mode 0600) and accept."""
        self._listener = wire.listen(self.path)
        self._inode = os.stat(self.path).st_ino
        self._tasks.spawn(self._accept_loop(self._listener), name=f"zds-server-accept {self.path}")
        log.info("ZDS server listening on %s", self.path)

    async def close(self) -> None:
        """Stop accepting, drop every tunnel connection, and remove the socket if it is still ours."""
        await self._tasks.cancel_all()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == self._inode:  # a newer agent may have replaced it
                    os.unlink(self.path)

    @property
    def tunnels(self) -> tuple[str, ...]:
        """The connected tunnels (after their hello), oldest first."""
        return tuple(t.peer for t in self._tunnels)

    def acked_uids(self) -> frozenset[str]:
        """Pods the current tunnel (the newest one that acked its snapshot) serves; empty without one."""
        for tunnel in reversed(self._tunnels):
            if tunnel.ready:
                return frozenset(tunnel.acked)
        return frozenset()

    async def add(self, pod: Pod, netns_fd: int) -> Delivery:
        """Send Add to the newest tunnel and wait for its ack. `netns_fd` stays the caller's.

        Not ok when no tunnel is connected, the tunnel answered with an error, or the connection dropped
        first; the pod then stays pending until a tunnel acks it (the next tunnel gets it in its snapshot).
        """
        tunnel = next((t for t in reversed(self._tunnels) if t.failure is None), None)
        if tunnel is None:
            return Delivery(False, f"no tunnel is connected to {self.path}; the pod stays pending until one is")
        item = _Outgoing(AddWorkload(workload_of(pod), os.dup(netns_fd)), asyncio.get_running_loop().create_future())
        tunnel.enqueue(item)
        assert item.future is not None
        return await item.future

    async def delete(self, uid: str) -> None:
        """Send Del to every connected tunnel and wait for their acks (failures are logged and dropped)."""
        loop = asyncio.get_running_loop()
        items = [(t, _Outgoing(DelWorkload(uid), loop.create_future())) for t in self._tunnels if t.failure is None]
        for tunnel, item in items:
            tunnel.enqueue(item)
        for tunnel, item in items:
            assert item.future is not None
            delivery = await item.future
            if not delivery.ok:
                log.warning("%s did not remove pod %s: %s", tunnel.peer, uid, delivery.error)

    # -- connections -------------------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        serial = 0
        while True:
            try:
                channel = await wire.accept(listener, self.path, serial + 1)
            except OSError as exc:  # EMFILE and friends: keep listening, do not spin
                log.warning("accepting a tunnel connection on %s failed: %s", self.path, exc)
                await asyncio.sleep(0.1)
                continue
            serial += 1
            self._metrics.tunnel_accepted()
            self._tasks.spawn(self._serve(channel, serial), name=f"zds-server-conn {serial}")

    async def _serve(self, channel: wire.ZdsChannel, serial: int) -> None:
        tunnel: _Tunnel | None = None
        shutdown = "the node agent is shutting down"
        reason = shutdown
        quiet = False  # an expected goodbye: logged at INFO
        try:
            try:
                async with asyncio.timeout(self._deadline):
                    version = await channel.recv_hello()
            except TimeoutError:
                raise ZdsTimeout(
                    f"{channel.peer} sent no ZdsHello within {self._deadline:g} s; closing the connection"
                ) from None
            except ZdsClosed:
                quiet = True
                raise ZdsClosed(
                    "it closed the connection before its ZdsHello, so it was no tunnel: a node agent starting "
                    "beside this one (a rolling update) checks that this one still listens before taking the "
                    "socket over"
                ) from None
            if version != ZDS_VERSION:
                raise ZdsProtocolError(
                    f"{channel.peer} speaks ZDS version {version}, this agent only version {ZDS_VERSION}; "
                    "run a tunnel and an agent that speak the same version"
                )
            tunnel = _Tunnel(channel, self._deadline)
            # Snapshot and registration happen in one step (no await in between): every add() after this
            # point reaches this tunnel after its snapshot, every pod known before it is in the snapshot.
            items = self._snapshot_items()
            for item in items:
                tunnel.enqueue(item)
            tunnel.enqueue(_Outgoing(SnapshotSent(), None))
            self._tunnels.append(tunnel)
            self._metrics.tunnels_connected(len(self._tunnels))
            log.info("%s connected; sending a snapshot of %d pods", channel.peer, len(items))
            reader = self._tasks.spawn(tunnel.read_acks(), name=f"zds-server-conn {serial} reader")
            try:
                await tunnel.run(self._ready)
            finally:
                reader.cancel()
        except ZdsError as exc:
            reason = str(exc)
        except Exception as exc:  # a bug or a bad snapshot(): drop this connection, keep serving others
            log.exception("ZDS connection %s failed", channel.peer)
            reason = f"internal error: {exc!r}"
        finally:
            if tunnel is not None:
                tunnel.fail(ZdsClosed(reason))
                self._tunnels.remove(tunnel)
                self._metrics.tunnels_connected(len(self._tunnels))
            channel.close()
            level = logging.INFO if reason is shutdown or quiet else logging.WARNING
            log.log(level, "dropped %s: %s", channel.peer, reason)
            self._emit(TunnelDropped(channel.peer, reason))

    def _snapshot_items(self) -> list[_Outgoing]:
        items: list[_Outgoing] = []
        try:
            for pod, fd in self._snapshot():
                request = KeepWorkload(pod.uid) if fd is None else AddWorkload(workload_of(pod), os.dup(fd))
                items.append(_Outgoing(request, None))
        except BaseException:
            for item in items:
                item.release()
            raise
        return items

    def _ready(self, tunnel: _Tunnel) -> None:
        log.info(
            "%s acked the snapshot: %d pods served, %d rejected", tunnel.peer, len(tunnel.acked), len(tunnel.rejected)
        )
        self._emit(TunnelReady(tunnel.peer, frozenset(tunnel.acked), dict(tunnel.rejected)))

    def _emit(self, event: ServerEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("the ZDS event handler failed on %s", event)
