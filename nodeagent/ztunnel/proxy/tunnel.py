"""The tunnel process: every local pod's proxies in one event loop, fed by ZDS, drained on SIGTERM.

Why this module exists: the building blocks (HBONE core, TLS, sockets, relays, routing, policy,
certificates, ZDS client) each do one thing; this module owns their lifecycle. For each pod the node
agent hands over (ZDS Add, with the pod's netns fd) it binds :15001, :15006 and :15008 through the
injected socket factory (inside the pod's netns in production, SO_MARK 0x539, SO_REUSEPORT) and starts
one named accept task per listener; Del closes them; SnapshotSent drops pods the agent no longer knows.
A pod's listeners open only once its certificate is there (bounded wait), so a successor tunnel never
accepts a connection it cannot serve; an Add for a pod already served in the same netns (a restarted
agent's snapshot) keeps its listeners and open connections untouched.
It keeps the cluster view (inventory + policies) current, re-checking open inbound connections when the
policies or a destination pod's labels change and closing those now denied. It serves three HTTP
endpoints, each with only its own routes: admin (/config_dump, /healthz/ready and POST /logging,
localhost), metrics (/metrics) and readiness
(/healthz/ready). On SIGTERM it drains: listeners close at once (a successor bound to the same ports
through SO_REUSEPORT takes new connections and receives the pods over ZDS, because Add goes to the newest
connection; tcp_migrate_req, set in each pod's netns, hands it the connections still queued on the closed
listeners instead of resetting them; a graceful HTTP/2 GOAWAY on each inbound HBONE connection tells
peer tunnels to open new streams elsewhere, as ztunnel's own drain does), established connections run on
until `grace - drain_margin` (connections still being set up then get up to SETUP_SETTLE more to come
up), then close cleanly (HTTP/2 GOAWAY, TLS close_notify, TCP FIN); all of it within `grace`, after which
the kubelet kills the process.

Every edge is a field of `TunnelInputs`: socket factory, credentials (the certificate manager), the
inventory and policy sources, the metrics registry, the clock, the ZDS socket and the endpoints.

What it deliberately does not do: no protocol or policy logic of its own (inbound.py, outbound.py,
routing.py, policy.py), no capture rules (the node agent), no argument parsing (commands.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import uvloop
from prometheus_client import CollectorRegistry

from nodeagent.admin import CONFIG_DUMP, LOGGING, METRICS, READY, AdminServer
from nodeagent.model import Identity, Inventory, IPAddress
from nodeagent.netns import SYSCTL_NET, NetnsError, in_netns, net_sysctl
from nodeagent.policy import PeerAuthentication, PolicySet, Scope, revalidate
from nodeagent.zds.codec import Workload
from nodeagent.zds.tasks import TaskSet
from nodeagent.ztunnel import hbone, sockets
from nodeagent.ztunnel.certs import CertMaterial
from nodeagent.ztunnel.edges import ClusterView, LocalPod, ProxyState, SocketFactory, TlsContexts
from nodeagent.ztunnel.inbound import SERVER_IDLE_TIMEOUT, HboneInbound, PlaintextInbound, ProxyDeps
from nodeagent.ztunnel.local import SameNodePath
from nodeagent.ztunnel.metrics import (
    DEFAULT_CLUSTER_DOMAIN,
    ConnectionTable,
    TunnelMetrics,
    canonical_revision,
    canonical_service,
)
from nodeagent.ztunnel.outbound import HboneConnector, Outbound
from nodeagent.ztunnel.pool import HbonePool
from nodeagent.ztunnel.routing import Workload as RoutedWorkload
from nodeagent.ztunnel.routing import serving
from nodeagent.ztunnel.zds_client import Backoff, ZdsClient

log = logging.getLogger(__name__)

DEFAULT_GRACE = 30.0
DRAIN_MARGIN = 5.0
SETUP_SETTLE = 2.0  # drain: how long connections still being set up may take to come up after the window
CLOSE_WAIT = 1.0  # drain: how long the clean closes (GOAWAY, close_notify, FIN) get to reach the peers
# How long a pod's Add waits for the pod's certificate before listening anyway; below the agent's 5 s ZDS
# deadline for the ack.
CERT_WAIT = 3.0
MIGRATE_REQ_SYSCTL = "ipv4/tcp_migrate_req"  # under TunnelInputs.sysctl_net


def _scope_name(scope: Scope) -> str:
    """ztunnel's RbacScope as its config dump spells it: Global, Namespace, WorkloadSelector."""
    return scope.name.title().replace("_", "")


