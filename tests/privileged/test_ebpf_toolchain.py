"""The eBPF toolchain works here: bcc from the project's venv compiles a cgroup program that acts.

A cgroup/connect4 program counting connect() calls is compiled and attached to one lab pod's cgroup by a
script run with the project's Python (so `import bcc` must work from the venv, and bcc must find kernel
headers). Connects made inside that pod via `lab exec` are counted; connects from another pod are not.
`bpftool -j cgroup show` is the independent check that the program is attached where we think.
Nothing here imports nodeagent.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(180)]

NODEAGENT = str(Path(sys.executable).with_name("nodeagent"))
STATE_DIR = Path("/run/nodeagent/lab")
CONNECTS = 5

LOADER = r"""
import os, sys
from bcc import BPF, BPFAttachType

PROGRAM = '''
BPF_ARRAY(connects, u64, 1);

int count_connect4(struct bpf_sock_addr *ctx) {
    int key = 0;
    u64 *n = connects.lookup(&key);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 1;  /* allow the connect */
}
'''

cgroup = sys.argv[1]
b = BPF(text=PROGRAM)
fn = b.load_func("count_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT)
fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
BPF.attach_func(fn, fd, BPFAttachType.CGROUP_INET4_CONNECT)
print("attached", flush=True)
sys.stdin.readline()
print(b["connects"][0].value, flush=True)
BPF.detach_func(fn, fd, BPFAttachType.CGROUP_INET4_CONNECT)
"""

# Connect to a closed port on the pod's own loopback: refused at once, but connect4 runs first.
CONNECTOR = """
import socket, sys
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", 9))
    except ConnectionRefusedError:
        pass
    s.close()
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([NODEAGENT, "lab", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"nodeagent lab {' '.join(args)} -> {proc.returncode}\n{proc.stderr}"
    return proc


@pytest.fixture
def lab() -> Iterator[None]:
    if STATE_DIR.exists():
        pytest.fail("a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests")
    try:
        cli("up")
        yield
    finally:
        cli("down")


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, *_ = line.split()
        if fstype == "cgroup2":
            return Path(target)
    raise AssertionError("no cgroup2 mount while a lab is up")


def test_bcc_cgroup_connect4_counts_one_pods_connects(lab: None, tmp_path: Path) -> None:
    cgroup = cgroup2_root() / "nodeagent-lab/node1/shop.frontend"
    assert cgroup.is_dir()
    stderr = tmp_path / "bcc.stderr"  # a file, not a pipe: compiler warnings must not fill a pipe and block
    with stderr.open("w") as err_file:
        loader = subprocess.Popen(
            [sys.executable, "-c", LOADER, str(cgroup)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )
    assert loader.stdout is not None
    try:
        ready, _, _ = select.select([loader.stdout], [], [], 60)
        assert ready, "bcc did not compile and attach within 60 s"
        line = loader.stdout.readline().strip()
        assert line == "attached", f"bcc failed: {stderr.read_text()}"

        attached = json.loads(
            subprocess.run(
                ["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True, check=True
            ).stdout
        )
        assert [p["attach_type"] for p in attached] == ["cgroup_inet4_connect"]
        assert attached[0]["name"].startswith("count_connect")  # the kernel truncates names to 15 bytes

        cli("exec", "shop/frontend", "--", sys.executable, "-c", CONNECTOR, str(CONNECTS))
        cli("exec", "shop/payments", "--", sys.executable, "-c", CONNECTOR, "3")  # another pod: not counted

        out, _ = loader.communicate("\n", timeout=30)
        assert loader.returncode == 0, stderr.read_text()
        assert int(out.strip()) == CONNECTS
    finally:
        if loader.poll() is None:
            loader.kill()
            loader.wait()
    after = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True, check=True)
    assert json.loads(after.stdout.strip() or "[]") == []  # detached (bpftool prints nothing for none)
