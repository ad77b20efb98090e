"""Prometheus metrics, one small object per subsystem, each registered on an injected registry.

Why this module exists: every subsystem records what happened (CA decisions, certificate fetches,
later tunnel connections) under stable metric names, and tests need to read those numbers from a fresh
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
