"""`nodeagent inspect redirects`: each pod's capture as the KERNEL has it, next to the agent's status.

Why this module exists: istio#61182 is an annotation saying "enabled" over a pod with no rules. So this
view never asks the agent what it did: for each pod of a node it runs iptables-save and reads the policy
routing inside the pod's netns, runs `ss -H -tlnp` there to see whether the tunnel's listeners
(15001/15006/15008) exist, and reads the node's kubelet-probe chain; only the STATUS column comes from
the agent's status file. `verify` turns the rows into sentences about what is broken.

Where the pods come from: the local inventory (the lab), or in Kubernetes mode the API server
(`kube_inventory`: the named nodes' pods by field selector, and the namespaces that decide enrollment).
Either way only the list of pods comes from there; each pod's netns is found on this machine (the lab's
name pattern, or by pod IP with agent/kube_netns.py as the agent in Kubernetes mode does) and everything
about capture is read from the kernel.

What it deliberately does not do: no changes to the kernel (read-only), no traffic generation (the
capture check compares the exact rules and routes instead of sending a probe connection), no remote
kernels (it reads the kernel of the machine it runs on: run it on the node, or in the agent's pod).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.agent.enrollment import desired_pods
from nodeagent.agent.netns_resolver import DirectoryNetnsResolver, NetnsResolver, node_netns_path
from nodeagent.agent.status import agent_alive, read_status, status_path
from nodeagent.capture.backend import CaptureError
from nodeagent.capture.ebpf import LAB_CGROUP_PATTERN, CgroupResolver, EbpfBackend
from nodeagent.capture.iptables import Flavour, Iptables, IptablesBackend, ProbeBypass, detect_flavour, run_command
from nodeagent.capture.rules import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from nodeagent.ebpf import pins
from nodeagent.ebpf.structs import PIN_ROOT
from nodeagent.inventory import translate
from nodeagent.model import DEFAULT_EXCLUDED_NAMESPACES, Inventory, Pod

TUNNEL_PORTS = (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT)
_PORT_ROLE = {
    OUTBOUND_PORT: "outbound",
    INBOUND_PLAINTEXT_PORT: "inbound plaintext",
    INBOUND_HBONE_PORT: "inbound HBONE",
}


@dataclass
class RedirectRow:
    node: str
    namespace: str
    pod: str
    ip: str
    mode: str  # ambient (iptables capture) | ebpf (eBPF capture) | none | hostNetwork
    status: str  # from the agent's status file; "-" when it has none
    rules: str  # ok | none | drift | gone | error
    listeners: list[int]
    drift: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # filled by verify()
    # Capture of the other mode (iptables <-> eBPF) that an earlier run of the agent left: harmless on an
    # enrolled pod (both modes agree; capture_modes.py), removed when it is unenrolled; a leftover otherwise.
    other_mode: list[str] = field(default_factory=list)


@dataclass
class NodeReport:
    node: str
    agent: str  # running | not running | no status file
    iptables: str
    probe_bypass: list[str]
    probe_drift: list[str]
    problems: list[str] = field(default_factory=list)


@dataclass
class Redirects:
    rows: list[RedirectRow]
    nodes: list[NodeReport]

    def as_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "nodes": [asdict(n) for n in self.nodes]}


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the pods' and nodes' network namespaces are (default: the lab's naming)."""

    netns_dir: str = "/var/run/netns"
    pod_pattern: str = "na-{node}.{namespace}.{name}"
    node_pattern: str = "na-{node}"
    state_dir: Path = Path("/run/nodeagent/agent")
    pin_root: str = PIN_ROOT  # eBPF pins, one directory per pod uid


