"""The agent's deciders and its per-pod reconciler, with a fake capture backend and a fake tunnel."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
from pathlib import Path

import pytest
from metrics_scrape import registry_samples
from prometheus_client import CollectorRegistry

from nodeagent.agent.enrollment import Status, desired_pods, status_of
from nodeagent.agent.reconciler import Reconciler
from nodeagent.agent.status import run_writer
from nodeagent.agent.workloads import InventoryFile
from nodeagent.agent.zds_server import Delivery
from nodeagent.capture.backend import CaptureError, CaptureState
from nodeagent.inventory.local import parse_inventory
from nodeagent.metrics import AgentMetrics
from nodeagent.model import Inventory, Pod


def inventory(ns_labels: dict[str, str] | None = None, pods: list[dict[str, object]] | None = None) -> Inventory:
    return parse_inventory(
        {
            "cluster": {"name": "lab", "fabric_cidr": "10.99.0.0/24"},
            "nodes": [
                {"name": "node1", "pod_cidr": "10.10.1.0/24", "address": "10.99.0.11"},
                {"name": "node2", "pod_cidr": "10.10.2.0/24", "address": "10.99.0.12"},
            ],
            "namespaces": [{"name": "shop", "labels": ns_labels or {}}, {"name": "kube-system"}],
            "pods": pods
            if pods is not None
            else [
                {"name": "a", "namespace": "shop", "node": "node1", "service_account": "a"},
                {"name": "b", "namespace": "shop", "node": "node1", "service_account": "b"},
                {"name": "c", "namespace": "shop", "node": "node2", "service_account": "c"},
            ],
        }
    )


AMBIENT = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}


@pytest.mark.parametrize(
    ("ns_labels", "pod", "enrolled"),
    [
        ({}, {}, False),
        (AMBIENT, {}, True),
        (AMBIENT, {"labels": NONE}, False),  # pod opt-out
        ({}, {"labels": AMBIENT}, True),  # pod opt-in
        (AMBIENT, {"host_network": True}, False),
        (AMBIENT, {"namespace": "kube-system"}, False),  # excluded namespace
        (AMBIENT, {"node": "node2"}, False),  # another node's pod
        (AMBIENT, {"phase": "Succeeded"}, False),
    ],
)
def test_desired_pods(ns_labels: dict[str, str], pod: dict[str, object], enrolled: bool) -> None:
    spec = {"name": "p", "namespace": "shop", "node": "node1", "service_account": "p", **pod}
    inv = inventory(ns_labels, [spec])
    assert bool(desired_pods(inv, "node1")) is enrolled


@pytest.mark.parametrize(
    ("error", "acked", "status"),
    [(None, True, Status.ENABLED), (None, False, Status.PENDING), ("no rules", True, Status.FAILED)],
)
def test_status_is_enabled_only_with_complete_capture_and_an_ack(
    error: str | None, acked: bool, status: Status
) -> None:
    assert status_of(error, acked) is status


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.kernel: dict[str, bool] = {}  # netns -> captured
        self.calls: list[tuple[str, str]] = []
        self.fail: str | None = None
        self.active: dict[str, int] = {}
        self.max_parallel_per_netns: dict[str, int] = {}
        self.pinned: set[str] = set()  # uids with state outside their netns (what eBPF pins are)

    async def install(self, pod: Pod, netns: str) -> tuple[str, ...]:
        self.calls.append(("install", pod.key))
        self.active[netns] = self.active.get(netns, 0) + 1
        self.max_parallel_per_netns[netns] = max(self.max_parallel_per_netns.get(netns, 0), self.active[netns])
        await asyncio.sleep(0.01)
        self.active[netns] -= 1
        if self.fail:
            raise CaptureError(self.fail)
        repaired = () if self.kernel.get(netns) else ("rules missing",)
        self.kernel[netns] = True
        self.pinned.add(pod.uid)
        return repaired

    async def remove(self, pod: Pod, netns: str) -> bool:
        self.calls.append(("remove", pod.key))
        self.pinned.discard(pod.uid)
        return self.kernel.pop(netns, False)

    async def forget(self, uid: str) -> bool:
        self.calls.append(("forget", uid))
        removed = uid in self.pinned
        self.pinned.discard(uid)
        return removed

    def kept_uids(self) -> tuple[str, ...]:
        return tuple(sorted(self.pinned))

    async def inspect(self, netns: str) -> CaptureState:
        raise AssertionError("the reconciler never inspects")

    async def verify(self, netns: str) -> tuple[str, ...]:
        raise AssertionError("the reconciler never verifies without repairing")


class FakeTunnels:
    def __init__(self, connected: bool) -> None:
        self.connected = connected
        self.added: list[str] = []
        self.deleted: list[str] = []

    async def add(self, pod: Pod, netns_fd: int) -> Delivery:
        os.fstat(netns_fd)  # the fd must be open while the tunnel gets it
        self.added.append(pod.key)
        return Delivery(True) if self.connected else Delivery(False, "no tunnel")

    async def delete(self, uid: str) -> None:
        self.deleted.append(uid)

    def acked_uids(self) -> frozenset[str]:
        return frozenset()

    @property
    def tunnels(self) -> tuple[str, ...]:
        return ("peer",) if self.connected else ()


class Resolver:
    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, pod: Pod) -> str | None:
        path = self.root / f"{pod.namespace}.{pod.name}"
        return str(path) if path.exists() else None


@pytest.fixture
def netns_dir(tmp_path: Path) -> Path:
    for name in ("shop.a", "shop.b"):
        (tmp_path / name).write_text("")
    return tmp_path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_add_remove_is_idempotent_serialized_and_closes_fds(netns_dir: Path) -> None:
    backend, tunnels = FakeBackend(), FakeTunnels(connected=False)
    rec = Reconciler(backend, Resolver(netns_dir), tunnels, on_change=lambda: None)
    fds = open_fds()
    inv = inventory(AMBIENT)
    for _ in range(3):  # repeated identical requests coalesce per pod
        rec.set_desired(desired_pods(inv, "node1"))
        rec.verify_all()
    await rec.wait_idle()
    assert set(backend.kernel) == {str(netns_dir / "shop.a"), str(netns_dir / "shop.b")}
    assert set(backend.max_parallel_per_netns.values()) == {1}  # never one pod twice at once
    assert sorted(tunnels.added) == ["shop/a", "shop/b"]  # one Add each, even after re-verification
    assert {rec.status(uid) for uid in rec.records} == {Status.PENDING}
    assert rec.probe_targets() == {
        "shop/a": ipaddress.IPv4Address("10.10.1.2"),
        "shop/b": ipaddress.IPv4Address("10.10.1.3"),
    }
    assert open_fds() == fds + 2

    rec.set_desired({})
    await rec.wait_idle()
    assert backend.kernel == {} and rec.records == {} and len(tunnels.deleted) == 2
    assert open_fds() == fds
    await rec.close()


async def test_adopts_captured_pods_and_reports_capture_failures(
    netns_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    backend = FakeBackend()
    backend.kernel[str(netns_dir / "shop.a")] = True  # left by an earlier agent
    rec = Reconciler(backend, Resolver(netns_dir), FakeTunnels(connected=True), on_change=lambda: None)
    inv = inventory(AMBIENT)
    rec.set_desired(desired_pods(inv, "node1"))
    await rec.wait_idle()
    assert "shop/a adopted (capture already complete in the kernel)" in caplog.text
    assert "shop/b captured" in caplog.text
    assert {rec.status(uid) for uid in rec.records} == {Status.PENDING}  # acked_uids() is empty: not enabled

    backend.kernel.clear()
    rec.verify_all()
    await rec.wait_idle()
    assert "capture drift in shop/a repaired: rules missing" in caplog.text

    backend.fail = "iptables-restore failed"
    rec.verify_all()
    await rec.wait_idle()
    assert {rec.status(uid) for uid in rec.records} == {Status.FAILED}
    await rec.close()


async def test_a_pod_without_netns_waits_and_a_stray_capture_is_removed(netns_dir: Path) -> None:
    backend = FakeBackend()
    backend.kernel[str(netns_dir / "shop.b")] = True
    rec = Reconciler(backend, Resolver(netns_dir), FakeTunnels(connected=False), on_change=lambda: None)
    pods = [
        {"name": "a", "namespace": "shop", "node": "node1", "service_account": "a", "labels": AMBIENT},
        {"name": "b", "namespace": "shop", "node": "node1", "service_account": "b"},
        {"name": "gone", "namespace": "shop", "node": "node1", "service_account": "g", "labels": AMBIENT},
    ]
    inv = inventory({}, pods)
    rec.set_desired(desired_pods(inv, "node1"))
    rec.sweep(inv.pods, "node1")
    await rec.wait_idle()
    assert backend.kernel == {str(netns_dir / "shop.a"): True}  # b was not enrolled: its capture removed
    gone = next(r for r in rec.records.values() if r.pod.name == "gone")
    assert gone.error is not None and "no network namespace" in gone.error
    await rec.close()


def uid_of(inv: Inventory, key: str) -> str:
    return inv.pod(key).uid


async def test_a_deleted_pod_loses_its_per_uid_state_though_its_netns_is_gone(netns_dir: Path) -> None:
    """eBPF pins are keyed by pod uid, not netns: they must go with the pod even when its netns went first."""
    backend, tunnels = FakeBackend(), FakeTunnels(connected=False)
    rec = Reconciler(backend, Resolver(netns_dir), tunnels, on_change=lambda: None)
    inv = inventory(AMBIENT)
    rec.set_desired(desired_pods(inv, "node1"))
    await rec.wait_idle()
    a, b = uid_of(inv, "shop/a"), uid_of(inv, "shop/b")
    assert backend.pinned == {a, b}

    (netns_dir / "shop.a").unlink()  # the pod is deleted: its sandbox (and netns file) first
    rec.set_desired({b: inv.pod("shop/b")})
    await rec.wait_idle()
    assert backend.pinned == {b} and ("forget", a) in backend.calls
    assert set(rec.records) == {b} and tunnels.deleted == [a]
    await rec.close()


async def test_the_start_up_sweep_forgets_the_state_of_pods_no_longer_alive(netns_dir: Path) -> None:
    backend = FakeBackend()
    pods = [
        {"name": "a", "namespace": "shop", "node": "node1", "service_account": "a", "labels": AMBIENT},
        {"name": "b", "namespace": "shop", "node": "node1", "service_account": "b"},  # alive, not enrolled
        {"name": "c", "namespace": "shop", "node": "node2", "service_account": "c", "labels": AMBIENT},
        {"name": "job", "namespace": "shop", "node": "node1", "service_account": "j", "phase": "Succeeded"},
    ]
    inv = inventory({}, pods)
    a, b, c, job = (uid_of(inv, f"shop/{name}") for name in ("a", "b", "c", "job"))
    backend.pinned = {a, b, c, job, "uid-of-a-deleted-pod"}  # left by the previous run
    rec = Reconciler(backend, Resolver(netns_dir), FakeTunnels(connected=False), on_change=lambda: None)
    rec.set_desired(desired_pods(inv, "node1"))
    rec.sweep(inv.pods, "node1")
    await rec.wait_idle()
    # b's capture is removed as a stray's; the finished job and the deleted pod are forgotten; c runs on
    # another node (whose agent owns its state: the lab's nodes share one bpffs)
    assert backend.pinned == {a, c}
    assert ("forget", job) in backend.calls and ("forget", "uid-of-a-deleted-pod") in backend.calls
    await rec.close()


class IpResolver:
    """Finds a netns by pod IP, whatever the pod's phase (the Kubernetes resolver's way of looking)."""

    def __init__(self, by_ip: dict[str, Path]) -> None:
        self.by_ip = by_ip

    def resolve(self, pod: Pod) -> str | None:
        path = self.by_ip.get(str(pod.ip))
        return str(path) if path is not None and path.exists() else None


def reused_ip_inventory(phase: str) -> Inventory:
    """Enrolled pod b holds the IP that `old` (a pod of `phase`, not enrolled) still shows."""
    inv = inventory(
        {},
        [
            {"name": "b", "namespace": "shop", "node": "node1", "service_account": "b", "labels": AMBIENT},
            {"name": "old", "namespace": "shop", "node": "node1", "service_account": "o", "phase": phase},
        ],
    )
    b, old = inv.pod("shop/b"), inv.pod("shop/old")
    return dataclasses.replace(inv, pods=(b, dataclasses.replace(old, ip=b.ip)))


def by_b_ip(inv: Inventory, netns: Path) -> IpResolver:
    return IpResolver({str(inv.pod("shop/b").ip): netns})


async def test_the_sweep_never_resolves_a_finished_pod_whose_ip_an_enrolled_pod_now_holds(netns_dir: Path) -> None:
    backend = FakeBackend()
    inv = reused_ip_inventory("Succeeded")
    rec = Reconciler(backend, by_b_ip(inv, netns_dir / "shop.b"), FakeTunnels(False), on_change=lambda: None)
    rec.set_desired(desired_pods(inv, "node1"))
    rec.sweep(inv.pods, "node1")
    await rec.wait_idle()
    assert backend.kernel == {str(netns_dir / "shop.b"): True}
    assert ("remove", "shop/old") not in backend.calls
    await rec.close()


@pytest.mark.parametrize("held", [True, False], ids=["held", "wanted"])
async def test_capture_is_never_removed_from_the_netns_of_an_enrolled_pod(
    netns_dir: Path, caplog: pytest.LogCaptureFixture, held: bool
) -> None:
    """Defence in depth: a live pod's stale IP (or any resolver mistake) leads to enrolled b's netns."""
    b_netns = netns_dir / "shop.b"
    backend = FakeBackend()
    inv = reused_ip_inventory("Running")
    rec = Reconciler(backend, by_b_ip(inv, b_netns), FakeTunnels(False), on_change=lambda: None)
    if not held:  # b is wanted but not held yet: its netns appears after its first look
        b_netns.unlink()
    rec.set_desired(desired_pods(inv, "node1"))
    await rec.wait_idle()
    if not held:
        b_netns.touch()
        backend.kernel[str(b_netns)] = True  # say an earlier run captured it
    rec.sweep(inv.pods, "node1")
    await rec.wait_idle()
    assert backend.kernel == {str(b_netns): True}
    assert ("remove", "shop/old") not in backend.calls
    assert f"{b_netns} is the network namespace of shop/b" in caplog.text
    await rec.close()


class FlakyBackend(FakeBackend):
    """Its remove() and forget() fail `failures` times (the xtables lock held, a netns being torn down)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def _flake(self, verb: str, who: str) -> None:
        if self.failures:
            self.failures -= 1
            self.calls.append((f"{verb}-failed", who))
            raise CaptureError("iptables-restore: Another app is currently holding the xtables lock")

    async def remove(self, pod: Pod, netns: str) -> bool:
        self._flake("remove", pod.key)
        return await super().remove(pod, netns)

    async def forget(self, uid: str) -> bool:
        self._flake("forget", uid)
        return await super().forget(uid)


