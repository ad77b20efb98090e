"""The tunnels carry cross-node traffic with exactly what daemonset/daemonset.yaml gives the tunnel container.

Why this file exists: the tunnel container's capabilities and host mounts are a promise of least privilege
that nothing else checks — the lab runs every process as full root, so a capability the tunnel needs but
the manifest lacks would only show on a real cluster, and one the manifest grants but nothing uses would
never show at all. Here the real CA, agents and tunnels (nodeagent.labmesh.Mesh) run in both capture
modes, and each tunnel is started the way a container runtime starts the tunnel container, as read from
the manifest (never written out here):

- its bounding, inheritable and ambient capability sets are the container's `capabilities.add` (after
  `drop: [ALL]`), through util-linux `setpriv` — a root process whose bounding set lacks a capability
  cannot hold it after exec — and `allowPrivilegeEscalation: false` sets no_new_privs;
- a host directory the container does not mount is hidden from it: the lab's /var/run/netns (every node's
  and pod's netns) is covered by an empty read-only tmpfs in a mount namespace of the tunnel's own. The
  container's /proc is the host's PID namespace (hostPID) as it is here; the host has no /host/proc.

Then a client in shop/frontend (node1) talks to a server in shop/checkout (node2). Oracles, none of them
the code under test: the kernel's /proc/PID/status of each tunnel (decoded by capsh) and its view of
/var/run/netns, what the client and the server saw (the server greets with the peer address it accepted:
the client pod's own IP, spoofed by node2's tunnel), tcpdump on the fabric (15008 only between the two
pods, the payload never in the clear), and after those node2's access log (frontend's identity arrived).

A manifest that grants too little fails here — without SYS_ADMIN the tunnel cannot enter the pods' netns,
without NET_ADMIN it cannot set SO_MARK (kernels >= 5.17 would take NET_RAW instead, which the manifest
does not grant): the pods are never enabled, and the failure quotes the tunnels' logs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oracles
import pytest
import yaml
from waiting import wait_for

from nodeagent.labmesh import Mesh, MeshError

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(150)]

DAEMONSET = Path(__file__).resolve().parents[2] / "daemonset" / "daemonset.yaml"
FRONTEND, PAYMENTS, CHECKOUT = "shop/frontend", "shop/payments", "shop/checkout"
IP = {FRONTEND: "10.10.1.10", CHECKOUT: "10.10.2.10"}
APP_PORT = 8080
# Host directories the lab's tunnels could reach that the tunnel container gets only by mounting them
# (host path in the manifest -> where it is on this host); the container's own /proc needs no mount.
HIDEABLE = {"/var/run/netns": "/run/netns"}

SERVER = oracles.PEER_ECHO_SERVER

CLIENT = r"""
import json, socket, sys
host, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
try:
    s = socket.create_connection((host, port), timeout=10)
    f = s.makefile("rb")
    greeting = f.readline().decode().strip()
    s.sendall(msg)
    echo = f.read(len(msg))
    print(json.dumps({"ok": echo == msg, "peer": greeting.removeprefix("peer ")}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
"""


@dataclass(frozen=True)
class TunnelContainer:
    """What the manifest gives the tunnel container: capabilities (names as in Kubernetes), no_new_privs, and
    the host paths it mounts."""

    capabilities: tuple[str, ...]
    no_new_privs: bool
    host_paths: frozenset[str]


def tunnel_container() -> TunnelContainer:
    [ds] = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d and d.get("kind") == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    [tunnel] = [c for c in pod["containers"] if c["name"] == "tunnel"]
    sc = tunnel["securityContext"]
    # The bounding set below starts from nothing, as the container's does only with these two.
    assert sc["capabilities"]["drop"] == ["ALL"] and sc.get("privileged") is False, sc
    host_path = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounted = frozenset(host_path[m["name"]] for m in tunnel["volumeMounts"] if m["name"] in host_path)
    return TunnelContainer(
        tuple(sorted(sc["capabilities"].get("add") or [])), sc.get("allowPrivilegeEscalation") is False, mounted
    )


def wrapper(container: TunnelContainer) -> list[str]:
    """The command line the tunnel's own is appended to: the container's mounts, then its capabilities."""
    caps = ",".join(["-all", *(f"+{c.lower()}" for c in container.capabilities)])
    setpriv = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", f"--ambient-caps={caps}"]
    if container.no_new_privs:
        setpriv.append("--no-new-privs")
    hide = [here for path, here in HIDEABLE.items() if path not in container.host_paths]
    if not hide:
        return [*setpriv, "--"]
    mounts = " && ".join(f"mount -t tmpfs -o ro,size=4k nodeagent-unmounted {d}" for d in hide)
    # A mount namespace of the tunnel's own (private: nothing propagates back to the host); every step execs,
    # so the tunnel keeps the pid the mesh started.
    script = f'{mounts} && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "tunnel-mounts", *setpriv, "--"]


def proc_caps(pid: int) -> dict[str, Any]:
    """The kernel's capability sets of `pid` as capability names (capsh decodes), and its no_new_privs."""
    status = Path(f"/proc/{pid}/status").read_text()
    found: dict[str, Any] = {}
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        match = re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M)
        assert match is not None, status
        decoded = oracles.sh("capsh", f"--decode={match.group(1)}").strip()  # 0x...=cap_a,cap_b
        names = decoded.partition("=")[2]
        found[field] = sorted(n.removeprefix("cap_").upper() for n in names.split(",") if n)
    match = re.search(r"^NoNewPrivs:\s*(\d)$", status, re.M)
    found["NoNewPrivs"] = match is not None and match.group(1) == "1"
    return found


@pytest.fixture(params=["iptables", "ebpf"])
def capture(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mesh(capture: str, tmp_path: Path) -> Iterator[Mesh]:
    argv = wrapper(tunnel_container())

    def make(lab: Any, run_dir: Path) -> Mesh:
        return Mesh(lab, run_dir, capture=capture, tunnel_wrapper=argv)

    with oracles.lab_mesh(tmp_path, make, "na-caps-") as started:
        yield started


def tunnel_logs(mesh: Mesh) -> str:
    return "\n".join(f"--- {p.name}:\n{p.log()[-2500:]}" for p in mesh.procs if p.kind == "tunnel")


def test_cross_node_traffic_through_tunnels_limited_to_the_manifests_capabilities(mesh: Mesh, tmp_path: Path) -> None:
    container = tunnel_container()
    lab = mesh.lab
    assert not Path("/host/proc").exists(), "the lab host has a /host/proc: the tunnel could use it unmounted"
    try:
        mesh.wait_enabled([FRONTEND, PAYMENTS, CHECKOUT], timeout=30)
    except MeshError as exc:
        pytest.fail(f"with only {', '.join(container.capabilities)} the pods were not enabled: {exc}\n"
                    f"{tunnel_logs(mesh)}")  # fmt: skip

    # The tunnels really run with the container's capabilities (the kernel's view), and nothing more.
    want = list(container.capabilities)
    for node in mesh.nodes:
        pid = mesh.tunnel(node).pid
        assert b"tunnel" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"), "not the tunnel's own pid"
        assert proc_caps(pid) == {
            "CapInh": want, "CapPrm": want, "CapEff": want, "CapBnd": want, "CapAmb": want,
            "NoNewPrivs": container.no_new_privs,
        }, node  # fmt: skip
        for path, here in HIDEABLE.items():
            if path not in container.host_paths:  # the lab's netns files are there for us, not for the tunnel
                assert os.listdir(here) and not os.listdir(f"/proc/{pid}/root{here}"), (node, here)

    server = mesh.spawn("server-checkout", lab.exec_argv(CHECKOUT, [sys.executable, "-c", SERVER, str(APP_PORT)]))
    wait_for("the server in shop/checkout", lambda: "listening" in server.log())
    marker = f"CAPS-PLAIN-{uuid.uuid4().hex}"
    dump = oracles.FabricCapture(lab, tmp_path / "fabric.pcap")
    try:
        argv = lab.exec_argv(FRONTEND, [sys.executable, "-c", CLIENT, IP[CHECKOUT], str(APP_PORT), marker])
        seen = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout)
    finally:
        dump.stop()
    # The server saw the client pod's own IP: node2's tunnel connected from it (IP_TRANSPARENT in the pod).
    assert seen == {"ok": True, "peer": IP[FRONTEND]}, f"{seen}\n{tunnel_logs(mesh)}"
    between = dump.packets(f"host {IP[FRONTEND]} and host {IP[CHECKOUT]}")
    assert between and all(".15008" in line for line in between), between
    assert marker.encode() not in dump.path.read_bytes()
    log = mesh.tunnel("node2").log()
    assert 'src.identity="spiffe://cluster.local/ns/shop/sa/frontend"' in log, log[-3000:]
