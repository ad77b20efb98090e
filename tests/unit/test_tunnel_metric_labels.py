"""Labels of the Istio metrics that are derived, not copied.

destination_service: Istio labels it with the Service hostname, `<name>.<namespace>.svc.<domain>`; a cluster
whose kubelets run with another --cluster-domain must not see every service named as if it were cluster.local.
*_canonical_service/revision and *_app/version: Istio's CanonicalService rule, and ztunnel's use of it.
"""

from __future__ import annotations

import ipaddress

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.model import Pod
from nodeagent.ztunnel.metrics import ConnectionRecord, ConnectionTable, Direction, Peer, TunnelMetrics


@pytest.mark.parametrize(
    ("domain", "service", "expected"),
    [
        (None, "shop/web", "web.shop.svc.cluster.local"),  # the default
        ("corp.example", "shop/web", "web.shop.svc.corp.example"),
        ("corp.example", None, "unknown"),  # no service: the client dialled a pod address
    ],
)
def test_destination_service_uses_the_cluster_domain(domain: str | None, service: str | None, expected: str) -> None:
    registry = CollectorRegistry()
    metrics = TunnelMetrics(registry)
    table = ConnectionTable(metrics) if domain is None else ConnectionTable(metrics, domain)
    record = ConnectionRecord(Direction.OUTBOUND, "10.0.0.1:40000", "10.0.0.2:8080", service=service)
    table.pending(record)
    table.established(record)
    table.finished(record, 1, 2)
    [sample] = [s for m in registry.collect() for s in m.samples if s.name == "istio_tcp_connections_opened_total"]
    assert sample.labels["destination_service"] == expected
    assert sample.labels["destination_service_name"] == (service.split("/")[1] if service else "unknown")


@pytest.mark.parametrize(
    ("labels", "service", "revision"),
    [
        # Istio's CanonicalService: the canonical-* labels, then app.kubernetes.io/*, then app/version.
        ({"app": "reviews-legacy", "app.kubernetes.io/name": "reviews", "version": "old"}, "reviews", "old"),
        ({"version": "old", "app.kubernetes.io/version": "v2", "app": "reviews"}, "reviews", "v2"),
        (
            {"service.istio.io/canonical-name": "rev", "service.istio.io/canonical-revision": "c1", "app": "x"},
            "rev",
            "c1",
        ),
        ({}, "web-7d9f", "latest"),  # neither: the workload's name and "latest"
    ],
)
def test_canonical_service_and_revision_follow_istio(labels: dict[str, str], service: str, revision: str) -> None:
    pod = Pod("web-7d9f", "shop", "uid-1", "node1", "web", ipaddress.IPv4Address("10.0.0.2"), labels=labels)
    peer = Peer.of(pod, None, "lab")
    assert (peer.canonical_service, peer.canonical_revision) == (service, revision)
    # ztunnel reports app/version as the canonical pair: so do the metric labels.
    registry = CollectorRegistry()
    table = ConnectionTable(TunnelMetrics(registry))
    record = ConnectionRecord(Direction.INBOUND, "10.0.0.1:40000", "10.0.0.2:8080", dst=peer)
    table.pending(record)
    table.established(record)
    [sample] = [s for m in registry.collect() for s in m.samples if s.name == "istio_tcp_connections_opened_total"]
    assert (sample.labels["destination_app"], sample.labels["destination_version"]) == (service, revision)
