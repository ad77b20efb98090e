"""bench/load.py's connrate report reaches the bench whole, even when its write to the pipe returns short.

The report is 0.3-1 MB of latencies, many times a pipe's 64 KiB, so the load generator blocks in write()
until the bench reads. A blocking pipe write returns early with what it has written so far when the writer
is signalled or stopped meanwhile. With PYTHONUNBUFFERED=1 (set in the bench's environment) print() goes
through a TextIOWrapper straight over the raw file, which drops the rest silently (python/cpython#85393):
the bench then read 64 or 128 KiB and a newline, and json.loads failed at "line 2 column 1 (char 131073)".
Here a SIGSTOP/SIGCONT while the pipe is full makes that short write happen on purpose.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
F_GETPIPE_SZ = 1032
LATENCIES = 40_000  # about 900 KB of JSON

# Runs load.py's own main() in connrate mode, with the measurement replaced by a large fixed result.
CHILD = f"""
from bench import load

async def measured(host, port, seconds, workers):
    return {{"seconds": 4.0, "latencies_s": [1e-3 + i * 1e-9 for i in range({LATENCIES})], "errors": {{}}}}

load.connrate = measured
load.main(["load.py", "connrate", "127.0.0.1", "9", "4", "8"])
"""


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _wait(what: str, cond: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _queued(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


@pytest.mark.parametrize("unbuffered", [True, False], ids=["PYTHONUNBUFFERED=1", "buffered"])
def test_connrate_report_survives_a_short_pipe_write(unbuffered: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=w, env=env, cwd=REPO)
    os.close(w)
    try:
        # The pipe is full: the child is blocked in the write of its report, part of it written.
        full = fcntl.fcntl(r, F_GETPIPE_SZ)
        _wait("the child to fill the pipe", lambda: _queued(r) >= full or proc.poll() is not None)
        assert proc.poll() is None, f"the child exited ({proc.returncode}) before filling the pipe"
        os.kill(proc.pid, signal.SIGSTOP)  # the pending stop ends that write() early, with a short count
        _wait("the child to stop", lambda: _state(proc.pid) == "T")
        os.kill(proc.pid, signal.SIGCONT)
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        assert proc.wait(30) == 0
    finally:
        os.close(r)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    out = b"".join(chunks).decode()
    assert out.endswith("}\n") and out.count("\n") == 1, f"{len(out)} bytes, ending {out[-40:]!r}"
    report = json.loads(out)
    assert len(report["latencies_s"]) == LATENCIES
    assert report["latencies_s"][-1] == 1e-3 + (LATENCIES - 1) * 1e-9
