"""The agent's workload source: the local inventory file, re-read when it changes.

Why this module exists: without Kubernetes the agent learns its node's pods from the lab's inventory
(nodeagent.inventory.local). Polling the file's identity (mtime, size, inode) is cheap, works for edits
in place and for atomic renames alike, and needs no inotify. A file that fails to parse is reported with
the field that is wrong and otherwise ignored: the agent keeps the last good inventory, so a typo never
unenrolls a node's pods. The Kubernetes source (list -> watch) will offer the same `run(on_change)`.

What it deliberately does not do: no enrollment decisions (enrollment.py) and no diffing: it hands each
new good inventory over whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from nodeagent.inventory.local import InventoryError, load_inventory
from nodeagent.model import Inventory

log = logging.getLogger(__name__)

# A stat() every 20 ms is noise for the host and keeps "inventory changed -> pod captured" well under the
# 50 ms p50 target (a Kubernetes watch delivers changes without polling at all).
DEFAULT_POLL_S = 0.02


class InventoryFile:
    def __init__(
        self,
        path: Path,
        on_change: Callable[[Inventory], None],
        *,
        on_error: Callable[[str], None] = lambda problem: None,
        poll_s: float = DEFAULT_POLL_S,
        load: Callable[[Path], Inventory] = load_inventory,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._on_error = on_error
        self._poll_s = poll_s
        self._load = load
        self._seen: tuple[int, int, int] | None = None
        self.current: Inventory | None = None
        self.loaded = asyncio.Event()  # set by the first good inventory
        self.error: str | None = None  # why the file on disk is not the inventory in use, if it is not

    def check(self) -> bool:
        """Re-read the file if it changed; True when a new good inventory was handed over."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._reject(f"{self.path} does not exist")
            return False
        identity = (st.st_mtime_ns, st.st_size, st.st_ino)
        if identity == self._seen:
            return False
        self._seen = identity
        try:
            inventory = self._load(self.path)
        except InventoryError as exc:
            self._reject(str(exc))
            return False
        if self.error is not None:
            log.info("inventory %s is valid again", self.path)
            self.error = None
        self.current = inventory
        self.loaded.set()
        self._on_change(inventory)
        return True

    def _reject(self, problem: str) -> None:
        if problem != self.error:
            kept = "keeping the last good inventory" if self.current is not None else "no pods are enrolled yet"
            log.error("inventory rejected: %s; %s (fix the file and it is picked up again)", problem, kept)
            self.error = problem
            self._on_error(problem)

    async def run(self) -> None:
        """Poll forever (until cancelled)."""
        while True:
            self.check()
            await asyncio.sleep(self._poll_s)
