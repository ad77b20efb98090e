"""The mesh in Kubernetes mode end to end: the lab's pods served by the API-server stand-in.

What this proves (issue 8's acceptance): with the agents and tunnels watching an API server instead of
the lab inventory — `nodeagent agent --kubernetes` and `nodeagent tunnel --kubernetes`, real processes in
the lab's node namespaces, reaching the stand-in (tests/kube_standin.py) on node1's fabric address like a
control-plane node's API server — labelling a namespace with `nodeagent enroll` captures its pods and
traffic between them crosses the fabric as HBONE only; `nodeagent unenroll` removes capture; a watch
dropped mid-stream resumes from its resourceVersion and a 410 Gone relists, and neither loses the label
change made while nobody was watching; every pod's `ambient.istio.io/redirection` annotation is written
through pods/status and removed again; `nodeagent inspect redirects --kubernetes` lists the nodes' pods
from the API server with the kernel's view of their capture.

The stand-in holds the lab's pods as the cluster would: their real names, UIDs, IPs, nodes and service
accounts, and no namespace labelled. Nothing tells the agents where a pod's netns is: they find it by the
pod's IP (agent/kube_netns.py), as on a real node.

Oracles are the kernel's tools (iptables-save and ss inside the pod netns, tcpdump on the fabric) and the
stand-in's own store and request log; `Mesh` only drives processes and its waits are for sequencing.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oracles
import pytest
from kube_standin import KubeStandIn, namespace, pod, service
from oracles import APP_PORT, BATCH, CHECKOUT, FRONTEND, IP, NETNS, PAYMENTS, SHOP, TUNNEL_PORTS
from waiting import wait_for

from nodeagent.agent.kube_netns import ProcNetnsResolver
from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, teardown
from nodeagent.labmesh import NODEAGENT, Mesh
from nodeagent.model import Pod

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

ANNOTATION = "ambient.istio.io/redirection"
DATAPLANE_LABEL = "istio.io/dataplane-mode"
NAMESPACE_LISTS_AND_WATCHES = re.compile(r"^/api/v1/namespaces\?")  # not /api/v1/namespaces/shop/...

SERVER = oracles.PEER_ECHO_SERVER

# One exchange; prints {"ok", "peer"} or {"ok": false, "error"}.
CLIENT = r"""
import json, socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    f = c.makefile("rb")
    peer = f.readline().decode().removeprefix("peer ").strip()
    c.sendall(sys.argv[3].encode())
    echo = f.read(len(sys.argv[3]))
    print(json.dumps({"ok": echo == sys.argv[3].encode(), "peer": peer}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__}))
