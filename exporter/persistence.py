"""Keeps the state in the storage backend: what changed is written within a
second (a newer poll time alone within about 30 s) in chunks, retention forgets what
ended long ago, and every write is ordered with the others by one lock (which
a reload holds too while it replaces sources)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from exporter.logs import context
from exporter.loop_slices import LoopSlices
from exporter.state import ImportKey, ImportRecord, StateStore
from exporter.storage import Row, Storage, StoreError, to_row

log = logging.getLogger(__name__)

PERSIST_INTERVAL = 1.0
"""Seconds between writes of what polls learnt (registrations are written at once)."""
POLL_TIMES_WITHIN = 30
"""Imports whose only news is a newer poll time are written within about
this many writes (seconds): each write takes this fraction of them (1/30),
those waiting longest first, and each that has waited this long. All of
them every 30th write made a burst: at 100,000 imports about a second of
the event loop and the store's thread, which slowed the scrape it fell on
to 2.0-2.3 s (``bench/scale.py``)."""
RETENTION_SLICE = 10_000
"""Imports the retention looks at per write: with 100,000 imports an
import's retention ends within 10 s of its time."""
RETENTION_STEP = 1_000
"""Imports the retention looks at between two looks at the clock (about
0.5 ms): 10,000 at once held the event loop 4-5 ms, the longest step of
the loop at 10,000 imports (with the write's take of the changed imports)."""
WRITE_CHUNK = 2000
"""Rows per transaction of a periodic write: a registration waits behind one
chunk at most (a few ms), not a write of every import."""
ROW_BATCH = 50
"""Rows of a chunk made on the event loop between two looks at the clock: it
yields once a slice of time is used up (see :mod:`exporter.loop_slices`). A
chunk's rows at once held it 6-9 ms, the longest step of the loop while
polling at 10,000 imports; 500 rows between yields, 4-6 ms under polling."""

MAX_WAITING_READS = 16
"""API reads of the database waiting at once, at most (see :meth:`Persistence.read`)."""

T = TypeVar("T")
Forget = Callable[[ImportRecord], None]
"""Stops polling and forgets an import whose retention ended."""


