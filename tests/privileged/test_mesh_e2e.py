"""The whole mesh end to end in the lab: real CA, agents and tunnels (nodeagent.labmesh.Mesh), real apps.

What these tests prove, each on a fresh lab and mesh (the acceptance of the node-agent and tunnel issues):
pod -> pod through capture and both tunnels, same- and cross-node, with the client's own IP at the
server; nothing but TCP to/from 15008 (and no plaintext) on the fabric between enrolled pods, while a
pod of a non-enrolled namespace is untouched and talks plaintext; fail closed while the tunnel is dead
and a quick resumption after its restart; agent restarts that break nothing; with the agents stopped,
enrolled pods still go through the tunnels (capture outlives its agent); a tunnel hand-over that loses
no connection; enroll/unenroll cycles that leave nothing behind.

Every test runs in both capture modes (`capture`: iptables, ebpf). Oracles shell out — tcpdump on the
fabric bridge, iptables-save, nft, ss, ip, bpftool, /proc (the shared ones in oracles.py) — and never ask
the code under test. In eBPF mode "captured" means the pod's four links run our programs, pinned, per
bpftool, and no rule of ours is in the pod's iptables (either flavour) or nft ruleset. The apps in the
pods are small scripts here (an echo server that first tells the client the peer address it saw, and
clients that report what happened). `Mesh` only drives the processes; its waits are for sequencing,
never the assertion. Expected addresses are written out from the lab's default topology.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oracles
import pytest
from metrics_scrape import samples
from oracles import APP_PORT, BATCH, CHECKOUT, FRONTEND, IP, NETNS, NODE, PAYMENTS, SHOP, TUNNEL_PORTS
from waiting import wait_for

from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, teardown
from nodeagent.labmesh import Mesh

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(150)]

CAPTURE_MODES = ["iptables", "ebpf"]
ENROLLED = SHOP

# --- apps in the pods ---------------------------------------------------------------------------------

SERVER = oracles.PEER_ECHO_SERVER

# Clients; each prints one JSON document (`loop` one line per attempt). Times are time.monotonic(),
# which is system-wide, so they compare with the test's own clock.
CLIENT = r"""
import hashlib, json, os, select, socket, sys, threading, time

def connect(host, port, timeout):
    c = socket.create_connection((host, port), timeout=timeout)
    f = c.makefile("rb")
    line = f.readline()
    if not line.startswith(b"peer "):
        raise ConnectionError(f"no greeting: {line!r}")
    return c, f, line[5:].strip().decode()

def recv_exactly(f, n):
    data = f.read(n)
    if len(data) != n:
        raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
    return data

def stdin_closed(stop):
    sys.stdin.read()
    stop.set()

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "once":  # one short exchange
    try:
        c, f, peer = connect(host, port, 5)
        msg = sys.argv[4].encode()
        c.sendall(msg)
        echo = recv_exactly(f, len(msg))
        print(json.dumps({"ok": echo == msg, "peer": peer}))
    except OSError as exc:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "detail": str(exc)}))
