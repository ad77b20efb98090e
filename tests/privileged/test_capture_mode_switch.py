"""A capture-mode switch between agent runs while the pods stay enrolled, with the whole mesh in the lab.

`--capture auto` may choose differently after a kernel-header change, or an operator switches the mode;
the agent then comes back in the other mode while the shop pods stay enrolled. These tests do that in
both directions (iptables -> eBPF, eBPF -> iptables) and three ways (`upgrade`: the DaemonSet's surge
update, a stop-then-start of its pod, an agent-only restart), and check with the kernel's and the
fabric's own tools:

- during the switch a client looping from an enrolled pod is refused at worst, and between the pods the
  fabric carries only 15008: no plaintext, not even an app's SYN-ACK that escaped the pod's routing; when
  the eBPF mode comes in, each pod's tcp_fwmark_accept is 1 before its pin directory appears (a serving
  tunnel switches to the bypass mark from then on, see FwmarkWhenPinned);
- after it, each enrolled pod holds the new mode's capture, complete - and the old mode's, complete too:
  BothModes leaves it until the pod is unenrolled (nodeagent/agent/capture_modes.py says why);
- with both, enrolled pod -> enrolled pod works cross-node and same-node, the server sees the client pod's
  own IP, and between enrolled pods the fabric carries only TCP to/from 15008, never the plaintext marker;
- a plaintext client in the non-enrolled legacy namespace still reaches an enrolled pod, captured on its
  15006 (the destination tunnel's access log has it as inbound, from legacy's IP) - also after
  iptables -> eBPF under a tunnel that kept its listeners, whose :15006 was in no map_listener until the
  tunnel reclaimed the emptied slot;
- `nodeagent inspect redirects --verify` finds no problem for the mode in use;
- unenrolled, the pods lose both modes' objects and the shared policy routing.

Expected addresses are written out from the lab's default topology; oracles never ask nodeagent.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oracles
import pytest
from oracles import APP_PORT, BATCH, CHECKOUT, FRONTEND, IP, NETNS, NODE, PAYMENTS, SHOP, TUNNEL_PORTS
from waiting import wait_for

from nodeagent.lab.cluster import Lab
from nodeagent.labmesh import Mesh, Proc

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(240)]

ENROLLED = SHOP
SWITCHES = [("iptables", "ebpf"), ("ebpf", "iptables")]
STYLES = ["pod", "surge", "agent"]  # how the agent comes back in the other mode: see upgrade()
NOTHING: dict[str, list[str]] = {pod: [] for pod in ENROLLED}

# The four jumps of the iptables mode's capture (nat and mangle, PREROUTING and OUTPUT), as iptables-save
# prints them, and the IPv6 guard's jump (ip6tables).
IPTABLES_JUMPS = sorted(
    [
        '-A PREROUTING -m comment --comment "nodeagent: inbound capture to 15006" -j NODEAGENT_PRERT',
        '-A OUTPUT -m comment --comment "nodeagent: outbound capture to 15001" -j NODEAGENT_OUTPUT',
        '-A PREROUTING -m comment --comment "nodeagent: connmark the tunnel connections" -j NODEAGENT_MANGLE_PRERT',
        '-A OUTPUT -m comment --comment "nodeagent: restore the tunnel mark on replies" -j NODEAGENT_MANGLE_OUTPUT',
    ]
)
IP6TABLES_JUMP = '-A INPUT -m comment --comment "nodeagent: no IPv6 TCP around the mesh" -j NODEAGENT_IN6'

# One JSON line per connection. `once`: one exchange. `loop`: a new connection every INTERVAL s until
# stdin closes. The marker is sent only after the server's greeting, so a connection that went around
# the tunnels would put it on the fabric in plaintext.
CLIENT = r"""
import json, socket, sys, threading, time

