"""The agent's status file: per-pod redirection status where `nodeagent inspect` and tests can read it.

Why this module exists: without Kubernetes there is no pods/status subresource to carry
`ambient.istio.io/redirection`, so the agent publishes the same facts in one JSON document per node,
/run/nodeagent/agent/<node>/status.json, replaced atomically (write a temporary file, rename), so a
reader never sees half a document. `inspect redirects` shows the STATUS column from here and everything
else from the kernel.

What it deliberately does not do: it is not the agent's memory (the agent never reads it back: on start
it learns from the kernel) and not a lock; writes are coalesced by the agent, not here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/run/nodeagent/agent")
STATUS_FILE = "status.json"
STATUS_VERSION = 1


def status_path(state_dir: Path, node: str) -> Path:
    return state_dir / node / STATUS_FILE


def write_status(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": STATUS_VERSION, **document}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