def kube_inventory(api: Any, nodes: list[str], *, trust_domain: str = "cluster.local") -> tuple[Inventory, list[str]]:
    """The pods of `nodes` and every namespace, listed from the API server (`api`: a kubernetes ApiClient).

    Returns the inventory and the objects left out (a line each: what could not be translated). API errors
    propagate (kubernetes ApiException, urllib3 errors); inventory/kube.describe words them.
    """
    import kubernetes.client  # here: the file mode's CLI does not pay for importing the client

    core = kubernetes.client.CoreV1Api(api)
    skipped: list[str] = []

    def items(resp: Any) -> list[Any]:
        try:
            doc = json.loads(resp.data)
        finally:
            resp.release_conn()
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
            raise ValueError(f"a list response without items (got {str(doc)[:80]!r})")
        return list(doc["items"])

    def translated(objects: list[Any], convert: Any) -> list[Any]:
        out = []
        for obj in objects:
            try:
                out.append(convert(obj))
            except translate.TranslateError as exc:
                skipped.append(str(exc))
        return out

    namespaces = translated(items(core.list_namespace(_preload_content=False)), translate.namespace)
    pods = []
    for node in nodes:
        listed = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}", _preload_content=False)
        pods += translated(items(listed), translate.pod)
    inventory = translate.inventory(pods=pods, namespaces=namespaces, nodes=nodes, trust_domain=trust_domain)
    return inventory, skipped


async def collect(
    inventory: Inventory, nodes: list[str], layout: Layout, resolver: NetnsResolver | None = None
) -> Redirects:
    """Rows for the pods of `nodes`; `resolver` finds their netns (default: `layout`'s name pattern)."""
    rows: list[RedirectRow] = []
    reports: list[NodeReport] = []
    for node in nodes:
        node_rows, report = await _collect_node(inventory, node, layout, resolver)
        rows += node_rows
        reports.append(report)
    return Redirects(rows, reports)


async def _collect_node(
    inventory: Inventory, node: str, layout: Layout, resolver: NetnsResolver | None
) -> tuple[list[RedirectRow], NodeReport]:
    status = read_status(status_path(layout.state_dir, node))
    node_netns = node_netns_path(node, layout.netns_dir, layout.node_pattern)
    if status is not None and status.get("iptables") in {f.value for f in Flavour}:
        flavour = Flavour(status["iptables"])
    else:
        flavour = await asyncio.to_thread(_detect, node_netns)
    iptables = Iptables(flavour)
    backend = IptablesBackend.for_host(flavour)
    ebpf = None  # eBPF capture: the pod's programs read from the kernel, its cgroup found as the agent finds it
    if status is not None and status.get("capture") == "ebpf":
        ebpf = EbpfBackend(CgroupResolver(str(status.get("cgroup_pattern") or LAB_CGROUP_PATTERN)))
    pattern = DirectoryNetnsResolver(layout.netns_dir, layout.pod_pattern)
    netns_of = resolver or pattern
    enrolled = desired_pods(inventory, node, DEFAULT_EXCLUDED_NAMESPACES)
    agent_pods: dict[str, Any] = (status or {}).get("pods", {})
    alive = status is not None and agent_alive(status)
    pinned = set(pins.pinned_uids(layout.pin_root)) if ebpf is None else set()

    async def other_mode(pod: Pod, netns: str) -> list[str]:
        """What the mode the agent does not use holds for `pod`, looked for as BothModes looks: the pin
        directory, or the iptables rules alone (the policy routing is both modes')."""
        if ebpf is None:
            return [f"eBPF pins under {layout.pin_root}/{pod.uid}"] if pod.uid in pinned else []
        try:
            rules = await backend.rules(netns)
        except CaptureError:  # the mode in use decides the row (and reports an unreadable netns itself)
            return []
        return [f"iptables: {line}" for line in rules]

    async def row(pod: Pod) -> RedirectRow:
        mode = "hostNetwork" if pod.host_network else ("ambient" if pod.uid in enrolled else "none")
        if mode == "ambient" and ebpf is not None:
            mode = "ebpf"
        recorded = agent_pods.get(pod.uid, {}).get("status", "-")
        if recorded != "-" and not alive:
            recorded = f"{recorded} (agent down)"
        r = RedirectRow(node, pod.namespace, pod.name, str(pod.ip or ""), mode, recorded, "-", [])
        if pod.host_network:
            return r
        netns = netns_of.resolve(pod)
        if netns is None:
            r.rules = "gone"
            where = f"at {pattern.path(pod)}" if resolver is None else f"holds IP {pod.ip or '(none yet)'}"
            r.drift = [f"no network namespace {where}"]
            return r
        try:
            inspected = ebpf.inspect_pod(pod, netns) if ebpf is not None else backend.inspect(netns)
            state, listeners, r.other_mode = await asyncio.gather(inspected, _listeners(netns), other_mode(pod, netns))
        except CaptureError as exc:
            r.rules, r.drift = "error", [str(exc)]
            return r
        r.objects, r.listeners = list(state.objects), listeners
        r.rules = "ok" if state.complete else ("none" if not state.present else "drift")
        r.drift = list(state.drift) if state.present else []
        return r

    pods = inventory.pods_on(node)
    rows = list(await asyncio.gather(*(row(p) for p in pods)))
    present = {(r.namespace, r.pod) for r in rows if r.rules != "gone"}
    captured = {
        p.key: p.ip for p in pods if p.uid in enrolled and p.ip is not None and (p.namespace, p.name) in present
    }
    probe = ProbeBypass(iptables, node_netns)
    try:
        probe_state = await probe.inspect(captured)
        probe_objects, probe_drift = list(probe_state.objects), list(probe_state.drift)
    except CaptureError as exc:
        probe_objects, probe_drift = [], [str(exc)]
    agent = "no status file" if status is None else ("running" if alive else "not running")
    return rows, NodeReport(node, agent, flavour.value, probe_objects, probe_drift)


