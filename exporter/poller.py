"""Scheduling: when each import is polled, how many at once, and backing off.

Each source gets one :class:`SourceScheduler`: its imports in order of when
they are due, and ``concurrency`` workers. An import waits for its poll or is
in flight, never both and never twice, so a slow import only ever holds one
worker and never delays imports of other sources. Results go into the
:class:`StateStore`; nothing is fetched at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from exporter.logs import RateLimitedLog, context
from exporter.model import ErrorReason, Observation, Origin, SourceError
from exporter.redact import redact
from exporter.sources.base import ImportSpec, Source
from exporter.state import StateStore

log = logging.getLogger(__name__)

Entry = tuple[float, int, str]
"""A waiting import: when it is due, its push's generation, its id."""

START_SPREAD_FRACTION = 0.1
"""First polls are spread over this fraction of the interval (at most 5 s)."""
MAX_START_SPREAD = 5.0
BACKOFF_JITTER = 0.2
MAX_RETRY_AFTER = 3600.0
"""Longest hold an upstream's Retry-After gets (or max_backoff, if longer)."""


class SourceScheduler:
    """Polls the imports of one source on its interval, ``concurrency`` at a time."""

    def __init__(
        self,
        source: Source[Any],
        state: StateStore,
        *,
        interval: float,
        concurrency: int,
        max_backoff: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.state = state
        self.interval = interval
        self.concurrency = concurrency
        self.max_backoff = max(max_backoff, interval)
        self.clock = clock
        self.rng = rng or random.Random()
        self._queue_due: deque[float] = deque()
        """Waiting imports due within an interval and no earlier than the one
        before: most (a poll done, due again an interval later), each O(1).
        Three deques, an entry at the same place in each, not one of tuples:
        a tuple a poll, alive for an interval, was most of what each young
        collection of the cyclic GC walked (floats, ints and strings it does
        not track)."""
        self._queue_generation: deque[int] = deque()
        self._queue_id: deque[str] = deque()
        self._heap: list[Entry] = []
        """The other waiting imports (first polls spread, backoffs, holds), a
        heap: O(log n) each. An import is taken from whichever of the two has
        the earliest first."""
        self._generations = itertools.count()
        self._scheduled: dict[str, int] = {}
        """Each import waiting or in flight, and the generation of its one
        live entry: an entry of an import removed (and perhaps added again)
        since it was pushed is skipped when it comes up."""
        self._failures: dict[str, int] = {}
        self._poll_failures = RateLimitedLog(log, interval=60.0, burst=20)
        self._paused_until = 0.0
        self._source_failures = 0
        """Source-wide failures in a row: the schedule of the source's own hold."""
        self._held_by: SourceError | None = None
        """The source-wide failure holding the source (None: not held by one)."""
        self._wakeup = asyncio.Event()
        self._idle_workers = 0
        """Workers waiting for an import to be due: a push wakes them (while
        none waits, as all the time under load, a push has no one to wake)."""
        self._tasks: list[asyncio.Task[None]] = []

    # --- membership ---------------------------------------------------------

    def add(self, spec: ImportSpec, *, origin: Origin = Origin.CONFIG) -> None:
        """Track an import and schedule its first poll (spread with jitter).

        An import restored in a final, confirmed state is kept but not polled."""
        record = self.state.track(self.source.name, spec.id, name=spec.name, origin=origin)
        finished = record.confirmed_final and not self.source.follows_server
        if spec.id in self._scheduled or finished:
            return
        spread = min(self.interval * START_SPREAD_FRACTION, MAX_START_SPREAD)
        self._push(spec.id, self.clock() + self.rng.uniform(0, spread))

    def remove(self, import_id: str) -> None:
        """Stop polling an import; a poll in flight has its answer dropped."""
        self._scheduled.pop(import_id, None)
        self._failures.pop(import_id, None)
        self.source.forget_url(import_id)
        self.state.untrack(self.source.name, import_id)

    def _push(self, import_id: str, due: float) -> None:
        generation = self._scheduled[import_id] = next(self._generations)
        queue = self._queue_due
        # Not a long backoff at the queue's end: later polls would all go to
        # the heap until it is taken.
        if (not queue or due >= queue[-1]) and due <= self.clock() + self.interval:
            queue.append(due)
            self._queue_generation.append(generation)
            self._queue_id.append(import_id)
        else:
            heapq.heappush(self._heap, (due, generation, import_id))
        if self._idle_workers:
            self._wakeup.set()

    # --- running ------------------------------------------------------------

    def start(self) -> None:
        name = self.source.name
        for i in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._work(), name=f"poll:{name}:{i}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def _take_due(self) -> str | None:
        """The import due first, taken, if one is due and the source not held."""
        heap, scheduled = self._heap, self._scheduled
        dues, generations, ids = self._queue_due, self._queue_generation, self._queue_id
        while heap and scheduled.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)  # removed while waiting
        while ids and scheduled.get(ids[0]) != generations[0]:
            self._pop_queued()
        from_heap = bool(heap) and (not dues or heap[0][0] < dues[0])
        if from_heap:
            due = heap[0][0]
        elif dues:
            due = dues[0]
        else:
            return None
        now = self.clock()
        if due > now or self._paused_until > now:
            return None
        if from_heap:
            return heapq.heappop(heap)[2]
        return self._pop_queued()

    def _pop_queued(self) -> str:
        """The queue's first entry taken (from each of its deques): its id."""
        self._queue_due.popleft()
        self._queue_generation.popleft()
        return self._queue_id.popleft()

    def _first_due(self) -> float | None:
        """When the first import is due (None: none is waiting)."""
        heap, queue = self._heap, self._queue_due
        if heap and queue:
            return min(heap[0][0], queue[0])
        if heap:
            return heap[0][0]
        return queue[0] if queue else None

    async def _next_due(self) -> str:
        """Wait until an import is due (and the source is not held); take it."""
        while (import_id := self._take_due()) is None:
            self._wakeup.clear()
            first = self._first_due()
            self._idle_workers += 1
            try:
                if first is None:
                    await self._wakeup.wait()
                    continue
                delay = max(first, self._paused_until) - self.clock()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
            finally:
                self._idle_workers -= 1
        return import_id

    async def _work(self) -> None:
        # Workers take due imports themselves: no dispatcher task and no
        # queue hop per poll.
        poll = self.source.poll
        while True:
            # While imports are due, no coroutine to wait for one.
            import_id = self._take_due()
            if import_id is None:
                import_id = await self._next_due()
            generation = self._scheduled[import_id]
            # poll_once's steps, without its coroutine: one frame fewer for
            # every step of every poll to pass through.
            next_due: float | None
            try:
                observation = await poll(import_id)
            except Exception as exc:
                next_due = self._not_answered(import_id, exc)
            else:
                next_due = self._answered(import_id, observation)
            if self._scheduled.get(import_id) != generation:
                continue  # removed while in flight (and perhaps added again: pushed then)
            if next_due is None:
                del self._scheduled[import_id]
            else:
                self._push(import_id, next_due)

    async def poll_once(self, import_id: str) -> float | None:
        """Poll one import, record the outcome; return when to poll it next (None: never)."""
        try:
            observation = await self.source.poll(import_id)
        except Exception as exc:
            return self._not_answered(import_id, exc)
        return self._answered(import_id, observation)

    def _not_answered(self, import_id: str, exc: Exception) -> float:
        """Record a poll that raised; when to poll the import again."""
        if isinstance(exc, SourceError):
            return self._failed(import_id, exc)
        # A bug in an adapter must not stop the others.
        log.exception(
            "unexpected error polling",
            exc_info=exc,
            extra=context(source=self.source.name, import_=import_id),
        )
        bug = SourceError(ErrorReason.INVALID_RESPONSE, f"internal error: {type(exc).__name__}")
        return self._failed(import_id, bug)

    def _answered(self, import_id: str, observation: Observation) -> float | None:
        """Record an answer; when to poll the import next (None: never)."""
        name = self.source.name
        if self._failures.pop(import_id, None):
            log.info("import recovered", extra=context(source=name, import_=import_id))
        if self._held_by is not None:
            log.info(
                "source recovered", extra=context(source=name, reason=self._held_by.reason.value)
            )
            self._held_by = None
        self._source_failures = 0
        record = self.state.record_observation(name, import_id, observation)
        if record.confirmed_final and not self.source.follows_server:
            log.debug(
                "import finished", extra=context(source=name, import_=import_id, state=record.state)
            )
            self.source.forget_url(import_id)  # its slot goes to an import still polled
            return None
        return self.clock() + self.interval

    def _failed(self, import_id: str, error: SourceError) -> float:
        if error.source_wide:
            return self._source_failed(import_id, error)
        failures = self._failures.get(import_id, 0) + 1
        self._failures[import_id] = failures
        self.state.record_error(self.source.name, import_id, error)
        # Thousands of imports can fail alike at once (the upstream or the
        # network is down): a few lines a minute per source and reason.
        self._poll_failures.log(
            logging.WARNING,
            (self.source.name, error.reason),
            "poll failed",
            extra=context(
                source=self.source.name,
                import_=import_id,
                reason=error.reason.value,
                error=redact(error.message),
            ),
        )
        backoff: float = min(self.max_backoff, self.interval * 2.0 ** (failures - 1))
        backoff *= 1 + self.rng.uniform(-BACKOFF_JITTER, BACKOFF_JITTER)
        now = self.clock()
        if error.retry_after is not None:
            # The upstream told us when to come back: hold the whole source
            # (rate limits are per client, not per import), but not for ever:
            # "Retry-After: 1e12" must not stop the watching for good.
            retry_after = min(error.retry_after, max(self.max_backoff, MAX_RETRY_AFTER))
            self._paused_until = max(self._paused_until, now + retry_after)
            backoff = max(backoff, retry_after)
        return now + backoff

    def _source_failed(self, import_id: str, error: SourceError) -> float:
        """Hold the whole source on its own backoff schedule (or as long as the
        error asks), show the error on every import, and log it once per hold."""
        now = self.clock()
        name = self.source.name
        if self._held_by is not None and now < self._paused_until:
            # A poll that was in flight when the hold began: shown on its
            # import, not logged again. One that shared the failed call (a
            # token fetch) made no request of its own and is not counted.
            if error is not self._held_by:
                self.state.record_error(name, import_id, error)
            return self._paused_until
        self._source_failures += 1
        hold: float = min(self.max_backoff, self.interval * 2.0 ** (self._source_failures - 1))
        hold *= 1 + self.rng.uniform(-BACKOFF_JITTER, BACKOFF_JITTER)
        if error.retry_after is not None:
            hold = max(hold, min(error.retry_after, max(self.max_backoff, MAX_RETRY_AFTER)))
        self._paused_until = max(self._paused_until, now + hold)
        self._held_by = error
        self.state.record_source_error(name, error, self._scheduled.keys() | {import_id})
        log.warning(
            "source held: every import fails alike",
            extra=context(
                source=name,
                reason=error.reason.value,
                error=redact(error.message),
                hold_seconds=round(self._paused_until - now),
            ),
        )
        return self._paused_until


class Poller:
    """All source schedulers of one running configuration."""

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self.schedulers: dict[str, SourceScheduler] = {}

    def add_source(
        self,
        source: Source[Any],
        *,
        interval: float,
        concurrency: int,
        max_backoff: float,
        imports: Iterable[ImportSpec] = (),
        rng: random.Random | None = None,
    ) -> SourceScheduler:
        self.state.add_source(
            source.name, source.system, interval, fetches_tokens=source.fetches_tokens
        )
        scheduler = SourceScheduler(
            source,
            self.state,
            interval=interval,
            concurrency=concurrency,
            max_backoff=max_backoff,
            rng=rng,
        )
        for spec in imports:
            scheduler.add(spec)
        self.schedulers[source.name] = scheduler
        return scheduler

    async def remove_source(self, name: str, *, keep_state: bool = False) -> None:
        """Stop polling a source; unless ``keep_state``, forget it and its imports."""
        scheduler = self.schedulers.pop(name, None)
        if scheduler is not None:
            await scheduler.stop()
        if not keep_state:
            self.state.remove_source(name)

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.schedulers.values()))
