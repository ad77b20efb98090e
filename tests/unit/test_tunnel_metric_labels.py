"""destination_service in the Istio metrics: the Service's name in the cluster's DNS domain.

Istio labels it with the Service hostname, `<name>.<namespace>.svc.<domain>`; a cluster whose kubelets run
with another --cluster-domain must not see every service named as if it were cluster.local.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.ztunnel.metrics import ConnectionRecord, ConnectionTable, Direction, TunnelMetrics


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
