"""bench.tunnel_loopback's A/B method: the order of the compared sides per rep and the paired statistics.

An A/A run of the old method favoured one side in every rep, so a 2-4 % change could not be shown
either way; these are the pure parts of the fix: positions balanced over the reps, and per-rep paired
differences with a distribution-free interval for their median instead of two medians side by side.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from bench.tunnel_loopback import (
    Sample,
    median_interval,
    paired,
    paired_report,
    pairs_of,
    rep_orders,
    run_order,
    sign_test_p,
)

A, B, C = "nodeagent tunnel", "nodeagent tunnel (baseline)", "third"


@pytest.mark.parametrize("sides", [[A, B], [A, B, C]])
@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_each_side_runs_in_each_position_equally_often_over_a_multiple_of_the_sides(sides, seed) -> None:
    reps = 2 * len(sides) * 3
    orders = rep_orders(sides, reps, seed)
    assert len(orders) == reps
    assert all(sorted(o) == sorted(sides) for o in orders)
    for position in range(len(sides)):
        assert Counter(o[position] for o in orders) == dict.fromkeys(sides, reps // len(sides))
    assert all(orders[r] != orders[r + 1] for r in range(reps - 1)), "the first side changes every rep"


def test_two_sides_alternate_from_a_seeded_start_that_the_seed_reproduces() -> None:
    starts = {tuple(rep_orders([A, B], 1, seed)[0]) for seed in range(20)}
    assert starts == {(A, B), (B, A)}, "either side may go first"
    for seed in range(20):
        orders = rep_orders([A, B], 6, seed)
        assert orders == rep_orders([A, B], 6, seed)
        assert orders[0::2] == [orders[0]] * 3 and orders[1::2] == [orders[0][::-1]] * 3


@pytest.mark.parametrize(
    ("references", "compared", "rep", "want"),
    [
        (["direct", "stunnel"], [A, B], 0, ["direct", "stunnel", A, B]),
        (["direct", "stunnel"], [B, A], 1, ["stunnel", "direct", B, A]),
        ([], [B, A], 3, [B, A]),
        (["direct"], [], 0, ["direct"]),
    ],
)
def test_run_order_references_first_then_the_compared_sides(references, compared, rep, want) -> None:
    assert run_order(references, compared, rep) == want


@pytest.mark.parametrize(
    ("values", "coverage", "want"),
    [
        # n = 6: only [min..max] reaches 90 %: 1 - 2/64 = 96.9 %.
        ([5, 1, 4, 2, 6, 3], 0.9, (1, 6, 1 - 2 / 64)),
        # n = 10: [x(2)..x(9)], 1 - 2 * 11/1024 = 97.9 %; [x(3)..x(8)] would be 89.1 %.
        (list(range(10)), 0.9, (1, 8, 1 - 22 / 1024)),
        (list(range(10)), 0.85, (2, 7, 1 - 112 / 1024)),
        # n = 4 cannot reach 90 %: [min..max] and its 87.5 %.
        ([3, 1, 2, 4], 0.9, (1, 4, 0.875)),
        ([7.0], 0.9, (7.0, 7.0, 0.0)),
    ],
)
def test_median_interval_is_the_sign_test_order_statistic_interval(values, coverage, want) -> None:
    assert median_interval(values, coverage) == pytest.approx(want)


def test_median_interval_of_nothing_is_nan() -> None:
    low, high, cov = median_interval([])
    assert math.isnan(low) and math.isnan(high) and cov == 0


@pytest.mark.parametrize(
    ("above", "below", "want"),
    [(6, 0, 2 / 64), (0, 6, 2 / 64), (5, 1, 14 / 64), (3, 3, 1.0), (0, 0, 1.0), (8, 0, 2 / 256)],
)
def test_sign_test_p(above, below, want) -> None:
    assert sign_test_p(above, below) == pytest.approx(want)


def test_paired_differences_median_interval_and_signs() -> None:
    # current, other per rep: current lower by 10 in 4 reps, higher by 5 in one, equal in one.
    p = paired([(90, 100), (95, 100), (100, 100), (190, 200), (105, 100), (40, 50)])
    assert p.diffs == [-10, -5, 0, -10, 5, -10]
    assert (p.median, p.low, p.high) == (-7.5, -10, 5)
    assert p.coverage == pytest.approx(1 - 2 / 64)
    assert (p.above, p.below) == (1, 4)
    assert p.p_sign == pytest.approx(sign_test_p(1, 4))
    assert p.rel_median == pytest.approx(-0.05)  # of -0.1 -0.05 0 -0.05 +0.05 -0.2
    assert (p.rel_low, p.rel_high) == pytest.approx((-0.2, 0.05))


def test_a_rep_in_which_one_side_failed_is_left_out_not_paired_with_another_rep() -> None:
    samples = [
        Sample("latency", 0, 2, A, {"p50_us": 100}),
        Sample("latency", 0, 3, B, {"p50_us": 110}),
        Sample("latency", 1, 2, B, {"p50_us": 120}),  # A failed in rep 1
        Sample("latency", 2, 2, B, {"p50_us": 130}),
        Sample("latency", 2, 3, A, {"p50_us": 125}),
        Sample("connrate", 0, 2, A, {"conns_per_s": 1}),
    ]
    assert pairs_of(samples, "latency", "p50_us", A, B) == [(100, 110), (125, 130)]


def test_the_report_pairs_every_figure_of_the_current_side_but_the_error_count() -> None:
    samples = [
        Sample(kind, rep, 0, side, {fig: val + (rep if side == A else 0) for fig in figs})
        for kind, figs, val in (("connrate", ("conns_per_s", "errors"), 1000.0), ("latency", ("p50_us",), 100.0))
        for rep in range(6)
        for side in (A, B)
    ]
    lines, out = paired_report(samples, A, B)
    assert list(out) == ["connrate.conns_per_s", "latency.p50_us"]
    assert out["latency.p50_us"]["diffs"] == [0, 1, 2, 3, 4, 5]
    assert out["latency.p50_us"]["above"] == 5 and out["latency.p50_us"]["below"] == 0
    assert len(lines) == 2 and "higher 5/6, lower 0/6" in lines[1]
