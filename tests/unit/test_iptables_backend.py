"""nodeagent.capture.iptables: IptablesBackend with the IPv6 guard, and ProbeBypass's idea of healthy, with a
fake runner.

The guard's rules are tested as values in test_capture_rules.py and in a pod's netns by the privileged
tests (both flavours, real connections refused); here: that the backend runs ip6tables of the host's flavour
beside iptables, says which of the two a problem or a line belongs to, and runs no ip6tables at all on a
kernel without IPv6 (ipv6.disable=1: ip6tables-restore would fail every pod's install). And that a node
with no captured pod needs no probe-bypass chain (the agent removes it then).
"""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from nodeagent.capture import iptables as iptables_mod
from nodeagent.capture.iptables import Completed, Flavour, Iptables, IptablesBackend, ProbeBypass
from nodeagent.model import Pod

EMPTY = {
    "iptables": "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    "*mangle\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
    "ip6tables": "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
}
GUARDED = (
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:NODEAGENT_IN6 - [0:0]\n"
    '-A INPUT -m comment --comment "nodeagent: no IPv6 TCP around the mesh" -j NODEAGENT_IN6\n'
    "-A NODEAGENT_IN6 -i lo -j RETURN\n"
    "-A NODEAGENT_IN6 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset\nCOMMIT\n"
)
POD_IP = ipaddress.IPv4Address("10.10.1.10")
POD = Pod(uid="u1", name="web", namespace="shop", node="node1", service_account="web", ip=None)


class FakeKernel:
    """The runner: `save` prints what this 'kernel' holds per tool family; `restore` is recorded."""

    def __init__(self, held: dict[str, str]) -> None:
        self.held = held
        self.commands: list[tuple[str, ...]] = []
        self.payloads: dict[str, str] = {}

    async def __call__(self, argv: list[str], netns: str | None, stdin: str | None) -> Completed:
        self.commands.append(tuple(argv))
        family = argv[0].split("-")[0]
        if argv[0].endswith("-save"):
            return Completed(tuple(argv), 0, self.held[family], "")
        assert stdin is not None
        self.payloads[family] = stdin
        return Completed(tuple(argv), 0, "", "")


@pytest.fixture(autouse=True)
def no_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy routing is pyroute2 in the pod's netns: out of this test's scope."""
    monkeypatch.setattr(iptables_mod.routing, "ensure", lambda netns: ())
    monkeypatch.setattr(iptables_mod.routing, "remove", lambda netns: False)
    nothing = SimpleNamespace(objects=lambda: (), drift=lambda: ())
    monkeypatch.setattr(iptables_mod.routing, "read", lambda netns: nothing)


def backend(monkeypatch: pytest.MonkeyPatch, kernel: FakeKernel, ipv6: bool) -> IptablesBackend:
    monkeypatch.setattr(iptables_mod, "ipv6_available", lambda: ipv6)
    return IptablesBackend.for_host(Flavour.LEGACY, kernel)


async def test_install_puts_the_ipv6_guard_in_with_ip6tables_of_the_same_flavour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel = FakeKernel(dict(EMPTY))
    repaired = await backend(monkeypatch, kernel, ipv6=True).install(POD, "/run/netns/pod")
    assert {argv[0] for argv in kernel.commands} == {
        "iptables-legacy-save",
        "iptables-legacy-restore",
        "ip6tables-legacy-save",
        "ip6tables-legacy-restore",
    }
    assert ":NODEAGENT_IN6 - [0:0]" in kernel.payloads["ip6tables"]
    assert "NODEAGENT_IN6" not in kernel.payloads["iptables"]
    assert "ip6tables: filter chain NODEAGENT_IN6 is missing" in repaired
    assert "nat chain NODEAGENT_OUTPUT is missing" in repaired  # IPv4's problems keep their plain wording


async def test_inspect_and_remove_name_the_ip6tables_side(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel({**EMPTY, "ip6tables": GUARDED})
    b = backend(monkeypatch, kernel, ipv6=True)
    state = await b.inspect("/run/netns/pod")
    assert "(ip6tables) -t filter -A NODEAGENT_IN6 -i lo -j RETURN" in state.objects
    assert not any(problem.startswith("ip6tables:") for problem in state.drift)  # the guard is complete
    assert await b.remove(POD, "/run/netns/pod")
    assert "-X NODEAGENT_IN6" in kernel.payloads["ip6tables"].splitlines()


async def test_a_kernel_without_ipv6_gets_no_ip6tables_command(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(dict(EMPTY))
    b = backend(monkeypatch, kernel, ipv6=False)
    await b.install(POD, "/run/netns/pod")
    await b.inspect("/run/netns/pod")
    await b.remove(POD, "/run/netns/pod")
    assert kernel.commands and not [argv for argv in kernel.commands if argv[0].startswith("ip6tables")]


async def test_the_probe_bypass_of_a_node_with_no_captured_pod_is_no_chain_at_all() -> None:
    """The agent removes the chain when no pod is captured: its absence is not drift, a leftover rule is."""
    leftover = (
        "*nat\n:POSTROUTING ACCEPT [0:0]\n:NODEAGENT_POSTRT - [0:0]\n"
        '-A POSTROUTING -m comment --comment "nodeagent: kubelet probes to enrolled pods" -j NODEAGENT_POSTRT\n'
        "-A NODEAGENT_POSTRT -d 10.10.1.10/32 -p tcp -m owner --socket-exists -m comment --comment "
        '"nodeagent: probe shop/a" -j SNAT --to-source 169.254.7.127\nCOMMIT\n'
    )
    clean = await ProbeBypass(Iptables(Flavour.NFT, FakeKernel(dict(EMPTY)))).inspect({})
    assert clean.drift == () and clean.objects == ()
    stale = await ProbeBypass(Iptables(Flavour.NFT, FakeKernel({**EMPTY, "iptables": leftover}))).inspect({})
    assert stale.drift == ("1 probe rules although no pod is captured (left by an agent run)",)
    missing = await ProbeBypass(Iptables(Flavour.NFT, FakeKernel(dict(EMPTY)))).inspect({"shop/a": POD_IP})
    assert "nat chain NODEAGENT_POSTRT is missing" in missing.drift  # with a captured pod, absence is drift
