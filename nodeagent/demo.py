"""`nodeagent demo` (= `sudo make demo`): the whole mesh on one Linux box, in under a minute.

Why this module exists: a newcomer should see, with no cluster at all, what nodeagent does — pods enrolled
without a restart, their traffic captured inside their own netns, carried between nodes by the tunnels as
mutual TLS with each workload's own SPIFFE identity, and nothing readable on the wire. The demo runs the
real processes (the CA, one node agent and one tunnel per node, inside the lab's node namespaces) and
shows what an operator would look at: the redirects read from the kernel, the certificates, the
connections with both identities, the metrics, and tcpdump's view of the fabric. Then it cleans up, or,
with `--keep`, leaves the mesh running for the user to explore (inspect, curl, policies, enrollment) until
Ctrl-C, printing the commands to try with this lab's names.

What it deliberately does not do: nothing here is simulated or printed from memory; every table comes
from the `nodeagent inspect` commands or from the tools' own output, and a tool that saw nothing (tcpdump
captured no packet) is a failure of the demo, never a verdict about the mesh. It does not leave anything
behind: however it ends (done, failed, Ctrl-C, SIGTERM, SIGHUP, its output pipe closed), `lab down`
removes the namespaces, processes, cgroups and pins it created. It never destroys a lab it did not build:
a lab someone brought up with `nodeagent lab up` makes it refuse (run `nodeagent lab down` first); a lab
an interrupted demo left behind (its pid file in RUN says so) is removed. Two demos take turns on the
host's lab lock; the second touches nothing, not even RUN, until the first has finished.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from nodeagent.lab.cluster import (
    DEFAULT_TOPOLOGY,
    RUN_ROOT,
    STATE_DIR,
    Lab,
    LabError,
    LabState,
    exclusive,
    leftovers,
    teardown,
)
from nodeagent.labmesh import NODEAGENT, Mesh, MeshError, Proc
from nodeagent.model import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL

ENROLLED_NS = "shop"
CLIENT = "shop/frontend"  # node1
CROSS_NODE = "shop/checkout"  # node2
SAME_NODE = "shop/payments"  # node1
OUTSIDER = "legacy/batch"  # node2, not enrolled
APP_PORT = 8080
MARKER = "NODEAGENT-DEMO-SECRET"
OUTSIDER_MARKER = "LEGACY-PLAINTEXT"
RUN = RUN_ROOT / "demo"
OWNER_FILE = "demo.pid"  # in RUN while a demo's lab exists: a lab with this file is a demo's, not a user's
POLICIES = RUN / "policies.yaml"  # the tunnels' --policies: Istio YAML, reloaded when it changes
KEEP_POLL_S = 1.0  # --keep: how often the demo checks that its mesh processes still run
TCPDUMP_START_S = 15.0  # until tcpdump says "listening on" (a loaded host can take seconds)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE  # what a shell reports for a writer killed by SIGPIPE

# A tiny echo server and client run inside pods with the project's interpreter.
ECHO_SERVER = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64); print("listening", flush=True)
def serve(c, peer):
    data = c.recv(65536)
    c.sendall(b"from " + peer[0].encode() + b": " + data); c.close()
while True:
    c, peer = s.accept(); threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""
CLIENT_SCRIPT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(sys.argv[3].encode()); print(c.recv(65536).decode(), flush=True)
time.sleep(float(sys.argv[4]))
"""


class DemoError(Exception):
    """The demo cannot go on; the message says what went wrong and where to look."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: stop and clean up as Ctrl-C does (a BaseException, like KeyboardInterrupt,
    so no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class OutputClosed(Exception):
    """Nobody reads the demo's output any more (`nodeagent demo | head`, a closed terminal): clean up, quietly."""


class _Stdout:
    lost = False  # set by say() once stdout's reader has gone


def say(text: str = "") -> None:
    """Print a line; the first write to a closed pipe or hung-up terminal raises OutputClosed, later ones do nothing."""
    if _Stdout.lost:
        return
    try:
        print(text, flush=True)
    except OSError as exc:
        if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EIO:
            raise
        _Stdout.lost = True
        # Point stdout at /dev/null so nothing (cleanup, the interpreter's exit flush) hits the pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise OutputClosed(f"stdout is gone ({exc.strerror})") from None


