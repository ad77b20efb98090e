"""The node agent as a real process in a lab node, checked with the kernel's own tools.

Oracles shell out (iptables-save, ip -j rule/route, ss, tcpdump, bpftool -j, /proc; the shared ones are
in oracles.py) and never import nodeagent; the expected rules are written out here by hand from
REFERENCE.md. The agent is started the way the demo does it: `python -m nodeagent.lab exec --node NODE --
python -m nodeagent.agent ...`. The ZDS peer in the status test is a helper process (it imports
nodeagent's tunnel-side client; it is a stand-in tunnel, not an oracle).

Every test runs in both capture modes. iptables: our chains (iptables-save of the flavour asked for) and
the policy routing. eBPF: the links on the pod's cgroup and netns with our programs (bpftool), their
pins under /sys/fs/bpf/nodeagent/<uid>/, the policy routing and tcp_fwmark_accept, and NO rule of ours
in iptables (either flavour) or nft; "untouched" means nothing of either mode.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import oracles
import pytest
import yaml

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

LAB = [sys.executable, "-m", "nodeagent.lab"]
STATE_DIR = Path("/run/nodeagent/lab")
CAPTURE_MODES = ["iptables", "ebpf"]
AMBIENT = {"istio.io/dataplane-mode": "ambient"}

# What every enrolled pod's netns must hold (iptables-save lines of our chains and jumps).
POD_RULES = sorted(
    [
        ":NODEAGENT_MANGLE_OUTPUT - [0:0]",
        ":NODEAGENT_MANGLE_PRERT - [0:0]",
        ":NODEAGENT_OUTPUT - [0:0]",
        ":NODEAGENT_PRERT - [0:0]",
        '-A PREROUTING -m comment --comment "nodeagent: connmark the tunnel connections" -j NODEAGENT_MANGLE_PRERT',
        '-A OUTPUT -m comment --comment "nodeagent: restore the tunnel mark on replies" -j NODEAGENT_MANGLE_OUTPUT',
        "-A NODEAGENT_MANGLE_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff "
        "--ctmask 0xffffffff",
        "-A NODEAGENT_MANGLE_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        '-A PREROUTING -m comment --comment "nodeagent: inbound capture to 15006" -j NODEAGENT_PRERT',
        '-A OUTPUT -m comment --comment "nodeagent: outbound capture to 15001" -j NODEAGENT_OUTPUT',
        "-A NODEAGENT_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "-A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        "-A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        "-A NODEAGENT_PRERT -s 169.254.7.127/32 -p tcp -j ACCEPT",
        "-A NODEAGENT_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15006",
    ]
)
# ... and its ip6tables (iptables mode): the IPv6 guard, Istio's sidecar answer to "IPv6 is not captured".
POD_RULES6 = sorted(
    [
        ":NODEAGENT_IN6 - [0:0]",
        '-A INPUT -m comment --comment "nodeagent: no IPv6 TCP around the mesh" -j NODEAGENT_IN6',
        "-A NODEAGENT_IN6 -i lo -j RETURN",
        "-A NODEAGENT_IN6 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset",
    ]
)
POD_ROUTING = {
    "rules": [{"priority": 32764, "src": "all", "fwmark": "0x111", "fwmask": "0xfff", "table": "100"}],
    "routes": [{"type": "local", "dst": "default", "dev": "lo", "protocol": "static", "scope": "host", "flags": []}],
}
NO_ROUTING: dict[str, list[Any]] = {"rules": [], "routes": []}


sh = oracles.sh


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --- oracles ------------------------------------------------------------------------------------------


def ours(netns: str, flavour: str = "nft", counters: bool = False, tool: str = "iptables") -> list[str]:
    """Our chain declarations and rules in `netns`, from iptables-save (or `tool`-save) of `flavour`, sorted."""
    text = sh("ip", "netns", "exec", netns, f"{tool}-{flavour}-save", *(["-c"] if counters else []))
    return sorted(line for line in text.splitlines() if "NODEAGENT" in line)


def ours6(netns: str, flavour: str = "nft") -> list[str]:
    return ours(netns, flavour, tool="ip6tables")


def routing(netns: str) -> dict[str, list[Any]]:
    rules = [r for r in json.loads(sh("ip", "-n", netns, "-j", "rule")) if r.get("fwmark")]
    # A table that never existed is an error for `ip route show`, not an empty list.
    argv = ["ip", "-n", netns, "-j", "route", "show", "table", "100"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    routes = json.loads(proc.stdout) if proc.returncode == 0 else []
    return {"rules": rules, "routes": routes}


def listening(netns: str) -> set[int]:
    out = sh("ip", "netns", "exec", netns, "ss", "-H", "-tln")
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines()}


NODE_OF = {"shop/frontend": "node1", "shop/payments": "node1", "shop/checkout": "node2", "legacy/batch": "node2"}


def netns_of(key: str) -> str:
    ns, name = key.split("/")
    return f"na-{NODE_OF[key]}.{ns}.{name}"


def fwmark_accept(key: str) -> str:
    return sh("ip", "netns", "exec", netns_of(key), "sysctl", "-n", "net.ipv4.tcp_fwmark_accept").strip()


def bpf_links(key: str) -> dict[str, tuple[int, int, str]]:
    """attach type -> (link id, program id, program name) of the pod's links (bpftool)."""
    return oracles.ebpf_attachments(NODE_OF[key], key, netns_of(key))


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[None]:
    """A fresh lab per test (up and down take ~0.1 s each); `lab down` also stops the agents in it."""
    if STATE_DIR.exists():
        pytest.fail("a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests")
    try:
        subprocess.run([*LAB, "up"], check=True, capture_output=True, timeout=60)
        yield
    finally:
        subprocess.run([*LAB, "down"], check=False, capture_output=True, timeout=60)


