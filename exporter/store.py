"""Keeps what the exporter knows about every import across restarts, in SQLite.

One row per tracked import: its registration (source, id, name, origin) and
everything the exporter learnt about it (the last observation, first-seen,
state-change and last-progress times, the last error). The state is the one
truth while the process runs; this file is how it survives a restart, so a
stall that began before the restart is still seen as a stall.

Writes are transactions in WAL mode with ``synchronous=FULL``: once a write
returns, a SIGKILL (or a power cut) cannot take it back.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from exporter.model import ErrorReason, Observation, State
from exporter.state import ImportRecord

SCHEMA_VERSION = 2
"""1: the first; 2: adds last_attempt and consecutive_failures."""

_COLUMNS = (
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
)
_ADDED_IN = {2: ("last_attempt", "consecutive_failures")}
"""Columns each schema version added to the one before (ALTER TABLE on upgrade)."""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS imports (
    {", ".join(_COLUMNS)},
    PRIMARY KEY (source, import_id)
) WITHOUT ROWID
"""
_UPSERT = (
    f"INSERT OR REPLACE INTO imports ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)

Row = tuple[object, ...]


class StoreError(Exception):
    """The database cannot be used; the message says which file and why."""


class Store:
    """The SQLite file behind the state. Safe to call from one thread at a time
    (the exporter writes from a worker thread so the event loop never waits on disk)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.path}: cannot open the database: {exc}") from exc
        try:
            self._check_and_migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(
                f"{self.path}: the database is unreadable or corrupt ({exc}); "
                "move it away to start afresh, or restore it from a backup"
            ) from exc

    def _check_and_migrate(self) -> None:
        db = self._db
        # A file that is not SQLite fails here, before anything is written to it.
        result = db.execute("PRAGMA quick_check").fetchone()
        if result is None or result[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {result[0] if result else 'no answer'}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"written by a newer exporter (schema {version}, this one knows {SCHEMA_VERSION})"
            )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'imports'"
        ).fetchone()
        if exists:
            for added_in, columns in sorted(_ADDED_IN.items()):
                if version < added_in:
                    for column in columns:
                        db.execute(f"ALTER TABLE imports ADD COLUMN {column}")
        db.execute(_SCHEMA)
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def load(self) -> list[ImportRecord]:
        try:
            with self._lock:
                rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM imports").fetchall()
            return [_from_row(row) for row in rows]
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise StoreError(f"{self.path}: cannot read the stored imports: {exc}") from exc

    def write(self, rows: Iterable[Row], deleted: Iterable[tuple[str, str]] = ()) -> None:
        """Upsert ``rows`` (from :func:`to_row`) and delete ``deleted`` keys, in
        one transaction. Raises :class:`StoreError`."""
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "DELETE FROM imports WHERE source = ? AND import_id = ?", deleted
                    )
                    self._db.executemany(_UPSERT, rows)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot write: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


def to_row(record: ImportRecord) -> Row:
    """A record as a row; built on the event loop, so it is a consistent snapshot."""
    obs = record.observation
    return (
        record.source,
        record.import_id,
        record.system,
        record.name,
        record.origin,
        obs.state.value if obs else None,
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
        record.last_error_reason.value if record.last_error_reason else None,
        record.last_error_at,
        int(record.confirmed_final),
        record.last_attempt,
        record.consecutive_failures,
    )


def _from_row(row: Row) -> ImportRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    observation = None
    if values["state"] is not None:
        observation = Observation(
            state=State(str(values["state"])),
            upstream_state=str(values["upstream_state"]),
            step=_str(values["step"]),
            reason=_str(values["reason"]),
            items_completed=_int(values["items_completed"]),
            items_expected=_int(values["items_expected"]),
            items_failed=_int(values["items_failed"]),
            started_at=_float(values["started_at"]),
            ended_at=_float(values["ended_at"]),
        )
    reason = values["last_error_reason"]
    return ImportRecord(
        source=str(values["source"]),
        import_id=str(values["import_id"]),
        system=str(values["system"]),
        name=_str(values["name"]),
        origin=str(values["origin"]),
        observation=observation,
        first_seen=_float(values["first_seen"]),
        state_since=_float(values["state_since"]),
        last_progress=_float(values["last_progress"]),
        seen_running_at=_float(values["seen_running_at"]),
        seen_finished_at=_float(values["seen_finished_at"]),
        last_success=_float(values["last_success"]),
        last_error=_str(values["last_error"]),
        last_error_reason=ErrorReason(str(reason)) if reason is not None else None,
        last_error_at=_float(values["last_error_at"]),
        confirmed_final=bool(values["confirmed_final"]),
        last_attempt=_float(values["last_attempt"]),
        consecutive_failures=_int(values["consecutive_failures"]) or 0,
    )


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
