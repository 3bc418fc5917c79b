"""Where the state survives a restart: the :class:`Storage` interface, and the
record snapshot (:func:`to_row`) every backend writes and reads back.

SQLite (:mod:`.sqlite`) is the embedded default, PostgreSQL (:mod:`.postgres`)
the registry replicas share; a backend is anything with these methods. The
state is the one truth while the process runs; a backend is how it survives a
restart, so a stall that began before the restart is still seen as a stall.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

from exporter.model import ErrorReason, Observation, Origin, State
from exporter.state import ImportKey, ImportRecord

log = logging.getLogger(__name__)

Row = tuple[object, ...]
"""One import as a backend stores it, in :data:`COLUMNS` order."""

COLUMNS = (
    "source",
    "import_id",
    "system",
    "name",
    "origin",
    "state",
    "upstream_state",
    "step",
    "reason",
    "items_completed",
    "items_expected",
    "items_failed",
    "started_at",
    "ended_at",
    "first_seen",
    "state_since",
    "last_progress",
    "seen_running_at",
    "seen_finished_at",
    "last_success",
    "last_error",
    "last_error_reason",
    "last_error_at",
    "confirmed_final",
    "last_attempt",
    "consecutive_failures",
    "parked_at",
)

WRITE_ERROR_REASONS = (
    "disk_full",
    "read_only",
    "busy",
    "io_error",
    "vanished",
    "unavailable",
    "other",
)
"""Why a write failed: a small fixed set, exported as a metric label."""
PUBLIC_REASON = {
    "disk_full": "the disk is full",
    "read_only": "the database is read-only",
    "busy": "the database is locked",
    "io_error": "the disk failed",
    "vanished": "the database file was deleted or replaced while in use",
    "unavailable": "the database server cannot be reached",
    "other": "the database refused the write",
}


class StoreError(Exception):
    """The database cannot be used; the message says which file and why
    (for logs); :attr:`public` says why without the path (for API clients)."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def public(self) -> str:
        why = PUBLIC_REASON.get(self.reason, PUBLIC_REASON["other"])
        return f"{why} (see the exporter's log)"


@dataclass(slots=True)
class StoreHealth:
    """How the writes have gone, for metrics and readiness."""

    write_errors: Counter[str] = field(default_factory=Counter)
    last_write_ok: bool = True
    last_write_success_at: float | None = None
    failing: str | None = None
    """The reason of the failure the last write ended in; None while writes succeed."""

    def failed(self, exc: StoreError) -> None:
        """A write failed: counted; logged once when writes start failing (or
        fail differently), not once per retry."""
        self.write_errors[exc.reason] += 1
        self.last_write_ok = False
        if self.failing != exc.reason:
            log.error("cannot write the database: %s", exc)
        self.failing = exc.reason

    def succeeded(self, where: str) -> None:
        """A write went through; logged when it ends a failure (``where`` names
        the database for the log, never for API clients)."""
        if self.failing is not None:
            log.info("the database %s can be written again", where)
        self.failing = None
        self.last_write_ok = True
        self.last_write_success_at = time.time()


class Storage(Protocol):
    """What the exporter needs of a backend. Every method may be called from a
    worker thread (never two at once); each raises :class:`StoreError`."""

    path: str
    """Where it is, for logs (never shown to API clients)."""
    health: StoreHealth

    def load(self) -> list[ImportRecord]:
        """Every stored import, parked ones included."""

    def write(
        self, rows: Sequence[Row], deleted: Sequence[ImportKey] = (), refresh: Sequence[Row] = ()
    ) -> None:
        """Upsert ``rows`` (registrations) and ``refresh`` (what polls learnt)
        and delete ``deleted`` in one transaction: durable when it returns. A
        backend shared by processes must not let ``refresh`` bring back an
        import registered through the API that another process deleted."""

    def verify(self) -> None:
        """Check the backend is still the one it was opened as (a cheap probe);
        a failure shows in :attr:`health`."""

    def close(self) -> None:
        """Release it (and the ownership of it) for good."""


@runtime_checkable
class SharedStorage(Storage, Protocol):
    """A backend other processes (replicas, shards) write too: the registry
    every one of them reads, so any replica answers for every import."""

    shared: bool

    def watch(self, on_change: Callable[[Sequence[ImportKey] | None], None]) -> None:
        """Call ``on_change`` (from a thread) with the imports another process
        registered or removed, once committed, or with None when they are not
        known (read every registration), until :meth:`close`."""

    def load_registered(self) -> list[ImportRecord]:
        """The imports registered through the API (what replicas follow)."""

    def get(self, key: ImportKey) -> ImportRecord | None:
        """One stored import, as its owner last wrote it."""

    def get_many(self, keys: Sequence[ImportKey]) -> list[ImportRecord]:
        """The stored imports of ``keys`` (those that are stored)."""

    def page(
        self, after: ImportKey | None, source: str | None, state: str | None, limit: int
    ) -> list[ImportRecord]:
        """Up to ``limit`` stored imports after ``after`` in key order, of
        ``source`` and in ``state`` when given."""

    def claim(self, row: Row, limit: int) -> tuple[ImportRecord, bool] | None:
        """Store a registration unless the import is stored already (then
        only a name given in ``row`` replaces the stored one, and what its
        owner learnt is kept); the stored import, and whether it is new; None
        if it is new and its source has ``limit`` imports stored. Committed,
        and the other processes told, when it returns."""


