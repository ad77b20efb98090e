"""The privileged tier: real network namespaces, iptables and eBPF, as root.

CI runs as root on an eBPF-capable kernel, so nothing here may skip: a skip would hide a broken feature.
This conftest refuses to run without root and turns any skip into a failure. The lab is one per host
(its namespaces have fixed names), so a privileged session holds an exclusive lock on LAB_LOCK for its
whole run: concurrent sessions (and `make bench`, which takes the same lock) wait instead of tearing
down each other's lab.
"""

from __future__ import annotations

import fcntl
import os
import sys

import pytest

LAB_LOCK = "/run/nodeagent-lab.lock"  # = nodeagent.lab.cluster.LAB_LOCK (oracles here import no nodeagent)


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the privileged tier needs root: run `sudo make test`")
    fd = os.open(LAB_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for {LAB_LOCK}: another privileged test run or benchmark uses the lab", file=sys.stderr)
        fcntl.flock(fd, fcntl.LOCK_EX)
    config.stash[_LOCK_FD] = fd
    os.environ["NODEAGENT_LAB_LOCK_HELD"] = LAB_LOCK  # the demo and benchmark run by tests need not wait for it


_LOCK_FD = pytest.StashKey[int]()


def pytest_unconfigure(config: pytest.Config) -> None:
    fd = config.stash.get(_LOCK_FD, None)
    if fd is not None:
        os.close(fd)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"privileged tests must not skip (CI is root on an eBPF kernel): {report.longrepr}"
