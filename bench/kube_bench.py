"""Kubernetes mode at cluster scale, against the API-server stand-in (issue 8's performance item).

What it measures, in one lab (the default topology: 2 nodes, 4 pods) whose mesh runs in Kubernetes
mode (`nodeagent agent --kubernetes`, `nodeagent tunnel --kubernetes`, real processes in the node
namespaces, as tests/privileged/test_kube_mode.py runs them) against tests/kube_standin.py holding a
cluster of PODS pods on NODES nodes and SERVICES services — the lab's own pods plus synthetic ones
(every node, node1 and node2 included, carries PODS/NODES pods; the synthetic namespaces are not
enrolled):

- initial sync, per process, from its spawn (interpreter start included) to:
  - agent: its first inventory hand-over — every list done (its node's pods by field selector, every
    namespace) and the model built: the agent's `inventory loaded` log line; also from the start of its
    run loop (the first list request) to that line, i.e. without interpreter start, imports and capture
    detection, which dominate on a loaded 2-CPU machine (times from the log lines' own timestamps);
  - tunnel: ready (/healthz/ready 200) — it lists every pod, namespace and service of the cluster and
    builds the model before serving, then fetches its certificates;
- RSS of node1's agent and tunnel right after the sync (and the agent's again at the end);
- label change -> pod ready: the namespace label is PATCHed through the API (the `kubernetes` client,
  what `nodeagent enroll` sends); for every pod of the namespace, the time until the stand-in holds
  its `ambient.istio.io/redirection: enabled` annotation — written by the agent through pods/status only
  once capture is kernel-verified and the tunnel acked the pod. Then the label is removed, the
  annotations must go, and the cycle repeats.

What it deliberately does not do: no traffic (the mesh paths are measured in bench/run.py), no claims
about a real API server's latency (the stand-in answers from memory on loopback/veth).

Run alone: `sudo .venv/bin/python -m bench.kube_bench [--pods 5000 --services 1000 --cycles 5]`.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kubernetes.client

from bench import tools
from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, exclusive, teardown
from nodeagent.labmesh import Mesh
from nodeagent.model import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL
from tests.kube_standin import KubeStandIn, namespace, pod, service

ANNOTATION = "ambient.istio.io/redirection"
ENROLLED_NAMESPACE = "shop"  # the default topology's: 3 pods on 2 nodes
INVENTORY_LOADED = re.compile(rb"inventory loaded: \d+ pods on ")
LISTING = re.compile(rb"waiting for a valid inventory from the API server")  # the agent's run() begins
SYNTHETIC_NAMESPACES = 100
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Scale:
    pods: int
    services: int
    nodes: int
    cycles: int

    @property
    def label(self) -> str:
        return f"{self.pods} pods / {self.services} services / {self.nodes} nodes"


FULL = Scale(pods=5000, services=1000, nodes=50, cycles=5)
QUICK = Scale(pods=1000, services=200, nodes=10, cycles=2)


@dataclass
class KubeFigures:
    agent_sync_s: float  # spawn -> model built
    agent_lists_s: float  # first list -> model built (no interpreter start, imports, capture detection)
    tunnel_ready_s: float
    agent_rss_after_sync: int
    tunnel_rss_after_sync: int
    agent_rss_end: int
    ready_ms: list[float]


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def populate(api: KubeStandIn, lab: Lab, scale: Scale) -> None:
    """The lab's namespaces (unlabelled), pods and services, then synthetic ones up to `scale`."""
    inv = lab.inventory
    for ns in inv.namespaces:
        api.apply(namespace(ns.name, {k: v for k, v in ns.labels.items() if k != DATAPLANE_MODE_LABEL}))
    for p in inv.pods:
        assert p.ip is not None
        labels = dict(p.labels)
        api.apply(pod(p.name, p.namespace, p.node, str(p.ip), sa=p.service_account, labels=labels, uid=p.uid))
    for s in inv.services:
        api.apply(service(s.name, s.namespace, dict(s.selector), [(sp.port, sp.target_port) for sp in s.ports]))
    nodes = [n.name for n in inv.nodes]
    nodes += [f"node{i}" for i in range(len(nodes) + 1, scale.nodes + 1)]
    per_node = scale.pods // scale.nodes
    synthetic = ipaddress.IPv4Network("10.128.0.0/10").hosts()  # no overlap with the lab's 10.10/16
    for ns_i in range(SYNTHETIC_NAMESPACES):
        api.apply(namespace(f"bench-{ns_i:03d}"))
    made = 0
    for node in nodes:
        fill = per_node - len(inv.pods_on(node)) if node in {n.name for n in inv.nodes} else per_node
        for _ in range(max(0, fill)):
            ns = f"bench-{made % SYNTHETIC_NAMESPACES:03d}"
            app = f"app-{made % (scale.services or 1)}"
            api.apply(pod(f"pod-{made:05d}", ns, node, str(next(synthetic)), sa=f"sa-{made % 7}", labels={"app": app}))
            made += 1
    for s_i in range(scale.services - len(inv.services)):
        ns = f"bench-{s_i % SYNTHETIC_NAMESPACES:03d}"
        api.apply(
            service(
                f"svc-{s_i:04d}",
                ns,
                {"app": f"app-{s_i}"},
                [(80, 8080)],
                cluster_ip=f"10.96.{s_i // 250}.{s_i % 250 + 1}",
            )
        )
    log(f"stand-in holds {len(api.objects('Pod'))} pods, {len(api.objects('Service'))} services")