def _detect(node_netns: str) -> Flavour:
    return detect_flavour(node_netns if os.path.exists(node_netns) else None)


async def _listeners(netns: str) -> list[int]:
    done = await run_command(["ss", "-H", "-tln"], netns)
    if done.returncode != 0:
        raise CaptureError(f"`ss -H -tln` in {netns} failed: {done.stderr.strip()}")
    ports = set()
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            port = fields[3].rpartition(":")[2]
            if port.isdigit() and int(port) in TUNNEL_PORTS:
                ports.add(int(port))
    return sorted(ports)


def verify(report: Redirects) -> int:
    """Fill in `problems` for every row and node; returns how many problems there are."""
    total = 0
    for r in report.rows:
        if r.mode in ("ambient", "ebpf"):
            if r.rules == "none":
                what = "no BPF programs pinned and attached" if r.mode == "ebpf" else "no rules or routes in its netns"
                r.problems.append(f"enrolled but not captured: {what}")
            elif r.rules in ("drift", "gone", "error"):
                r.problems += [f"capture is incomplete: {d}" for d in r.drift]
            missing = [p for p in TUNNEL_PORTS if p not in r.listeners]
            if missing and r.rules != "gone":
                ports = ", ".join(f"{p} ({_PORT_ROLE[p]})" for p in missing)
                r.problems.append(
                    f"nothing listens on {ports}: captured connections are refused until a tunnel serves the pod"
                )
            if r.status.startswith("enabled") and (r.rules != "ok" or missing):
                r.problems.append("the status says enabled but the kernel disagrees (see above)")
            if r.status == "-":
                r.problems.append("the agent has not recorded this pod (is `nodeagent agent` running for its node?)")
        elif r.mode == "none" and (r.objects or r.other_mode):
            r.problems.append("not enrolled, yet its netns holds nodeagent capture (a leftover): restart the agent")
        total += len(r.problems)
    for n in report.nodes:
        if n.agent != "running":
            n.problems.append(_agent_down(n, [r for r in report.rows if r.node == n.node]))
        n.problems += [f"kubelet-probe bypass: {d}" for d in n.probe_drift]
        total += len(n.problems)
    return total


def _agent_down(node: NodeReport, rows: list[RedirectRow]) -> str:
    """The node's agent is not running: what that means for its pods, as their rows show it (capture an
    earlier run installed stays in the kernel; on a node where nothing was ever captured, there is none)."""
    what = "is not running" if node.agent == "not running" else "has never run here (no status file)"
    if any(r.rules in ("ok", "drift") or r.objects for r in rows):
        return f"the node agent {what}: capture stays, but nothing repairs drift or serves new pods"
    return f"the node agent {what}: no pod of this node is captured, and none will be until it runs"
