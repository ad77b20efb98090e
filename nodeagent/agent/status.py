"""The agent's status file: per-pod redirection status where `nodeagent inspect` and tests can read it.

Why this module exists: without Kubernetes there is no pods/status subresource to carry
`ambient.istio.io/redirection`, so the agent publishes the same facts in one JSON document per node,
/run/nodeagent/agent/<node>/status.json, replaced atomically (write a temporary file, rename), so a
reader never sees half a document. `inspect redirects` shows the STATUS column from here and everything
else from the kernel.

`run_writer` is the agent's write loop: a change is written at once (a pod's `enabled` must not wait on a
timer: it is the end of the pod-add path), and only bursts are coalesced - after each write the loop rests
for a multiple of the CPU time that write cost, so writing the file never takes more than about a tenth
of the agent's CPU however many pods change, and a single change on a quiet node is on disk within a
millisecond or two.

What it deliberately does not do: it is not the agent's memory (the agent never reads it back: on start
it learns from the kernel) and not a lock.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/run/nodeagent/agent")
STATUS_FILE = "status.json"
STATUS_VERSION = 1
# After a write, rest REST_FACTOR times what it cost (so writing is at most ~1/(1+REST_FACTOR) of the
# time), at least MIN_REST_S and at most MAX_REST_S (a burst of changes still lands within that).
REST_FACTOR = 9.0
MIN_REST_S = 0.002
MAX_REST_S = 0.05


def status_path(state_dir: Path, node: str) -> Path:
    return state_dir / node / STATUS_FILE


def write_status(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": STATUS_VERSION, **document}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


async def run_writer(
    dirty: asyncio.Event,
    write: Callable[[], None],
    *,
    max_rest: float = MAX_REST_S,
    cpu_clock: Callable[[], float] = time.thread_time,
) -> None:
    """Forever: wait for `dirty`, write, rest in proportion to the write's CPU cost (see the module doc).

    CPU time, not wall time: a write that waits on the disk costs the node nothing, and a rest scaled by
    that wait would hold back the next pod's `enabled` for nothing."""
    while True:
        await dirty.wait()
        await asyncio.sleep(0)  # changes made in the same turn of the loop go out in one write
        dirty.clear()
        started = cpu_clock()
        write()
        cost = cpu_clock() - started
        await asyncio.sleep(min(max_rest, max(MIN_REST_S, cost * REST_FACTOR)))


def read_status(path: Path) -> dict[str, Any] | None:
    """The last document an agent wrote, or None when there is none (or it is unreadable)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == STATUS_VERSION else None


def agent_alive(document: dict[str, Any]) -> bool:
    """Whether the process that wrote `document` still runs (a SIGKILLed agent leaves its file behind)."""
    pid = document.get("pid")
    if not document.get("running") or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
