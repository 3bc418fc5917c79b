"""The storage contract, on both backends (SQLite and PostgreSQL): what is
written comes back, deletes are kept, a reopened store has it all; then what
each backend adds: one process owns a SQLite file; PostgreSQL is shared,
versions its schema, reconnects, and never shows its password."""

from __future__ import annotations

import queue
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exporter.model import ErrorReason, Observation, Origin, State
from exporter.state import ImportRecord
from exporter.storage import Storage, StoreError, to_row
from exporter.storage.postgres import PostgresStorage
from exporter.storage.sqlite import SQLiteStorage
from tests.conftest import free_port
from tests.postgres import PostgresServer

Opener = Callable[[], Storage]


def record(import_id: str, **fields: object) -> ImportRecord:
    base = ImportRecord(source="shop", import_id=import_id, system="elevate", origin=Origin.API)
    for name, value in fields.items():
        setattr(base, name, value)
    return base


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the same store again each call (closed at the end of the test)."""
    opened: list[Storage] = []
    if request.param == "sqlite":
        where = str(tmp_path / "state.db")
        make: Callable[[], Storage] = lambda: SQLiteStorage(where)  # noqa: E731
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.database()
        make = lambda: PostgresStorage(url)  # noqa: E731

    def open_it() -> Storage:
        opened.append(make())
        return opened[-1]

    yield open_it
    for store in opened:
        store.close()


@pytest.fixture
def storage(opener: Opener) -> Storage:
    return opener()


@pytest.fixture
def sqlite_storage(tmp_path: Path) -> Iterator[Storage]:
    opened = SQLiteStorage(tmp_path / "state.db")
    yield opened
    opened.close()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    return postgres.database()


def test_what_is_written_comes_back_whole(storage: Storage) -> None:
    written = record(
        "1001",
        name="catalogue",
        observation=Observation(State.FAILED, "FAILURE", reason="bad", items_completed=3),
        first_seen=1.0,
        state_since=2.0,
        last_success=3.0,
        last_error="HTTP 500",
        last_error_reason=ErrorReason.SERVER_ERROR,
        last_error_at=4.0,
        consecutive_failures=2,
        confirmed_final=True,
    )
    storage.write([to_row(written)])
    (loaded,) = storage.load()
    assert loaded == written


def test_upserts_and_deletes_in_one_write(storage: Storage) -> None:
    storage.write([to_row(record("1")), to_row(record("2"))])
    storage.write([to_row(record("2", name="renamed"))], deleted=[("shop", "1")])
    assert [(r.import_id, r.name) for r in storage.load()] == [("2", "renamed")]
    assert storage.health.last_write_ok


def test_a_reopened_store_has_everything_written(opener: Opener) -> None:
    first = opener()
    first.write([to_row(record("1", first_seen=5.0)), to_row(record("2"))])
    first.write([], deleted=[("shop", "2")])
    first.close()
    assert [(r.import_id, r.first_seen) for r in opener().load()] == [("1", 5.0)]


def test_what_polls_learnt_is_written_too(storage: Storage) -> None:
    storage.write([to_row(record("api"))])
    listed = record("listed", origin=Origin.CONFIG, first_seen=1.0)
    storage.write([], refresh=[to_row(listed), to_row(record("api", last_success=9.0))])
    loaded = {r.import_id: r for r in storage.load()}
    assert loaded["listed"] == listed
    assert loaded["api"].last_success == 9.0


@pytest.mark.usefixtures("sqlite_storage")
def test_one_process_owns_a_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="in use"):
        SQLiteStorage(tmp_path / "state.db")


def test_a_deleted_file_fails_the_next_write_and_says_why(
    tmp_path: Path, sqlite_storage: Storage
) -> None:
    storage = sqlite_storage
    (tmp_path / "state.db").unlink()
    with pytest.raises(StoreError) as caught:
        storage.write([to_row(record("1"))])
    assert caught.value.reason == "vanished"
    assert "deleted or replaced" in caught.value.public
    assert str(tmp_path) not in caught.value.public  # API clients never see the path
    assert storage.health.failing == "vanished"


# --- PostgreSQL ---------------------------------------------------------------


def test_replicas_sharing_a_database_see_each_others_writes(pg_url: str) -> None:
    a, b = PostgresStorage(pg_url), PostgresStorage(pg_url)
    try:
        a.write([to_row(record("1"))])
        b.write([to_row(record("2"))], deleted=[("shop", "1")])
        assert [r.import_id for r in a.load()] == ["2"]
    finally:
        a.close()
        b.close()


def test_the_password_is_never_shown(postgres: PostgresServer, pg_url: str) -> None:
    store = PostgresStorage(pg_url)
    store.close()
    assert postgres.password not in store.path
    assert store.path.startswith("postgresql://postgres:***@127.0.0.1:")
    wrong = pg_url.replace(postgres.password, "not-the-password")
    with pytest.raises(StoreError) as caught:
        PostgresStorage(wrong)
    assert "not-the-password" not in str(caught.value)
    assert "password authentication failed" in str(caught.value)


def test_a_server_that_is_not_there_is_unavailable_and_says_where(
    postgres: PostgresServer,
) -> None:
    url = f"postgresql://postgres:{postgres.password}@127.0.0.1:{free_port()}/db"
    with pytest.raises(StoreError) as caught:
        PostgresStorage(url)
    assert caught.value.reason == "unavailable"
    assert "127.0.0.1" in str(caught.value)  # where, for the log
    assert postgres.password not in str(caught.value)
    assert "cannot be reached" in caught.value.public
    assert "127.0.0.1" not in caught.value.public


def test_a_newer_schema_stops_the_start_naming_the_database(
    postgres: PostgresServer, pg_url: str
) -> None:
    import psycopg

    PostgresStorage(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE import_status_schema SET version = 99")
    with pytest.raises(StoreError, match="newer exporter") as caught:
        PostgresStorage(pg_url)
    assert pg_url.rsplit("/", 1)[1] in str(caught.value)  # the database's name
    assert postgres.password not in str(caught.value)


def test_a_restarted_server_fails_writes_then_is_written_again(
    postgres: PostgresServer, pg_url: str
) -> None:
    store = PostgresStorage(pg_url)
    try:
        store.write([to_row(record("1"))])
        postgres.stop()
        try:
            with pytest.raises(StoreError) as caught:
                store.write([to_row(record("2"))])
            assert caught.value.reason == "unavailable"
            assert store.health.failing == "unavailable"
            store.verify()  # still down: still failing, counted once
            assert store.health.write_errors["unavailable"] == 1
        finally:
            postgres.start()
        store.verify()  # reconnects: ready again before the next write
        assert store.health.failing is None
        store.write([to_row(record("2"))])
        assert sorted(r.import_id for r in store.load()) == ["1", "2"]
    finally:
        store.close()


def test_what_polls_learnt_never_brings_back_a_registration_deleted_elsewhere(
    pg_url: str,
) -> None:
    a, b = PostgresStorage(pg_url), PostgresStorage(pg_url)
    try:
        a.write([to_row(record("1"))])
        b.write([], deleted=[("shop", "1")])
        a.write([], refresh=[to_row(record("1", last_success=9.0))])  # A polled it meanwhile
        assert a.load() == []
    finally:
        a.close()
        b.close()


def test_other_replicas_hear_of_registrations_and_removals_not_of_polls(pg_url: str) -> None:
    a, b = PostgresStorage(pg_url), PostgresStorage(pg_url)
    heard: queue.Queue[list[tuple[str, str]] | None] = queue.Queue()

    def next_heard() -> list[tuple[str, str]] | None:
        return heard.get(timeout=10)

    try:
        b.watch(lambda keys: heard.put(None if keys is None else list(keys)))
        assert next_heard() is None  # once listening: read everything that came before
        a.write([to_row(record("1"))])
        assert next_heard() == [("shop", "1")]
        a.write([], refresh=[to_row(record("1", last_success=9.0))])
        a.write([], deleted=[("shop", "1")])
        assert next_heard() == [("shop", "1")]
        b.write([to_row(record("2"))])  # its own: not heard
        a.claim(to_row(record("3")), 10)
        assert next_heard() == [("shop", "3")]
        # Too many to name in one notification: read everything.
        a.write([to_row(record(f"many-{n:04}-{'x' * 50}")) for n in range(200)])
        assert next_heard() is None
        with pytest.raises(queue.Empty):
            heard.get(timeout=0.5)  # nothing else was heard
    finally:
        a.close()
        b.close()


def test_a_claim_keeps_what_the_owner_learnt_and_only_renames(pg_url: str) -> None:
    owner, other = PostgresStorage(pg_url), PostgresStorage(pg_url)
    try:
        claimed = other.claim(to_row(record("1", name="nightly")), 10)
        assert claimed is not None
        assert claimed[1]  # new
        assert claimed[0].name == "nightly"
        assert claimed[0].observation is None
        running = Observation(state=State.RUNNING, upstream_state="running")
        owner.write([], refresh=[to_row(record("1", name="nightly", observation=running))])
        again = other.claim(to_row(record("1")), 10)  # no name: nothing changes
        assert again is not None
        assert not again[1]
        assert again[0].name == "nightly"
        assert again[0].observation == running
        renamed = other.claim(to_row(record("1", name="weekly")), 10)
        assert renamed is not None
        assert renamed[0].name == "weekly"
        assert renamed[0].observation == running
        # What a poll learnt afterwards, written by an owner that still has
        # the old name, does not undo the rename.
        owner.write([], refresh=[to_row(record("1", name="nightly", observation=running))])
        stored = owner.get(("shop", "1"))
        assert stored is not None
        assert stored.name == "weekly"
    finally:
        owner.close()
        other.close()


def test_a_claim_keeps_the_limit_of_a_source_for_new_imports_only(pg_url: str) -> None:
    a, b = PostgresStorage(pg_url), PostgresStorage(pg_url)
    try:
        assert a.claim(to_row(record("1")), 2) is not None
        assert b.claim(to_row(record("2")), 2) is not None
        assert a.claim(to_row(record("3")), 2) is None  # a third: refused
        again = b.claim(to_row(record("1", name="x")), 2)  # one there already: fine
        assert again is not None
        assert again[0].name == "x"
        assert sorted(r.import_id for r in a.load()) == ["1", "2"]
    finally:
        a.close()
        b.close()


def test_every_replica_reads_every_import_a_page_at_a_time(pg_url: str) -> None:
    store = PostgresStorage(pg_url)
    try:
        running = Observation(state=State.RUNNING, upstream_state="running")
        rows = [to_row(record(f"{n:02}", observation=running if n % 2 else None)) for n in range(5)]
        store.write(rows, refresh=[to_row(ImportRecord("chat", "x", "rocketchat"))])
        first = store.page(None, "shop", None, 2)
        assert [r.import_id for r in first] == ["00", "01"]
        rest = store.page(("shop", "01"), "shop", None, 10)
        assert [r.import_id for r in rest] == ["02", "03", "04"]
        assert [r.import_id for r in store.page(None, None, "running", 10)] == ["01", "03"]
        assert [r.source for r in store.page(None, None, None, 1)] == ["chat"]
        got = store.get(("shop", "03"))
        assert got is not None
        assert got.observation == running
        assert store.get(("shop", "99")) is None
        both = store.get_many([("shop", "01"), ("shop", "99"), ("chat", "x")])
        assert sorted(r.import_id for r in both) == ["01", "x"]
        assert store.get_many([]) == []
        assert [r.import_id for r in store.load_registered()] == [f"{n:02}" for n in range(5)]
    finally:
        store.close()


def test_a_connection_that_vanished_fails_in_seconds_unless_the_url_says_otherwise() -> None:
    from exporter.storage.postgres import _connection_options

    options = _connection_options("postgresql://u:p@db/x")
    assert options["keepalives"] == 1
    assert options["tcp_user_timeout"] == 30_000
    assert options["connect_timeout"] == 5
    given = _connection_options("postgresql://u:p@db/x?tcp_user_timeout=5000&connect_timeout=2")
    assert "tcp_user_timeout" not in given  # the URL's own settings win
    assert "connect_timeout" not in given


def test_a_write_of_more_rows_than_one_statement_takes_keeps_them_all(storage: Storage) -> None:
    from exporter.storage.sqlite import ROWS_PER_STATEMENT

    many = [
        to_row(record(f"{n:05}", last_success=n + 0.1)) for n in range(ROWS_PER_STATEMENT * 2 + 1)
    ]
    storage.write(many)
    stored = {r.import_id: r for r in storage.load()}
    assert len(stored) == len(many)
    assert stored[f"{ROWS_PER_STATEMENT * 2:05}"].last_success == ROWS_PER_STATEMENT * 2 + 0.1


def test_sqlite_prepares_a_few_statement_sizes_whatever_the_batch() -> None:
    """SQLite caches every statement it prepared: one per batch size held
    hundreds of megabytes of statements of up to 27,000 parameters."""
    from exporter.storage.sqlite import _statement_sizes

    used: set[int] = set()
    for count in range(2001):
        sizes = _statement_sizes(count)
        assert sum(sizes) == count
        used.update(sizes)
    assert len(used) <= 9


def test_rows_in_any_order_and_of_several_sources_are_all_kept(storage: Storage) -> None:
    """What is stored does not depend on the order the rows come in."""
    rows = [
        to_row(ImportRecord(source=source, import_id=import_id, system="elevate", name=name))
        for source, import_id, name in [
            ("shop", "b", "1"),
            ("crm", "z", "2"),
            ("shop", "a", "3"),
            ("crm", "é", "4"),
            ("crm", "a", "5"),
            ("shop", "10", "6"),
            ("shop", "9", "7"),
        ]
    ]
    storage.write(rows[:3], refresh=rows[3:])
    stored = {(r.source, r.import_id): r.name for r in storage.load()}
    assert stored == {(row[0], row[1]): row[3] for row in rows}


def test_sqlite_keeps_the_last_row_of_a_key_given_twice(sqlite_storage: Storage) -> None:
    """``refresh`` (what polls learnt) is written before ``rows`` (a
    registration's): of a key in both, the registration's row stays."""
    first, last = to_row(record("1", name="first")), to_row(record("1", name="last"))
    sqlite_storage.write([to_row(record("2")), last], refresh=[first, to_row(record("0"))])
    assert {r.import_id: r.name for r in sqlite_storage.load()}["1"] == "last"


def test_a_row_holds_only_values_sqlite_binds_as_they_are() -> None:
    """An enum member (a str subclass) is bound only after sqlite3's failed
    adapter lookup, which formats an AttributeError: rows hold plain values."""
    full = record(
        "1",
        name="n",
        observation=Observation(State.FAILED, "FAILURE", "step", "why", 1, 2, 3, 4.0, 5.0),
        first_seen=1.0,
        last_error="HTTP 500",
        last_error_reason=ErrorReason.SERVER_ERROR,
        last_error_at=4.0,
        confirmed_final=True,
    )
    assert {type(value) for value in to_row(full)} <= {str, int, float, type(None)}


def test_sqlite_binds_a_rows_nulls_without_the_adapter_lookup(
    sqlite_storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A None goes through sqlite3's adapter lookup (a tuple built, a dict
    looked up, the adapter called) for each of a row's dozen NULLs: a quarter of
    the write's CPU, which the storage thread spends holding the GIL. They are
    bound without it, and still read back as None."""
    adapted: list[object] = []

    def counting(value: object) -> object:
        adapted.append(value)
        return value

    none_adapter: tuple[type[object], type[object]] = (type(None), sqlite3.PrepareProtocol)
    monkeypatch.setitem(sqlite3.adapters, none_adapter, counting)
    sparse = record("1")  # no name, no observation, no error: NULLs
    sqlite_storage.write([to_row(sparse)])
    assert adapted == []
    (loaded,) = sqlite_storage.load()
    assert to_row(loaded) == to_row(sparse)
    assert loaded.name is None
    assert loaded.observation is None
    assert loaded.last_error is None


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("state", "exploded"),
        ("origin", "elsewhere"),
        ("last_error_reason", "gremlins"),
        ("started_at", "yesterday"),
        ("items_completed", "many"),
        ("items_completed", float("inf")),
    ],
)
def test_a_stored_value_that_cannot_be_read_stops_the_start_naming_the_file(
    tmp_path: Path, column: str, value: object
) -> None:
    """Never a start on a state that silently dropped or misread an import."""
    path = tmp_path / "state.db"
    store = SQLiteStorage(path)
    store.write([to_row(record("1", observation=Observation(State.RUNNING, "IN_PROGRESS")))])
    store.close()
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE imports SET {column} = ?", (value,))
    store = SQLiteStorage(path)
    try:
        with pytest.raises(StoreError, match="cannot read the stored imports") as caught:
            store.load()
        assert str(path) in str(caught.value)
    finally:
        store.close()