def heading(text: str) -> None:
    say()
    say(f"=== {text}")


class Demo:
    """The demo's lab and mesh (nodeagent.labmesh.Mesh), plus what it shows with them."""

    def __init__(self, workdir: Path, capture: str = "iptables", keep: bool = False) -> None:
        self.workdir = workdir
        self.keep = keep
        self.claimed = False  # RUN is this demo's (made under the lab lock); until then it may be another's
        self.capture = capture  # the agents' --capture (iptables | ebpf | auto)
        self.lab: Lab | None = None
        self.mesh: Mesh | None = None
        self.cleaning = False  # set once cleanup has begun: stop signals no longer interrupt anything

    @property
    def L(self) -> Lab:
        assert self.lab is not None
        return self.lab

    @property
    def M(self) -> Mesh:
        assert self.mesh is not None
        return self.mesh

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """A helper process (an app, a client, tcpdump) whose log sits next to the mesh's."""
        return self.M.spawn(name, argv).popen

    def check_alive(self) -> None:
        try:
            self.M.check_alive()
        except MeshError as exc:
            raise DemoError(str(exc)) from None

    def run(self, argv: list[str], timeout: float = 30) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise DemoError(f"{' '.join(argv[-4:])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def write_topology(self) -> Path:
        """The default topology with ENROLLED_NS not yet labelled: the demo enrolls it while you watch."""
        data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
        for ns in data["namespaces"]:
            if ns["name"] == ENROLLED_NS:
                (ns.get("labels") or {}).pop(DATAPLANE_MODE_LABEL, None)
        target = self.workdir / "topology.yaml"
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        return target

    def start_mesh(self) -> None:
        POLICIES.write_text("")  # no policy: everything is allowed; with --keep, yours go here
        self.mesh = Mesh(self.L, RUN, capture=self.capture, policies=POLICIES)
        try:
            self.M.start()
        except MeshError as exc:
            raise DemoError(str(exc)) from None
        for node, waited in self.M.ready_after.items():
            say(f"tunnel on {node} ready after {waited:.1f} s (its agent's snapshot received)")

    def redirects(self, verify: bool = False) -> dict[str, Any]:
        argv = [*NODEAGENT, "inspect", "redirects", "--state-dir", str(RUN / "agent"), "-o", "json"]
        out = subprocess.run([*argv, *(["--verify"] if verify else [])], capture_output=True, text=True, check=False)
        return dict(json.loads(out.stdout))

    def show(self, title: str, argv: list[str]) -> str:
        heading(title)
        shown = argv[argv.index("nodeagent.cli") + 1 :]
        say("$ nodeagent " + " ".join(a for a in shown if not a.startswith(str(RUN)) and a != "--state-dir"))
        out = self.run(argv)
        say(out.rstrip())
        return out

    def start_tcpdump(self, pcap: Path, timeout: float = TCPDUMP_START_S) -> Proc:
        """tcpdump on the fabric bridge, returned once it says it is capturing ("listening on", on stderr)."""
        _, iface = self.L.fabric_interface()
        argv = ["tcpdump", "-i", iface, "-w", str(pcap), "-U", "--immediate-mode", "tcp"]
        dump = self.M.spawn("tcpdump", self.L.fabric_exec_argv(argv))
        t0 = time.monotonic()
        while "listening on" not in dump.log():
            if not dump.alive():
                raise DemoError(
                    f"tcpdump exited with {dump.popen.returncode} before capturing; its output: "
                    f"{dump.log().strip()[-800:] or '(none)'} (is tcpdump installed? `sudo make setup`)"
                )
            if time.monotonic() - t0 > timeout:
                raise DemoError(
                    f"tcpdump did not start capturing within {timeout:.0f} s (no 'listening on' in "
                    f"{dump.log_path}); is the host overloaded?"
                )
            time.sleep(0.05)
        return dump

    def stop_tcpdump(self, dump: Proc) -> None:
        """End the capture (SIGINT: tcpdump writes its last packets); a tcpdump that died early is a failure."""
        if not dump.alive():
            raise DemoError(
                f"tcpdump exited with {dump.popen.returncode} during the capture; its output: "
                f"{dump.log().strip()[-800:] or '(none)'}"
            )
        dump.signal(signal.SIGINT)
        dump.wait(5)

    def enrolled_ready(self) -> bool:
        rows = self.redirects()["rows"]
        shop = [r for r in rows if r["namespace"] == ENROLLED_NS]
        return bool(shop) and all(r["status"] == "enabled" and r["rules"] == "ok" for r in shop)


def _pod_exec(lab: Lab, pod: str, script: str, *args: str) -> list[str]:
    return lab.exec_argv(pod, [sys.executable, "-c", script, *args])


def redirects_heading(capture: str) -> str:
    """Step 3's heading: where `inspect redirects --verify` reads each pod's capture for this backend."""
    where = {
        "iptables": "iptables-save and ss",
        "ebpf": "the pinned eBPF programs and maps, and their cgroup attachments,",
    }.get(capture, "iptables-save and ss, or the pinned eBPF objects, whichever backend captures it,")
    return f"   the redirects, read from the kernel ({where} in each pod's netns)"


def analyse_pcap(pcap: Path, mesh_ips: set[str]) -> dict[str, Any]:
    """What tcpdump saw between pods: ports used by mesh pods' traffic, and whether markers were visible."""
    proc = subprocess.run(["tcpdump", "-r", str(pcap), "-nn", "-A", "tcp"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DemoError(f"tcpdump -r {pcap} failed: {proc.stderr.strip()}")
    return parse_tcpdump(proc.stdout, mesh_ips)


def parse_tcpdump(text: str, mesh_ips: set[str]) -> dict[str, Any]:
    """`tcpdump -nn -A` output -> packets and ports between `mesh_ips`, and whether each marker is visible."""
    ports: dict[str, int] = {}
    packets = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 4 and parts[1] == "IP" and parts[3] == ">":
            src, dst = parts[2], parts[4].rstrip(":")
            src_ip, src_port = src.rsplit(".", 1)
            dst_ip, dst_port = dst.rsplit(".", 1)
            if src_ip in mesh_ips and dst_ip in mesh_ips:
                packets += 1
                port = dst_port if int(dst_port) < int(src_port) else src_port
                ports[port] = ports.get(port, 0) + 1
    return {
        "mesh_packets": packets,
        "mesh_ports": ports,
        "marker_seen": MARKER in text,
        "outsider_marker_seen": OUTSIDER_MARKER in text,
    }


def fabric_verdict(seen: dict[str, Any]) -> str | None:
    """None when the capture proves the point (only mTLS on 15008 between enrolled pods, the non-enrolled pod's
    plaintext visible); otherwise why not. A capture that saw nothing is a failed capture, not plaintext."""
    if not seen["mesh_packets"]:
        return (
            f"tcpdump captured nothing between {CLIENT} and {CROSS_NODE}, so the capture proves nothing either way: "
            f"see {RUN}/tcpdump.log"
        )
    if set(seen["mesh_ports"]) != {"15008"} or seen["marker_seen"]:
        return "the fabric carried plaintext between enrolled pods (see the ports and the marker above)"
    if not seen["outsider_marker_seen"]:
        return (
            f"tcpdump did not see {OUTSIDER}'s plaintext either, so it missed traffic and proves nothing: "
            f"see {RUN}/tcpdump.log"
        )
    return None


@contextlib.contextmanager
def _stop_signals(demo: Demo) -> Iterator[None]:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does; once cleanup has begun, no stop signal interrupts it."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        if demo.cleaning:
            with contextlib.suppress(OSError):
                print(f"{signal.Signals(signum).name}: still removing the lab, one moment", file=sys.stderr)
            return
        demo.cleaning = True  # the first signal stops the demo; further ones must not cut its cleanup short
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _claim_lab() -> None:
    """Under the lab lock: make way for the demo's lab without destroying one the demo did not build."""
    owner = RUN / OWNER_FILE
    try:
        present = LabState.read(STATE_DIR) is not None
    except LabError:
        present = True  # an unreadable state file is still someone's lab
    stale = present or bool(leftovers())
    if stale and not owner.exists():
        raise DemoError(
            f"a lab is already up on this host (state in {STATE_DIR}, or its namespaces): the demo builds its own "
            "lab on the same names and will not remove yours. Run `sudo nodeagent lab down` (it stops everything "
            "running in the lab), then the demo again."
        )
    if stale:
        say(f"removing the lab an interrupted demo (pid {owner.read_text().strip()}) left behind")
        say(teardown().summary())
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    owner.write_text(f"{os.getpid()}\n")


@contextlib.contextmanager
def _demo_lab(demo: Demo) -> Iterator[None]:
    """The demo's own lab, from `_claim_lab` to `lab down`, whatever happens in between."""
    _claim_lab()
    demo.claimed = True
    try:
        topology = demo.write_topology()
        t0 = time.monotonic()
        demo.lab = Lab.up(topology)
        say(
            f"lab up in {time.monotonic() - t0:.2f} s: {len(demo.L.inventory.nodes)} nodes, "
            f"{len(demo.L.inventory.pods)} pods, fabric {demo.L.inventory.fabric_cidr}"
        )
        yield
    finally:
        demo.cleaning = True
        if demo.mesh is not None:
            demo.mesh.stop()
        t0 = time.monotonic()
        report = teardown()  # also after a failed Lab.up: idempotent
        (RUN / OWNER_FILE).unlink(missing_ok=True)
        for problem in report.problems:
            say(f"lab down: {problem}")
        say(f"\nlab down in {time.monotonic() - t0:.2f} s: {report.summary()}")
        left = leftovers()
        say("host clean: no lab namespace left" if not left else f"left behind: {left}; run `sudo nodeagent lab down`")


def run_demo(capture: str = "iptables", keep: bool = False) -> int:
    if os.geteuid() != 0:
        say("the demo builds network namespaces: run it as root (sudo make demo)")
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nodeagent-demo-") as tmp:
        demo = Demo(Path(tmp), capture, keep)
        try:
            with _stop_signals(demo), exclusive(), _demo_lab(demo):
                _walkthrough(demo)
        except DemoError as exc:
            _remove_run(demo, keep_logs=True)
            logs = f"\nprocess logs: {RUN}/*.log" if any(RUN.glob("*.log")) else ""
            _last_words(f"\ndemo failed: {exc}{logs}")
            return 1
        except OutputClosed:
            _remove_run(demo)
            return EXIT_OUTPUT_CLOSED
        except KeyboardInterrupt:
            _remove_run(demo)
            _last_words("\ndemo interrupted (Ctrl-C); the lab was removed")
            return 128 + signal.SIGINT
        except Stopped as exc:
            _remove_run(demo)
            _last_words(f"\ndemo stopped by {exc}; the lab was removed")
            return 128 + exc.signum
        except Exception as exc:  # a bug: the lab is gone already; say so without a traceback on the terminal
            _remove_run(demo, keep_logs=True)
            trace = RUN / "demo-traceback.txt"
            with contextlib.suppress(OSError):
                RUN.mkdir(parents=True, exist_ok=True)
                trace.write_text(traceback.format_exc())
            _last_words(
                f"\ndemo failed: {type(exc).__name__}: {exc}\n(unexpected; traceback in {trace}: please report it)"
            )
            return 1
    _remove_run(demo)
    _last_words(f"\ndemo done in {time.monotonic() - started:.1f} s")
    return EXIT_OUTPUT_CLOSED if _Stdout.lost else 0


def _remove_run(demo: Demo, *, keep_logs: bool = False) -> None:
    """The demo's working files go with its lab; after a failure only the logs stay, for the user to read
    (never the CA's private key: the CA state is removed on every path). A demo stopped while it waited
    for the lab lock removes nothing: RUN is the running demo's."""
    if not demo.claimed:
        return
    if keep_logs:
        shutil.rmtree(RUN / "ca", ignore_errors=True)
        return
    shutil.rmtree(RUN, ignore_errors=True)
    with contextlib.suppress(OSError):
        RUN_ROOT.rmdir()  # only when empty: the lab and other parts of nodeagent keep files there


def _last_words(text: str) -> None:
    with contextlib.suppress(OutputClosed):
        say(text)


def _walkthrough(demo: Demo) -> None:
    """Steps 1-9, on the demo's lab; DemoError when something is not as it should be."""
    lab = demo.L
    heading("1. the mesh: a CA, and one node agent and one tunnel per node (in each node's netns)")
    demo.start_mesh()
    demo.show(
        "2. before enrollment: no capture anywhere",
        [*NODEAGENT, "inspect", "redirects", "--state-dir", str(RUN / "agent")],
    )
    heading(f"3. enroll namespace {ENROLLED_NS}: label it {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}")
    demo.M.enroll(ENROLLED_NS)
    try:
        waited = demo.M.wait("the shop pods to be enabled", demo.enrolled_ready, timeout=20, interval=0.2)
    except MeshError as exc:
        raise DemoError(str(exc)) from None
    say(f"every {ENROLLED_NS} pod captured and acked by its tunnel {waited:.1f} s after the label")
    demo.show(
        redirects_heading(demo.capture),
        [*NODEAGENT, "inspect", "redirects", "--verify", "--state-dir", str(RUN / "agent")],
    )

    for pod in (CROSS_NODE, SAME_NODE):
        demo.start(f"server-{pod.replace('/', '-')}", _pod_exec(lab, pod, ECHO_SERVER, str(APP_PORT)))
    time.sleep(0.5)
    demo.check_alive()
    heading("4. traffic, with tcpdump on the fabric between the nodes")
    pcap = demo.workdir / "fabric.pcap"
    dump = demo.start_tcpdump(pcap)
    ip = {p: str(lab.inventory.pod(p).ip) for p in (CLIENT, CROSS_NODE, SAME_NODE, OUTSIDER)}
    for target, label in ((CROSS_NODE, "cross-node"), (SAME_NODE, "same-node")):
        out = demo.run(_pod_exec(lab, CLIENT, CLIENT_SCRIPT, ip[target], str(APP_PORT), MARKER, "0"))
        say(f"{CLIENT} -> {target} ({label}): the server answered {out.strip()!r}")
    out = demo.run(_pod_exec(lab, OUTSIDER, CLIENT_SCRIPT, ip[SAME_NODE], str(APP_PORT), OUTSIDER_MARKER, "0"))
    say(f"{OUTSIDER} (not enrolled, on {lab.inventory.pod(OUTSIDER).node}) -> {SAME_NODE}: {out.strip()!r}")
    holder = demo.start(
        "client-held", _pod_exec(lab, CLIENT, CLIENT_SCRIPT, ip[CROSS_NODE], str(APP_PORT), MARKER, "30")
    )
    time.sleep(1.0)
    demo.stop_tcpdump(dump)
    seen = analyse_pcap(pcap, {ip[CLIENT], ip[CROSS_NODE]})
    heading("5. what the fabric carried between the enrolled pods (tcpdump -r)")
    say(f"packets between {CLIENT} and {CROSS_NODE}: {seen['mesh_packets']}, by port: {seen['mesh_ports']}")
    say(f"payload marker {MARKER!r} readable on the wire: {seen['marker_seen']}")
    say(
        f"non-mesh pod's marker {OUTSIDER_MARKER!r} readable on the wire: {seen['outsider_marker_seen']} "
        "(legacy is not enrolled: its bytes travel as they are)"
    )
    problem = fabric_verdict(seen)
    say("=> only mTLS to port 15008 between enrolled pods" if problem is None else f"=> {problem}")

    node1, node2 = lab.inventory.pod(CLIENT).node, lab.inventory.pod(CROSS_NODE).node
    demo.show(
        f"6. certificates held by the tunnel on {node1}",
        lab.node_exec_argv(node1, [*NODEAGENT, "inspect", "certificates"]),
    )
    demo.show(
        f"7. open connections on {node2}, with both identities",
        lab.node_exec_argv(node2, [*NODEAGENT, "inspect", "connections", "--wide"]),
    )
    heading(f"8. metrics on {node2} (:15020/metrics, reporter=destination)")
    _, metrics = demo.M.node_get(node2, "http://127.0.0.1:15020/metrics")
    for line in metrics.splitlines():
        if line.startswith("istio_tcp_connections_opened_total") and 'reporter="destination"' in line:
            say(line)
    heading("9. access log lines (one per connection)")
    for node in (node1, node2):
        for line in (RUN / f"tunnel-{node}.log").read_text(errors="replace").splitlines():
            if "src.identity" in line:
                say(f"{node}: {line[line.find('src.addr') :][:400]}")
    holder.kill()
    if problem is not None:
        raise DemoError(problem)
    if demo.keep:
        _stay_up(demo)


def explore_hints(lab: Lab) -> list[str]:
    """What to try on the running mesh (`--keep`), with this lab's names and addresses."""
    client, server = lab.inventory.pod(CLIENT), lab.inventory.pod(CROSS_NODE)
    return [
        f"sudo nodeagent lab exec {CLIENT} -- curl -s --http0.9 {server.ip}:{APP_PORT}"
        f"    # through both tunnels; the app answers with the source IP it saw",
        *(
            f"sudo nodeagent lab exec {CLIENT} -- curl -s --http0.9 {svc.vip}:{port.port}"
            f"    # service {svc.namespace}/{svc.name}'s VIP: the tunnel picks a ready endpoint"
            for svc in lab.inventory.services[:1]
            if svc.vip is not None
            for port in svc.ports[:1]
        ),
        f"sudo nodeagent lab exec --node {server.node} -- nodeagent inspect connections --wide",
        f"sudo nodeagent lab exec --node {client.node} -- nodeagent inspect services",
        f"sudo nodeagent lab exec --node {client.node} -- nodeagent inspect certificates",
        f"sudo nodeagent lab exec --node {server.node} -- curl -s localhost:15020/metrics | grep istio_tcp",
        f"sudo nodeagent lab exec --node {client.node} -- curl -s localhost:15000/config_dump",
        f"sudo nodeagent inspect redirects --verify --state-dir {RUN / 'agent'}",
        "sudo nodeagent lab exec --fabric -- tcpdump -ni br0 port 15008",
        f"policies: write Istio AuthorizationPolicy / PeerAuthentication YAML to {POLICIES} (the tunnels reload it)",
        f"enrollment: edit the namespaces' labels in {lab.inventory_path} (the agents watch it)",
        f"process logs: {RUN}/*.log",
    ]


def _stay_up(demo: Demo) -> None:
    """--keep: leave the mesh running for the user to explore until a stop signal, which is the normal end
    here (the lab is removed and the demo exits 0); a mesh process dying ends the demo as a failure."""
    heading("10. the mesh stays up (--keep): try it from another terminal; Ctrl-C here removes it all")
    for hint in explore_hints(demo.L):
        say(hint)
    try:
        while True:
            demo.check_alive()
            time.sleep(KEEP_POLL_S)
    except (KeyboardInterrupt, Stopped) as exc:
        name = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else str(exc)
        say(f"\n{name}: removing the mesh and the lab")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="the whole mesh on this host in under a minute (root)",
        description="Builds the lab and runs the real mesh on it (the CA, and a node agent and a tunnel per node), "
        "then shows what an operator would look at: the redirects read from the kernel, the certificates, the "
        "connections with both identities, the metrics, and tcpdump's view of the fabric. Then it removes "
        "everything it made, or with --keep leaves the mesh running to explore until Ctrl-C. Needs root; it "
        "refuses to run over a lab brought up with `nodeagent lab up`.",
    )
    demo.add_argument(
        "--capture", choices=("iptables", "ebpf", "auto"), default="iptables", help="the agents' capture backend"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="after the walkthrough, keep the lab and the mesh running (to inspect, curl, add policies) until Ctrl-C",
    )
    demo.set_defaults(func=lambda args: run_demo(args.capture, args.keep))