def _peer_authentication_scope(pa: PeerAuthentication, root_namespace: str) -> Scope:
    """A PeerAuthentication's level as policy.effective_mtls reads it: a selector binds it to workloads, else
    the root namespace makes it mesh-wide, else it covers its namespace."""
    if pa.selector:
        return Scope.WORKLOAD_SELECTOR
    return Scope.GLOBAL if pa.namespace == root_namespace else Scope.NAMESPACE


class CertSource(Protocol):
    """The certificate manager as the process drives it (nodeagent.ztunnel.certs.CertificateManager)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def set_local_workloads(self, identities: Any) -> None: ...
    def material(self, identity: Identity) -> CertMaterial: ...
    async def wait_available(self, identity: Identity) -> CertMaterial: ...
    def ready(self) -> str | None: ...
    def config_dump(self) -> list[dict[str, Any]]: ...
    def trust_bundle_dump(self) -> list[dict[str, str]]: ...

    @property
    def bundle_pem(self) -> str: ...


Endpoint = tuple[str, int]


@dataclass(frozen=True)
class TunnelInputs:
    node: str
    socket_factory: SocketFactory
    credentials: CertSource
    inventory: Callable[[], Inventory]  # the current inventory; cheap, returns the same object until it changes
    policies: Callable[[], PolicySet]
    registry: CollectorRegistry
    zds_socket: str | None = None  # None: the caller adds pods itself (add_pod / remove_pod)
    zds_backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic
    admin: Endpoint | None = ("127.0.0.1", 15000)
    metrics: Endpoint | None = ("0.0.0.0", 15020)
    ready: Endpoint | None = ("0.0.0.0", 15021)
    ready_socket: str | None = None  # readiness on a unix socket too: the pod's own, for an exec probe
    sysctl_net: str = SYSCTL_NET  # a writable mount of /proc/sys/net (a container's own is read-only)
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN  # destination_service = <name>.<namespace>.svc.<this>
    grace: float = DEFAULT_GRACE
    drain_margin: float = DRAIN_MARGIN
    cert_wait: float = CERT_WAIT
    watch_interval: float = 0.25  # how often inventory and policies are checked for changes (< 1 s)
    reclaim_interval: float = 1.0  # how often an emptied eBPF listener slot is looked for (_reclaim_listeners)
    limits: hbone.Limits = field(default_factory=hbone.Limits)
    hbone_port: int = sockets.HBONE_PORT
    connect_timeout: float = sockets.CONNECT_TIMEOUT
    handshake_timeout: float = 10.0
    server_idle_timeout: float = SERVER_IDLE_TIMEOUT
    max_streams_per_connection: int = 100
    pool_idle_timeout: float = 300.0
    same_node_fast_path: bool = True  # connections between two pods served here skip HBONE (local.py)


@dataclass(eq=False)
class _Served:
    """A local pod and what the tunnel runs for it."""

    pod: LocalPod
    listeners: list[socket.socket] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    hbone: HboneInbound | None = None
    reclaim_error: str | None = None  # the last failure to put :15006 back in the capture, logged once

    @property
    def plaintext(self) -> socket.socket | None:
        """The :15006 listener, while bound (listeners: 15001, 15006, 15008)."""
        return self.listeners[1] if len(self.listeners) == 3 else None

    def close_listeners(self) -> None:
        for sock in self.listeners:
            sock.close()
        self.listeners.clear()
        for task in self.tasks:
            task.cancel()
        self.tasks.clear()


class Tunnel:
    """Create with inputs, `await start()`, serve, `await drain()` and `await stop()` (or `await run()`)."""

    def __init__(self, inputs: TunnelInputs) -> None:
        self._in = inputs
        self._tasks = TaskSet(log)
        self._metrics = TunnelMetrics(inputs.registry)
        self.table = ConnectionTable(self._metrics, inputs.cluster_domain)
        self._inventory = inputs.inventory()
        self._policies = inputs.policies()
        self.state = ProxyState(ClusterView.build(self._inventory, self._policies))
        self.contexts = TlsContexts(inputs.credentials)
        self.deps = ProxyDeps(
            state=self.state,
            socket_factory=inputs.socket_factory,
            contexts=self.contexts,
            table=self.table,
            metrics=self._metrics,
            tasks=self._tasks,
            limits=inputs.limits,
            connect_timeout=inputs.connect_timeout,
            handshake_timeout=inputs.handshake_timeout,
            server_idle_timeout=inputs.server_idle_timeout,
        )
        connector = HboneConnector(self.deps, inputs.hbone_port)
        self.pool = HbonePool(
            connector,
            max_streams=inputs.max_streams_per_connection,
            idle_timeout=inputs.pool_idle_timeout,
            connect_timeout=inputs.connect_timeout,
        )
        connector.pool = self.pool
        same_node = SameNodePath(self.deps, self._served_pod) if inputs.same_node_fast_path else None
        self._outbound = Outbound(self.deps, self.pool, same_node)
        self._pods: dict[str, _Served] = {}
        self._zds: ZdsClient | None = None
        self._servers: list[AdminServer] = []
        self.addresses: dict[str, Endpoint] = {}
        self.draining = False
        self._stopped = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._in.credentials.start()
        self._tasks.spawn(self._watch(), name="tunnel-watch-inventory-and-policies")
        self._tasks.spawn(self._reclaim_listeners(), name="tunnel-reclaim-emptied-ebpf-listener-slots")
        # Like ztunnel's ports: the config dump only on the (localhost) admin port, /metrics only on the
        # Prometheus port, readiness on its own port (and on the admin port, for operators).
        admin = AdminServer(routes=(CONFIG_DUMP, READY, LOGGING))
        for name, provider in (
            ("workloads", self._dump_workloads),
            ("services", self._dump_services),
            ("certificates", self._in.credentials.config_dump),
            ("trustBundle", self._in.credentials.trust_bundle_dump),
            ("policies", self._dump_policies),
            ("connections", self._dump_connections),
            ("localPods", self._dump_local_pods),
        ):
            admin.add_config_provider(name, provider)
        ready = AdminServer(routes=(READY,))
        for server in (admin, ready):
            server.add_readiness_check("zds", self._zds_pending)
            server.add_readiness_check("certificates", self._in.credentials.ready)
            server.add_readiness_check(
                "drain", lambda: "draining: the tunnel is shutting down" if self.draining else None
            )
        metrics = AdminServer(self._in.registry, routes=(METRICS,))
        metrics.add_scrape_hook(self.table.flush_bytes)
        for name, server, endpoint in (
            ("admin", admin, self._in.admin),
            ("metrics", metrics, self._in.metrics),
            ("ready", ready, self._in.ready),
        ):
            if endpoint is not None:
                self._servers.append(server)
                try:
                    self.addresses[name] = await server.start(*endpoint)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    # hostNetwork: a rolling update's old tunnel holds the node's port until it stops.
                    self._tasks.spawn(self._bind_when_free(name, server, endpoint), name=f"bind the {name} endpoint")
        if self._in.ready_socket is not None:
            if ready not in self._servers:
                self._servers.append(ready)
            await ready.start_unix(self._in.ready_socket)
        self.readiness = ready
        if self._in.zds_socket is not None:
            self._zds = ZdsClient(self, self._in.zds_socket, backoff=self._in.zds_backoff)
            self._zds.start()
        log.info("tunnel for node %s started", self._in.node)

    async def _bind_when_free(self, name: str, server: AdminServer, endpoint: Endpoint) -> None:
        self.addresses[name] = await server.start_when_free(*endpoint, what=f"tunnel {name} endpoint")

    async def run(self) -> None:
        """start(), serve until SIGTERM/SIGINT, drain, stop()."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        await self.start()
        await signalled.wait()
        log.info("signal received: draining (new connections go to a successor tunnel if one runs)")
        await self.drain()
        await self.stop()

    async def drain(self) -> None:
        """Close listeners now; let established connections run until grace - margin; close them cleanly."""
        started = self._in.clock()  # the grace runs from SIGTERM
        self.draining = True
        for served in self._pods.values():
            served.close_listeners()
            if served.hbone is not None:
                served.hbone.refuse_new_streams()
        self._count_pods()
        # The outbound pool keeps opening streams: only connections the listeners accepted before they closed
        # still ask for one, and the app sees those as established — refusing them would reset them.
        if self._zds is not None:
            await self._zds.close()
            self._zds = None
        killed = started + self._in.grace  # the kubelet's SIGKILL: every wait below ends before it
        deadline = started + max(0.0, self._in.grace - self._in.drain_margin)
        while (len(self.table) or self.table.in_setup) and self._in.clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(min(0.05, max(0.0, deadline - self._in.clock())))
        # A connection the listeners accepted before they closed is the app's already: one still being set
        # up (waiting for its CONNECT's answer) gets a moment to come up, so it is closed cleanly below
        # rather than cut by stop() - even when the drain window is over (or was none), as far as the grace
        # leaves time for it and for the clean closes.
        settle = min(self._in.clock() + SETUP_SETTLE, killed - CLOSE_WAIT)
        while self.table.in_setup and self._in.clock() < settle:  # noqa: ASYNC110 (a deadline, not an event)
            await asyncio.sleep(0.02)
        if len(self.table):
            log.info("drain deadline reached: closing %d connections cleanly", len(self.table))
        for record in self.table:
            if record.close is not None:
                record.close()
        for served in self._pods.values():
            if served.hbone is not None:
                served.hbone.close()
        self.pool.close_all()
        # Give the clean closes (GOAWAY, close_notify, FIN) a moment to reach the peers.
        closed_by = min(self._in.clock() + CLOSE_WAIT, killed)
        while len(self.table) and self._in.clock() < closed_by:  # noqa: ASYNC110 (a deadline, not an event)
            await asyncio.sleep(0.025)

    async def stop(self) -> None:
        if self._zds is not None:
            await self._zds.close()
            self._zds = None
        for record in self.table:
            if record.abort is not None:
                record.abort("the tunnel stopped")
        self.pool.close_all()
        for served in list(self._pods.values()):
            self._drop(served)
        await self._tasks.cancel_all()  # first: an endpoint still waiting for its port must not bind now
        for server in self._servers:
            await server.stop()
        await self._in.credentials.stop()
        self._stopped.set()

    # -- ZDS WorkloadHandler ------------------------------------------------------------------------------

    async def on_add(self, workload: Workload, netns_fd: int) -> None:
        await self.add_pod(workload, os.dup(netns_fd))

    async def on_keep(self, uid: str) -> None:
        if uid not in self._pods:
            log.info("ZDS Keep for pod %s that this tunnel does not serve (no netns to serve it in)", uid)

    async def on_del(self, uid: str) -> None:
        await self.remove_pod(uid)

    async def on_snapshot_done(self, known_uids: frozenset[str]) -> None:
        for uid in [u for u in self._pods if u not in known_uids]:
            log.info("pod %s is not in the node agent's snapshot; dropping it", self._pods[uid].pod.key)
            await self.remove_pod(uid)

    async def add_pod(self, workload: Workload, netns_fd: int | None) -> None:
        """Serve a pod: bind its three listeners (the fd, if any, is owned from here on)."""
        if self.draining:
            if netns_fd is not None:
                os.close(netns_fd)
            raise RuntimeError("this tunnel is draining; the newer tunnel serves new pods")
        try:
            identity = Identity(self._inventory.trust_domain, workload.namespace, workload.service_account)
        except ValueError:
            if netns_fd is not None:
                os.close(netns_fd)
            raise
        known = self._pods.get(workload.uid)
        same = known is not None and known.pod.identity == identity and _same_netns(known.pod.netns_fd, netns_fd)
        if known is not None and known.listeners and same:
            # A fresh snapshot (the agent restarted) names a pod already served in the same netns: keep its
            # listeners and connections — rebinding would reset them. The agent may have come back in the
            # eBPF capture mode: its new pins hold no listener yet.
            if netns_fd is not None:
                os.close(netns_fd)
            self._reclaim(known)
            return
        pod = LocalPod(workload.uid, workload.name, workload.namespace, identity, netns_fd)
        if known is not None:
            await self.remove_pod(workload.uid)
        served = _Served(pod)
        try:
            self._in.credentials.set_local_workloads({s.pod.identity for s in self._pods.values()} | {identity})
            await self._await_certificate(identity)
            await self._bind(served)
        except BaseException:
            served.close_listeners()
            pod.close()
            self._in.credentials.set_local_workloads({s.pod.identity for s in self._pods.values()})
            raise
        self._pods[pod.uid] = served
        self._in.credentials.set_local_workloads({s.pod.identity for s in self._pods.values()})
        self._metrics.pods_started.inc()
        self._count_pods()
        log.info("serving pod %s (%s)", pod.key, identity)

    async def _await_certificate(self, identity: Identity) -> None:
        """Listen only once the pod's certificate is here. In a hand-over the successor shares the pod's
        ports through SO_REUSEPORT with the running tunnel, and the kernel hands it new connections the
        moment it listens: each must be servable. Bounded by `cert_wait` so the ZDS ack stays within the
        agent's deadline; without a certificate by then (CA down) it listens anyway: its connections fail
        (closed, never in plaintext) and readiness says why."""
        try:
            async with asyncio.timeout(self._in.cert_wait):
                await self._in.credentials.wait_available(identity)
        except TimeoutError:
            log.warning("no certificate for %s after %.1f s; listening anyway", identity, self._in.cert_wait)

    async def _bind(self, served: _Served) -> None:
        pod = served.pod
        inv_pod = self.state.view.pod_of(pod)
        ip: IPAddress | None = inv_pod.ip if inv_pod is not None else None
        ports = ((sockets.OUTBOUND_PORT, False), (sockets.INBOUND_PLAINTEXT_PORT, True), (self._in.hbone_port, True))

        entered: list[bool] = []

        def make_all() -> None:
            # One thread does the pod's netns work in a row: the sysctl, then the three listeners (the socket
            # factory makes them right there, without a thread of its own, when it is already in the netns).
            entered.append(True)
            if pod.netns_fd is not None:
                _migrate_on_close(pod, self._in.sysctl_net)
            for port, transparent in ports:
                served.listeners.append(self._in.socket_factory.listener(pod, ip, port, transparent=transparent))

        def work() -> None:
            if pod.netns_fd is not None:
                try:
                    in_netns(pod.netns_fd, make_all)
                    return
                except NetnsError as exc:
                    if entered:
                        raise
                    # Not a netns (a stand-in fd, in tests): the factory places the sockets itself.
                    log.debug("pod %s: cannot enter its netns (%s); the socket factory places them", pod.key, exc)
            for port, transparent in ports:
                served.listeners.append(self._in.socket_factory.listener(pod, ip, port, transparent=transparent))

        await asyncio.get_running_loop().run_in_executor(None, work)
        outbound, plaintext, hbone_listener = served.listeners
        served.hbone = HboneInbound(self.deps, pod)
        served.tasks += [
            self._tasks.spawn(self._outbound.serve(pod, outbound), name=f"accept :15001 {pod.key}"),
            self._tasks.spawn(PlaintextInbound(self.deps, pod).serve(plaintext), name=f"accept :15006 {pod.key}"),
            self._tasks.spawn(served.hbone.serve(hbone_listener), name=f"accept :15008 {pod.key}"),
        ]

    async def _reclaim_listeners(self) -> None:
        """Keep each pod's :15006 listener where eBPF capture steers inbound plaintext.

        sk_lookup takes the socket in the pod's one-slot map_listener, and the kernel empties the slot when
        that socket closes. Binding puts our listener there, but two hand-overs leave it empty with this
        tunnel still serving, so every inbound plaintext SYN is refused (fail closed, never around the
        tunnel) until the slot is filled again: the agent switching the capture mode to eBPF under a tunnel
        that keeps its listeners (new pins, nothing in them), and a draining tunnel whose listener went in
        last (a surge tunnel bound before the switch re-registers on the new snapshot, the old one too).
        Nothing tells us, so look: every `reclaim_interval`, fill an empty slot (only an empty one: a
        successor's fresh listener stays). One bpf(2) call per pod, on the loop: from a thread, a listener
        closed meanwhile could lend its fd number to another pod's socket."""
        while not self.draining:
            await asyncio.sleep(self._in.reclaim_interval)
            for served in list(self._pods.values()):
                self._reclaim(served)

    def _reclaim(self, served: _Served) -> None:
        if served.plaintext is None or self.draining:
            return
        try:
            if self._in.socket_factory.reclaim_inbound(served.pod, served.plaintext):
                log.info(
                    "pod %s: its eBPF capture held no :15006 listener (the capture mode switched, or a draining "
                    "tunnel's listener closed); this tunnel's is there now",
                    served.pod.key,
                )
            served.reclaim_error = None
        except OSError as exc:
            if str(exc) != served.reclaim_error:
                log.warning("pod %s: cannot put the :15006 listener in its eBPF capture: %s", served.pod.key, exc)
            served.reclaim_error = str(exc)

    async def remove_pod(self, uid: str) -> None:
        served = self._pods.pop(uid, None)
        if served is None:
            return
        self._drop(served)
        self._in.credentials.set_local_workloads({s.pod.identity for s in self._pods.values()})
        if not any(s.pod.identity == served.pod.identity for s in self._pods.values()):
            self.contexts.forget(served.pod.identity)
        log.info("stopped serving pod %s", served.pod.key)

    def _drop(self, served: _Served) -> None:
        served.close_listeners()
        if served.hbone is not None:
            served.hbone.close()
        self.pool.close_from(served.pod.uid)
        served.pod.close()
        self._pods.pop(served.pod.uid, None)
        self._metrics.pods_stopped.inc()
        self._count_pods()

    def _count_pods(self) -> None:
        """nodeagent_tunnel_pods: the pods served with listeners up (none once draining)."""
        self._metrics.pods.set(0 if self.draining else len(self._pods))

    def _served_pod(self, uid: str) -> LocalPod | None:
        served = self._pods.get(uid)
        return served.pod if served is not None else None

    @property
    def pods(self) -> dict[str, LocalPod]:
        return {uid: s.pod for uid, s in self._pods.items()}

    # -- cluster view ----------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._in.watch_interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Pick up a changed inventory or policy set; close open connections the new policies deny.

        Reading the sources and building the new view run in a worker thread: in Kubernetes mode at
        5 000 pods / 1 000 services that is ~30 ms of Python per change, which on the loop stalled every
        connection of the node; in a thread the loop gets the interpreter back every switch interval.
        The view is swapped on the loop, in one assignment.
        """
        changed = await asyncio.to_thread(self._changed_view)
        if changed is None:
            return
        self._inventory, self._policies, self.state.view = changed
        # New policies, but also new labels or namespaces in the inventory, can change verdicts: each open
        # connection is judged with its destination pod as the new view has it.
        denied = revalidate(self.table.inbound_views(), self._policies, self.state.view.pod_at)
        for record_id, verdict in denied.items():
            record = self.table.get(record_id)
            if record is not None and record.abort is not None:
                log.info("closing %s -> %s: %s", record.src_addr, record.dst_addr, verdict.reason)
                record.abort(f"policy changed: {verdict.reason}")

    def _changed_view(self) -> tuple[Inventory, PolicySet, ClusterView] | None:
        """(In a worker thread) the sources' current state and its view, or None when neither changed."""
        inventory, policies = self._in.inventory(), self._in.policies()
        if inventory is self._inventory and policies is self._policies:
            return None
        return inventory, policies, ClusterView.build(inventory, policies)

    def _zds_pending(self) -> str | None:
        if self._in.zds_socket is None:
            return None
        if self._zds is None or not self._zds.ready:
            return f"waiting for the node agent's snapshot on {self._in.zds_socket}"
        return None

    # -- config_dump -------------------------------------------------------------------------------------------

    def _dump_workloads(self) -> list[dict[str, Any]]:
        view = self.state.view
        out = []
        for ip, w in view.routing.workloads.items():
            out.append(
                {
                    "uid": w.pod.uid,
                    "name": w.pod.name,
                    "namespace": w.pod.namespace,
                    "workloadName": w.pod.workload,
                    "canonicalName": canonical_service(w.pod),
                    "canonicalRevision": canonical_revision(w.pod),
                    "serviceAccount": w.pod.service_account,
                    "workloadIps": [str(ip)],
                    "node": w.pod.node,
                    "protocol": "HBONE" if w.enrolled else "TCP",
                    "trustDomain": view.trust_domain,
                    "clusterId": view.cluster,
                    "status": "Healthy" if serving(w.pod) else "Unhealthy",
                    "waypoint": None,
                }
            )
        return out

    def _dump_services(self) -> list[dict[str, Any]]:
        """ztunnel's service entries: VIPs as network/address (one network: ""), ports as port -> targetPort (0:
        a named one, resolved per endpoint), endpoints by workload uid with their own port map. Each endpoint
        also says its workload's status, so `inspect services` counts healthy endpoints without the
        workloads section."""
        view = self.state.view
        selected: dict[tuple[str, str], list[RoutedWorkload]] = {}
        for ip, services in view.routing.services_of.items():
            for svc in services:
                selected.setdefault((svc.namespace, svc.name), []).append(view.routing.workloads[ip])
        out = []
        for svc in view.inventory.services:
            route = view.routing.services.get(svc.vip) if svc.vip is not None else None
            # Host-network pods have no workload address of their own; a VIP routes to the ready ones.
            host = [w for w in route.endpoints if w.pod.host_network] if route is not None else []
            endpoints = {}
            for w in (*selected.get((svc.namespace, svc.name), ()), *host):
                ports = {p.port: t for p in svc.ports if (t := p.target_on(w.pod)) is not None}
                if ports:
                    endpoints[w.pod.uid] = {
                        "workloadUid": w.pod.uid,
                        "service": "",
                        "port": ports,
                        "status": "Healthy" if serving(w.pod) else "Unhealthy",
                    }
            out.append(
                {
                    "name": svc.name,
                    "namespace": svc.namespace,
                    "hostname": f"{svc.name}.{svc.namespace}.svc.{self._in.cluster_domain}",
                    "vips": [f"/{svc.vip}"] if svc.vip is not None else [],
                    "ports": {str(p.port): p.target_port for p in svc.ports},
                    "endpoints": endpoints,
                    "ipFamilies": "IPv4",
                }
            )
        return out

    def _dump_policies(self) -> list[dict[str, Any]]:
        policies = self.state.view.policies
        out: list[dict[str, Any]] = [
            {
                "name": p.name,
                "namespace": p.namespace,
                "action": p.action.value.capitalize(),
                "scope": _scope_name(p.scope),
                "rules": len(p.rules),
            }
            for p in policies.authorization
        ]
        out += [
            {
                "name": pa.name,
                "namespace": pa.namespace,
                "kind": "PeerAuthentication",
                "mode": pa.mode.value,
                "scope": _scope_name(_peer_authentication_scope(pa, policies.root_namespace)),
            }
            for pa in policies.peer_authentication
        ]
        return out

    def _dump_connections(self) -> dict[str, Any]:
        dump: dict[str, Any] = dict(self.table.dump())
        dump["pool"] = self.pool.dump()
        return dump

    def _dump_local_pods(self) -> list[dict[str, Any]]:
        return [
            {
                "uid": s.pod.uid,
                "name": s.pod.name,
                "namespace": s.pod.namespace,
                "identity": str(s.pod.identity),
                "listening": bool(s.listeners),
            }
            for s in self._pods.values()
        ]