"""


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv[-6:]} exited {done.returncode}: {done.stderr[-2000:]}{done.stdout[-500:]}")
    return done


# --- oracles (the kernel's own tools) -----------------------------------------------------------------


def ours(netns: str) -> list[str]:
    """Every iptables line of ours in the netns, in either flavour."""
    lines = []
    for flavour in ("nft", "legacy"):
        text = sh("ip", "netns", "exec", netns, f"iptables-{flavour}-save").stdout
        lines += [line for line in text.splitlines() if "NODEAGENT" in line]
    return lines


def listeners(netns: str) -> set[int]:
    out = sh("ip", "netns", "exec", netns, "ss", "-H", "-tln").stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines()}


def captured(key: str) -> bool:
    """Our jumps (nat and mangle, in and out) and the tunnel's three listeners are in the pod's netns."""
    jumps = [line for line in ours(NETNS[key]) if line.startswith(("-A PREROUTING", "-A OUTPUT"))]
    return len(jumps) == 4 and listeners(NETNS[key]) >= TUNNEL_PORTS


def released(key: str) -> bool:
    netns = NETNS[key]
    rules = sh("ip", "-n", netns, "rule").stdout
    return not ours(netns) and not (TUNNEL_PORTS & listeners(netns)) and "fwmark" not in rules


# --- the cluster --------------------------------------------------------------------------------------


@dataclass
class Cluster:
    lab: Lab
    mesh: Mesh
    api: KubeStandIn
    operator_kubeconfig: Path
    tmp: Path

    def nodeagent(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A `nodeagent` command as an operator runs it: on the host, with the operator's kubeconfig."""
        return sh(*NODEAGENT, *args, "--kubeconfig", str(self.operator_kubeconfig), check=False, timeout=60)

    def label(self, verb: str) -> dict[str, Any]:
        done = self.nodeagent(verb, "shop", "-o", "json")
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def annotation(self, key: str) -> str | None:
        ns, name = key.split("/")
        obj = self.api.get("Pod", name, ns)
        assert obj is not None
        return (obj["metadata"].get("annotations") or {}).get(ANNOTATION)

    def server(self, key: str) -> None:
        argv = self.lab.exec_argv(key, [sys.executable, "-c", SERVER, str(APP_PORT)])
        proc = self.mesh.spawn(f"server-{key.replace('/', '-')}", argv)
        wait_for(f"the server in {key}", lambda: "listening" in proc.log())

    def once(self, src: str, dst: str, message: str = "hello") -> dict[str, Any]:
        argv = self.lab.exec_argv(src, [sys.executable, "-c", CLIENT, IP[dst], str(APP_PORT), message])
        return dict(json.loads(sh(*argv).stdout.splitlines()[-1]))

    def interrupt_watches(self) -> int:
        """Cut every open watch stream and hold the clients' new watches until `api.release_watches()`."""
        self.api.hold_watches()
        dropped = self.api.drop_watches()
        wait_for("every cut watch to be re-requested", lambda: self.api.held_watches >= dropped, timeout=15)
        return dropped


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The default lab, the stand-in holding its pods (no namespace labelled), the mesh in Kubernetes mode."""
    if Path("/run/nodeagent/lab/state.json").exists():
        pytest.fail("a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests")
    run_dir = Path(tempfile.mkdtemp(prefix="na-kube-"))  # short: ZDS socket paths must fit 108 bytes
    api = KubeStandIn(bookmark_interval=1.0)
    mesh: Mesh | None = None
    try:
        lab = Lab.up(DEFAULT_TOPOLOGY)
        inventory = lab.inventory
        for ns in inventory.namespaces:
            labels = {k: v for k, v in ns.labels.items() if k != DATAPLANE_LABEL}
            api.apply(namespace(ns.name, labels))
        for p in inventory.pods:
            assert p.ip is not None
            api.apply(
                pod(p.name, p.namespace, p.node, str(p.ip), sa=p.service_account, labels=dict(p.labels), uid=p.uid)
            )
        for s in inventory.services:
            api.apply(service(s.name, s.namespace, dict(s.selector), [(sp.port, sp.target_port) for sp in s.ports]))
        control_plane = inventory.nodes[0]  # the API server listens on node1's fabric address
        url = api.serve_in_netns(lab.node_netns(control_plane.name), str(control_plane.address))
        node_kubeconfig = Path(api.kubeconfig(str(run_dir / "node.kubeconfig"), server=url))
        operator_kubeconfig = Path(api.kubeconfig(str(run_dir / "operator.kubeconfig")))
        mesh = Mesh(lab, run_dir, kubeconfig=node_kubeconfig)
        mesh.start()
        for node in mesh.nodes:
            mesh.wait(f"the agent on {node} to be ready", functools.partial(mesh.agent_ready, node))
        yield Cluster(lab, mesh, api, operator_kubeconfig, tmp_path)
    finally:
        if mesh is not None:
            mesh.stop()
        teardown()
        api.close()
        for log in run_dir.glob("*.log"):  # kept with the test's tmp_path for a post-mortem
            shutil.copy(log, tmp_path / log.name)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_kubernetes_mode_enroll_unenroll_and_watch_interruptions(cluster: Cluster) -> None:
    c = cluster
    api = c.api
    # Nothing is labelled yet: no capture anywhere, no annotation.
    assert all(released(key) for key in IP)
    assert all(c.annotation(key) is None for key in IP)

    # --- enroll: `nodeagent enroll shop` labels the namespace; its pods are captured and annotated ----------
    summary = c.label("enroll")
    assert summary["result"] == "labelled"
    assert {(p["namespace"], p["pod"], p["change"]) for p in summary["pods"]} == {
        ("shop", "frontend", "joins"),
        ("shop", "payments", "joins"),
        ("shop", "checkout", "joins"),
    }
    wait_for("shop captured", lambda: all(captured(key) for key in SHOP))
    wait_for("shop annotated enabled", lambda: all(c.annotation(key) == "enabled" for key in SHOP))
    assert released(BATCH) and c.annotation(BATCH) is None  # legacy is not labelled
    pod_patches = [path for path, _ in api.patches if "/pods/" in path]
    assert pod_patches and all(path.endswith("/status") for path in pod_patches), pod_patches

    c.server(CHECKOUT)
    c.server(PAYMENTS)
    dump = oracles.FabricCapture(c.lab, c.tmp / "fabric.pcap")
    assert c.once(FRONTEND, CHECKOUT, "cross-node") == {"ok": True, "peer": IP[FRONTEND]}
    between = dump.packets(f"host {IP[FRONTEND]} and host {IP[CHECKOUT]}")
    assert between and all(".15008" in line for line in between), between  # HBONE, nothing else
    assert c.once(FRONTEND, PAYMENTS, "same-node") == {"ok": True, "peer": IP[FRONTEND]}

    # `inspect redirects --kubernetes`: the pods from the API server, capture from the kernel.
    done = c.nodeagent(
        "inspect", "redirects", "--kubernetes", "--node", "node1", "--node", "node2",
        "--state-dir", str(c.mesh.agent_state), "-o", "json", "--verify",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {f"{r['namespace']}/{r['pod']}": r for r in json.loads(done.stdout)["rows"]}
    assert set(rows) == set(IP)
    for key in SHOP:
        assert (rows[key]["mode"], rows[key]["rules"], rows[key]["status"]) == ("ambient", "ok", "enabled")
        assert set(rows[key]["listeners"]) == TUNNEL_PORTS
    assert (rows[BATCH]["mode"], rows[BATCH]["rules"], rows[BATCH]["listeners"]) == ("none", "none", [])

    # --- a watch dropped mid-stream: the unlabel happens while nobody watches; the watches resume ---------
    seen = len(api.requests)
    dropped = c.interrupt_watches()
    assert dropped >= 4  # each agent watches pods and namespaces (the tunnels more)
    rv_before = api.resource_version
    assert c.label("unenroll")["result"] == "labelled"
    time.sleep(1.0)
    assert all(captured(key) for key in SHOP)  # no agent has heard of it: it only reaches them by watch
    api.release_watches()
    wait_for("shop released", lambda: all(released(key) for key in SHOP))
    wait_for("annotations removed", lambda: all(c.annotation(key) is None for key in SHOP))
    # The change came through watches resumed from their resourceVersion, not a fresh list.
    namespace_requests = [path for _, path in api.requests[seen:] if NAMESPACE_LISTS_AND_WATCHES.match(path)]
    assert namespace_requests and all("watch=" in path for path in namespace_requests), namespace_requests
    resumed = [int(m.group(1)) for p in namespace_requests if (m := re.search(r"resourceVersion=(\d+)", p))]
    assert resumed and min(resumed) <= rv_before, (resumed, rv_before)

    # --- 410 Gone: the relabel happens while nobody watches and history is compacted: the agents relist ----
    seen = len(api.requests)
    c.interrupt_watches()
    assert c.label("enroll")["result"] == "labelled"
    api.compact()  # every resourceVersion the agents hold is now too old
    time.sleep(1.0)
    assert all(released(key) for key in SHOP)
    api.release_watches()
    wait_for("shop captured again", lambda: all(captured(key) for key in SHOP))
    wait_for("shop annotated enabled again", lambda: all(c.annotation(key) == "enabled" for key in SHOP))
    namespace_requests = [path for _, path in api.requests[seen:] if NAMESPACE_LISTS_AND_WATCHES.match(path)]
    relists = [path for path in namespace_requests if "watch=" not in path]
    assert len(relists) >= len(c.mesh.nodes), namespace_requests  # at least every agent listed afresh
    assert c.once(FRONTEND, CHECKOUT, "after-410") == {"ok": True, "peer": IP[FRONTEND]}

    for proc in c.mesh.procs:
        if proc.kind in ("agent", "tunnel"):
            assert "Traceback" not in proc.log(), f"{proc.name}:\n{proc.log()[-3000:]}"


# --- the resolver on its own: real namespaces, no lab ---------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pod_netns_found_by_ip_in_mounts_and_processes() -> None:
    """ProcNetnsResolver on real namespaces: a bind mount (ip netns), a mount that gets its address only
    after a first scan (the CNI's set-up), a reused IP held by two namespaces, a process-only netns."""
    tag = f"nakt{os.getpid()}"
    a, b, c = f"{tag}-a", f"{tag}-b", f"{tag}-c"
    clock = FakeClock()
    resolver = ProcNetnsResolver(clock=clock)

    def sandbox(uid: str, ip: str) -> Pod:
        return Pod(uid, "ns", uid, "node", "default", ipaddress.IPv4Address(ip))

    first, second, reuse, lone = (
        sandbox("first", "10.123.0.5"),
        sandbox("second", "10.123.0.6"),
        sandbox("reuse", "10.123.0.5"),
        sandbox("lone", "10.123.0.7"),
    )
    unshared: subprocess.Popen[str] | None = None
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "-n", a, "link", "set", "lo", "up")
        sh("ip", "-n", a, "addr", "add", "10.123.0.5/32", "dev", "lo")
        assert resolver.resolve(first) == f"/var/run/netns/{a}"
        scans = resolver.scans
        assert resolver.resolve(first) == f"/var/run/netns/{a}" and resolver.scans == scans  # kept, no scan

        sh("ip", "netns", "add", b)  # the sandbox exists before the CNI gives it its address
        sh("ip", "-n", b, "link", "set", "lo", "up")
        assert resolver.resolve(second) is None
        sh("ip", "-n", b, "addr", "add", "10.123.0.6/32", "dev", "lo")
        assert resolver.resolve(second) is None  # not scanned for again so soon
        clock.now += resolver.refresh_s
        assert resolver.resolve(second) == f"/var/run/netns/{b}"  # the mount is read again: it had no address

        # An IP reused by a new sandbox while the old one still holds it: the new pod gets nothing until
        # one holder is left.
        sh("ip", "netns", "add", c)
        sh("ip", "-n", c, "link", "set", "lo", "up")
        sh("ip", "-n", c, "addr", "add", "10.123.0.5/32", "dev", "lo")
        assert resolver.resolve(reuse) is None
        assert resolver.resolve(first) == f"/var/run/netns/{a}"  # already found: kept while its netns exists
        sh("ip", "netns", "del", a)
        clock.now += resolver.refresh_s
        assert resolver.resolve(reuse) == f"/var/run/netns/{c}"

        # A namespace no mount names: found through a process inside it.
        script = "ip link set lo up && ip addr add 10.123.0.7/32 dev lo && echo ready && exec sleep 60"
        unshared = subprocess.Popen(["unshare", "--net", "sh", "-c", script], stdout=subprocess.PIPE, text=True)
        assert unshared.stdout is not None and unshared.stdout.readline().strip() == "ready"
        assert resolver.resolve(lone) == f"/proc/{unshared.pid}/ns/net"
    finally:
        if unshared is not None:
            unshared.kill()
            unshared.wait()
        for name in (a, b, c):
            sh("ip", "netns", "del", name, check=False)