class Persistence:
    """The state's side of a :class:`~exporter.storage.Storage` (None: memory only)."""

    def __init__(self, state: StateStore, storage: Storage | None) -> None:
        self.state = state
        self.storage = storage
        self.lock = asyncio.Lock()
        """Held by every write, by retention, and by a reload replacing sources."""
        self.task: asyncio.Task[None] | None = None
        # The storage's own thread: a database that hangs holds it, not the
        # default executor that renders /metrics. (Backends take one call at
        # a time anyway.)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="storage")
        self._waiting_reads = 0

    async def call(self, method: Callable[..., T], *args: object) -> T:
        """Run a storage method on the storage's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, method, *args)

    async def read(self, method: Callable[..., T], *args: object) -> T:
        """:meth:`call` for a client's read: past :data:`MAX_WAITING_READS`
        waiting (a database that hangs), refused at once (``busy``) rather
        than queued for minutes."""
        if self._waiting_reads >= MAX_WAITING_READS:
            raise StoreError("too many reads wait for the database", "busy")
        self._waiting_reads += 1
        try:
            return await self.call(method, *args)
        finally:
            self._waiting_reads -= 1

    def failing(self) -> str | None:
        """Why the last write failed (None: it succeeded, or there is no storage)."""
        return self.storage.health.failing if self.storage is not None else None

    async def write(self, *, rows: Sequence[Row] = (), deleted: Sequence[ImportKey] = ()) -> None:
        """Write a request's ``rows`` and ``deleted`` keys (not yet applied in
        memory) in one transaction. Only those: what polls learnt is
        :meth:`write_pending`'s, so a registration never waits behind a bulk
        write of every import. Call under :attr:`lock`."""
        if self.storage is None or not (rows or deleted):
            return
        await self.call(self.storage.write, rows, deleted)

    async def write_pending(self, *, poll_times: float = 0.0, due: float | None = None) -> None:
        """Write what changed since the last write (with ``poll_times`` that
        share of the imports whose only news is a newer poll time, those
        waiting longest first, and each waiting since ``due`` or before; 1:
        all) in transactions
        of at most :data:`WRITE_CHUNK` rows, each under :attr:`lock`, so a
        registration waits for one chunk at most. The changed imports are
        taken as keys; each chunk's rows are built on the event loop from the
        records as they are then (each row a consistent snapshot of its
        import), yielding to it after each slice of time, so no step costs
        the loop more than that; on failure what is left is kept for the
        next write."""
        if self.storage is None:
            return
        keys: Iterator[ImportKey] = iter(())
        chunk: list[ImportKey] = []
        deleted: list[ImportKey] = []
        first = True
        slices = LoopSlices()
        try:
            while True:
                async with self.lock:
                    if first:
                        # Taken under the lock: no registration lands between
                        # the take and the first chunk's deletes.
                        keys, deleted = self.state.take_change_keys(poll_times=poll_times, due=due)
                        # A step of its own (1.6-2.3 ms at 10,000 imports): the
                        # chunk's keys, picked out of the index next, take as long.
                        await slices.yield_now()
                    chunk = list(itertools.islice(keys, WRITE_CHUNK))
                    first = False
                    if not (chunk or deleted):
                        return
                    # An import forgotten since the take is not written back.
                    imports, parked = self.state.imports, self.state.parked
                    rows: list[Row] = []
                    for at in range(0, len(chunk), ROW_BATCH):
                        rows += [
                            to_row(record)
                            for key in chunk[at : at + ROW_BATCH]
                            if (record := imports.get(key) or parked.get(key)) is not None
                        ]
                        # Polls go on meanwhile; the lock keeps out every
                        # other write, retention and a reload.
                        await slices.pause()
                    # refresh: a shared database must not get back from them
                    # a registration another replica deleted.
                    await self.call(self.storage.write, [], deleted, rows)
                    written, chunk, deleted = len(chunk), [], []
                    slices.restart()  # the loop went on while the store wrote
                if written < WRITE_CHUNK:
                    return
        except BaseException:
            # A failed write, or cancelled (a stop, whose own last write then
            # takes them): what is not written yet is for the next write.
            self.state.requeue_keys(itertools.chain(chunk, keys), deleted)
            raise

    def start(self, retention: Callable[[], float], forget: Forget) -> None:
        self.task = asyncio.create_task(self._run(retention, forget), name="persist")

    async def _run(self, retention: Callable[[], float], forget: Forget) -> None:
        while True:
            await asyncio.sleep(PERSIST_INTERVAL)
            async with self.lock:
                keep = retention()
                slices = LoopSlices()
                scanned = min(RETENTION_SLICE, len(self.state.imports))
                for _ in range(0, scanned, RETENTION_STEP):
                    for record in self.state.expired(keep, at_most=RETENTION_STEP):
                        forget(record)
                        log.info(
                            "forgetting import: finished over the retention ago",
                            extra=context(
                                source=record.source,
                                import_=record.import_id,
                                retention_seconds=keep,
                            ),
                        )
                    await slices.pause()
                for record in self.state.expired_parked(keep):
                    self.state.forget_parked(record.source, record.import_id)
                    log.info(
                        "forgetting parked import: parked or finished over the retention ago",
                        extra=context(
                            source=record.source, import_=record.import_id, retention_seconds=keep
                        ),
                    )
            # The retention's scan and the write's first rows: two steps.
            await asyncio.sleep(0)
            try:
                await self.write_pending(
                    poll_times=1 / POLL_TIMES_WITHIN,
                    due=self.state.clock() - POLL_TIMES_WITHIN * PERSIST_INTERVAL,
                )
            except StoreError as exc:
                # The storage logged it when writes began to fail.
                log.debug("cannot store the state of the imports: %s", exc)
            if self.storage is not None:
                # A stat, but behind the storage's lock, which a write may hold.
                await self.call(self.storage.verify)

    async def stop(self) -> None:
        """Stop the periodic writes, write what is left, release the storage."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.storage is not None:
            try:
                await self.write_pending(poll_times=1.0)
            except StoreError as exc:
                log.error("cannot store the state of the imports: %s", exc)
            await self.call(self.storage.close)
        self._thread.shutdown(wait=False)
