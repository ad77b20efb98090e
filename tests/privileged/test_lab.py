"""The lab, driven through the `nodeagent lab` CLI and checked with the kernel's own tools.

Oracles shell out (ip -j, ip netns, tcpdump) or read /proc and the cgroup tree; nothing here imports
nodeagent. The layout names used below (na-<node>, na-<node>.<ns>.<pod>, nodeagent-lab/<node>/<ns>.<pod>)
are the lab's documented contract (nodeagent/lab/plan.py).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

NODEAGENT = str(Path(sys.executable).with_name("nodeagent"))
DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "nodeagent" / "lab" / "default.yaml"
STATE_DIR = Path("/run/nodeagent/lab")


def cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([NODEAGENT, "lab", *args], capture_output=True, text=True, timeout=60, env=env, check=False)
    if check:
        assert proc.returncode == 0, f"nodeagent lab {' '.join(args)} -> {proc.returncode}\n{proc.stderr}"
    return proc


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, *_ = line.split()
        if fstype == "cgroup2":
            return Path(target)
    raise AssertionError("no cgroup2 mount while a lab is up")


def lab_netns() -> list[str]:
    return sorted(line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.startswith("na-"))


def host_snapshot() -> dict[str, Any]:
    """Everything a lab may touch on the host, as the kernel and the filesystem report it."""
    cgroup_roots = [
        line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if line.split()[2] == "cgroup2"
    ]
    bpf = Path("/sys/fs/bpf")
    return {
        "links": json.loads(sh("ip", "-j", "link", "show")),
        "addresses": json.loads(sh("ip", "-j", "addr", "show")),
        "routes": json.loads(sh("ip", "-j", "route", "show", "table", "all")),
        "routes6": json.loads(sh("ip", "-j", "-6", "route", "show", "table", "all")),
        "rules": json.loads(sh("ip", "-j", "rule", "show")),
        "netns": sh("ip", "netns", "list"),
        "mounts": sorted(Path("/proc/self/mounts").read_text().splitlines()),
        "cgroups": sorted(top for root in cgroup_roots for top, _, _ in os.walk(root)),
        "bpf": sorted(top + "/" + " ".join(sorted(files)) for top, _, files in os.walk(bpf)) if bpf.is_dir() else [],
        "run_nodeagent": Path("/run/nodeagent").exists(),
        "run_netns": Path("/run/netns").exists(),
    }


def pod_ips() -> dict[str, str]:
    topology = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    return {f"{p['namespace']}/{p['name']}": p["ip"] for p in topology["pods"]}


def readline(stream: Any, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return str(stream.readline())


@pytest.fixture
def clean_host() -> Iterator[dict[str, Any]]:
    """Refuses to run over someone's lab; afterwards runs `lab down` whatever happened."""
    if STATE_DIR.exists() or lab_netns():
        pytest.fail("a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests")
    before = host_snapshot()
    yield before
    cli("down", check=False)


@pytest.fixture
def lab(clean_host: dict[str, Any]) -> Iterator[None]:
    cli("up")
    yield
    cli("down")


def test_down_leaves_the_host_as_it_was(clean_host: dict[str, Any]) -> None:
    cli("up")
    during = host_snapshot()
    assert during["netns"] != clean_host["netns"] and during["cgroups"] != clean_host["cgroups"]
    # Processes inside the lab must be stopped by `down`, or namespaces and cgroups would stay busy.
    sleeper = subprocess.Popen([NODEAGENT, "lab", "exec", "shop/frontend", "--", "sleep", "300"])
    node_sleeper = subprocess.Popen([NODEAGENT, "lab", "exec", "--node", "node2", "--", "sleep", "300"])
    try:
        wait_for_pid_in_netns(sleeper.pid, "na-node1.shop.frontend")
        wait_for_pid_in_netns(node_sleeper.pid, "na-node2")
        down = cli("down")
        assert "stopped 2 processes" in down.stdout
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
        assert node_sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        for proc in (sleeper, node_sleeper):
            proc.kill()
            proc.wait()
    assert host_snapshot() == clean_host
    again = cli("down")
    assert "nothing to remove" in again.stdout


def test_up_and_down_refuse_while_another_run_holds_the_lab(clean_host: dict[str, Any]) -> None:
    """A user typing `lab down` while `make demo` (or a benchmark, or this test session) runs must not tear
    that run's lab down under it. This session holds the host's lab lock; a command run without the
    variable that hands the lock to our children is "another user"."""
    elsewhere = {k: v for k, v in os.environ.items() if k != "NODEAGENT_LAB_LOCK_HELD"}
    refused_up = cli("up", check=False, env=elsewhere)
    assert refused_up.returncode == 1, refused_up.stdout + refused_up.stderr
    assert "is using the lab" in refused_up.stderr and "/run/nodeagent-lab.lock" in refused_up.stderr
    assert host_snapshot() == clean_host
    cli("up")
    refused_down = cli("down", check=False, env=elsewhere)
    assert refused_down.returncode == 1, refused_down.stdout + refused_down.stderr
    assert "nothing was removed" in refused_down.stderr
    assert len(lab_netns()) == 7  # the fabric, 2 nodes, 4 pods: all still there
    cli("down")
    assert host_snapshot() == clean_host


