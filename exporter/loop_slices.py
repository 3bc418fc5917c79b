"""Long jobs on the event loop (a ``/metrics`` render, a periodic write of
the state) in slices of time: each gives the loop back once it has held it
:data:`LOOP_SLICE_SECONDS`, so polls and ``/-/healthy`` never wait long
behind it, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

LOOP_SLICE_SECONDS = 0.001
"""How long a job works on the event loop before it yields to it. A turn of
the loop runs a step of each job (a render, the store's write) and the polls
between, and a ``/-/healthy`` answer waits for about two turns: at 2 ms the
worst wait at 10,000 imports scraped back to back was 20-29 ms, at 1 ms
16-19 ms, the scrape p99 at 100,000 still under 2 s (``bench/scale.py``)."""


class LoopSlices:
    """One job's time on the event loop since it last yielded.

    Shared by every step of the job, so that the step from one of its parts
    to the next (a refresh of the kept lines, then the join of a body) is
    one slice, not a slice of each: counted apart, the two made 4-6 ms steps
    where each took 2 ms (``bench/scale.py`` at 10,000 imports)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._since = clock()

    def due(self) -> bool:
        """This job has held the loop for a slice: it should yield now."""
        return self._clock() - self._since >= LOOP_SLICE_SECONDS

    async def pause(self) -> None:
        """Yield to the event loop if a slice is used up."""
        if self.due():
            await self.yield_now()

    async def yield_now(self) -> None:
        """Yield to the event loop; the next slice starts when it comes back."""
        await asyncio.sleep(0)
        self.restart()

    def restart(self) -> None:
        """A new slice starts now: the job has just come back from waiting
        on something else (the loop went on meanwhile)."""
        self._since = self._clock()
