"""What the registration API may ask of a running exporter, and how it says no.

The API (``exporter.api``) speaks HTTP and JSON; the registration room
(``exporter.registration``) decides. This contract sits between them, so that
neither imports the other: refusals are domain reasons, and the API alone
maps them to HTTP statuses.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from exporter.state import ImportKey, ImportRecord, StateStore


class Refusal(Enum):
    """Why a registration or removal cannot be done."""

    UNKNOWN_SOURCE = "unknown source"
    TAKES_NO_IDS = "the source watches a server, not ids"
    LIMIT_REACHED = "the source tracks as many imports as it may"
    NOT_TRACKED = "not tracked"
    LISTED_IN_CONFIG = "listed in the config file"
    NOT_STORED = "the storage refused the write"
    OTHER_SHARD = "another shard owns the import"


class TrackingError(Exception):
    """A registration that cannot be done, and why.

    ``field`` names the request field at fault (None when it is no one field).
    """

    def __init__(self, refusal: Refusal, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message
        self.field = field


class ImportTracker(Protocol):
    state: StateStore

    @property
    def api_tokens(self) -> tuple[str, ...]:
        """Bearer tokens allowed to call the write API; empty: the write API is off."""

    async def register(
        self, source: str, import_id: str, name: str | None
    ) -> tuple[ImportRecord, bool]:
        """Start tracking; True if it is new. Durable before it returns.

        Raises :class:`TrackingError` (unknown source, a source that takes no
        ids, the source's tracked-import limit reached, not stored)."""

    async def unregister(self, source: str, import_id: str) -> None:
        """Stop tracking and forget at once. Raises :class:`TrackingError` (not
        tracked, listed in the config file, not stored)."""

    @property
    def shared(self) -> bool:
        """Replicas share one registry (a database): reads of the API come
        from it, so every replica answers for every import."""

    async def stored(self, source: str, import_id: str) -> ImportRecord | None:
        """The import as the shared registry has it. Raises
        :class:`TrackingError` (``NOT_STORED``) when it cannot be read."""

    async def stored_page(
        self, after: ImportKey | None, source: str | None, state: str | None, limit: int
    ) -> list[ImportRecord]:
        """Up to ``limit`` imports of the shared registry after ``after``, in
        key order. Raises :class:`TrackingError` (``NOT_STORED``)."""
