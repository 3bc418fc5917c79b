"""What the registration API may ask of a running exporter, and how it says no.

The API module speaks HTTP and JSON; the exporter (``exporter.app``) decides.
This contract sits between them so that neither imports the other.
"""

from __future__ import annotations

from typing import Protocol

from exporter.state import ImportRecord, StateStore


class TrackingError(Exception):
    """A registration that cannot be done, with the HTTP status that says why.

    ``field`` names the request field at fault (None when it is no one field).
    """

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
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

        Raises :class:`TrackingError` (404 unknown source, 400 a source that takes
        no ids, 409 the source's tracked-import limit is reached, 503 the store
        could not write)."""

    async def unregister(self, source: str, import_id: str) -> None:
        """Stop tracking and forget at once. Raises :class:`TrackingError` (404 not
        tracked, 409 listed in the config file)."""
