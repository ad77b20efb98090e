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
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, exclusive, teardown
from nodeagent.labmesh import NODEAGENT, Mesh, MeshError
from nodeagent.model import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL

ENROLLED_NS = "shop"
CLIENT = "shop/frontend"  # node1
CROSS_NODE = "shop/checkout"  # node2
SAME_NODE = "shop/payments"  # node1
OUTSIDER = "legacy/batch"  # node2, not enrolled
APP_PORT = 8080
MARKER = "NODEAGENT-DEMO-SECRET"
OUTSIDER_MARKER = "LEGACY-PLAINTEXT"
RUN = Path("/run/nodeagent/demo")

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


class Demo:
    """The demo's lab and mesh (nodeagent.labmesh.Mesh), plus what it shows with them."""

    def __init__(self, workdir: Path, capture: str = "iptables") -> None:
        self.workdir = workdir
        self.capture = capture  # the agents' --capture (iptables | ebpf | auto)
        self.lab: Lab | None = None
        self.mesh: Mesh | None = None

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
        self.mesh = Mesh(self.L, RUN, capture=self.capture)
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
    topology = demo.write_topology()
    t0 = time.monotonic()
    demo.lab = Lab.up(topology)
    say(
        f"lab up in {time.monotonic() - t0:.2f} s: {len(demo.L.inventory.nodes)} nodes, "
        f"{len(demo.L.inventory.pods)} pods, fabric {demo.L.inventory.fabric_cidr}"
    )
    try:
        yield
    finally:
        if demo.mesh is not None:
            demo.mesh.stop()
        t0 = time.monotonic()
        report = teardown()
        say(f"\nlab down in {time.monotonic() - t0:.2f} s ({report})")
        leftovers = [
            n
            for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split()
            if n.startswith("na-")
        ]
        say("host clean: no lab namespace left" if not leftovers else f"left behind: {leftovers}")


def run_demo(capture: str = "iptables") -> int:
    if os.geteuid() != 0:
        say("the demo builds network namespaces: run it as root (sudo make demo)")
        return 2
    started = time.monotonic()
    shutil.rmtree(RUN, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="nodeagent-demo-") as tmp:
        demo = Demo(Path(tmp), capture)
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
                demo.M.enroll(ENROLLED_NS)
                try:
                    waited = demo.M.wait("the shop pods to be enabled", demo.enrolled_ready, timeout=20, interval=0.2)
                except MeshError as exc:
                    raise DemoError(str(exc)) from None
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
    demo.add_argument(
        "--capture", choices=("iptables", "ebpf", "auto"), default="iptables", help="the agents' capture backend"
    )
    demo.set_defaults(func=lambda args: run_demo(args.capture))