@pytest.mark.parametrize("leftover", ["stray", "orphan"])
async def test_a_leftover_whose_removal_fails_is_retried_with_the_verify_rounds(netns_dir: Path, leftover: str) -> None:
    """A stray (alive, no longer enrolled, still captured: all its TCP refused) and an orphan (eBPF pins of a
    deleted pod) stay the reconciler's business until their removal succeeds."""
    backend = FlakyBackend(failures=2)
    only_a = [{"name": "a", "namespace": "shop", "node": "node1", "service_account": "a"}]
    inv = inventory({}, only_a if leftover == "stray" else [])  # nobody enrolled any more; the one leftover
    if leftover == "stray":
        backend.kernel[str(netns_dir / "shop.a")] = True  # captured by the previous run
    else:
        backend.pinned = {"uid-of-a-deleted-pod"}
    rec = Reconciler(backend, Resolver(netns_dir), FakeTunnels(True), on_change=lambda: None)
    rec.set_desired(desired_pods(inv, "node1"))
    rec.sweep(inv.pods, "node1")
    await rec.wait_idle()
    assert [call[0] for call in backend.calls] == [f"{'remove' if leftover == 'stray' else 'forget'}-failed"]
    for _ in range(3):
        rec.verify_all()
        await rec.wait_idle()
    assert backend.kernel == {} and backend.pinned == set()
    calls = [call for call in backend.calls if call[0] in ("remove", "forget")]
    rec.verify_all()  # removed: not tried again
    await rec.wait_idle()
    assert [call for call in backend.calls if call[0] in ("remove", "forget")] == calls
    await rec.close()


