"""Loopback benchmark of the tunnel pair against stunnel4 and direct TCP, in one interleaved run.

Why: the lab benchmark (`make bench`) needs root and network namespaces; this one runs anywhere the
integration tests run, so a change to the data path (hbone.py, hbone_transport.py, relay.py) can be
measured A/B in minutes. It brings up, on a random 127.X.Y.0/24:

  CA (in-process, the integration tests' `start_ca`) issuing both tunnels' certificates;
  tunnel node1 and tunnel node2 as two processes (tests/integration/loopback_tunnel.py, uvloop, the
  production `Tunnel`): client -> node1 :15001 -> HBONE/mTLS -> node2 :15008 -> server :8080;
  stunnel4 client + server with certificates from a nodeagent CA (bench/ca_bench.issue_pair), TLS 1.3
  with the same suites: client -> stunnel A -> mTLS -> stunnel B -> server :8080;
  direct TCP to server :8080.

and measures, path after path within each repetition (so noise on the shared 2-vCPU machine hits every
path alike), medians over repetitions:

  throughput  iperf3 -t S, 1 stream, receiver's Gbit/s; proxy CPU seconds per GB (utime+stime of both
              proxy processes from /proc over the run, divided by the bytes iperf3 moved);
  latency     sockperf ping-pong -m 64, half round trip p50/p99 in µs;
  connrate    bench/load.py connrate (8 workers: connect, 1-byte echo, close), connections/s, and proxy
              CPU µs per connection (both proxy processes, utime+stime).

Run: `.venv/bin/python -m bench.tunnel_loopback [--reps 3] [--seconds 5] [--only throughput,latency]`.
`--baseline DIR` adds a second tunnel pair run from another checkout (e.g. `git archive HEAD | tar -x -C
/tmp/base`) on its own 127.X.Y.0/24, as path "tunnel (baseline)": before/after in the same run.
`--pyspy DIR` records py-spy profiles (raw folded stacks) of each tunnel process during every run
(`pip install py-spy` into the venv first); `--env K=V` sets environment for the (non-baseline) tunnel
processes (e.g. `LOG_LEVEL=DEBUG`); tunnel logs go to $BENCH_LOG_DIR (default /tmp)/<net>-<node>.log.
The phases run latency first: sockperf's server cannot bind :8080 over the TIME_WAITs the others leave.
Not measured here: 4 streams and idle-connection memory (`make bench` does, in the lab).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import tools

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
APP_PORT = 8080
OUTBOUND_PORT = 15001
CLIENT_HOST, SERVER_HOST = 10, 20
LOG_DIR = os.environ.get("BENCH_LOG_DIR", tempfile.gettempdir())

ECHO_SERVER = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[3])
from bench.load import _Echo  # the lab's echo server, bound to one address
async def main(host, port):
    server = await asyncio.get_running_loop().create_server(_Echo, host, port, backlog=4096, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()
import uvloop
uvloop.run(main(sys.argv[1], int(sys.argv[2])))
"""


@dataclass
class Path_:
    name: str
    host: str
    port: int
    server_ip: str
    pids: list[int] = field(default_factory=list)


def _wait_line(proc: subprocess.Popen[str], want: str, timeout: float = 30) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} exited ({proc.poll()}) before printing {want!r}")
        if line.strip().startswith(want):
            return
    raise TimeoutError(f"{proc.args!r} did not print {want!r} within {timeout} s")


def _stop(proc: subprocess.Popen[str], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def tunnel_pair(
    base: str, ca_target: str, bundle: Path, root: Path, *, python: str, tag: str, extra_env: dict[str, str]
) -> Iterator[Path_]:
    """Two loopback tunnel processes from checkout `root`; yields the path to connect to (node1's :15001)."""
    script = root / "tests" / "integration" / "loopback_tunnel.py"
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}:{root / 'tests'}:{root / 'tests' / 'integration'}",
        **extra_env,
    }
    procs: list[subprocess.Popen[str]] = []
    try:
        for node in ("node2", "node1"):
            # Through runpy, so the tunnel logs (WARNING and up, or LOG_LEVEL) to LOG_DIR/<node>.log.
            log_file = Path(LOG_DIR) / f"{base}-{node}.log"
            boot = (
                "import logging, os, runpy, sys; "
                f"logging.basicConfig(level=os.environ.get('LOG_LEVEL', 'WARNING'), filename={str(log_file)!r}, "
                "format='%(asctime)s %(name)s %(levelname)s %(message)s'); "
                f"sys.argv = [{str(script)!r}, *sys.argv[1:]]; runpy.run_path(sys.argv[0], run_name='__main__')"
            )
            procs.append(
                subprocess.Popen(
                    [python, "-c", boot, base, ca_target, str(bundle), node],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=root,
                )
            )
        for proc in procs:
            _wait_line(proc, "ready")
        yield Path_(
            f"nodeagent tunnel{tag}",
            f"{base}.{CLIENT_HOST}",
            OUTBOUND_PORT,
            f"{base}.{SERVER_HOST}",
            [p.pid for p in procs],
        )
    finally:
        for proc in procs:
            _stop(proc)


