"""Who writes a pod's `ambient.istio.io/redirection` annotation, and the node's status file, when more than the
agent touches them.

A rolling update: the new agent binds the node's ZDS socket and its tunnel serves the pods; the old pod's
tunnel then drains and leaves the old agent, which saw every pod lose its tunnel and published `pending`
for all of them - while they were served. The new agent (not having written them itself, it goes by the
watch) flipped them back: `enabled` -> `pending` -> `enabled` across every update, which an init container
waiting for `enabled` (daemonset/README.md) or a user watching `kubectl get pods` sees. And as it stopped,
the old agent wrote `running: false` into the node's status file, which both pods share (a hostPath), so
`nodeagent inspect redirects` said the node's agent was down.

A hand edit: the agent's value is set back once the watch shows someone else's.

The oracles are the stand-in API server's record of the patches and the status file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fakes import AckingTunnel, FakeCapture, NoProbes
from kube_standin import KubeStandIn, one_ambient_pod

from nodeagent.agent import service
from nodeagent.agent.enrollment import Status
from nodeagent.agent.kube_agent import KubeAgent, KubeSettings
from nodeagent.agent.kube_status import MAX_SET_BACKS, REDIRECTION_ANNOTATION
from nodeagent.agent.status import read_status, status_path
from nodeagent.capture.iptables import Flavour
from nodeagent.ztunnel.zds_client import Backoff, ZdsClient


@pytest.fixture
def api() -> Iterator[KubeStandIn]:
    server = one_ambient_pod()
    yield server
    server.close()


async def until(check: Any, limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not check():  # noqa: ASYNC110 (the agents change state in other tasks)
            await asyncio.sleep(0.02)


def annotation(api: KubeStandIn) -> str | None:
    obj = api.get("Pod", "web-1", "shop")
    assert obj is not None
    return (obj["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION)


def agents(api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], KubeAgent]:
    """A maker of Kubernetes agents for node1, all on one ZDS socket (tmp_path/zds.sock) and one state dir:
    both pods of a rolling update share the node's (hostPaths)."""
    monkeypatch.setattr(service.IptablesBackend, "for_host", lambda flavour: FakeCapture())
    monkeypatch.setattr(service, "ProbeBypass", NoProbes)
    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "na-node1.shop.web-1").touch()

    def agent() -> KubeAgent:
        config = service.AgentConfig(
            node="node1", inventory=tmp_path / "unused.yaml", zds_socket=str(tmp_path / "zds.sock"),
            state_dir=tmp_path / "state", netns_dir=str(tmp_path / "netns"), verify_interval=600, metrics=None,
        )  # fmt: skip
        return KubeAgent(config, Flavour.NFT, settings=KubeSettings(client=api.api_client, netns="pattern", admin=None))

    return agent


