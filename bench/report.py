"""Turn one benchmark run (the JSON document) into a Markdown report and PNG charts.

Every figure is shown as median [low..high] over the run's rounds, and as a ratio to direct TCP and to
stunnel on the same topology (cross-node vs cross-node, same-node vs same-node). The targets of the
issues are evaluated from the same numbers; a target whose path is absent says so instead of passing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Doc = dict[str, Any]

DIRECT_X = "direct TCP, cross-node"
DIRECT_S = "direct TCP, same-node"
STUNNEL = "stunnel (mTLS), cross-node"
MESH_X = "nodeagent (iptables capture), cross-node"
MESH_S = "nodeagent (iptables capture), same-node"
EBPF_X = "nodeagent (eBPF capture), cross-node"
EBPF_S = "nodeagent (eBPF capture), same-node"
FAST_S = "nodeagent (eBPF capture), same-node fast path"

FIGURES = {
    "throughput_gbps_1_stream": ("iperf3 throughput, 1 stream", "Gbit/s", True),
    "throughput_gbps_4_stream": ("iperf3 throughput, 4 streams", "Gbit/s", True),
    "latency_p50_us_64b": ("sockperf ping-pong 64 B, p50", "µs", False),
    "latency_p99_us_64b": ("sockperf ping-pong 64 B, p99", "µs", False),
    "latency_p999_us_64b": ("sockperf ping-pong 64 B, p99.9", "µs", False),
    "latency_p50_us_1024b": ("sockperf ping-pong 1 KiB, p50", "µs", False),
    "latency_p99_us_1024b": ("sockperf ping-pong 1 KiB, p99", "µs", False),
    "latency_p999_us_1024b": ("sockperf ping-pong 1 KiB, p99.9", "µs", False),
    "new_connections_per_second": ("new connections per second (connect, 1-byte echo, close)", "conn/s", True),
    "connect_p99_ms": ("p99 connect + echo time", "ms", False),
    "proxy_cpu_us_per_connection": ("proxy CPU per new connection (both ends, during the conn/s run)", "µs", False),
    "tunnel_cpu_seconds_per_gb": ("tunnel CPU seconds per GB moved (both ends)", "CPU s/GB", False),
    "memory_bytes_per_idle_connection_1000": ("proxy memory per idle connection, 1 000 held", "bytes", False),
    "memory_bytes_per_idle_connection_10000": ("proxy memory per idle connection, 10 000 held", "bytes", False),
    "lab_up_seconds": ("lab up", "s", False),
    "lab_down_seconds": ("lab down", "s", False),
    "ca_certificates_per_second": ("CA certificates signed per second", "certs/s", True),
    "cert_manager_rss_mb_1000_identities": ("certificate manager RSS, 1000 identities", "MiB", False),
    "pod_ready_ms": ("pod add -> capture and listeners ready", "ms", False),
    "many_pods_enrolled_seconds": ("namespace of many pods on one node enrolled", "s", False),
    "agent_rss_mb": ("node agent RSS", "MiB", False),
    "kube_initial_sync_seconds": ("Kubernetes mode: initial sync (stand-in)", "s", False),
    "kube_rss_mb": ("Kubernetes mode: RSS (stand-in)", "MiB", False),
    "kube_label_to_ready_ms": ("Kubernetes mode: namespace label -> pod annotated enabled", "ms", False),
}


def _median(doc: Doc, figure: str, path: str) -> float | None:
    entry = doc["figures"].get(figure, {}).get(path)
    return None if entry is None else float(entry["median"])


def _reference(path: str, direct: bool) -> str:
    if direct:
        return DIRECT_S if "same-node" in path else DIRECT_X
    return STUNNEL


def _ratio(value: float, ref: float | None) -> str:
    if ref is None or ref == 0:
        return "—"
    return f"{value / ref:.2f}x"


def _fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def figures_table(doc: Doc) -> list[str]:
    lines = ["| figure | path | median [low..high] | vs direct TCP | vs stunnel |", "|---|---|---|---|---|"]
    for key, (title, unit, _higher) in FIGURES.items():
        for path, entry in sorted(doc["figures"].get(key, {}).items()):
            value = float(entry["median"])
            comparable = path in (DIRECT_X, DIRECT_S, STUNNEL, MESH_X, MESH_S, EBPF_X, EBPF_S, FAST_S)
            vs_direct = _ratio(value, _median(doc, key, _reference(path, True))) if comparable else "—"
            vs_stunnel = _ratio(value, _median(doc, key, STUNNEL)) if comparable and "same-node" not in path else "—"
            spread = f"{_fmt(value)} {unit} [{_fmt(entry['low'])}..{_fmt(entry['high'])}] (n={entry['samples']})"
            lines.append(f"| {title} | {path} | {spread} | {vs_direct} | {vs_stunnel} |")
    return lines


@dataclass(frozen=True)
class Target:
    issue: int
    text: str
    check: Callable[[Doc], bool | None]  # None: cannot be judged (path or figure absent)


def _le(doc: Doc, fig: str, path: str, limit: float) -> bool | None:
    v = _median(doc, fig, path)
    return None if v is None else v <= limit


def _p99_le(doc: Doc, fig: str, path: str, limit: float) -> bool | None:
    entry = doc["figures"].get(fig, {}).get(path)
    if entry is None:
        return None
    values = sorted(float(v) for v in entry["values"])
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)] <= limit


def _lab(doc: Doc, fig: str, label_part: str, limit: float) -> bool | None:
    for path, entry in doc["figures"].get(fig, {}).items():
        if label_part in path:
            return float(entry["median"]) <= limit
    return None


def _ge_ratio(doc: Doc, fig: str, path: str, ref: str, factor: float) -> bool | None:
    v, r = _median(doc, fig, path), _median(doc, fig, ref)
    return None if v is None or r is None else v >= factor * r


def _all_le(doc: Doc, fig: str, parts: tuple[str, ...], limit: float) -> bool | None:
    """Every path naming all of `parts` has its median <= limit (None: no such path)."""
    found = [float(e["median"]) for p, e in doc["figures"].get(fig, {}).items() if all(x in p for x in parts)]
    return None if not found else all(v <= limit for v in found)


KUBE_SCALE = "5000 pods / 1000 services"  # the issue's cluster; quick runs use a smaller one: not judged


def _added_le(doc: Doc, fig: str, path: str) -> bool | None:
    v, d, s = _median(doc, fig, path), _median(doc, fig, DIRECT_X), _median(doc, fig, STUNNEL)
    return None if v is None or d is None or s is None else (v - d) <= (s - d)


TARGETS = [
    Target(2, "lab up (default topology) < 5 s", lambda d: _lab(d, "lab_up_seconds", "default", 5)),
    Target(2, "lab down (default topology) < 3 s", lambda d: _lab(d, "lab_down_seconds", "default", 3)),
    Target(2, "50 pods on 2 nodes up < 20 s", lambda d: _lab(d, "lab_up_seconds", "50 pods", 20)),
    Target(
        3,
        ">= 500 certificates signed per second",
        lambda d: (
            None
            if (v := _median(d, "ca_certificates_per_second", "nodeagent ca (gRPC, loopback)")) is None
            else v >= 500
        ),
    ),
    Target(
        3,
        "the certificate manager holds 1000 identities in < 50 MB RSS (whole process)",
        lambda d: _le(d, "cert_manager_rss_mb_1000_identities", "process total", 50 * 1e6 / 2**20),
    ),
    Target(
        4,
        "1-stream throughput through both tunnels >= stunnel's",
        lambda d: _ge_ratio(d, "throughput_gbps_1_stream", MESH_X, STUNNEL, 1.0),
    ),
    Target(
        4,
        "1-stream throughput >= 0.3x direct TCP",
        lambda d: _ge_ratio(d, "throughput_gbps_1_stream", MESH_X, DIRECT_X, 0.3),
    ),
    Target(4, "64 B added latency p50 <= stunnel's", lambda d: _added_le(d, "latency_p50_us_64b", MESH_X)),
    Target(4, "64 B added latency p99 <= stunnel's", lambda d: _added_le(d, "latency_p99_us_64b", MESH_X)),
    Target(
        4,
        "new connections per second >= 3x stunnel's",
        lambda d: _ge_ratio(d, "new_connections_per_second", MESH_X, STUNNEL, 3.0),
    ),
    Target(
        4,
        "memory per idle tunnelled connection <= 10 KB at 10 000",
        lambda d: _le(d, "memory_bytes_per_idle_connection_10000", MESH_X, 10_000),
    ),
    Target(5, "pod add -> ready p50 <= 50 ms", lambda d: _le(d, "pod_ready_ms", MESH_X, 50)),
    Target(5, "pod add -> ready p99 <= 200 ms", lambda d: _p99_le(d, "pod_ready_ms", MESH_X, 200)),
    Target(
        5,
        "200 pods on one node enrolled in < 10 s",
        lambda d: _le(d, "many_pods_enrolled_seconds", "200 pods on one node", 10),
    ),
    Target(
        5,
        "agent RSS <= 80 MB with 200 pods",
        lambda d: _le(d, "agent_rss_mb", "node1, 200 pods enrolled", 80 * 1e6 / 2**20),
    ),
    Target(
        6,
        "eBPF throughput >= iptables mode (cross-node)",
        lambda d: _ge_ratio(d, "throughput_gbps_1_stream", EBPF_X, MESH_X, 1.0),
    ),
    Target(
        6,
        "eBPF throughput >= iptables mode (same-node)",
        lambda d: _ge_ratio(d, "throughput_gbps_1_stream", EBPF_S, MESH_S, 1.0),
    ),
    Target(
        6,
        "eBPF 64 B latency p50 <= iptables mode's (cross-node)",
        lambda d: (
            None
            if (ref := _median(d, "latency_p50_us_64b", MESH_X)) is None
            else _le(d, "latency_p50_us_64b", EBPF_X, ref)
        ),
    ),
    Target(
        6,
        "same-node fast path throughput >= 0.8x direct TCP",
        lambda d: _ge_ratio(d, "throughput_gbps_1_stream", FAST_S, DIRECT_S, 0.8),
    ),
    Target(
        8,
        "5 000 pods / 1 000 services: initial sync < 10 s (agent: spawn -> model built; tunnel: spawn -> ready)",
        lambda d: _all_le(d, "kube_initial_sync_seconds", (KUBE_SCALE, "spawn ->"), 10),
    ),
    Target(
        8,
        "5 000 pods / 1 000 services: node agent RSS < 150 MB",
        lambda d: _all_le(d, "kube_rss_mb", (KUBE_SCALE, "node agent"), 150 * 1e6 / 2**20),
    ),
    Target(
        8,
        "5 000 pods / 1 000 services: namespace label -> enrolled pod ready p50 < 1 s",
        lambda d: _all_le(d, "kube_label_to_ready_ms", (KUBE_SCALE,), 1000),
    ),
]


def targets_table(doc: Doc) -> list[str]:
    lines = ["| issue | target | status |", "|---|---|---|"]
    for t in TARGETS:
        verdict = t.check(doc)
        status = "not measurable yet (path or figure absent)" if verdict is None else ("met" if verdict else "NOT met")
        lines.append(f"| #{t.issue} | {t.text} | {status} |")
    return lines


def charts(doc: Doc, out: Path, stamp: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, figs in (
        ("throughput", ["throughput_gbps_1_stream", "throughput_gbps_4_stream"]),
        ("latency", ["latency_p50_us_64b", "latency_p99_us_64b", "latency_p50_us_1024b", "latency_p99_us_1024b"]),
    ):
        paths = sorted({p for f in figs for p in doc["figures"].get(f, {})})
        if not paths:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / len(paths)
        for i, path in enumerate(paths):
            meds = [float(doc["figures"].get(f, {}).get(path, {}).get("median", 0)) for f in figs]
            lows = [
                meds[j] - float(doc["figures"].get(f, {}).get(path, {}).get("low", meds[j])) for j, f in enumerate(figs)
            ]
            highs = [
                float(doc["figures"].get(f, {}).get(path, {}).get("high", meds[j])) - meds[j]
                for j, f in enumerate(figs)
            ]
            xs = [j + i * width for j in range(len(figs))]
            ax.bar(xs, meds, width, yerr=[lows, highs], label=path, capsize=3)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(figs))])
        ax.set_xticklabels([FIGURES[f][0].replace("sockperf ping-pong ", "") for f in figs], fontsize=8)
        ax.set_ylabel(FIGURES[figs[0]][1])
        ax.set_title(f"{name} by path ({doc['mode']} run, {doc['started_utc'][:16]})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path_png = out / f"{stamp}-{name}.png"
        fig.savefig(path_png, dpi=100)
        plt.close(fig)
        made.append(path_png)
    return made


def render(doc: Doc, chart_files: list[Path]) -> str:
    m = doc["machine"]
    lines = [
        f"# nodeagent benchmark — {doc['mode']} run, {doc['started_utc']}",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, kernel {m['kernel']}, Python {m['python']}, "
        f"{m['openssl']}. Run took {doc['duration_seconds']} s. Paths are measured interleaved in one run; values "
        "are medians over rounds with [low..high]; ratios compare medians on the same topology.",
        "",
        "## Figures",
        "",
        *figures_table(doc),
        "",
        "## Paths absent from this run",
        "",
        *[f"- {path}: {why}" for path, why in doc["absent_paths"].items()],
        "",
        "## Performance targets of the issues",
        "",
        *targets_table(doc),
        "",
    ]
    if doc["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in doc["notes"]], ""]
    if chart_files:
        lines += ["## Charts", "", *[f"![{p.stem}]({p.name})" for p in chart_files], ""]
    return "\n".join(lines)


def write(doc: Doc, out: Path, stamp: str) -> Path:
    chart_files = charts(doc, out, stamp)
    md = out / f"{stamp}.md"
    md.write_text(render(doc, chart_files))
    latest = out / "LATEST.md"
    latest.write_text(f"The latest report is [{md.name}]({md.name}).\n")
    return md
