"""The embedded backend: one SQLite file, one row per import (its
registration and everything the exporter learnt about it).

Writes are transactions in WAL mode with ``synchronous=FULL``: once a write
returns, a SIGKILL (or a power cut) cannot take it back.

One process owns the file: the store holds an exclusive ``flock`` on
``<path>.lock`` for its life, so a second exporter on the same file refuses to
start instead of diverging from the first. A write also checks that the file
it wrote is still the file at the path (device and inode), so a database
deleted or replaced under the running exporter fails every write from then on
instead of acknowledging writes that only reach a deleted file.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from exporter.state import ImportKey, ImportRecord
from exporter.storage import (
    COLUMNS,
    Row,
    StoreError,
    StoreHealth,
    from_row,
)

SCHEMA_VERSION = 3
"""1: the first; 2: ``last_attempt`` and ``consecutive_failures``; 3: ``parked_at``
(registered imports of a source no longer configured)."""

_ADDED_IN = {2: ("last_attempt", "consecutive_failures"), 3: ("parked_at",)}
"""Columns each schema version added to the one before (ALTER TABLE on upgrade)."""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS imports (
    {", ".join(COLUMNS)},
    PRIMARY KEY (source, import_id)
) WITHOUT ROWID
"""
# A batch is a few multi-row statements with bound parameters: SQLite runs
# each without the GIL, where executemany took the GIL back for every row
# (and, competing with the event loop for it, held the write lock 30-50 s for
# 100,000 rows). Bound values cost less than the JSON array this replaced
# (8.5 ms per 2,000 rows against 29 ms of json_extract and encoding).
ROWS_PER_STATEMENT = 256
"""Rows per INSERT at most; fewer go in statements of powers of two, so at
most 9 statements are ever prepared (SQLite's prepared statements are cached:
one per row count of up to 1,000 rows held 170 MB)."""


