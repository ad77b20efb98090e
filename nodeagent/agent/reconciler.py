"""The per-pod reconciler: make each of the node's pods captured (or not) as decided, one pod at a time.

Why this module exists: enrollment changes, periodic verification and tunnel events all end in the same
question per pod - "does the kernel hold what this pod needs, and does a tunnel serve it?" Answering it
in one place, serialized per pod uid (one worker per uid, repeated requests coalesce), makes add and
remove idempotent and race-free without a global lock, while different pods proceed in parallel
(bounded by a semaphore, since each step forks iptables).

For an enrolled pod: resolve its netns; install capture (the backend reads the kernel first, so a pod
captured by a previous agent run is adopted untouched, and drift is repaired and logged); hold an fd of
the netns; hand it to the tunnel with a ZDS Add (after capture: without a tunnel the pod is captured and
refused - fail closed). For a pod that is no longer enrolled: remove capture, Del to every tunnel, close
the fd. Status is derived, never stored: FAILED while capture is incomplete, ENABLED when the tunnel's
ack is recorded, PENDING otherwise. Drift repaired on a captured pod and every failed install or removal
are counted (metrics.AgentMetrics, by backend and by operation: never by pod).

Removal is careful about whose netns it touches. A departed pod's netns is the one the agent holds, not
looked up again: its IP may already be another pod's, and the Kubernetes resolver finds netns by IP. When
that netns is gone, only what the backend keeps by uid outside it is removed (eBPF pins). Finished pods
are never swept (their status keeps an IP the node may have handed on), and no netns of a pod the agent
holds or wants is ever cleaned for another pod, nor the agent's own (the node's) for any pod. At start-up
the backend's per-uid state of pods that no longer exist (deleted while the agent was down) is removed
too. A leftover whose removal fails (the xtables lock, a netns being torn down) is kept and retried with
every verify until it goes: a stray left captured has no tunnel serving it, so all its TCP is refused.

The netns a resolver names is checked, not trusted: the agent's own (the node's) is never captured nor
handed to a tunnel as a pod's (a /proc/<pid>/ns/net path whose pid was reused can name it).

What it deliberately does not do: no decisions about who is enrolled (enrollment.py), no kernel details
(capture backend), no socket of its own (the ZDS server is injected), and it never flushes or re-applies
a pod's rules that already agree with the desired state.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry

from nodeagent.agent.enrollment import Status, status_of
from nodeagent.agent.netns_resolver import NetnsResolver
from nodeagent.agent.zds_server import Delivery, SnapshotEntry
from nodeagent.capture.backend import CaptureBackend, CaptureError
from nodeagent.metrics import AgentMetrics
from nodeagent.model import Pod
from nodeagent.netns import netns_inode
from nodeagent.zds.tasks import TaskSet

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16
# Periodic verification runs in its own narrow lane: it may take a while on a full node, but it never
# holds the slots that enrolling a new pod needs.
VERIFY_CONCURRENCY = 2


class Tunnels(Protocol):
    """The part of nodeagent.agent.zds_server.ZdsServer the reconciler uses."""

    async def add(self, pod: Pod, netns_fd: int) -> Delivery: ...

    async def delete(self, uid: str) -> None: ...

    def acked_uids(self) -> frozenset[str]: ...

    @property
    def tunnels(self) -> tuple[str, ...]: ...


@dataclass
class PodRecord:
    """What the agent holds for one pod it captured (or tried to)."""

    pod: Pod
    netns: str | None = None
    fd: int | None = None
    fd_inode: int | None = None
    captured: bool = False  # capture was complete at the last check
    error: str | None = None  # why capture is not complete, if it is not
    delivered: bool = False  # an Add for the current netns fd was acked by a tunnel


class Reconciler:
    def __init__(
        self,
        backend: CaptureBackend,
        resolver: NetnsResolver,
        tunnels: Tunnels,
        *,
        on_change: Callable[[], None],
        concurrency: int = DEFAULT_CONCURRENCY,
        own_netns: str = "/proc/self/ns/net",
        metrics: AgentMetrics | None = None,
    ) -> None:
        """`metrics`: where repairs and failed capture operations are counted (None: a registry of its own)."""
        self._backend = backend
        self._metrics = metrics if metrics is not None else AgentMetrics(CollectorRegistry())
        self._own_netns = netns_inode(own_netns)  # the agent's (the node's): never a pod's
        self._resolver = resolver
        self._tunnels = tunnels
        self._on_change = on_change
        self._kernel_slots = asyncio.Semaphore(concurrency)
        self._verify_slots = asyncio.Semaphore(VERIFY_CONCURRENCY)
        self._urgent: set[str] = set()  # dirty because something changed, not just due for verification
        self._desired: dict[str, Pod] = {}
        self._strays: dict[str, Pod] = {}  # not enrolled, maybe captured by an earlier run: remove if so
        self._orphans: set[str] = set()  # uids the backend keeps state for whose pods no longer exist
        self.records: dict[str, PodRecord] = {}
        self._dirty: set[str] = set()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._closed = False  # close() ran: events that arrive later (a tunnel leaving) start no worker
        self._tasks = TaskSet(log)
        self._idle = asyncio.Event()
        self._idle.set()
        self.probe_changed = asyncio.Event()  # set when the set of captured pods (or their IPs) changed

    # --- what callers ask for ---------------------------------------------------------------------------

    def set_desired(self, desired: Mapping[str, Pod]) -> None:
        """The pods to capture now (uid -> pod): changed, new and departed pods are reconciled."""
        changed = {uid for uid, pod in desired.items() if self._desired.get(uid) != pod}
        changed |= set(self._desired) - set(desired)
        self._desired = dict(desired)
        self._urgent |= changed
        self._kick(changed)

    def sweep(self, pods: Iterable[Pod], node: str) -> None:
        """Remove what an earlier run may have left; once, at start-up. `pods`: every pod the workload
        source knows. Capture goes from `node`'s live pods that are not enrolled, and the backend's per-uid
        state from pods that are not alive: live pods of other nodes count as alive (the lab's nodes share
        one bpffs, and another node's pins are its own agent's)."""
        live = {p.uid: p for p in pods if not p.terminated}
        strays = {
            uid: p for uid, p in live.items() if p.node == node and uid not in self._desired and not p.host_network
        }
        orphans = set(self._backend.kept_uids()) - set(live) - set(self._desired)
        self._strays.update(strays)
        self._orphans |= orphans
        self._kick(set(strays) | orphans)

    def wants(self, uid: str) -> bool:
        """Whether the pod is one to capture (in the last set_desired)."""
        return uid in self._desired

    def use_resolver(self, resolver: NetnsResolver) -> None:
        """Find pods' netns with `resolver` from now on (Kubernetes mode: by pod IP); set it before the
        first reconcile, since records already held keep the netns they were resolved to."""
        self._resolver = resolver

    def verify_all(self) -> None:
        """Re-check every pod the agent holds or wants (the periodic drift check), and retry the removal of
        what an earlier run left that failed so far (a stray stays captured, refused, until it goes)."""
        self._kick(set(self._desired) | set(self.records) | set(self._strays) | self._orphans)

    async def wait_idle(self) -> None:
        """Until no pod has work queued or running (readiness after the first pass)."""
        await self._idle.wait()

    def status(self, uid: str) -> Status:
        record = self.records[uid]
        return status_of(record.error, record.delivered and uid in self._tunnels.acked_uids())

    def snapshot(self) -> list[SnapshotEntry]:
        """For a newly connected tunnel (ZdsServer's snapshot()): every captured pod with its netns fd (Add),
        and every other pod still enrolled as a Keep (REFERENCE.md: Keep when the agent has no netns to give):
        its netns is not found right now, or its capture is being repaired. Left out, it would be dropped by
        a tunnel that serves it - no traffic until the agent's next pass - though it is still enrolled."""
        return [(r.pod, r.fd if r.captured else None) for uid, r in self.records.items() if uid in self._desired]

    def on_tunnel_ready(self, acked: frozenset[str]) -> None:
        """A tunnel acked its snapshot: the pods in it are delivered."""
        for uid, record in self.records.items():
            record.delivered = record.captured and uid in acked
        self._on_change()

    def on_tunnel_dropped(self) -> None:
        """A tunnel went away. An Add goes to the newest tunnel only, so pods added while a newer tunnel ran
        beside an older one (a hand-over) were given to the newer alone: if that one leaves, they go to the
        one that is now the newest, at once (or to the next tunnel's snapshot when none is left)."""
        served = self._tunnels.acked_uids()
        lost = {uid for uid, record in self.records.items() if record.delivered and uid not in served}
        for uid in lost:
            self.records[uid].delivered = False
        if lost and self._tunnels.tunnels:  # (none left: the next tunnel's snapshot brings them)
            log.info("a tunnel left; %d pods only it served go to the newest tunnel", len(lost))
            self._urgent |= lost  # they pass no traffic meanwhile: the wide lane, not the verify lane
            self._kick(lost)
        self._on_change()

    def probe_targets(self) -> dict[str, ipaddress.IPv4Address]:
        """pod key -> IP of every captured pod: what the node's kubelet-probe bypass must cover."""
        return {r.pod.key: r.pod.ip for r in self.records.values() if r.captured and r.pod.ip is not None}

    async def close(self) -> None:
        """Stop every worker and close every netns fd; capture stays in the kernel (it survives restarts)."""
        self._closed = True
        await self._tasks.cancel_all()
        for record in self.records.values():
            _close(record)

    # --- workers ------------------------------------------------------------------------------------------

    def _kick(self, uids: set[str]) -> None:
        if self._closed:
            return
        self._dirty |= uids
        for uid in uids:
            if uid not in self._workers:
                self._idle.clear()
                self._workers[uid] = self._tasks.spawn(self._work(uid), name=f"pod {uid}")

    async def _work(self, uid: str) -> None:
        try:
            while uid in self._dirty:
                self._dirty.discard(uid)
                urgent = uid in self._urgent
                self._urgent.discard(uid)
                try:
                    await self._reconcile(uid, self._kernel_slots if urgent else self._verify_slots)
                except Exception:  # a bug must not stop other pods or this pod's next attempt
                    log.exception("reconciling pod %s failed; the next verify retries", uid)
        finally:
            del self._workers[uid]
            if not self._workers:
                self._idle.set()

    async def _reconcile(self, uid: str, slots: asyncio.Semaphore) -> None:
        pod = self._desired.get(uid)
        record = self.records.get(uid)
        if pod is not None:
            self._strays.pop(uid, None)  # enrolled again: what an earlier run left is adopted, not removed
            self._orphans.discard(uid)
            if record is None:
                record = self.records[uid] = PodRecord(pod)
            await self._ensure(record, pod, slots)
        elif record is not None:
            await self._remove(record, slots)
        elif uid in self._strays:  # kept until its removal succeeds: verify_all retries it
            gone = await self._remove_stray(self._strays[uid], slots)
            if gone:
                del self._strays[uid]
        elif uid in self._orphans:
            gone = await self._forget_orphan(uid, slots)
            if gone:
                self._orphans.discard(uid)
        self._on_change()

    async def _ensure(self, record: PodRecord, pod: Pod, slots: asyncio.Semaphore) -> None:
        changed_pod = record.pod != pod
        if changed_pod and record.pod.ip != pod.ip:
            self.probe_changed.set()
        record.pod = pod
        netns = self._resolver.resolve(pod)
        if netns is None:
            record.error = f"no network namespace for {pod.key} yet; capture waits for it"
            record.captured = record.delivered = False
            _close(record)
            return
        reopened = self._hold_netns(record, netns)
        if record.fd_inode == self._own_netns:  # a resolver's mistake (a reused /proc/<pid>): fail, never capture
            error = f"{netns} is the agent's own network namespace (the node's), not {pod.key}'s: not capturing it"
            if record.error != error:
                log.error("%s; capture waits for the pod's own", error)
            record.error = error
            record.captured = record.delivered = False
            _close(record)
            return
        started = time.perf_counter()
        try:
            async with slots:
                repaired = await self._backend.install(pod, netns)
        except CaptureError as exc:
            self._metrics.failed("install")
            if record.error != str(exc):
                log.error("cannot capture %s: %s", pod.key, exc)
            record.error = str(exc)
            record.captured = False
            return
        first = not record.captured or reopened  # a new netns (a restarted sandbox) is captured anew, not repaired
        if repaired and not first:
            self._metrics.repaired(self._backend.name)
            log.warning("capture drift in %s repaired: %s", pod.key, "; ".join(repaired))
        elif first:  # with the time it took (slot wait included): the largest share of a pod add's latency
            how = "captured" if repaired else "adopted (capture already complete in the kernel)"
            log.info("%s %s in %.0f ms", pod.key, how, (time.perf_counter() - started) * 1e3)
        record.error = None
        record.captured = True
        if first:
            self.probe_changed.set()
        if first or reopened or changed_pod or (not record.delivered and self._tunnels.tunnels):
            await self._deliver(record)

    def _hold_netns(self, record: PodRecord, netns: str) -> bool:
        """Keep an fd of the pod's current netns; True when it is new (first time, or the pod's netns changed)."""
        inode = os.stat(netns).st_ino
        if record.fd is not None and record.netns == netns and record.fd_inode == inode:
            return False
        _close(record)
        record.fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        record.netns, record.fd_inode = netns, os.fstat(record.fd).st_ino
        record.delivered = False
        return True

    async def _deliver(self, record: PodRecord) -> None:
        assert record.fd is not None
        delivery = await self._tunnels.add(record.pod, record.fd)
        record.delivered = delivery.ok
        if not delivery.ok:
            log.info("%s is pending: %s", record.pod.key, delivery.error)

    async def _remove(self, record: PodRecord, slots: asyncio.Semaphore) -> None:
        pod = record.pod
        try:
            async with slots:
                await self._release(pod, self._netns_to_clean(record))
        except CaptureError as exc:
            self._metrics.failed("remove")
            log.error("cannot remove the capture of %s: %s; retrying with the next verify", pod.key, exc)
            record.error = str(exc)
            return
        await self._tunnels.delete(pod.uid)
        _close(record)
        del self.records[pod.uid]
        if record.captured:
            self.probe_changed.set()
        log.info("%s released: capture removed", pod.key)

    def _netns_to_clean(self, record: PodRecord) -> str | None:
        """The departed pod's netns: the one the agent holds while its path still names it, else none (the
        pod is gone); looked up only when the agent never held one."""
        if record.fd is None:
            return self._resolver.resolve(record.pod)
        if record.netns is not None and netns_inode(record.netns) == record.fd_inode:
            return record.netns
        return None

    async def _remove_stray(self, pod: Pod, slots: asyncio.Semaphore) -> bool:
        """Remove the capture an earlier run left for `pod`; False when that failed (the next verify retries)."""
        try:
            async with slots:
                removed = await self._release(pod, self._resolver.resolve(pod))
        except CaptureError as exc:
            self._metrics.failed("remove")
            log.error("cannot remove the leftover capture of %s: %s; retrying with the next verify", pod.key, exc)
            return False
        if removed:
            log.info("%s is not enrolled: removed capture left by an earlier run", pod.key)
        return True

    async def _forget_orphan(self, uid: str, slots: asyncio.Semaphore) -> bool:
        """Remove what an earlier run kept for the deleted pod `uid`; False when that failed (retried)."""
        try:
            async with slots:
                removed = await self._backend.forget(uid)
        except CaptureError as exc:
            self._metrics.failed("remove")
            log.error(
                "cannot remove what an earlier run kept for the deleted pod %s: %s; retrying with the next verify",
                uid,
                exc,
            )
            return False
        if removed:
            log.info("pod uid %s no longer exists: removed the capture state an earlier run kept for it", uid)
        return True

    async def _release(self, pod: Pod, netns: str | None) -> bool:
        """Remove `pod`'s capture: in `netns` when it is the pod's own, and always its per-uid state."""
        if netns is not None and netns_inode(netns) == self._own_netns:
            log.error("not removing capture for %s in %s: it is the agent's own network namespace", pod.key, netns)
            netns = None
        owner = self._owner(pod, netns) if netns is not None else None
        if owner is not None:
            log.warning(
                "not removing capture for %s: %s is the network namespace of %s, which the agent captures "
                "(was IP %s handed on to it?)",
                pod.key,
                netns,
                owner.key,
                pod.ip,
            )
            netns = None
        return await (self._backend.remove(pod, netns) if netns is not None else self._backend.forget(pod.uid))

    def _owner(self, pod: Pod, netns: str) -> Pod | None:
        """Another pod the agent holds or wants whose netns `netns` is (None: no such pod).

        Held pods are matched by the inode of the netns fd the agent holds; wanted pods not held yet by
        looking up those with `pod`'s IP (the Kubernetes resolver finds netns by IP).
        """
        inode = netns_inode(netns)
        if inode is None:
            return None
        for uid, record in self.records.items():
            if uid != pod.uid and record.fd_inode == inode:
                return record.pod
        for uid, wanted in self._desired.items():
            if uid != pod.uid and pod.ip is not None and wanted.ip == pod.ip:
                found = self._resolver.resolve(wanted)
                if found is not None and netns_inode(found) == inode:
                    return wanted
        return None


def _close(record: PodRecord) -> None:
    if record.fd is not None:
        os.close(record.fd)
        record.fd = record.fd_inode = None
