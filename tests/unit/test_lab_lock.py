"""The host's lab lock (nodeagent.lab.cluster.exclusive): a holder's children use the lab; others wait or
are refused.

`nodeagent lab up` and `lab down` take the lock without waiting, so a benchmark that holds it and runs
`nodeagent lab up` as a child (bench/paths.py) must hand the lock down, as the privileged test session does
(NODEAGENT_LAB_LOCK_HELD). It did not: `make bench` failed at its first lab with "a demo, benchmark or
privileged test run is using the lab" - its own. The oracle is a real child process and flock(2) on a
temporary lock file.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.lab.cluster import LAB_LOCK_HELD_ENV, LabBusyError, exclusive

CHILD = """
import sys
from pathlib import Path
from nodeagent.lab.cluster import LabBusyError, exclusive
try:
    with exclusive(Path(sys.argv[1]), wait=False):
        print("took it")
except LabBusyError as exc:
    print("refused:", exc)
"""


def child(lock: Path, env: dict[str, str]) -> str:
    argv = [sys.executable, "-c", CHILD, str(lock)]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_holders_children_use_the_lab_and_others_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAB_LOCK_HELD_ENV, raising=False)
    lock = tmp_path / "lab.lock"
    with exclusive(lock):
        assert child(lock, dict(os.environ)) == "took it"  # our child: the lock is held for it
        stranger = {k: v for k, v in os.environ.items() if k != LAB_LOCK_HELD_ENV}
        assert child(lock, stranger).startswith("refused: a demo, benchmark or privileged test run is using the lab")
    assert LAB_LOCK_HELD_ENV not in os.environ  # handed down only while held
    assert child(lock, dict(os.environ)) == "took it"


def test_without_waiting_a_busy_lock_is_an_error_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAB_LOCK_HELD_ENV, raising=False)
    lock = tmp_path / "lab.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LabBusyError, match="is using the lab"), exclusive(lock, wait=False):
            pass
    finally:
        os.close(fd)
