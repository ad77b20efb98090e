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
from prometheus_client.metrics import MetricWrapperBase

from nodeagent.metrics import AgentMetrics, CAMetrics, CertManagerMetrics
from nodeagent.ztunnel.metrics import TunnelMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "daemonset" / "grafana-dashboard.json"
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_series() -> dict[str, frozenset[str]]:
    """Each series name Prometheus scrapes from a nodeagent component -> its label names."""
    registry = CollectorRegistry()
    components = (TunnelMetrics(registry), AgentMetrics(registry), CertManagerMetrics(registry), CAMetrics(registry))
    series = {}
    for component in components:
        for metric in vars(component).values():
            if isinstance(metric, MetricWrapperBase):
                for suffix in _SUFFIXES[metric._type]:
                    series[metric._name + suffix] = frozenset(metric._labelnames)
    return series


def queries() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    return {f"{p['title']} [{t['refId']}]": t["expr"] for p in dash["panels"] for t in p.get("targets", ())}


def test_every_queried_metric_and_label_is_exported() -> None:
    """Names, and the labels a panel selects on (`name{label=...}`) or groups by (`by (label, ...)`): a
    renamed label empties a panel as silently as a renamed metric."""
    exported = exported_series()
    for where, expr in queries().items():
        named = set(re.findall(r"\b(?:istio_tcp|nodeagent)_\w+", expr))
        assert named, f"{where}: queries no nodeagent or istio_tcp series: {expr}"
        assert named <= exported.keys(), f"{where}: {sorted(named - exported.keys())} is not exported"
        for name, selector in re.findall(r"\b((?:istio_tcp|nodeagent)_\w+)\{([^}]*)\}", expr):
            selected = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            assert selected <= exported[name], f"{where}: {name} has no label {sorted(selected - exported[name])}"
        grouped = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
        available = set().union(*(exported[name] for name in named))
        assert grouped <= available, f"{where}: grouped by {sorted(grouped - available)}, a label none of {named} has"


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
