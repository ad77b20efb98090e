"""`nodeagent demo` (= `sudo make demo`): the whole mesh on one Linux box, in under a minute.

Why this module exists: a newcomer should see, with no cluster at all, what nodeagent does — pods enrolled
without a restart, their traffic captured inside their own netns, carried between nodes by the tunnels as
mutual TLS with each workload's own SPIFFE identity, and nothing readable on the wire. The demo runs the
real processes (the CA, one node agent and one tunnel per node, inside the lab's node namespaces) and
shows what an operator would look at: the redirects read from the kernel, the certificates, the
connections with both identities, the metrics, and tcpdump's view of the fabric. Then it cleans up.

What it deliberately does not do: nothing here is simulated or printed from memory; every table comes
from the `nodeagent inspect` commands or from the tools' own output. It does not leave anything behind:
`lab down` removes the namespaces, processes, cgroups and pins it created.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, exclusive, teardown
from nodeagent.model import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL
from nodeagent.netns import in_netns

ENROLLED_NS = "shop"
CLIENT = "shop/frontend"  # node1
CROSS_NODE = "shop/checkout"  # node2
SAME_NODE = "shop/payments"  # node1
OUTSIDER = "legacy/batch"  # node2, not enrolled
APP_PORT = 8080
MARKER = "NODEAGENT-DEMO-SECRET"
OUTSIDER_MARKER = "LEGACY-PLAINTEXT"
CA_PORT = 15012
RUN = Path("/run/nodeagent/demo")
NODEAGENT = [sys.executable, "-m", "nodeagent.cli"]

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
    pass


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"=== {text}")


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0, interval: float = 0.2) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.lab: Lab | None = None

    # -- processes -------------------------------------------------------------------------------------------

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(RUN / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process's life
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append((name, proc))
        return proc

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 20.0) -> float:
        """wait_until `check`, failing at once (with the log) if one of the demo's processes died."""

        def alive_and_done() -> bool:
            self.check_alive()
            return check()

        return wait_until(what, alive_and_done, timeout)

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None and not name.startswith("client"):
                tail = (RUN / f"{name}.log").read_text(errors="replace")[-1500:]
                raise DemoError(f"{name} exited with {proc.returncode}; its log ends:\n{tail}")

    def run(self, argv: list[str], timeout: float = 30) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise DemoError(f"{' '.join(argv[-4:])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- the lab and the mesh --------------------------------------------------------------------------------

    @property
    def L(self) -> Lab:
        assert self.lab is not None
        return self.lab

    def write_inventory(self, enrolled: bool) -> None:
        data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
        for ns in data["namespaces"]:
            if ns["name"] == ENROLLED_NS:
                labels = ns.setdefault("labels", {})
                if enrolled:
                    labels[DATAPLANE_MODE_LABEL] = DATAPLANE_MODE_AMBIENT
                else:
                    labels.pop(DATAPLANE_MODE_LABEL, None)
        target = self.L.inventory_path if self.lab else self.workdir / "topology.yaml"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, target)

    def node_get(self, node: str, url: str) -> tuple[int, str]:
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError as exc:
                return 0, str(exc)

        return in_netns(self.L.node_netns(node), get)

    def ready(self, node: str) -> bool:
        return self.node_get(node, "http://127.0.0.1:15021/healthz/ready")[0] == 200

    def start_mesh(self) -> None:
        inv = self.L.inventory
        ca_node = inv.nodes[0]
        ca_addr = f"{ca_node.address}:{CA_PORT}"
        state = RUN / "ca"
        self.run([*NODEAGENT, "ca", "init", "--state-dir", str(state), "--trust-domain", inv.trust_domain])
        self.start(
            "ca",
            self.L.node_exec_argv(
                ca_node.name,
                [
                    *NODEAGENT,
                    "ca",
                    "serve",
                    "--state-dir",
                    str(state),
                    "--inventory",
                    str(self.L.inventory_path),
                    "--listen",
                    ca_addr,
                ],
            ),
        )
        bundle = state / "trust-bundle.pem"
        tokens = {c.node: c.token for c in inv.node_credentials}
        for node in inv.nodes:
            sock = RUN / node.name / "ztunnel.sock"
            sock.parent.mkdir(parents=True, exist_ok=True)
            token_file = RUN / node.name / "ca-token"
            token_file.write_text(tokens[node.name])
            token_file.chmod(0o600)
            self.start(
                f"tunnel-{node.name}",
                self.L.node_exec_argv(
                    node.name,
                    [
                        *NODEAGENT,
                        "tunnel",
                        "--node",
                        node.name,
                        "--inventory",
                        str(self.L.inventory_path),
                        "--zds-socket",
                        str(sock),
                        "--ca",
                        ca_addr,
                        "--ca-token-file",
                        str(token_file),
                        "--trust-bundle",
                        str(bundle),
                        "--spoof",
                    ],
                ),
            )
            self.start(
                f"agent-{node.name}",
                self.L.node_exec_argv(
                    node.name,
                    [
                        *NODEAGENT,
                        "agent",
                        "--node",
                        node.name,
                        "--inventory",
                        str(self.L.inventory_path),
                        "--zds-socket",
                        str(sock),
                        "--state-dir",
                        str(RUN / "agent"),
                        "--verify-interval",
                        "2",
                    ],
                ),
            )
        for node in inv.nodes:
            waited = self.wait(f"the tunnel on {node.name} to be ready", functools.partial(self.ready, node.name))
            say(f"tunnel on {node.name} ready after {waited:.1f} s (its agent's snapshot received)")

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

    def enrolled_ready(self) -> bool:
        rows = self.redirects()["rows"]
        shop = [r for r in rows if r["namespace"] == ENROLLED_NS]
        return bool(shop) and all(r["status"] == "enabled" and r["rules"] == "ok" for r in shop)


