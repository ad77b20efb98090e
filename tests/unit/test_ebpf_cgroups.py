"""Finding a pod's cgroup v2 directory for eBPF capture: the lab's pattern and the kubelet's layouts.

The kubelet's paths are written out here from its two cgroup drivers (systemd: slices with the uid's
dashes as underscores; cgroupfs, k3s's default: kubepods/<qos>/pod<uid>), not derived from the code.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from nodeagent.capture.backend import CaptureError
from nodeagent.capture.ebpf import KUBELET_CGROUPS, CgroupResolver, kubelet_cgroups
from nodeagent.model import Pod

UID = "5f8e2c1a-0b7d-4e3f-9a6c-2d1e0f9b8a7c"
FLAT = "5f8e2c1a_0b7d_4e3f_9a6c_2d1e0f9b8a7c"
POD = Pod(
    name="checkout-7d9f",
    namespace="shop",
    node="node1",
    uid=UID,
    service_account="checkout",
    ip=ipaddress.IPv4Address("10.42.0.17"),
)

LAYOUTS = [
    ("systemd, guaranteed", f"kubepods.slice/kubepods-pod{FLAT}.slice"),
    ("systemd, burstable", f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{FLAT}.slice"),
    ("systemd, besteffort", f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{FLAT}.slice"),
    ("cgroupfs, guaranteed", f"kubepods/pod{UID}"),
    ("cgroupfs, burstable", f"kubepods/burstable/pod{UID}"),
    ("cgroupfs, besteffort", f"kubepods/besteffort/pod{UID}"),
]


def test_every_kubelet_layout_is_a_candidate() -> None:
    assert sorted(kubelet_cgroups(UID)) == sorted(path for _, path in LAYOUTS)


@pytest.mark.parametrize(("layout", "relative"), LAYOUTS, ids=[name for name, _ in LAYOUTS])
def test_kubelet_resolver_finds_the_pods_directory(tmp_path: Path, layout: str, relative: str) -> None:
    (tmp_path / relative / "cri-containerd-0123.scope").mkdir(parents=True)  # a container below the pod
    other = "kubepods/burstable/pod00000000-0000-0000-0000-000000000000"  # another pod's: never chosen
    (tmp_path / other).mkdir(parents=True)
    assert CgroupResolver(KUBELET_CGROUPS, root=str(tmp_path)).path(POD) == str(tmp_path / relative)


def test_kubelet_resolver_under_a_cgroup_root(tmp_path: Path) -> None:
    (tmp_path / "k3s" / f"kubepods/besteffort/pod{UID}").mkdir(parents=True)
    resolver = CgroupResolver(f"{KUBELET_CGROUPS}:/k3s", root=str(tmp_path))
    assert resolver.path(POD) == str(tmp_path / "k3s" / f"kubepods/besteffort/pod{UID}")
    with pytest.raises(CaptureError, match="kubelet:DIR"):
        CgroupResolver(KUBELET_CGROUPS, root=str(tmp_path)).path(POD)  # not at the top: says how to point there


def test_kubelet_resolver_without_the_pod_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CaptureError) as failure:
        CgroupResolver(KUBELET_CGROUPS, root=str(tmp_path)).path(POD)
    message = str(failure.value)
    assert "shop/checkout-7d9f" in message and UID in message
    assert str(tmp_path / f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{FLAT}.slice") in message


def test_patterns_format_node_namespace_name_and_uid(tmp_path: Path) -> None:
    assert CgroupResolver(root="/sys/fs/cgroup").path(POD) == "/sys/fs/cgroup/nodeagent-lab/node1/shop.checkout-7d9f"
    assert CgroupResolver("pods/{uid}", root=str(tmp_path)).path(POD) == str(tmp_path / "pods" / UID)