def wait_for_pid_in_netns(pid: int, netns: str) -> None:
    want = os.stat(f"/run/netns/{netns}").st_ino
    for _ in range(200):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == want:
                return
        except FileNotFoundError:
            pass
        subprocess.run(["sleep", "0.02"], check=True)
    raise AssertionError(f"process {pid} never entered {netns}")


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen()
print("listening", flush=True)
conn, peer = s.accept()
data = conn.recv(1024)
conn.sendall(b"echo:" + data)
print(peer[0], data.decode(), flush=True)
"""

CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 8080), timeout=10)
c.sendall(sys.argv[2].encode())
print(c.recv(1024).decode(), flush=True)
"""


def test_cross_node_tcp_crosses_the_fabric(lab: None, tmp_path: Path) -> None:
    ips = pod_ips()
    marker = f"LAB-MARKER-{uuid.uuid4().hex}"
    pcap = tmp_path / "fabric.pcap"
    # --immediate-mode: otherwise packets still in the kernel's ring block are lost when tcpdump stops.
    capture = ["tcpdump", "-i", "br0", "-n", "--immediate-mode", "-U", "-Z", "root", "-w", str(pcap), "tcp port 8080"]
    tcpdump = subprocess.Popen(
        ["ip", "netns", "exec", "na-fabric", *capture],
        stderr=subprocess.PIPE,
        text=True,
    )
    server = subprocess.Popen(
        [NODEAGENT, "lab", "exec", "shop/checkout", "--", sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "listening on br0" in readline(tcpdump.stderr, 10)
        assert readline(server.stdout, 10).strip() == "listening"
        client = cli("exec", "shop/frontend", "--", sys.executable, "-c", CLIENT, ips["shop/checkout"], marker)
        assert client.stdout.strip() == f"echo:{marker}"
        # The server saw the client pod's own address: routed, not NATed.
        assert readline(server.stdout, 10).split() == [ips["shop/frontend"], marker]
        assert server.wait(timeout=10) == 0
    finally:
        tcpdump.send_signal(signal.SIGINT)
        tcpdump.wait(timeout=10)
        server.kill()
        server.wait()
    dump = sh("tcpdump", "-r", str(pcap), "-n", "-A")
    assert f"{ips['shop/frontend']}." in dump and f"{ips['shop/checkout']}.8080" in dump
    assert marker in dump
    assert f"echo:{marker}" in dump


def test_exec_enters_the_pods_netns_and_cgroup(lab: None) -> None:
    ips = pod_ips()
    inside = cli("exec", "shop/payments", "--", "sh", "-c", "cat /proc/self/cgroup; ip -j addr show dev eth0")
    lines = inside.stdout.splitlines()
    assert "0::/nodeagent-lab/node1/shop.payments" in lines  # the cgroup2 line of /proc/self/cgroup
    ip_json = lines[-1]
    addrs = [a["local"] for a in json.loads(ip_json)[0]["addr_info"] if a["family"] == "inet"]
    assert addrs == [ips["shop/payments"]]

    # Independently: the exec'd process (same pid: exec, no fork) is listed by the pod's cgroup and
    # shares the pod's netns inode.
    sleeper = subprocess.Popen([NODEAGENT, "lab", "exec", "legacy/batch", "--", "sleep", "30"])
    try:
        wait_for_pid_in_netns(sleeper.pid, "na-node2.legacy.batch")
        procs = (cgroup2_root() / "nodeagent-lab/node2/legacy.batch/cgroup.procs").read_text().split()
        assert str(sleeper.pid) in procs
    finally:
        sleeper.kill()
        sleeper.wait()

    assert cli("exec", "shop/frontend", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    missing = cli("exec", "shop/nope", "--", "true", check=False)
    assert missing.returncode != 0 and "no pod 'shop/nope'" in missing.stderr
    node = cli("exec", "--node", "node1", "--", "ip", "-j", "addr", "show", "dev", "fabric0")
    assert json.loads(node.stdout)[0]["addr_info"][0]["local"] == "10.99.0.11"


def test_status_matches_the_kernel(lab: None) -> None:
    doc = json.loads(cli("status", "-o", "json").stdout)
    pods = {r["name"]: r for r in doc["rows"] if r["kind"] == "pod"}
    assert set(pods) == set(pod_ips())
    for key, ip in pod_ips().items():
        row = pods[key]
        kernel = json.loads(sh("ip", "-j", "-n", row["netns"], "addr", "show", "dev", "eth0"))
        assert [a["local"] for a in kernel[0]["addr_info"] if a["family"] == "inet"] == [ip] == [row["ip"]]
        assert row["cgroup"] == "yes" and row["problem"] == ""
    # A pod whose netns vanished behind the lab's back is reported, and status fails.
    subprocess.run(["ip", "netns", "del", pods["legacy/batch"]["netns"]], check=True)
    broken = cli("status", check=False)
    assert broken.returncode == 1
    assert "netns na-node2.legacy.batch is missing" in broken.stdout
    assert "1 object differs from the topology" in broken.stderr, broken.stderr
    again = cli("up", check=False)
    assert again.returncode != 0 and "already up" in again.stderr and "lab down" in again.stderr


def test_no_lab_means_a_clear_error(clean_host: dict[str, Any]) -> None:
    for args in (("status",), ("exec", "shop/frontend", "--", "true")):
        proc = cli(*args, check=False)
        assert proc.returncode != 0
        assert "no lab is up: run `sudo nodeagent lab up`" in proc.stderr


BAD_TOPOLOGIES = {
    "duplicate IPs": ("pods", 1, "ip", "10.10.1.10", "pods[1].ip: duplicate IP 10.10.1.10"),
    "unknown node": ("pods", 2, "node", "node9", "pods[2].node: unknown node 'node9' (known: node1, node2)"),
    "overlapping CIDRs": ("nodes", 1, "pod_cidr", "10.10.0.0/16", "nodes[1].pod_cidr: 10.10.0.0/16 overlaps"),
}


@pytest.mark.parametrize("case", [*BAD_TOPOLOGIES, "bad YAML"])
def test_bad_topology_creates_nothing(clean_host: dict[str, Any], tmp_path: Path, case: str) -> None:
    path = tmp_path / "topology.yaml"
    if case == "bad YAML":
        path.write_text(DEFAULT_TOPOLOGY.read_text().replace("pods:\n", "pods: [\n", 1))
        expected = "not valid YAML: line"
    else:
        section, index, key, value, expected = BAD_TOPOLOGIES[case]
        data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
        data[section][index][key] = value
        path.write_text(yaml.safe_dump(data))
    proc = cli("up", "--topology", str(path), check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "nothing was created" in proc.stderr
    assert lab_netns() == []
    assert host_snapshot() == clean_host


def test_failure_midway_is_rolled_back(clean_host: dict[str, Any], tmp_path: Path) -> None:
    """A kernel error after the fabric and nodes exist (injected by an `ip` wrapper) leaves nothing."""
    real_ip = sh("sh", "-c", "command -v ip").strip()
    wrapper = tmp_path / "ip"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -n ] && [ "$2" = na-node2.legacy.batch ]; then\n'
        '  echo "RTNETLINK answers: injected" >&2; exit 2\n'
        "fi\n"
        f'exec {real_ip} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = cli("up", check=False, env=env)
    assert proc.returncode == 1
    assert "rolled back" in proc.stderr and "na-node2.legacy.batch" in proc.stderr and "injected" in proc.stderr
    assert lab_netns() == []
    assert host_snapshot() == clean_host


def test_host_without_cgroup2_gets_one_mounted_and_unmounted(clean_host: dict[str, Any]) -> None:
    """In a private mount namespace whose cgroup2 mount is removed, the lab mounts its own and cleans up."""
    script = f"""
set -e
grep cgroup2 /proc/self/mounts | cut -d' ' -f2 | xargs -r -n1 umount
echo "before: $(grep -c cgroup2 /proc/self/mounts || true)"
{NODEAGENT} lab up >/dev/null
echo "during: $(grep cgroup2 /proc/self/mounts | cut -d' ' -f2)"
{NODEAGENT} lab exec shop/checkout -- grep '^0::' /proc/self/cgroup
{NODEAGENT} lab down >/dev/null
echo "after: $(grep -c cgroup2 /proc/self/mounts || true) $(test -e /run/nodeagent && echo left || echo gone)"
"""
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "before: 0",
        "during: /run/nodeagent/cgroup2",
        "0::/nodeagent-lab/node2/shop.checkout",
        "after: 0 gone",
    ]
    assert host_snapshot() == clean_host


def test_down_without_state_sweeps_by_name(clean_host: dict[str, Any]) -> None:
    """After a crash that lost /run/nodeagent/lab, `down` still finds namespaces and cgroups by their names."""
    cli("up")
    sleeper = subprocess.Popen([NODEAGENT, "lab", "exec", "shop/checkout", "--", "sleep", "300"])
    try:
        wait_for_pid_in_netns(sleeper.pid, "na-node2.shop.checkout")
        subprocess.run(["rm", "-rf", str(STATE_DIR)], check=True)
        down = cli("down")
        assert (
            "stopped 1 process, removed 7 network namespaces (the fabric, 2 nodes, 4 pods) and 4 pod cgroups"
            in down.stdout
        ), down.stdout
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()
    after = host_snapshot()
    # Without its state the lab cannot know whether /run/netns and its bind mount (made by the first
    # `ip netns add`) were there before, so it leaves them; everything else must be as it was.
    netns_mount = [m for m in after["mounts"] if m.split()[1] == "/run/netns" and m not in clean_host["mounts"]]
    for line in netns_mount:
        subprocess.run(["umount", line.split()[1]], check=True)
    if not clean_host["run_netns"]:
        Path("/run/netns").rmdir()
    assert host_snapshot() == clean_host


PIN_ROOT = Path("/sys/fs/bpf/nodeagent")  # = nodeagent.ebpf.structs.PIN_ROOT, a real agent's pin root too


def bpftool_pin_map(directory: Path) -> Path:
    """Pin a small map as the agents do (<root>/<pod uid>/map_orig_dst), with bpftool."""
    directory.mkdir(parents=True, exist_ok=True)
    pin = directory / "map_orig_dst"
    sh(
        "bpftool",
        "map",
        "create",
        str(pin),
        "type",
        "hash",
        "key",
        "8",
        "value",
        "8",
        "entries",
        "16",
        "name",
        "na_orig_dst",
    )
    return pin


@pytest.mark.parametrize("real_agent_pins", [True, False], ids=["beside-a-real-agent", "lab-only"])
def test_down_removes_only_the_lab_pods_pins(clean_host: dict[str, Any], tmp_path: Path, real_agent_pins: bool) -> None:
    """The lab's agents pin under the production root: `down` removes its own pods' pins and says so, no others."""
    topology = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    topology["pods"][0]["uid"] = "lab-pin-test-frontend"
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    cli("up", "--topology", str(path))
    lab_pin = bpftool_pin_map(PIN_ROOT / "lab-pin-test-frontend")
    prod_dir = PIN_ROOT / f"prod-pod-{uuid.uuid4().hex[:8]}"
    prod_pin = bpftool_pin_map(prod_dir) if real_agent_pins else None
    try:
        down = cli("down")
        assert "removed the BPF pins of 1 lab pod (lab-pin-test-frontend)" in down.stdout
        assert not lab_pin.parent.exists()
        if prod_pin is not None:
            assert json.loads(sh("bpftool", "-j", "map", "show", "pinned", str(prod_pin)))["name"] == "na_orig_dst"
            assert f"left 1 other pin directory alone ({prod_dir})" in down.stdout
    finally:
        subprocess.run(["rm", "-rf", str(prod_dir), str(lab_pin.parent)], check=True)
        if not any(line.startswith(f"{PIN_ROOT}/") for line in clean_host["bpf"]):
            subprocess.run(["rmdir", "--ignore-fail-on-non-empty", str(PIN_ROOT)], check=False)
    if not real_agent_pins:  # the root the lab's agents created is gone with their pins
        assert host_snapshot() == clean_host


@pytest.mark.parametrize(
    ("argv", "rc"),
    [
        (("lab", "status"), 1),
        (("lab", "exec", "shop/frontend", "--", "true"), 1),
        (("inspect", "redirects"), 2),  # its default inventory is the lab's
    ],
    ids=["status", "exec", "inspect-redirects"],
)
@pytest.mark.parametrize(
    "edit",
    [("node", "node9", "pods[1].node: unknown node 'node9'"), ("ip", "10.10.1.300", "pods[1].ip: '10.10.1.300'")],
    ids=["node", "ip"],
)
def test_a_bad_inventory_edit_is_a_clear_error(
    lab: None, argv: tuple[str, ...], rc: int, edit: tuple[str, str, str]
) -> None:
    """Users edit the lab's inventory.yaml (README): a mistake is named with its field and what to do, no traceback
    - and never `lab up` as the fix (`inspect redirects` asked "is the lab up?" of a lab that was up)."""
    field, value, problem = edit
    inventory = STATE_DIR / "inventory.yaml"
    data = yaml.safe_load(inventory.read_text())
    data["pods"][1][field] = value
    inventory.write_text(yaml.safe_dump(data))
    proc = subprocess.run([NODEAGENT, *argv], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == rc, proc.stderr
    assert "Traceback" not in proc.stderr
    assert problem in proc.stderr
    assert f"fix that field in {inventory}" in proc.stderr and "lab down" in proc.stderr
    assert "is the lab up" not in proc.stderr
