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
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import oracles
import pytest
from waiting import wait_for

from nodeagent.labmesh import Mesh

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(150)]

FRONTEND, CHECKOUT = "shop/frontend", "shop/checkout"
IP = {FRONTEND: "10.10.1.10", CHECKOUT: "10.10.2.10"}
APP_PORT = 8080

SERVER = oracles.PEER_ECHO_SERVER

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


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with oracles.lab_mesh(tmp_path, lambda lab, run_dir: Mesh(lab, run_dir, capture="ebpf"), "na-mapped-") as started:
        yield started


def test_an_ipv6_socket_to_an_ipv4_mapped_peer_goes_through_both_tunnels(mesh: Mesh, tmp_path: Path) -> None:
    lab = mesh.lab
    mesh.wait_enabled([FRONTEND, CHECKOUT])
    server = mesh.spawn("server-checkout", lab.exec_argv(CHECKOUT, [sys.executable, "-c", SERVER, str(APP_PORT)]))
    wait_for("the server in shop/checkout", lambda: "listening" in server.log())

    marker = f"MAPPED-PLAIN-{uuid.uuid4().hex}"
    dump = oracles.FabricCapture(lab, tmp_path / "fabric.pcap")
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