def exchange(host, port, msg):
    try:
        c = socket.create_connection((host, port), timeout=3)
        f = c.makefile("rb")
        line = f.readline()
        if not line.startswith(b"peer "):
            raise ConnectionError(f"no greeting: {line!r}")
        c.sendall(msg)
        echo = f.read(len(msg))
        c.close()
        return {"ok": echo == msg, "peer": line[5:].strip().decode()}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__}

mode, host, port, msg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
if mode == "once":
    print(json.dumps(exchange(host, port, msg)), flush=True)
else:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not stop.is_set():
        print(json.dumps(exchange(host, port, msg)), flush=True)
        stop.wait(float(sys.argv[5]))
"""

sh = oracles.sh


# --- oracles ----------------------------------------------------------------------------------------------


def iptables_ours(netns: str, tool: str = "iptables") -> list[str]:
    """Lines of ours in `tool`-save of either flavour (the lab's agents use one; either counts)."""
    return sorted(
        line
        for flavour in ("nft", "legacy")
        for line in sh("ip", "netns", "exec", netns, f"{tool}-{flavour}-save").splitlines()
        if "NODEAGENT" in line
    )


def fwmark_accept(pod: str) -> str:
    return sh("ip", "netns", "exec", NETNS[pod], "sysctl", "-n", "net.ipv4.tcp_fwmark_accept").strip()


def listeners(pod: str) -> set[int]:
    out = sh("ip", "netns", "exec", NETNS[pod], "ss", "-H", "-tln")
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines()}


def objects_of(mode: str, pod: str) -> list[str]:
    """The pod's capture objects of `mode` that only that mode makes (not the shared policy routing)."""
    netns = NETNS[pod]
    if mode == "iptables":
        return iptables_ours(netns) + [f"(ip6tables) {line}" for line in iptables_ours(netns, "ip6tables")]
    links = oracles.ebpf_attachments(NODE[pod], pod, netns)
    found = [f"link {t}: {name}" for t, (_, _, name) in sorted(links.items())]
    found += [
        f"cgroup {t}: {name}" for t, name in sorted(oracles.cgroup_progs(oracles.pod_cgroup(NODE[pod], pod)).items())
    ]
    found += [f"pin {pin}" for pin in oracles.pins(oracles.pod_uid(pod))]
    return found + (["sysctl net.ipv4.tcp_fwmark_accept=1"] if fwmark_accept(pod) == "1" else [])


def capture_problems(mode: str, pod: str) -> list[str]:
    """Why `mode`'s capture of `pod` is not complete per the kernel (empty: complete, policy routing included)."""
    netns = NETNS[pod]
    problems = []
    if mode == "iptables":
        jumps = sorted(line for line in iptables_ours(netns) if line.startswith(("-A PREROUTING", "-A OUTPUT")))
        if jumps != IPTABLES_JUMPS:
            problems.append(f"iptables jumps {jumps}")
        if IP6TABLES_JUMP not in iptables_ours(netns, "ip6tables"):
            problems.append("no IPv6 guard")
    else:
        problems += oracles.ebpf_problems(NODE[pod], pod, netns)
        if fwmark_accept(pod) != "1":
            problems.append("tcp_fwmark_accept is 0")
    rules = oracles.fwmark_rules(netns)
    if [(r.get("fwmark"), r.get("fwmask"), r.get("table")) for r in rules] != [("0x111", "0xfff", "100")]:
        problems.append(f"policy rules {rules}")
    if "local default dev lo" not in sh("ip", "-n", netns, "route", "show", "table", "100"):
        problems.append("no local default route in table 100")
    return problems


def listening(server: Proc) -> bool:
    return "listening" in server.log()


def released(pod: str) -> bool:
    """Nothing of ours in the pod, whichever mode: no rule, BPF object or sysctl, no routing, no listener."""
    return (
        not objects_of("iptables", pod)
        and not objects_of("ebpf", pod)
        and not oracles.fwmark_rules(NETNS[pod])
        and not (TUNNEL_PORTS & listeners(pod))
    )


