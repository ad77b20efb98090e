"""Polling for the privileged tests: the one `wait_for` every lab test uses for "eventually" checks.

Why this module exists: the kernel, the agents and the tunnels converge asynchronously, so the tests poll
an independent oracle until it holds; one copy keeps the timeout message and the clock the same everywhere.

What it deliberately does not do: no oracles (oracles.py) and no assertions about the value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy and return that; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
