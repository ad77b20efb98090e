"""The node agent's Prometheus endpoint (`nodeagent agent --metrics`), scraped over HTTP while the agent runs.

Why: the agent exposed no metrics, so pods stuck pending or failed, capture repaired over and over, and no
tunnel connected over ZDS were visible only in its log. The agent runs for real (inventory file, reconciler,
ZDS server, status file, metrics endpoint) with a capture backend and a kubelet-probe chain the test makes
drift or fail on demand, and a tunnel-side ZdsClient that connects and goes away; the oracle is what a
scrape of /metrics returns.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from agent_fakes import NODE1_PODS, FakeCapture, node1_agent_config
from metrics_scrape import scrape, scrape_until

from nodeagent import admin
from nodeagent.agent import service
from nodeagent.capture.backend import CaptureError
from nodeagent.capture.iptables import Flavour
from nodeagent.model import Pod
from nodeagent.zds.codec import Workload
from nodeagent.ztunnel.zds_client import Backoff, ZdsClient

Samples = dict[str, float]


class Capture(FakeCapture):
    """Succeeds, except for the pods the test names: `drift` reports drift on a pod's next install (as found and
    repaired), `fail` makes its next install fail."""

    def __init__(self) -> None:
        super().__init__()
        self.drift: set[str] = set()
        self.fail: set[str] = set()

    async def install(self, pod: Pod, netns: str) -> tuple[str, ...]:
        if pod.key in self.fail:
            self.fail.discard(pod.key)
            raise CaptureError(f"iptables-restore failed in {netns}")
        if pod.key in self.drift:
            self.drift.discard(pod.key)
            return ("nat chain NODEAGENT_OUTPUT is missing",)
        return ()


class ProbeChain:
    """The node's kubelet-probe chain: missing at the first ensure() (a node's first run: not drift), then
    whatever the test says."""

    def __init__(self, *args: object) -> None:
        self.calls = 0
        self.drift = False
        self.fail = False

    async def ensure(self, pods: object) -> tuple[str, ...]:
        self.calls += 1
        if self.fail:
            self.fail = False
            raise CaptureError("iptables-restore: Another app is currently holding the xtables lock")
        if self.calls == 1 or self.drift:
            self.drift = False
            return ("nat chain NODEAGENT_POSTRT is missing",)
        return ()

    async def remove(self) -> bool:
        return False


class Tunnel:
    """The tunnel's side of ZDS: acks every pod."""

    async def on_add(self, workload: Workload, netns_fd: int) -> None:
        pass

    async def on_keep(self, uid: str) -> None:
        pass

    async def on_del(self, uid: str) -> None:
        pass

    async def on_snapshot_done(self, known_uids: frozenset[str]) -> None:
        pass


def pods(state: str) -> str:
    return f'nodeagent_agent_pods{{state="{state}"}}'


REPAIRS = 'nodeagent_agent_capture_repairs_total{{kind="{}"}}'.format
FAILURES = 'nodeagent_agent_capture_failures_total{{operation="{}"}}'.format
TUNNELS, ACCEPTED = "nodeagent_agent_zds_tunnels", "nodeagent_agent_zds_connections_total"


async def until(address: tuple[str, int], check: Callable[[Samples], bool], what: str) -> Samples:
    return await scrape_until(address, check, what)


def node1_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics: tuple[str, int]
) -> tuple[service.Agent, Capture]:
    """node1's agent (two enrolled pods) verifying every 0.1 s, serving metrics on `metrics`."""
    capture = Capture()
    monkeypatch.setattr(service.IptablesBackend, "for_host", lambda flavour: capture)
    monkeypatch.setattr(service, "ProbeBypass", ProbeChain)
    config = node1_agent_config(tmp_path, verify_interval=0.1, metrics=metrics)
    return service.Agent(config, Flavour.NFT), capture


@asynccontextmanager
async def running_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics: tuple[str, int] = ("127.0.0.1", 0)
) -> AsyncIterator[tuple[service.Agent, Capture]]:
    agent, capture = node1_agent(tmp_path, monkeypatch, metrics)
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        yield agent, capture
    finally:
        stop.set()
        assert await running == 0


async def bound(agent: service.Agent) -> tuple[str, int]:
    async with asyncio.timeout(5):
        while agent.metrics_address is None:  # noqa: ASYNC110 (bound at the start of run())
            await asyncio.sleep(0.01)
    return agent.metrics_address


