"""What the agent logs when it repairs the node's kubelet-probe bypass: what it found, said as found and fixed.

Why: it logged "kubelet-probe bypass updated for 2 pods: nat chain NODEAGENT_POSTRT is missing; ..." at INFO,
which reads as a fault the node has now, when it is the state the agent found and has just repaired.

The agent runs for real (inventory file, reconciler, status file) with a capture backend that always succeeds
and a probe chain whose first ensure() finds the chain and its jump missing, as on a node's first agent run.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest
from agent_fakes import FakeCapture

from nodeagent.agent import service
from nodeagent.capture.iptables import Flavour
from nodeagent.lab.cluster import DEFAULT_TOPOLOGY

FOUND = ("nat chain NODEAGENT_POSTRT is missing", "the jump from nat POSTROUTING to NODEAGENT_POSTRT is missing")


class MissingChain:
    """The node's kubelet-probe chain: missing until the first ensure() writes it."""

    def __init__(self, *args: object) -> None:
        self.written = asyncio.Event()

    async def ensure(self, pods: object) -> tuple[str, ...]:
        if self.written.is_set():
            return ()
        self.written.set()
        return FOUND

    async def remove(self) -> bool:
        return False


class Heard(logging.Handler):
    """Sets `event` when the agent logs about the probe bypass."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "kubelet-probe" in record.getMessage():
            self.event.set()


@pytest.mark.timeout(60)
async def test_a_repaired_probe_bypass_is_logged_as_found_and_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(service.IptablesBackend, "for_host", lambda flavour: FakeCapture())
    monkeypatch.setattr(service, "ProbeBypass", MissingChain)
    inventory = tmp_path / "inventory.yaml"
    shutil.copy(DEFAULT_TOPOLOGY, inventory)
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    for name in ("shop.frontend", "shop.payments"):  # node1's pods: the resolver only needs a file to open
        (netns_dir / f"na-node1.{name}").touch()
    config = service.AgentConfig(
        node="node1", inventory=inventory, zds_socket=str(tmp_path / "zds.sock"), state_dir=tmp_path / "state",
        netns_dir=str(netns_dir), verify_interval=600,
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="nodeagent.agent.service")
    heard = Heard()
    logging.getLogger("nodeagent.agent.service").addHandler(heard)
    agent = service.Agent(config, Flavour.NFT)
    assert isinstance(agent.probes, MissingChain)
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        async with asyncio.timeout(20):
            await heard.event.wait()
    finally:
        logging.getLogger("nodeagent.agent.service").removeHandler(heard)
        stop.set()
        assert await running == 0
    said = [r.getMessage() for r in caplog.records if "kubelet-probe" in r.getMessage()]
    assert said == [
        "kubelet-probe bypass now covers 2 pods; found and fixed: nat chain NODEAGENT_POSTRT is missing; "
        "the jump from nat POSTROUTING to NODEAGENT_POSTRT is missing"
    ]
