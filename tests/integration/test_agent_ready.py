"""The agent container's readiness probe: the DaemonSet's exec command, run as the kubelet would, against a
real KubeAgent (the API server stand-in, a fake capture backend).

Why: only the tunnel had a probe, and the tunnel turns ready on any agent's ZDS snapshot. During a rolling
update the hostPath ZDS socket is the old pod's until the new agent has listed and reconciled its pods, so
a new agent stuck on a forbidden list left its pod Ready, the old pod was stopped, and the rollout went on
until no node had a working agent. The agent's probe must fail (500, saying what is pending) until the
agent lists its pods, reconciles them once and holds the ZDS socket; and again when the API server fails
for longer than the grace, or another agent takes the socket over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_fakes import FakeCapture, NoProbes
from kube_standin import KubeStandIn, forbidden, one_ambient_pod

from nodeagent.agent import commands, service
from nodeagent.agent.__main__ import main as agent_main
from nodeagent.agent.kube_agent import KubeAgent, KubeSettings
from nodeagent.capture.iptables import Flavour
from nodeagent.zds import wire

DAEMONSET = Path(__file__).resolve().parents[2] / "daemonset" / "daemonset.yaml"
PODS = r"^/api/v1/pods\?"  # this node's pods: list and watch (field selector spec.nodeName)


def agent_probe(socket_path: str) -> list[str]:
    """The DaemonSet's readiness probe command for the agent, aimed at `socket_path` instead of the pod's."""
    [ds] = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d and d["kind"] == "DaemonSet"]
    [agent] = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    [arg] = [a for a in agent["args"] if a.startswith("--ready-socket=")]
    command = agent["readinessProbe"]["exec"]["command"]
    return [socket_path if part == arg.split("=", 1)[1] else part for part in command]


async def run_probe(command: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL)
    return await proc.wait()


async def get_ready(path: str) -> tuple[int, str]:
    """GET /healthz/ready on the unix socket: (status, body); (0, "") while nothing listens."""
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return 0, ""
    writer.write(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
    answer = await reader.read()
    writer.close()
    head, _, body = answer.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def until_ready_says(path: str, check: Any, limit: float = 10.0) -> tuple[int, str]:
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        status, body = await get_ready(path)
        if check(status, body):
            return status, body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out; /healthz/ready answers {status}: {body!r}")
        await asyncio.sleep(0.02)


@pytest.fixture
def api() -> Iterator[KubeStandIn]:
    server = one_ambient_pod()
    yield server
    server.close()


@asynccontextmanager
async def running_agent(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, install_delay: float = 0.0, grace: float = 60
) -> AsyncIterator[KubeAgent]:
    """node1's KubeAgent started with --ready-socket; the API source retries every 0.5-1.5 s (1 s backoff,
    jittered), so an injected failure lasts a second or more per request it fails."""
    monkeypatch.setattr(service.IptablesBackend, "for_host", lambda flavour: FakeCapture(install_delay))
    monkeypatch.setattr(service, "ProbeBypass", NoProbes)
    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "na-node1.shop.web-1").touch()  # the resolver only needs a file to hold open
    config = service.AgentConfig(
        node="node1", inventory=tmp_path / "unused.yaml", zds_socket=str(tmp_path / "zds" / "ztunnel.sock"),
        state_dir=tmp_path / "state", netns_dir=str(tmp_path / "netns"), verify_interval=600,
        ready_socket=str(tmp_path / "agent-run" / "ready.sock"),
    )  # fmt: skip
    settings = KubeSettings(client=api.api_client, netns="pattern", admin=None, api_failure_grace=grace)
    agent = KubeAgent(config, Flavour.NFT, settings=settings)
    agent.workloads.source.backoff_initial = agent.workloads.source.backoff_max = 1.0
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        assert await running == 0


@pytest.mark.timeout(60)
async def test_the_agent_is_unready_while_its_list_is_forbidden_and_until_its_first_pass(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.fail(PODS, 403, forbidden("Pod"), times=2)  # RBAC fixed after two tries: 1-3 s of 403s
    async with running_agent(api, tmp_path, monkeypatch, install_delay=1.0) as agent:
        ready_socket, zds_socket = agent.config.ready_socket, agent.config.zds_socket
        assert ready_socket is not None
        probe = agent_probe(ready_socket)
        status, body = await until_ready_says(ready_socket, lambda status, body: "forbidden" in body)
        assert status == 500 and "no complete workload list" in body and "grant list/watch" in body, body
        assert await run_probe(probe) != 0  # the pod stays unready: the old pod keeps serving the node
        assert not Path(zds_socket).exists()  # noqa: ASYNC240 - tunnels still reach the old pod's agent only

        # the 403s end; the first pass takes a second (one pod, installed in 1 s): unready meanwhile
        status, body = await until_ready_says(ready_socket, lambda status, body: "workload list" not in body)
        assert status == 500 and "first reconcile pass" in body, body
        assert await run_probe(probe) != 0

        await until_ready_says(ready_socket, lambda status, body: status == 200)
        assert await run_probe(probe) == 0
        assert agent.ready and Path(zds_socket).exists()  # noqa: ASYNC240 - bound only now


@pytest.mark.timeout(60)
async def test_a_ready_agent_turns_unready_when_the_api_fails_past_the_grace_or_its_socket_is_taken(
    api: KubeStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_agent(api, tmp_path, monkeypatch, grace=0.3) as agent:
        ready_socket, zds_socket = agent.config.ready_socket, agent.config.zds_socket
        assert ready_socket is not None
        probe = agent_probe(ready_socket)
        await until_ready_says(ready_socket, lambda status, body: status == 200)

        # RBAC revoked, the watch cut: re-watching fails for 1.5-4.5 s; unready once that outlasts the grace
        api.fail(PODS, 403, forbidden("Pod"), times=3)
        api.drop_watches()
        status, body = await until_ready_says(ready_socket, lambda status, body: status != 200)
        assert "the API server has failed for" in body and "watching pods" in body, body
        assert await run_probe(probe) != 0
        await until_ready_says(ready_socket, lambda status, body: status == 200)  # watching again
        assert await run_probe(probe) == 0

        # a newer agent (a rolling update's new pod) takes the ZDS socket over: tunnels now reach that one
        newer = wire.listen(zds_socket)
        try:
            status, body = await get_ready(ready_socket)
            assert status == 500 and "is no longer this agent's" in body, body
            assert await run_probe(probe) != 0
        finally:
            newer.close()


def test_the_ready_socket_option_reaches_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[service.AgentConfig] = []

    def run(config: service.AgentConfig, factory: object = None) -> int:
        started.append(config)
        return 0

    monkeypatch.setattr(commands, "run", run)
    assert agent_main(["--node", "node1", "--kubernetes", "--ready-socket", "/var/run/agent/ready.sock"]) == 0
    assert started[0].ready_socket == "/var/run/agent/ready.sock"
