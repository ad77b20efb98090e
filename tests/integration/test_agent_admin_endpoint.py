"""The Kubernetes agent's admin endpoint (`--admin`, /config_dump redirects for `nodeagent inspect`) starts
as the metrics endpoint does: an address that is taken is retried in the background (a rolling update's old
pod holds the node's port), any other failure to listen stops the agent at once with the reason.

It used to be a guarded task only: an address not of this host crashed that task, and the agent logged a
traceback as "task admin crashed" and stopped after it had started capturing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fakes import FakeCapture, NoProbes
from kube_standin import KubeStandIn, one_ambient_pod

from nodeagent.admin_client import AdminError, fetch_dump
from nodeagent.agent import service
from nodeagent.agent.kube_agent import KubeAgent, KubeSettings
from nodeagent.capture.iptables import Flavour


@pytest.fixture
def api() -> Iterator[KubeStandIn]:
    server = one_ambient_pod()
    yield server
    server.close()


def kube_agent(api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, admin: str) -> KubeAgent:
    monkeypatch.setattr(service.IptablesBackend, "for_host", lambda flavour: FakeCapture())
    monkeypatch.setattr(service, "ProbeBypass", NoProbes)
    (tmp_path / "netns").mkdir()
    config = service.AgentConfig(
        node="node1", inventory=tmp_path / "unused.yaml", zds_socket=str(tmp_path / "zds.sock"),
        state_dir=tmp_path / "state", netns_dir=str(tmp_path / "netns"), verify_interval=600, metrics=None,
    )  # fmt: skip
    return KubeAgent(config, Flavour.NFT, settings=KubeSettings(client=api.api_client, netns="pattern", admin=admin))


async def test_an_admin_address_not_of_this_host_stops_the_agent_with_the_reason(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = kube_agent(api, tmp_path, monkeypatch, admin="192.0.2.1:15002")
    with pytest.raises(SystemExit, match=r"--admin 192\.0\.2\.1:15002: cannot listen on 192\.0\.2\.1:15002: "):
        async with asyncio.timeout(10):
            await agent.run(asyncio.Event())  # as `nodeagent agent` runs it: the message is its last word
    assert not agent.ready and not agent.reconciler.records  # stopped before capturing anything


async def test_a_taken_admin_port_is_served_once_the_old_pod_frees_it(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    old = socket.socket()
    old.bind(("127.0.0.1", 0))
    old.listen()
    port = old.getsockname()[1]
    agent = kube_agent(api, tmp_path, monkeypatch, admin=f"127.0.0.1:{port}")
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        async with asyncio.timeout(10):
            while not agent.ready:  # noqa: ASYNC110 (the agent works meanwhile)
                await asyncio.sleep(0.02)
        assert f"agent admin endpoint: cannot listen on 127.0.0.1:{port}: Address already in use" in caplog.text
        old.close()  # the old pod stopped
        async with asyncio.timeout(10):
            while True:
                try:
                    dump = await asyncio.to_thread(fetch_dump, f"127.0.0.1:{port}", "redirects", 2.0)
                    break
                except AdminError:
                    await asyncio.sleep(0.1)
        assert "redirects" in dump
    finally:
        old.close()
        stop.set()
        assert await running == 0