def _migrate_on_close(pod: LocalPod, sysctl_net: str) -> None:
    """Set net.ipv4.tcp_migrate_req=1 in the pod's netns (kernel >= 5.14; call it on a thread inside that
    netns): when a draining tunnel closes its listeners, connections already queued on them (handshake
    done, not yet accepted) move to the successor's listener of the same SO_REUSEPORT group instead of
    being reset. Per netns, and it only affects SO_REUSEPORT groups, so the app is untouched. Best
    effort: without it hand-over still works, minus those few queued connections."""
    try:
        net_sysctl(MIGRATE_REQ_SYSCTL, "1", sysctl_net)  # the caller runs this on a thread inside the pod's netns
    except OSError as exc:
        log.debug("pod %s: cannot set net.ipv4.tcp_migrate_req: %s", pod.key, exc)


def _same_netns(a: int | None, b: int | None) -> bool:
    """Whether two netns fds (None: no netns, as in tests) refer to the same network namespace."""
    if a is None or b is None:
        return a is b
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def file_source(
    path: str, load: Callable[[str], Any], default: Any = None, interval: float = 0.05
) -> Callable[[], Any]:
    """A callable returning `load(path)`, reloaded when the file's mtime/size/inode change (checked at most
    every `interval` s: a stat() per 50 ms keeps a namespace just enrolled from being planned as plaintext
    passthrough for long). A broken file keeps the last good value and logs why; a missing file is `default`,
    with a warning (not an error: the lab writes its policies file after the tunnel starts)."""
    state: dict[str, Any] = {"stamp": None, "value": default, "checked": -1e9}

    def current() -> Any:
        now = time.monotonic()
        if now - state["checked"] < interval:
            return state["value"]
        state["checked"] = now
        try:
            st = os.stat(path)
            stamp: tuple[int, ...] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = ()
        if stamp == state["stamp"]:
            return state["value"]
        try:
            state["value"] = load(path) if stamp else default
            state["stamp"] = stamp
            if stamp:
                log.info("loaded %s", path)
            else:  # a typo in a --policies path would otherwise enforce nothing, silently
                log.warning("%s does not exist: using an empty one until it appears (check the path)", path)
        except Exception as exc:
            if state["stamp"] is None:
                raise
            log.error("cannot reload %s, keeping the previous version: %s", path, exc)
            state["stamp"] = stamp
        return state["value"]

    return current


def run_tunnel(inputs: TunnelInputs) -> None:
    """The process entry point: one uvloop event loop for every pod's proxies."""
    # Every proxied connection holds two sockets: allow as many as the hard limit does.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(Tunnel(inputs).run())
