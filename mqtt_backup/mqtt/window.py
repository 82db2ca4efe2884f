"""A window of publishes awaiting their PUBACK, on any connection that publishes by coroutine."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Window:
    """At most `size` publishes awaiting their PUBACK; the first failure stops the stream."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None

    async def send(self, publish: Coroutine[Any, Any, None]) -> None:
        """Start a publish once a slot is free."""
        if self._failure is not None:
            publish.close()
            raise self._failure
        try:
            await self._slots.acquire()
        except BaseException:
            publish.close()  # cancelled while waiting for a slot: never started, never awaited
            raise
        task = asyncio.create_task(publish)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    async def drain(self) -> None:
        """Wait until every publish is acknowledged; re-raise the first failure."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._failure is not None:
            raise self._failure

    def cancel(self) -> None:
        """Abandon what is in flight (the connection is gone or the bridge stops)."""
        for task in self._tasks:
            task.cancel()
