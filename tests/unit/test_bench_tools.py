"""The benchmark's parsers against outputs captured from the real tools on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import tools

DATA = Path(__file__).parent / "data"


def test_iperf3_json_is_read_from_the_receiver_side() -> None:
    raw = (DATA / "iperf3.json").read_text()
    tp = tools.parse_iperf3(raw)
    received = json.loads(raw)["end"]["sum_received"]
    assert tp.bytes == received["bytes"]
    assert tp.bits_per_second == pytest.approx(received["bits_per_second"])
    assert tp.bits_per_second == pytest.approx(tp.bytes * 8 / tp.seconds, rel=1e-6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("iperf3: error - unable to connect", "did not print JSON"),
        (json.dumps({"error": "unable to connect to server"}), "iperf3 failed"),
    ],
)
def test_iperf3_failures_are_reported(text: str, message: str) -> None:
    with pytest.raises(tools.ToolOutputError, match=message):
        tools.parse_iperf3(text)


def test_sockperf_percentiles() -> None:
    lat = tools.parse_sockperf((DATA / "sockperf.txt").read_text())
    assert 0 < lat.p50 <= lat.p99 <= lat.p999
    assert lat.observations > 1000


def test_sockperf_without_percentiles_is_an_error() -> None:
    with pytest.raises(tools.ToolOutputError):
        tools.parse_sockperf("sockperf: ERROR: Can`t connect socket (errno=111 Connection refused)")


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0], 50, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        (list(map(float, range(1, 101))), 99, 99.0),
        ([5.0, 1.0], 100, 5.0),
    ],
)
def test_percentile_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert tools.percentile(values, q) == expected


def test_spread() -> None:
    s = tools.spread([3.0, 1.0, 2.0])
    assert (s.median, s.low, s.high, s.samples) == (2.0, 1.0, 3.0, 3)
