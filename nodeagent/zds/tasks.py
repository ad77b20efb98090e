"""Named, referenced, guarded asyncio tasks for the ZDS server and client.

Why this module exists: a bare `create_task` can be garbage-collected mid-flight and its exception is
only reported when nobody is looking any more. Every task the ZDS code starts goes through TaskSet: it
has a name (visible in asyncio debug output and in crash logs), the set holds a reference until it
ends, an unexpected exception is logged at once with that name, and the owner cancels and awaits them
all when it closes.

What it deliberately does not do: no restarting (the ZDS client's reconnect loop is its own policy) and
no readiness bookkeeping (the owners expose readiness).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("task %s crashed: %r", task.get_name(), exc, exc_info=exc)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
