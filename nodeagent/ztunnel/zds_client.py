"""The tunnel's side of ZDS: learn the node's pods (with their netns fds) from the node agent.

Why this module exists: the tunnel serves pods it never discovers itself; the agent hands each one over
on its unix socket. This client connects, says hello, applies every Add/Keep/Del through the tunnel's
handler and acks it (with the handler's error, if it raised), and after SnapshotSent tells the handler
which pods the agent still knows, so the tunnel drops the rest. When the agent goes away (restart,
upgrade) the client reconnects with backoff while the tunnel keeps serving the pods it has: the agent's
next snapshot reconciles them.

What it deliberately does not do: it holds no pod state (the handler does), opens no listeners, and
never enters a netns; a netns fd is lent to `on_add` for the duration of the call and closed afterwards
(dup it to keep it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from nodeagent.zds import wire
from nodeagent.zds.codec import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    Workload,
    ZdsError,
    ZdsProtocolError,
    describe,
)
from nodeagent.zds.tasks import TaskSet

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 250


class WorkloadHandler(Protocol):
    """What the tunnel does with the agent's requests. An exception becomes the Ack's error text."""

    async def on_add(self, workload: Workload, netns_fd: int) -> None:
        """Serve this pod (again, if known: an Add for a known uid replaces it). The fd is lent."""

    async def on_keep(self, uid: str) -> None:
        """The agent has no netns for this pod but it still exists: keep serving it if already known."""

    async def on_del(self, uid: str) -> None:
        """Stop serving this pod."""

    async def on_snapshot_done(self, known_uids: frozenset[str]) -> None:
        """The snapshot is complete: drop every pod not in `known_uids`."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: initial, doubling per failed attempt, capped at maximum (seconds)."""

    initial: float = 0.1
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        return float(min(self.maximum, self.initial * 2 ** min(attempt, 32)))


class ZdsClient:
    """Keep the tunnel attached to the node agent at `path`; start() it, close() it.

    `ready` becomes true with the first complete snapshot and stays true across reconnects (the tunnel
    keeps serving what it has); `synced` is true only while the current connection has delivered its
    snapshot.
    """

    def __init__(
        self, handler: WorkloadHandler, path: str = wire.DEFAULT_SOCKET_PATH, *, backoff: Backoff = Backoff()
    ) -> None:
        self.path = path
        self._handler = handler
        self._backoff = backoff
        self._tasks = TaskSet(log)
        self._ready = asyncio.Event()
        self.synced = False

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def start(self) -> None:
        self._tasks.spawn(self.run(), name=f"zds-client {self.path}")

    async def close(self) -> None:
        await self._tasks.cancel_all()

    async def run(self) -> None:
        """Connect, serve, reconnect; forever (until cancelled)."""
        attempt = 0
        while True:
            try:
                channel = await wire.connect(self.path)
            except ZdsError as exc:
                (log.warning if attempt == 0 else log.debug)("%s; retrying", exc)
            else:
                log.info("connected to the node agent at %s", self.path)
                try:
                    await self._session(channel)
                except ZdsError as exc:
                    log.warning("ZDS session ended: %s; reconnecting, the tunnel keeps its pods meanwhile", exc)
                except Exception:  # a bug here must not leave a tunnel that looks ready but hears nothing
                    log.exception("ZDS session with %s failed; reconnecting", self.path)
                finally:
                    channel.close()
                    if self.synced:
                        attempt = 0
                    self.synced = False
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _session(self, channel: wire.ZdsChannel) -> None:
        await channel.send_hello()
        known: set[str] | None = set()  # uids named by the snapshot; None once it is complete
        while True:
            request = await channel.recv_request()
            if known is not None:
                match request:
                    case AddWorkload(workload=Workload(uid=uid)) | KeepWorkload(uid=uid):
                        known.add(uid)
                    case DelWorkload(uid=uid):
                        known.discard(uid)
                    case SnapshotSent():
                        pass
            elif isinstance(request, SnapshotSent):
                raise ZdsProtocolError(
                    f"{channel.peer} sent a second SnapshotSent on one connection; reconnecting for a fresh snapshot"
                )
            ack = await self._apply(request, frozenset(known or ()))
            if isinstance(request, SnapshotSent):
                known = None
                if ack.ok:
                    self.synced = True
                    self._ready.set()
                    log.info("snapshot from %s applied; the tunnel is in sync", channel.peer)
            await channel.send_ack(ack)

    async def _apply(self, request: Request, known: frozenset[str]) -> Ack:
        try:
            match request:
                case AddWorkload(workload=workload, netns_fd=fd):
                    try:
                        await self._handler.on_add(workload, fd)
                    finally:
                        os.close(fd)
                case KeepWorkload(uid=uid):
                    await self._handler.on_keep(uid)
                case DelWorkload(uid=uid):
                    await self._handler.on_del(uid)
                case SnapshotSent():
                    await self._handler.on_snapshot_done(known)
        except Exception as exc:  # the handler's failure is the agent's to know: it keeps the pod pending
            log.warning("applying %s failed: %r", describe(request), exc)
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            # An Ack must fit one 1024-byte datagram; 250 characters do even at 4 UTF-8 bytes each.
            return Ack(error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…")
        return Ack()