elif mode == "bulk":  # SIZE bytes of a repeated marker, echoed back and compared
    marker, size = sys.argv[4].encode(), int(sys.argv[5])
    payload = (marker * (size // len(marker) + 1))[:size]
    c, f, peer = connect(host, port, 10)
    c.settimeout(60)
    def send():
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    h, n = hashlib.sha256(), 0
    while True:
        chunk = f.read1(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    t.join()
    print(json.dumps({"peer": peer, "sent": size, "received": n,
                      "same": h.hexdigest() == hashlib.sha256(payload).hexdigest()}))
elif mode == "loop":  # a new connection every INTERVAL s until stdin closes (or the first success)
    interval, until_ok = float(sys.argv[4]), sys.argv[5] == "until-ok"
    stop, lock = threading.Event(), threading.Lock()
    threading.Thread(target=stdin_closed, args=(stop,), daemon=True).start()
    def attempt(i):
        t0 = time.monotonic()
        try:
            c, f, peer = connect(host, port, 3)
            c.sendall(b"x%d" % i)
            ok = recv_exactly(f, len(b"x%d" % i)) == b"x%d" % i
            c.close()
            result = {"ok": ok, "peer": peer}
        except OSError as exc:
            result = {"ok": False, "error": type(exc).__name__}
        result.update(i=i, start=t0, end=time.monotonic())
        with lock:
            print(json.dumps(result), flush=True)
        if result["ok"] and until_ok:
            stop.set()
    threads, i, next_at = [], 0, time.monotonic()
    while not stop.is_set():
        t = threading.Thread(target=attempt, args=(i,))
        t.start()
        threads.append(t)
        i += 1
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))
    for t in threads:
        t.join()
elif mode == "stream":  # one long-lived connection: 4 KiB every 10 ms, each echo checked, until stdin closes
    stop = threading.Event()
    threading.Thread(target=stdin_closed, args=(stop,), daemon=True).start()
    c, f, peer = connect(host, port, 5)
    c.settimeout(10)
    print(json.dumps({"connected": True, "peer": peer, "at": time.monotonic()}), flush=True)
    sent = received = 0
    error, ended = None, None
    try:
        while not stop.is_set():
            chunk = os.urandom(4096)
            c.sendall(chunk)
            sent += len(chunk)
            if recv_exactly(f, len(chunk)) != chunk:
                raise ConnectionError("echo differs")
            received += len(chunk)
            stop.wait(0.01)
        c.shutdown(socket.SHUT_WR)
        rest = f.read()
        if rest:
            raise ConnectionError(f"{len(rest)} unexpected bytes after the half-close")
    except (OSError, ValueError) as exc:
        error, ended = f"{type(exc).__name__}: {exc}", time.monotonic()
    print(json.dumps({"peer": peer, "sent": sent, "received": received, "error": error, "ended": ended}))
"""


sh = oracles.sh


def in_pod(lab: Lab, pod: str, script: str, *args: str) -> list[str]:
    return lab.exec_argv(pod, [sys.executable, "-c", script, *args])


def client(lab: Lab, pod: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    out = sh(*in_pod(lab, pod, CLIENT, *args), timeout=timeout)
    return dict(json.loads(out.splitlines()[-1]))


def once(lab: Lab, src: str, dst: str, message: str = "hello") -> dict[str, Any]:
    return client(lab, src, "once", IP[dst], str(APP_PORT), message)


class Background:
    """A client running in a pod until its stdin is closed; `finish()` returns its JSON lines."""

    def __init__(self, lab: Lab, pod: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            in_pod(lab, pod, CLIENT, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def readline(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return dict(json.loads(self.proc.stdout.readline()))

    def finish(self, timeout: float = 30) -> list[dict[str, Any]]:
        out, _ = self.proc.communicate(timeout=timeout)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait(self, timeout: float = 30) -> list[dict[str, Any]]:
        """Its JSON lines once it exits by itself (stdin stays open)."""
        assert self.proc.stdout is not None
        self.proc.wait(timeout)
        return [json.loads(line) for line in self.proc.stdout.read().splitlines() if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def loop(lab: Lab, src: str, dst: str, interval: float, until_ok: bool = False) -> Background:
    return Background(lab, src, "loop", IP[dst], str(APP_PORT), str(interval), "until-ok" if until_ok else "all")


def stream(lab: Lab, src: str, dst: str) -> Background:
    bg = Background(lab, src, "stream", IP[dst], str(APP_PORT))
    first = bg.readline()
    assert first["connected"] and first["peer"] == IP[src], first
    return bg


# --- oracles (the kernel's own tools, mode-aware; the shared ones are in oracles.py) ---------------------


def iptables_save(netns: str, flavour: str = "nft") -> str:
    """The whole ruleset of a netns without counters and the save/commit timestamps."""
    text = oracles.iptables_save(netns, flavour)
    return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#"))


def ours(netns: str) -> list[str]:
    """Every line of ours in the netns, in either iptables flavour."""
    return [line for fl in ("nft", "legacy") for line in iptables_save(netns, fl).splitlines() if "NODEAGENT" in line]


def our_kernel_state(where: str) -> tuple[Any, ...]:
    """What capture put in a pod's netns (or a node's: the kubelet-probe chain), as the kernel lists it.

    Our iptables lines (both flavours, in order), the policy rules, our routing table 100, and for a pod the
    eBPF links (link id, program id, name) and pins. Not the whole route table: a node's netns also holds
    kernel-managed entries (IPv6 neighbours and cached routes) that change with traffic.
    """
    netns = NETNS.get(where, f"na-{where}")
    table_100 = [
        line for line in sh("ip", "-n", netns, "route", "show", "table", "all").splitlines() if "table 100" in line
    ]
    state: tuple[Any, ...] = (ours(netns), sh("ip", "-n", netns, "rule"), "\n".join(table_100))
    if where in NODE:
        state += (oracles.ebpf_attachments(NODE[where], where, netns), oracles.pins(oracles.pod_uid(where)))
    return state


def ip_rules_and_routes(netns: str) -> str:
    rules = sh("ip", "-n", netns, "rule")
    return rules + sh("ip", "-n", netns, "route", "show", "table", "all")


def listeners(netns: str) -> set[int]:
    out = sh("ip", "netns", "exec", netns, "ss", "-H", "-tln")
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines()}


def capture_in_kernel(mode: str, pod: str) -> bool:
    """The pod's capture objects of `mode` are in the kernel, and none of the other mode.

    iptables: our four jumps (nat and mangle, PREROUTING and OUTPUT). eBPF: the four links running our
    programs, pinned (bpftool), and no rule of ours in iptables (either flavour) or nft.
    """
    netns = NETNS[pod]
    if mode == "iptables":
        jumps = [line for line in ours(netns) if line.startswith(("-A PREROUTING", "-A OUTPUT"))]
        return len(jumps) == 4 and oracles.ebpf_nothing(NODE[pod], pod, netns)
    return not oracles.ebpf_problems(NODE[pod], pod, netns) and oracles.no_rule_of_ours(netns)


def captured(mode: str, pod: str) -> bool:
    """Capture is in the kernel and the tunnel's three listeners are in the pod's netns."""
    return capture_in_kernel(mode, pod) and listeners(NETNS[pod]) >= TUNNEL_PORTS


def released(pod: str) -> bool:
    """Nothing of ours in the pod, whatever the mode: no rule, no policy routing, no BPF link or pin."""
    netns = NETNS[pod]
    return (
        not ours(netns)
        and not (TUNNEL_PORTS & listeners(netns))
        and not oracles.fwmark_rules(netns)
        and oracles.ebpf_nothing(NODE[pod], pod, netns)
    )


def proc_listening(pid: int) -> set[int]:
    """Listening TCP ports in the netns of process `pid` (/proc/PID/net/tcp: no fork, cheap to poll)."""
    ports = set()
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] == "0A":
                ports.add(int(parts[1].rpartition(":")[2], 16))
    return ports


fds = oracles.fds


def netns_fds(pid: int) -> list[str]:
    return [f for f in fds(pid) if f.startswith("net:") or "/netns/" in f]


class Tcpdump:
    """tcpdump on the fabric bridge, writing full packets to a pcap file."""

    def __init__(self, lab: Lab, path: Path, filter_: str = "") -> None:
        self.path = path
        netns, iface = lab.fabric_interface()
        argv = ["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-nn", "-U", "--immediate-mode", "-s", "0",
                "-B", "32768", "-Z", "root", "-w", str(path), *filter_.split()]  # fmt: skip
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "listening on" in line, line
        self.stats = ""

    def stop(self) -> None:
        time.sleep(0.3)  # let the last packets reach the file
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=20)
        self.stats = err

    @property
    def dropped_by_kernel(self) -> int:
        match = re.search(r"(\d+) packets dropped by kernel", self.stats)
        return int(match.group(1)) if match else -1

    def packets(self, bpf: str) -> list[str]:
        return sh("tcpdump", "-r", str(self.path), "-nn", "-q", *bpf.split(), timeout=120).splitlines()

    def raw(self) -> bytes:
        return self.path.read_bytes()


# --- fixtures -----------------------------------------------------------------------------------------


@dataclass
class Env:
    lab: Lab
    mesh: Mesh
    tmp: Path

    @property
    def mode(self) -> str:
        return self.mesh.capture

    def server(self, pod: str) -> int:
        """Start the echo server in `pod`; its pid (the process itself: `lab exec` execs)."""
        proc = self.mesh.spawn(f"server-{pod.replace('/', '-')}", in_pod(self.lab, pod, SERVER, str(APP_PORT)))
        wait_for(f"the server in {pod}", lambda: "listening" in proc.log())
        return proc.pid


@pytest.fixture(params=CAPTURE_MODES)
def capture(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_mesh(capture: str, tmp_path: Path) -> Iterator[Callable[..., Env]]:
    """A fresh lab (the default topology: shop enrolled, legacy not) and a mesh on it, started on demand."""
    if Path("/run/nodeagent/lab/state.json").exists():
        pytest.fail("a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests")
    run_dir = Path(tempfile.mkdtemp(prefix="na-e2e-"))  # short: ZDS socket paths must fit 108 bytes
    envs: list[Env] = []

    def start(**options: Any) -> Env:
        lab = Lab.up(DEFAULT_TOPOLOGY)
        mesh = Mesh(lab, run_dir, capture=capture, **options)
        envs.append(Env(lab, mesh, tmp_path))
        mesh.start()
        return envs[-1]

    try:
        yield start
    finally:
        for env in envs:
            env.mesh.stop()
        teardown()
        for log in run_dir.glob("*.log"):  # kept with the test's tmp_path for a post-mortem
            shutil.copy(log, tmp_path / log.name)
        shutil.rmtree(run_dir, ignore_errors=True)


def no_errors_in_logs(env: Env) -> None:
    for proc in env.mesh.procs:
        if proc.kind in ("agent", "tunnel"):
            text = proc.log()
            assert "Traceback" not in text, f"{proc.name}:\n{text[-3000:]}"


# --- the tests ----------------------------------------------------------------------------------------


def test_pod_to_pod_through_capture_and_both_tunnels(start_mesh: Callable[..., Env]) -> None:
    env = start_mesh()
    lab = env.lab
    env.mesh.wait_enabled(ENROLLED)
    for pod in (PAYMENTS, CHECKOUT, BATCH):
        env.server(pod)
    assert all(captured(env.mode, pod) for pod in ENROLLED)
    if env.mode == "ebpf":  # the point of the mode: no rule of ours in iptables (either flavour) or nft
        assert {pod: oracles.rules_of_ours(NETNS[pod]) for pod in ENROLLED} == {
            pod: {" ".join(tool): [] for tool in oracles.RULE_TOOLS} for pod in ENROLLED
        }
    # legacy is not enrolled: nothing of ours in its netns, no tunnel listeners, no policy routing, no BPF.
    assert ours(NETNS[BATCH]) == [] and not (TUNNEL_PORTS & listeners(NETNS[BATCH]))
    assert released(BATCH)

    dump = Tcpdump(lab, env.tmp / "fabric.pcap", "tcp")
    try:
        cross = once(lab, FRONTEND, CHECKOUT, "cross-node")
        same = once(lab, FRONTEND, PAYMENTS, "same-node")
        marker = f"LEGACY-PLAIN-{uuid.uuid4().hex}"
        plain = once(lab, BATCH, PAYMENTS, marker)  # a non-mesh client to an enrolled server: plaintext
    finally:
        dump.stop()
    assert cross == {"ok": True, "peer": IP[FRONTEND]}  # the server saw the client pod's own IP
    assert same == {"ok": True, "peer": IP[FRONTEND]}
    assert plain == {"ok": True, "peer": IP[BATCH]}
    # Independent proof that the enrolled connections went through the tunnels: on the fabric, frontend
    # and checkout exchanged packets on 15008 only, while legacy's bytes crossed as they are.
    between = dump.packets(f"host {IP[FRONTEND]} and host {IP[CHECKOUT]}")
    assert between and all(".15008" in line for line in between), between
    assert marker.encode() in dump.raw()
    # The tunnels' own view agrees (an access-log line per direction), after the independent checks.
    node2_log = env.mesh.tunnel("node2").log()
    assert 'src.identity="spiffe://cluster.local/ns/shop/sa/frontend"' in node2_log
    no_errors_in_logs(env)


def test_fabric_carries_only_hbone_between_enrolled_pods_during_a_10_mib_transfer(
    start_mesh: Callable[..., Env],
) -> None:
    env = start_mesh()
    lab = env.lab
    env.mesh.wait_enabled(ENROLLED)
    env.server(CHECKOUT)
    marker = f"NODEAGENT-E2E-SECRET-{uuid.uuid4().hex}|"
    size = 10 << 20
    dump = Tcpdump(lab, env.tmp / "fabric.pcap")  # every packet, not only TCP
    try:
        result = client(lab, FRONTEND, "bulk", IP[CHECKOUT], str(APP_PORT), marker, str(size), timeout=90)
    finally:
        dump.stop()
    assert result == {"peer": IP[FRONTEND], "sent": size, "received": size, "same": True}
    assert dump.dropped_by_kernel == 0, dump.stats  # otherwise "every packet" would not be every packet
    between = dump.packets(f"host {IP[FRONTEND]} and host {IP[CHECKOUT]}")
    hbone = re.compile(
        rf"IP ({re.escape(IP[FRONTEND])}\.\d+ > {re.escape(IP[CHECKOUT])}\.15008"
        rf"|{re.escape(IP[CHECKOUT])}\.15008 > {re.escape(IP[FRONTEND])}\.\d+): tcp (\d+)$"
    )
    odd = [line for line in between if not hbone.search(line)]
    assert not odd, f"{len(odd)} packets between the pods that are not TCP to/from 15008: {odd[:5]}"
    carried = sum(int(m.group(2)) for line in between if (m := hbone.search(line)))
    assert carried >= 2 * size  # the transfer and its echo really crossed the fabric, on 15008
    assert marker.encode() not in dump.raw() and marker[:20].encode() not in dump.raw()
    print(f"\n10 MiB echo: {len(between)} packets between the pods, {carried} TCP payload bytes, all on 15008")
    no_errors_in_logs(env)


def test_fail_closed_while_the_tunnel_is_dead_and_traffic_resumes_after_its_restart(
    start_mesh: Callable[..., Env],
) -> None:
    env = start_mesh()
    lab, mesh = env.lab, env.mesh
    mesh.wait_enabled(ENROLLED)
    env.server(CHECKOUT)
    env.server(PAYMENTS)
    assert once(lab, FRONTEND, CHECKOUT) == {"ok": True, "peer": IP[FRONTEND]}
    node1 = (FRONTEND, PAYMENTS)
    assert all(listeners(NETNS[pod]) >= TUNNEL_PORTS for pod in node1)  # the kernel's view (ss), and node1's
    # metrics (scraped in its netns) say the same
    assert served(mesh) == {"enabled": 2, "pending": 0, "failed": 0, "tunnels": 1, "tunnel pods": 2}

    assert mesh.kill_tunnel("node1", signal.SIGKILL) == -signal.SIGKILL
    for pod in node1:  # capture stays in the kernel; only the listeners are gone
        assert capture_in_kernel(env.mode, pod) and not (TUNNEL_PORTS & listeners(NETNS[pod])), pod
    # alertable: the agent has no tunnel, and its pods are pending (captured, passing no traffic)
    wait_for("the agent to count no tunnel", lambda: served(mesh, tunnel=False)["tunnels"] == 0)
    assert served(mesh, tunnel=False) == {"enabled": 0, "pending": 2, "failed": 0, "tunnels": 0}
    marker = f"FAIL-CLOSED-{uuid.uuid4().hex}"
    dump = Tcpdump(lab, env.tmp / "fabric.pcap")
    try:
        for target in (CHECKOUT, PAYMENTS, CHECKOUT):
            t0 = time.monotonic()
            result = once(lab, FRONTEND, target, marker)
            took = time.monotonic() - t0  # includes starting the client process (~0.2 s)
            assert result["ok"] is False and result["error"] == "ConnectionRefusedError", result
            assert took < 2.0, f"refused only after {took:.2f} s"
    finally:
        dump.stop()
    assert marker.encode() not in dump.raw()
    assert dump.packets(f"host {IP[FRONTEND]}") == []  # not even a SYN left the pod

    # Restart: a client tries a new connection every 50 ms from before the new tunnel is spawned.
    poller = loop(lab, FRONTEND, CHECKOUT, 0.05, until_ok=True)
    try:
        time.sleep(0.3)
        new = mesh.start_tunnel("node1", wait=False)
        mesh.wait_tunnel_ready(new)
        ready = time.monotonic()
        attempts = poller.wait(timeout=10)
    finally:
        poller.kill()
    first_ok = next(a for a in attempts if a["ok"])
    assert first_ok["peer"] == IP[FRONTEND]
    assert all(a["error"] == "ConnectionRefusedError" for a in attempts if not a["ok"]), attempts
    since_spawn = first_ok["end"] - new.spawned
    print(
        f"\ntunnel restart: first new connection through after {since_spawn:.2f} s from the spawn "
        f"(tunnel ready after {ready - new.spawned:.2f} s); {len(attempts) - 1} attempts refused before"
    )
    # Measured from the restarted tunnel's spawn (python start, ZDS snapshot, CA certificate, HBONE).
    assert since_spawn < 2.0
    mesh.wait_enabled(ENROLLED)
    assert served(mesh) == {"enabled": 2, "pending": 0, "failed": 0, "tunnels": 1, "tunnel pods": 2}
    assert samples(mesh.metrics(mesh.agent("node1")))["nodeagent_agent_zds_connections_total"] == 2
    no_errors_in_logs(env)


def served(mesh: Mesh, *, tunnel: bool = True) -> dict[str, float]:
    """node1's pods by state and its tunnels as its agent's /metrics says, and (`tunnel`) the pods its tunnel's
    /metrics says it serves."""
    agent = samples(mesh.metrics(mesh.agent("node1")))
    got = {state: agent[f'nodeagent_agent_pods{{state="{state}"}}'] for state in ("enabled", "pending", "failed")}
    got["tunnels"] = agent["nodeagent_agent_zds_tunnels"]
    if tunnel:
        got["tunnel pods"] = samples(mesh.metrics(mesh.tunnel("node1")))["nodeagent_tunnel_pods"]
    return got


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_agent_restart_under_traffic_breaks_nothing(start_mesh: Callable[..., Env], sig: int) -> None:
    env = start_mesh()
    lab, mesh = env.lab, env.mesh
    mesh.wait_enabled(ENROLLED)
    env.server(CHECKOUT)
    env.server(PAYMENTS)
    netns = [*ENROLLED, "node1", "node2"]
    before = {ns: our_kernel_state(ns) for ns in netns}
    held = [stream(lab, FRONTEND, CHECKOUT), stream(lab, CHECKOUT, PAYMENTS)]
    loops = [loop(lab, FRONTEND, CHECKOUT, 0.05), loop(lab, CHECKOUT, PAYMENTS, 0.05)]
    try:
        time.sleep(0.5)
        old = mesh.agent("node1").pid
        mesh.restart_agent("node1", sig)  # waits for the new agent to be ready
        assert mesh.agent("node1").pid != old
        # The tunnel reconnects to the new agent and is handed every pod again (a fresh snapshot).
        mesh.wait_enabled(ENROLLED)
        time.sleep(1.0)
        results = [bg.finish() for bg in loops]
        streamed = [bg.finish()[-1] for bg in held]
    finally:
        for bg in loops + held:
            bg.kill()
    for attempts in results:
        failed = [a for a in attempts if not a["ok"]]
        assert len(attempts) > 20 and not failed, failed[:5]
    for s in streamed:
        assert s["error"] is None and s["sent"] == s["received"] > 0, s
    after = {ns: our_kernel_state(ns) for ns in netns}
    assert after == before  # nothing re-applied twice, nothing lost (in eBPF mode: the same links and pins)
    print(f"\nagent {signal.Signals(sig).name}: {sum(map(len, results))} new connections, all through; streams intact")
    no_errors_in_logs(env)


def test_with_the_agents_down_enrolled_pods_keep_going_through_the_tunnels(start_mesh: Callable[..., Env]) -> None:
    env = start_mesh()
    lab, mesh = env.lab, env.mesh
    mesh.wait_enabled(ENROLLED)
    env.server(CHECKOUT)
    env.server(PAYMENTS)
    where = [*ENROLLED, "node1", "node2"]
    before = {w: our_kernel_state(w) for w in where}
    for node in ("node1", "node2"):
        assert mesh.kill(mesh.agent(node), signal.SIGTERM) == 0
    # Capture (rules, or pinned programs and links) outlives its agent, untouched.
    assert {w: our_kernel_state(w) for w in where} == before
    assert all(captured(env.mode, pod) for pod in ENROLLED)
    marker = f"AGENT-DOWN-{uuid.uuid4().hex}"
    dump = Tcpdump(lab, env.tmp / "fabric.pcap", "tcp")
    try:
        cross = once(lab, FRONTEND, CHECKOUT, marker)  # node1 -> node2: both agents are down
        inbound = once(lab, CHECKOUT, PAYMENTS, marker)  # into a node1 pod
        same = once(lab, FRONTEND, PAYMENTS, marker)
    finally:
        dump.stop()
    assert cross == {"ok": True, "peer": IP[FRONTEND]}
    assert inbound == {"ok": True, "peer": IP[CHECKOUT]}
    assert same == {"ok": True, "peer": IP[FRONTEND]}
    between = dump.packets(f"host {IP[CHECKOUT]} and (host {IP[FRONTEND]} or host {IP[PAYMENTS]})")
    assert between and all(".15008" in line for line in between), between
    assert marker.encode() not in dump.raw()
    no_errors_in_logs(env)


def test_tunnel_hand_over_loses_no_connection(start_mesh: Callable[..., Env]) -> None:
    grace, margin = 7.0, 5.0  # the old tunnel keeps established connections for grace - 5 s
    env = start_mesh(tunnel_grace=grace)
    lab, mesh = env.lab, env.mesh
    mesh.wait_enabled(ENROLLED)
    env.server(CHECKOUT)
    env.server(PAYMENTS)
    old = mesh.tunnel("node1")
    # Established on the old tunnel: frontend's outbound (node1 :15001) and payments' inbound (node1 :15008).
    held = [stream(lab, FRONTEND, CHECKOUT), stream(lab, CHECKOUT, PAYMENTS)]
    # New connections every 20 ms through node1's outbound listener, and into its inbound HBONE listener.
    loops = [loop(lab, FRONTEND, CHECKOUT, 0.02), loop(lab, CHECKOUT, PAYMENTS, 0.02)]
    try:
        time.sleep(1.0)
        new = mesh.start_tunnel("node1", name="tunnel-node1-successor", port_offset=100)
        assert listeners(NETNS[FRONTEND]) >= TUNNEL_PORTS
        # Connections queued on the old listeners when it closes them move to the successor's, not reset.
        for pod in (FRONTEND, PAYMENTS):
            assert sh("ip", "netns", "exec", NETNS[pod], "sysctl", "-n", "net.ipv4.tcp_migrate_req").strip() == "1"
        time.sleep(0.5)
        mesh.kill(old, signal.SIGTERM, wait=False)
        sigterm = time.monotonic()
        time.sleep(3.0)
        wait_for("the old tunnel to exit", lambda: not old.alive(), timeout=grace + 5)
        exited = time.monotonic()
        time.sleep(1.0)
        results = [bg.finish() for bg in loops]
        streamed = [bg.finish()[-1] for bg in held]
    finally:
        for bg in loops + held:
            bg.kill()
    total = sum(map(len, results))
    ok = sum(a["ok"] for attempts in results for a in attempts)
    print(f"\nhand-over: {ok}/{total} new connections succeeded (every 20 ms, two streams of attempts)")
    print(f"old tunnel exited {exited - sigterm:.2f} s after SIGTERM; held streams: {streamed}")
    for attempts in results:
        failed = [a for a in attempts if not a["ok"]]
        assert len(attempts) > 100 and not failed, failed[:5]
    assert old.popen.returncode == 0
    for s in streamed:
        # Carried on until the old tunnel's drain deadline (grace - 5 s after SIGTERM), then closed.
        assert s["received"] > 0 and s["ended"] is not None, s
        assert s["ended"] - sigterm > (grace - margin) - 0.3, s
    assert new.alive() and mesh.tunnel_ready(new)
    assert once(lab, FRONTEND, CHECKOUT) == {"ok": True, "peer": IP[FRONTEND]}
    no_errors_in_logs(env)


def test_enroll_unenroll_cycles_leave_no_residue(start_mesh: Callable[..., Env]) -> None:
    env = start_mesh(inventory_poll=0.05)
    mesh = env.mesh
    pids = {pod: env.server(pod) for pod in ENROLLED}  # processes in the pod netns, for /proc/PID/net/tcp
    mesh.unenroll("shop")
    wait_for("shop released", lambda: all(released(p) for p in ENROLLED))
    procs = {f"{p.kind}-{p.node}": p for p in (mesh.tunnel("node1"), mesh.tunnel("node2"), mesh.agent("node1"))}
    procs["agent-node2"] = mesh.agent("node2")

    def settled() -> dict[str, list[str]] | None:
        first = {name: fds(p.pid) for name, p in procs.items()}
        time.sleep(0.2)
        second = {name: fds(p.pid) for name, p in procs.items()}
        held = any(netns_fds(p.pid) for p in procs.values())
        return second if first == second and not held else None

    baseline = wait_for("settled fds", settled)
    base_bpf = oracles.our_bpf_objects()  # programs, maps and links of pod capture loaded on the host
    base_rules = {ns: iptables_save(NETNS[ns]) for ns in ENROLLED}
    base_routes = {ns: ip_rules_and_routes(NETNS[ns]) for ns in ENROLLED}
    add_latency: list[float] = []
    # Both modes: eBPF mode compiles once per agent and loads a pod's programs in milliseconds.
    cycles = 30
    for cycle in range(cycles):
        mesh.enroll("shop")
        written = time.monotonic()
        pending = set(ENROLLED)
        while pending:  # time from the inventory write until the tunnel listens in each pod's netns
            for pod in list(pending):
                if proc_listening(pids[pod]) >= TUNNEL_PORTS:
                    add_latency.append(time.monotonic() - written)
                    pending.discard(pod)
            assert time.monotonic() - written < 20, f"cycle {cycle}: {pending} not captured"
            time.sleep(0.002)
        wait_for(f"capture, cycle {cycle}", lambda: all(captured(env.mode, p) for p in ENROLLED))
        mesh.unenroll("shop")
        wait_for(f"release, cycle {cycle}", lambda: all(released(p) for p in ENROLLED))
    after = wait_for("settled fds", settled)
    assert {ns: iptables_save(NETNS[ns]) for ns in ENROLLED} == base_rules
    assert {ns: ip_rules_and_routes(NETNS[ns]) for ns in ENROLLED} == base_routes
    assert all(not ours(ns) for ns in ("na-node1", "na-node2"))  # the probe bypass chains went too
    # No program, map or link of pod capture is left (freed after an RCU grace period), no pin directory.
    wait_for("BPF objects freed", lambda: oracles.our_bpf_objects() == base_bpf, timeout=10)
    assert not any(oracles.pins(oracles.pod_uid(pod)) for pod in ENROLLED)
    for name in procs:
        bpf_fds = [sum("bpf" in f for f in fd_list[name]) for fd_list in (baseline, after)]
        assert bpf_fds[1] <= bpf_fds[0], (name, after[name])
        assert abs(len(after[name]) - len(baseline[name])) <= 2, (name, baseline[name], after[name])
        sockets_before = sum(f.startswith("socket:") for f in baseline[name])
        assert sum(f.startswith("socket:") for f in after[name]) <= sockets_before + 1, (name, after[name])
    add_latency.sort()
    p50 = statistics.median(add_latency)
    p99 = add_latency[min(len(add_latency) - 1, int(0.99 * len(add_latency)))]
    print(
        f"\npod add (inventory write -> listeners in the pod netns, rules checked right after): "
        f"{len(add_latency)} adds over {cycles} cycles, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {add_latency[-1] * 1000:.0f} ms (agent inventory poll 50 ms)"
    )
    no_errors_in_logs(env)
