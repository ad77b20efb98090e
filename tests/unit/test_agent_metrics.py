"""The node agent's metrics (nodeagent.metrics.AgentMetrics) and its `--metrics` option, read as a scrape reads
them (tests/metrics_scrape.py) from a registry of the test's own."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from metrics_scrape import registry_samples
from prometheus_client import CollectorRegistry

from nodeagent.agent import commands, service
from nodeagent.agent.__main__ import main as agent_main
from nodeagent.metrics import AgentMetrics

Event = Callable[[AgentMetrics], None]


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            [],
            {
                # every series an alert reads is there from the start, at 0: increase() sees the first event
                'nodeagent_agent_capture_repairs_total{kind="iptables"}': 0,
                'nodeagent_agent_capture_repairs_total{kind="probe_bypass"}': 0,
                'nodeagent_agent_capture_failures_total{operation="install"}': 0,
                'nodeagent_agent_capture_failures_total{operation="remove"}': 0,
                'nodeagent_agent_capture_failures_total{operation="probe_bypass"}': 0,
                "nodeagent_agent_zds_tunnels": 0,
                "nodeagent_agent_zds_connections_total": 0,
            },
            id="fresh",
        ),
        pytest.param(
            [
                lambda m: m.set_pods({"enabled": 2, "pending": 1, "failed": 1}),
                lambda m: m.set_pods({"enabled": 4, "pending": 0, "failed": 0}),
            ],
            {
                'nodeagent_agent_pods{state="enabled"}': 4,
                'nodeagent_agent_pods{state="pending"}': 0,  # emptied: 0, not the last non-zero value
                'nodeagent_agent_pods{state="failed"}': 0,
            },
            id="pods-by-state",
        ),
        pytest.param(
            [lambda m: m.repaired("iptables"), lambda m: m.repaired("iptables"), lambda m: m.repaired("probe_bypass")],
            {
                'nodeagent_agent_capture_repairs_total{kind="iptables"}': 2,
                'nodeagent_agent_capture_repairs_total{kind="probe_bypass"}': 1,
            },
            id="repairs",
        ),
        pytest.param(
            [lambda m: m.failed("install"), lambda m: m.failed("install"), lambda m: m.failed("remove")],
            {
                'nodeagent_agent_capture_failures_total{operation="install"}': 2,
                'nodeagent_agent_capture_failures_total{operation="remove"}': 1,
                'nodeagent_agent_capture_failures_total{operation="probe_bypass"}': 0,
            },
            id="failures",
        ),
        pytest.param(
            [
                lambda m: m.tunnel_accepted(),
                lambda m: m.tunnels_connected(1),
                lambda m: m.tunnel_accepted(),
                lambda m: m.tunnels_connected(2),  # a hand-over: the new tunnel beside the old one
                lambda m: m.tunnels_connected(1),
            ],
            {"nodeagent_agent_zds_tunnels": 1, "nodeagent_agent_zds_connections_total": 2},
            id="zds",
        ),
    ],
)
def test_agent_metrics_record_what_happened(events: list[Event], expected: dict[str, float]) -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, repair_kinds=("iptables", "probe_bypass"))
    for event in events:
        event(metrics)
    got = registry_samples(registry)
    assert {name: got.get(name) for name in expected} == expected
    labels = {name.partition("{")[2] for name in got if name.startswith("nodeagent_agent_")}
    assert not any("pod" in label or "uid" in label for label in labels), "never a series per pod"


def test_an_unknown_capture_operation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown capture operation 'install_all'"):
        AgentMetrics(CollectorRegistry()).failed("install_all")


@pytest.mark.parametrize(
    ("argv", "endpoint"),
    [
        ([], ("0.0.0.0", 15014)),  # istio-cni's node agent's port, every address
        (["--metrics", ":9115"], ("0.0.0.0", 9115)),
        (["--metrics", "127.0.0.1:9115"], ("127.0.0.1", 9115)),
        (["--metrics", "[::1]:9115"], ("::1", 9115)),
        (["--metrics", "off"], None),
        (["--metrics", ""], None),
    ],
)
def test_the_metrics_option_reaches_the_agent(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], endpoint: tuple[str, int] | None
) -> None:
    started: list[service.AgentConfig] = []
    monkeypatch.setattr(commands, "run", lambda config, factory=None: started.append(config) or 0)
    assert agent_main(["--node", "node1", *argv]) == 0
    assert started[0].metrics == endpoint


@pytest.mark.parametrize("bad", ["15014", "localhost:http", ":70000"])
def test_a_bad_metrics_address_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    monkeypatch.setattr(commands, "run", lambda config, factory=None: pytest.fail("the agent must not start"))
    with pytest.raises(SystemExit) as exit_:
        agent_main(["--node", "node1", "--metrics", bad])
    assert exit_.value.code == 2
    assert f"argument --metrics: {bad!r} is not host:port or :port; or off" in capsys.readouterr().err
