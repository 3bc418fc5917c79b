"""Big reads (pages of the list API, the status page) off the event loop, and
paced so that clients looping on them cannot starve /metrics renders, polls
or registrations of the GIL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

SHARE = 0.3
"""At most this share of the time goes to big reads: after each slice of
work the reading thread sleeps (holding no GIL) for the rest."""


class BulkReads:
    """One thread, shared by every big read of an app: reads queue behind
    each other instead of multiplying, and each yields the GIL between slices."""

    def __init__(self, share: float = SHARE) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-reads")
        self._rest = (1 - share) / share

    async def run(self, work: Callable[[BulkReads], T]) -> T:
        """Run ``work(self)`` on the reads thread; it calls :meth:`pace` between slices."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, self)

    def pace(self, slice_started: float) -> float:
        """Sleep in proportion to the slice that started at ``slice_started``
        (``time.perf_counter()``); return when the next slice starts."""
        elapsed = time.perf_counter() - slice_started
        time.sleep(elapsed * self._rest)
        return time.perf_counter()


def unpaced(_slice_started: float) -> float:
    """:meth:`BulkReads.pace` for work run directly (tests, the page renderer's
    synchronous form)."""
    return time.perf_counter()