def logged_at(path: Path, pattern: re.Pattern[bytes], timeout: float) -> float:
    """The wall-clock time of the first log line matching `pattern`, from the line's own timestamp (the
    processes log `%(asctime)s`: local time, ms), so a line written before the first look counts exactly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in path.read_bytes().splitlines():
                if pattern.search(line):
                    stamp, _, millis = line[:23].decode().partition(",")
                    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1e3
        time.sleep(0.05)
    raise RuntimeError(f"no {pattern.pattern!r} in {path} within {timeout} s:\n{path.read_text()[-2000:]}")


def annotations(api: KubeStandIn, keys: list[str]) -> dict[str, str | None]:
    out = {}
    for key in keys:
        ns, name = key.split("/")
        obj = api.get("Pod", name, ns) or {}
        out[key] = (obj.get("metadata", {}).get("annotations") or {}).get(ANNOTATION)
    return out


def label_cycles(api: KubeStandIn, core: kubernetes.client.CoreV1Api, keys: list[str], cycles: int) -> list[float]:
    """Per cycle and pod: ms from the label PATCH to the pod's `enabled` annotation on the stand-in."""
    samples: list[float] = []
    for cycle in range(cycles):
        t0 = time.perf_counter()
        patch = {"metadata": {"labels": {DATAPLANE_MODE_LABEL: DATAPLANE_MODE_AMBIENT}}}
        core.patch_namespace(ENROLLED_NAMESPACE, patch, _content_type=MERGE_PATCH)
        seen: dict[str, float] = {}
        deadline = t0 + 30
        while len(seen) < len(keys):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"cycle {cycle}: not enabled within 30 s: {annotations(api, keys)}")
            for key, value in annotations(api, keys).items():
                if value == "enabled" and key not in seen:
                    seen[key] = (time.perf_counter() - t0) * 1e3
            time.sleep(0.002)
        samples += seen.values()
        log(f"label -> ready, cycle {cycle + 1}/{cycles}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in seen.items()))
        core.patch_namespace(
            ENROLLED_NAMESPACE, {"metadata": {"labels": {DATAPLANE_MODE_LABEL: None}}}, _content_type=MERGE_PATCH
        )
        deadline = time.perf_counter() + 30
        while any(v is not None for v in annotations(api, keys).values()):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"cycle {cycle}: annotations not removed within 30 s: {annotations(api, keys)}")
            time.sleep(0.01)
    return samples


