"""Parsers for the output of the measuring tools, and /proc readers for the measured processes.

Why: every number in a report must come from the named tool's own output (iperf3's JSON, sockperf's
percentile lines, /proc). Keeping the parsers pure and separate lets them be tested against captured
outputs, so a tool upgrade that changes a format fails a test instead of producing a wrong figure.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass

_SOCKPERF_PCT = re.compile(r"percentile\s+(\d+\.\d+)\s*=\s*([\d.]+)")
_SOCKPERF_AVG = re.compile(r"avg-latency=([\d.]+)")
_SOCKPERF_OBS = re.compile(r"Total (\d+) observations")


class ToolOutputError(ValueError):
    """A measuring tool printed something this harness cannot read."""


@dataclass(frozen=True)
class Throughput:
    bits_per_second: float
    bytes: int
    seconds: float
    retransmits: int | None


def parse_iperf3(text: str) -> Throughput:
    """iperf3 --json client output -> the receiver's view of the whole run."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolOutputError(f"iperf3 did not print JSON: {text[:200]!r}") from exc
    if "error" in data:
        raise ToolOutputError(f"iperf3 failed: {data['error']}")
    end = data["end"]
    received = end["sum_received"]
    sent = end.get("sum_sent", {})
    return Throughput(
        bits_per_second=float(received["bits_per_second"]),
        bytes=int(received["bytes"]),
        seconds=float(received["seconds"]),
        retransmits=sent.get("retransmits"),
    )


@dataclass(frozen=True)
class Latency:
    """sockperf ping-pong: half round trip in microseconds."""

    p50: float
    p99: float
    p999: float
    avg: float
    observations: int


def parse_sockperf(text: str) -> Latency:
    pct = {float(p): float(v) for p, v in _SOCKPERF_PCT.findall(text)}
    avg = _SOCKPERF_AVG.search(text)
    obs = _SOCKPERF_OBS.search(text)
    if not pct or avg is None or obs is None or not {50.0, 99.0, 99.9} <= pct.keys():
        raise ToolOutputError(f"sockperf printed no percentiles: {text[-400:]!r}")
    return Latency(
        p50=pct[50.0], p99=pct[99.0], p999=pct[99.9], avg=float(avg.group(1)), observations=int(obs.group(1))
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    samples: int


def spread(values: list[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values), len(values))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ToolOutputError(f"/proc/{pid}/status has no VmRSS (process gone?)")
