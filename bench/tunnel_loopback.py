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
path alike):

  throughput  iperf3 -t S, 1 stream, receiver's Gbit/s; proxy CPU seconds per GB (utime+stime of both
              proxy processes from /proc over the run, divided by the bytes iperf3 moved);
  latency     sockperf ping-pong -m 64, half round trip p50/p99 in µs;
  connrate    bench/load.py connrate (8 workers: connect, 1-byte echo, close), connections/s, and proxy
              CPU µs per connection (both proxy processes, utime+stime).

Run: `.venv/bin/python -m bench.tunnel_loopback [--reps 6] [--seconds 4] [--only latency,connrate]`.
`--baseline DIR` adds a second tunnel pair run from another checkout (e.g. `git archive HEAD | tar -x -C
/tmp/base`), path "nodeagent tunnel (baseline)"; `--aa` instead adds a second pair of this same tree,
"nodeagent tunnel (A/A twin)": the noise floor of the comparison, measured the same way.

A/B method. The earlier method kept one pair per side for the whole run, the current side on the
references' /24 and app server, and reversed the whole path list every other rep; it printed each side's
median. A/A runs of it (the same tree on both sides) put one side lower in p50 latency in 6 of 6 reps in
two runs of six, the current side in one (-7 %) and the baseline in the other (+20 %), in both positions
of the rep: not the position, and not a fixed property of a side; with Python's hash seed fixed a run
was as uneven (4 of 6, +17 %). The larger finding is the noise itself: per-rep A/A differences of p50
latency span +-10..45 % (the same path gives 72 or 140 us, direct TCP 8 or 34 us, as the 2 vCPUs are
shared with other engineers' test runs), conns/s +-5..20 %; a 5 % gap between two medians, with no
interval on the difference, cannot be told from that. So now:
- each compared side has its own /24 and its own app server;
- both pairs are started afresh for every repetition (and stopped after it), so whatever a process
  carries (heap, pooled HBONE connection, hash seed, scheduling history) is drawn anew each rep: the
  reps are independent replicates of each side, as the paired statistics assume (a run of the new
  order with long-lived pairs showed no one-sided run in three tries either, so this is a precaution);
- within a rep the references run first, then the compared sides in an order that rotates every rep
  from a seeded random start (`--seed`, printed and in the JSON): with 2 sides, AB BA AB ..., so an even
  --reps gives each side each position equally often;
- the report gives, per figure, the per-rep paired differences current - other, their median with the
  sign-test (order statistic) interval for it and that interval's coverage (n=6: [min..max], 96.9 %),
  the same relative to the other side, and how many reps the current side was higher/lower (sign test).
  Read an A/B next to an `--aa` run of the same length made just before or after it.
Medians [low..high] of every path are printed as before; the stunnel and direct references are unchanged.

`--pyspy DIR` records py-spy profiles (raw folded stacks) of each tunnel process during every run
(`pip install py-spy` into the venv first); `--env K=V` sets environment for the current tree's tunnel
processes (and the A/A twin's, not the baseline's; e.g. `LOG_LEVEL=DEBUG`); tunnel logs go to
$BENCH_LOG_DIR (default /tmp)/<net>-<node>.log.
The phases run latency first: sockperf's server cannot bind :8080 over the TIME_WAITs the others leave.
Not measured here: 4 streams and idle-connection memory (`make bench` does, in the lab).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
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
    base: str, ca_target: str, bundle: Path, root: Path, *, python: str, name: str, extra_env: dict[str, str]
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
            name,
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


# ---- pure: the order of a run and its paired statistics (tests/unit/test_bench_loopback.py) ----

NOT_PAIRED = frozenset({"errors"})  # a count that should be 0 on both sides, not a figure to compare


def rep_orders(sides: list[str], reps: int, seed: int) -> list[list[str]]:
    """The order the compared sides run in, per repetition: a seeded random first order, rotated by one
    every rep, so over every len(sides) reps each side runs in each position once (2 sides: AB BA AB ...).
    """
    first = random.Random(seed).sample(sides, len(sides))
    return [first[r % len(first) :] + first[: r % len(first)] for r in range(reps)] if first else [[]] * reps


def run_order(references: list[str], compared: list[str], rep: int) -> list[str]:
    """A rep's runs: the references (in turn forwards and backwards, as ever), then the compared sides
    in the rep's order; so the first compared side always follows a reference, in either rotation."""
    return (references if rep % 2 == 0 else references[::-1]) + compared


def median_interval(values: list[float], coverage: float = 0.9) -> tuple[float, float, float]:
    """(low, high, its coverage): the distribution-free interval for the median of `values` from order
    statistics (the sign test's): the narrowest [x(k)..x(n+1-k)] whose coverage 1 - 2 P(Bin(n, 1/2) < k)
    is at least `coverage`; [min..max] with its (lower) coverage when n is too small for that."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0.0

    def covered(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / (1 << n)

    k = max((k for k in range(1, (n + 1) // 2 + 1) if covered(k) >= coverage), default=1)
    return xs[k - 1], xs[n - k], covered(k)


def sign_test_p(above: int, below: int) -> float:
    """Two-sided exact sign test: how likely a split at least this uneven is if either side is as likely."""
    m = above + below
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(above, below) + 1)) / (1 << m)
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """Per-rep differences current - other of one figure, and what they say about the median difference."""

    diffs: list[float]
    median: float
    low: float
    high: float
    coverage: float
    rel_median: float  # the same for (current - other) / other
    rel_low: float
    rel_high: float
    above: int  # reps where current was higher
    below: int
    p_sign: float


def paired(pairs: list[tuple[float, float]]) -> Paired:
    """`pairs`: (current, other) from the same rep."""
    diffs = [c - o for c, o in pairs]
    rel = [(c - o) / o for c, o in pairs if o]
    low, high, cov = median_interval(diffs)
    rel_low, rel_high, _ = median_interval(rel)
    above, below = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return Paired(
        diffs=diffs,
        median=statistics.median(diffs) if diffs else math.nan,
        low=low,
        high=high,
        coverage=cov,
        rel_median=statistics.median(rel) if rel else math.nan,
        rel_low=rel_low,
        rel_high=rel_high,
        above=above,
        below=below,
        p_sign=sign_test_p(above, below),
    )


@dataclass(frozen=True)
class Sample:
    kind: str
    rep: int
    position: int  # in the rep's run order, references included
    path: str
    figures: dict[str, float]


def pairs_of(samples: list[Sample], kind: str, figure: str, current: str, other: str) -> list[tuple[float, float]]:
    """(current, other) per rep in which both ran `kind` and gave `figure`, by rep."""
    by_rep: dict[int, dict[str, float]] = {}
    for s in samples:
        if s.kind == kind and s.path in (current, other) and figure in s.figures:
            by_rep.setdefault(s.rep, {})[s.path] = s.figures[figure]
    return [(v[current], v[other]) for _, v in sorted(by_rep.items()) if current in v and other in v]


def paired_report(samples: list[Sample], current: str, other: str) -> tuple[list[str], dict[str, dict[str, object]]]:
    """Lines to print and the JSON of the paired statistics, per kind and figure, in the samples' order."""
    lines, out = [], {}
    figures = dict.fromkeys((s.kind, f) for s in samples if s.path == current for f in s.figures)
    for kind, figure in figures:
        if figure in NOT_PAIRED:
            continue
        pairs = pairs_of(samples, kind, figure, current, other)
        if not pairs:
            continue
        p = paired(pairs)
        out[f"{kind}.{figure}"] = dataclasses.asdict(p)
        lines.append(
            f"  {kind:10s} {figure:22s} n={len(pairs)}  median {p.median:+.3g} [{p.low:+.3g}..{p.high:+.3g}]"
            f" ({p.coverage:.1%})  {p.rel_median:+.1%} [{p.rel_low:+.1%}..{p.rel_high:+.1%}]"
            f"  higher {p.above}/{len(pairs)}, lower {p.below}/{len(pairs)} (sign p={p.p_sign:.2f})"
            f"  per rep: {' '.join(f'{d:+.3g}' for d in p.diffs)}"
        )
    return lines, out


def _median_table(samples: list[Sample]) -> str:
    results: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        for k, v in s.figures.items():
            results.setdefault(s.path, {}).setdefault(k, []).append(v)
    lines = []
    for name, figures in results.items():
        parts = [f"{k}={statistics.median(v):.3g} [{min(v):.3g}..{max(v):.3g}]" for k, v in figures.items() if v]
        lines.append(f"  {name:28s} " + "  ".join(parts))
    return "\n".join(lines)


# ---- the run ----


@dataclass(frozen=True)
class Side:
    """A compared tunnel pair: which tree, run by which Python, on which /24."""

    name: str
    base: str
    root: Path
    python: str
    env: dict[str, str]


def _pyspy(pyspy: Path, path: Path_, kind: str, rep: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    pyspy.mkdir(parents=True, exist_ok=True)
    spies = []
    for pid, node in zip(path.pids, ("node2", "node1"), strict=True):
        out = pyspy / f"{kind}-{path.name.replace(' ', '_')}-{node}-{rep}.txt"
        argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking", "-r", "200", "-f", "raw"]
        argv += ["-d", str(int(seconds)), "-p", str(pid), "-o", str(out)]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--only", default="latency,throughput,connrate")  # sockperf cannot bind over TIME_WAIT
    ap.add_argument("--paths", default="direct,stunnel,tunnel", help="comma list of direct,stunnel,tunnel")
    compare = ap.add_mutually_exclusive_group()
    compare.add_argument("--baseline", type=Path, help="another checkout whose tunnel pair runs as an extra path")
    compare.add_argument("--aa", action="store_true", help="compare this tree with itself (the noise floor)")
    ap.add_argument("--seed", type=int, help="of the compared sides' order per rep (default: random, printed)")
    ap.add_argument("--json", type=Path, help="write the raw samples and the paired statistics here")
    ap.add_argument("--env", action="append", default=[], help="K=V for this tree's tunnel processes")
    ap.add_argument(
        "--pyspy", type=Path, help="record py-spy profiles (raw folded stacks) of each tunnel process into DIR"
    )
    args = ap.parse_args()
    kinds = args.only.split(",")
    wanted = args.paths.split(",")
    seed = args.seed if args.seed is not None else random.randrange(2**31)

    sys.path[:0] = [str(TESTS), str(TESTS / "integration")]
    from identity_support import start_ca  # type: ignore[import-not-found]
    from tunnel_harness import Net, make_inventory, make_pod  # type: ignore[import-not-found]

    # Three /24s: the references', and one per compared side, each with its own app server.
    x, y = random.randint(1, 254), random.randint(1, 252)
    base, *side_bases = (f"127.{x}.{y + i}" for i in range(3))
    server_ip = f"{base}.{SERVER_HOST}"
    net = Net(base=base)
    pods = [make_pod(net, "client", "node1", CLIENT_HOST), make_pod(net, "server", "node2", SERVER_HOST)]
    inventory = make_inventory(pods)
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    sides: list[Side] = []
    if "tunnel" in wanted:
        sides.append(Side("nodeagent tunnel", side_bases[0], REPO, sys.executable, extra_env))
        if args.aa:
            sides.append(Side("nodeagent tunnel (A/A twin)", side_bases[1], REPO, sys.executable, extra_env))
        elif args.baseline is not None:
            python = args.baseline / ".venv" / "bin" / "python"
            python_ = str(python if python.exists() else sys.executable)
            sides.append(Side("nodeagent tunnel (baseline)", side_bases[1], args.baseline.resolve(), python_, {}))
    orders = rep_orders([s.name for s in sides], args.reps, seed)
    if sides and args.reps % len(sides):
        print(f"note: --reps {args.reps} is not a multiple of {len(sides)}: one side runs first once more often")
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="tunnel-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        ca = start_ca(workdir / "ca", source=lambda: inventory)
        stack.callback(ca.stop)
        references: list[Path_] = []
        if "direct" in wanted:
            references.append(Path_("direct TCP", server_ip, APP_PORT, server_ip))
        if "stunnel" in wanted:
            (workdir / "stunnel").mkdir()
            references.append(stack.enter_context(stunnel_pair(base, workdir / "stunnel", 25000)))
        names = [p.name for p in references] + [s.name for s in sides]
        print(f"bases {base} (references), {', '.join(s.base for s in sides)}; paths: {', '.join(names)}")
        print(f"seed {seed}: compared sides per rep: {' | '.join(', '.join(o) for o in orders)}", flush=True)
        for kind in kinds:
            ips = [server_ip] + [f"{s.base}.{SERVER_HOST}" for s in sides]
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
                for rep, order in enumerate(orders):
                    by_name = {s.name: s for s in sides}
                    with contextlib.ExitStack() as pairs:
                        # Fresh processes every rep, started in the rep's order: nothing a long-lived
                        # process carries can favour one side for the whole run.
                        live = {p.name: p for p in references}
                        for name in order:
                            s = by_name[name]
                            live[name] = pairs.enter_context(
                                tunnel_pair(
                                    s.base,
                                    ca.target,
                                    ca.store.bundle_path,
                                    s.root,
                                    python=s.python,
                                    name=s.name,
                                    extra_env=s.env,
                                )
                            )
                        for position, name in enumerate(run_order([p.name for p in references], order, rep)):
                            path = live[name]
                            spies = []
                            if args.pyspy is not None and path.name.startswith("nodeagent"):
                                spies = _pyspy(args.pyspy, path, kind, rep, args.seconds)
                            try:
                                figures = runner(path, args.seconds)
                            except Exception as exc:
                                print(f"  {kind} {path.name}: failed: {exc}", flush=True)
                                continue
                            finally:
                                for spy in spies:
                                    spy.wait()
                            samples.append(Sample(kind, rep, position, path.name, figures))
                            shown = "  ".join(f"{k}={v:.3g}" for k, v in figures.items())
                            print(f"  rep {rep} {kind:10s} {path.name:28s} {shown}", flush=True)
    print("\nmedians [low..high]:")
    print(_median_table(samples))

    def median(path: str, figure: str) -> float:
        values = [x.figures[figure] for x in samples if x.path == path and figure in x.figures]
        return statistics.median(values) if values else 0.0

    t, st, d = "nodeagent tunnel", "stunnel4 pair", "direct TCP"
    if median(t, "gbps") and median(st, "gbps"):
        print(f"tunnel/stunnel throughput: {median(t, 'gbps') / median(st, 'gbps'):.2f}")
    if median(t, "gbps") and median(d, "gbps"):
        print(f"tunnel/direct throughput: {median(t, 'gbps') / median(d, 'gbps'):.2f}")
    if median(t, "conns_per_s") and median(st, "conns_per_s"):
        print(f"tunnel/stunnel new connections/s: {median(t, 'conns_per_s') / median(st, 'conns_per_s'):.2f}")
    paired_json: dict[str, dict[str, object]] = {}
    if len(sides) == 2:
        current, other = sides[0].name, sides[1].name
        lines, paired_json = paired_report(samples, current, other)
        what = "A/A: this tree against itself, the noise floor" if args.aa else "A/B"
        print(f"\npaired per rep, {current!r} - {other!r} ({what}); median [interval] (its coverage), relative:")
        print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seed": seed,
                    "orders": orders,
                    "samples": [dataclasses.asdict(s) for s in samples],
                    "paired": paired_json,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
