"""The time limit of a source's requests, kept by one event-loop timer per
source rather than one per request.

aiohttp's own timeout (``ClientTimeout``) makes a timer for every request,
pushes it on the event loop's heap and cancels it when the answer is in: 7 %
of a poll's CPU at 10,000 imports (``bench/polling.py``). A source's requests
all have the same limit, so their deadlines come in the order they start: the
oldest running request's is the next to pass, and one timer set for it
serves them all. When it fires, every request past its deadline has its task
cancelled (as aiohttp's timeout does), and the timer is set again for the
oldest request still running: about one timer per ``timeout`` while requests
are quick.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Deadline:
    """One request's time limit: its task, when it ends, and whether it passed."""

    __slots__ = ("at", "cancelling", "done", "expired", "running", "task")

    def __init__(self, task: asyncio.Task[Any], at: float, running: dict[Deadline, None]) -> None:
        self.task = task
        self.at = at
        self.running = running
        self.cancelling = task.cancelling()
        """Cancellations the task already had: more at the end are not ours."""
        self.expired = False
        self.done = False

    def finish(self) -> bool:
        """Stop timing the request (once; again does nothing). True if its
        time ran out and nothing else cancelled its task: then the task's
        ``CancelledError`` is this timeout, now withdrawn."""
        if self.done:
            return False
        self.done = True
        del self.running[self]
        return self.expired and self.task.uncancel() <= self.cancelling


class Deadlines:
    """The running requests of one source, each with ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._running: dict[Deadline, None] = {}
        """In the order the requests started, which is the order of their deadlines."""
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> Deadline | None:
        """Time the current task's request from now, until
        :meth:`Deadline.finish`; None outside a task (then the caller keeps
        the time otherwise)."""
        task = asyncio.current_task()
        if task is None:
            return None
        loop = task.get_loop()
        deadline = Deadline(task, loop.time() + self.timeout, self._running)
        self._running[deadline] = None
        if self._timer is None:
            self._timer = loop.call_at(deadline.at, self._expire, loop)
        return deadline

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for deadline in self._running:
            if deadline.expired:
                continue
            if deadline.at > now:
                self._timer = loop.call_at(deadline.at, self._expire, loop)
                return
            deadline.expired = True
            deadline.task.cancel()
