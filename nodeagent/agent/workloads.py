"""The agent's workload source: the local inventory file, re-read when it changes.

Why this module exists: without Kubernetes the agent learns its node's pods from the lab's inventory
(nodeagent.inventory.local). A change is noticed through inotify on the file's directory (a tiny ctypes
wrapper: the rename of an atomic rewrite, or the close of an in-place write, wakes the agent at once -
this is the first step of the pod-add path), and the file's identity (mtime, size, inode) decides
whether anything really changed, so stray events in the directory cost one stat(). Where inotify is not
available (or the directory is missing at start) the identity is polled every `poll_s`; with inotify a
slow poll stays on as a safety net. A file that fails to parse is reported with the field that is wrong
and otherwise ignored: the agent keeps the last good inventory, so a typo never unenrolls a node's pods.
The Kubernetes source (list -> watch) offers the same `run()`.

What it deliberately does not do: no enrollment decisions (enrollment.py) and no diffing: it hands each
new good inventory over whole.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from nodeagent.inventory.local import InventoryError, load_inventory
from nodeagent.model import Inventory

log = logging.getLogger(__name__)

# Without inotify: a stat() every 20 ms is noise for the host and keeps "inventory changed -> pod captured"
# under the 50 ms p50 target. With inotify the poll is only a safety net, at least WATCHED_POLL_S apart.
DEFAULT_POLL_S = 0.02
WATCHED_POLL_S = 1.0

# linux/inotify.h
_IN_MODIFY_EVENTS = 0x8 | 0x40 | 0x80 | 0x100 | 0x200  # CLOSE_WRITE, MOVED_FROM, MOVED_TO, CREATE, DELETE
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


class DirectoryWatch:
    """An inotify fd watching one directory for entries being written, renamed, created or deleted."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, directory: Path) -> DirectoryWatch | None:
        """The watch, or None (logged at debug) when inotify is unavailable or the directory is missing."""
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError) as exc:
            log.debug("no inotify (%s); polling %s", exc, directory)
            return None
        add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            log.debug("inotify_init1: %s; polling %s", os.strerror(ctypes.get_errno()), directory)
            return None
        if add(fd, os.fsencode(directory), _IN_MODIFY_EVENTS | _IN_ONLYDIR) < 0:
            log.debug("cannot watch %s: %s; polling it", directory, os.strerror(ctypes.get_errno()))
            os.close(fd)
            return None
        return cls(fd)

    def drain(self) -> None:
        """Discard the queued events (the caller re-checks the file itself)."""
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise

    def close(self) -> None:
        os.close(self.fd)


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
        """Re-check on every inotify wake-up and at least every poll interval, forever (until cancelled)."""
        watch = DirectoryWatch.open(self.path.parent)  # armed before the check: no change falls in between
        self.check()
        if watch is None:
            while True:
                await asyncio.sleep(self._poll_s)
                self.check()
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def readable() -> None:
            watch.drain()
            woken.set()

        loop.add_reader(watch.fd, readable)
        try:
            while True:
                try:
                    async with asyncio.timeout(max(self._poll_s, WATCHED_POLL_S)):
                        await woken.wait()
                except TimeoutError:
                    pass
                woken.clear()
                self.check()
        finally:
            loop.remove_reader(watch.fd)
            watch.close()
