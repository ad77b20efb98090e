"""Prometheus metrics, one small object per subsystem, each registered on an injected registry.

Why this module exists: every subsystem records what happened (CA decisions, certificate fetches, the
node agent's capture) under stable metric names, and tests need to read those numbers from a fresh
registry of their own instead of the process-global one. So each subsystem gets a class here whose
constructor takes a `CollectorRegistry`; the process builds one registry and hands it to every subsystem
and to the admin server that exposes it.

What it deliberately does not do: no HTTP (nodeagent.admin serves /metrics), no global registry, no
label values derived from unbounded input except workload identities, which are bounded by the pods on
the node and removed when an identity is forgotten.

Pattern for a new subsystem: a class whose __init__(registry) creates its collectors with
`registry=registry`, named `nodeagent_<subsystem>_<what>[_total|_seconds]`, plus small methods that
name the events (`record_x(...)`) so call sites never spell label names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CAMetrics:
    """The CA server: one counter of decisions by result and reason, and signing latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "nodeagent_ca_requests",
            "CreateCertificate requests by result (issued|denied|invalid|error) and reason.",
            ["result", "reason"],
            registry=registry,
        )
        self.duration = Histogram(
            "nodeagent_ca_request_duration_seconds",
            "Time to authenticate, authorize and sign one CreateCertificate request.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=registry,
        )
        self.signer_expiry = Gauge(
            "nodeagent_ca_signer_expiry_timestamp_seconds",
            "When the CA's signing chain (its certificate or a parent) expires, Unix time: alert well before.",
            registry=registry,
        )

    def record(self, result: str, reason: str, seconds: float) -> None:
        self.requests.labels(result=result, reason=reason).inc()
        self.duration.observe(seconds)


class CertManagerMetrics:
    """The tunnel's certificate manager: fetch outcomes, backoff and remaining validity per identity."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.fetches = Counter(
            "nodeagent_cert_fetches",
            "Certificate fetches from the CA by result (ok|error).",
            ["result"],
            registry=registry,
        )
        self.backoffs = Counter(
            "nodeagent_cert_fetch_backoffs",
            "Times a failed fetch was retried after a backoff delay.",
            registry=registry,
        )
        self.backoff_seconds = Gauge(
            "nodeagent_cert_backoff_seconds",
            "Current retry delay per identity (0 when the last fetch succeeded).",
            ["identity"],
            registry=registry,
        )
        self.expiry = Gauge(
            "nodeagent_cert_expiry_timestamp_seconds",
            "notAfter of the certificate held for each identity (unix time).",
            ["identity"],
            registry=registry,
        )
        self.identities = Gauge(
            "nodeagent_cert_identities",
            "Identities the manager holds certificates for (or is fetching).",
            registry=registry,
        )
        self.in_flight = Gauge(
            "nodeagent_cert_fetches_in_flight",
            "CA requests currently outstanding.",
            registry=registry,
        )

    def fetched(self, identity: str, not_after: float) -> None:
        self.fetches.labels(result="ok").inc()
        self.expiry.labels(identity=identity).set(not_after)
        self.backoff_seconds.labels(identity=identity).set(0)

    def failed(self, identity: str, delay: float) -> None:
        self.fetches.labels(result="error").inc()
        self.backoffs.inc()
        self.backoff_seconds.labels(identity=identity).set(delay)

    def forget(self, identity: str) -> None:
        for gauge in (self.expiry, self.backoff_seconds):
            with contextlib.suppress(KeyError):
                gauge.remove(identity)


class AgentMetrics:
    """The node agent: its pods by capture state, capture repairs and failures, tunnels connected over ZDS.

    Alerts these are for (istio-cni's node agent serves the same kind on :15014): pods stuck `pending` or
    `failed`, drift repaired over and over (something keeps undoing capture), and no tunnel connected.
    Labels are coarse and bounded - a state, a capture backend, an operation - never a pod.
    """

    OPERATIONS = ("install", "remove", "probe_bypass")

    def __init__(self, registry: CollectorRegistry, *, repair_kinds: Iterable[str] = ()) -> None:
        """`repair_kinds`: the `kind` values to show at 0 from the start (the capture backend's name and
        "probe_bypass"), so that an alert on `increase()` sees the first repair too."""
        self.pods = Gauge(
            "nodeagent_agent_pods",
            "This node's enrolled pods by capture state: enabled (captured, a tunnel serves it), pending (captured "
            "but no tunnel acked it: it passes no traffic), failed (capture incomplete, retried every verify). "
            "pending or failed above 0 for minutes: `nodeagent inspect redirects --node NODE --verify` and the "
            "agent's log say why; pending alone usually means no tunnel is connected (nodeagent_agent_zds_tunnels).",
            ["state"],
            registry=registry,
        )
        self.repairs = Counter(
            "nodeagent_agent_capture_repairs",
            "Capture drift found by the periodic verification and repaired, by kind: the capture backend "
            "(iptables|ebpf) for a pod's capture, probe_bypass for the node's kubelet-probe chain. A steady rate "
            "means something keeps undoing capture (another agent, the CNI, a script flushing rules): the agent "
            "logs what it fixed ('capture drift in POD repaired: ...', 'found and fixed: ...').",
            ["kind"],
            registry=registry,
        )
        self.failures = Counter(
            "nodeagent_agent_capture_failures",
            "Capture operations that failed, by operation (install|remove|probe_bypass); each is retried with the "
            "next verify, so a pod that keeps failing counts once per verify interval. Rising: the agent's log "
            "says why ('cannot capture POD: ...', 'cannot remove ...', 'kubelet-probe bypass on the node: ...').",
            ["operation"],
            registry=registry,
        )
        self.zds_tunnels = Gauge(
            "nodeagent_agent_zds_tunnels",
            "Tunnels connected to this agent over ZDS now (2 briefly during a hand-over). 0 for more than a "
            "few seconds: no tunnel serves this node's pods and their captured traffic is refused; check the "
            "tunnel container and that it uses the agent's --zds-socket path.",
            registry=registry,
        )
        self.zds_connections = Counter(
            "nodeagent_agent_zds_connections",
            "Tunnel connections accepted on the ZDS socket. Rising faster than tunnels restart: tunnels keep "
            "reconnecting; the agent logs why each was dropped ('dropped PEER: ...').",
            registry=registry,
        )
        for kind in repair_kinds:
            self.repairs.labels(kind=kind)
        for operation in self.OPERATIONS:
            self.failures.labels(operation=operation)

    def set_pods(self, counts: Mapping[str, int]) -> None:
        """The pods by state now; pass every state, 0 included, so a state that empties shows 0."""
        for state, count in counts.items():
            self.pods.labels(state=state).set(count)

    def repaired(self, kind: str) -> None:
        self.repairs.labels(kind=kind).inc()

    def failed(self, operation: str) -> None:
        if operation not in self.OPERATIONS:
            raise ValueError(f"unknown capture operation {operation!r}; one of {', '.join(self.OPERATIONS)}")
        self.failures.labels(operation=operation).inc()

    def tunnels_connected(self, count: int) -> None:
        self.zds_tunnels.set(count)

    def tunnel_accepted(self) -> None:
        self.zds_connections.inc()
