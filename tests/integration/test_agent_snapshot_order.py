"""A tunnel that connects while a (re)started agent is still on its first pass gets the whole snapshot.

Why: the tunnel drops every pod its ZDS snapshot does not name (closing the pod's listeners). An agent that
accepted tunnels before it had adopted the pods captured by its previous run sent a partial snapshot to a
tunnel reconnecting at that moment, and the enrolled pods' connections were refused until the pods were
added again (seen in eBPF mode, whose first pass is slower, as lost connects across an agent restart).

The agent runs for real (inventory file, reconciler, ZDS server, status file) with a capture backend that
takes 0.3 s per pod and a tunnel-side ZdsClient that retries every 10 ms from before the agent starts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from agent_fakes import NODE1_PODS, FakeCapture, NoProbes, node1_agent_config

from nodeagent.agent import service
from nodeagent.capture.iptables import Flavour
from nodeagent.model import pod_uid
from nodeagent.zds.codec import Workload
from nodeagent.ztunnel.zds_client import Backoff, ZdsClient


class Tunnel:
    """Records the uids of each snapshot it receives."""

    def __init__(self) -> None:
        self.snapshots: list[frozenset[str]] = []
        self.got_one = asyncio.Event()

    async def on_add(self, workload: Workload, netns_fd: int) -> None:
        os.close(netns_fd)

    async def on_keep(self, uid: str) -> None:
        pass

    async def on_del(self, uid: str) -> None:
        pass

    async def on_snapshot_done(self, known_uids: frozenset[str]) -> None:
        self.snapshots.append(known_uids)
        self.got_one.set()


@asynccontextmanager
async def agent_and_tunnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify_interval: float
) -> AsyncIterator[tuple[service.Agent, Tunnel]]:
    """node1's agent running for real, with a capture backend that takes 0.3 s per pod, and a tunnel-side
    ZdsClient retrying every 10 ms from before the agent starts (it connects the moment the agent accepts)."""
    monkeypatch.setattr(service.IptablesBackend, "for_host", lambda flavour: FakeCapture(install_delay=0.3))
    monkeypatch.setattr(service, "ProbeBypass", NoProbes)
    config = node1_agent_config(tmp_path, verify_interval=verify_interval)
    socket_path = config.zds_socket
    tunnel = Tunnel()
    client = ZdsClient(tunnel, socket_path, backoff=Backoff(initial=0.01, maximum=0.01))
    client.start()
    agent = service.Agent(config, Flavour.NFT)
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        yield agent, tunnel
    finally:
        stop.set()
        assert await running == 0
        await client.close()


@pytest.mark.timeout(60)
async def test_a_tunnel_connecting_during_the_first_pass_gets_every_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with agent_and_tunnel(tmp_path, monkeypatch, verify_interval=600) as (_, tunnel), asyncio.timeout(20):
        await tunnel.got_one.wait()
    expected = frozenset(pod_uid(*key.split("/")) for key in NODE1_PODS)
    assert tunnel.snapshots[0] == expected, "the first snapshot must name every pod the agent captures"


@pytest.mark.timeout(60)
async def test_an_agent_whose_verify_rounds_outlast_the_interval_still_becomes_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness (and so the ZDS socket) waits for the reconciler to be idle after the first pass. A verify
    round re-checks every pod in a narrow lane; when a round took longer than the verify interval, the next
    one was queued before it ended, the reconciler was never idle, and no tunnel ever got a pod (seen with
    many pods and slow installs; here two pods at 0.3 s each against a 0.05 s interval)."""
    async with agent_and_tunnel(tmp_path, monkeypatch, verify_interval=0.05) as (agent, tunnel):
        async with asyncio.timeout(10):
            await tunnel.got_one.wait()
        assert agent.ready