def _pod_exec(lab: Lab, pod: str, script: str, *args: str) -> list[str]:
    return lab.exec_argv(pod, [sys.executable, "-c", script, *args])


def analyse_pcap(pcap: Path, mesh_ips: set[str]) -> dict[str, Any]:
    """What tcpdump saw between pods: ports used by mesh pods' traffic, and whether markers were visible."""
    text = subprocess.run(
        ["tcpdump", "-r", str(pcap), "-nn", "-A", "tcp"], capture_output=True, text=True, check=False
    ).stdout
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


@contextlib.contextmanager
def _demo_lab(demo: Demo) -> Iterator[None]:
    teardown()  # a lab left over from an interrupted run
    RUN.mkdir(parents=True, exist_ok=True)
    demo.write_inventory(enrolled=False)
    t0 = time.monotonic()
    demo.lab = Lab.up(demo.workdir / "topology.yaml")
    say(
        f"lab up in {time.monotonic() - t0:.2f} s: {len(demo.L.inventory.nodes)} nodes, "
        f"{len(demo.L.inventory.pods)} pods, fabric {demo.L.inventory.fabric_cidr}"
    )
    try:
        yield
    finally:
        demo.stop_all()
        t0 = time.monotonic()
        report = teardown()
        say(f"\nlab down in {time.monotonic() - t0:.2f} s ({report})")
        leftovers = [
            n
            for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split()
            if n.startswith("na-")
        ]
        say("host clean: no lab namespace left" if not leftovers else f"left behind: {leftovers}")


