"""The shared backend: one PostgreSQL database, one row per import, for
replicas that must all see every registration (``storage.url``).

Same semantics as the SQLite file: a write is one transaction, committed
(``synchronous_commit`` as the server has it: on by default) before it
returns; the schema is created and migrated by the exporter itself, versioned
in ``import_status_schema``, under an advisory lock so replicas starting
together migrate once; a newer schema than this program knows stops the start.

Unlike the file, the database is shared: nothing here claims it for one
process. A lost connection (the server restarted, a failover to a new primary)
fails the write in hand with ``unavailable`` and the next call reconnects.
The password is never in :attr:`PostgresStorage.path`, logs or errors.

psycopg 3 (the optional ``postgres`` extra) is imported only when the URL
asks for PostgreSQL, so the default install does not need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from exporter.logs import context
from exporter.model import Origin
from exporter.state import ImportKey, ImportRecord
from exporter.storage import COLUMNS, Row, StoreError, StoreHealth, from_row

if TYPE_CHECKING:
    import psycopg

SCHEMA_VERSION = 1
"""1: the first (the columns of SQLite's schema 3)."""

_MIGRATIONS: dict[int, tuple[str, ...]] = {}
"""Statements that take schema ``version - 1`` to ``version`` (none yet)."""

_TYPES = {
    "items_completed": "BIGINT",
    "items_expected": "BIGINT",
    "items_failed": "BIGINT",
    "confirmed_final": "INTEGER NOT NULL DEFAULT 0",
    "consecutive_failures": "INTEGER NOT NULL DEFAULT 0",
}
_TEXT = {
    "source",
    "import_id",
    "system",
    "name",
    "origin",
    "state",
    "upstream_state",
    "step",
    "reason",
    "last_error",
    "last_error_reason",
}


def _column_type(column: str) -> str:
    if column in _TYPES:
        return _TYPES[column]
    return "TEXT" if column in _TEXT else "DOUBLE PRECISION"


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS imports ("
    + ", ".join(f"{column} {_column_type(column)}" for column in COLUMNS)
    + ", PRIMARY KEY (source, import_id))"
)
_UPSERT = (
    f"INSERT INTO imports ({', '.join(COLUMNS)}) VALUES ({', '.join('%s' for _ in COLUMNS)}) "
    "ON CONFLICT (source, import_id) DO UPDATE SET "
    + ", ".join(f"{column} = EXCLUDED.{column}" for column in COLUMNS[2:])
)
_LEARNT = tuple(column for column in COLUMNS[2:] if column != "name")
"""What a poll's write of a registration sets: not its name, which belongs to
the registrations (a rename through another replica must not be undone)."""
_UPDATE = (
    "UPDATE imports SET "
    + ", ".join(f"{column} = %s" for column in _LEARNT)
    + " WHERE source = %s AND import_id = %s"
)
_SELECTED = ", ".join(COLUMNS)
_INSERT = (
    f"INSERT INTO imports ({_SELECTED}) VALUES ({', '.join('%s' for _ in COLUMNS)}) "
    f"ON CONFLICT (source, import_id) DO NOTHING RETURNING {_SELECTED}"
)
_COUNT = "SELECT count(*) FROM imports WHERE source = %s"
_RENAME = f"UPDATE imports SET name = %s WHERE source = %s AND import_id = %s RETURNING {_SELECTED}"
_GET = f"SELECT {_SELECTED} FROM imports WHERE source = %s AND import_id = %s"
CHANNEL = "import_status_changes"
"""NOTIFY channel: a registration or removal was committed (payload: JSON,
the writer's token, so a replica skips its own, and the imports' keys)."""
_MIGRATION_LOCK = 0x1D5E_0016
"""pg_advisory_xact_lock key: replicas starting at once migrate one after the other."""
MAX_NOTE = 7000
"""Bytes of a NOTIFY payload at most (PostgreSQL's limit is 8,000)."""
CONNECT_TIMEOUT = 5
"""Seconds to wait for a connection (a write waits no longer on a dead server)."""

log = logging.getLogger(__name__)

_REASON_BY_SQLSTATE = {
    "53100": "disk_full",  # disk_full
    "25006": "read_only",  # read_only_sql_transaction (a standby, or default_transaction_read_only)
    "42501": "read_only",  # insufficient_privilege
    "55P03": "busy",  # lock_not_available
    "40P01": "busy",  # deadlock_detected
    "40001": "busy",  # serialization_failure
    "57P01": "unavailable",  # admin_shutdown
    "57P02": "unavailable",  # crash_shutdown
    "57P03": "unavailable",  # cannot_connect_now (starting up, shutting down)
}
SERVER_GONE = frozenset({"unavailable", "read_only"})
"""Failures of the server, not of a statement: the probe sees them end."""
_REASON_BY_SQLSTATE_CLASS = {"08": "unavailable", "58": "io_error", "53": "disk_full"}


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """The URL without its password (for logs, errors and :attr:`path`)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
        query = "&".join(
            "password=***" if pair.lower().startswith("password=") else pair
            for pair in parts.query.split("&")
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "postgresql://(unparsable URL)"


def _reason(exc: Exception) -> str:
    import psycopg

    state = getattr(exc, "sqlstate", None)
    if state:
        return _REASON_BY_SQLSTATE.get(state) or _REASON_BY_SQLSTATE_CLASS.get(state[:2], "other")
    # No SQLSTATE: the connection itself failed (refused, reset, timed out).
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return "unavailable"
    return "other"


class PostgresStorage:
    """The PostgreSQL database behind the state, over one connection that is
    reopened when lost. Safe to call from one thread at a time."""

    shared = True
    """Other processes (replicas, shards) write the same database."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # noqa: F401  (the optional extra: a clear error without it)
        except ImportError as exc:
            raise StoreError(
                "storage.url asks for PostgreSQL, but psycopg is not installed: "
                "pip install 'import-status-exporter[postgres]'"
            ) from exc
        self._url = url
        self._options = _connection_options(url)
        self.path = redact_url(url)
        self._secrets = _secrets_of(url)
        self.health = StoreHealth()
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._token = secrets.token_hex(8)
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None
        with self._lock:
            try:
                self._connect()
                self._migrate()
            except StoreError:
                self._drop()
                raise

    def _error(self, what: str, exc: Exception, reason: str | None = None) -> StoreError:
        text = str(exc).strip() or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return StoreError(f"{self.path}: {what}: {text}", reason or _reason(exc))

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self._drop()
        try:
            self._conn = psycopg.connect(self._url, **self._options)
        except psycopg.Error as exc:
            raise self._error("cannot connect", exc) from exc
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except Exception as exc:  # closing a dead connection: nothing to save
                log.debug("closing the PostgreSQL connection: %s", exc)

    def _migrate(self) -> None:
        import psycopg

        conn = self._conn
        assert conn is not None
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS import_status_schema (version INTEGER NOT NULL)"
                )
                row = conn.execute("SELECT max(version) FROM import_status_schema").fetchone()
                version = row[0] if row and row[0] is not None else None
                if version is not None and version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: the database was written by a newer exporter (schema "
                        f"{version}, this one knows {SCHEMA_VERSION}); run the newer exporter, "
                        "or point storage.url at another database",
                        "other",
                    )
                conn.execute(_SCHEMA)
                if version is None:
                    conn.execute("INSERT INTO import_status_schema VALUES (%s)", (SCHEMA_VERSION,))
                elif version < SCHEMA_VERSION:
                    for step in range(version + 1, SCHEMA_VERSION + 1):
                        for statement in _MIGRATIONS.get(step, ()):
                            conn.execute(statement.encode())
                    conn.execute("UPDATE import_status_schema SET version = %s", (SCHEMA_VERSION,))
        except psycopg.Error as exc:
            raise self._error("cannot create or migrate the schema", exc) from exc

    def _select(self, where: str = "", params: Sequence[object] = (), tail: str = "") -> list[Row]:
        import psycopg

        query = f"SELECT {_SELECTED} FROM imports {where} {tail}"
        with self._lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    return [tuple(row) for row in conn.execute(query.encode(), params).fetchall()]
            except psycopg.Error as exc:
                raise self._read_failed("cannot read the stored imports", exc) from exc

    def _read_failed(self, what: str, exc: Exception) -> StoreError:
        """A read failed: the next call reconnects, and a server that is gone
        (or a standby) shows in :attr:`health` (readiness) at once, not at the
        next write; the probe clears it when the server is back. A read that
        failed for its own sake (a value the server refused) is that read's
        error only."""
        self._drop()
        error = self._error(what, exc)
        if error.reason in SERVER_GONE:
            self._probe_failed(error)
        return error

    def _records(self, rows: Iterable[Row]) -> list[ImportRecord]:
        try:
            return [from_row(row) for row in rows]
        except (ValueError, TypeError, OverflowError) as exc:
            raise StoreError(f"{self.path}: cannot read the stored imports: {exc}") from exc

    def load(self) -> list[ImportRecord]:
        return self._records(self._select())

    def load_registered(self) -> list[ImportRecord]:
        """The imports registered through the API (what replicas follow)."""
        return self._records(self._select("WHERE origin = %s", (Origin.API.value,)))

    def get(self, key: ImportKey) -> ImportRecord | None:
        found = self._records(self._select("WHERE source = %s AND import_id = %s", key))
        return found[0] if found else None

    def get_many(self, keys: Sequence[ImportKey]) -> list[ImportRecord]:
        if not keys:
            return []
        sources, ids = [key[0] for key in keys], [key[1] for key in keys]
        where = "WHERE (source, import_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
        return self._records(self._select(where, (sources, ids)))

    def page(
        self, after: ImportKey | None, source: str | None, state: str | None, limit: int
    ) -> list[ImportRecord]:
        conditions: list[str] = []
        params: list[object] = []
        if after is not None:
            conditions.append("(source, import_id) > (%s, %s)")
            params += after
        if source is not None:
            conditions.append("source = %s")
            params.append(source)
        if state is not None:
            conditions.append("state = %s")
            params.append(state)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        params.append(limit)
        return self._records(self._select(where, params, "ORDER BY source, import_id LIMIT %s"))

    def claim(self, row: Row, limit: int) -> tuple[ImportRecord, bool] | None:
        """Insert the registration, or (stored already) only set the name it
        gives; None if it is new and its source has ``limit`` imports stored.
        One transaction, serialized per source (an advisory lock) so replicas
        registering at once keep the limit; the other replicas told on commit."""
        import psycopg

        source, import_id, name = row[0], row[1], row[COLUMNS.index("name")]
        with self._lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_source_lock(str(source)),))
                    stored = conn.execute(_GET, (source, import_id)).fetchone()
                    new = stored is None
                    if stored is None:
                        count = conn.execute(_COUNT, (source,)).fetchone()
                        if count is not None and count[0] >= limit:
                            return None
                        stored = conn.execute(_INSERT, row).fetchone()
                        if stored is None:  # a poll's write of the owner came first
                            stored, new = conn.execute(_GET, (source, import_id)).fetchone(), False
                    elif name is not None and name != stored[COLUMNS.index("name")]:
                        stored = conn.execute(_RENAME, (name, source, import_id)).fetchone()
                    else:
                        return self._records([tuple(stored)])[0], False  # nothing to tell
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._note([row[:2]])))
            except psycopg.Error as exc:
                self._drop()
                error = self._error("cannot write", exc)
                self._failed(error)
                raise error from exc
            self._succeeded()
        assert stored is not None  # the row is locked by this transaction's lock on its source
        return self._records([tuple(stored)])[0], new

    def write(
        self, rows: Iterable[Row], deleted: Iterable[ImportKey] = (), refresh: Iterable[Row] = ()
    ) -> None:
        """Upsert ``rows`` (registrations) and delete ``deleted`` keys in one
        transaction, committed when it returns, and tell the other replicas
        (NOTIFY, sent on commit). ``refresh`` (what polls learnt) only updates
        registrations still in the database, so it never brings back one that
        another replica deleted. Raises :class:`StoreError`."""
        import psycopg

        rows, deleted = list(rows), list(deleted)
        origin = COLUMNS.index("origin")
        learnt = [COLUMNS.index(column) for column in _LEARNT]
        updates = [
            (*(row[i] for i in learnt), row[0], row[1])
            for row in refresh
            if row[origin] == Origin.API
        ]
        upserts = [row for row in refresh if row[origin] != Origin.API]
        with self._lock:
            try:
                conn = self._connect()
                with conn.transaction(), conn.cursor() as cursor:
                    if deleted:
                        cursor.executemany(
                            "DELETE FROM imports WHERE source = %s AND import_id = %s", deleted
                        )
                    if updates:
                        cursor.executemany(_UPDATE, updates)
                    if upserts or rows:
                        cursor.executemany(_UPSERT, [*upserts, *rows])
                    if rows or deleted:
                        keys = [(row[0], row[1]) for row in rows] + deleted
                        cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._note(keys)))
            except psycopg.Error as exc:
                # Reconnect next time: after a failover the old connection may
                # still be open, to a server that became a standby.
                self._drop()
                error = self._error("cannot write", exc)
                self._failed(error)
                raise error from exc
            except StoreError as exc:
                self._failed(exc)
                raise
            self._succeeded()

    def verify(self) -> None:
        """A cheap probe (``SELECT 1``, reconnecting if need be): a database
        that went away while nothing changes fails readiness all the same,
        and one that came back is ready again before the next write."""
        import psycopg

        with self._lock:
            try:
                conn = self._connect()
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                conn.rollback()
                if row is not None and row[0]:
                    raise StoreError(
                        f"{self.path}: the server is a standby (read-only); waiting for a primary",
                        "read_only",
                    )
            except psycopg.Error as exc:
                self._drop()
                self._probe_failed(self._error("cannot reach the database", exc))
                return
            except StoreError as exc:
                self._drop()
                self._probe_failed(exc)
                return
            if self.health.failing in SERVER_GONE:
                self._succeeded()

    def _probe_failed(self, exc: StoreError) -> None:
        """Counted and logged once, not once a second while the server is down."""
        if self.health.failing != exc.reason:
            self._failed(exc)

    def _failed(self, exc: StoreError) -> None:
        self.health.failed(exc)

    def _succeeded(self) -> None:
        self.health.succeeded(self.path)

    def _note(self, keys: Sequence[Sequence[object]]) -> str:
        """A NOTIFY payload: who wrote (a replica skips its own) and which
        imports, unless they do not fit (then readers read every registration)."""
        note = json.dumps({"by": self._token, "keys": [list(key) for key in keys]})
        return note if len(note) <= MAX_NOTE else json.dumps({"by": self._token})

    def watch(self, on_change: Callable[[Sequence[ImportKey] | None], None]) -> None:
        """Call ``on_change`` (from a thread of its own) with the imports
        another replica registered or removed, once committed; and with None
        (read everything) once listening (again), for what was missed before,
        until :meth:`close`. LISTEN on a connection of its own: one NOTIFY per
        change, no polling of the database."""
        self._watcher = threading.Thread(
            target=self._listen, args=(on_change,), name="postgres-listen", daemon=True
        )
        self._watcher.start()

    def _listen(self, on_change: Callable[[Sequence[ImportKey] | None], None]) -> None:
        import psycopg

        delay = RETRY_FIRST
        while not self._closing.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, **self._options) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Whatever was committed before this LISTEN (since the
                    # start's load, or while disconnected) is read now.
                    on_change(None)
                    delay = RETRY_FIRST
                    checked = time.monotonic()
                    while not self._closing.is_set():
                        for note in conn.notifies(timeout=0.5):
                            heard = _heard(note.payload)
                            if heard is None or heard[0] != self._token:
                                on_change(heard[1] if heard else None)
                        if time.monotonic() - checked >= HEARTBEAT:
                            # A connection that only listens learns of a dead
                            # server only when it sends something (then within
                            # tcp_user_timeout), so it asks now and then.
                            conn.execute("SELECT 1")
                            checked = time.monotonic()
            except psycopg.Error as exc:
                log.debug("listening for changes: %s", self._error("lost", exc))
                self._closing.wait(delay)
                delay = min(delay * 2, LISTEN_RETRY_MAX)

    def close(self) -> None:
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            self._drop()


def _heard(payload: str) -> tuple[str, list[ImportKey] | None] | None:
    """Who wrote and which imports (None: not said), from a NOTIFY payload;
    None if it is not one of ours."""
    try:
        note = json.loads(payload)
        keys = note.get("keys")
        return str(note["by"]), None if keys is None else [(str(s), str(i)) for s, i in keys]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _connection_options(url: str) -> dict[str, Any]:
    """libpq settings the URL does not set: a name in pg_stat_activity, a
    bounded connect, and TCP keepalives and a user timeout, so a server that
    vanished without closing the connection (a lost host, a partition) fails
    the call in hand within seconds instead of hours."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        given = conninfo_to_dict(url)
    except Exception:  # psycopg says what is wrong when it connects
        given = {}
    defaults: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": "import-status-exporter",
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    return {key: value for key, value in defaults.items() if key not in given}


def _source_lock(source: str) -> int:
    """The advisory lock key of a source's registrations (a signed 64-bit hash)."""
    return int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest(), signed=True)