async def test_the_superseded_agent_leaves_the_annotations_to_the_new_one(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = agents(api, tmp_path, monkeypatch)
    sock = str(tmp_path / "zds.sock")
    old, new = agent(), agent()
    stop_old, stop_new = asyncio.Event(), asyncio.Event()
    old_run = asyncio.ensure_future(old.run(stop_old))
    old_tunnel = ZdsClient(AckingTunnel(), sock, backoff=Backoff(0.05, 0.2))
    new_tunnel = ZdsClient(AckingTunnel(), sock, backoff=Backoff(0.05, 0.2))
    new_run: asyncio.Future[int] | None = None
    try:
        old_tunnel.start()
        await until(lambda: annotation(api) == "enabled")
        new_run = asyncio.ensure_future(new.run(stop_new))
        await until(lambda: new.ready)  # it holds the socket now
        new_tunnel.start()
        await until(lambda: new.reconciler.status("uid-web-1") is Status.ENABLED)
        written = len(api.patches)
        await old_tunnel.close()  # the old pod's tunnel drains and leaves the old agent
        await until(lambda: old.reconciler.status("uid-web-1") is Status.PENDING)
        await asyncio.sleep(1.0)  # what either agent would publish now reaches the API server
        assert annotation(api) == "enabled"
        assert api.patches[written:] == [], "the pod's annotation was rewritten though it was served throughout"
        assert "no longer this agent's" in (old.readiness_pending() or "")
        stop_old.set()
        assert await old_run == 0
        # The node's status file (shared by both pods) still describes the running agent and its served pod.
        doc = read_status(status_path(tmp_path / "state", "node1"))
        assert doc is not None and doc["running"] is True
        assert doc["pods"]["uid-web-1"]["status"] == "enabled"
    finally:
        stop_old.set()
        stop_new.set()
        await old_tunnel.close()
        await new_tunnel.close()
        await asyncio.gather(old_run, *([new_run] if new_run else []), return_exceptions=True)


async def test_an_annotation_someone_else_changed_is_set_back(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer used to trust its own record of what it wrote over the watch for good: a hand edit (or
    another tool) that changed the annotation of a served pod stayed, and an init container waiting for
    `enabled` waited forever."""
    caplog.set_level("INFO", logger="nodeagent.agent.kube_status")
    agent = agents(api, tmp_path, monkeypatch)()
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    tunnel = ZdsClient(AckingTunnel(), str(tmp_path / "zds.sock"), backoff=Backoff(0.05, 0.2))
    try:
        tunnel.start()
        await until(lambda: annotation(api) == "enabled")
        await asyncio.sleep(0.5)  # the watch has shown the agent its own write
        written = len(api.patches)
        edited = api.get("Pod", "web-1", "shop")
        assert edited is not None
        edited["metadata"]["annotations"][REDIRECTION_ANNOTATION] = "pending"
        api.apply(edited)  # `kubectl annotate --overwrite`, say
        await until(lambda: len(api.patches) > written)
        await until(lambda: annotation(api) == "enabled")
        assert "was changed to 'pending' by someone else; setting it back" in caplog.text
        await asyncio.sleep(0.5)
        assert len(api.patches) == written + 1  # set back once, then left alone
    finally:
        stop.set()
        await tunnel.close()
        assert await running == 0


async def test_a_lone_agent_that_stops_says_so_in_the_status_file(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent removes its own ZDS socket as it stops: that is not another agent taking over, and its last
    status write (`running: false`) must still happen."""
    caplog.set_level("INFO", logger="nodeagent.agent.service")
    agent = agents(api, tmp_path, monkeypatch)()
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        await until(lambda: agent.ready)
    finally:
        stop.set()
        assert await running == 0
    doc = read_status(status_path(tmp_path / "state", "node1"))
    assert doc is not None and doc["running"] is False
    assert "another agent holds" not in caplog.text


async def test_a_writer_that_keeps_changing_the_annotation_is_left_alone_after_a_few_set_backs(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another controller that insists on its own value (istio-cni during a migration, a mutating policy
    engine) would otherwise meet a PATCH for each of its writes, forever."""
    caplog.set_level("INFO", logger="nodeagent.agent.kube_status")
    agent = agents(api, tmp_path, monkeypatch)()
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    tunnel = ZdsClient(AckingTunnel(), str(tmp_path / "zds.sock"), backoff=Backoff(0.05, 0.2))
    edits = 0

    async def insist() -> None:
        nonlocal edits
        while True:
            if annotation(api) != "pending":
                obj = api.get("Pod", "web-1", "shop")
                assert obj is not None
                obj["metadata"]["annotations"][REDIRECTION_ANNOTATION] = "pending"
                api.apply(obj)
                edits += 1
            await asyncio.sleep(0.05)

    try:
        tunnel.start()
        await until(lambda: annotation(api) == "enabled")
        await asyncio.sleep(0.5)  # the watch has shown the agent its own write
        written = len(api.patches)
        other = asyncio.ensure_future(insist())
        try:
            await asyncio.sleep(3.0)
        finally:
            other.cancel()
        set_backs = len(api.patches) - written
        assert set_backs == MAX_SET_BACKS < edits, (set_backs, edits)
        assert caplog.text.count("keeps being changed to 'pending' by someone else") == 1
    finally:
        stop.set()
        await tunnel.close()
        assert await running == 0