async def test_a_stray_enrolled_again_is_adopted_not_removed(netns_dir: Path) -> None:
    backend = FlakyBackend(failures=1)
    backend.kernel[str(netns_dir / "shop.a")] = True
    rec = Reconciler(backend, Resolver(netns_dir), FakeTunnels(True), on_change=lambda: None)
    only_a = [{"name": "a", "namespace": "shop", "node": "node1", "service_account": "a"}]
    inv = inventory({}, only_a)
    rec.set_desired(desired_pods(inv, "node1"))
    rec.sweep(inv.pods, "node1")
    await rec.wait_idle()
    assert backend.calls == [("remove-failed", "shop/a")]
    rec.set_desired(desired_pods(inventory(AMBIENT, only_a), "node1"))  # its namespace is labelled again
    await rec.wait_idle()
    for _ in range(2):
        rec.verify_all()
        await rec.wait_idle()
    assert backend.kernel[str(netns_dir / "shop.a")]
    assert ("remove", "shop/a") not in backend.calls
    await rec.close()


async def test_drift_repairs_and_failed_capture_operations_are_counted(netns_dir: Path) -> None:
    """By the backend's name and by operation, never by pod. Adopting a pod an earlier run captured and a pod's
    first capture are no repairs; every failed attempt counts (each verify retries it)."""
    registry = CollectorRegistry()
    backend = FlakyBackend(failures=0)
    backend.kernel[str(netns_dir / "shop.a")] = True  # complete, left by an earlier run: adopted
    metrics = AgentMetrics(registry, repair_kinds=("fake",))
    rec = Reconciler(backend, Resolver(netns_dir), FakeTunnels(True), on_change=lambda: None, metrics=metrics)

    def counted() -> dict[str, float]:
        got = registry_samples(registry)
        return {
            "repairs": got['nodeagent_agent_capture_repairs_total{kind="fake"}'],
            **{op: got[f'nodeagent_agent_capture_failures_total{{operation="{op}"}}'] for op in ("install", "remove")},
        }

    async def verify(rounds: int = 1) -> None:
        for _ in range(rounds):
            rec.verify_all()
            await rec.wait_idle()

    inv = inventory(AMBIENT)
    rec.set_desired(desired_pods(inv, "node1"))
    await rec.wait_idle()
    assert counted() == {"repairs": 0, "install": 0, "remove": 0}  # b's capture found "rules missing": its first

    backend.kernel.clear()  # something flushed both pods' rules
    await verify()
    assert counted() == {"repairs": 2, "install": 0, "remove": 0}
    await verify()  # nothing drifted since
    assert counted()["repairs"] == 2

    backend.fail = "iptables-restore: line 3 failed"
    await verify(rounds=2)
    assert counted() == {"repairs": 2, "install": 4, "remove": 0}  # two pods, two rounds
    backend.fail = None
    await verify()  # captured again: complete in the kernel, so adopted, not repaired
    assert counted() == {"repairs": 2, "install": 4, "remove": 0}

    backend.failures = 1  # the xtables lock held once
    rec.set_desired({})
    await rec.wait_idle()
    await verify()
    assert rec.records == {} and counted()["remove"] == 1
    backend.failures, backend.pinned = 1, {"uid-of-a-deleted-pod"}  # a leftover of an earlier run, as well
    rec.sweep(inv.pods, "node1")
    await rec.wait_idle()
    assert counted()["remove"] == 2
    await rec.close()


