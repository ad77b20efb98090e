"""The benchmark's open-files bookkeeping: the limit every process gets, whether a hold fits under a
proxy's limit, and when a proxy has finished closing a phase's connections."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from bench import paths, tools

REPO = Path(__file__).resolve().parents[2]

LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            4096                 20000                files
Max locked memory         8388608              8388608              bytes
"""


def test_the_soft_open_files_limit_is_read_from_proc_limits() -> None:
    assert paths.parse_fd_limit(LIMITS) == 4096


def test_proc_limits_without_the_open_files_line_is_an_error() -> None:
    with pytest.raises(tools.ToolOutputError, match="Max open files"):
        paths.parse_fd_limit(LIMITS.replace("Max open files", "Max open filez"))


def test_the_limit_of_this_process_matches_getrlimit() -> None:
    assert paths.fd_limit(os.getpid()) == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.mark.parametrize(
    ("held", "per_connection", "count", "limit", "fits"),
    [
        (60, 1.01, 10_000, 20_000, True),  # a cross-node tunnel: one socket per connection (+ the pool)
        (60, 2.02, 10_000, 20_000, False),  # a same-node tunnel: both sides in one process
        (20, 2.0, 10_000, 20_000, False),  # stunnel: accepted + connected socket
        (20, 2.0, 10_000, 1 << 20, True),  # the same at a node's limit
        (0, 2.0, 10_000, 20_000, True),  # exactly at the limit fits
    ],
)
def test_a_hold_is_refused_only_when_it_cannot_fit(
    held: int, per_connection: float, count: int, limit: int, fits: bool
) -> None:
    why = paths.fd_shortfall(held, per_connection, count, limit)
    assert (why is None) == fits
    if not fits:
        assert why is not None and str(limit) in why and str(held + round(per_connection * count)) in why


@pytest.mark.parametrize(
    ("baseline", "peak", "samples", "done"),
    [
        (50, 10_150, [10_150, 6_000, 1_200, 150, 150], True),  # back to baseline + its 100 pooled connections
        (50, 10_150, [10_150, 6_000, 150], False),  # not stable yet: the last two samples differ
        (50, 10_150, [10_150, 10_150], False),  # stable, but nothing closed yet
        (50, 10_150, [700, 700], False),  # stalled with more than a twentieth of the phase still open
        (50, 60, [60, 60], True),  # a small phase: within the fixed slack
        (50, 50, [50], False),  # one sample says nothing about change
    ],
)
def test_teardown_is_over_when_files_are_back_near_baseline_and_stable(
    baseline: int, peak: int, samples: list[int], done: bool
) -> None:
    assert paths.torn_down(baseline, peak, samples) is done


def test_the_run_gives_itself_the_node_limit_or_keeps_its_hard_limit_and_says_why() -> None:
    code = (
        "import json, resource\n"
        "from bench.paths import raise_fd_limit\n"
        "files, why = raise_fd_limit()\n"
        "print(json.dumps([files, why, *resource.getrlimit(resource.RLIMIT_NOFILE)]))\n"
    )

    def lower() -> None:  # lowering is always allowed: start from a soft limit below a small hard one
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024))

    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True, preexec_fn=lower
    ).stdout
    files, why, soft, hard = json.loads(out)
    assert soft == hard == files
    wanted = min(paths.NODE_FD_LIMIT, int(Path("/proc/sys/fs/nr_open").read_text()))
    if why:
        assert files == 1024 and "CAP_SYS_RESOURCE" in why
    else:
        assert files == wanted