class Inventory:
    """The agents' copy of the lab inventory; edits are atomic renames (as a config manager would do)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = yaml.safe_load((STATE_DIR / "inventory.yaml").read_text())
        self.write()

    def write(self, text: str | None = None) -> None:
        tmp = self.path.with_name(f".{uuid.uuid4().hex}")
        tmp.write_text(text if text is not None else yaml.safe_dump(self.data))
        os.replace(tmp, self.path)

    def label(self, namespace: str, enrolled: bool) -> None:
        ns = next(n for n in self.data["namespaces"] if n["name"] == namespace)
        ns["labels"] = dict(AMBIENT) if enrolled else {}
        self.write()

    def delete_pod(self, key: str) -> None:
        """The pod is deleted as the kubelet does it: its sandbox (the netns) goes, then the pod object."""
        sh("ip", "netns", "delete", netns_of(key))
        self.data["pods"] = [p for p in self.data["pods"] if f"{p['namespace']}/{p['name']}" != key]
        self.write()


class Agent:
    def __init__(self, node: str, tmp: Path, inventory: Path, capture: str, extra: list[str]) -> None:
        self.node, self.tmp = node, tmp
        self.state_dir = tmp / "state"
        self.socket = str(tmp / f"zds-{node}.sock")
        self.log_path = tmp / f"agent-{node}.log"
        self.argv = [
            *LAB, "exec", "--node", node, "--",
            sys.executable, "-m", "nodeagent.agent", "--node", node, "--inventory", str(inventory),
            "--zds-socket", self.socket, "--state-dir", str(self.state_dir), "--capture", capture,
            "--inventory-poll", "0.05", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(
            f"agent {self.node} to be ready", lambda: (s := self.status()) and s["ready"] and s["pid"] == self.pid, 60
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / self.node / "status.json").read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return None

    def pod_status(self) -> dict[str, str]:
        status = self.status() or {"pods": {}}
        return {f"{p['namespace']}/{p['name']}": p["status"] for p in status["pods"].values()}

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)

    def fds(self) -> list[str]:
        return oracles.fds(self.pid)


@pytest.fixture(params=CAPTURE_MODES)
def capture(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def inventory(lab: None, tmp_path: Path) -> Inventory:
    return Inventory(tmp_path / "inventory.yaml")


@pytest.fixture
def start_agent(inventory: Inventory, tmp_path: Path, capture: str) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def start(node: str = "node1", *extra: str) -> Agent:
        agent = Agent(node, tmp_path, inventory.path, capture, list(extra))
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)


def captured(mode: str, key: str, flavour: str = "nft") -> bool:
    """The pod's capture is complete in the kernel, in `mode` only (see the module doc)."""
    netns = netns_of(key)
    if routing(netns) != POD_ROUTING:
        return False
    if mode == "iptables":
        return (
            ours(netns, flavour) == POD_RULES
            and ours6(netns, flavour) == POD_RULES6
            and oracles.ebpf_nothing(NODE_OF[key], key, netns)
        )
    return (
        not oracles.ebpf_problems(NODE_OF[key], key, netns)
        and fwmark_accept(key) == "1"
        and oracles.no_rule_of_ours(netns)
    )


