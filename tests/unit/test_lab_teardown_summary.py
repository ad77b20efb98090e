"""`lab down`'s summary line counts what a user knows the lab by: `lab status` lists 7 network namespaces
(the fabric, 2 nodes, 4 pods) and a cgroup per pod for the default lab, so `lab down` says so. It said
"removed 7 namespaces and 7 cgroups", counting the parent cgroup directories (nodeagent-lab/, one per
node) as cgroups, and "1 processes"."""

from __future__ import annotations

from nodeagent.lab.cluster import TeardownReport

DEFAULT_LAB_NETNS = [
    "na-fabric",
    "na-node1",
    "na-node1.shop.frontend",
    "na-node1.shop.payments",
    "na-node2",
    "na-node2.legacy.batch",
    "na-node2.shop.checkout",
]


def test_the_default_lab_is_four_pod_cgroups_and_seven_namespaces_said_what_they_are() -> None:
    report = TeardownReport(processes=1, netns=DEFAULT_LAB_NETNS, cgroups=7, pod_cgroups=4)
    assert report.summary() == (
        "stopped 1 process, removed 7 network namespaces (the fabric, 2 nodes, 4 pods) and 4 pod cgroups"
    )


def test_counts_of_one_are_singular() -> None:
    report = TeardownReport(
        processes=2,
        netns=["na-node2.shop.checkout"],
        cgroups=3,
        pod_cgroups=1,
        pins=["uid-1"],
        pins_kept=["/sys/fs/bpf/nodeagent/other"],
    )
    assert report.summary() == (
        "stopped 2 processes, removed 1 network namespace (1 pod) and 1 pod cgroup, removed the BPF pins of "
        "1 lab pod (uid-1); left 1 other pin directory alone (/sys/fs/bpf/nodeagent/other)"
    )


def test_a_leftover_cgroup_tree_without_pods_is_named() -> None:
    report = TeardownReport(cgroups=1)
    assert report.removed_anything
    assert report.summary() == "stopped 0 processes, removed the lab's empty cgroup directory (nodeagent-lab)"
