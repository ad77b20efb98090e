"""The node agent in Kubernetes mode: the API server as workload source, pod status through pods/status.

Why this module exists: `nodeagent agent --kubernetes` must enroll exactly as with the inventory file,
so this module swaps the two edges that differ and nothing else:

- `KubeWorkloads` has the interface of agent/workloads.InventoryFile (`check()`, `current`, `loaded`,
  `error`, `run()`), fed by inventory/kube.KubeSource watching this node's pods (field selector) and
  every namespace. It hands over an Inventory only once every resource has been listed (a pod seen
  before its namespace would look unenrolled and be swept), coalesces bursts of events, and on API
  errors keeps handing over nothing new: the last good inventory stays in force.
- `KubeAgent` is the file-mode Agent with that source, plus the pod-status task (agent/kube_status.py)
  fed from the same per-pod results the status file gets (kernel-verified, tunnel-acked), and with the
  annotations the watch shows, so that what an earlier run left on the node's pods is corrected.

Readiness (service.Agent.readiness_pending) waits for the first complete list of this node's pods and
namespaces, so an agent whose list is forbidden or whose API server is unreachable is never ready, and
says why. Once ready, an API failure that lasts longer than `api_failure_grace` (default 60 s: longer
than one retry at the source's longest backoff, up to 45 s with jitter) turns it unready until the API server
answers again: the last good inventory stays in force and capture stays in place, but no new pod is
enrolled and no deleted one released, and nothing else would show it - the probe only marks the pod
unready (no liveness probe: the data plane is never restarted for it). A failure shorter than that (a
watch cut, an API server restarting) does not flap the pod.

Pods' netns are found by pod IP (agent/kube_netns.py: the CNI's bind mounts, else /proc), which works
on real nodes and in the lab alike; `--kube-netns pattern` keeps the file mode's name pattern instead.

What it deliberately does not do: no enrollment logic (enrollment.py), no kubeconfig reading at import.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
from prometheus_client import CollectorRegistry

from nodeagent.agent import admin_endpoint
from nodeagent.agent.enrollment import Status
from nodeagent.agent.inspect import Layout
from nodeagent.agent.kube_netns import ProcNetnsResolver
from nodeagent.agent.kube_status import PodAnnotation, PodStatusWriter
from nodeagent.agent.service import Agent, AgentConfig
from nodeagent.capture.iptables import Flavour
from nodeagent.inventory.kube import KubeSource, api_client
from nodeagent.model import Inventory

log = logging.getLogger(__name__)

COALESCE_S = 0.02
API_FAILURE_GRACE_S = 60.0


@dataclass(frozen=True, slots=True)
class KubeSettings:
    kubeconfig: Path | None = None
    context: str | None = None
    cluster_name: str = "kubernetes"
    trust_domain: str = "cluster.local"
    status: bool = True  # write ambient.istio.io/redirection on pods/status
    # How pod netns are found: "proc" (by pod IP from the bind mounts in --netns-dir and the processes
    # in `proc`: agent/kube_netns.py) or "pattern" (the agent's --netns-dir/--netns-pattern).
    netns: str = "proc"
    proc: str = "/proc"
    # The agent's admin endpoint (agent/admin_endpoint.py: `redirects` for `inspect redirects --node`);
    # None: not served.
    admin: str | None = "127.0.0.1:15002"
    # How long the API server may fail (list/watch errors) before a ready agent reports itself unready.
    api_failure_grace: float = API_FAILURE_GRACE_S
    # Tests pass a ready client (the stand-in); otherwise one is built from kubeconfig / in-cluster.
    client: Callable[[], kubernetes.client.ApiClient] | None = None

    def api(self) -> kubernetes.client.ApiClient:
        return self.client() if self.client is not None else api_client(self.kubeconfig, self.context)


class KubeWorkloads:
    """InventoryFile's interface over a KubeSource of one node's pods and every namespace."""

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        node: str,
        on_change: Callable[[Inventory], None],
        *,
        on_error: Callable[[str], None] = lambda problem: None,
        cluster_name: str = "kubernetes",
        trust_domain: str = "cluster.local",
        **source_options: Any,
    ) -> None:
        self.path = f"the API server (pods on node {node}, namespaces)"
        self.node = node
        self._no_pods_said = False  # the warning that the node has no pod at all was logged (and still holds)
        self._on_change = on_change
        self._on_error = on_error
        self.source = KubeSource(
            api,
            node=node,
            services=False,
            policies=False,
            cluster_name=cluster_name,
            trust_domain=trust_domain,
            on_change=self._poke,
            **source_options,
        )
        self.current: Inventory | None = None
        self.loaded = asyncio.Event()
        self.error: str | None = None
        self.failing_since: float | None = None  # time.monotonic() of the first error of the current run of them
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()

    def _poke(self) -> None:  # from a reflector thread
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def check(self) -> bool:
        """Hand over the source's inventory if it changed; True when a new one was handed over."""
        error = self.source.error
        if error != self.error:
            self.error = error
            if error is None:
                self.failing_since = None
            elif self.failing_since is None:
                self.failing_since = time.monotonic()
            self._on_error(error or "")
        if not self.source.synced.is_set():
            return False
        inventory = self.source.current()
        if inventory is self.current:
            return False
        self.current = inventory
        self._say_if_no_pods(inventory)
        self.loaded.set()
        self._on_change(inventory)
        return True

    def _say_if_no_pods(self, inventory: Inventory) -> None:
        """A node with no pod at all is a wrong --node: the DaemonSet's own pod (hostNetwork, never enrolled) is
        always listed on its node, and the field selector matches spec.nodeName exactly - which a machine's
        hostname is not always. Said once, and again if it comes back after pods were seen."""
        empty = not inventory.pods_on(self.node)
        if empty and not self._no_pods_said:
            log.warning(
                "the API server lists no pod on node %r, not even the nodeagent DaemonSet's: is --node the node's name "
                "as `kubectl get nodes` prints it? (the DaemonSet passes spec.nodeName; a hostname may differ) "
                "Nothing is enrolled until pods show up on that node",
                self.node,
            )
        self._no_pods_said = empty

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.source.start()
        try:
            while True:
                await self._wake.wait()
                await asyncio.sleep(COALESCE_S)  # one hand-over for a burst of events
                self._wake.clear()
                self.check()
        finally:
            self.source.stop(timeout=0)


