"""The time limit of a source's requests, kept by one event-loop timer per
source rather than one per request.

aiohttp's own timeout (``ClientTimeout``) makes a timer for every request,
pushes it on the event loop's heap and cancels it when the answer is in: 7 %
of a poll's CPU at 10,000 imports (``bench/polling.py``). A source's requests
all have the same limit, so their deadlines come in the order they start: the
oldest running request's is the next to pass, and one timer set for it
serves them all. When it fires, every request past its deadline has its task
cancelled (as aiohttp's timeout does; again later if it runs on), and the
timer is set again for the next deadline: about one timer per ``timeout``
while requests are quick.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

CANCEL_AGAIN_SECONDS = 1.0
"""A request still running this long after its task was cancelled for its
deadline is cancelled again (or after its timeout, if shorter): the
cancellation can be swallowed on the way (aiohappyeyeballs cancels and
awaits the losing connection attempts, and a cancellation arriving just then
goes to one of them), and aiohttp's own timeout caught that case by failing
the request's next wait at once."""


class Deadline:
    """One request's time limit: its task, when it ends (or is next looked
    at), and how often its task was cancelled for it."""

    __slots__ = ("at", "cancelling", "cancels", "running", "task")

    def __init__(self, task: asyncio.Task[Any], at: float, running: set[Deadline]) -> None:
        self.task = task
        self.at = at
        self.running = running
        self.cancelling = task.cancelling()
        """Cancellations the task already had: more at the end are not ours."""
        self.cancels = 0

    def finish(self) -> bool:
        """Stop timing the request (once; again does nothing). True if its
        time ran out and nothing else cancelled its task: then the task's
        ``CancelledError`` is this timeout, now withdrawn."""
        if self not in self.running:
            return False
        self.running.remove(self)
        if not self.cancels:
            return False
        left = self.task.cancelling()
        for _ in range(self.cancels):
            left = self.task.uncancel()
        return left <= self.cancelling


class Deadlines:
    """The running requests of one source, each with ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._running: set[Deadline] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> Deadline | None:
        """Time the current task's request from now, until
        :meth:`Deadline.finish`; None outside a task (then the caller keeps
        the time otherwise)."""
        task = asyncio.current_task()
        if task is None:
            return None
        loop = task.get_loop()
        deadline = Deadline(task, loop.time() + self.timeout, self._running)
        self._running.add(deadline)
        # No timer yet, or one of a loop gone (a source used by another).
        if self._timer is None or self._timer_loop is not loop:
            self._arm(loop, deadline.at)
        return deadline

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self._timer = loop.call_at(at, self._expire, loop)
        self._timer_loop = loop

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the tasks of the requests past their deadline; set the
        timer for the next deadline. The requests are few (a source's
        concurrency) and most are younger than the timeout."""
        self._timer = None
        now = loop.time()
        again = now + min(self.timeout, CANCEL_AGAIN_SECONDS)
        earliest = math.inf
        for deadline in self._running:
            if deadline.at <= now:
                deadline.cancels += 1
                deadline.at = again
                deadline.task.cancel()
            earliest = min(earliest, deadline.at)
        if earliest < math.inf:
            self._arm(loop, earliest)
