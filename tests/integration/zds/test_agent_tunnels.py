"""The agent's reconciler behind a real ZDS server, with real tunnel clients: which tunnel serves which pod.

REFERENCE.md, ZDS: the agent sends Add (or Keep when it has no netns) per known pod, then SnapshotSent, and
the tunnel drops pods not in the snapshot; afterwards Add goes to the newest connection only. These tests
drive the reconciler (with a capture backend that always succeeds) through tunnels coming and going and
read what each tunnel serves from its own handler.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from test_zds import FAST, Recorder, agent, eventually, tunnel

from nodeagent.agent.reconciler import Reconciler
from nodeagent.agent.zds_server import TunnelDropped, TunnelReady
from nodeagent.model import Pod
from nodeagent.ztunnel.zds_client import ZdsClient

sys.path.insert(0, str(Path(__file__).parents[2]))
from agent_fakes import FakeCapture

POD = Pod("web", "shop", "uid-web", "node1", "web", ipaddress.IPv4Address("10.1.0.5"))


class Resolver:
    """The pod's netns: a plain file, which can go missing (ambiguous IP, sandbox being replaced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.visible = True

    def resolve(self, pod: Pod) -> str | None:
        return str(self.path) if self.visible else None


@pytest.fixture
def resolver(tmp_path: Path) -> Iterator[Resolver]:
    (tmp_path / "netns").write_text("")
    yield Resolver(tmp_path / "netns")


class Snapshot:
    """The server's snapshot callable, for a reconciler made after the server (it needs the server)."""

    rec: Reconciler

    def __call__(self) -> list[tuple[Pod, int | None]]:
        return self.rec.snapshot()


@asynccontextmanager
async def reconciler(sock_path: str, resolver: Resolver) -> AsyncIterator[Reconciler]:
    """A reconciler behind a ZDS server, wired as nodeagent.agent.service.Agent wires them."""
    snapshot = Snapshot()
    async with agent(sock_path, snapshot) as (server, _):
        rec = snapshot.rec = Reconciler(FakeCapture(), resolver, server, on_change=lambda: None)

        def on_event(event: object) -> None:
            if isinstance(event, TunnelReady):
                rec.on_tunnel_ready(event.acked)
            elif isinstance(event, TunnelDropped):
                rec.on_tunnel_dropped()

        server._on_event = on_event
        try:
            yield rec
        finally:
            await rec.close()


async def test_a_pod_whose_netns_is_missing_for_now_is_kept_by_a_reconnecting_tunnel(
    sock_path: str, resolver: Resolver
) -> None:
    async with reconciler(sock_path, resolver) as rec:
        rec.set_desired({POD.uid: POD})
        await rec.wait_idle()
        resolver.visible = False  # the next pass cannot find its netns
        rec.verify_all()
        await rec.wait_idle()
        handler = Recorder()
        handler.pods.add(POD.uid)  # a tunnel that served the pod before it reconnected
        async with tunnel(sock_path, handler) as client:
            await client.wait_ready()
            assert handler.keeps == [POD.uid] and handler.snapshots == [frozenset({POD.uid})]
            assert handler.pods == {POD.uid}  # not dropped: still enrolled


async def test_a_pod_only_the_newest_tunnel_had_goes_to_the_older_one_when_it_leaves(
    sock_path: str, resolver: Resolver
) -> None:
    async with reconciler(sock_path, resolver) as rec:
        old, new = Recorder(), Recorder()
        async with tunnel(sock_path, old) as first:
            await first.wait_ready()
            second = ZdsClient(new, sock_path, backoff=FAST)
            second.start()
            await second.wait_ready()
            rec.set_desired({POD.uid: POD})  # enrolled during the hand-over: Add goes to the newest only
            await rec.wait_idle()
            assert new.pods == {POD.uid} and old.pods == set()
            await second.close()  # the newer tunnel leaves (crashed, or its roll-out failed)
            await eventually(lambda: POD.uid in old.pods)
            await rec.wait_idle()
            assert rec.status(POD.uid).value == "enabled"
