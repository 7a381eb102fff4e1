"""Background tasks of the daemon, held so that asyncio does not lose them and so that stopping can cancel them.

asyncio keeps only weak references to tasks: one nobody holds can be garbage-collected mid-flight. And a task whose
exception nobody retrieves ends as "Task exception was never retrieved" on stderr at some later garbage collection,
outside the log's format: every task spawned here that fails is logged at once, with its traceback, as one entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from . import log


class Tasks:
    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()
        self.log = log.get()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._running.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error(f"background task {task.get_coro().__qualname__} failed: {exc!r}",  # type: ignore[union-attr]
                           exc_info=exc)