class KubeAgent(Agent):
    def __init__(
        self,
        config: AgentConfig,
        flavour: Flavour,
        *,
        settings: KubeSettings,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(config, flavour, registry=registry)
        api = settings.api()
        self.api_failure_grace = settings.api_failure_grace
        self.workloads = KubeWorkloads(
            api,
            config.node,
            self._on_inventory,
            on_error=lambda problem: self._status_changed(),
            cluster_name=settings.cluster_name,
            trust_domain=settings.trust_domain,
        )
        self.inventory = self.workloads  # type: ignore[assignment]
        self.pod_status = PodStatusWriter(api) if settings.status else None
        if settings.netns == "proc":
            self.reconciler.use_resolver(ProcNetnsResolver(proc=settings.proc, netns_dir=config.netns_dir))
        self.admin = None
        if settings.admin is not None:  # its own resolver: the report must not lean on the reconciler's
            layout = Layout(config.netns_dir, config.netns_pattern, admin_endpoint.OWN_NETNS, config.state_dir)
            resolver = (
                ProcNetnsResolver(proc=settings.proc, netns_dir=config.netns_dir) if settings.netns == "proc" else None
            )
            server = admin_endpoint.redirects_server(config.node, lambda: self.inventory.current, layout, resolver)
            self.admin = (server, admin_endpoint.parse_address(settings.admin))

    async def run(self, stop: asyncio.Event) -> int:
        try:
            if self.admin is not None:  # first: an address it can never listen on stops the agent at once
                server, address = self.admin
                await self._serve_endpoint(server, address, flag="--admin", what="agent admin endpoint", task="admin")
            if self.pod_status is not None:
                self._guard(self.pod_status.run(), "pod-status")
            return await super().run(stop)
        finally:
            if self.admin is not None:
                await self.admin[0].stop()

    def readiness_pending(self) -> str | None:
        """The file-mode agent's readiness, and unready while the API server has failed for longer than the
        grace (module docstring)."""
        pending = super().readiness_pending()
        since = self.workloads.failing_since
        if pending is None and since is not None:
            failing = time.monotonic() - since
            if failing >= self.api_failure_grace:
                return (
                    f"the API server has failed for {failing:.0f} s: {self.workloads.error}; the pods listed "
                    "before stay captured, but no new pod is enrolled until it answers"
                )
        return pending

    def _source_problem(self) -> str | None:
        # The source's own: before its first complete list nothing wakes KubeWorkloads.check() on an error.
        return self.workloads.source.error

    def _write_status(self, *, running: bool) -> None:
        super()._write_status(running=running)
        # Superseded (a rolling update's new agent holds the ZDS socket): the pods' annotations are the new
        # agent's to write. This one's tunnel drains and leaves it, and what it would publish then (every
        # pod `pending`) is about its own tunnel, not the node's pods, which the new agent's tunnel serves.
        if self.pod_status is not None and running and not self.superseded():
            settled = self.statuses_settled
            pods: dict[str, tuple[str, str, Status]] = {
                uid: (r.pod.namespace, r.pod.name, self.reconciler.status(uid))
                for uid, r in self.reconciler.records.items()
                if settled
            }
            self.pod_status.publish(pods, self._seen_annotations(settled))

    def _seen_annotations(self, settled: bool) -> dict[str, PodAnnotation]:
        """The annotation of this node's pods as the watch shows it, but for pods enrolled and not reconciled
        yet (a restarted agent's first pass), or not `settled` (no tunnel could ack them yet): their status is
        not known, so what they carry stays meanwhile - an `enabled` pod is not flipped to `pending` and back
        while the tunnel that serves it reconnects to a restarted agent."""
        inventory = self.inventory.current
        if inventory is None:
            return {}
        return {
            p.uid: PodAnnotation(p.namespace, p.name, p.redirection)
            for p in inventory.pods_on(self.config.node)
            if (settled and p.uid in self.reconciler.records) or not self.reconciler.wants(p.uid)
        }
