"""Same-node fast path in the lab: two enrolled pods on node1, the real mesh, both capture modes.

What this proves, for shop/frontend -> shop/payments (both on node1, served by node1's tunnel):
- 32 MiB echoed back intact with a half-close, and the server saw the client pod's own IP;
- the bytes did not pass through user space: strace on node1's tunnel process counts the bytes its
  read-family system calls returned (how Python and libuv read sockets) and the bytes it spliced. The
  same oracle is shown to see a cross-node transfer through the same tunnel (HBONE: the tunnel reads
  every byte), so it would fail if the same-node bytes went through Python;
- while open, /config_dump lists the connection (outbound and inbound, both identities, not via :15008)
  and /metrics reports it from both ends with both principals and connection_security_policy=mutual_tls;
- a DENY policy added while it is open closes it within a second, and a new connection is then denied,
  reported with response_flags=DENY by both reporters.

The mesh's tunnels read a policy file the test rewrites (Mesh's `policies`). Apps are small scripts here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oracles
import pytest
from waiting import wait_for

from nodeagent.lab.cluster import Lab
from nodeagent.labmesh import Mesh

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(180)]

FRONTEND, PAYMENTS, CHECKOUT = "shop/frontend", "shop/payments", "shop/checkout"
IP = {FRONTEND: "10.10.1.10", PAYMENTS: "10.10.1.11", CHECKOUT: "10.10.2.10"}
APP_PORT = 8080
MiB = 1 << 20
SAME_NODE_BYTES = 32 * MiB
CROSS_NODE_BYTES = 8 * MiB
CLIENT_ID, SERVER_ID = "spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/shop/sa/payments"

SERVER = oracles.PEER_ECHO_SERVER

# bulk: send SIZE bytes then half-close, read the echo to EOF, compare digests. hold: one connection,
# 4 KiB echoed every 10 ms until stdin closes or the connection fails (then when, monotonic clock).
# once: connect and exchange 5 bytes.
CLIENT = r"""
import hashlib, json, os, socket, sys, threading, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def connect():
    c = socket.create_connection((host, port), timeout=10)
    f = c.makefile("rb")
    line = f.readline()
    if not line.startswith(b"peer "):
        raise ConnectionError(f"no greeting: {line!r}")
    return c, f, line[5:].strip().decode()
if mode == "bulk":
    size = int(sys.argv[4])
    payload = os.urandom(size)
    c, f, peer = connect()
    c.settimeout(60)
    def send():
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    h, n = hashlib.sha256(), 0
    while chunk := f.read1(1 << 20):
        h.update(chunk)
        n += len(chunk)
    t.join()
    print(json.dumps({"peer": peer, "received": n, "same": h.digest() == hashlib.sha256(payload).digest()}))
elif mode == "hold":
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    c, f, peer = connect()
    print(json.dumps({"connected": True, "peer": peer}), flush=True)
    error, ended = None, None
    try:
        while not stop.is_set():
            chunk = os.urandom(4096)
            c.sendall(chunk)
            if f.read(4096) != chunk:
                raise ConnectionError("echo differs or ended")
            stop.wait(0.01)
    except OSError as exc:
        error, ended = f"{type(exc).__name__}: {exc}", time.monotonic()
    print(json.dumps({"error": error, "ended": ended}), flush=True)
else:
    try:
        c, f, peer = connect()
        c.sendall(b"hello")
        print(json.dumps({"ok": f.read(5) == b"hello", "peer": peer}))
    except OSError as exc:
        print(json.dumps({"ok": False, "error": type(exc).__name__}))
