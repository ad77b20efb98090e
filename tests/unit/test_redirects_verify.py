"""`inspect redirects --verify`: the sentences about a node whose agent is not running say what is true there.

A fresh lab (no agent has run, nothing captured) was told "capture stays", and a stopped agent's node read
"the node agent not running". The rows are built by hand: verify() is a pure function of them, and so is
the printing of a report (`-n` narrows the rows it prints).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from pathlib import Path
from types import MappingProxyType

import pytest

from nodeagent.agent import inspect as redirects
from nodeagent.agent.commands import _table
from nodeagent.agent.inspect import NodeReport, RedirectRow, Redirects, verify
from nodeagent.capture import iptables, routing
from nodeagent.capture.backend import CaptureState
from nodeagent.capture.ebpf import EbpfBackend
from nodeagent.capture.rules import Saved, parse_save
from nodeagent.model import DATAPLANE_MODE_LABEL, Inventory, Namespace, Node, Pod


def report(agent: str, rules: str) -> Redirects:
    rows = [
        RedirectRow("node1", "shop", "frontend", "10.10.1.10", "ambient", "-", rules, []),
        RedirectRow("node1", "legacy", "batch", "10.10.1.11", "none", "-", "none", []),
        RedirectRow("node2", "shop", "checkout", "10.10.2.10", "ambient", "-", "ok", []),  # another node's
    ]
    return Redirects(rows, [NodeReport("node1", agent, "nft", [], [])])


@pytest.mark.parametrize(
    ("agent", "rules", "sentence"),
    [
        (
            "no status file",
            "none",
            "the node agent has never run here (no status file): no pod of this node is captured, "
            "and none will be until it runs",
        ),
        (
            "not running",
            "none",
            "the node agent is not running: no pod of this node is captured, and none will be until it runs",
        ),
        (
            "not running",
            "ok",
            "the node agent is not running: capture stays, but nothing repairs drift or serves new pods",
        ),
        (
            "no status file",
            "drift",
            "the node agent has never run here (no status file): capture stays, but nothing repairs drift or "
            "serves new pods",
        ),
    ],
    ids=["fresh", "stopped-nothing-captured", "stopped-captured", "status-file-lost-captured"],
)
def test_a_node_without_a_running_agent_is_described_as_it_is(agent: str, rules: str, sentence: str) -> None:
    r = report(agent, rules)
    verify(r)
    assert r.nodes[0].problems == [sentence]


def test_a_namespace_filter_does_not_change_what_is_said_of_the_node(capsys: pytest.CaptureFixture[str]) -> None:
    """-n legacy shows only batch (not captured), but node1's frontend is: its capture still stays."""
    from argparse import Namespace

    from nodeagent.agent.commands import _print_redirects

    args = Namespace(namespace="legacy", all_namespaces=False, verify=True, output="table")
    assert _print_redirects(args, report("not running", "ok")) == 1
    out = capsys.readouterr().out
    assert "PROBLEM node node1: the node agent is not running: capture stays" in out, out
    assert "frontend" not in out, out


