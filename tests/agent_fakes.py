"""Fakes for driving the node agent without kernel state: a capture backend and a kubelet-probe chain."""

from __future__ import annotations

import asyncio

from nodeagent.capture.backend import CaptureState
from nodeagent.model import Pod


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