@pytest.mark.timeout(60)
async def test_the_agent_serves_pod_states_repairs_failures_and_zds_tunnels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_agent(tmp_path, monkeypatch) as (agent, capture):
        address = await bound(agent)
        status, alias = await scrape(address, "/stats/prometheus")  # Istio's scrape path, as the tunnel serves it
        assert status == 200 and alias[TUNNELS] == 0

        # captured, no tunnel: pending (they pass no traffic), and nothing says a tunnel is there
        got = await until(address, lambda s: s[pods("pending")] == 2, "both pods pending")
        assert (got[pods("enabled")], got[pods("failed")], got[TUNNELS], got[ACCEPTED]) == (0, 0, 0, 0)

        client = ZdsClient(Tunnel(), agent.config.zds_socket, backoff=Backoff(initial=0.01, maximum=0.01))
        client.start()
        try:
            got = await until(address, lambda s: s[pods("enabled")] == 2, "both pods enabled by the tunnel's acks")
            assert (got[pods("pending")], got[TUNNELS], got[ACCEPTED]) == (0, 1, 1)

            # Drift: the kubelet-probe chain was only created so far (not a repair), then something flushes
            # it and both pods' rules. Each repair counts once, by kind, whatever the verify rounds after it.
            got = await until(address, lambda s: agent.probes.calls >= 2, "the probe chain checked twice")
            assert (got[REPAIRS("fake")], got[REPAIRS("probe_bypass")]) == (0, 0)
            capture.drift |= set(NODE1_PODS)
            agent.probes.drift = True
            await until(address, lambda s: s[REPAIRS("fake")] == 2 and s[REPAIRS("probe_bypass")] == 1, "repairs")
            calls = agent.probes.calls
            got = await until(address, lambda s: agent.probes.calls >= calls + 3, "three more verify rounds")
            assert (got[REPAIRS("fake")], got[REPAIRS("probe_bypass")]) == (2, 1)

            # Failures, by operation; the next verify retries and the pod is enabled again.
            capture.fail.add("shop/frontend")
            agent.probes.fail = True
            got = await until(address, lambda s: s[FAILURES("install")] == 1 and s[FAILURES("probe_bypass")] == 1, "")
            assert got[FAILURES("remove")] == 0
            await until(address, lambda s: s[pods("enabled")] == 2, "frontend captured and enabled again")
        finally:
            await client.close()

        # the tunnel went away: alertable as no tunnel, and the pods pass no traffic (pending)
        got = await until(address, lambda s: s[TUNNELS] == 0, "no tunnel connected")
        await until(address, lambda s: s[pods("pending")] == 2 and s[pods("enabled")] == 0, "both pods pending")
        assert (await scrape(address))[1][ACCEPTED] == 1
    with pytest.raises(OSError):  # the agent stopped: so did its metrics endpoint
        await scrape(address)


@pytest.mark.timeout(60)
async def test_a_taken_metrics_port_is_retried_and_never_holds_the_agent_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """hostNetwork: during a rolling update the old pod's agent holds :15014 until it stops."""
    monkeypatch.setattr(admin, "BIND_RETRY_S", 0.05)
    old = socket.create_server(("127.0.0.1", 0))
    port = old.getsockname()[1]
    try:
        async with running_agent(tmp_path, monkeypatch, metrics=("127.0.0.1", port)) as (agent, _):
            async with asyncio.timeout(10):
                while not agent.ready:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert f"agent metrics endpoint: cannot listen on 127.0.0.1:{port}: Address already in use" in caplog.text
            old.close()  # the old pod stopped
            got = await until(("127.0.0.1", port), lambda s: s[pods("pending")] == 2, "metrics on the freed port")
            assert got[TUNNELS] == 0
    finally:
        old.close()


async def test_an_address_that_is_not_this_hosts_stops_the_agent_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, _ = node1_agent(tmp_path, monkeypatch, metrics=("192.0.2.1", 15014))
    with pytest.raises(SystemExit, match=r"--metrics 192\.0\.2\.1:15014: cannot listen on 192\.0\.2\.1:15014: "):
        await agent.run(asyncio.Event())  # as `nodeagent agent` runs it: the message is its last word
    assert agent.metrics_address is None and not agent.ready  # stopped before anything was served
