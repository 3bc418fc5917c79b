"""Wires one running exporter: config -> sources -> poller -> state -> web."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
from aiohttp import web

from exporter.config import Config
from exporter.metrics import build_registry
from exporter.poller import Poller
from exporter.sources import build_source
from exporter.sources.base import ImportSpec
from exporter.state import StateStore
from exporter.web import create_web_app
from exporter.webconfig import build_ssl_context, load_web_config

log = logging.getLogger(__name__)

DEFAULT_PORT = 10451


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """``host:port``, ``:port`` or ``[::1]:port`` -> (host or None for all, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"--web.listen-address {address!r}: expected host:port, like :{DEFAULT_PORT}"
        )
    host = host.strip("[]")
    return (host or None), int(port)


class Exporter:
    """One exporter process's moving parts, started and stopped together."""

    def __init__(
        self,
        config: Config,
        listen_address: str = f":{DEFAULT_PORT}",
        web_config_file: str | None = None,
    ) -> None:
        self.config = config
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
        self.web_app = create_web_app(self.state, self.registry, web_config=self.web_config)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "import-status-exporter"},
            # Sources cap every body themselves; the connector limit is per
            # source through each scheduler's concurrency.
            connector=aiohttp.TCPConnector(limit=0),
        )
        for source_config in self.config.sources:
            name = source_config.name
            source = build_source(
                source_config,
                self._session,
                observe=lambda duration, name=name: self.state.record_request(name, duration),
            )
            self.poller.add_source(
                source,
                interval=source_config.interval,
                concurrency=source_config.concurrency,
                max_backoff=source_config.max_backoff,
                imports=source.imports(),
            )
        self._runner = web.AppRunner(self.web_app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = self.bound_port()
        self.poller.start()
        log.info(
            "listening on %s:%s, watching %d imports from %d sources",
            self.host or "*",
            self.port,
            len(self.state.imports),
            len(self.config.sources),
        )

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