_PLAIN: dict[str, str] = {
    member: member.value for kind in (State, Origin, ErrorReason) for member in kind
}
"""Each enum member's value as a plain ``str``: sqlite3 binds an exact str at
once, but a ``StrEnum`` member only after a failed adapter lookup that formats
an AttributeError (0.3 us a row); and ``.value`` is a Python-level property."""


def to_row(record: ImportRecord) -> Row:
    """A record as a row; built on the event loop, so it is a consistent snapshot."""
    obs = record.observation
    return (
        record.source,
        record.import_id,
        record.system,
        record.name,
        _PLAIN[record.origin],
        _PLAIN[obs.state] if obs else None,
        obs.upstream_state if obs else None,
        obs.step if obs else None,
        obs.reason if obs else None,
        obs.items_completed if obs else None,
        obs.items_expected if obs else None,
        obs.items_failed if obs else None,
        obs.started_at if obs else None,
        obs.ended_at if obs else None,
        record.first_seen,
        record.state_since,
        record.last_progress,
        record.seen_running_at,
        record.seen_finished_at,
        record.last_success,
        record.last_error,
        _PLAIN[record.last_error_reason] if record.last_error_reason else None,
        record.last_error_at,
        int(record.confirmed_final),
        record.last_attempt,
        record.consecutive_failures,
        record.parked_at,
    )


_STATES = {member.value: member for member in State}
_ORIGINS = {member.value: member for member in Origin}


def from_row(row: Row) -> ImportRecord:
    # A start-up with 100,000 stored imports reads them all, before it can
    # serve: unpacked by position (COLUMNS order), not through a dict per
    # row, with conversions written out and enum members looked up in a dict
    # (an Enum call per row, and a call per value, took 2.5 times as long).
    # Values of another type than the column's still go through the
    # conversions (a bad one raises ValueError or TypeError).
    (
        source,
        import_id,
        system,
        name,
        origin,
        state,
        upstream_state,
        step,
        reason,
        items_completed,
        items_expected,
        items_failed,
        started_at,
        ended_at,
        first_seen,
        state_since,
        last_progress,
        seen_running_at,
        seen_finished_at,
        last_success,
        last_error,
        last_error_reason,
        last_error_at,
        confirmed_final,
        last_attempt,
        consecutive_failures,
        parked_at,
    ) = cast(Any, row)  # each value's type is checked by its conversion
    observation = None
    if state is not None:
        observation = Observation(
            _STATES[state] if state in _STATES else State(str(state)),
            sys.intern(str(upstream_state)),
            None if step is None else str(step),
            None if reason is None else str(reason),
            None if items_completed is None else int(items_completed),
            None if items_expected is None else int(items_expected),
            None if items_failed is None else int(items_failed),
            None if started_at is None else float(started_at),
            None if ended_at is None else float(ended_at),
        )
    # Names of sources, systems and upstream states repeat across imports:
    # one string each, not one per row (about 150 bytes an import).
    return ImportRecord(
        sys.intern(str(source)),
        str(import_id),
        sys.intern(str(system)),
        None if name is None else str(name),
        _ORIGINS[origin] if origin in _ORIGINS else Origin(str(origin)),
        observation,
        first_seen=None if first_seen is None else float(first_seen),
        state_since=None if state_since is None else float(state_since),
        last_progress=None if last_progress is None else float(last_progress),
        seen_running_at=None if seen_running_at is None else float(seen_running_at),
        seen_finished_at=None if seen_finished_at is None else float(seen_finished_at),
        last_success=None if last_success is None else float(last_success),
        last_error=None if last_error is None else str(last_error),
        last_error_reason=(
            None if last_error_reason is None else ErrorReason(str(last_error_reason))
        ),
        last_error_at=None if last_error_at is None else float(last_error_at),
        confirmed_final=bool(confirmed_final),
        last_attempt=None if last_attempt is None else float(last_attempt),
        consecutive_failures=0 if consecutive_failures is None else int(consecutive_failures),
        parked_at=None if parked_at is None else float(parked_at),
    )