async def test_a_pod_whose_netns_was_replaced_is_captured_anew_not_counted_as_a_repair(netns_dir: Path) -> None:
    """A restarted sandbox: a new netns at the pod's path, with none of our capture. Capturing it is a first
    capture (the repair counter says "something keeps undoing capture"); the tunnel gets the new netns."""
    registry = CollectorRegistry()
    backend = FlakyBackend(failures=0)
    tunnels = FakeTunnels(True)
    metrics = AgentMetrics(registry, repair_kinds=("fake",))
    rec = Reconciler(backend, Resolver(netns_dir), tunnels, on_change=lambda: None, metrics=metrics)
    rec.set_desired(desired_pods(inventory(AMBIENT), "node1"))
    await rec.wait_idle()
    path = netns_dir / "shop.a"
    fresh = netns_dir / "fresh"
    fresh.write_text("")
    os.replace(fresh, path)  # a new inode at the same path
    backend.kernel.pop(str(path), None)
    rec.verify_all()
    await rec.wait_idle()
    assert registry_samples(registry)['nodeagent_agent_capture_repairs_total{kind="fake"}'] == 0
    assert backend.kernel[str(path)] and tunnels.added.count("shop/a") == 2
    await rec.close()


class FixedResolver:
    """Hands every pod one path (a resolver's mistake: a /proc/<pid>/ns/net whose pid was reused)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def resolve(self, pod: Pod) -> str | None:
        return self.path


async def test_the_agents_own_netns_is_never_captured_nor_handed_to_a_tunnel(
    netns_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a resolver says, the node's netns (the agent's own) is not a pod's: no capture there, no
    Add under the pod's identity, and the pod is reported as not captured."""
    resolver = FixedResolver(str(netns_dir / "shop.a"))
    backend, tunnels = FakeBackend(), FakeTunnels(connected=True)
    rec = Reconciler(backend, resolver, tunnels, on_change=lambda: None)
    inv = inventory(AMBIENT, [{"name": "a", "namespace": "shop", "node": "node1", "service_account": "a"}])
    rec.set_desired(desired_pods(inv, "node1"))
    await rec.wait_idle()
    assert tunnels.added == ["shop/a"]

    resolver.path = "/proc/self/ns/net"  # the pod's pid was reused by a process of the node
    rec.verify_all()
    await rec.wait_idle()
    assert "/proc/self/ns/net" not in backend.kernel and tunnels.added == ["shop/a"]
    assert rec.status(uid_of(inv, "shop/a")) is Status.FAILED
    assert "the agent's own network namespace" in caplog.text
    await rec.close()


