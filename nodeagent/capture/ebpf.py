"""The eBPF capture backend: the same verbs as the iptables one, carried out with pinned BPF programs.

Why this module exists: the agent enrolls pods through `CaptureBackend`; this adapts nodeagent.ebpf (which
knows programs, pins and links but nothing about pods) to it. For a pod it needs two kernel handles: the
pod's netns (given) and the pod's cgroup v2 directory (found by `CgroupResolver`). Everything else -
which programs, where they attach, what counts as drift - is nodeagent.ebpf's (pins.HOOKS, pins.observe).

install() is "ensure": it reads the pins and the kernel's attachments first and touches only what differs,
so a restarted agent adopts the previous run's programs without reloading or re-attaching them when they
are this build's (an upgraded agent swaps its own into the pod's links in place, and attaches a hook
the previous build did not have, as connect6 for pods enrolled before it), and a program
detached by hand is re-attached on the next verify (the agent verifies every few seconds).
There is no rule in the pod's iptables or nft tables in this mode.

The pins are kept by pod uid under /sys/fs/bpf/nodeagent/<uid>/, not in the pod's netns, so they outlive
a deleted pod unless removed: forget(uid) removes them once the netns is gone, and kept_uids() lists
them for the agent's start-up sweep of pods deleted while it was down.

Two non-BPF objects complete it, for the tunnel's connections to the app from the client's IP
(IP_TRANSPARENT): the sysctl net.ipv4.tcp_fwmark_accept=1 in the pod (the app's socket takes the mark of
the tunnel's SYN, 0x111) and the policy routing of nodeagent.capture.routing (fwmark 0x111 -> table 100,
local default route), which delivers the app's replies to the client's IP to the tunnel's socket instead
of sending them out of eth0. The iptables mode gets the same mark onto replies with connmark rules.
install() puts both in before the programs: a tunnel may already serve the pod (the agent came back in
this mode with the pod enrolled, tests/privileged/test_capture_mode_switch.py), and it marks its connections
to the app 0x111 from the moment the pod's pin directory exists; with the sysctl still 0 the app's SYN-ACK
went out of eth0 onto the fabric (measured).

What it deliberately does not do: no bcc import (loader.py has it, compiles once per process and loads a
pod's programs only when a program pin is missing or another build's), no kubelet-probe handling on the
node (that stays the iptables ProbeBypass on the node's own tables), no IPv6 capture (sk_lookup refuses
new inbound IPv6 TCP instead: nothing may reach the app around the tunnel; connect6 captures only IPv4
reached through an IPv6 socket, ::ffff:a.b.c.d, which is IPv4 on the wire).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from nodeagent.capture import routing
from nodeagent.capture.backend import CaptureError, CaptureState
from nodeagent.ebpf import loader, pins
from nodeagent.ebpf.structs import PIN_ROOT
from nodeagent.model import Pod
from nodeagent.netns import SYSCTL_NET, in_netns, net_sysctl

LAB_CGROUP_PATTERN = "nodeagent-lab/{node}/{namespace}.{name}"  # nodeagent/lab/plan.py's layout
KUBELET_CGROUPS = "kubelet"  # a --cgroup-pattern: the kubelet's layout, found by pod uid ("kubelet:DIR": under DIR)
_QOS = ("", "burstable", "besteffort")  # Guaranteed pods sit at the top of kubepods

T = TypeVar("T")
_kernel_lock = threading.Lock()  # one pod's BPF objects changed at a time (install and remove of a pod race)
FWMARK_ACCEPT = "ipv4/tcp_fwmark_accept"  # under SYSCTL_NET


def _sysctl(netns: str, value: str | None, sysctl_net: str = SYSCTL_NET) -> str:
    """Read (value None) or write tcp_fwmark_accept inside `netns` through `sysctl_net` (netns.net_sysctl);
    returns the value before."""
    try:
        return in_netns(netns, lambda: net_sysctl(FWMARK_ACCEPT, value, sysctl_net))
    except OSError as exc:  # NetnsError included
        raise CaptureError(f"net.ipv4.tcp_fwmark_accept in {netns}: {exc}") from None


def cgroup2_root() -> str | None:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, target, fstype, *_ = line.split()
            if fstype == "cgroup2":
                return target
    return None


def kubelet_cgroups(uid: str) -> tuple[str, ...]:
    """Where the kubelet puts a pod's cgroup (relative to the cgroup2 mount), for each QoS class.

    The systemd cgroup driver names slices with the uid's dashes as underscores
    (kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice); the cgroupfs driver
    (k3s's default) uses kubepods/burstable/pod<uid>. Guaranteed pods have no QoS level.
    """
    flat = uid.replace("-", "_")
    systemd = tuple(
        f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{flat}.slice"
        if qos
        else f"kubepods.slice/kubepods-pod{flat}.slice"
        for qos in _QOS
    )
    cgroupfs = tuple(f"kubepods/{qos}/pod{uid}" if qos else f"kubepods/pod{uid}" for qos in _QOS)
    return systemd + cgroupfs


@dataclass(frozen=True, slots=True)
class CgroupResolver:
    """A pod's cgroup v2 directory under the cgroup2 mount: `pattern` formatted with the pod's node,
    namespace, name and uid (default: the lab's layout), or, for `kubelet` (or `kubelet:DIR`, a kubelet
    run with --cgroup-root=DIR), the kubelet's directory of the pod's uid, whichever cgroup driver and QoS
    class made it."""

    pattern: str = LAB_CGROUP_PATTERN
    root: str | None = None

    def path(self, pod: Pod) -> str:
        root = self.root or cgroup2_root()
        if root is None:
            raise CaptureError("no cgroup v2 hierarchy is mounted: eBPF capture attaches to pods' cgroups")
        kind, _, kubelet_root = self.pattern.partition(":")
        if kind != KUBELET_CGROUPS:
            relative = self.pattern.format(node=pod.node, namespace=pod.namespace, name=pod.name, uid=pod.uid)
            return os.path.join(root, relative)
        base = os.path.join(root, kubelet_root.strip("/"))
        candidates = [os.path.join(base, rel) for rel in kubelet_cgroups(pod.uid)]
        found = next((path for path in candidates if os.path.isdir(path)), None)
        if found is None:
            raise CaptureError(
                f"pod {pod.key}: no cgroup of uid {pod.uid} where the kubelet puts them ({candidates[1]}, "
                f"{candidates[4]} and the other QoS classes); for a kubelet run with --cgroup-root=DIR use "
                "--cgroup-pattern kubelet:DIR"
            )
        return found


class EbpfBackend:
    """In-pod capture with cgroup connect4/connect6 + sock_ops (outbound) and netns sk_lookup (inbound)."""

    name = "ebpf"

    def __init__(
        self, cgroups: CgroupResolver | None = None, pin_root: str = PIN_ROOT, sysctl_net: str = SYSCTL_NET
    ) -> None:
        self.cgroups = cgroups or CgroupResolver()
        self.pin_root = pin_root
        self.sysctl_net = sysctl_net
        self._pods: dict[str, Pod] = {}  # netns path -> pod, for inspect(netns)

    def _config(self, pod: Pod) -> loader.PodConfig:
        if pod.ip is not None and pod.ip.version != 4:
            raise CaptureError(f"pod {pod.key}: eBPF capture handles IPv4 pods only (got {pod.ip})")
        return loader.PodConfig(pod.uid, pod.ip, pin_root=self.pin_root)

    async def install(self, pod: Pod, netns: str) -> tuple[str, ...]:
        self._pods[netns] = pod
        config = self._config(pod)

        def work() -> tuple[str, ...]:  # in a thread: the cgroup lookup stats directories too
            cgroup = self.cgroups.path(pod)
            if not os.path.isdir(cgroup):
                raise CaptureError(f"pod {pod.key}: its cgroup {cgroup} does not exist (wrong --cgroup-pattern?)")
            # The replies' path first, then the programs (see the module docstring: a serving tunnel uses the
            # bypass mark as soon as the pin directory exists).
            sysctl_was = _sysctl(netns, "1", self.sysctl_net)
            routes = routing.ensure(netns)
            with _kernel_lock:
                repaired = loader.ensure(config, cgroup, netns)
            if sysctl_was != "1":
                repaired += ("net.ipv4.tcp_fwmark_accept was 0: set it to 1",)
            return repaired + routes

        return await _kernel_work(f"pod {pod.key}", work)

    async def remove(self, pod: Pod, netns: str) -> bool:
        self._pods.pop(netns, None)

        def work() -> bool:
            removed = self._unpin(pod.uid)
            if os.path.exists(netns):
                removed = _sysctl(netns, "0", self.sysctl_net) == "1" or removed
                removed = routing.remove(netns) or removed
            return removed

        return await _kernel_work(f"pod {pod.key}", work)

    async def forget(self, uid: str) -> bool:
        """Detach and unpin the programs of a pod whose netns is gone (the sysctl and routing went with it)."""
        self._pods = {netns: pod for netns, pod in self._pods.items() if pod.uid != uid}
        return await _kernel_work(f"pod uid {uid}", lambda: self._unpin(uid))

    def _unpin(self, uid: str) -> bool:
        with _kernel_lock:
            return loader.remove(uid, self.pin_root)

    def kept_uids(self) -> tuple[str, ...]:
        return pins.pinned_uids(self.pin_root)

    async def inspect_pod(self, pod: Pod, netns: str) -> CaptureState:
        def work() -> CaptureState:
            observed = pins.observe(pod.uid, self.cgroups.path(pod), netns, self.pin_root)
            routes = routing.read(netns)
            fwmark = _sysctl(netns, None, self.sysctl_net) == "1"
            objects = observed.objects()
            if not observed.present:  # no BPF object of ours: not captured (any routing left is listed)
                return CaptureState(self.name, routes.objects(), observed.drift())
            extra = ("sysctl net.ipv4.tcp_fwmark_accept=1",) if fwmark else ()
            drift = () if fwmark else ("net.ipv4.tcp_fwmark_accept is 0 (replies to the client's IP would leave)",)
            return CaptureState(
                self.name, (*objects, *routes.objects(), *extra), (*observed.drift(), *routes.drift(), *drift)
            )

        try:
            return await asyncio.to_thread(work)
        except OSError as exc:
            raise CaptureError(f"pod {pod.key}: reading its BPF objects failed: {exc}") from None

    async def inspect(self, netns: str) -> CaptureState:
        pod = self._pods.get(netns)
        if pod is None:
            raise CaptureError(f"no pod known for {netns}: eBPF state is per pod (use inspect_pod)")
        return await self.inspect_pod(pod, netns)

    async def verify(self, netns: str) -> tuple[str, ...]:
        return (await self.inspect(netns)).drift


async def _kernel_work(who: str, work: Callable[[], T]) -> T:
    """`work` on a worker thread (bpf(2), netns entry and file system calls block), its kernel errors as
    CaptureError naming `who`."""
    try:
        return await asyncio.to_thread(work)
    except (loader.EbpfUnavailable, OSError) as exc:
        raise CaptureError(f"{who}: {exc}") from None


def unavailable_reason() -> str | None:
    """Why eBPF capture cannot run here (mounting bpffs when it is only unmounted), or None when it can.

    "Can" includes compiling the programs, which is done here, once: a kernel whose headers do not build
    them is found at start (auto falls back to iptables) rather than at the first pod, and no pod waits
    for the compile.
    """
    try:
        loader.check_environment()
        loader.compiled(loader.BuildConfig())
    except loader.EbpfUnavailable as exc:
        return str(exc)
    return None
