"""Imports registered at runtime: the exporter's side of the registration API
(:class:`~exporter.tracking.ImportTracker`). Every change is stored before it
is applied in memory, so what is acknowledged is durable and a refused write
changes nothing; it runs under the persistence lock, ordered with reloads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable

from exporter.config import Config
from exporter.logs import context
from exporter.model import Origin
from exporter.persistence import Persistence
from exporter.poller import Poller
from exporter.sharding import Shard
from exporter.sources.base import ImportSpec
from exporter.state import ImportRecord, StateStore
from exporter.storage import StoreError, to_row
from exporter.tracking import Refusal, TrackingError

log = logging.getLogger(__name__)


class Registration:
    """Registers and forgets imports for the API."""

    def __init__(
        self,
        state: StateStore,
        poller: Poller,
        persistence: Persistence,
        config: Callable[[], Config],
        shard: Shard | None = None,
    ) -> None:
        self.shard = shard or Shard()
        self.state = state
        self.poller = poller
        self.persistence = persistence
        self._config = config
        self._following: asyncio.Task[None] | None = None

    @property
    def api_tokens(self) -> tuple[str, ...]:
        return self._config().api.tokens

    async def register(
        self, source: str, import_id: str, name: str | None
    ) -> tuple[ImportRecord, bool]:
        # The scheduler is looked up under the lock, which a reload holds
        # while it replaces schedulers: a registration lands wholly before a
        # reload (which keeps it) or wholly after (on the new one).
        async with self.persistence.lock:
            scheduler = self.poller.schedulers.get(source)
            if scheduler is None:
                raise TrackingError(Refusal.UNKNOWN_SOURCE, f"no source named {source!r}", "source")
            if scheduler.source.follows_server:
                raise TrackingError(
                    Refusal.TAKES_NO_IDS,
                    f"source {source!r} is a {scheduler.source.system} server: it watches the "
                    "server's current import and takes no import ids",
                    "source",
                )
            if not self.shard.owns(source, import_id):
                raise TrackingError(
                    Refusal.OTHER_SHARD,
                    f"{source}/{import_id} belongs to shard {self.shard.owner(source, import_id)} "
                    f"of {self.shard.total}, not to this one ({self.shard.index}): register it "
                    "there",
                    "id",
                )
            existing = self.state.imports.get((source, import_id))
            if existing is None:
                limit = self._config().api.max_imports_per_source
                if self.state.imports.count_of(source) >= limit:
                    raise TrackingError(
                        Refusal.LIMIT_REACHED,
                        f"source {source!r} already tracks {limit} imports, the most "
                        "api.max_imports_per_source allows",
                    )
            # Stored first, then applied: a refused write changes nothing.
            if existing is None:
                wanted: ImportRecord | None = ImportRecord(
                    source=source,
                    import_id=import_id,
                    system=scheduler.source.system,
                    name=name,
                    origin=Origin.API,
                )
            elif name is not None and name != existing.name:
                wanted = dataclasses.replace(existing, name=name)
            else:
                wanted = None
            try:
                await self.persistence.write(rows=[to_row(wanted)] if wanted else [])
            except StoreError as exc:
                raise TrackingError(
                    Refusal.NOT_STORED, f"cannot store the registration: {exc.public}"
                ) from exc
            scheduler.add(ImportSpec(import_id, name), origin=Origin.API)
            record = self.state.imports[(source, import_id)]
        log.info(
            "tracking via the API" if existing is None else "already tracking via the API",
            extra=context(source=source, import_=import_id),
        )
        return record, existing is None

    async def unregister(self, source: str, import_id: str) -> None:
        async with self.persistence.lock:  # ordered with reloads, as in register()
            if (source, import_id) in self.state.parked:
                await self._delete(source, import_id)
                self.state.forget_parked(source, import_id)
                log.info(
                    "forgot a parked import via the API",
                    extra=context(source=source, import_=import_id),
                )
                return
            record = self.state.imports.get((source, import_id))
            scheduler = self.poller.schedulers.get(source)
            if record is None or scheduler is None:
                raise TrackingError(
                    Refusal.NOT_TRACKED, f"import {import_id!r} of source {source!r} is not tracked"
                )
            if record.origin is Origin.CONFIG:
                raise TrackingError(
                    Refusal.LISTED_IN_CONFIG,
                    f"import {import_id!r} is listed in the config file; "
                    "remove it there and reload",
                )
            # Deleted from the store first: a refused delete leaves it tracked
            # (a 204 that a restart takes back would be a lie).
            await self._delete(source, import_id)
            scheduler.remove(import_id)
        log.info("stopped tracking via the API", extra=context(source=source, import_=import_id))

    async def _delete(self, source: str, import_id: str) -> None:
        try:
            await self.persistence.write(deleted=[(source, import_id)])
        except StoreError as exc:
            raise TrackingError(
                Refusal.NOT_STORED, f"cannot store the removal: {exc.public}"
            ) from exc

    # --- other replicas ---------------------------------------------------------

    def follow_store(self) -> None:
        """Pick up registrations and removals other replicas sharing the
        database made, when the store says there were some (PostgreSQL's
        ``watch``; a store without it is this process's alone)."""
        store = self.persistence.storage
        watch: Callable[[Callable[[], None]], None] | None = getattr(store, "watch", None)
        if watch is None:
            return
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def on_change() -> None:  # from the store's thread
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(changed.set)

        async def follow() -> None:
            while True:
                await changed.wait()
                changed.clear()
                await self.sync_with_store()

        self._following = asyncio.create_task(follow(), name="follow-store")
        watch(on_change)

    async def stop_following(self) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following

    async def sync_with_store(self) -> None:
        """Track what the database has registered and this process does not,
        and stop tracking what was registered here but is no longer there."""
        store = self.persistence.storage
        if store is None:
            return
        async with self.persistence.lock:  # ordered with this process's own writes
            try:
                records = await asyncio.to_thread(store.load)
            except StoreError as exc:
                log.debug("cannot read the registrations of other replicas: %s", exc)
                return  # the store calls again once it reconnected
            stored = {(r.source, r.import_id): r for r in records if r.origin is Origin.API}
            for key, record in stored.items():
                scheduler = self.poller.schedulers.get(record.source)
                if key in self.state.imports or key in self.state.parked or scheduler is None:
                    continue
                if scheduler.source.follows_server or not self.shard.owns(*key):
                    continue  # another shard's to poll
                scheduler.add(ImportSpec(record.import_id, record.name), origin=Origin.API)
                log.info(
                    "tracking: registered through another replica",
                    extra=context(source=record.source, import_=record.import_id),
                )
            for key, record in list(self.state.imports.items()):
                scheduler = self.poller.schedulers.get(key[0])
                if record.origin is not Origin.API or key in stored or scheduler is None:
                    continue
                scheduler.remove(key[1])
                log.info(
                    "stopped tracking: removed through another replica",
                    extra=context(source=key[0], import_=key[1]),
                )
