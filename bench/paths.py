"""The paths the benchmark measures, each able to run iperf3, sockperf and the load client through it.

A path is "how a client pod's bytes reach a server pod": directly over the lab's bridge and fabric,
through a pair of stunnel processes (one per node, like a per-node tunnel, with certificates issued by
nodeagent's CA), or through nodeagent's own capture and tunnels. The references run between the `plain`
pods of bench/topology.yaml and the mesh between its enrolled `mesh` pods, over the same veths, bridges
and fabric, so all paths live in one lab and are measured interleaved. The lab is driven through the
`nodeagent lab` CLI and the mesh through nodeagent.labmesh, exactly as a user or the demo would.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from bench import tools
from nodeagent.inventory.local import gateway_address
from nodeagent.lab.cluster import Lab
from nodeagent.labmesh import Mesh

REPO = Path(__file__).resolve().parent.parent
LAB_CLI = [sys.executable, "-m", "nodeagent.lab"]
LOAD = str(REPO / "bench" / "load.py")

BENCH_TOPOLOGY = REPO / "bench" / "topology.yaml"
PLAIN = ("plain/client", "plain/server", "plain/local")  # client (node1), server (node2), server (node1)
MESH = ("mesh/client", "mesh/server", "mesh/local")

IPERF_PORT, SOCKPERF_PORT, ECHO_PORT = 5201, 11111, 7777
STUNNEL_BASE_PORT = 25000

ABSENT_PATHS: dict[str, str] = {}


# Open files. A proxy holds one socket per side of each connection it relays (two in one process when both
# sides are on its node: the same-node tunnel, each stunnel), so holding 10 000 idle connections needs more
# than 20 000 files in one process. On a node the operator and the container runtime set the hard limit
# (commonly 524 288 or 1 048 576, fs.nr_open's default) and the tunnel only raises its soft limit to it
# (nodeagent.ztunnel.proxy.tunnel.run_tunnel). The benchmark gives itself such a limit, soft = hard, so
# every process it starts (tunnels, stunnel, servers, load clients) inherits one and the same.
NODE_FD_LIMIT = 1 << 20
FD_SLACK = 16  # files a proxy may keep after a phase besides its pooled connections (a timer, a log)
TEARDOWN_TIMEOUT_S = 120.0


def raise_fd_limit() -> tuple[int, str]:
    """Set this process's open-files limit (soft = hard) to the node's; return it, and why it is lower.

    Raising the hard limit needs CAP_SYS_RESOURCE: without it (a container, a CI sandbox) the run keeps
    the hard limit it was given, for every process alike, and the report says so.
    """
    with open("/proc/sys/fs/nr_open") as f:
        wanted = min(NODE_FD_LIMIT, int(f.read()))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard >= wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard, ""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        return wanted, ""
    except (OSError, ValueError) as exc:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard, f"raising the hard limit to {wanted} was refused ({exc}): the run lacks CAP_SYS_RESOURCE"


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit(pid: int) -> int:
    """The soft open-files limit of a running process (what makes its accept/connect fail with EMFILE)."""
    with open(f"/proc/{pid}/limits") as f:
        return parse_fd_limit(f.read())


def parse_fd_limit(limits: str) -> int:
    for line in limits.splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise tools.ToolOutputError(f"no 'Max open files' line in /proc/PID/limits: {limits[:200]!r}")


def fd_shortfall(held: int, per_connection: float, count: int, limit: int) -> str | None:
    """Why a process holding `held` files, using `per_connection` per relayed connection, cannot relay
    `count` more under `limit` (None if it can). Asking anyway would only end in EMFILE: connections reset
    mid-phase, and a proxy still closing thousands of them when the next phase starts."""
    needed = held + round(per_connection * count)
    if needed <= limit:
        return None
    return (
        f"needs about {needed} open files in one process ({per_connection:.2f} per connection, measured, "
        f"+ {held} already open) but its limit is {limit}"
    )


def torn_down(baseline: int, peak: int, samples: list[int]) -> bool:
    """Has a proxy closed the connections of a phase? Its open files, sampled at a steady interval, are
    back near `baseline` (what it keeps, like pooled HBONE connections, is at most a twentieth of what the
    phase added) and stopped changing between the last two samples."""
    if len(samples) < 2 or samples[-1] != samples[-2]:
        return False
    return samples[-1] - baseline <= max(FD_SLACK, (peak - baseline) // 20)


def wait_torn_down(pids: Mapping[int, int], peaks: Mapping[int, int], timeout: float = TEARDOWN_TIMEOUT_S) -> float:
    """Seconds until every proxy (pid -> open files before the phase) has torn the phase's connections down.

    A client that exits leaves its proxy thousands of closes to process; the next phase must not be timed
    while that runs (the first pod add after 10 000 held connections took 0.4-1.8 s, all of it spent
    waiting behind the tunnel's teardown). RuntimeError if it takes longer than `timeout`.
    """
    t0 = time.monotonic()
    samples: dict[int, list[int]] = {pid: [] for pid in pids}
    while True:
        for pid, history in samples.items():
            history.append(open_files(pid))
        if all(torn_down(pids[pid], max(peaks.get(pid, 0), *h), h) for pid, h in samples.items()):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            state = ", ".join(f"pid {pid}: {h[-1]} open files, {pids[pid]} before" for pid, h in samples.items())
            raise RuntimeError(f"the proxies did not close the phase's connections within {timeout:.0f} s ({state})")
        time.sleep(0.1)


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


class BenchLab:
    """A lab brought up for the benchmark through the CLI (as a user would), with its up/down times."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.inventory = lab.inventory
        self.up_seconds = 0.0
        self.down_seconds = 0.0
        self._procs: list[subprocess.Popen[str]] = []

    @classmethod
    @contextlib.contextmanager
    def fresh(cls, topology: Path = BENCH_TOPOLOGY) -> Iterator[BenchLab]:
        subprocess.run([*LAB_CLI, "down"], check=False, capture_output=True, cwd=REPO)
        t0 = time.perf_counter()
        _run([*LAB_CLI, "up", "--topology", str(topology)])
        up_seconds = time.perf_counter() - t0
        bench_lab = cls(Lab.load())
        bench_lab.up_seconds = up_seconds
        try:
            yield bench_lab
        finally:
            bench_lab.stop_all()
            t0 = time.perf_counter()
            _run([*LAB_CLI, "down"])
            bench_lab.down_seconds = time.perf_counter() - t0

    def ip(self, pod: str) -> str:
        return str(self.inventory.pod(pod).ip)

    def node_of(self, pod: str) -> str:
        return self.inventory.pod(pod).node

    def gateway(self, node: str) -> str:
        return str(gateway_address(self.inventory.node(node).pod_cidr))

    def exec_argv(self, pod: str, argv: list[str]) -> list[str]:
        return self.lab.exec_argv(pod, argv)

    def node_exec_argv(self, node: str, argv: list[str]) -> list[str]:
        return self.lab.node_exec_argv(node, argv)

    def run_in(self, pod: str, argv: list[str], timeout: float = 120) -> str:
        return _run(self.exec_argv(pod, argv), timeout).stdout

    def start(self, argv: list[str], ready: str | None = None, stdin: bool = False) -> subprocess.Popen[str]:
        """A process that runs until `stop_all`. Its stdout is a pipe only when `ready` is read from it (the
        process says that line and little else); otherwise nothing would read the pipe, and a server that
        writes on (iperf3 -s prints a report per test) would block once 64 KiB were queued, stalling the run.
        stderr goes to a file, read if the process fails to start."""
        with tempfile.TemporaryFile("w+") as errors:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if ready is not None else subprocess.DEVNULL,
                stderr=errors,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                text=True,
                cwd=REPO,
            )
            self._procs.append(proc)

            def stderr_text() -> str:
                errors.seek(0)
                return errors.read()[-2000:]

            if ready is not None:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if ready not in line:
                    raise RuntimeError(f"{argv} did not become ready: {line!r} {stderr_text()}")
            else:
                time.sleep(0.3)
            if proc.poll() is not None:
                raise RuntimeError(f"{argv} exited early: {stderr_text()}")
        return proc

    def stop_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs.clear()