async def test_a_stray_is_never_cleaned_in_the_agents_own_netns(netns_dir: Path) -> None:
    backend = FakeBackend()
    backend.kernel["/proc/self/ns/net"] = True  # stands for the node's own objects (the probe bypass's)
    rec = Reconciler(backend, FixedResolver("/proc/self/ns/net"), FakeTunnels(False), on_change=lambda: None)
    inv = inventory({})
    rec.set_desired(desired_pods(inv, "node1"))
    rec.sweep(inv.pods, "node1")
    await rec.wait_idle()
    assert backend.kernel == {"/proc/self/ns/net": True}
    assert not [call for call in backend.calls if call[0] == "remove"]
    await rec.close()


def test_inventory_file_keeps_the_last_good_inventory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Inventory] = []
    path = tmp_path / "inv.yaml"
    good = (
        "cluster: {name: lab, fabric_cidr: 10.99.0.0/24}\n"
        "nodes: [{name: node1, pod_cidr: 10.10.1.0/24, address: 10.99.0.11}]\n"
        "namespaces: [{name: shop}]\n"
        "pods: [{name: a, namespace: shop, node: node1, service_account: a}]\n"
    )
    path.write_text(good)
    watcher = InventoryFile(path, seen.append)
    assert watcher.check() and len(seen) == 1
    assert not watcher.check()  # unchanged file: not re-read
    path.write_text(good.replace("service_account: a", "colour: red"))
    assert not watcher.check()
    assert "pods[0].colour: unknown field" in caplog.text and "keeping the last good inventory" in caplog.text
    assert watcher.current is seen[0] and watcher.error is not None
    path.write_text(good.replace("pods:", "pods: [\n"))
    assert not watcher.check() and "not valid YAML" in (watcher.error or "")
    path.write_text(good)
    assert watcher.check() and watcher.error is None and len(seen) == 2