def untouched(key: str) -> bool:
    """Nothing of either mode in the pod: no rule, no policy routing, no BPF link or pin, the sysctl at 0."""
    netns = netns_of(key)
    return (
        ours(netns, "nft") == []
        and ours(netns, "legacy") == []
        and ours6(netns, "nft") == []
        and ours6(netns, "legacy") == []
        and routing(netns) == NO_ROUTING
        and oracles.ebpf_nothing(NODE_OF[key], key, netns)
        and fwmark_accept(key) == "0"
    )


def probe_chain(node: str = "node1") -> list[str]:
    return ours(f"na-{node}")


def probe_rule(key: str, ip: str) -> str:
    return (
        f'-A NODEAGENT_POSTRT -d {ip}/32 -p tcp -m owner --socket-exists -m comment --comment "nodeagent: probe {key}" '
        "-j SNAT --to-source 169.254.7.127"
    )


PROBE_JUMP = '-A POSTROUTING -m comment --comment "nodeagent: kubelet probes to enrolled pods" -j NODEAGENT_POSTRT'
NODE1_PROBES = sorted(
    [
        ":NODEAGENT_POSTRT - [0:0]",
        PROBE_JUMP,
        probe_rule("shop/frontend", "10.10.1.10"),
        probe_rule("shop/payments", "10.10.1.11"),
    ]
)


# The iptables flavour matters in both modes (the kubelet-probe bypass is iptables in the node's netns).
@pytest.mark.parametrize(
    ("capture", "flavour"), [("iptables", "nft"), ("iptables", "legacy"), ("ebpf", "nft"), ("ebpf", "legacy")]
)
def test_enrolling_a_namespace_captures_its_pods_and_unenrolling_releases_them(
    inventory: Inventory, start_agent: Callable[..., Agent], capture: str, flavour: str
) -> None:
    inventory.label("shop", enrolled=False)
    agents = [start_agent("node1", "--iptables", flavour), start_agent("node2", "--iptables", flavour)]
    pods = ["shop/frontend", "shop/payments", "shop/checkout", "legacy/batch"]
    assert all(untouched(key) for key in pods)

    inventory.label("shop", enrolled=True)
    for key in pods[:3]:
        wait_for(f"{key} captured", lambda key=key: captured(capture, key, flavour))
    assert untouched("legacy/batch")  # a namespace that is not enrolled gets nothing
    node2_probes = sorted([":NODEAGENT_POSTRT - [0:0]", PROBE_JUMP, probe_rule("shop/checkout", "10.10.2.10")])
    wait_for("node1 probe bypass", lambda: ours("na-node1", flavour) == NODE1_PROBES)
    wait_for("node2 probe bypass", lambda: ours("na-node2", flavour) == node2_probes)
    other = "legacy" if flavour == "nft" else "nft"
    assert all(ours(netns_of(key), other) == [] for key in pods)  # one flavour only, the one asked for
    pending = {"shop/frontend": "pending", "shop/payments": "pending"}
    wait_for("pending status", lambda: agents[0].pod_status() == pending)

    inventory.label("shop", enrolled=False)
    for key in pods:
        wait_for(f"{key} released", lambda key=key: untouched(key))
    wait_for("probe chains removed", lambda: ours("na-node1", flavour) == [] and ours("na-node2", flavour) == [])
    wait_for("status without pods", lambda: agents[0].pod_status() == {})
    assert "ERROR" not in agents[0].log() and "Traceback" not in agents[0].log()


def settled_fds(agent: Agent) -> list[str] | None:
    """The agent's fds once no pod netns is held and nothing is in flight (two equal reads 0.2 s apart)."""
    first = agent.fds()
    time.sleep(0.2)
    second = agent.fds()
    return second if first == second and not any("netns" in fd for fd in second) else None