def start_servers(lab: BenchLab, pod: str) -> None:
    """iperf3, sockperf and the echo server in `pod`; they run until the lab's processes are stopped."""
    lab.start(lab.exec_argv(pod, ["iperf3", "-s", "-p", str(IPERF_PORT)]))
    lab.start(lab.exec_argv(pod, ["sockperf", "server", "--tcp", "-p", str(SOCKPERF_PORT)]))
    lab.start(lab.exec_argv(pod, [sys.executable, LOAD, "echo-server", str(ECHO_PORT)]), ready="listening")


class MeasuredPath:
    """A way from the client pod to a server pod; subclasses say where the client connects."""

    name = ""
    client = PLAIN[0]
    server = PLAIN[1]
    _fds_per_connection: float | None = None  # a proxy's open files per held connection, once measured

    @contextlib.contextmanager
    def setup(self, lab: BenchLab) -> Iterator[None]:
        """Start what the path needs besides the servers (a proxy, a tunnel); stop it on exit."""
        yield

    def target(self, lab: BenchLab, port: int) -> tuple[str, int]:
        raise NotImplementedError

    def proxy_pids(self) -> list[int]:
        return []

    def describe(self) -> dict[str, object]:
        return {"client": self.client, "server": self.server}

    def _cpu(self) -> float:
        return sum(tools.cpu_seconds(pid) for pid in self.proxy_pids())

    def iperf3(self, lab: BenchLab, streams: int, seconds: float) -> tuple[tools.Throughput, float | None]:
        host, port = self.target(lab, IPERF_PORT)
        cpu0 = self._cpu()
        out = lab.run_in(
            self.client,
            ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
            timeout=seconds + 60,
        )
        cpu = self._cpu() - cpu0 if self.proxy_pids() else None
        return tools.parse_iperf3(out), cpu

    def sockperf(self, lab: BenchLab, size: int, seconds: float) -> tools.Latency:
        host, port = self.target(lab, SOCKPERF_PORT)
        out = lab.run_in(
            self.client,
            ["sockperf", "ping-pong", "--tcp", "-i", host, "-p", str(port), "-m", str(size), "-t", str(seconds)],
            timeout=seconds + 60,
        )
        return tools.parse_sockperf(out)

    def connrate(self, lab: BenchLab, seconds: float) -> dict[str, object]:
        host, port = self.target(lab, ECHO_PORT)
        cpu0 = self._cpu()
        out = lab.run_in(
            self.client, [sys.executable, LOAD, "connrate", host, str(port), str(seconds), "8"], timeout=seconds + 60
        )
        cpu = self._cpu() - cpu0 if self.proxy_pids() else None
        raw = json.loads(out)
        lat = [float(x) for x in raw["latencies_s"]]
        if not lat:
            raise RuntimeError(f"{self.name}: no connection succeeded ({raw['errors']})")
        return {
            "per_second": len(lat) / float(raw["seconds"]),
            "p99_ms": tools.percentile(lat, 99) * 1e3,
            "errors": raw["errors"],
            # CPU of the path's own proxy processes (both ends) per connection; None without proxies.
            "proxy_cpu_us": cpu / len(lat) * 1e6 if cpu is not None else None,
        }

    def idle_memory(self, lab: BenchLab, count: int) -> float | None:
        """Bytes of proxy RSS per idle connection held open through the path (None: no proxy process).

        Returns only once the proxies have closed the held connections again (see `wait_torn_down`).
        RuntimeError when a proxy's open-files limit cannot fit `count` connections (known from the open
        files per connection measured by an earlier, smaller hold) or the hold fails.
        """
        pids = self.proxy_pids()
        if not pids:
            return None
        files = {p: open_files(p) for p in pids}
        if self._fds_per_connection is not None:
            for pid in pids:
                short = fd_shortfall(files[pid], self._fds_per_connection, count, fd_limit(pid))
                if short is not None:
                    raise RuntimeError(f"{count} connections through pid {pid}: {short}")
        host, port = self.target(lab, ECHO_PORT)
        before = sum(tools.rss_bytes(p) for p in pids)
        peaks: dict[int, int] = {}
        try:
            holder = lab.start(
                lab.exec_argv(self.client, [sys.executable, LOAD, "hold", host, str(port), str(count)]),
                ready="ready",
                stdin=True,
            )
            time.sleep(0.5)
            after = sum(tools.rss_bytes(p) for p in pids)
            peaks = {p: open_files(p) for p in pids}
            self._fds_per_connection = max((peaks[p] - files[p]) / count for p in pids)
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(60)
        finally:
            closing = wait_torn_down(files, peaks)
            print(f"bench: {self.name}: the proxies closed the held connections in {closing:.1f} s", file=sys.stderr)
        return (after - before) / count


