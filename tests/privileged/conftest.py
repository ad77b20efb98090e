"""The privileged tier: real network namespaces, iptables and eBPF, as root.

CI runs as root on an eBPF-capable kernel, so nothing here may skip: a skip would hide a broken feature.
This conftest refuses to run without root and turns any skip into a failure.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the privileged tier needs root: run `sudo make test`")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"privileged tests must not skip (CI is root on an eBPF kernel): {report.longrepr}"
