"""Sysctls in a pod's netns from a container whose /proc/sys is read-only, as every non-privileged one's is.

eBPF capture sets net.ipv4.tcp_fwmark_accept in each pod's netns (the agent) and the tunnel sets
net.ipv4.tcp_migrate_req there. Through the container's own /proc/sys both fail with EROFS; daemonset.yaml
mounts the host's /proc/sys/net read-write and passes it as --sysctl-net. A private mount namespace here
reproduces that container: /proc/sys read-only, /proc/sys/net bound read-write elsewhere. The oracle is
`ip netns exec ... sysctl` outside it (and the host's own value, which must not move).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys
from nodeagent.capture.backend import CaptureError
from nodeagent.capture.ebpf import _sysctl
from nodeagent.netns import in_netns
from nodeagent.ztunnel.proxy import tunnel

netns, mount = sys.argv[1], sys.argv[2]
out = {}
try:
    _sysctl(netns, "1")
except CaptureError as exc:
    out["default"] = str(exc)
out["before"] = _sysctl(netns, "1", mount)
class Pod:
    key = "shop/web"
in_netns(netns, lambda: tunnel._migrate_on_close(Pod(), mount))
print(json.dumps(out))
"""


def sysctl(netns: str | None, name: str) -> str:
    cmd = ["sysctl", "-n", name]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"na-sysctl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)


def test_sysctls_are_set_through_a_host_mount_when_proc_sys_is_read_only(netns: str, tmp_path: Path) -> None:
    host = (sysctl(None, "net.ipv4.tcp_fwmark_accept"), sysctl(None, "net.ipv4.tcp_migrate_req"))
    mount = tmp_path / "proc-sys-net"
    mount.mkdir()
    container = (
        f"mount --bind /proc/sys/net {mount} && mount --bind /proc/sys /proc/sys && "
        "mount -o remount,bind,ro /proc/sys && "
        f'exec "$0" -c "$1" /var/run/netns/{netns} {mount}'
    )
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", container, sys.executable, CHILD],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    # The container's own /proc/sys: refused, and the error says what to mount.
    assert "Read-only file system" in out["default"] and "--sysctl-net" in out["default"]
    assert out["before"] == "0"
    # Through the read-write mount: the pod's netns changed, the host's did not.
    assert sysctl(netns, "net.ipv4.tcp_fwmark_accept") == "1"
    assert sysctl(netns, "net.ipv4.tcp_migrate_req") == "1"
    assert (sysctl(None, "net.ipv4.tcp_fwmark_accept"), sysctl(None, "net.ipv4.tcp_migrate_req")) == host