class DirectPath(MeasuredPath):
    """No mesh: the client connects straight to the server pod (the physical reference)."""

    def __init__(self, same_node: bool) -> None:
        self.server = PLAIN[2] if same_node else PLAIN[1]
        self.name = "direct TCP, same-node" if same_node else "direct TCP, cross-node"

    def target(self, lab: BenchLab, port: int) -> tuple[str, int]:
        return lab.ip(self.server), port


class StunnelPath(MeasuredPath):
    """stunnel4 on each node, mutual TLS 1.3 between them with certificates issued by nodeagent's CA.

    client pod -> stunnel client on node1 (node1's bridge address) -> TLS over the fabric ->
    stunnel server on node2 -> server pod. That is the shape of a per-node tunnel, handshaking once per
    connection (stunnel has no connection pooling).
    """

    name = "stunnel (mTLS), cross-node"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._pids: list[int] = []

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "stunnel": subprocess.run(
                ["stunnel4", "-version"], check=False, capture_output=True, text=True
            ).stderr.splitlines()[0:1],
        }

    def proxy_pids(self) -> list[int]:
        return self._pids

    def _ports(self) -> dict[int, int]:
        return {
            IPERF_PORT: STUNNEL_BASE_PORT + 1,
            SOCKPERF_PORT: STUNNEL_BASE_PORT + 2,
            ECHO_PORT: STUNNEL_BASE_PORT + 3,
        }

    def target(self, lab: BenchLab, port: int) -> tuple[str, int]:
        return lab.gateway(lab.node_of(self.client)), self._ports()[port]

    @contextlib.contextmanager
    def setup(self, lab: BenchLab) -> Iterator[None]:
        from bench.ca_bench import issue_pair

        issue_pair(self.workdir)
        client_node, server_node = lab.node_of(self.client), lab.node_of(self.server)
        server_addr = str(lab.inventory.node(server_node).address)
        common = textwrap.dedent(f"""\
            foreground = yes
            pid =
            debug = 3
            sslVersionMin = TLSv1.3
            ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384
            CAfile = {self.workdir}/root.pem
            verifyChain = yes
            """)
        client = common + f"cert = {self.workdir}/client.pem\nkey = {self.workdir}/client.key\n"
        server = common + f"cert = {self.workdir}/server.pem\nkey = {self.workdir}/server.key\n"
        for app_port, relay_port in self._ports().items():
            client += (
                f"[p{app_port}]\nclient = yes\naccept = {lab.gateway(client_node)}:{relay_port}\n"
                f"connect = {server_addr}:{relay_port}\n"
            )
            server += (
                f"[p{app_port}]\naccept = {server_addr}:{relay_port}\nconnect = {lab.ip(self.server)}:{app_port}\n"
            )
        (self.workdir / "client.conf").write_text(client)
        (self.workdir / "server.conf").write_text(server)
        srv = lab.start(lab.node_exec_argv(server_node, ["stunnel4", str(self.workdir / "server.conf")]))
        cli = lab.start(lab.node_exec_argv(client_node, ["stunnel4", str(self.workdir / "client.conf")]))
        time.sleep(0.5)
        self._pids = [srv.pid, cli.pid]
        try:
            yield
        finally:
            self._pids = []