def _statement_sizes(count: int) -> list[int]:
    """``count`` rows as statement sizes: full ones, then powers of two."""
    sizes = [ROWS_PER_STATEMENT] * (count // ROWS_PER_STATEMENT)
    rest = count % ROWS_PER_STATEMENT
    sizes += [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]
    return sizes


@functools.cache
def _upsert(count: int) -> str:
    row = "(" + ", ".join("?" for _ in COLUMNS) + ")"
    return f"INSERT OR REPLACE INTO imports ({', '.join(COLUMNS)}) VALUES " + ", ".join(
        [row] * count
    )


NULL = math.nan
"""What a row's None is bound as. sqlite3 binds an int, float or str at
once, but anything else, None included, goes through its adapter lookup
first (a tuple built, a dict looked up, and without an adapter an
AttributeError formatted and dropped): a quarter of a row's write, with the
GIL held, for a row's dozen NULLs. SQLite stores a NaN as NULL (as it would
a NaN a row held: none does, an answer with one is refused as not JSON)."""

_DELETE = (
    "DELETE FROM imports WHERE (source, import_id) IN "
    "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))"
)
JSON_SLICE = 500
"""Rows encoded to JSON at a time: the encoder holds the GIL for a whole
call, so a big batch is encoded in slices (a few ms each)."""

log = logging.getLogger(__name__)

_REASON_BY_SQLITE_CODE = {
    13: "disk_full",  # SQLITE_FULL
    8: "read_only",  # SQLITE_READONLY
    3: "read_only",  # SQLITE_PERM
    5: "busy",  # SQLITE_BUSY
    6: "busy",  # SQLITE_LOCKED
    10: "io_error",  # SQLITE_IOERR
    14: "io_error",  # SQLITE_CANTOPEN
}


class SQLiteStorage:
    """The SQLite file behind the state. Safe to call from one thread at a time
    (the exporter writes from a worker thread so the event loop never waits on disk)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self.health = StoreHealth()
        self._lock_fd: int | None = None
        self._identity: tuple[int, int] | None = None
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                # Before SQLite touches the file: a second process must not
                # even run its integrity check or migration on it.
                self._lock_fd = _take_lock(self.path)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            self._release_lock()
            raise StoreError(f"{self.path}: cannot open the database: {exc}") from exc
        except StoreError:
            self._release_lock()
            raise
        try:
            self._check_and_migrate()
            if self.path != ":memory:":
                self._identity = _identity(self.path)
        except (sqlite3.DatabaseError, OSError) as exc:
            self._db.close()
            self._release_lock()
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
        # One transaction: a crash mid-migration leaves the old schema whole.
        db.execute("BEGIN IMMEDIATE")
        try:
            existed = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'imports'"
            ).fetchone()[0]
            if existed:
                for added_in, columns in sorted(_ADDED_IN.items()):
                    if version < added_in:
                        for column in columns:
                            db.execute(f"ALTER TABLE imports ADD COLUMN {column}")
            db.execute(_SCHEMA)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def load(self) -> list[ImportRecord]:
        try:
            with self._lock:
                rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM imports").fetchall()
            return [from_row(row) for row in rows]
        except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
            raise StoreError(f"{self.path}: cannot read the stored imports: {exc}") from exc

    def write(
        self, rows: Sequence[Row], deleted: Sequence[ImportKey] = (), refresh: Sequence[Row] = ()
    ) -> None:
        """Upsert ``refresh`` and ``rows`` (from :func:`to_row`) and delete
        ``deleted`` keys, in one transaction of at most two statements (one
        process owns the file, so ``refresh`` is written like ``rows``).
        Raises :class:`StoreError`."""
        rows = [*refresh, *rows]
        try:
            deleted_json = _to_json(deleted)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self.path}: cannot write: {exc}") from exc
        with self._lock:
            try:
                self._check_in_place()
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        if deleted:
                            self._db.execute(_DELETE, (deleted_json,))
                        at = 0
                        for size in _statement_sizes(len(rows)):
                            values = [
                                NULL if value is None else value
                                for value in itertools.chain.from_iterable(rows[at : at + size])
                            ]
                            self._db.execute(_upsert(size), values)
                            at += size
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                    self._db.execute("COMMIT")
                except (sqlite3.Error, OverflowError) as exc:  # Overflow: an int over 64 bits
                    code = getattr(exc, "sqlite_errorcode", None)
                    reason = _REASON_BY_SQLITE_CODE.get(code & 0xFF, "other") if code else "other"
                    raise StoreError(f"{self.path}: cannot write: {exc}", reason) from exc
                # Checked again after the commit: a file deleted during the
                # write got the write, the path did not.
                self._check_in_place()
            except StoreError as exc:
                self._failed(exc)
                raise
            self._succeeded()

    def verify(self) -> None:
        """Check, without writing, that the file is still in place: a database
        deleted while nothing changes must fail readiness all the same."""
        with self._lock:
            if self.health.failing == "vanished":
                return  # known, counted and logged once
            try:
                self._check_in_place()
            except StoreError as exc:
                self._failed(exc)

    def _check_in_place(self) -> None:
        """Fail unless the open file is still the file at the path."""
        if self._identity is None:
            return
        try:
            now = _identity(self.path)
        except OSError:
            now = None
        if now != self._identity:
            raise StoreError(
                f"{self.path}: the database file was deleted or replaced while the exporter "
                "had it open; nothing more is written, and registrations are refused, until "
                "the exporter is restarted (it then starts from what is at that path)",
                "vanished",
            )

    def _failed(self, exc: StoreError) -> None:
        self.health.failed(exc)

    def _succeeded(self) -> None:
        self.health.succeeded(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            # The lock file stays: deleting it would let a process starting
            # now lock a new file while another still holds the old one.
            os.close(self._lock_fd)
            self._lock_fd = None


def _to_json(rows: Sequence[Sequence[object]]) -> str:
    """``rows`` as a JSON array of arrays, encoded a slice at a time (floats
    as ``repr``, which SQLite reads back to the same double)."""
    parts = [
        json.dumps(rows[at : at + JSON_SLICE], ensure_ascii=False, allow_nan=False)[1:-1]
        for at in range(0, len(rows), JSON_SLICE)
    ]
    return "[" + ",".join(parts) + "]"


def _identity(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _take_lock(path: str) -> int:
    """An exclusive lock on ``<path>.lock``, held until the descriptor closes
    (the kernel drops it when the process dies, SIGKILL included).

    A file beside the database rather than the database itself: SQLite's own
    locks on that file are POSIX locks, which a second descriptor of ours
    would silently release when closed."""
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = b""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).strip()
        os.close(fd)
        pid = f" (pid {holder.decode(errors='replace')})" if holder.isdigit() else ""
        raise StoreError(
            f"{path}: in use by another exporter process{pid}; stop it, or give this one "
            "its own --storage.path",
            "busy",
        ) from None
    except OSError:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # only informative: who holds it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