@contextlib.contextmanager
def stunnel_pair(base: str, workdir: Path, port: int) -> Iterator[Path_]:
    from bench.ca_bench import issue_pair

    issue_pair(workdir)
    client_ip, server_ip = f"{base}.{CLIENT_HOST}", f"{base}.{SERVER_HOST}"
    common = textwrap.dedent(f"""\
        foreground = yes
        pid =
        debug = 3
        sslVersionMin = TLSv1.3
        ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384
        CAfile = {workdir}/root.pem
        verifyChain = yes
        """)
    client = common + f"cert = {workdir}/client.pem\nkey = {workdir}/client.key\n"
    client += f"[c]\nclient = yes\naccept = {client_ip}:{port}\nconnect = {server_ip}:{port + 1}\n"
    server = common + f"cert = {workdir}/server.pem\nkey = {workdir}/server.key\n"
    server += f"[s]\naccept = {server_ip}:{port + 1}\nconnect = {server_ip}:{APP_PORT}\n"
    (workdir / "client.conf").write_text(client)
    (workdir / "server.conf").write_text(server)
    procs = [
        subprocess.Popen(["stunnel4", str(workdir / name)], stderr=subprocess.DEVNULL, text=True)
        for name in ("server.conf", "client.conf")
    ]
    time.sleep(0.5)
    try:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError("stunnel4 exited at start; run it by hand with the config in " + str(workdir))
        yield Path_("stunnel4 pair", client_ip, port, server_ip, [p.pid for p in procs])
    finally:
        for proc in procs:
            _stop(proc)


@contextlib.contextmanager
def app_servers(argvs: list[list[str]], ready: str | None = None) -> Iterator[None]:
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for argv in argvs]
    try:
        for proc in procs:
            if ready:
                _wait_line(proc, ready)
        if not ready:
            time.sleep(0.3)
        yield
    finally:
        for proc in procs:
            _stop(proc, 5)


def cpu(pids: list[int]) -> float:
    return sum(tools.cpu_seconds(p) for p in pids)