GOOD_INVENTORY = (
    "cluster: {name: lab, fabric_cidr: 10.99.0.0/24}\n"
    "nodes: [{name: node1, pod_cidr: 10.10.1.0/24, address: 10.99.0.11}]\n"
    "namespaces: [{name: shop}]\n"
    "pods: [{name: a, namespace: shop, node: node1, service_account: a}]\n"
)


async def test_inventory_file_notices_a_rewrite_at_once_without_polling(tmp_path: Path) -> None:
    """inotify: an atomic rewrite (the lab's and kubectl-like editors' way) and an in-place write are both
    picked up within milliseconds, though the poll (the safety net) would take a minute."""
    path = tmp_path / "inv.yaml"
    path.write_text(GOOD_INVENTORY)
    seen: list[Inventory] = []
    changed = asyncio.Event()

    def on_change(inventory: Inventory) -> None:
        seen.append(inventory)
        changed.set()

    watcher = InventoryFile(path, on_change, poll_s=60.0)
    task = asyncio.get_running_loop().create_task(watcher.run())
    try:
        async with asyncio.timeout(2):
            await changed.wait()  # the first read
        for i, rewrite in enumerate(("rename", "in place")):
            changed.clear()
            text = GOOD_INVENTORY.replace("service_account: a", f"service_account: sa{i}")
            if rewrite == "rename":
                tmp = tmp_path / ".inv.yaml.tmp"
                tmp.write_text(text)
                os.replace(tmp, path)
            else:
                path.write_text(text)
            async with asyncio.timeout(1):
                await changed.wait()
            assert seen[-1].pods[0].service_account == f"sa{i}"
        assert len(seen) == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_status_writer_writes_a_change_at_once_and_coalesces_bursts() -> None:
    dirty = asyncio.Event()
    writes: list[float] = []
    loop = asyncio.get_running_loop()
    task = loop.create_task(run_writer(dirty, lambda: writes.append(loop.time()), max_rest=0.05))
    try:
        dirty.set()
        async with asyncio.timeout(1):
            while not writes:  # noqa: ASYNC110 (watching the writer)
                await asyncio.sleep(0)
        first = len(writes)
        for _ in range(200):  # a burst of changes, one per turn of the loop
            dirty.set()
            await asyncio.sleep(0)
        await asyncio.sleep(0.1)
        assert first == 1 and 2 <= len(writes) <= 20  # every change is on disk in the end, in few writes
        dirty.set()
        t0 = loop.time()
        async with asyncio.timeout(1):
            while writes[-1] < t0:  # noqa: ASYNC110 (watching the writer)
                await asyncio.sleep(0.001)
        assert writes[-1] - t0 < 0.05  # a lone change after a quiet spell is not held back
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
