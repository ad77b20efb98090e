"""BenchLab.start: the servers a benchmark run leaves running must never stall on their own output."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

from bench.paths import BenchLab


def test_a_server_that_keeps_writing_does_not_block_on_an_unread_pipe(tmp_path: Path) -> None:
    """iperf3 -s prints a report per test and nothing reads it: a pipe would fill at 64 KiB and stall it."""
    lab = BenchLab(types.SimpleNamespace(inventory=None))  # type: ignore[arg-type]  # start() needs no lab
    wrote = tmp_path / "wrote"
    script = (
        "import sys, time\n"
        "sys.stdout.write('x' * (1 << 20)); sys.stdout.flush()\n"
        f"open({str(wrote)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    try:
        lab.start([sys.executable, "-c", script])
        deadline = time.monotonic() + 10
        while not wrote.exists():
            assert time.monotonic() < deadline, "the server is stuck writing 1 MiB to a pipe nobody reads"
            time.sleep(0.05)
    finally:
        lab.stop_all()