def run_throughput(path: Path_, seconds: float) -> dict[str, float]:
    c0 = cpu(path.pids)
    out = subprocess.run(
        ["iperf3", "-c", path.host, "-p", str(path.port), "-t", str(seconds), "-J", "-l", "1M"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    used = cpu(path.pids) - c0
    t = tools.parse_iperf3(out.stdout)
    gb = t.bytes / 1e9
    return {"gbps": t.bits_per_second / 1e9, "cpu_s_per_gb": used / gb if gb and path.pids else 0.0}


def run_latency(path: Path_, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["sockperf", "ping-pong", "--tcp", "-i", path.host, "-p", str(path.port), "-m", "64", "-t", str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    lat = tools.parse_sockperf(out.stdout + out.stderr)
    return {"p50_us": lat.p50, "p99_us": lat.p99}


def run_connrate(path: Path_, seconds: float) -> dict[str, float]:
    c0 = cpu(path.pids)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load.py"), "connrate", path.host, str(path.port), str(seconds), "8"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    used = cpu(path.pids) - c0
    data = json.loads(out.stdout)
    lat = data["latencies_s"]
    return {
        "conns_per_s": len(lat) / data["seconds"],
        "proxy_cpu_us_per_conn": used / len(lat) * 1e6 if lat and path.pids else 0.0,
        "connect_p99_ms": tools.percentile(lat, 99) * 1000 if lat else float("nan"),
        "errors": float(sum(data["errors"].values())),
    }


def _median_table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = []
    for name, figures in results.items():
        parts = [f"{k}={statistics.median(v):.3g} [{min(v):.3g}..{max(v):.3g}]" for k, v in figures.items() if v]
        lines.append(f"  {name:28s} " + "  ".join(parts))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--only", default="latency,throughput,connrate")  # sockperf cannot bind over TIME_WAIT
    ap.add_argument("--paths", default="direct,stunnel,tunnel", help="comma list of direct,stunnel,tunnel")
    ap.add_argument("--baseline", type=Path, help="another checkout whose tunnel pair runs as an extra path")
    ap.add_argument("--json", type=Path, help="write the raw samples here")
    ap.add_argument("--env", action="append", default=[], help="K=V for the (non-baseline) tunnel processes")
    ap.add_argument(
        "--pyspy", type=Path, help="record py-spy profiles (raw folded stacks) of each tunnel process into DIR"
    )
    args = ap.parse_args()
    kinds = args.only.split(",")
    wanted = args.paths.split(",")

    sys.path[:0] = [str(TESTS), str(TESTS / "integration")]
    from identity_support import start_ca  # type: ignore[import-not-found]
    from tunnel_harness import Net, make_inventory, make_pod  # type: ignore[import-not-found]

    base = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
    server_ip = f"{base}.{SERVER_HOST}"
    net = Net(base=base)
    pods = [make_pod(net, "client", "node1", CLIENT_HOST), make_pod(net, "server", "node2", SERVER_HOST)]
    inventory = make_inventory(pods)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tunnel-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        ca = start_ca(workdir / "ca", source=lambda: inventory)
        stack.callback(ca.stop)
        paths: list[Path_] = []
        if "direct" in wanted:
            paths.append(Path_("direct TCP", server_ip, APP_PORT, server_ip))
        if "stunnel" in wanted:
            (workdir / "stunnel").mkdir()
            paths.append(stack.enter_context(stunnel_pair(base, workdir / "stunnel", 25000)))
        if "tunnel" in wanted:
            paths.append(
                stack.enter_context(
                    tunnel_pair(
                        base,
                        ca.target,
                        ca.store.bundle_path,
                        REPO,
                        python=sys.executable,
                        tag="",
                        extra_env=dict(kv.split("=", 1) for kv in args.env),
                    )
                )
            )
        if args.baseline is not None:
            # Its own addresses: the pair's listeners cannot share :15001/:15008 with the other pair's.
            other = base.rsplit(".", 1)[0] + f".{(int(base.rsplit('.', 1)[1]) % 254) + 1}"
            python = args.baseline / ".venv" / "bin" / "python"
            paths.append(
                stack.enter_context(
                    tunnel_pair(
                        other,
                        ca.target,
                        ca.store.bundle_path,
                        args.baseline.resolve(),
                        python=str(python if python.exists() else sys.executable),
                        tag=" (baseline)",
                        extra_env={},
                    )
                )
            )
        print(f"base {base}; paths: {', '.join(p.name for p in paths)}", flush=True)
        for name in [p.name for p in paths]:
            results[name] = {}
        for kind in kinds:
            ips = sorted({p.server_ip for p in paths})
            if kind == "throughput":
                servers = [["iperf3", "-s", "-B", ip, "-p", str(APP_PORT)] for ip in ips]
                runner, ready = run_throughput, None
            elif kind == "latency":
                servers = [["sockperf", "server", "--tcp", "-i", ip, "-p", str(APP_PORT)] for ip in ips]
                runner, ready = run_latency, None
            elif kind == "connrate":
                servers = [[sys.executable, "-c", ECHO_SERVER, ip, str(APP_PORT), str(REPO)] for ip in ips]
                runner, ready = run_connrate, "listening"
            else:
                raise SystemExit(f"unknown measurement {kind!r}")
            with app_servers(servers, ready):
                for rep in range(args.reps):
                    order = paths if rep % 2 == 0 else list(reversed(paths))
                    for path in order:
                        spies = []
                        if args.pyspy is not None and path.name.startswith("nodeagent"):
                            args.pyspy.mkdir(parents=True, exist_ok=True)
                            for pid, node in zip(path.pids, ("node2", "node1"), strict=True):
                                out = args.pyspy / f"{kind}-{path.name.replace(' ', '_')}-{node}-{rep}.txt"
                                spies.append(
                                    subprocess.Popen(
                                        [
                                            str(Path(sys.executable).parent / "py-spy"),
                                            "record",
                                            "--nonblocking",
                                            "-r",
                                            "200",
                                            "-f",
                                            "raw",
                                            "-d",
                                            str(int(args.seconds)),
                                            "-p",
                                            str(pid),
                                            "-o",
                                            str(out),
                                        ],
                                        stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL,
                                    )
                                )
                        try:
                            figures = runner(path, args.seconds)
                        except Exception as exc:
                            print(f"  {kind} {path.name}: failed: {exc}", flush=True)
                            continue
                        finally:
                            for spy in spies:
                                spy.wait()
                        for k, v in figures.items():
                            results[path.name].setdefault(k, []).append(v)
                        shown = "  ".join(f"{k}={v:.3g}" for k, v in figures.items())
                        print(f"  rep {rep} {kind:10s} {path.name:28s} {shown}", flush=True)
    print("\nmedians [low..high]:")
    print(_median_table(results))
    t, s, d, b = (
        results.get(n, {}) for n in ("nodeagent tunnel", "stunnel4 pair", "direct TCP", "nodeagent tunnel (baseline)")
    )
    if t.get("gbps") and b.get("gbps"):
        print(f"tunnel/baseline throughput: {statistics.median(t['gbps']) / statistics.median(b['gbps']):.2f}")
    if t.get("gbps") and s.get("gbps"):
        print(f"tunnel/stunnel throughput: {statistics.median(t['gbps']) / statistics.median(s['gbps']):.2f}")
    if t.get("gbps") and d.get("gbps"):
        print(f"tunnel/direct throughput: {statistics.median(t['gbps']) / statistics.median(d['gbps']):.2f}")
    if t.get("conns_per_s") and s.get("conns_per_s"):
        ratio = statistics.median(t["conns_per_s"]) / statistics.median(s["conns_per_s"])
        print(f"tunnel/stunnel new connections/s: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