@pytest.mark.parametrize("output", ["table", "json"])
def test_a_namespace_with_no_pods_says_so_as_kubectl_does(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    """-n nosuch printed the pods' table with headers only; kubectl says "No resources found in nosuch namespace."
    on stderr. The node lines stay (they are about the node); JSON keeps its shape, with no rows."""
    from argparse import Namespace

    from nodeagent.agent.commands import _print_redirects

    args = Namespace(namespace="nosuch", all_namespaces=False, verify=False, output=output)
    assert _print_redirects(args, report("running", "ok")) == 0
    out, err = capsys.readouterr()
    if output == "json":
        assert err == "" and json.loads(out)["rows"] == []
    else:
        assert err == "No resources found in nosuch namespace.\n"
        assert out == "node node1: agent running, iptables nft, kubelet-probe bypass none (no pod captured)\n", out


def test_the_other_capture_modes_objects_are_a_remark_when_enrolled_and_a_leftover_when_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After a capture-mode switch an enrolled pod keeps the earlier run's objects too (harmless, removed at
    unenroll): said beside the row, not a problem; the same objects on a pod out of the mesh refuse its TCP."""
    enrolled = RedirectRow("node1", "shop", "frontend", "10.10.1.10", "ebpf", "enabled", "ok", [15001, 15006, 15008])
    enrolled.other_mode = ["iptables: nat NODEAGENT_PREROUTING"]
    outside = RedirectRow("node1", "legacy", "batch", "10.10.1.11", "none", "-", "none", [])
    outside.other_mode = ["iptables: nat NODEAGENT_OUTPUT"]
    r = Redirects([enrolled, outside], [NodeReport("node1", "running", "nft", ["probe"], [])])
    assert verify(r) == 1
    assert enrolled.problems == []
    assert outside.problems == ["not enrolled, yet its netns holds nodeagent capture (a leftover): restart the agent"]
    text = _table(r, show_problems=True)
    assert "  shop/frontend: also holds the other capture mode's objects, from an earlier run" in text
    assert "iptables: nat NODEAGENT_PREROUTING" in text
    assert "legacy/batch: also holds" not in text  # its line is the PROBLEM


NAT_LEFTOVER = "*nat\n:NODEAGENT_OUTPUT - [0:0]\n-A NODEAGENT_OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"


@pytest.mark.parametrize(
    ("saved", "expected"),
    [("", []), (NAT_LEFTOVER, ["iptables: -t nat -A NODEAGENT_OUTPUT -p tcp -j REDIRECT --to-ports 15001"])],
    ids=["never-iptables", "iptables-leftover"],
)
def test_an_ebpf_pod_is_said_to_hold_iptables_capture_only_for_iptables_rules(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved: str, expected: list[str]
) -> None:
    """The policy routing belongs to both modes (the eBPF install makes it too): on a node that never ran
    iptables mode it is no leftover. collect() runs with the kernel reads stubbed: a complete eBPF pod."""
    pod = Pod("frontend", "shop", "u1", "node1", "frontend", ipaddress.IPv4Address("10.10.1.10"))
    inventory = Inventory(
        "c",
        "cluster.local",
        ipaddress.IPv4Network("10.0.0.0/24"),
        (Node("node1", ipaddress.IPv4Network("10.10.1.0/24"), ipaddress.IPv4Address("10.0.0.1")),),
        (Namespace("shop", MappingProxyType({DATAPLANE_MODE_LABEL: "ambient"})),),
        (pod,),
    )
    status = {"capture": "ebpf", "iptables": "nft", "pid": os.getpid(), "pods": {"u1": {"status": "enabled"}}}
    routes = routing.RoutingState(1, True)  # as the eBPF install leaves it

    async def ebpf_pod(self: object, p: Pod, netns: str) -> CaptureState:
        return CaptureState("ebpf", ("prog capture_connect4", *routes.objects()), ())

    async def save(self: object, netns: str) -> Saved:
        return parse_save(saved)

    async def listening(netns: str) -> list[int]:
        return [15001, 15006, 15008]

    async def probe(self: object, pods: object) -> CaptureState:
        return CaptureState("probe bypass", ("chain",), ())

    monkeypatch.setattr(redirects, "read_status", lambda path: status)
    monkeypatch.setattr(redirects, "agent_alive", lambda s: True)
    monkeypatch.setattr(EbpfBackend, "inspect_pod", ebpf_pod)
    monkeypatch.setattr(iptables.Iptables, "save", save)
    monkeypatch.setattr(iptables, "ipv6_available", lambda: False)
    monkeypatch.setattr(routing, "read", lambda netns: routes)
    monkeypatch.setattr(redirects, "_listeners", listening)
    monkeypatch.setattr(iptables.ProbeBypass, "inspect", probe)

    class Resolver:
        def resolve(self, p: Pod) -> str:
            return "/run/netns/pod"

    layout = redirects.Layout(state_dir=tmp_path)
    report = asyncio.run(redirects.collect(inventory, ["node1"], layout, Resolver()))  # type: ignore[arg-type]
    assert [(r.mode, r.rules, r.other_mode) for r in report.rows] == [("ebpf", "ok", expected)]
