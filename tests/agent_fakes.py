"""Fakes for driving the node agent without kernel state: a capture backend, a kubelet-probe chain, and
the configuration of node1's agent of the default lab topology with a netns directory of plain files."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from nodeagent.agent import service
from nodeagent.capture.backend import CaptureState
from nodeagent.lab.cluster import DEFAULT_TOPOLOGY
from nodeagent.model import Pod

NODE1_PODS = ("shop/frontend", "shop/payments")  # the default topology's pods on node1


def node1_agent_config(tmp_path: Path, **overrides: object) -> service.AgentConfig:
    """node1's agent on a copy of the default topology; each pod's "netns" is a file (the resolver only needs
    one to hold open and hand over). The ZDS socket is tmp_path/zds.sock."""
    inventory = tmp_path / "inventory.yaml"
    shutil.copy(DEFAULT_TOPOLOGY, inventory)
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    for key in NODE1_PODS:
        (netns_dir / f"na-node1.{key.replace('/', '.')}").touch()
    fields: dict[str, object] = {
        "node": "node1",
        "inventory": inventory,
        "zds_socket": str(tmp_path / "zds.sock"),
        "state_dir": tmp_path / "state",
        "netns_dir": str(netns_dir),
    }
    return service.AgentConfig(**(fields | overrides))  # type: ignore[arg-type]


class FakeCapture:
    """A capture backend that always succeeds (after `install_delay` s per install, like eBPF adoption on a
    loaded node): what is under test is what happens around capture."""

    name = "fake"

    def __init__(self, install_delay: float = 0.0) -> None:
        self.install_delay = install_delay

    async def install(self, pod: Pod, netns: str) -> tuple[str, ...]:
        if self.install_delay:
            await asyncio.sleep(self.install_delay)
        return ()

    async def remove(self, pod: Pod, netns: str) -> bool:
        return False

    async def inspect(self, netns: str) -> CaptureState:
        return CaptureState(self.name, ("captured",), ())

    async def verify(self, netns: str) -> tuple[str, ...]:
        return ()

    async def forget(self, uid: str) -> bool:
        return False

    def kept_uids(self) -> tuple[str, ...]:
        return ()


class NoProbes:
    """The node's kubelet-probe chain, doing nothing."""

    def __init__(self, *args: object) -> None:
        pass

    async def ensure(self, pods: object) -> tuple[str, ...]:
        return ()

    async def remove(self) -> bool:
        return False


class AckingTunnel:
    """A ZDS tunnel (nodeagent.ztunnel.zds_client handlers) that serves and acks whatever the agent gives it."""

    async def on_add(self, workload: object, netns_fd: int) -> None: ...

    async def on_keep(self, uid: str) -> None: ...

    async def on_del(self, uid: str) -> None: ...

    async def on_snapshot_done(self, known: frozenset[str]) -> None: ...