def run_demo() -> int:
    if os.geteuid() != 0:
        say("the demo builds network namespaces: run it as root (sudo make demo)")
        return 2
    started = time.monotonic()
    shutil.rmtree(RUN, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="nodeagent-demo-") as tmp:
        demo = Demo(Path(tmp))
        try:
            with exclusive(), _demo_lab(demo):
                lab = demo.L
                heading("1. the mesh: a CA, and one node agent and one tunnel per node (in each node's netns)")
                demo.start_mesh()
                demo.show(
                    "2. before enrollment: no capture anywhere",
                    [*NODEAGENT, "inspect", "redirects", "--state-dir", str(RUN / "agent")],
                )
                heading(f"3. enroll namespace {ENROLLED_NS}: label it {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}")
                demo.write_inventory(enrolled=True)
                waited = demo.wait("the shop pods to be enabled", demo.enrolled_ready)
                say(f"every {ENROLLED_NS} pod captured and acked by its tunnel {waited:.1f} s after the label")
                demo.show(
                    "   the redirects, read from the kernel (iptables-save and ss in each pod's netns)",
                    [*NODEAGENT, "inspect", "redirects", "--verify", "--state-dir", str(RUN / "agent")],
                )

                for pod in (CROSS_NODE, SAME_NODE):
                    demo.start(f"server-{pod.replace('/', '-')}", _pod_exec(lab, pod, ECHO_SERVER, str(APP_PORT)))
                time.sleep(0.5)
                demo.check_alive()
                heading("4. traffic, with tcpdump on the fabric between the nodes")
                pcap = demo.workdir / "fabric.pcap"
                _, iface = lab.fabric_interface()
                dump = demo.start(
                    "tcpdump",
                    lab.fabric_exec_argv(["tcpdump", "-i", iface, "-w", str(pcap), "-U", "--immediate-mode", "tcp"]),
                )
                time.sleep(1.0)
                ip = {p: str(lab.inventory.pod(p).ip) for p in (CLIENT, CROSS_NODE, SAME_NODE, OUTSIDER)}
                for target, label in ((CROSS_NODE, "cross-node"), (SAME_NODE, "same-node")):
                    out = demo.run(_pod_exec(lab, CLIENT, CLIENT_SCRIPT, ip[target], str(APP_PORT), MARKER, "0"))
                    say(f"{CLIENT} -> {target} ({label}): the server answered {out.strip()!r}")
                out = demo.run(
                    _pod_exec(lab, OUTSIDER, CLIENT_SCRIPT, ip[SAME_NODE], str(APP_PORT), OUTSIDER_MARKER, "0")
                )
                say(f"{OUTSIDER} (not enrolled, on {lab.inventory.pod(OUTSIDER).node}) -> {SAME_NODE}: {out.strip()!r}")
                holder = demo.start(
                    "client-held", _pod_exec(lab, CLIENT, CLIENT_SCRIPT, ip[CROSS_NODE], str(APP_PORT), MARKER, "30")
                )
                time.sleep(1.0)
                dump.send_signal(signal.SIGINT)
                dump.wait(5)
                seen = analyse_pcap(pcap, {ip[CLIENT], ip[CROSS_NODE]})
                heading("5. what the fabric carried between the enrolled pods (tcpdump -r)")
                say(f"packets between {CLIENT} and {CROSS_NODE}: {seen['mesh_packets']}, by port: {seen['mesh_ports']}")
                say(f"payload marker {MARKER!r} readable on the wire: {seen['marker_seen']}")
                say(
                    f"non-mesh pod's marker {OUTSIDER_MARKER!r} readable on the wire: {seen['outsider_marker_seen']} "
                    "(legacy is not enrolled: its bytes travel as they are)"
                )
                only_tls = set(seen["mesh_ports"]) == {"15008"} and not seen["marker_seen"]
                say("=> only mTLS to port 15008 between enrolled pods" if only_tls else "=> PLAINTEXT SEEN: see above")

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
                _, metrics = demo.node_get(node2, "http://127.0.0.1:15020/metrics")
                for line in metrics.splitlines():
                    if line.startswith("istio_tcp_connections_opened_total") and 'reporter="destination"' in line:
                        say(line)
                heading("9. access log lines (one per connection)")
                for node in (node1, node2):
                    for line in (RUN / f"tunnel-{node}.log").read_text(errors="replace").splitlines():
                        if "src.identity" in line:
                            say(f"{node}: {line[line.find('src.addr') :][:400]}")
                holder.kill()
                if not only_tls:
                    raise DemoError("the fabric carried plaintext between enrolled pods")
        except DemoError as exc:
            say(f"\ndemo failed: {exc}\nprocess logs: {RUN}/*.log")
            return 1
    shutil.rmtree(RUN, ignore_errors=True)
    say(f"\ndemo done in {time.monotonic() - started:.1f} s")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser("demo", help="the whole mesh on this host in under a minute (root)")
    demo.set_defaults(func=lambda _args: run_demo())