def inspect_verify(mesh: Mesh) -> tuple[int, dict[str, Any]]:
    argv = [
        sys.executable, "-m", "nodeagent.cli", "inspect", "redirects", "--verify", "-o", "json",
        "--inventory", str(mesh.lab.inventory_path), "--state-dir", str(mesh.agent_state),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, json.loads(done.stdout)


# --- driving ----------------------------------------------------------------------------------------------


def client_argv(mesh: Mesh, src: str, *args: str) -> list[str]:
    return list(mesh.lab.exec_argv(src, [sys.executable, "-c", CLIENT, *args]))


def once(mesh: Mesh, src: str, dst: str, marker: str) -> dict[str, Any]:
    out = sh(*client_argv(mesh, src, "once", IP[dst], str(APP_PORT), marker), timeout=60)
    return dict(json.loads(out.splitlines()[-1]))


def upgrade(mesh: Mesh, node: str, capture: str, style: str) -> None:
    """`node`'s agent runs again with `--capture capture`, the pods staying enrolled, in one of three ways.

    pod: the DaemonSet pod stops (agent and tunnel), then a new one starts. surge: what daemonset.yaml's
    RollingUpdate (maxSurge 1, maxUnavailable 0) does - the new pod's agent and tunnel start beside the old
    ones (the new agent takes the ZDS path over, the new tunnel shares the pods' ports), then the old pod
    stops. agent: only the agent container restarts (a crash, an OOM kill); the tunnel keeps serving.
    """
    old_agent, old_tunnel = mesh.agent(node), mesh.tunnel(node)
    mesh.capture = capture
    if style == "agent":
        mesh.kill(old_agent, signal.SIGTERM)
        mesh.start_agent(node, timeout=90)  # eBPF mode compiles its programs at start
    elif style == "surge":
        tunnel = mesh.start_tunnel(node, name=f"tunnel-{node}-surge", port_offset=100, wait=False)
        mesh.start_agent(node, name=f"agent-{node}-surge", timeout=90)
        mesh.wait_tunnel_ready(tunnel, timeout=60)
        mesh.kill(old_agent, signal.SIGTERM)
        mesh.kill(old_tunnel, signal.SIGTERM)  # it drains for its --grace minus 5 s
    else:
        mesh.kill(old_agent, signal.SIGTERM)
        mesh.kill(old_tunnel, signal.SIGTERM)
        tunnel = mesh.start_tunnel(node, wait=False)
        mesh.start_agent(node, timeout=90)
        mesh.wait_tunnel_ready(tunnel, timeout=60)


class FwmarkWhenPinned:
    """For each pod: tcp_fwmark_accept in its netns at the moment its pin directory appears.

    Why that moment: a tunnel serving the pod checks for the pin directory on each connection to the app and,
    once it exists, connects with the bypass mark (0x111) and no 0x539, so the iptables connmark rules no
    longer mark the app's replies: only tcp_fwmark_accept (the accepted socket takes the SYN's mark) and the
    policy routing keep them local. The sysctl file is opened inside the netns beforehand (a thread that
    setns()es), so it is read within microseconds of the directory's appearance.
    """

    def __init__(self, pods: list[str]) -> None:
        self.seen: dict[str, str] = {}
        self._threads = [threading.Thread(target=self._watch, args=(pod,), daemon=True) for pod in pods]
        self._ready = threading.Barrier(len(pods) + 1)
        for thread in self._threads:
            thread.start()
        self._ready.wait(10)

    def _watch(self, pod: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(oracles.netns_path(NETNS[pod])) as ns:  # this thread moves to the pod's netns for good
            if libc.setns(ns.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), f"setns into {NETNS[pod]}")
        fd = os.open("/proc/sys/net/ipv4/tcp_fwmark_accept", os.O_RDONLY)
        pin_dir = oracles.PIN_ROOT / oracles.pod_uid(pod)
        self._ready.wait(10)
        deadline = time.monotonic() + 120
        try:
            while not pin_dir.is_dir():
                if time.monotonic() > deadline:
                    return
            self.seen[pod] = os.pread(fd, 8, 0).decode().strip()
        finally:
            os.close(fd)

    def result(self, timeout: float = 30) -> dict[str, str]:
        for thread in self._threads:
            thread.join(timeout)
        return self.seen


@pytest.fixture(params=SWITCHES, ids=[f"{a}-to-{b}" for a, b in SWITCHES])
def switch(request: pytest.FixtureRequest) -> tuple[str, str]:
    before, after = request.param
    return str(before), str(after)


@pytest.fixture
def mesh(tmp_path: Path, switch: tuple[str, str]) -> Iterator[Mesh]:
    def make(lab: Lab, run_dir: Path) -> Mesh:
        return Mesh(lab, run_dir, capture=switch[0], tunnel_grace=6)

    with oracles.lab_mesh(tmp_path, make, "na-switch-") as started:
        yield started


@pytest.mark.parametrize("style", STYLES)
def test_a_capture_mode_switch_with_the_pods_enrolled_keeps_the_mesh_whole(
    mesh: Mesh, switch: tuple[str, str], style: str, tmp_path: Path
) -> None:
    before, after = switch
    lab = mesh.lab
    mesh.wait_enabled(ENROLLED, timeout=60)
    for pod in (PAYMENTS, CHECKOUT):
        argv = lab.exec_argv(pod, [sys.executable, "-c", oracles.PEER_ECHO_SERVER, str(APP_PORT)])
        server = mesh.spawn(f"server-{pod.replace('/', '-')}", argv)
        wait_for(f"the server in {pod}", functools.partial(listening, server))
    assert {pod: capture_problems(before, pod) for pod in ENROLLED} == NOTHING
    assert once(mesh, FRONTEND, CHECKOUT, "before") == {"ok": True, "peer": IP[FRONTEND]}

    # The switch, node by node, under a client looping frontend -> checkout with a marker.
    switching = f"SWITCHING-PLAIN-{uuid.uuid4().hex}"
    pinned = FwmarkWhenPinned(ENROLLED) if after == "ebpf" else None
    dump = oracles.FabricCapture(lab, tmp_path / "switch.pcap")
    looping = subprocess.Popen(
        client_argv(mesh, FRONTEND, "loop", IP[CHECKOUT], str(APP_PORT), switching, "0.05"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for node in mesh.nodes:
            upgrade(mesh, node, after, style)
        mesh.wait_enabled(ENROLLED, timeout=60)
        time.sleep(1.0)  # attempts through the new agents' capture at both ends
        out, _ = looping.communicate(timeout=30)
    finally:
        if looping.poll() is None:
            looping.kill()
        dump.stop()
    attempts = [json.loads(line) for line in out.splitlines() if line.strip()]
    failed = [a for a in attempts if not a["ok"]]
    assert attempts and all(a["peer"] == IP[FRONTEND] for a in attempts if a["ok"]), attempts
    assert all(a.get("error") in ("ConnectionRefusedError", "ConnectionResetError") for a in failed), failed
    assert attempts[-1]["ok"], attempts[-5:]
    # Fail closed all along: between the two pods the fabric carried 15008 only - not one packet to or from
    # the app's port (an app's SYN-ACK sent out of eth0 is a reply that escaped the pod's policy routing).
    between = dump.packets(f"host {IP[FRONTEND]} and host {IP[CHECKOUT]}")
    assert between and all(".15008" in line for line in between), [x for x in between if ".15008" not in x][:5]
    assert switching.encode() not in dump.path.read_bytes()
    if pinned is not None:  # see FwmarkWhenPinned: the replies' path was there before the pins
        assert pinned.result() == dict.fromkeys(ENROLLED, "1")

    # The kernel: the new mode's capture is complete; the old mode's is complete too (it stays while the pod
    # is enrolled, see nodeagent/agent/capture_modes.py), and the policy routing both use is there once.
    assert {pod: capture_problems(after, pod) for pod in ENROLLED} == NOTHING
    assert {pod: capture_problems(before, pod) for pod in ENROLLED} == NOTHING
    assert all(listeners(pod) >= TUNNEL_PORTS for pod in ENROLLED)
    assert objects_of("iptables", BATCH) == [] and objects_of("ebpf", BATCH) == []  # legacy: never touched

    # Traffic in the new mode.
    marker = f"AFTER-SWITCH-PLAIN-{uuid.uuid4().hex}"
    legacy_marker = f"LEGACY-PLAIN-{uuid.uuid4().hex}"
    dump = oracles.FabricCapture(lab, tmp_path / "after.pcap")
    try:
        cross = once(mesh, FRONTEND, CHECKOUT, marker)
        same = once(mesh, FRONTEND, PAYMENTS, marker)
        inbound = once(mesh, CHECKOUT, PAYMENTS, marker)
        legacy = once(mesh, BATCH, PAYMENTS, legacy_marker)
    finally:
        dump.stop()
    assert cross == same == {"ok": True, "peer": IP[FRONTEND]}
    assert inbound == {"ok": True, "peer": IP[CHECKOUT]}
    between = dump.packets(f"host {IP[CHECKOUT]} and (host {IP[FRONTEND]} or host {IP[PAYMENTS]})")
    assert between and all(".15008" in line for line in between), [x for x in between if ".15008" not in x][:5]
    assert marker.encode() not in dump.path.read_bytes()
    assert legacy == {"ok": True, "peer": IP[BATCH]}
    assert legacy_marker.encode() in dump.path.read_bytes()  # legacy is not in the mesh: bytes cross as is
    plain = dump.packets(f"host {IP[BATCH]} and host {IP[PAYMENTS]}")
    assert plain and all(f"{IP[PAYMENTS]}.{APP_PORT}" in line for line in plain), plain[:5]
    # ... and at payments the plaintext was captured by its tunnel on 15006 (inbound, from legacy).
    lines = mesh.tunnel("node1").log().splitlines()
    from_legacy = [line for line in lines if re.search(rf"src\.addr={re.escape(IP[BATCH])}:\d+ ", line)]
    assert any(
        f"dst.addr={IP[PAYMENTS]}:{APP_PORT}" in line and 'direction="inbound"' in line and "error=" not in line
        for line in from_legacy
    ), from_legacy

    # What the operator's tool says: the new mode, and no problem.
    code, report = inspect_verify(mesh)
    rows = {f"{r['namespace']}/{r['pod']}": r for r in report["rows"]}
    expected: tuple[str, str, list[str]] = ("ebpf" if after == "ebpf" else "ambient", "ok", [])
    assert {pod: (rows[pod]["mode"], rows[pod]["rules"], rows[pod]["problems"]) for pod in ENROLLED} == dict.fromkeys(
        ENROLLED, expected
    )
    assert code == 0, report
    # ... which also says that each enrolled pod still holds the earlier mode's objects (until unenrolled).
    assert all(rows[pod]["other_mode"] for pod in ENROLLED), {pod: rows[pod]["other_mode"] for pod in ENROLLED}

    # Unenrolled, the pods lose the capture of both modes and the policy routing (the agent's removal).
    mesh.unenroll("shop")
    wait_for("shop released of both modes", lambda: all(released(pod) for pod in ENROLLED), timeout=30)
    assert once(mesh, FRONTEND, CHECKOUT, "released") == {"ok": True, "peer": IP[FRONTEND]}  # plain, direct

    for proc in mesh.procs:
        if proc.kind in ("agent", "tunnel"):
            assert "Traceback" not in proc.log(), f"{proc.name}:\n{proc.log()[-3000:]}"
    assert all(f"holds capture of the {before} mode" in mesh.agent(node).log() for node in mesh.nodes)