def test_twenty_enroll_unenroll_cycles_leave_no_residue(
    inventory: Inventory, start_agent: Callable[..., Agent], capture: str
) -> None:
    inventory.label("shop", enrolled=False)
    agent = start_agent("node1", "--verify-interval", "600")  # no periodic work: fds are only the steady ones
    bpf_before = oracles.our_bpf_objects()
    baseline: list[str] | None = None
    for cycle in range(20):
        inventory.label("shop", enrolled=True)
        wait_for(
            f"capture, cycle {cycle}", lambda: captured(capture, "shop/frontend") and captured(capture, "shop/payments")
        )
        inventory.label("shop", enrolled=False)
        wait_for(f"release, cycle {cycle}", lambda: untouched("shop/frontend") and untouched("shop/payments"))
        wait_for("probe chain removed", lambda: probe_chain() == [])
        fds = wait_for("settled fds", lambda: settled_fds(agent))
        if baseline is None:
            baseline = fds
        assert fds == baseline, f"cycle {cycle}: the agent's fds changed"
    # the ZDS listener, the metrics listener (the default --metrics :15014) and the loop's pair
    assert sum(f.startswith("socket:") for f in baseline or []) <= 4
    assert not [f for f in baseline or [] if "bpf" in f]  # no BPF object held open between operations
    # No program, map or link of pod capture is left in the kernel (freed after an RCU grace period).
    wait_for("BPF objects freed", lambda: oracles.our_bpf_objects() == bpf_before)
    assert not oracles.pins(oracles.pod_uid("shop/frontend")) and not oracles.pins(oracles.pod_uid("shop/payments"))
    assert "ERROR" not in agent.log()


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen()
print("listening", flush=True)
while True:
    conn, peer = s.accept()
    print(peer[0], flush=True)
    conn.sendall(b"hello from the app")
    conn.close()
"""

CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 8080), timeout=5)
    c.sendall(sys.argv[2].encode())
    print("connected", c.recv(100).decode())
except OSError as exc:
    print("failed", type(exc).__name__)
"""