def _secrets_of(url: str) -> list[str]:
    """The password in the URL, as given and as the server may echo it."""
    secrets: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            secrets.append(parts.password)
        for pair in parts.query.split("&"):
            key, _, value = pair.partition("=")
            if key.lower() == "password" and value:
                secrets.append(value)
    except ValueError:
        pass
    return secrets


RETRY_FIRST = 1.0
RETRY_MAX = 30.0
"""Seconds between attempts to reach PostgreSQL at start: doubling up to this."""
LISTEN_RETRY_MAX = 5.0
"""Seconds between attempts to listen again: the owner of an import registered
elsewhere starts polling it within this once the server is back."""
HEARTBEAT = 10.0
"""Seconds between the listening connection's checks that the server is there."""


async def open_when_reachable(url: str | None, stop: asyncio.Event) -> PostgresStorage | None:
    """Open the database, retrying with backoff while the server cannot be
    reached (down, starting, failing over); None if ``stop`` is set first (or
    there is no URL). Any other failure (a wrong password, a newer schema)
    raises at once."""
    if url is None:
        return None
    delay = RETRY_FIRST
    while True:
        try:
            return await asyncio.to_thread(PostgresStorage, url)
        except StoreError as exc:
            if exc.reason != "unavailable":
                raise
            log.error(
                "cannot reach PostgreSQL, retrying (not ready until then): %s",
                exc,
                extra=context(storage=redact_url(url), retry_in_seconds=delay),
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        if stop.is_set():
            return None
        delay = min(delay * 2, RETRY_MAX)
