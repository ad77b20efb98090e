"""`make bench` / `make bench-quick`: one command, one run, every path that exists, ratios.

Why this shape: the machine is shared and noisy, so absolute numbers drift between runs. Every path is
measured in the same run, interleaved round by round, and each figure is reported as a median with its
spread and as a ratio to direct TCP and to stunnel (a C mTLS tunnel a user could pick instead). Every
number comes from the named tool's own output (iperf3 JSON, sockperf percentiles, /proc).

Paths that do not exist yet are listed in the report as absent, never estimated. The tunnels run with
their same-node fast path off (nodeagent.ztunnel.local), so "same-node" paths measure HBONE through the
tunnel to itself; the eBPF phase then restarts node1's tunnel with it on for "same-node fast path".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import kube_bench, report, tools
from bench.ca_bench import certificates_per_second, manager_memory
from bench.paths import (
    ABSENT_PATHS,
    MESH,
    BenchLab,
    DirectPath,
    MeasuredPath,
    MeshPath,
    StunnelPath,
    raise_fd_limit,
    running_mesh,
    start_servers,
)
from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, exclusive
from nodeagent.labmesh import Mesh
from nodeagent.model import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL
from nodeagent.ztunnel.commands import FAST_PATH_ENV

SCALE_TOPOLOGY = DEFAULT_TOPOLOGY.parent / "scale-50.yaml"

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCHEMA_VERSION = 1


@dataclass
class Plan:
    rounds: int
    seconds: float  # per iperf3/sockperf run
    connrate_seconds: float
    idle_counts: tuple[int, ...]
    lab_repeats: int
    scale_lab: bool
    pod_adds: int
    many_pods: int | None
    ca_seconds: float
    quick: bool


QUICK = Plan(
    rounds=1,
    seconds=1,
    connrate_seconds=1,
    idle_counts=(1000,),
    lab_repeats=1,
    scale_lab=False,
    pod_adds=5,
    many_pods=None,
    ca_seconds=2,
    quick=True,
)
FULL = Plan(
    rounds=3,
    seconds=5,
    connrate_seconds=4,
    idle_counts=(1000, 10000),
    lab_repeats=3,
    scale_lab=True,
    pod_adds=20,
    many_pods=200,
    ca_seconds=5,
    quick=False,
)


@dataclass
class Results:
    figures: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # figure -> path -> samples
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, path: str, value: float) -> None:
        self.figures.setdefault(figure, {}).setdefault(path, []).append(value)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    openssl = subprocess.run(["openssl", "version"], check=False, capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": openssl,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "hostname": platform.node(),
    }


def measure_lab(plan: Plan, res: Results) -> None:
    topologies = [("default topology (2 nodes, 4 pods)", DEFAULT_TOPOLOGY)]
    if plan.scale_lab:
        topologies.append(("50 pods on 2 nodes", SCALE_TOPOLOGY))
    for _ in range(plan.lab_repeats):
        for label, topology in topologies:
            with BenchLab.fresh(topology) as lab:
                res.add("lab_up_seconds", label, lab.up_seconds)
            res.add("lab_down_seconds", label, lab.down_seconds)


def measure_paths(plan: Plan, res: Results, lab: BenchLab, paths: list[MeasuredPath]) -> None:
    for rnd in range(plan.rounds):
        for path in paths:
            log(f"round {rnd + 1}/{plan.rounds}: {path.name}")
            for streams in (1, 4):
                tp, cpu = path.iperf3(lab, streams, plan.seconds)
                res.add(f"throughput_gbps_{streams}_stream", path.name, tp.bits_per_second / 1e9)
                if streams == 1 and cpu is not None:
                    res.add("tunnel_cpu_seconds_per_gb", path.name, cpu / (tp.bytes / 1e9))
            for size in (64, 1024):
                lat = path.sockperf(lab, size, plan.seconds)
                res.add(f"latency_p50_us_{size}b", path.name, lat.p50)
                res.add(f"latency_p99_us_{size}b", path.name, lat.p99)
                res.add(f"latency_p999_us_{size}b", path.name, lat.p999)
            rate = path.connrate(lab, plan.connrate_seconds)
            res.add("new_connections_per_second", path.name, float(rate["per_second"]))
            res.add("connect_p99_ms", path.name, float(rate["p99_ms"]))
            if rate["proxy_cpu_us"] is not None:
                res.add("proxy_cpu_us_per_connection", path.name, float(rate["proxy_cpu_us"]))
            if rate["errors"]:
                res.notes.append(f"{path.name}: connection errors during connrate: {rate['errors']}")
    for path in paths:
        for count in plan.idle_counts:
            try:
                per_conn = path.idle_memory(lab, count)
            except RuntimeError as exc:  # a path that cannot hold that many connections: say so, go on
                res.notes.append(f"{path.name}: could not hold {count} idle connections: {str(exc)[-300:]}")
                continue
            if per_conn is not None:
                res.add(f"memory_bytes_per_idle_connection_{count}", path.name, per_conn)


def measure_lab_paths(plan: Plan, res: Results, lab: BenchLab, paths: list[MeasuredPath]) -> None:
    for server in sorted({path.server for path in paths}):
        start_servers(lab, server)
    with contextlib.ExitStack() as stack:
        for path in paths:
            stack.enter_context(path.setup(lab))
        measure_paths(plan, res, lab, paths)


def measure_pod_ready(plan: Plan, res: Results, mesh: Mesh, capture: str = "iptables") -> None:
    """Opt spare pods in one at a time (pod label): inventory written -> the agent reports `enabled`
    (capture installed and the tunnel's ack, which it sends once the pod's listeners are bound).

    The node is quiet by then: the idle-memory phase before returns only once the tunnels have closed its
    connections (paths.wait_torn_down), so this times pod adds, not a tunnel busy closing 10 000 of them."""
    spares = [p.key for p in mesh.lab.inventory.pods if p.name.startswith("spare-")][: plan.pod_adds]
    for key in spares:
        namespace, name = key.split("/")

        def opt_in(data: dict[str, Any], namespace: str = namespace, name: str = name) -> None:
            for pod in data["pods"]:
                if pod["namespace"] == namespace and pod["name"] == name:
                    pod.setdefault("labels", {})[DATAPLANE_MODE_LABEL] = DATAPLANE_MODE_AMBIENT

        t0 = time.perf_counter()
        mesh.edit_inventory(opt_in)
        mesh.wait(f"{key} to be enabled", lambda key=key: mesh.pod_status(key) == "enabled", 30, interval=0.002)
        res.add("pod_ready_ms", f"nodeagent ({capture} capture), cross-node", (time.perf_counter() - t0) * 1e3)
    for node in mesh.nodes:
        res.add(
            "agent_rss_mb",
            f"{node}, {len(mesh.lab.inventory.pods_on(node))} pods in the lab"
            + ("" if capture == "iptables" else f", {capture} capture"),
            tools.rss_bytes(mesh.agent(node).pid) / 2**20,
        )


def many_pods_topology(pods: int) -> str:
    lines = [
        "cluster: {name: many, trust_domain: cluster.local, fabric_cidr: 10.99.0.0/24}",
        "nodes:",
        "  - {name: node1, pod_cidr: 10.10.0.0/16, address: 10.99.0.11, token: many-node1-5c0e2a9f7b3d1e64}",
        "namespaces:",
        "  - {name: many}",
        "pods:",
    ]
    lines += [
        f"  - {{name: pod-{i:03d}, namespace: many, node: node1, service_account: sa-{i % 10}}}" for i in range(pods)
    ]
    return "\n".join(lines) + "\n"


def measure_many_pods(pods: int, res: Results, capture: str = "iptables") -> None:
    """Label a namespace of `pods` pods on one node: time until every one is enabled; agent RSS then."""
    suffix = "" if capture == "iptables" else f", {capture} capture"
    label = f"{pods} pods on one node{suffix}"
    with tempfile.TemporaryDirectory(prefix="nodeagent-bench-many-") as tmp:
        topology = Path(tmp) / "topology.yaml"
        topology.write_text(many_pods_topology(pods))
        with BenchLab.fresh(topology) as lab, running_mesh(lab, Path(tmp) / "mesh", capture, enroll=False) as mesh:
            t0 = time.perf_counter()
            mesh.enroll("many")
            keys = [p.key for p in lab.inventory.pods]
            mesh.wait(f"{pods} pods to be enabled", lambda: all(mesh.pod_status(k) == "enabled" for k in keys), 120)
            res.add("many_pods_enrolled_seconds", label, time.perf_counter() - t0)
            rss = tools.rss_bytes(mesh.agent("node1").pid) / 2**20
            res.add("agent_rss_mb", f"node1, {pods} pods enrolled{suffix}", rss)


def measure_ca(plan: Plan, res: Results) -> None:
    res.add("ca_certificates_per_second", "nodeagent ca (gRPC, loopback)", certificates_per_second(plan.ca_seconds))
    mem = manager_memory(1000)
    res.add("cert_manager_rss_mb_1000_identities", "process total", mem["rss_bytes"] / 2**20)
    res.add("cert_manager_rss_mb_1000_identities", "growth for 1000 identities", mem["growth_bytes"] / 2**20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a subset in under 2 minutes")
    group.add_argument("--full", action="store_true", help="every figure, 3 interleaved rounds (default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if os.geteuid() != 0:
        print("bench: needs root for the lab (network namespaces): sudo make bench", file=sys.stderr)
        return 2
    for tool in ("iperf3", "sockperf", "stunnel4"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing: run sudo make setup", file=sys.stderr)
            return 2

    with exclusive():  # one lab per host: wait for privileged tests or a demo using it
        return run(plan, args.out)


def run(plan: Plan, out: Path) -> int:
    started = time.time()
    os.environ[FAST_PATH_ENV] = "off"  # inherited by the mesh's tunnels; see the module docstring
    res = Results()
    files, lower = raise_fd_limit()  # inherited by every process of the run: the same limit for every path
    res.notes.append(f"open-files limit of every process of the run: {files}" + (f" ({lower})" if lower else ""))
    log("lab up/down timings")
    measure_lab(plan, res)
    log("CA certificates per second")
    measure_ca(plan, res)
    with (
        BenchLab.fresh() as lab,
        tempfile.TemporaryDirectory(prefix="nodeagent-bench-") as tmp,
        running_mesh(lab, Path(tmp) / "mesh") as mesh,
    ):
        paths: list[MeasuredPath] = [
            DirectPath(same_node=False),
            StunnelPath(Path(tmp)),
            MeshPath(mesh, same_node=False),
            DirectPath(same_node=True),
            MeshPath(mesh, same_node=True),
        ]
        measure_lab_paths(plan, res, lab, paths)
        log("pod add -> capture and listeners ready")
        measure_pod_ready(plan, res, mesh)
    # An agent has one capture backend per node, so eBPF capture runs in a second lab of its own; its two
    # paths are interleaved with each other and compared with the first lab's references.
    with (
        BenchLab.fresh() as lab,
        tempfile.TemporaryDirectory(prefix="nodeagent-bench-") as tmp,
        running_mesh(lab, Path(tmp) / "mesh", capture="ebpf") as mesh,
    ):
        ebpf_paths: list[MeasuredPath] = [
            MeshPath(mesh, same_node=False, capture="ebpf"),
            MeshPath(mesh, same_node=True, capture="ebpf"),
        ]
        measure_lab_paths(plan, res, lab, ebpf_paths)
        log("pod add -> capture and listeners ready (eBPF capture)")
        measure_pod_ready(plan, res, mesh, capture="ebpf")
        log("node1's tunnel restarted with the same-node fast path")
        os.environ[FAST_PATH_ENV] = "on"
        mesh.restart_tunnel("node1", signal.SIGTERM)
        mesh.wait_enabled(MESH)
        fast_path: list[MeasuredPath] = [MeshPath(mesh, same_node=True, capture="ebpf", fast_path=True)]
        measure_paths(plan, res, lab, fast_path)  # the servers of the same-node path already run
        ebpf_paths += fast_path
        paths += ebpf_paths
    if plan.many_pods:
        log(f"{plan.many_pods} pods on one node")
        measure_many_pods(plan.many_pods, res)
        log(f"{plan.many_pods} pods on one node, eBPF capture")
        measure_many_pods(plan.many_pods, res, capture="ebpf")
    scale = kube_bench.QUICK if plan.quick else kube_bench.FULL  # quick: a smaller cluster, so labelled
    log(f"Kubernetes mode against the API-server stand-in: {scale.label}")
    kube_bench.record(res, scale, kube_bench.measure(scale))

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "started_utc": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "duration_seconds": round(time.time() - started, 1),
        "mode": "quick" if plan.quick else "full",
        "machine": machine(),
        "plan": {k: v for k, v in plan.__dict__.items()},
        "paths": {p.name: p.describe() for p in paths},
        "absent_paths": ABSENT_PATHS,
        "figures": {
            fig: {path: {**tools.spread(v).__dict__, "values": v} for path, v in by_path.items()}
            for fig, by_path in res.figures.items()
        },
        "notes": res.notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    md_path = report.write(doc, out, stamp)
    log(f"wrote {json_path} and {md_path}")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