def start_server(key: str, code: str = SERVER) -> subprocess.Popen[str]:
    server = subprocess.Popen([*LAB, "exec", key, "--", sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    return server


def test_fail_closed_without_a_tunnel_and_kubelet_probes_bypass_capture(
    start_agent: Callable[..., Agent], tmp_path: Path, capture: str
) -> None:
    start_agent("node1")
    wait_for("capture", lambda: captured(capture, "shop/frontend"))
    wait_for("probe bypass", lambda: probe_chain() == NODE1_PROBES)
    server = start_server("shop/checkout")  # node2: no agent there, a plain app
    probe_target = start_server("shop/frontend")
    pcap = tmp_path / "fabric.pcap"
    tcpdump = subprocess.Popen(
        ["ip", "netns", "exec", "na-fabric", "tcpdump", "-i", "br0", "-n", "--immediate-mode", "-U", "-Z", "root",
         "-w", str(pcap), "tcp port 8080"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tcpdump.stderr is not None and "listening on br0" in tcpdump.stderr.readline()
        captured_marker, plain_marker = f"CAPTURED-{uuid.uuid4().hex}", f"PLAIN-{uuid.uuid4().hex}"
        enrolled = sh(*LAB, "exec", "shop/frontend", "--", sys.executable, "-c", CLIENT, "10.10.2.10", captured_marker)
        assert enrolled.strip() == "failed ConnectionRefusedError"  # redirected to 15001, where nothing listens
        # The control: the same connection from node1's own netns crosses the fabric in plaintext.
        plain = sh("ip", "netns", "exec", "na-node1", sys.executable, "-c", CLIENT, "10.10.2.10", plain_marker)
        assert plain.strip() == "connected hello from the app"

        # A kubelet probe: a connection from the node's own netns to the enrolled pod's app port.
        probe = sh("ip", "netns", "exec", "na-node1", sys.executable, "-c", CLIENT, "10.10.1.10", "probe")
        assert probe.strip() == "connected hello from the app"
        assert probe_target.stdout is not None and probe_target.stdout.readline().strip() == "169.254.7.127"
    finally:
        time.sleep(0.2)
        tcpdump.send_signal(signal.SIGINT)
        tcpdump.wait(timeout=10)
        for proc in (server, probe_target):
            proc.kill()
            proc.wait()
    dump = sh("tcpdump", "-r", str(pcap), "-n", "-A")
    assert plain_marker in dump
    assert captured_marker not in dump and "10.10.1.10." not in dump  # not even a SYN from the enrolled pod


# On ::, dual-stack: how Go's net.Listen(":8080") and nginx listen.
SERVER6 = SERVER.replace("socket.socket()", "socket.socket(socket.AF_INET6)").replace('"0.0.0.0"', '"::"')


def link_local(netns: str, dev: str = "eth0") -> str:
    """`dev`'s IPv6 link-local address once duplicate address detection has passed (ip -j): until then the
    address can be neither reached nor used as a source (EADDRNOTAVAIL)."""

    def usable() -> str | None:
        for link in json.loads(sh("ip", "-n", netns, "-j", "addr", "show", dev)):
            for addr in link["addr_info"]:
                if addr["family"] == "inet6" and addr["scope"] == "link" and not addr.get("tentative"):
                    return str(addr["local"])
        return None

    return str(wait_for(f"the IPv6 link-local address of {dev} in {netns}", usable))


def connect6(netns: str, host: str) -> str:
    return sh("ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, host, "v6").strip()


def test_ipv6_cannot_reach_an_enrolled_pods_app_around_the_mesh(
    inventory: Inventory, start_agent: Callable[..., Agent], capture: str
) -> None:
    """Capture is IPv4-only, but every pod's eth0 has an IPv6 link-local address: an app on :: took
    plaintext from any neighbour on the node's bridge, around the tunnel and every policy. Enrolled, the
    pod refuses new inbound IPv6 TCP (RST: refused at once); its own IPv6 and loopback keep working."""
    inventory.label("shop", enrolled=False)
    start_agent("node2")
    batch, checkout_ns = netns_of("legacy/batch"), netns_of("shop/checkout")
    checkout = f"{link_local(checkout_ns)}%eth0"
    from_node = f"{link_local(checkout_ns)}%br0"
    batch_ll = f"{link_local(batch)}%eth0"
    link_local("na-node2", "br0")  # the node's own source address
    apps = [start_server(key, SERVER6) for key in ("shop/checkout", "legacy/batch")]
    try:
        # Not enrolled: the neighbour pod and the node reach the app over IPv6 (what enrolment must stop).
        assert connect6(batch, checkout) == "connected hello from the app"
        assert connect6("na-node2", from_node) == "connected hello from the app"

        inventory.label("shop", enrolled=True)
        wait_for("checkout captured", lambda: captured(capture, "shop/checkout"))
        assert connect6(batch, checkout) == "failed ConnectionRefusedError"
        assert connect6("na-node2", from_node) == "failed ConnectionRefusedError"
        assert connect6(checkout_ns, "::1") == "connected hello from the app"  # the pod itself, over loopback
        assert connect6(checkout_ns, batch_ll) == "connected hello from the app"  # its own outbound IPv6

        inventory.label("shop", enrolled=False)
        wait_for("checkout released", lambda: untouched("shop/checkout"))
        assert connect6(batch, checkout) == "connected hello from the app"
    finally:
        for app in apps:
            app.kill()
            app.wait()


def chain_counters(key: str) -> list[str]:
    """Rules of our chains with their packet counters (re-applied rules restart from [0:0]). The jumps in
    the builtin chains also count background packets (IGMP reports), so they are left out."""
    return [line for line in ours(netns_of(key), counters=True) if " -A NODEAGENT_" in line]


def kernel_objects(mode: str, key: str) -> Any:
    """What a re-applied capture would change. iptables: the chains' counters. eBPF: the links (a re-attach
    makes a new link id), the programs they run and the pinned maps (a re-created map gets a new id)."""
    if mode == "iptables":
        return chain_counters(key)
    uid = oracles.pod_uid(key)
    return bpf_links(key), {pin: oracles.pinned_id(uid, pin) for pin in oracles.pins(uid)}


def test_agent_restart_adopts_capture_without_touching_it(start_agent: Callable[..., Agent], capture: str) -> None:
    agent = start_agent("node1")
    keys = ["shop/frontend", "shop/payments"]
    for key in keys:
        wait_for(f"{key} captured", lambda key=key: captured(capture, key))
    # Make the counters of the outbound REDIRECT non-zero: a re-applied rule would start again from 0.
    sh(*LAB, "exec", "shop/frontend", "--", sys.executable, "-c", CLIENT, "10.10.2.10", "x")
    before = {key: kernel_objects(capture, key) for key in keys}
    if capture == "iptables":
        assert any("REDIRECT --to-ports 15001" in line and not line.startswith("[0:0]") for line in before[keys[0]])
    node_before = probe_chain()

    for sig in (signal.SIGTERM, signal.SIGKILL):
        code = agent.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        assert {key: kernel_objects(capture, key) for key in keys} == before  # capture stays while down
        assert all(routing(netns_of(key)) == POD_ROUTING for key in keys)
        agent.start()
        assert {key: kernel_objects(capture, key) for key in keys} == before  # adopted, not re-applied
        assert all(captured(capture, key) for key in keys)  # and no duplicates
        assert probe_chain() == node_before
    assert agent.log().count("shop/frontend adopted (capture already complete in the kernel)") == 2
    assert agent.pod_status() == {"shop/frontend": "pending", "shop/payments": "pending"}
    assert not Path(agent.socket).exists() or agent.proc is not None


def inspect_redirects(inventory: Inventory, agent: Agent) -> dict[str, Any]:
    out = sh(
        sys.executable, "-m", "nodeagent.agent", "inspect", "redirects", "--node", agent.node, "-o", "json",
        "--inventory", str(inventory.path), "--state-dir", str(agent.state_dir),
    )  # fmt: skip
    return {f"{r['namespace']}/{r['pod']}": r for r in json.loads(out)["rows"]}


def test_inspect_verify_finds_nothing_wrong_on_a_node_with_nothing_enrolled(
    inventory: Inventory, start_agent: Callable[..., Agent]
) -> None:
    """No pod captured: the agent keeps no probe-bypass chain, and that is the healthy state, not a missing
    chain (the demo's first `inspect redirects` printed it as one, and --verify failed)."""
    inventory.label("shop", enrolled=False)
    agent = start_agent("node1")
    wait_for("node1's probe chain gone", lambda: probe_chain() == [])
    argv = [
        sys.executable, "-m", "nodeagent.agent", "inspect", "redirects", "--node", "node1", "--verify",
        "--inventory", str(inventory.path), "--state-dir", str(agent.state_dir),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kubelet-probe bypass none (no pod captured)" in done.stdout
    assert "verified: no problems found" in done.stdout


def test_drift_is_shown_by_inspect_and_repaired(
    inventory: Inventory, start_agent: Callable[..., Agent], capture: str
) -> None:
    # A verify round every 5 s: inspect (a separate process) sees the drift before the repair, which must
    # still come within 10 s of the breakage.
    agent = start_agent("node1", "--verify-interval", "5")
    front = "shop/frontend"
    wait_for("capture", lambda: captured(capture, front) and captured(capture, "shop/payments"))
    rows = inspect_redirects(inventory, agent)
    assert rows[front]["rules"] == "ok" and rows[front]["status"] == "pending"
    assert rows[front]["mode"] == {"iptables": "ambient", "ebpf": "ebpf"}[capture] and rows[front]["listeners"] == []
    links = bpf_links(front)

    if capture == "iptables":
        sh("ip", "netns", "exec", netns_of(front), "iptables", "-t", "nat", "-F")
        expected = ["nat chain NODEAGENT_OUTPUT has 0 rules, expected 3 rules"]
    else:  # detach one link by hand, and drop another's pin (its last reference: the link goes)
        sh("bpftool", "link", "detach", "id", str(links["cgroup_inet4_connect"][0]))
        os.unlink(oracles.PIN_ROOT / oracles.pod_uid(front) / "link_sk_lookup")
        expected = [
            f"connect4: link {links['cgroup_inet4_connect'][0]} was detached (by hand?)",
            "sk_lookup: link pin link_sk_lookup is missing (program not attached)",
        ]
    sh("ip", "-n", netns_of(front), "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100")
    broken = time.monotonic()
    if capture == "ebpf":
        assert set(bpf_links(front)) == {"cgroup_inet6_connect", "cgroup_sock_ops"}  # the kernel agrees: two are gone
        assert oracles.cgroup_progs(oracles.pod_cgroup("node1", front)) == {
            "cgroup_inet6_connect": "na_connect6",
            "cgroup_sock_ops": "na_sockops",
        }
    rows = inspect_redirects(inventory, agent)
    assert time.monotonic() - broken < 5, "inspect was too slow to see the drift before the next verify"
    assert rows[front]["rules"] == "drift"
    for problem in [*expected, "the ip rule fwmark 0x111/0xfff lookup 100 is missing"]:
        assert problem in rows[front]["drift"], (problem, rows[front]["drift"])
    assert rows["shop/payments"]["rules"] == "ok"

    wait_for("drift repaired", lambda: captured(capture, front), timeout=10)
    assert time.monotonic() - broken < 10
    if capture == "ebpf":  # re-attached from the pinned programs: new links, the same programs
        after = bpf_links(front)
        assert after["cgroup_sock_ops"] == links["cgroup_sock_ops"]
        for attach_type in ("cgroup_inet4_connect", "sk_lookup"):
            assert after[attach_type][0] != links[attach_type][0] and after[attach_type][1:] == links[attach_type][1:]
    assert inspect_redirects(inventory, agent)[front]["rules"] == "ok"
    assert f"capture drift in {front} repaired" in agent.log()


BROKEN_INVENTORIES = {
    "bad YAML": (lambda text: text.replace("pods:", "pods: [", 1), "not valid YAML: line"),
    "unknown field": (lambda text: text.replace("service_account: frontend", "serviceAccount: frontend"), "pods[0]"),
    "duplicate IPs": (lambda text: text.replace("ip: 10.10.1.11", "ip: 10.10.1.10"), "pods[1].ip: duplicate IP"),
    "no service account": (
        lambda text: text.replace("  service_account: payments\n", ""),
        "pods[1].service_account: required field is missing",
    ),
}


def test_a_broken_inventory_is_reported_and_the_last_good_state_kept(
    inventory: Inventory, start_agent: Callable[..., Agent], capture: str
) -> None:
    agent = start_agent("node1")
    wait_for("capture", lambda: captured(capture, "shop/frontend") and captured(capture, "shop/payments"))
    good = yaml.safe_dump(inventory.data, sort_keys=False)
    assert "service_account: payments\n" in good and "ip: 10.10.1.11" in good
    for case, (breaks, field) in BROKEN_INVENTORIES.items():
        inventory.write(breaks(good))
        wait_for(f"{case}: the error in the log", lambda field=field: field in agent.log())
        wait_for(f"{case}: the error in the status", lambda field=field: field in agent.status()["inventory_error"])
        assert captured(capture, "shop/frontend") and captured(capture, "shop/payments"), case
        assert agent.pod_status() == {"shop/frontend": "pending", "shop/payments": "pending"}, case
    assert "keeping the last good inventory" in agent.log()
    inventory.write(good)
    wait_for("the error cleared", lambda: (s := agent.status()) is not None and s["inventory_error"] == "")
    assert agent.proc is not None and agent.proc.poll() is None


FAKE_TUNNEL = """
import asyncio, sys
from nodeagent.ztunnel.zds_client import ZdsClient

class Handler:
    async def on_add(self, workload, netns_fd): pass
    async def on_keep(self, uid): pass
    async def on_del(self, uid): pass
    async def on_snapshot_done(self, known_uids): print("snapshot", len(known_uids), flush=True)

async def main():
    client = ZdsClient(Handler(), sys.argv[1])
    client.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_status_is_pending_without_a_tunnel_and_enabled_once_one_acks(
    start_agent: Callable[..., Agent], capture: str
) -> None:
    agent = start_agent("node1")
    wait_for("pending", lambda: agent.pod_status() == {"shop/frontend": "pending", "shop/payments": "pending"})
    tunnel = subprocess.Popen(
        [*LAB, "exec", "--node", "node1", "--", sys.executable, "-c", FAKE_TUNNEL, agent.socket],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tunnel.stdout is not None and tunnel.stdout.readline().strip() == "snapshot 2"
        wait_for("enabled", lambda: agent.pod_status() == {"shop/frontend": "enabled", "shop/payments": "enabled"})
    finally:
        tunnel.kill()
        tunnel.wait()
    wait_for("pending again", lambda: agent.pod_status() == {"shop/frontend": "pending", "shop/payments": "pending"})
    assert captured(capture, "shop/frontend")  # the status changed, the kernel did not


def bpf_gone(key: str, links: dict[str, tuple[int, int, str]]) -> bool:
    """No pin of the pod's uid, no program on its cgroup, and none of its former `links` left in the kernel."""
    alive = {link["id"] for link in oracles.bpftool("link", "show")}
    cgroup = oracles.pod_cgroup(NODE_OF[key], key)
    return (
        not oracles.pins(oracles.pod_uid(key))
        and not oracles.cgroup_progs(cgroup)
        and not ({link_id for link_id, _, _ in links.values()} & alive)
    )


@pytest.mark.parametrize("capture", ["ebpf"])
def test_a_deleted_pods_pins_go_though_its_netns_went_first(
    inventory: Inventory, start_agent: Callable[..., Agent], capture: str
) -> None:
    """eBPF state lives under the pod's uid in bpffs, not in its netns: when the netns is already gone as
    the pod leaves the inventory, the agent must still unpin and detach it."""
    agent = start_agent("node1")
    for key in ("shop/frontend", "shop/payments"):
        wait_for(f"{key} captured", lambda key=key: captured(capture, key))
    links = bpf_links("shop/frontend")
    assert len(links) == 4

    inventory.delete_pod("shop/frontend")
    wait_for("frontend's BPF objects removed", lambda: bpf_gone("shop/frontend", links))
    wait_for("status without frontend", lambda: agent.pod_status() == {"shop/payments": "pending"})
    assert captured(capture, "shop/payments")
    assert "ERROR" not in agent.log()


@pytest.mark.parametrize("capture", ["ebpf"])
def test_the_pins_of_a_pod_deleted_while_the_agent_was_down_go_at_its_start(
    inventory: Inventory, start_agent: Callable[..., Agent], capture: str
) -> None:
    """The start-up sweep: pins whose uid is no live pod's are removed; those of live pods stay untouched,
    including another node's (the lab's nodes share one bpffs)."""
    agents = [start_agent("node1"), start_agent("node2")]
    for key in ("shop/frontend", "shop/payments", "shop/checkout"):
        wait_for(f"{key} captured", lambda key=key: captured(capture, key))
    links = bpf_links("shop/payments")
    before = {key: kernel_objects(capture, key) for key in ("shop/frontend", "shop/checkout")}

    assert agents[0].stop(signal.SIGKILL) == -signal.SIGKILL
    inventory.delete_pod("shop/payments")
    assert oracles.pins(oracles.pod_uid("shop/payments"))  # nobody was there to remove them
    agents[0].start()
    wait_for("payments' BPF objects removed", lambda: bpf_gone("shop/payments", links))
    assert {key: kernel_objects(capture, key) for key in before} == before
    assert captured(capture, "shop/frontend") and captured(capture, "shop/checkout")
    assert all("ERROR" not in agent.log() for agent in agents)


MODE_SWITCHES = {"iptables": "ebpf", "ebpf": "iptables"}


@pytest.mark.parametrize("unenrolled", ["while-running", "while-down"])
def test_a_capture_mode_change_between_runs_leaves_nothing_behind(
    inventory: Inventory, start_agent: Callable[..., Agent], tmp_path: Path, capture: str, unenrolled: str
) -> None:
    """`--capture auto` may choose differently after a kernel or header change: the next run must remove the
    previous mode's objects too, on unenroll and in the start-up sweep of strays (left, they refuse every
    TCP connection of a pod no tunnel serves), and say in its log what it found."""
    then = MODE_SWITCHES[capture]  # the second run's mode (the `capture` fixture is the first run's)
    keys = ("shop/frontend", "shop/payments")
    first = start_agent("node1")
    wait_for("both pods captured", lambda: first.pod_status() == dict.fromkeys(keys, "pending"))
    assert not any(untouched(key) for key in keys)
    if capture == "ebpf":
        assert all(oracles.pins(oracles.pod_uid(key)) for key in keys) and oracles.no_rule_of_ours(netns_of(keys[0]))
    else:
        assert all(
            ours(netns_of(key)) == POD_RULES and oracles.ebpf_nothing("node1", key, netns_of(key)) for key in keys
        )
    assert first.stop() == 0  # capture stays in place for the next run
    if unenrolled == "while-down":
        inventory.label("shop", enrolled=False)
    (tmp_path / "second").mkdir()
    second = Agent("node1", tmp_path / "second", inventory.path, then, [])
    try:
        if unenrolled == "while-running":
            wait_for("the mode change logged", lambda: f"holds capture of the {capture} mode" in second.log())
            inventory.label("shop", enrolled=False)
        for key in keys:
            wait_for(f"{key} released of both modes", lambda key=key: untouched(key))
        assert f"removed capture of the {capture} mode" in second.log()
        assert "ERROR" not in second.log() and "Traceback" not in second.log()
    finally:
        if second.proc is not None and second.proc.poll() is None:
            second.stop(signal.SIGKILL)
