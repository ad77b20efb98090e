"""Every ZDS test runs on both event loops (asyncio and uvloop) and must leave no file descriptor open."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
async def no_fd_leak() -> AsyncIterator[None]:
    """Fds open after the test (servers and clients closed) must equal those before it."""
    before = open_fds()
    yield
    for _ in range(50):  # closes triggered by the test's last awaits may need a loop turn or two
        gc.collect()
        leaked = open_fds() - before
        if not leaked:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"file descriptors leaked: {describe_fds(leaked)}")


def describe_fds(fds: set[int]) -> dict[int, str]:
    described = {}
    for fd in fds:
        try:
            described[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            described[fd] = "(closed meanwhile)"
    return described


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A socket path short enough for AF_UNIX (108 bytes), in a directory the server must create."""
    root = tempfile.mkdtemp(prefix="zds-", dir="/tmp")
    yield os.path.join(root, "run", "ztunnel.sock")
    shutil.rmtree(root)
