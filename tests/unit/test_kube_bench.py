"""bench/kube_bench.py's figures and their targets in bench/report.py: what is judged, what is not."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from bench import report
from bench.kube_bench import FULL, QUICK, KubeFigures, logged_at, record
from bench.run import Results


def doc_for(scale_figures: list[tuple[object, KubeFigures]]) -> dict[str, object]:
    res = Results()
    for scale, figures in scale_figures:
        record(res, scale, figures)  # type: ignore[arg-type]
    return {
        "figures": {f: {p: {"median": sorted(v)[len(v) // 2]} for p, v in by.items()} for f, by in res.figures.items()}
    }


def figures(
    sync: float = 3.0, tunnel: float = 5.0, rss_mb: float = 90, ready: tuple[float, ...] = (50, 60, 70)
) -> KubeFigures:
    mb = int(rss_mb * 2**20)
    return KubeFigures(sync, 0.1, tunnel, mb, mb, mb, list(ready))


def verdicts(doc: dict[str, object]) -> list[bool | None]:
    return [t.check(doc) for t in report.TARGETS if t.issue == 8]


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([(FULL, figures())], [True, True, True]),
        ([(FULL, figures(tunnel=12.0))], [False, True, True]),  # the tunnel's sync counts too
        ([(FULL, figures(sync=10.5))], [False, True, True]),
        ([(FULL, figures(rss_mb=150))], [True, False, True]),  # 150 MiB > 150 MB
        ([(FULL, figures(ready=(900, 1200, 1300)))], [True, True, False]),
        ([(FULL, figures(ready=(200, 300, 5000)))], [True, True, True]),  # p50, not the worst
        ([(QUICK, figures(sync=99))], [None, None, None]),  # a smaller cluster is not the issue's
        ([], [None, None, None]),
    ],
)
def test_kube_targets(runs: list[tuple[object, KubeFigures]], expected: list[bool | None]) -> None:
    assert verdicts(doc_for(runs)) == expected


def test_figures_are_labelled_with_their_scale() -> None:
    res = Results()
    record(res, QUICK, figures())
    paths = {p for by in res.figures.values() for p in by}
    assert paths and all("1000 pods / 200 services / 10 nodes" in p for p in paths)


def test_logged_at_reads_the_line_timestamp(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_bytes(
        b"2026-11-21 09:30:08,030 INFO x: node node1: capture iptables\n"
        b"2026-11-21 09:30:10,797 INFO nodeagent.agent.service: inventory loaded: 100 pods on node1, 0 enrolled\n"
    )
    expected = time.mktime(time.strptime("2026-11-21 09:30:10", "%Y-%m-%d %H:%M:%S")) + 0.797
    assert logged_at(log, re.compile(rb"inventory loaded: \d+ pods on "), 1) == pytest.approx(expected)
    with pytest.raises(RuntimeError, match="no b'never'"):
        logged_at(log, re.compile(rb"never"), 0.1)
