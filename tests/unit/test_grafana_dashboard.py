"""The Grafana dashboard shipped in daemonset/ charts only series the code exports.

Why: a dashboard is checked by nobody until an incident, and a renamed metric (or a counter queried without
its `_total`) leaves a panel silently empty. Every metric a panel's query names must be one the tunnel,
the agent, the certificate manager or the CA registers, under the name Prometheus scrapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from nodeagent.metrics import AgentMetrics, CAMetrics, CertManagerMetrics
from nodeagent.ztunnel.metrics import TunnelMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "daemonset" / "grafana-dashboard.json"
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_series() -> set[str]:
    registry = CollectorRegistry()
    TunnelMetrics(registry)
    AgentMetrics(registry)
    CertManagerMetrics(registry)
    CAMetrics(registry)
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}


def queries() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    return {f"{p['title']} [{t['refId']}]": t["expr"] for p in dash["panels"] for t in p.get("targets", ())}


def test_every_queried_metric_is_exported() -> None:
    exported = exported_series()
    for where, expr in queries().items():
        named = set(re.findall(r"\b(?:istio_tcp|nodeagent)_\w+", expr))
        assert named, f"{where}: queries no nodeagent or istio_tcp series: {expr}"
        assert named <= exported, f"{where}: {sorted(named - exported)} is not exported by any nodeagent component"


def test_the_node_health_series_are_charted() -> None:
    charted = {m for expr in queries().values() for m in re.findall(r"\b(?:istio_tcp|nodeagent)_\w+", expr)}
    for series in (
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "nodeagent_agent_pods",
        "nodeagent_agent_zds_tunnels",
        "nodeagent_agent_capture_failures_total",
        "nodeagent_tunnel_pods",
        "nodeagent_cert_expiry_timestamp_seconds",
    ):
        assert series in charted, f"no panel charts {series}"