class MeshPath(MeasuredPath):
    """nodeagent: the client pod's connect is captured in its netns, carried by the node tunnels as HBONE
    (mutual TLS 1.3 + HTTP/2 CONNECT) to the server pod's node, and delivered from the client's own IP.

    The mesh's processes (CA, and per node an agent and a tunnel) are started once for the run by
    `running_mesh`; the paths only point at them.
    """

    def __init__(self, mesh: Mesh, same_node: bool, capture: str = "iptables", fast_path: bool = False) -> None:
        self.mesh = mesh
        self.client = MESH[0]
        self.server = MESH[2] if same_node else MESH[1]
        self.name = f"nodeagent ({'iptables' if capture == 'iptables' else 'eBPF'} capture), " + (
            "same-node" if same_node else "cross-node"
        )
        if fast_path:  # the tunnel runs with its same-node fast path (otherwise off: HBONE to itself)
            self.name += " fast path"

    def target(self, lab: BenchLab, port: int) -> tuple[str, int]:
        return lab.ip(self.server), port

    def proxy_pids(self) -> list[int]:
        nodes = {self.mesh.lab.inventory.pod(p).node for p in (self.client, self.server)}
        return [self.mesh.tunnel(node).pid for node in sorted(nodes)]

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "capture": self.mesh.capture, "tunnels": len(self.proxy_pids())}


@contextlib.contextmanager
def running_mesh(lab: BenchLab, run_dir: Path, capture: str = "iptables", enroll: bool = True) -> Iterator[Mesh]:
    """The mesh for the run; with `enroll`, every `mesh` pod enrolled and acked by its tunnel first."""
    mesh = Mesh(lab.lab, run_dir, capture=capture)
    try:
        mesh.start()
        if enroll:
            mesh.wait_enabled(MESH)
        yield mesh
    finally:
        mesh.stop()
