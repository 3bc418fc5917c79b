"""Wires one running exporter: config -> sources -> poller -> state -> web,
with the state kept in the store across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from exporter import __version__
from exporter.config import Config, ConfigError
from exporter.exposition import ImportLines, return_large_buffers_to_the_os
from exporter.logs import RateLimitedLog
from exporter.metrics import StoreHealthCollector, build_registry
from exporter.poller import Poller
from exporter.sources import build_source
from exporter.sources.base import ImportSpec
from exporter.state import ImportKey, ImportRecord, StateStore
from exporter.store import Row, Store, StoreError, to_row
from exporter.tracking import TrackingError
from exporter.web import create_web_app
from exporter.webconfig import (
    WebConfig,
    WebSecurity,
    build_ssl_context,
    configure_ssl_context,
    dropped_client_cas,
    load_web_config,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 10451
RENDER_SWITCH_INTERVAL = 0.001
PERSIST_INTERVAL = 1.0
"""Seconds between writes of what polls learnt (registrations are written at once)."""
POLL_TIMES_EVERY = 30
WRITE_CHUNK = 2000
"""Rows per transaction of a periodic write: a registration waits behind one
chunk at most (a few ms), not a write of every import."""
"""Write imports whose only news is a newer poll time every this many writes."""
SHUTDOWN_TIMEOUT = 5.0
DEFAULT_MAX_REQUESTS = 40
"""``--web.max-requests``: as node_exporter's default (the command line's;
an ``Exporter`` built in code has no limit unless given one)."""
HEADER_READ_TIMEOUT = 10.0
"""Seconds a connection may take to send a request's headers (from the
connection's start or the end of the previous answer); then it is closed."""


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """``host:port``, ``:port`` or ``[::1]:port`` -> (host or None for all, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"--web.listen-address {address!r}: expected host:port, like :{DEFAULT_PORT}"
        )
    host = host.strip("[]")
    return (host or None), int(port)


ConfigLoader = Callable[[], Config]


def freeze_long_lived(*, collect: bool = True) -> None:
    """Move every object alive now (the config, the records, the sources'
    prepared requests, the modules) out of the cyclic collector's sight, so
    no collection walks them again: with 100,000 imports a full collection
    walked millions of objects with the GIL held. They are still freed by
    reference counting when dropped (the state's objects form no cycles).

    ``collect`` first (after a reload: it walks only what is not frozen yet);
    at start-up it would walk everything once, on the event loop, for the
    little cyclic garbage a start-up leaves, which then stays."""
    if collect:
        gc.collect()
    gc.freeze()


class ListenError(Exception):
    """The listen address cannot be bound (in use, not an address of this host)."""


class Exporter:
    """One exporter process's moving parts, started and stopped together."""

    def __init__(
        self,
        config: Config,
        listen_address: str = f":{DEFAULT_PORT}",
        web_config_file: str | None = None,
        config_loader: ConfigLoader | None = None,
        storage_path: str | None = None,
        *,
        max_requests: int = 0,
        header_timeout: float = HEADER_READ_TIMEOUT,
    ) -> None:
        self.config = config
        self.config_loader = config_loader
        # Opened first: a corrupt database stops the start-up with a clear error.
        self.store = Store(storage_path) if storage_path is not None else None
        self.listen_address = listen_address
        self.host, self.port = parse_listen_address(listen_address)
        self.web_config_file = web_config_file
        self.web_config = load_web_config(web_config_file) if web_config_file else None
        self.web_security = WebSecurity(self.web_config) if self.web_config else None
        self.ssl_context = None
        if self.web_config is not None and self.web_config.tls is not None:
            assert web_config_file is not None
            self.ssl_context = build_ssl_context(self.web_config.tls, Path(web_config_file).parent)
            if self.web_config.http_server_config and self.web_config.http_server_config.http2:
                log.info("http2 in %s: aiohttp serves HTTP/1.1 only", web_config_file)
        self.state = StateStore()
        self.poller = Poller(self.state)
        # The per-import families are kept rendered (exporter.exposition);
        # the registry has the per-source and per-process ones.
        self.import_lines = ImportLines(self.state)
        self.registry = build_registry(self.state, imports=False)
        if self.store is not None:
            self.registry.register(StoreHealthCollector(self.store.health))
        self.web_app = create_web_app(
            self.state,
            self.registry,
            web_config=self.web_security,
            reload=self.reload,
            tracker=self,
            store_failing=self._store_failing,
            max_requests=max_requests,
            import_lines=self.import_lines,
        )
        self.header_timeout = header_timeout
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._persist_task: asyncio.Task[None] | None = None
        self._quiet_log = RateLimitedLog(log)
        self._previous_exception_handler: Any = None

    async def start(self) -> None:
        # Renders run in a worker thread; a short GIL switch interval keeps
        # the event loop's many small I/O steps from queueing behind a render
        # for 5 ms each (the convoy effect).
        sys.setswitchinterval(RENDER_SWITCH_INTERVAL)
        return_large_buffers_to_the_os()
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": f"import-status-exporter/{__version__}"},
            # Concurrency is limited per source by each scheduler's workers.
            connector=aiohttp.TCPConnector(limit=0),
        )
        if self.store is not None:
            restored = await asyncio.to_thread(self.store.load)
            self.state.restore(restored)
            log.info("restored %d imports from %s", len(restored), self.store.path)
        self._warn_deprecations(self.config)
        await self._apply(self.config, previous=None)
        # Stored imports of sources the config no longer has: registered ones
        # are parked (a config edit never deletes what a pipeline registered).
        configured = {source.name for source in self.config.sources}
        for name in sorted({record.source for record in self.state.imports.values()}):
            if name not in configured:
                self._park(name)
        self.state.record_reload(success=True)
        self._persist_task = asyncio.create_task(self._persist_loop(), name="persist")
        # Every import's lines rendered before listening (about 0.7 s at
        # 100,000), so the first scrape serves the restored state at once.
        self.import_lines.take_changes()
        loop = asyncio.get_running_loop()
        self._previous_exception_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        # aiohttp's keep-alive timer runs from a connection's start and from
        # each answer until the next request's headers are complete: it is a
        # header-read timeout too, so a slow or silent client (slowloris)
        # cannot hold a connection.
        self._runner = web.AppRunner(
            self.web_app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            keepalive_timeout=self.header_timeout,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()  # nothing left open behind the one-line error
            # asyncio's message repeats the address; the errno says it plainly.
            cause = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ListenError(f"cannot listen on {self.listen_address}: {cause}") from None
        if self.port == 0:
            self.port = self.bound_port()
        freeze_long_lived(collect=False)
        gc.enable()  # the command line starts with it off (cli.run)
        log.info(
            "listening on %s:%s, watching %d imports from %d sources",
            self.host or "*",
            self.port,
            len(self.state.imports),
            len(self.config.sources),
        )

    async def _apply(self, config: Config, previous: Config | None) -> None:
        """Make the running sources match ``config``, keeping the state of
        every import that is still configured (or was registered at runtime)."""
        assert self._session is not None
        old = {source.name: source for source in previous.sources} if previous else {}
        new_names = {source.name for source in config.sources}
        for name in old.keys() - new_names:
            self._park(name)
            await self.poller.remove_source(name)
            log.info("source %s removed", name)
        for source_config in config.sources:
            name = source_config.name
            before = old.get(name)
            if before is not None and before == source_config:
                continue  # unchanged, secrets included: keep it running as it is
            source = build_source(
                source_config,
                self._session,
                observe=self._observer(name),
                token_observer=functools.partial(self.state.record_token_request, name),
            )
            # Imports of another system than the source's now cannot be polled
            # by it; those parked earlier of this system come back.
            self._park(name, unless_system=source.system)
            back = self.state.unpark(name, source.system)
            if back:
                log.info("brought back %d parked imports of source %s", len(back), name)
            # Registered at runtime (or restored from the store): kept across
            # a rebuild of the source.
            kept_runtime = [
                ImportSpec(record.import_id, record.name)
                for record in self.state.imports_of(name)
                if record.origin != "config"
            ]
            if before is not None:
                await self.poller.remove_source(name, keep_state=True)
            configured = source.imports()
            scheduler = self.poller.add_source(
                source,
                interval=source_config.interval,
                concurrency=source_config.concurrency,
                max_backoff=source_config.max_backoff,
                imports=configured,
            )
            for spec in kept_runtime:
                scheduler.add(spec, origin="api")
            wanted = {spec.id for spec in configured} | {spec.id for spec in kept_runtime}
            for record in self.state.imports_of(name):
                if record.import_id not in wanted:
                    self.state.untrack(name, record.import_id)
            scheduler.start()
        self.config = config

    @staticmethod
    def _warn_deprecations(config: Config) -> None:
        for source_config in config.sources:
            for warning in source_config.deprecations():
                log.warning("deprecated setting source=%s: %s", source_config.name, warning)

    def _park(self, source: str, unless_system: str | None = None) -> None:
        parked, forgotten = self.state.park(source, unless_system=unless_system)
        for record in forgotten:
            log.info(
                "forgetting import source=%s import=%s: its source is no longer configured",
                record.source,
                record.import_id,
            )
        if parked:
            log.info(
                "parked %d imports of source %s: registered through the API, they are kept "
                "(not polled, not exported) until a source of that name returns, at most %gs",
                len(parked),
                source,
                self.config.retention,
            )

    def _store_failing(self) -> str | None:
        return self.store.health.failing if self.store is not None else None

    def _observer(self, source: str) -> Callable[[float], None]:
        def observe(duration: float) -> None:
            self.state.record_request(source, duration)

        return observe

    async def reload(self) -> list[str]:
        """Load the config again and apply it; return its errors (empty: applied)."""
        if self.config_loader is None:
            return ["this exporter was not started from a config file"]
        async with self._reload_lock:
            try:
                # Both files are checked before either is applied.
                web_config = self._load_web_config_again()
                config = self.config_loader()
            except ConfigError as exc:
                self.state.record_reload(success=False)
                log.error(
                    "config reload failed, keeping the running config: %s", "; ".join(exc.errors)
                )
                return exc.errors
            self._warn_deprecations(config)
            if web_config is not None:
                await self._apply_web_config(web_config)
            # Under the write lock: no registration runs between the
            # snapshot of an old scheduler's imports and its replacement.
            async with self._write_lock:
                await self._apply(config, previous=self.config)
            self.state.record_reload(success=True)
            freeze_long_lived()
            log.info("config reloaded: %d sources", len(config.sources))
            return []

    def _load_web_config_again(self) -> WebConfig | None:
        """``--web.config.file`` read again (None without one); ConfigError if
        it is invalid or asks for what needs a restart."""
        if self.web_config_file is None:
            return None
        web_config = load_web_config(self.web_config_file)
        if (web_config.tls is None) != (self.ssl_context is None):
            raise ConfigError(
                [
                    f"{self.web_config_file}: tls_server_config: turning TLS on or off "
                    "needs a restart"
                ]
            )
        return web_config

    async def _apply_web_config(self, web_config: WebConfig) -> None:
        """Basic auth, headers and rate limit take effect at once; TLS settings
        and certificates are loaded into the serving SSLContext, so the next
        connection uses them (a rotated certificate needs no restart)."""
        assert self.web_config_file is not None and self.web_security is not None
        base_dir = Path(self.web_config_file).parent
        tls = web_config.tls
        if tls is not None and self.ssl_context is not None:
            # Checked by load_web_config on a scratch context: this cannot fail
            # unless the files changed in between; then the old settings stay.
            try:
                configure_ssl_context(self.ssl_context, tls, base_dir)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error("cannot load the new TLS settings, keeping the old: %s", exc)
            dropped = dropped_client_cas(self.ssl_context, tls, base_dir)
            if dropped:
                log.warning(
                    "%d client CA(s) removed from %s are still trusted until a restart: "
                    "a running TLS context can add CAs, not drop them",
                    dropped,
                    self.web_config_file,
                )
        self.web_security.apply(await WebSecurity.prepare(web_config))
        self.web_config = web_config

    def bound_port(self) -> int:
        assert self._runner is not None
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("not listening")

    # --- registration (the API's side of exporter.tracking) ------------------

    @property
    def api_tokens(self) -> tuple[str, ...]:
        return self.config.api.tokens

    async def register(
        self, source: str, import_id: str, name: str | None
    ) -> tuple[ImportRecord, bool]:
        # The scheduler is looked up under the write lock, which a reload
        # holds while it replaces schedulers: a registration lands wholly
        # before a reload (which keeps it) or wholly after (on the new one).
        async with self._write_lock:
            scheduler = self.poller.schedulers.get(source)
            if scheduler is None:
                raise TrackingError(404, f"no source named {source!r}", "source")
            if scheduler.source.follows_server:
                raise TrackingError(
                    400,
                    f"source {source!r} is a {scheduler.source.system} server: it watches the "
                    "server's current import and takes no import ids",
                    "source",
                )
            existing = self.state.imports.get((source, import_id))
            if existing is None:
                limit = self.config.api.max_imports_per_source
                if self.state.imports.count_of(source) >= limit:
                    raise TrackingError(
                        409,
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
                    origin="api",
                )
            elif name is not None and name != existing.name:
                wanted = dataclasses.replace(existing, name=name)
            else:
                wanted = None
            try:
                await self._write_changes(rows=[to_row(wanted)] if wanted else [])
            except StoreError as exc:
                raise TrackingError(503, f"cannot store the registration: {exc.public}") from exc
            scheduler.add(ImportSpec(import_id, name), origin="api")
            record = self.state.imports[(source, import_id)]
        log.info(
            "%s source=%s import=%s via the API",
            "tracking" if existing is None else "already tracking",
            source,
            import_id,
        )
        return record, existing is None

    async def unregister(self, source: str, import_id: str) -> None:
        async with self._write_lock:  # ordered with reloads, as in register()
            if (source, import_id) in self.state.parked:
                try:
                    await self._write_changes(deleted=[(source, import_id)])
                except StoreError as exc:
                    raise TrackingError(503, f"cannot store the removal: {exc.public}") from exc
                self.state.forget_parked(source, import_id)
                log.info("forgot parked import source=%s import=%s via the API", source, import_id)
                return
            record = self.state.imports.get((source, import_id))
            scheduler = self.poller.schedulers.get(source)
            if record is None or scheduler is None:
                raise TrackingError(
                    404, f"import {import_id!r} of source {source!r} is not tracked"
                )
            if record.origin == "config":
                raise TrackingError(
                    409,
                    f"import {import_id!r} is listed in the config file; "
                    "remove it there and reload",
                )
            # Deleted from the store first: a refused delete leaves it tracked
            # (a 204 that a restart takes back would be a lie).
            try:
                await self._write_changes(deleted=[(source, import_id)])
            except StoreError as exc:
                raise TrackingError(503, f"cannot store the removal: {exc.public}") from exc
            scheduler.remove(import_id)
        log.info("stopped tracking source=%s import=%s via the API", source, import_id)

    # --- persistence and retention -----------------------------------------

    async def _write_changes(
        self, *, rows: Sequence[Row] = (), deleted: Sequence[ImportKey] = ()
    ) -> None:
        """Write a request's ``rows`` and ``deleted`` keys (not yet applied in
        memory), in one transaction, under the write lock held by the caller.
        Only those: what polls learnt is :meth:`_write_pending`'s, so a
        registration never waits behind a bulk write of every import."""
        if self.store is None or not (rows or deleted):
            return
        await asyncio.to_thread(self.store.write, rows, deleted)

    async def _write_pending(self, *, with_poll_times: bool = False) -> None:
        """Write what changed since the last write (with ``with_poll_times``
        also the imports whose only news is a newer poll time) in transactions
        of at most :data:`WRITE_CHUNK` rows, each under the write lock, so a
        registration waits for one chunk at most. Each chunk's rows are built
        on the event loop (each a consistent snapshot of its record) from the
        changed records only; on failure what is left is kept for the next."""
        if self.store is None:
            return
        changed: list[ImportRecord] = []
        forgotten: list[ImportKey] = []
        at = 0
        while True:
            async with self._write_lock:
                if at == 0:
                    # Taken under the lock: no registration lands between the
                    # take and the first chunk's deletes.
                    changed, forgotten = self.state.take_changes(with_poll_times=with_poll_times)
                    if not (changed or forgotten):
                        return
                chunk = changed[at : at + WRITE_CHUNK]
                deleted = forgotten if at == 0 else []
                # An import forgotten (or registered anew) since the take is
                # not written back from its old record.
                rows = [to_row(record) for record in chunk if self._is_current(record)]
                try:
                    await asyncio.to_thread(self.store.write, rows, deleted)
                except StoreError:
                    self.state.requeue(changed[at:], deleted)
                    raise
            at += WRITE_CHUNK
            if at >= len(changed):
                return

    def _is_current(self, record: ImportRecord) -> bool:
        key = (record.source, record.import_id)
        return self.state.imports.get(key) is record or self.state.parked.get(key) is record

    async def _persist_loop(self) -> None:
        for tick in itertools.count(1):
            await asyncio.sleep(PERSIST_INTERVAL)
            async with self._write_lock:
                for record in self.state.expired(self.config.retention):
                    scheduler = self.poller.schedulers.get(record.source)
                    if scheduler is not None:
                        scheduler.remove(record.import_id)
                    log.info(
                        "forgetting import source=%s import=%s: finished over %gs ago",
                        record.source,
                        record.import_id,
                        self.config.retention,
                    )
                for record in self.state.expired_parked(self.config.retention):
                    self.state.forget_parked(record.source, record.import_id)
                    log.info(
                        "forgetting parked import source=%s import=%s: parked or finished "
                        "over %gs ago",
                        record.source,
                        record.import_id,
                        self.config.retention,
                    )
            try:
                await self._write_pending(with_poll_times=tick % POLL_TIMES_EVERY == 0)
            except StoreError as exc:
                # The store logged it when writes began to fail.
                log.debug("cannot store the state of the imports: %s", exc)
            if self.store is not None:
                # A stat, but behind the store's lock, which a write may hold.
                await asyncio.to_thread(self.store.verify)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Errors the event loop reports (accept() failing with EMFILE retries
        every second), logged at most a few times a minute per kind."""
        message = str(context.get("message", "unhandled error in the event loop"))
        exc = context.get("exception")
        exc_info = (type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None
        self._quiet_log.log(
            logging.ERROR, ("loop", message, type(exc)), "%s", message, exc_info=exc_info
        )

    async def stop(self) -> None:
        """Stop accepting, stop polling, write what the store must keep, close."""
        if self._runner is not None:
            await self._runner.cleanup()
        await self.poller.stop()
        if self._persist_task is not None:
            self._persist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._persist_task
        if self.store is not None:
            try:
                await self._write_pending(with_poll_times=True)
            except StoreError as exc:
                log.error("cannot store the state of the imports: %s", exc)
            self.store.close()
        if self._session is not None:
            await self._session.close()
        asyncio.get_running_loop().set_exception_handler(self._previous_exception_handler)
