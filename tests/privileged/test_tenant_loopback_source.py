"""A tenant app binds 127.0.0.1 and connects to a same-node pod, in the lab under eBPF capture.

cgroup/connect4 rewrites the destination to the tunnel's :15001 before the route is chosen, so a socket
bound to 127.0.0.1 reaches the tunnel from 127.0.0.1 (under iptables capture the same connect() fails
with EINVAL). The same-node path connects to the destination app from the client's address: before
nodeagent.ztunnel.routing.source_address the payments app saw a localhost peer. Oracle: the address the
app's accept() returned, which it sends back as its greeting.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import oracles
import pytest
from waiting import wait_for

from nodeagent.lab.cluster import Lab
from nodeagent.labmesh import Mesh

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(180)]

FRONTEND, PAYMENTS = "shop/frontend", "shop/payments"
FRONTEND_IP, PAYMENTS_IP = "10.10.1.10", "10.10.1.11"

CLIENT = r"""
import socket, sys
s = socket.socket()
s.settimeout(10)
s.bind((sys.argv[1], 0))
s.connect((sys.argv[2], 8080))
print(s.makefile("rb").readline().decode().strip())
"""


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    def make(lab: Lab, run_dir: Path) -> Mesh:
        return Mesh(lab, run_dir, capture="ebpf")

    with oracles.lab_mesh(tmp_path, make, "na-lo-") as started:
        yield started


def test_the_destination_app_sees_the_client_pods_ip_not_localhost(mesh: Mesh) -> None:
    lab = mesh.lab
    mesh.wait_enabled([FRONTEND, PAYMENTS])
    server = mesh.spawn("server", lab.exec_argv(PAYMENTS, [sys.executable, "-c", oracles.PEER_ECHO_SERVER, "8080"]))
    wait_for("the server in payments", lambda: "listening" in server.log())
    for bound in ("127.0.0.1", "127.0.0.5", FRONTEND_IP):
        argv = lab.exec_argv(FRONTEND, [sys.executable, "-c", CLIENT, bound, PAYMENTS_IP])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == f"peer {FRONTEND_IP}", (bound, out.stdout)
