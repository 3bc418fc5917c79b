"""Discovery: a source that can list its upstream's recent jobs finds its
imports itself, on an interval of its own. What it finds is tracked like a
registered import (origin ``discovered``: persisted, forgotten after
``retention``); a discovery that fails is counted and shown, and never drops
an import found before."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from exporter.logs import context
from exporter.model import Origin, SourceError
from exporter.poller import SourceScheduler
from exporter.redact import redact
from exporter.sources.base import Source
from exporter.state import StateStore

log = logging.getLogger(__name__)

SEEN_KEPT = 100_000
"""Ids a discoverer remembers having found (so one that ``retention``
forgot is not found again while the upstream still lists it)."""


class Discoverer:
    """Runs one source's discovery every ``source.discovery_interval``."""

    def __init__(
        self,
        source: Source[Any],
        scheduler: SourceScheduler,
        state: StateStore,
        limit: Callable[[], int],
        owns: Callable[[str], bool] = lambda _: True,
    ) -> None:
        assert source.discovery_interval is not None
        self.owns = owns
        """Whether this process (its shard) polls an id; others are another shard's."""
        self.source = source
        self.scheduler = scheduler
        self.state = state
        self.limit = limit
        """The most imports the source may track (``api.max_imports_per_source``)."""
        self.interval = source.discovery_interval
        self._seen: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"discover:{self.source.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval)

    async def run_once(self) -> int:
        """Discover once; return how many imports were added."""
        name = self.source.name
        try:
            specs = await self.source.discover()
        except SourceError as exc:
            self.state.record_discovery_error(name, exc)
            log.warning(
                "discovery failed",
                extra=context(source=name, reason=exc.reason.value, error=redact(exc.message)),
            )
            return 0
        added = 0
        for spec in specs:
            if spec.id in self._seen or not self.owns(spec.id):
                continue
            if (name, spec.id) not in self.state.imports:
                if self.state.imports.count_of(name) >= self.limit():
                    log.warning(
                        "discovery found more imports than the source may track",
                        extra=context(source=name, limit=self.limit()),
                    )
                    break
                self.scheduler.add(spec, origin=Origin.DISCOVERED)
                added += 1
            if len(self._seen) >= SEEN_KEPT:
                self._seen.clear()
            self._seen.add(spec.id)
        if added:
            log.info("discovered imports", extra=context(source=name, imports=added))
        return added
