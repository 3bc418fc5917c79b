"""The runtime: wires one running exporter (config -> sources -> poller ->
state -> readers), starts and stops it, and applies reloads. Registration
(:mod:`exporter.registration`) and persistence (:mod:`exporter.persistence`)
have rooms of their own; this module only connects them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from exporter import __version__
from exporter.config import Config, ConfigError
from exporter.discovery import Discoverer
from exporter.exposition import ImportLines, return_large_buffers_to_the_os
from exporter.logs import RateLimitedLog, context
from exporter.metrics import StoreHealthCollector, build_registry
from exporter.model import Origin
from exporter.persistence import Persistence
from exporter.poller import Poller
from exporter.redact import register_secret
from exporter.registration import Registration
from exporter.render_process import RenderProcess
from exporter.sharding import WHOLE, Shard
from exporter.sources.base import ImportSpec, Source, SourceHooks
from exporter.sources.registry import SOURCES, build_source
from exporter.state import ImportRecord, StateStore
from exporter.storage import Storage, StoreError
from exporter.storage.sqlite import SQLiteStorage
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

SERVER_SYSTEMS = frozenset(source.system for source in SOURCES if source.follows_server)
"""Systems whose source is one server, owned by a shard as a whole."""

DEFAULT_PORT = 10451
RENDER_SWITCH_INTERVAL = 0.001
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


FIRST_ROUND_CHECK_SECONDS = 1.0
"""How often the exporter looks whether every import has been polled once."""


def freeze_long_lived(*, collect: bool = True, young_only: bool = False) -> None:
    """Move every object alive now (the config, the records, the sources'
    prepared requests, the modules) out of the cyclic collector's sight, so
    no collection walks them again: with 100,000 imports a full collection
    walked millions of objects with the GIL held. They are still freed by
    reference counting when dropped (the state's objects form no cycles).

    ``collect`` first (after a reload: it walks only what is not frozen yet);
    at start-up it would walk everything once, on the event loop, for the
    little cyclic garbage a start-up leaves, which then stays. ``young_only``:
    collect the young generations only (what was promoted to the old one
    since the last freeze is not walked; its cyclic garbage, if any, stays)."""
    if collect:
        gc.collect(1 if young_only else 2)
    gc.freeze()


@dataclass(frozen=True)
class Restored:
    """A store whose imports are already in a state, sent to be rendered."""

    store: Storage
    state: StateStore
    import_lines: RenderProcess
    count: int

    def close(self) -> None:
        """Not used after all: the store closed, the render process stopped."""
        try:
            self.store.close()
        finally:
            self.import_lines.stop_now()


def restore(
    state: StateStore,
    import_lines: ImportLines | RenderProcess,
    store: Storage,
    records: list[ImportRecord],
    *,
    announce: bool = True,
) -> None:
    """A store's ``records`` put back into ``state``, and every import's lines
    rendered (a render process: sent now, rendered there while start-up goes
    on; about 1.6 s at 100,000), so the first scrape serves the restored
    state; what applying the config changes is rendered again, as after a
    reload."""
    state.restore(records)
    import_lines.take_changes(in_order=[(record.source, record.import_id) for record in records])
    if announce:  # else once the config has chosen this store (Exporter)
        log.info("restored %d imports from %s", len(records), store.path)


def restore_while_config_parses(path: str) -> Restored | None:
    """The SQLite file at ``path`` opened and restored before the config is
    known, while a child process parses it (``ConfigApart``), so the two run
    on two cores: about 3 s of a 100,000-import start-up. Used only once the
    config has chosen this file; else closed unused (opening it upgraded an
    old schema: what any later use would do, the rows kept).

    None (start-up then opens the store it chose, and fails with its error)
    where the file does not exist (nothing is created before the config
    says so) or cannot be opened or read now."""
    if not os.path.isfile(path):
        return None
    try:
        store = SQLiteStorage(path)
    except StoreError:
        return None
    state = StateStore()
    import_lines = RenderProcess(state)
    try:
        # Started first: its interpreter starts while the rows are read.
        import_lines.start()
        try:
            records = store.load()
            restore(state, import_lines, store, records, announce=False)
        except BaseException:
            import_lines.stop_now()
            raise
    except StoreError:
        store.close()
        return None
    except BaseException:
        store.close()
        raise
    return Restored(store, state, import_lines, len(records))


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
        store: Storage | None = None,
        max_requests: int = 0,
        header_timeout: float = HEADER_READ_TIMEOUT,
        shard: Shard = WHOLE,
        route_prefix: str = "",
        restored: Restored | None = None,
    ) -> None:
        self.config = config
        self.config_loader = config_loader
        # Opened first: a corrupt database stops the start-up with a clear error.
        # ``store``: a backend opened by the caller (PostgreSQL), else the file;
        # ``restored``: a store already restored (:func:`restore_while_config_parses`).
        self._store_restored = restored is not None
        if restored is not None:
            log.info("restored %d imports from %s", restored.count, restored.store.path)
        self.store: Storage | None = (
            restored.store
            if restored is not None
            else store or (SQLiteStorage(storage_path) if storage_path is not None else None)
        )
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
        self.shard = shard
        self.state = restored.state if restored is not None else StateStore()
        self.poller = Poller(self.state)
        self.persistence = Persistence(self.state, self.store)
        self.registration = Registration(
            self.state, self.poller, self.persistence, lambda: self.config, shard
        )
        self.register = self.registration.register
        self.unregister = self.registration.unregister
        # The per-import families are kept rendered (exporter.exposition);
        # the registry has the per-source and per-process ones.
        self.import_lines = (
            restored.import_lines if restored is not None else RenderProcess(self.state)
        )
        self.registry = build_registry(self.state, imports=False)
        if self.store is not None:
            self.registry.register(StoreHealthCollector(self.store.health))
        self.web_app = create_web_app(
            self.state,
            self.registry,
            web_config=self.web_security,
            reload=self.reload,
            tracker=self.registration,
            store_failing=self.persistence.failing,
            max_requests=max_requests,
            route_prefix=route_prefix,
            import_lines=self.import_lines,
        )
        self.header_timeout = header_timeout
        self._session: aiohttp.ClientSession | None = None
        self.discoverers: dict[str, Discoverer] = {}
        self._runner: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()
        self._quiet_log = RateLimitedLog(log)
        self._previous_exception_handler: Any = None
        self.first_round_frozen = asyncio.Event()
        """Set once every import was polled once and what that built was frozen."""
        self._first_round: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # gzip, the registry's families and the store run in worker threads;
        # a short GIL switch interval keeps the event loop's many small I/O
        # steps from queueing behind one of them for 5 ms each (the convoy
        # effect).
        sys.setswitchinterval(RENDER_SWITCH_INTERVAL)
        return_large_buffers_to_the_os()
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": f"import-status-exporter/{__version__}"},
            # Concurrency is limited per source by each scheduler's workers.
            connector=aiohttp.TCPConnector(limit=0),
        )
        if self.store is not None and not self._store_restored:
            records = await asyncio.to_thread(self.store.load)
            if getattr(self.store, "shared", False):
                # Another shard's imports are its own to keep: never parked
                # (nor forgotten) by this one in the shared database.
                records = [r for r in records if self._owns_stored(r)]
            restore(self.state, self.import_lines, self.store, records)
        self._prepare_to_apply(self.config)
        await self._apply(self.config, previous=None)
        # Stored imports of sources the config no longer has: registered ones
        # are parked (a config edit never deletes what a pipeline registered).
        configured = {source.name for source in self.config.sources}
        for name in sorted({record.source for record in self.state.imports.values()}):
            if name not in configured:
                self._park(name)
        self.state.record_reload(success=True)
        self.persistence.start(lambda: self.config.retention, self._forget)
        # The lines of what the config changed (every import's without a
        # store), before listening: the first scrape serves them at once.
        self.import_lines.take_changes()
        self.registration.follow_store()  # other replicas' registrations (PostgreSQL)
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
        self._first_round = asyncio.create_task(self._freeze_after_first_round())
        log.info(
            "listening on %s:%s, watching %d imports from %d sources",
            self.host or "*",
            self.port,
            len(self.state.imports),
            len(self.config.sources),
        )

    async def _freeze_after_first_round(self) -> None:
        """Freeze again once every import has been polled once: the first
        round builds what every import keeps from then on (its request URL,
        about 100,000 objects at 100,000 imports), which otherwise sits in the
        oldest generation and made every full collection walk it (60-90 ms
        with the event loop stopped)."""
        while not self.state.ready():  # noqa: ASYNC110 (the state has no events: O(1) check)
            await asyncio.sleep(FIRST_ROUND_CHECK_SECONDS)
        freeze_long_lived(young_only=True)
        self.first_round_frozen.set()

    async def _apply(self, config: Config, previous: Config | None) -> None:
        """Make the running sources match ``config``, keeping the state of
        every import that is still configured (or was registered at runtime)."""
        assert self._session is not None
        old = {source.name: source for source in previous.sources} if previous else {}
        new_names = {source.name for source in config.sources}
        for name in old.keys() - new_names:
            self._park(name)
            await self._stop_discovery(name)
            await self.poller.remove_source(name)
            log.info("source removed", extra=context(source=name))
        for source_config in config.sources:
            name = source_config.name
            before = old.get(name)
            if before is not None and before == source_config:
                continue  # unchanged, secrets included: keep it running as it is
            hooks = SourceHooks(
                # A partial, not a closure: one Python call a request fewer.
                request=functools.partial(self.state.record_request, name),
                token=functools.partial(self.state.record_token_request, name),
            )
            source = build_source(source_config, self._session, hooks)
            # Imports of another system than the source's now cannot be polled
            # by it, nor those another shard owns; those parked earlier that
            # it can poll come back.
            ours = self._ours(source)
            self._park(name, keep=ours)
            back = self.state.unpark(name, ours)
            if back:
                log.info(
                    "brought back parked imports", extra=context(source=name, imports=len(back))
                )
            # Registered at runtime (or restored from the store): kept across
            # a rebuild of the source.
            kept_runtime = [
                (ImportSpec(record.import_id, record.name), record.origin)
                for record in self.state.imports_of(name)
                if record.origin is not Origin.CONFIG
            ]
            await self._stop_discovery(name)
            if before is not None:
                await self.poller.remove_source(name, keep_state=True)
            configured = source.imports()
            if not self.shard.owns_all:
                configured = [spec for spec in configured if self._owns(source, spec.id)]
            scheduler = self.poller.add_source(
                source,
                interval=source_config.interval,
                concurrency=source_config.concurrency,
                max_backoff=source_config.max_backoff,
                imports=configured,
            )
            for spec, origin in kept_runtime:
                scheduler.add(spec, origin=origin)
            wanted = {spec.id for spec in configured} | {spec.id for spec, _ in kept_runtime}
            for record in self.state.imports_of(name):
                if record.import_id not in wanted:
                    self.state.untrack(name, record.import_id)
            scheduler.start()
            if source.discovery_interval is not None:
                discoverer = Discoverer(
                    source,
                    scheduler,
                    self.state,
                    lambda: self.config.api.max_imports_per_source,
                    owns=functools.partial(self._owns, source),
                )
                self.discoverers[name] = discoverer
                discoverer.start()
        self.config = config

    async def _stop_discovery(self, name: str) -> None:
        discoverer = self.discoverers.pop(name, None)
        if discoverer is not None:
            await discoverer.stop()

    @staticmethod
    def _prepare_to_apply(config: Config) -> None:
        """Also the moment a config is applied: its secrets are registered for
        redaction now (a file that was only checked registers nothing)."""
        for secret in config.secret_values():
            register_secret(secret)
        for source_config in config.sources:
            for warning in source_config.deprecations():
                log.warning(
                    f"deprecated setting: {warning}", extra=context(source=source_config.name)
                )

    def _owns_stored(self, record: ImportRecord) -> bool:
        """:meth:`_owns` for a stored record, before its source is built."""
        whole = record.system in SERVER_SYSTEMS
        return self.shard.owns(record.source, None if whole else record.import_id)

    def _owns(self, source: Source[Any], import_id: str) -> bool:
        """A server (Rocket.Chat) belongs to a shard as a whole, an id by itself."""
        return self.shard.owns(source.name, None if source.follows_server else import_id)

    def _ours(self, source: Source[Any]) -> Callable[[ImportRecord], bool]:
        system, whole = source.system, self.shard.owns_all

        def ours(record: ImportRecord) -> bool:
            # One process owning every import: no owner check per import.
            return record.system == system and (whole or self._owns(source, record.import_id))

        return ours

    def _park(self, source: str, keep: Callable[[ImportRecord], bool] | None = None) -> None:
        parked, forgotten = self.state.park(source, keep=keep)
        for record in forgotten:
            log.info(
                "forgetting import: its source is no longer configured",
                extra=context(source=record.source, import_=record.import_id),
            )
        if parked:
            log.info(
                f"parked {len(parked)} imports of the source: registered through the API, they "
                "are kept (not polled, not exported) until a source of that name returns, at "
                "most for the retention",
                extra=context(
                    source=source, imports=len(parked), retention_seconds=self.config.retention
                ),
            )

    def _forget(self, record: ImportRecord) -> None:
        scheduler = self.poller.schedulers.get(record.source)
        if scheduler is not None:
            scheduler.remove(record.import_id)

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
            self._prepare_to_apply(config)
            if web_config is not None:
                await self._apply_web_config(web_config)
            # Under the write lock: no registration runs between the
            # snapshot of an old scheduler's imports and its replacement.
            async with self.persistence.lock:
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
        assert self.web_config_file is not None
        assert self.web_security is not None
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

    def _loop_exception(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
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
        if self._first_round is not None:
            self._first_round.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._first_round
        for name in list(self.discoverers):
            await self._stop_discovery(name)
        await self.registration.stop_following()
        await self.poller.stop()
        await self.persistence.stop()
        await self.import_lines.close()
        if self._session is not None:
            await self._session.close()
        asyncio.get_running_loop().set_exception_handler(self._previous_exception_handler)
