"""Imports registered at runtime: the exporter's side of the registration API
(:class:`~exporter.tracking.ImportTracker`). Every change is stored before it
is applied in memory, so what is acknowledged is durable and a refused write
changes nothing; it runs under the persistence lock, ordered with reloads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence

from exporter.config import Config
from exporter.logs import context
from exporter.model import Origin
from exporter.persistence import Persistence
from exporter.poller import Poller, SourceScheduler
from exporter.sharding import Shard
from exporter.sources.base import ImportSpec
from exporter.state import ImportKey, ImportRecord, StateStore
from exporter.storage import SharedStorage, StoreError, to_row
from exporter.tracking import Refusal, TrackingError

log = logging.getLogger(__name__)


def not_stored(what: str, exc: StoreError) -> TrackingError:
    """The refusal of a change (or read) the database did not take; says why
    without the database's address."""
    return TrackingError(Refusal.NOT_STORED, f"{what}: {exc.public}")


RESYNC_DELAY = 1.0
"""Seconds before reading the registrations again when the database could not
be read (the store reconnects meanwhile)."""


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
            registry = self.registry
            owned = self.shard.owns(source, import_id)
            if not owned and registry is None:
                raise TrackingError(
                    Refusal.OTHER_SHARD,
                    f"{source}/{import_id} belongs to shard {self.shard.owner(source, import_id)} "
                    f"of {self.shard.total}, not to this one ({self.shard.index}): register it "
                    "there",
                    "id",
                )
            if registry is not None:
                return await self._claim(registry, scheduler, source, import_id, name, owned)
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
                raise not_stored("cannot store the registration", exc) from exc
            scheduler.add(ImportSpec(import_id, name), origin=Origin.API)
            record = self.state.imports[(source, import_id)]
        log.info(
            "tracking via the API" if existing is None else "already tracking via the API",
            extra=context(source=source, import_=import_id),
        )
        return record, existing is None

    async def _claim(
        self,
        registry: SharedStorage,
        scheduler: SourceScheduler,
        source: str,
        import_id: str,
        name: str | None,
        owned: bool,
    ) -> tuple[ImportRecord, bool]:
        """Register in the database replicas share. Always committed there,
        even for an import this process tracks (another replica may have just
        removed it: a 200 from memory would be a lie). The shard that owns it
        polls it, told by the database's notification if that is not this one;
        one stored already is answered as stored, only its name replaced."""
        limit = self._config().api.max_imports_per_source
        tracked = self.state.imports.get((source, import_id))
        wanted = tracked or ImportRecord(
            source=source,
            import_id=import_id,
            system=scheduler.source.system,
            name=name,
            origin=Origin.API,
        )
        if name is not None and wanted.name != name:
            wanted = dataclasses.replace(wanted, name=name)
        try:
            # What this process learnt of it goes in with it, if it is new there.
            claimed = await self.persistence.call(registry.claim, to_row(wanted), limit)
        except StoreError as exc:
            raise not_stored("cannot store the registration", exc) from exc
        if claimed is None:
            raise TrackingError(
                Refusal.LIMIT_REACHED,
                f"source {source!r} already has {limit} imports, the most "
                "api.max_imports_per_source allows (counted over every replica)",
            )
        record, new = claimed
        if owned and record.parked_at is None:
            scheduler.add(ImportSpec(import_id, record.name), origin=record.origin)
            record = self.state.imports.get((source, import_id), record)
        log.info(
            "tracking via the API" if new else "already tracking via the API",
            extra=context(
                source=source,
                import_=import_id,
                shard=self.shard.index if owned else self.shard.owner(source, import_id),
            ),
        )
        return record, new

    async def unregister(self, source: str, import_id: str) -> None:
        async with self.persistence.lock:  # ordered with reloads, as in register()
            registry = self.registry
            key = (source, import_id)
            if registry is not None and key not in self.state.imports:
                await self._forget_stored(registry, source, import_id)
                self.state.forget_parked(source, import_id)
                return
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

    async def _forget_stored(self, registry: SharedStorage, source: str, import_id: str) -> None:
        """Delete from the shared database an import this process does not
        poll: its owner stops when the database tells it."""
        try:
            stored = await self.persistence.read(registry.get, (source, import_id))
        except StoreError as exc:
            raise not_stored("cannot read the registration", exc) from exc
        if stored is None:
            raise TrackingError(
                Refusal.NOT_TRACKED, f"import {import_id!r} of source {source!r} is not tracked"
            )
        if stored.origin is Origin.CONFIG:
            raise TrackingError(
                Refusal.LISTED_IN_CONFIG,
                f"import {import_id!r} is listed in the config file; remove it there and reload",
            )
        await self._delete(source, import_id)
        log.info("stopped tracking via the API", extra=context(source=source, import_=import_id))

    # --- reads of the shared registry ---------------------------------------------

    @property
    def registry(self) -> SharedStorage | None:
        """The database every replica registers into, if there is one."""
        store = self.persistence.storage
        return store if isinstance(store, SharedStorage) else None

    @property
    def shared(self) -> bool:
        return self.registry is not None

    async def stored(self, source: str, import_id: str) -> ImportRecord | None:
        registry = self.registry
        if registry is None:
            return None
        try:
            return await self.persistence.read(registry.get, (source, import_id))
        except StoreError as exc:
            raise not_stored("cannot read the shared registry", exc) from exc

    async def stored_page(
        self, after: ImportKey | None, source: str | None, state: str | None, limit: int
    ) -> list[ImportRecord]:
        registry = self.registry
        if registry is None:
            return []
        try:
            return await self.persistence.read(registry.page, after, source, state, limit)
        except StoreError as exc:
            raise not_stored("cannot read the shared registry", exc) from exc

    async def _delete(self, source: str, import_id: str) -> None:
        try:
            await self.persistence.write(deleted=[(source, import_id)])
        except StoreError as exc:
            raise not_stored("cannot store the removal", exc) from exc

    # --- other replicas ---------------------------------------------------------

    def follow_store(self) -> None:
        """Pick up registrations and removals other replicas sharing the
        database made, when the database says there were some (its
        ``watch``: the imports changed, or None for all of them)."""
        registry = self.registry
        if registry is None:
            return
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        heard: set[ImportKey] = set()
        everything = False

        def note(keys: Sequence[ImportKey] | None) -> None:
            nonlocal everything
            if keys is None:
                everything = True
            else:
                heard.update(keys)
            changed.set()

        def on_change(keys: Sequence[ImportKey] | None) -> None:  # from the store's thread
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(note, keys)

        async def follow() -> None:
            nonlocal everything
            while True:
                await changed.wait()
                changed.clear()
                # Only this shard's imports concern it (a removal too: it
                # polls only what it owns).
                keys = None if everything else sorted(k for k in heard if self.shard.owns(*k))
                everything = False
                heard.clear()
                if not await self.sync_with_store(keys):
                    # What was heard is not lost: everything is read again.
                    await asyncio.sleep(RESYNC_DELAY)
                    note(None)

        self._following = asyncio.create_task(follow(), name="follow-store")
        registry.watch(on_change)

    async def stop_following(self) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following

    async def sync_with_store(self, keys: Sequence[ImportKey] | None = None) -> bool:
        """Follow what other replicas registered, renamed and removed: for
        ``keys`` (any origin but the config file's), or (None) for every
        registration. False if the database cannot be read."""
        registry = self.registry
        if registry is None:
            return True
        async with self.persistence.lock:  # ordered with this process's own writes
            try:
                if keys is None:
                    records = await self.persistence.call(registry.load_registered)
                else:
                    records = await self.persistence.call(registry.get_many, keys)
            except StoreError as exc:
                log.debug("cannot read the registrations of other replicas: %s", exc)
                return False
            stored = {(r.source, r.import_id): r for r in records}
            for key, record in stored.items():
                if record.origin is Origin.API:
                    self._follow_registration(key, record)
            if keys is None:  # every registration was read: what is not there is gone
                gone = [
                    key
                    for key, record in [*self.state.imports.items(), *self.state.parked.items()]
                    if record.origin is Origin.API and key not in stored
                ]
            else:  # these were named: what is not there was removed
                gone = [key for key in keys if key not in stored]
            for key in gone:
                self._follow_removal(key)
        return True

    def _follow_registration(self, key: ImportKey, stored: ImportRecord) -> None:
        scheduler = self.poller.schedulers.get(key[0])
        if scheduler is None or key in self.state.parked:
            return
        tracked = self.state.imports.get(key)
        if tracked is not None:
            if stored.name is not None and stored.name != tracked.name:
                scheduler.add(ImportSpec(key[1], stored.name), origin=tracked.origin)
                log.info(
                    "renamed through another replica",
                    extra=context(source=key[0], import_=key[1], name=stored.name),
                )
            return
        if scheduler.source.follows_server or not self.shard.owns(*key):
            return  # another shard's to poll
        scheduler.add(ImportSpec(key[1], stored.name), origin=Origin.API)
        log.info(
            "tracking: registered through another replica",
            extra=context(source=key[0], import_=key[1]),
        )

    def _follow_removal(self, key: ImportKey) -> None:
        if key in self.state.parked:
            self.state.forget_parked(*key)
            log.info(
                "forgot a parked import: removed through another replica",
                extra=context(source=key[0], import_=key[1]),
            )
            return
        tracked = self.state.imports.get(key)
        scheduler = self.poller.schedulers.get(key[0])
        if tracked is None or scheduler is None or tracked.origin is Origin.CONFIG:
            return
        scheduler.remove(key[1])
        log.info(
            "stopped tracking: removed through another replica",
            extra=context(source=key[0], import_=key[1]),
        )