@contextlib.contextmanager
def kube_mesh(scale: Scale, keep_logs: Path | None = None) -> Iterator[tuple[KubeStandIn, Mesh, Lab]]:
    teardown()
    run_dir = Path(tempfile.mkdtemp(prefix="na-kb-"))  # short: ZDS socket paths must fit 108 bytes
    api = KubeStandIn(bookmark_interval=5.0)
    mesh: Mesh | None = None
    try:
        lab = Lab.up(DEFAULT_TOPOLOGY)
        populate(api, lab, scale)
        control_plane = lab.inventory.nodes[0]  # the API server on node1's fabric address
        url = api.serve_in_netns(lab.node_netns(control_plane.name), str(control_plane.address))
        mesh = Mesh(lab, run_dir, kubeconfig=Path(api.kubeconfig(str(run_dir / "node.kubeconfig"), server=url)))
        yield api, mesh, lab
    finally:
        if mesh is not None:
            mesh.stop()
        teardown()
        api.close()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for path in run_dir.glob("*.log"):
                shutil.copy(path, keep_logs / path.name)
        shutil.rmtree(run_dir, ignore_errors=True)


def measure(scale: Scale, keep_logs: Path | None = None) -> KubeFigures:
    with kube_mesh(scale, keep_logs) as (api, mesh, lab):
        started = time.monotonic()
        mesh.start(timeout=120)
        agent, tunnel = mesh.agent("node1"), mesh.tunnel("node1")
        spawn_wall = time.time() - (time.monotonic() - agent.spawned)
        loaded = logged_at(agent.log_path, INVENTORY_LOADED, 60)
        agent_sync, agent_lists = loaded - spawn_wall, loaded - logged_at(agent.log_path, LISTING, 1)
        # ready_after counts from start()'s beginning (CA set-up included): rebase it on the tunnel's spawn
        tunnel_ready = started + mesh.ready_after["node1"] - tunnel.spawned
        agent_rss, tunnel_rss = tools.rss_bytes(agent.pid), tools.rss_bytes(tunnel.pid)
        for node in mesh.nodes:
            mesh.wait(f"the agent on {node} to be ready", lambda node=node: mesh.agent_ready(node), 60)
        keys = [p.key for p in lab.inventory.pods if p.namespace == ENROLLED_NAMESPACE]
        client = api.api_client()  # the operator's side: the host's loopback listener
        with client:
            ready = label_cycles(api, kubernetes.client.CoreV1Api(client), keys, scale.cycles)
        mesh.check_alive()
        return KubeFigures(
            agent_sync, agent_lists, tunnel_ready, agent_rss, tunnel_rss, tools.rss_bytes(agent.pid), ready
        )


def record(res: object, scale: Scale, figures: KubeFigures) -> None:
    """Add the figures to a bench.run Results (`res.add(figure, path, value)`)."""
    add = res.add  # type: ignore[attr-defined]
    add("kube_initial_sync_seconds", f"node agent (node1): spawn -> model built, {scale.label}", figures.agent_sync_s)
    add("kube_initial_sync_seconds", f"node agent (node1): lists -> model built, {scale.label}", figures.agent_lists_s)
    add("kube_initial_sync_seconds", f"tunnel (node1): spawn -> ready, {scale.label}", figures.tunnel_ready_s)
    add("kube_rss_mb", f"node agent (node1) after sync, {scale.label}", figures.agent_rss_after_sync / 2**20)
    add("kube_rss_mb", f"node agent (node1) at the end, {scale.label}", figures.agent_rss_end / 2**20)
    add("kube_rss_mb", f"tunnel (node1) after sync, {scale.label}", figures.tunnel_rss_after_sync / 2**20)
    for ms in figures.ready_ms:
        add("kube_label_to_ready_ms", f"namespace label -> pod annotated enabled, {scale.label}", ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.kube_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=FULL.pods)
    parser.add_argument("--services", type=int, default=FULL.services)
    parser.add_argument("--nodes", type=int, default=FULL.nodes)
    parser.add_argument("--cycles", type=int, default=FULL.cycles)
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the mesh's process logs here")
    args = parser.parse_args(argv)
    scale = Scale(args.pods, args.services, args.nodes, args.cycles)
    with exclusive():
        figures = measure(scale, args.keep_logs)
    print(json.dumps({"scale": scale.__dict__, **figures.__dict__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
