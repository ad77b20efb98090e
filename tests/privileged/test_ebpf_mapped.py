"""An app's IPv6 socket reaching an IPv4 peer as ::ffff:a.b.c.d goes through the mesh in eBPF mode, end to end.

Why this file exists: Java's and .NET's dual-mode sockets reach every IPv4 peer that way. The kernel runs
cgroup/connect6 for such a connect and never connect4, and puts IPv4 on the wire, so before connect6.c the
connection left an enrolled pod in plaintext, without identity or policy, while the pod's status said
enabled (the iptables mode never had the hole: netfilter sees the IPv4 packets). Here the real CA, agents
and tunnels (nodeagent.labmesh.Mesh) run with --capture ebpf, an echo server runs in shop/checkout (node2)
and a client in shop/frontend (node1) connects with an AF_INET6 socket.

Oracles, none of them the code under test: tcpdump on the fabric bridge (between the two pods only
15008, and the client's marker never in the clear), what the client and the server saw, and after those
the destination tunnel's access log (the client's SPIFFE identity arrived with the connection).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import oracles
import pytest
from waiting import wait_for

from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, teardown
from nodeagent.labmesh import Mesh

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(150)]

FRONTEND, CHECKOUT = "shop/frontend", "shop/checkout"
IP = {FRONTEND: "10.10.1.10", CHECKOUT: "10.10.2.10"}
APP_PORT = 8080

# An echo server that first tells the client the peer address it accepted the connection from.
SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    with c:
        c.sendall(b"peer " + peer[0].encode() + b"\n")
        while data := c.recv(65536):
            c.sendall(data)
"""

# A client with an IPv6 socket (as a dual-mode runtime makes it) to an IPv4-mapped address; prints JSON.
CLIENT6 = r"""
import json, socket, sys
host, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET6)
s.settimeout(10)
try:
    s.connect((host, port))
    f = s.makefile("rb")
    peer = f.readline().decode().strip()
    s.sendall(msg)
    echo = f.read(len(msg))
    print(json.dumps({"ok": echo == msg, "peer": peer, "local": s.getsockname()[0]}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
"""


class Tcpdump:
    """tcpdump on the lab's fabric bridge, writing full packets to a pcap file."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.path = path
        netns, iface = lab.fabric_interface()
        argv = ["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-nn", "-U", "--immediate-mode", "-s", "0",
                "-Z", "root", "-w", str(path), "tcp"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "listening on" in line, line

    def stop(self) -> None:
        time.sleep(0.3)  # let the last packets reach the file
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=20)

    def packets(self, bpf: str) -> list[str]:
        return oracles.sh("tcpdump", "-r", str(self.path), "-nn", "-q", *bpf.split(), timeout=120).splitlines()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    if Path("/run/nodeagent/lab/state.json").exists():
        pytest.fail("a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests")
    run_dir = Path(tempfile.mkdtemp(prefix="na-mapped-"))  # short: ZDS socket paths must fit 108 bytes
    lab = Lab.up(DEFAULT_TOPOLOGY)
    started = Mesh(lab, run_dir, capture="ebpf")
    try:
        yield started.start()
    finally:
        started.stop()
        teardown()
        for log in run_dir.glob("*.log"):  # kept with the test's tmp_path for a post-mortem
            shutil.copy(log, tmp_path / log.name)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_an_ipv6_socket_to_an_ipv4_mapped_peer_goes_through_both_tunnels(mesh: Mesh, tmp_path: Path) -> None:
    lab = mesh.lab
    mesh.wait_enabled([FRONTEND, CHECKOUT])
    server = mesh.spawn("server-checkout", lab.exec_argv(CHECKOUT, [sys.executable, "-c", SERVER, str(APP_PORT)]))
    wait_for("the server in shop/checkout", lambda: "listening" in server.log())

    marker = f"MAPPED-PLAIN-{uuid.uuid4().hex}"
    dump = Tcpdump(lab, tmp_path / "fabric.pcap")
    try:
        argv = lab.exec_argv(FRONTEND, [sys.executable, "-c", CLIENT6, f"::ffff:{IP[CHECKOUT]}", str(APP_PORT), marker])
        seen = json.loads(oracles.sh(*argv, timeout=60).splitlines()[-1])
    finally:
        dump.stop()
    # It works as an AF_INET connection does: the server sees the client pod's own IP (the tunnel spoofs it).
    assert seen == {"ok": True, "peer": f"peer {IP[FRONTEND]}", "local": f"::ffff:{IP[FRONTEND]}"}, seen
    # ... and it went through the tunnels: between the two pods the fabric carried 15008 only, never the marker.
    between = dump.packets(f"host {IP[FRONTEND]} and host {IP[CHECKOUT]}")
    assert between and all(".15008" in line for line in between), between
    assert marker.encode() not in dump.path.read_bytes()
    # The destination tunnel's own view agrees: the connection carried frontend's identity (mutual TLS).
    log = mesh.tunnel("node2").log()
    assert 'src.identity="spiffe://cluster.local/ns/shop/sa/frontend"' in log, log[-3000:]