"""


class SyscallBytes:
    """strace on a running process (every thread): the bytes its read-family system calls returned (how
    Python's socket and os modules and libuv read a socket into memory) and the bytes it moved with
    splice(2), which never reach its memory. ptrace sees each call as the kernel runs it."""

    CALLS = ("read", "readv", "recvfrom", "recvmsg", "splice")
    LINE = re.compile(r"^(?:\d+\s+)?(?:(\w+)\(|<\.\.\. (\w+) resumed>).*\)\s+=\s+(-?\d+)")

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        argv = ["strace", "-f", "-s", "0", "-e", f"trace={','.join(self.CALLS)}", "-e", "signal=none"]
        self.proc = subprocess.Popen([*argv, "-o", str(out), "-p", str(pid)], stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        first = self.proc.stderr.readline()
        assert "attached" in first, f"strace could not attach to pid {pid}: {first}"  # tracing from here on
        time.sleep(0.5)  # every thread attached (one line each)

    def stop(self) -> tuple[int, int]:
        """(bytes read into user space, bytes spliced) since the start."""
        self.proc.send_signal(signal.SIGINT)  # strace detaches and exits
        self.proc.wait(timeout=30)
        read = spliced = 0
        for line in self.out.read_text().splitlines():
            m = self.LINE.match(line)
            if m and int(m.group(3)) > 0:
                if (m.group(1) or m.group(2)) == "splice":
                    spliced += int(m.group(3))
                else:
                    read += int(m.group(3))
        return read, spliced


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sh(*argv: str, timeout: float = 60) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    assert proc.returncode == 0, f"{argv[-6:]} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


def client(lab: Lab, pod: str, *args: str, timeout: float = 90) -> dict[str, Any]:
    out = sh(*lab.exec_argv(pod, [sys.executable, "-c", CLIENT, *args]), timeout=timeout)
    return dict(json.loads(out.splitlines()[-1]))


def istio_samples(metrics: str, name: str, **labels: str) -> list[float]:
    """Values of `name` whose labels include all of `labels` (Prometheus text format)."""
    out = []
    for line in metrics.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            out.append(float(m.group(2)))
    return out


@pytest.fixture(params=["iptables", "ebpf"])
def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mesh]:
    def make(lab: Lab, run_dir: Path) -> Mesh:
        policies = run_dir / "policies.yaml"
        policies.write_text("")
        return Mesh(lab, run_dir, capture=str(request.param), policies=policies)

    with oracles.lab_mesh(tmp_path, make, "na-fp-") as started:
        yield started


def test_same_node_fast_path(mesh: Mesh) -> None:
    lab = mesh.lab
    mesh.wait_enabled([FRONTEND, PAYMENTS, CHECKOUT])
    for pod in (PAYMENTS, CHECKOUT):
        server = mesh.spawn(f"server-{pod.split('/')[1]}", lab.exec_argv(pod, [sys.executable, "-c", SERVER, "8080"]))
        wait_for(f"the server in {pod}", lambda server=server: "listening" in server.log())
    tunnel = mesh.tunnel("node1")
    # Control: cross-node goes through node1's tunnel as HBONE, which reads every byte: the oracle sees it.
    trace = SyscallBytes(tunnel.pid, mesh.run_dir / "strace-cross.txt")
    cross = client(lab, FRONTEND, "bulk", IP[CHECKOUT], str(APP_PORT), str(CROSS_NODE_BYTES))
    cross_read, _ = trace.stop()
    trace = SyscallBytes(tunnel.pid, mesh.run_dir / "strace-same.txt")
    same = client(lab, FRONTEND, "bulk", IP[PAYMENTS], str(APP_PORT), str(SAME_NODE_BYTES))
    same_read, same_spliced = trace.stop()
    assert cross == {"peer": IP[FRONTEND], "received": CROSS_NODE_BYTES, "same": True}
    assert same == {"peer": IP[FRONTEND], "received": SAME_NODE_BYTES, "same": True}
    assert cross_read >= CROSS_NODE_BYTES, f"the oracle missed a transfer through user space: {cross_read}"
    # Both directions were spliced by the kernel for the tunnel; what it read itself is noise (its admin,
    # CA and ZDS traffic), far below one direction of the transfer.
    assert same_read < SAME_NODE_BYTES // 64, f"the tunnel read {same_read} bytes into user space"
    assert same_spliced >= 2 * SAME_NODE_BYTES, same_spliced  # each byte goes into a pipe and out of it
    print(f"\nsame-node {2 * SAME_NODE_BYTES} B: {same_spliced} B spliced (in and out of pipes), {same_read} B read;"
          f" cross-node {2 * CROSS_NODE_BYTES} B: {cross_read} B read into user space")  # fmt: skip

    # An open connection: listed in /config_dump and counted by both reporters.
    held = subprocess.Popen(
        lab.exec_argv(FRONTEND, [sys.executable, "-c", CLIENT, "hold", IP[PAYMENTS], str(APP_PORT)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert held.stdout is not None
        assert json.loads(held.stdout.readline()) == {"connected": True, "peer": IP[FRONTEND]}
        status, body = mesh.node_get("node1", "http://127.0.0.1:15000/config_dump")
        assert status == 200, body
        connections = json.loads(body)["connections"]
        target = f"{IP[PAYMENTS]}:{APP_PORT}"
        for direction in ("outbound", "inbound"):
            entries = [e for e in connections[direction] if e["originalDst"] == target]
            assert len(entries) == 1, connections
            assert entries[0]["actualDst"] == target  # delivered in the node, not through :15008
            assert (entries[0]["srcIdentity"], entries[0]["dstIdentity"]) == (CLIENT_ID, SERVER_ID)
        status, metrics = mesh.node_get("node1", "http://127.0.0.1:15020/metrics")
        assert status == 200
        principals = {"source_principal": CLIENT_ID, "destination_principal": SERVER_ID}
        for reporter in ("source", "destination"):
            opened = istio_samples(
                metrics,
                "istio_tcp_connections_opened_total",
                reporter=reporter,
                connection_security_policy="mutual_tls",
                destination_workload="payments",
                **principals,
            )
            assert sum(opened) >= 2, (reporter, opened)  # the bulk transfer and the held connection

        # A DENY policy written while it is open closes it within a second.
        written = time.monotonic()
        write_atomically(mesh.policies, oracles.DENY_FRONTEND)
        held.wait(timeout=10)  # the client exits when its connection fails
        result = json.loads(held.stdout.read().splitlines()[-1])
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()
    assert result["error"] is not None and result["ended"] - written < 1.0, result

    # New connections are denied, by the destination's authorization, reported by both ends.
    denied = client(lab, FRONTEND, "once", IP[PAYMENTS], str(APP_PORT))
    assert denied["ok"] is False, denied
    _, metrics = mesh.node_get("node1", "http://127.0.0.1:15020/metrics")
    for reporter in ("source", "destination"):
        closed = istio_samples(
            metrics, "istio_tcp_connections_closed_total", reporter=reporter, response_flags="DENY", **principals
        )
        assert sum(closed) >= 1, (reporter, closed)
    assert "Traceback" not in tunnel.log(), tunnel.log()[-3000:]
