"""Keeps the state in the storage backend: what changed is written within a
second (a newer poll time alone every 30 s), retention forgets what ended long
ago, and every write that answers a request is ordered with the others by one
lock (which a reload holds too while it replaces sources)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence

from exporter.logs import context
from exporter.state import ImportKey, ImportRecord, StateStore
from exporter.storage import Row, Storage, StoreError, to_row

log = logging.getLogger(__name__)

PERSIST_INTERVAL = 1.0
"""Seconds between writes of what polls learnt (registrations are written at once)."""
POLL_TIMES_EVERY = 30
"""Write imports whose only news is a newer poll time every this many writes."""

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

    def failing(self) -> str | None:
        """Why the last write failed (None: it succeeded, or there is no storage)."""
        return self.storage.health.failing if self.storage is not None else None

    async def write(
        self,
        *,
        with_poll_times: bool = False,
        rows: Sequence[Row] = (),
        deleted: Sequence[ImportKey] = (),
    ) -> None:
        """Write what changed since the last write, and a request's ``rows`` and
        ``deleted`` keys (not yet applied in memory), in one transaction; on
        failure keep what was pending for the next write. Call under :attr:`lock`."""
        changed, forgotten = self.state.take_changes(with_poll_times=with_poll_times)
        if self.storage is None or not (changed or forgotten or rows or deleted):
            return
        gone = set(deleted)
        # A snapshot, taken on the loop; the request's rows last, so they win.
        pending = [to_row(r) for r in changed if (r.source, r.import_id) not in gone]
        try:
            await asyncio.to_thread(
                self.storage.write, rows, [*forgotten, *deleted], refresh=pending
            )
        except StoreError:
            self.state.requeue(changed, forgotten)
            raise

    def start(self, retention: Callable[[], float], forget: Forget) -> None:
        self.task = asyncio.create_task(self._run(retention, forget), name="persist")

    async def _run(self, retention: Callable[[], float], forget: Forget) -> None:
        for tick in itertools.count(1):
            await asyncio.sleep(PERSIST_INTERVAL)
            async with self.lock:
                keep = retention()
                for record in self.state.expired(keep):
                    forget(record)
                    log.info(
                        "forgetting import: finished over the retention ago",
                        extra=context(
                            source=record.source, import_=record.import_id, retention_seconds=keep
                        ),
                    )
                for record in self.state.expired_parked(keep):
                    self.state.forget_parked(record.source, record.import_id)
                    log.info(
                        "forgetting parked import: parked or finished over the retention ago",
                        extra=context(
                            source=record.source, import_=record.import_id, retention_seconds=keep
                        ),
                    )
                try:
                    await self.write(with_poll_times=tick % POLL_TIMES_EVERY == 0)
                except StoreError as exc:
                    # The storage logged it when writes began to fail.
                    log.debug("cannot store the state of the imports: %s", exc)
            if self.storage is not None:
                # A stat, but behind the storage's lock, which a write may hold.
                await asyncio.to_thread(self.storage.verify)

    async def stop(self) -> None:
        """Stop the periodic writes, write what is left, release the storage."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.storage is not None:
            async with self.lock:
                try:
                    await self.write(with_poll_times=True)
                except StoreError as exc:
                    log.error("cannot store the state of the imports: %s", exc)
            self.storage.close()
