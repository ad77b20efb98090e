"""The `nodeagent agent` process: wiring the workload source, the reconciler, capture and ZDS together.

Why this module exists: each part (inventory watcher, per-pod reconciler, probe bypass, ZDS server,
status file) is small and tested on its own; this module owns their lifetimes. Every long-lived task is
named and guarded: if one ends unexpectedly the agent logs it and exits non-zero rather than limping on.
The agent is ready once the first inventory has been read and every pod of the node has been reconciled
once (adopted, captured or released); only then does it bind the ZDS socket. On SIGTERM/SIGINT it stops
its tasks, closes the ZDS socket and its netns fds, and LEAVES capture in place: a restarted agent adopts
it without touching the kernel, and meanwhile enrolled pods stay captured (fail closed).

`--metrics HOST:PORT` (the CLI's default :15014, istio-cni's node agent's port) serves Prometheus metrics
(nodeagent.metrics.AgentMetrics) on /metrics and /stats/prometheus: the node's pods by capture state,
capture repairs and failures, tunnels connected over ZDS. The pods gauge is set where the status file is
written, from the very statuses written there: status is derived, never stored (reconciler.py), and that
write already walks every pod after each change (coalesced), so the gauge always agrees with the status
file and pods/status, costs no scan of its own, and a scrape only reads the registry. While the port is
taken (hostNetwork: a rolling update's old pod holds it until it stops) it is retried in the background.

`--ready-socket PATH` serves that readiness on /healthz/ready (agent/admin_endpoint.py) for the DaemonSet's
probe, and it stays true only while the socket at the ZDS path is the one this agent bound: a newer agent
(a rolling update's surge pod) takes the path over, and tunnels that connect from then on never reach this
one. Why the agent needs readiness of its own: the tunnel turns ready on any agent's snapshot, and during
a rolling update that is the old pod's agent - a new agent stuck before its first pass (an RBAC 403 on its
list, retried forever) must keep its pod unready, or the old pod is stopped and the node is left with no
working agent. Once superseded so, an agent writes no more status (the node's status file, pods/status):
both are the new agent's, and what the old one would write as its own tunnel drains and it stops - every
pod pending, then `running: false` - is not the node's state.

Capture is `--capture iptables`, `ebpf` (nodeagent.capture.ebpf: pinned BPF programs, no rule in the
pods) or `auto` (eBPF where the kernel, headers and capabilities allow it, else iptables, with a log line
saying why). The node's kubelet-probe bypass is an iptables chain on the node in every mode. Removal
removes the other mode's objects too (agent/capture_modes.py): the mode may differ from the last run's.

What it deliberately does not do: no Kubernetes client (the workload source is injected: the inventory
file here, the API server through agent/kube_agent.py), no capture logic of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

from nodeagent.admin import METRICS, AdminServer
from nodeagent.agent import admin_endpoint
from nodeagent.agent.capture_modes import BothModes, log_leftover_mode
from nodeagent.agent.enrollment import Status, desired_pods
from nodeagent.agent.netns_resolver import DirectoryNetnsResolver
from nodeagent.agent.reconciler import DEFAULT_CONCURRENCY, Reconciler
from nodeagent.agent.status import DEFAULT_STATE_DIR, run_writer, status_path, write_status
from nodeagent.agent.workloads import DEFAULT_POLL_S, InventoryFile
from nodeagent.agent.zds_server import ServerEvent, TunnelDropped, TunnelReady, ZdsServer
from nodeagent.capture.backend import CaptureBackend
from nodeagent.capture.ebpf import LAB_CGROUP_PATTERN, CgroupResolver, EbpfBackend, unavailable_reason
from nodeagent.capture.iptables import Flavour, Iptables, IptablesBackend, ProbeBypass, detect_flavour
from nodeagent.metrics import AgentMetrics
from nodeagent.model import DEFAULT_EXCLUDED_NAMESPACES, Inventory
from nodeagent.netns import SYSCTL_NET
from nodeagent.zds.wire import DEFAULT_SOCKET_PATH

log = logging.getLogger(__name__)

DEFAULT_VERIFY_S = 3.0
STATUS_COALESCE_S = 0.05
# After the ZDS socket opens, how long pods' `pending` waits for a tunnel to reconnect and ack them (a running
# tunnel retries its connection every second or so) before it is published to the API server.
STATUS_SETTLE_S = 5.0
PROBE_COALESCE_S = 0.1
CAPTURE_CHOICES = ("iptables", "ebpf", "auto")
DEFAULT_METRICS_PORT = 15014  # istio-cni's node agent's
PROBE_BYPASS = "probe_bypass"  # the kind of repair, and the operation, of the node's kubelet-probe chain


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    inventory: Path
    zds_socket: str = DEFAULT_SOCKET_PATH
    state_dir: Path = DEFAULT_STATE_DIR
    capture: str = "iptables"
    iptables: str = "auto"  # auto | legacy | nft
    netns_dir: str = "/var/run/netns"
    netns_pattern: str = "na-{node}.{namespace}.{name}"
    cgroup_pattern: str = LAB_CGROUP_PATTERN  # under the cgroup2 mount (eBPF mode); or KUBELET_CGROUPS
    sysctl_net: str = SYSCTL_NET  # a read-write mount of /proc/sys/net (eBPF mode sets a sysctl in pods)
    excluded_namespaces: frozenset[str] = field(default_factory=lambda: DEFAULT_EXCLUDED_NAMESPACES)
    verify_interval: float = DEFAULT_VERIFY_S
    inventory_poll: float = DEFAULT_POLL_S
    concurrency: int = DEFAULT_CONCURRENCY
    # Serve /healthz/ready on this unix socket (the pod's own volume: the kubelet's exec probe); None: not served.
    ready_socket: str | None = None
    # Serve Prometheus metrics on (host, port); None: not served (the CLI's default is :15014).
    metrics: tuple[str, int] | None = None


def capture_backend(config: AgentConfig, flavour: Flavour) -> CaptureBackend:
    """The configured mode's backend, which also removes what the other mode left (the mode may have changed
    between runs: agent/capture_modes.py). A backend of neither mode (a test's stand-in) works alone: it
    must not remove real eBPF pins of pods its inventory does not know."""
    ebpf = EbpfBackend(CgroupResolver(config.cgroup_pattern), sysctl_net=config.sysctl_net)
    if config.capture == "ebpf":
        return BothModes(ebpf, IptablesBackend.for_host(flavour))
    rules = IptablesBackend.for_host(flavour)
    return BothModes(rules, ebpf) if isinstance(rules, IptablesBackend) else rules


class Agent:
    def __init__(self, config: AgentConfig, flavour: Flavour, *, registry: CollectorRegistry | None = None) -> None:
        """`registry`: where the agent's metrics live (None: a new one), served on `config.metrics`."""
        self.config = config
        iptables = Iptables(flavour)
        self.flavour = flavour
        self.backend: CaptureBackend = capture_backend(config, flavour)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = AgentMetrics(self.registry, repair_kinds=(self.backend.name, PROBE_BYPASS))
        self.metrics.set_pods(dict.fromkeys((s.value for s in Status), 0))
        self.metrics_server = AdminServer(self.registry, routes=(METRICS,))
        self.metrics_address: tuple[str, int] | None = None  # where /metrics was bound (port 0 picks one)
        self.probes = ProbeBypass(iptables)  # the agent runs in the node's netns: its own
        self.zds = ZdsServer(self._snapshot, config.zds_socket, on_event=self._on_zds_event, metrics=self.metrics)
        self.reconciler = Reconciler(
            self.backend,
            DirectoryNetnsResolver(config.netns_dir, config.netns_pattern),
            self.zds,
            on_change=self._status_changed,
            concurrency=config.concurrency,
            metrics=self.metrics,
        )
        self.inventory = InventoryFile(
            config.inventory,
            self._on_inventory,
            on_error=lambda problem: self._status_changed(),
            poll_s=config.inventory_poll,
        )
        self.ready = False
        self.readiness = admin_endpoint.readiness_server(self.readiness_pending)
        self._zds_inode: int | None = None  # the ZDS socket this agent bound (another agent may replace it)
        self._stopping = False
        self._reconciled = asyncio.Event()  # set once every pod has been reconciled after start
        # Pod statuses mean something to others (pods/status) only once a tunnel could have acked them: until
        # then a restarted agent knows of no ack, though its tunnel kept serving every pod throughout.
        self.statuses_settled = False
        self._left_status = False  # superseded: status writes stopped (said once)
        self._tunnel_acked = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._status_path = status_path(config.state_dir, config.node)
        self._tasks: list[asyncio.Task[None]] = []
        self._failed = asyncio.Event()
        self._swept = False

    # --- life cycle -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set (0) or a guarded task dies (1)."""
        try:
            if self.config.ready_socket is not None:  # first: a probe hears what is pending, not a refusal
                try:
                    await self.readiness.start_unix(self.config.ready_socket)
                except OSError as exc:
                    raise SystemExit(f"--ready-socket {self.config.ready_socket}: {exc}") from None
            if self.config.metrics is not None:
                await self._serve_metrics(*self.config.metrics)
            self._guard(self._status_writer(), "status-writer")
            if not self.inventory.check() and self.inventory.current is None:
                # the source has said why (a rejected file logs the error; the API server's first list may
                # simply not be done yet), so this is only where the agent stands
                log.info("waiting for a valid inventory from %s", self.inventory.path)
            self._guard(self.inventory.run(), "inventory-watch")
            self._guard(self._readiness(), "readiness")
            self._guard(self._verifier(), "verify")
            self._guard(self._probe_bypass(), "probe-bypass")
            stopper = asyncio.ensure_future(stop.wait())
            failed = asyncio.ensure_future(self._failed.wait())
            await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            failed.cancel()
            return 1 if self._failed.is_set() else 0
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.reconciler.close()
        await self.zds.close()
        self.ready = False
        self._write_status(running=False)
        await self.readiness.stop()
        await self.metrics_server.stop()
        log.info("agent stopped; capture left in place for the next agent")

    async def _serve_metrics(self, host: str, port: int) -> None:
        self.metrics_address = await self._serve_endpoint(
            self.metrics_server, (host, port), flag="--metrics", what="agent metrics endpoint", task="metrics"
        )

    async def _serve_endpoint(
        self, server: AdminServer, address: tuple[str, int], *, flag: str, what: str, task: str
    ) -> tuple[str, int] | None:
        """Serve `server` on address; the bound address, or None while the port is taken (hostNetwork: a
        rolling update's old pod holds it until it stops): then retry in the background (task `task`) - an
        endpoint never keeps the agent from its work. Any other failure to listen (an address not of this
        host) is a start-up error naming `flag`. The caller stops `server` when the agent stops."""
        host, port = address
        try:
            return await server.start(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise SystemExit(f"{flag} {host}:{port}: {exc}") from None
            self._guard(admin_endpoint.serve(server, address, what=what), task)
            return None

    def _guard(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("task %s crashed; stopping the agent", task.get_name(), exc_info=exc)
            self._failed.set()
        elif task.get_name() != "readiness":
            log.critical("task %s ended unexpectedly; stopping the agent", task.get_name())
            self._failed.set()

    # --- readiness ------------------------------------------------------------------------------------

    def readiness_pending(self) -> str | None:
        """None while this agent does its work on the node: it has read its workloads, reconciled every pod
        once and holds the ZDS socket. Otherwise what it waits for (its /healthz/ready answer)."""
        if self._stopping:
            return "the agent is stopping"
        if not self.inventory.loaded.is_set():
            problem = self._source_problem() or "still reading it"
            return f"no complete workload list from {self.inventory.path} yet: {problem}"
        if not self.ready:
            return (
                f"first reconcile pass of node {self.config.node}'s pods still running "
                f"({len(self.reconciler.records)} pods in hand); the ZDS socket opens after it"
            )
        if self._zds_socket_inode() != self._zds_inode:  # replaced (superseded) or removed
            return (
                f"the ZDS socket {self.config.zds_socket} is no longer this agent's: another agent took it over "
                "(a rolling update's new pod) or it was removed, and tunnels that connect now do not reach this "
                "agent; if no other agent runs on this node, restart this one"
            )
        return None

    def superseded(self) -> bool:
        """Another agent (a rolling update's new pod) bound a socket of its own at our ZDS path, so its tunnels
        serve the node's pods now. Not when the socket is gone: this agent removes its own as it stops."""
        current = self._zds_socket_inode()
        return self._zds_inode is not None and current is not None and current != self._zds_inode

    def _zds_socket_inode(self) -> int | None:
        try:
            return os.stat(self.config.zds_socket).st_ino
        except OSError:
            return None

    def _source_problem(self) -> str | None:
        """Why the workload source has handed over no list (yet), if it knows."""
        return self.inventory.error

    # --- tasks ----------------------------------------------------------------------------------------

    async def _readiness(self) -> None:
        await self.inventory.loaded.wait()
        await self.reconciler.wait_idle()
        # Tunnels are accepted only now: a tunnel's snapshot must name every pod this agent adopted. A tunnel
        # reconnecting to a restarted agent during its first pass got a partial snapshot and dropped the
        # missing pods (closing their listeners: connections refused until the pods were added again).
        await self.zds.start()
        self._zds_inode = os.stat(self.config.zds_socket).st_ino
        self.ready = True
        self._reconciled.set()
        log.info("ready: %d pods of node %s reconciled", len(self.reconciler.records), self.config.node)
        self._status_changed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tunnel_acked.wait(), STATUS_SETTLE_S)
        self.statuses_settled = True
        self._status_changed()

    async def _verifier(self) -> None:
        while True:
            await asyncio.sleep(self.config.verify_interval)
            # Rounds never overlap: one that outlasts the interval (many pods, slow installs) must still leave
            # the reconciler idle in between, or readiness, which waits for an idle moment, never comes.
            await self.reconciler.wait_idle()
            self.reconciler.verify_all()
            self.reconciler.probe_changed.set()

    async def _probe_bypass(self) -> None:
        changed = self.reconciler.probe_changed
        # Until every pod is adopted or captured, the captured set is partial: rewriting the node's chain
        # from it would drop (then re-add) the probe rules of pods a restarted agent has not reached yet.
        await self._reconciled.wait()
        # The pods the chain was last made to cover (None: not known).
        applied: dict[str, ipaddress.IPv4Address] | None = None
        while True:
            await changed.wait()
            await asyncio.sleep(PROBE_COALESCE_S)  # a burst of pod adds rewrites the node's chain once
            changed.clear()
            targets = self.reconciler.probe_targets()
            try:
                if targets:
                    # what ensure() returns is the drift it found in the kernel, and has repaired by now
                    if fixed := await self.probes.ensure(targets):
                        if targets == applied:  # the same pods as last time: not a pod's add, the chain drifted
                            self.metrics.repaired(PROBE_BYPASS)
                        pods = f"{len(targets)} pod{'' if len(targets) == 1 else 's'}"
                        log.info("kubelet-probe bypass now covers %s; found and fixed: %s", pods, "; ".join(fixed))
                elif await self.probes.remove():
                    log.info("kubelet-probe bypass removed from the node: no pod is captured")
                applied = dict(targets)
            except Exception as exc:  # CaptureError or a bug: report, the next verify retries
                applied = None  # the retry may finish this attempt's own changes: no drift of anyone else's
                self.metrics.failed(PROBE_BYPASS)
                log.error("kubelet-probe bypass on the node: %s; retrying with the next verify", exc)

    async def _status_writer(self) -> None:
        # A change is written at once (`enabled` ends the pod-add path); only bursts are coalesced.
        await run_writer(self._status_dirty, lambda: self._write_status(running=True), max_rest=STATUS_COALESCE_S)

    # --- callbacks ------------------------------------------------------------------------------------

    def _on_inventory(self, inventory: Inventory) -> None:
        node = self.config.node
        if node not in {n.name for n in inventory.nodes}:
            log.error("node %r is not in the inventory %s; enrolling nothing", node, self.inventory.path)
        desired = desired_pods(inventory, node, self.config.excluded_namespaces)
        log.info("inventory loaded: %d pods on %s, %d enrolled", len(inventory.pods_on(node)), node, len(desired))
        self.reconciler.set_desired(desired)
        if not self._swept:  # capture an earlier run left in pods no longer enrolled, or of pods deleted since
            self._swept = True
            if isinstance(self.backend, BothModes):
                log_leftover_mode(self.backend)
            self.reconciler.sweep(inventory.pods, node)
        self._status_changed()

    def _snapshot(self) -> list[tuple[Any, int | None]]:
        return list(self.reconciler.snapshot())

    def _on_zds_event(self, event: ServerEvent) -> None:
        if isinstance(event, TunnelReady):
            self.reconciler.on_tunnel_ready(event.acked)
            self._tunnel_acked.set()
        elif isinstance(event, TunnelDropped):
            self.reconciler.on_tunnel_dropped()
        self._status_changed()

    def _status_changed(self) -> None:
        self._status_dirty.set()

    def _write_status(self, *, running: bool) -> None:
        if self.superseded():
            # The node's status file (a hostPath both pods of a rolling update share) is the new agent's now:
            # this one's last word, `running: false` as it stops, would say the node's agent is down.
            if not self._left_status:
                log.info("another agent holds %s now: the node's status is its to write", self.config.zds_socket)
                self._left_status = True
            return
        pods = {}
        counts = dict.fromkeys((s.value for s in Status), 0)
        for uid, record in self.reconciler.records.items():
            status = self.reconciler.status(uid).value
            counts[status] += 1
            pods[uid] = {
                "namespace": record.pod.namespace,
                "name": record.pod.name,
                "ip": str(record.pod.ip) if record.pod.ip else "",
                "status": status,
                "detail": record.error or ("" if record.delivered else "no tunnel has acked this pod yet"),
                "netns": record.netns or "",
            }
        document = {
            "node": self.config.node,
            "pid": os.getpid(),
            "running": running,
            "ready": self.ready,
            "capture": self.backend.name,
            "cgroup_pattern": self.config.cgroup_pattern,
            "iptables": self.flavour.value,
            "zds_socket": self.config.zds_socket,
            "tunnels": list(self.zds.tunnels),
            "inventory": str(self.config.inventory),
            "inventory_error": self.inventory.error or "",
            "updated": time.time(),
            "pods": pods,
        }
        self.metrics.set_pods(counts)  # the states just derived (module docstring: no scan of its own)
        try:
            write_status(self._status_path, document)
        except OSError as exc:
            log.error("cannot write the status file %s: %s", self._status_path, exc)


async def _main(config: AgentConfig, agent_factory: Callable[[AgentConfig, Flavour], Agent] = Agent) -> int:
    if config.capture not in CAPTURE_CHOICES:
        raise SystemExit(f"--capture {config.capture}: only {', '.join(CAPTURE_CHOICES)} is available")
    if config.capture in ("ebpf", "auto"):
        why = await asyncio.to_thread(unavailable_reason)
        if why is not None and config.capture == "ebpf":
            raise SystemExit(f"--capture ebpf: {why}")
        if why is not None:
            log.warning("capture auto: using iptables because eBPF capture is unavailable: %s", why)
        elif config.capture == "auto":
            log.info("capture auto: using eBPF (kernel, headers and capabilities allow it)")
        config = dataclasses.replace(config, capture="iptables" if why else "ebpf")
    flavour = await asyncio.to_thread(detect_flavour) if config.iptables == "auto" else Flavour(config.iptables)
    log.info(
        "node %s: capture %s (iptables %s), ZDS socket %s",
        config.node,
        config.capture,
        flavour.value,
        config.zds_socket,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = agent_factory(config, flavour)
    try:
        return await agent.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def run(config: AgentConfig, agent_factory: Callable[[AgentConfig, Flavour], Agent] = Agent) -> int:
    """`agent_factory`: Agent (inventory file) or agent/kube_agent.KubeAgent (Kubernetes)."""
    return uvloop.run(_main(config, agent_factory))
