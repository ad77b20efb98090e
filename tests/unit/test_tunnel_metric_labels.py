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
from nodeagent.ztunnel.metrics import (
    ConnectionRecord,
    ConnectionTable,
    Direction,
    Peer,
    TunnelMetrics,
    format_access_log,
)


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


def _samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for m in registry.collect() for s in m.samples if s.name == name]


def test_pods_of_one_workload_share_series_and_the_log_names_the_pod(caplog: pytest.LogCaptureFixture) -> None:
    """source_/destination_workload is the workload (Istio's), so a rollout adds no series; the access log
    and the connection table keep the pod's name, as ztunnel's do."""
    registry = CollectorRegistry()
    table = ConnectionTable(TunnelMetrics(registry))
    for i, name in enumerate(("web-7d9f8c-abcde", "web-7d9f8c-fghij", "web-5c6b7a-klmno")):
        pod = Pod(
            name, "shop", f"uid-{i}", "node1", "web", ipaddress.IPv4Address(f"10.0.0.{i + 2}"), workload_name="web"
        )
        record = ConnectionRecord(
            Direction.OUTBOUND, f"10.0.0.{i + 2}:40000", "10.0.1.9:80", src=Peer.of(pod, None, "lab")
        )
        table.pending(record)
        table.established(record)
        assert table.dump()["outbound"][0]["srcWorkload"] == f"{name}.shop"
        with caplog.at_level("INFO", logger="nodeagent.access"):
            table.finished(record, 1, 2)
        assert f'src.workload="{name}"' in caplog.records[-1].getMessage()
    [(labels, value)] = _samples(registry, "istio_tcp_connections_opened_total")
    assert (labels["source_workload"], labels["source_canonical_service"], value) == ("web", "web", 3)


class _Relay:
    def __init__(self) -> None:
        self.bytes_in = self.bytes_out = 0

    def abort(self, reason: BaseException | None = None) -> None: ...

    def close(self) -> None: ...


def test_byte_counters_move_while_the_connection_is_open() -> None:
    """Like ztunnel's: flush_bytes (before every scrape) adds what open connections moved; finished() adds
    only the rest, so nothing is counted twice."""
    registry = CollectorRegistry()
    table = ConnectionTable(TunnelMetrics(registry))
    record = ConnectionRecord(Direction.INBOUND, "10.0.0.1:40000", "10.0.0.2:8080", mutual_tls=True)
    relay = record.relay = _Relay()
    table.pending(record)
    table.established(record)

    def totals() -> tuple[float, float]:
        received = sum(v for _, v in _samples(registry, "istio_tcp_received_bytes_total"))
        sent = sum(v for _, v in _samples(registry, "istio_tcp_sent_bytes_total"))
        return received, sent

    table.flush_bytes()
    assert totals() == (0, 0)
    relay.bytes_in, relay.bytes_out = 1000, 50
    table.flush_bytes()
    assert totals() == (1000, 50)
    table.flush_bytes()  # nothing new moved
    assert totals() == (1000, 50)
    relay.bytes_in, relay.bytes_out = 1500, 70
    table.finished(record, 1500, 70)
    assert totals() == (1500, 70)
    table.flush_bytes()  # closed connections are no longer flushed
    assert totals() == (1500, 70)
    [(labels, _)] = _samples(registry, "istio_tcp_received_bytes_total")
    assert labels["response_flags"] == "-"


@pytest.mark.parametrize(
    ("direction", "logged"),
    [(Direction.OUTBOUND, "outbound"), (Direction.INBOUND, "inbound"), (Direction.INBOUND_PLAINTEXT, "inbound")],
)
def test_access_log_direction_is_ztunnels(direction: Direction, logged: str) -> None:
    """ztunnel logs only "inbound" or "outbound"; the plaintext listener is an inbound one."""
    line = format_access_log(ConnectionRecord(direction, "10.0.0.1:40000", "10.0.0.2:8080"), 1, 2, "")
    assert f'direction="{logged}"' in line
