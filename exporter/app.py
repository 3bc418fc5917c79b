"""Wires one running exporter: config -> sources -> poller -> state -> web."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from exporter import __version__
from exporter.config import Config, ConfigError
from exporter.metrics import build_registry
from exporter.poller import Poller
from exporter.sources import build_source
from exporter.sources.base import ImportSpec
from exporter.state import StateStore
from exporter.web import create_web_app
from exporter.webconfig import build_ssl_context, load_web_config

log = logging.getLogger(__name__)

DEFAULT_PORT = 10451
RENDER_SWITCH_INTERVAL = 0.001


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


class Exporter:
    """One exporter process's moving parts, started and stopped together."""

    def __init__(
        self,
        config: Config,
        listen_address: str = f":{DEFAULT_PORT}",
        web_config_file: str | None = None,
        config_loader: ConfigLoader | None = None,
    ) -> None:
        self.config = config
        self.config_loader = config_loader
        self.host, self.port = parse_listen_address(listen_address)
        self.web_config = load_web_config(web_config_file) if web_config_file else None
        self.ssl_context = None
        if self.web_config is not None and self.web_config.tls_server_config is not None:
            assert web_config_file is not None
            self.ssl_context = build_ssl_context(
                self.web_config.tls_server_config, Path(web_config_file).parent
            )
        self.state = StateStore()
        self.poller = Poller(self.state)
        self.registry = build_registry(self.state)
        self.web_app = create_web_app(
            self.state, self.registry, web_config=self.web_config, reload=self.reload
        )
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        # Renders run in a worker thread; a short GIL switch interval keeps
        # the event loop's many small I/O steps from queueing behind a render
        # for 5 ms each (the convoy effect).
        sys.setswitchinterval(RENDER_SWITCH_INTERVAL)
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": f"import-status-exporter/{__version__}"},
            # Concurrency is limited per source by each scheduler's workers.
            connector=aiohttp.TCPConnector(limit=0),
        )
        await self._apply(self.config, previous=None)
        self.state.record_reload(success=True)
        self._runner = web.AppRunner(self.web_app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = self.bound_port()
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
            await self.poller.remove_source(name)
            log.info("source %s removed", name)
        for source_config in config.sources:
            name = source_config.name
            before = old.get(name)
            if before is not None and before == source_config:
                continue  # unchanged, secrets included: keep it running as it is
            kept_runtime: list[ImportSpec] = []
            if before is not None:
                kept_runtime = [
                    ImportSpec(record.import_id, record.name)
                    for record in self.state.imports_of(name)
                    if record.origin != "config"
                ]
                await self.poller.remove_source(name, keep_state=True)
            source = build_source(source_config, self._session, observe=self._observer(name))
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
                config = self.config_loader()
            except ConfigError as exc:
                self.state.record_reload(success=False)
                log.error(
                    "config reload failed, keeping the running config: %s", "; ".join(exc.errors)
                )
                return exc.errors
            await self._apply(config, previous=self.config)
            self.state.record_reload(success=True)
            log.info("config reloaded: %d sources", len(config.sources))
            return []

    def bound_port(self) -> int:
        assert self._runner is not None
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("not listening")

    def track(self, source: str, spec: ImportSpec, origin: str = "api") -> None:
        self.poller.schedulers[source].add(spec, origin=origin)

    async def stop(self) -> None:
        await self.poller.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
