"""Registrations and what the exporter learnt survive restarts, SIGKILL included;
a corrupt database stops the start; finished registered imports are forgotten
after the retention."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.exposition import choose_encoder

from exporter.cli import build_parser, load_and_restore
from exporter.config import ConfigError
from exporter.config.loader import load_config
from exporter.model import ErrorReason, Observation, Origin, SourceError, State
from exporter.render_process import RenderProcess
from exporter.runtime import Exporter, restore_while_config_parses
from exporter.simulator import DEMO_CREDENTIALS, Simulator, create_app
from exporter.state import StateStore
from exporter.storage import COLUMNS as STORE_COLUMNS
from exporter.storage import StoreError, to_row
from exporter.storage.sqlite import SCHEMA_VERSION as STORE_SCHEMA_VERSION
from exporter.storage.sqlite import SQLiteStorage as Store
from exporter.tracking import Refusal, TrackingError
from tests.conftest import free_port, wait_until

ServerFactory = Callable[..., Awaitable[TestServer]]
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "pipeline-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_config(tmp_path: Path, url: str, retention: str = "24h") -> Path:
    (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
    (tmp_path / "tokens").write_text(f"# pipelines\n{TOKEN}\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"""
retention: {retention}
storage:
  path: state.db
api:
  tokens_file: tokens
sources:
  - name: elevate
    type: elevate
    url: {url}
    api_key_file: key
    interval: 0.2s
    timeout: 0.2s
    max_backoff: 0.2s
    imports:
      - id: '1005'
"""
    )
    return config_file


async def simulator_server(aiohttp_server: ServerFactory, speed: float = 1.0) -> TestServer:
    return await aiohttp_server(create_app(Simulator(speed=speed)))


def test_store_round_trip_keeps_everything_learnt(tmp_path: Path) -> None:
    state = StateStore(clock=lambda: 1_700_000_000.0)
    state.add_source("chat", "rocketchat", 30.0)
    state.track("chat", "chat.example.com", name="history <migration>", origin=Origin.API)
    state.record_observation(
        "chat",
        "chat.example.com",
        Observation(
            state=State.RUNNING,
            upstream_state="importer_importing_messages",
            step="importer_importing_messages",
            reason=None,
            items_completed=600,
            items_expected=5000,
            items_failed=2,
            started_at=1_699_999_000.0,
        ),
    )
    state.record_error(
        "chat", "chat.example.com", SourceError(ErrorReason.TIMEOUT, "no answer within 10s")
    )
    (record,) = state.imports.values()
    path = tmp_path / "state.db"
    store = Store(path)
    store.write([to_row(record)])
    store.close()  # one process (here: one Store) owns the file at a time

    store = Store(path)
    (loaded,) = store.load()
    store.close()
    # Everything but whether *this* process has polled it (the next one has not).
    assert loaded == replace(record, polled_this_run=False)


def test_corrupt_or_unreadable_database_stops_the_start_with_a_clear_error(
    tmp_path: Path,
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    before = garbage.read_bytes()
    with pytest.raises(StoreError, match="corrupt") as caught:
        Store(garbage)
    assert str(garbage) in str(caught.value)
    assert garbage.read_bytes() == before  # nothing was written over it

    # The command line says so and exits 1, never starting on an empty state.
    config_file = tmp_path / "config.yaml"
    config_file.write_text("sources: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(config_file),
         "--storage.path", str(garbage), "--web.listen-address", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1
    assert str(garbage) in result.stderr
    assert "corrupt" in result.stderr

    # A path that is a folder cannot be opened either.
    with pytest.raises(StoreError) as caught:
        Store(tmp_path)
    assert str(tmp_path) in str(caught.value)

    # A database from a newer exporter is not silently misread.
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="newer exporter"):
        Store(newer)


def test_a_database_of_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    """Schema 1 (before the poll-failure columns) keeps every import on upgrade."""
    old = tmp_path / "v1.db"
    later = ("last_attempt", "consecutive_failures", "parked_at")
    first_columns = [c for c in STORE_COLUMNS if c not in later]
    with sqlite3.connect(old) as db:
        db.execute(
            f"CREATE TABLE imports ({', '.join(first_columns)}, "
            "PRIMARY KEY (source, import_id)) WITHOUT ROWID"
        )
        row = dict.fromkeys(first_columns)
        row |= {"source": "shop", "import_id": "1001", "system": "elevate", "origin": "api"}
        row |= {"state": "running", "upstream_state": "IN_PROGRESS", "confirmed_final": 0}
        row |= {"last_error": "HTTP 500", "last_error_reason": "server_error"}
        row |= {"last_error_at": 20.0, "last_success": 10.0}
        db.execute(
            f"INSERT INTO imports VALUES ({', '.join('?' for _ in first_columns)})",
            [row[c] for c in first_columns],
        )
        db.execute("PRAGMA user_version=1")
    store = Store(old)
    (record,) = store.load()
    assert (record.import_id, record.state, record.origin) == ("1001", State.RUNNING, "api")
    assert record.last_attempt is None
    assert record.consecutive_failures == 0
    state = StateStore()
    state.restore([record])
    assert record.poll_failing  # its newest news was an error
    store.write([to_row(record)])
    store.close()
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == STORE_SCHEMA_VERSION


@asynccontextmanager
async def exporter_process(
    config_file: Path, port: int
) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", "--config.file", str(config_file),
        "--web.listen-address", f"127.0.0.1:{port}", cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def api_list(session: aiohttp.ClientSession, port: int) -> dict[str, dict[str, Any]] | None:
    """Every tracked import, following the list's pages (None while not answering)."""
    listing: dict[str, dict[str, Any]] = {}
    params = {"limit": "5000"}
    while True:
        try:
            url = f"http://127.0.0.1:{port}/api/v1/imports"
            async with session.get(url, params=params) as response:
                if response.status != 200:
                    return None
                body = await response.json()
        except aiohttp.ClientError:
            return None
        listing.update((item["id"], item) for item in body["imports"])
        if body.get("next") is None:
            return listing
        params = {"limit": "5000", "after": body["next"]}


async def post_registration(
    session: aiohttp.ClientSession, port: int, import_id: str, name: str | None = None
) -> int:
    """Register an ``elevate`` import with the exporter process on ``port``; the status."""
    async with session.post(
        f"http://127.0.0.1:{port}/api/v1/imports",
        json={"source": "elevate", "id": import_id, "name": name},
        headers=AUTH,
    ) as response:
        return response.status


async def wait_listing(
    session: aiohttp.ClientSession, port: int, done: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    async with asyncio.timeout(20):
        while True:
            listing = await api_list(session, port)
            if listing is not None and done(listing):
                return listing
            await asyncio.sleep(0.05)


def stored_error_at(path: Path, import_id: str) -> float:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT last_error_at FROM imports WHERE import_id = ?", (import_id,)
        ).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


def stored_states(path: Path) -> dict[str, str | None]:
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT import_id, state FROM imports").fetchall())


async def test_sigkill_loses_no_acknowledged_registration_and_keeps_state_and_stalls(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    database = tmp_path / "state.db"
    port = free_port()
    registered = ["1003", "1004", *(f"pipeline-{i}" for i in range(20))]
    async with aiohttp.ClientSession() as session:
        async with exporter_process(config_file, port) as proc:
            await wait_listing(session, port, lambda listing: "1005" in listing)
            for import_id in registered:
                assert await post_registration(session, port, import_id, f"job {import_id}") == 201
            proc.send_signal(signal.SIGKILL)  # at once: nothing had time to flush
            await proc.wait()

        async with exporter_process(config_file, port) as proc:
            listing = await wait_listing(session, port, lambda listing: len(listing) > 1)
            assert set(registered) <= set(listing)
            assert listing["1004"]["name"] == "job 1004"
            assert listing["1004"]["origin"] == "api"

            # Let polls fill the state and reach the database, then kill again.
            def learnt() -> bool:
                states = stored_states(database)
                return (
                    states.get("1004") == "running"
                    and states.get("1003") == "blocked"
                    and states.get("pipeline-0") == "not_found"
                )

            await wait_until(learnt, timeout=20)
            before = await wait_listing(session, port, lambda _: True)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

        # The upstream is gone now: whatever the restarted exporter shows about
        # these imports can only come from what it kept.
        await simulator.close()
        async with exporter_process(config_file, port) as proc:
            after = await wait_listing(session, port, lambda listing: len(listing) > 1)
            assert set(registered) <= set(after)
            for import_id in ("1003", "1004", "pipeline-0"):
                for field in ("state", "upstream_state", "state_changed_at", "last_progress_at"):
                    assert after[import_id][field] == before[import_id][field], (import_id, field)
            assert after["1004"]["state"] == "running"
            # The stall that began before the restarts is still one: the last
            # progress time did not move, so the stuck alert keeps counting.
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            line = next(
                line
                for line in text.splitlines()
                if line.startswith("import_last_progress_timestamp_seconds")
                and 'import="1004"' in line
            )
            assert float(line.rsplit(" ", 1)[1]) > 0

            # Every poll now fails the same way: only the time of the latest
            # failure moves, which is written within about 30 s, or at shutdown. Wait
            # until the exporter knows a failure newer than the stored one.
            def newest_error_at(listing: dict[str, dict[str, Any]]) -> float:
                error = listing["1004"]["last_error"]
                return datetime.fromisoformat(error["at"]).timestamp() if error else 0.0

            known = await wait_listing(
                session,
                port,
                lambda listing: newest_error_at(listing) > stored_error_at(database, "1004") + 0.5,
            )

            # SIGTERM: exits 0 within a few seconds, having written what it knew.
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await proc.wait() == 0
    assert {"1003", "1004", "1005", *registered} <= set(stored_states(database))
    assert stored_error_at(database, "1004") >= newest_error_at(known) - 0.001


async def test_finished_registered_imports_are_forgotten_after_the_retention(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    # At 60x, 1002 fails after half a second and 1005 (listed in the config) aborts.
    simulator = await simulator_server(aiohttp_server, speed=60.0)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"), "1s")
    exporter = Exporter(
        load_config(config_file), "127.0.0.1:0", storage_path=str(tmp_path / "state.db")
    )
    await exporter.start()
    state = exporter.state
    try:
        _, created = await exporter.register("elevate", "1002", "price feed")
        assert created
        await exporter.register("elevate", "1004", "stuck")
        await wait_until(lambda: state.imports[("elevate", "1002")].state is State.FAILED)
        await wait_until(lambda: ("elevate", "1002") not in state.imports, timeout=10)

        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{exporter.port}/metrics") as response:
                text = await response.text()
        assert 'import="1002"' not in text
        assert 'import="1004"' in text  # still running: kept
        # Listed in the config: kept while listed, finished or not.
        assert state.imports[("elevate", "1005")].state is State.ABORTED
        await wait_until(lambda: "1002" not in stored_states(tmp_path / "state.db"))
    finally:
        await exporter.stop()
    assert set(stored_states(tmp_path / "state.db")) == {"1004", "1005"}


async def test_a_registration_the_store_cannot_write_is_refused_and_nothing_is_lost(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    database = tmp_path / "state.db"
    exporter = Exporter(load_config(config_file), "127.0.0.1:0", storage_path=str(database))
    await exporter.start()
    assert isinstance(exporter.store, Store)
    assert exporter.persistence.task is not None
    exporter.persistence.task.cancel()  # only registrations write now: the test decides when
    writable = exporter.store._db
    try:
        await exporter.register("elevate", "1004", None)
        # The disk turns read-only (a full or failing disk looks the same) while
        # what the first poll learnt is not written yet.
        await wait_until(lambda: exporter.state.imports[("elevate", "1004")].state is State.RUNNING)
        assert stored_states(database)["1004"] is None
        with exporter.store._lock:
            exporter.store._db = sqlite3.connect(
                f"file:{database}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
        with pytest.raises(TrackingError, match="cannot store the registration") as refused:
            await exporter.register("elevate", "1003", None)
        assert refused.value.refusal is Refusal.NOT_STORED
        assert ("elevate", "1003") not in exporter.state.imports  # not acknowledged: not tracked

        with exporter.store._lock:
            exporter.store._db.close()
            exporter.store._db = writable  # the disk is back
        await exporter.register("elevate", "1003", None)
        # What was learnt while writes failed was kept for the next periodic
        # write, not dropped (a registration writes its own row only, so it
        # never waits behind a write of every import).
        await exporter.persistence.write_pending()
        assert stored_states(database)["1004"] == "running"
    finally:
        await exporter.stop()
    assert {"1003", "1004"} <= set(stored_states(database))


STARTS_FROM = """
sources:
  - name: shop
    type: elevate
    url: http://127.0.0.1:{port}
    api_key: key
    interval: 1h
    imports:
      - {{id: kept, name: new name}}
"""
"""A source whose upstream refuses every connection: what ``/metrics`` shows
comes from the store and the config only."""


def store_to_start_from(path: Path) -> None:
    """A previous run's rows: an import the config renamed since, one it no
    longer lists, one a pipeline registered, and one of a source gone since."""
    state = StateStore()
    state.add_source("shop", "elevate", 60.0)
    state.add_source("retired", "elevate", 60.0)
    state.track("shop", "kept", name="old name")
    state.track("shop", "dropped", name="dropped")
    state.track("shop", "pipeline", name="registered", origin=Origin.API)
    state.track("retired", "orphan", name="orphan", origin=Origin.API)
    for source, import_id in list(state.imports):
        state.record_observation(source, import_id, Observation(State.RUNNING, "IN_PROGRESS"))
    store = Store(path)
    store.write([to_row(record) for record in state.imports.values()])
    store.close()


def started_from(config_file: Path, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["--config.file", str(config_file), *flags])


def test_a_file_named_on_the_command_line_is_restored_while_the_config_is_parsed(
    tmp_path: Path,
) -> None:
    database = tmp_path / "state.db"
    store_to_start_from(database)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(STARTS_FROM.format(port=free_port()))
    config, path, url, restored = load_and_restore(
        started_from(config_file, "--storage.path", str(database))
    )
    assert restored is not None
    try:
        assert (path, url) == (str(database), None)
        assert restored.store.path == str(database)
        assert [source.name for source in config.sources] == ["shop"]
        # As stored: the config is applied to them when the exporter starts.
        shop = {("shop", i) for i in ("kept", "dropped", "pipeline")}
        assert set(restored.state.imports) == {*shop, ("retired", "orphan")}
        assert b'import="kept"' in rendered(restored.import_lines)  # sent to be rendered
    finally:
        restored.close()


def test_a_file_the_config_overrides_or_does_not_take_is_left_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The config names a PostgreSQL database (which wins), or is broken: the
    file named on the command line is closed again, unchanged, free for
    another process; a file that does not exist is not made before the
    config is known to be valid."""
    caplog.set_level(logging.INFO)
    database = tmp_path / "state.db"
    store_to_start_from(database)
    before = database.read_bytes()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "storage:\n  url: postgresql://exporter:pw@127.0.0.1:1/imports\n"
        + STARTS_FROM.format(port=free_port())
    )
    args = started_from(config_file, "--storage.path", str(database))
    _, _, url, restored = load_and_restore(args)
    assert restored is None
    assert url == "postgresql://exporter:pw@127.0.0.1:1/imports"
    Store(database).close()  # not held
    assert "restored" not in caplog.text  # the log names the store in use only
    assert f"{database} closed unused" in caplog.text

    config_file.write_text(STARTS_FROM.format(port=1).replace("1h", "soon"))
    with pytest.raises(ConfigError):
        load_and_restore(args)
    Store(database).close()
    assert database.read_bytes() == before

    missing = tmp_path / "new.db"
    with pytest.raises(ConfigError):
        load_and_restore(started_from(config_file, "--storage.path", str(missing)))
    assert not missing.exists()


def test_a_restored_state_lists_its_imports_in_the_stores_order(tmp_path: Path) -> None:
    """After a restart ``/metrics`` lists the stored imports sorted by source
    and id, whatever order they were first tracked in."""
    ids = [f"job-{n:03d}" for n in range(200)]
    state = StateStore()
    state.add_source("shop", "elevate", 60.0)
    for import_id in random.Random(5).sample(ids, len(ids)):
        state.track("shop", import_id, origin=Origin.API)
    database = tmp_path / "state.db"
    store = Store(database)
    store.write([to_row(record) for record in state.imports.values()])
    store.close()
    restored = restore_while_config_parses(str(database))
    assert restored is not None
    try:
        body = rendered(restored.import_lines)
    finally:
        restored.close()
    listed = [line.split(b'import="')[1].split(b'"')[0].decode() for line in body.splitlines()
              if line.startswith(b"import_info{")]  # fmt: skip
    assert listed == ids


def rendered(process: RenderProcess) -> bytes:
    """The per-import families a render process serves now (then stopped)."""

    async def render() -> bytes:
        try:
            await process.refresh()
            return bytes(await process.body(*choose_encoder(""), None, gzipped=False))
        finally:
            await process.close()

    return asyncio.run(render())


async def metrics_of_a_start(config_file: Path, *flags: str) -> set[str]:
    """The lines of ``import_info`` and ``import_state`` a started exporter
    process serves first (they move with answers only, and every poll fails)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", "--config.file", str(config_file), *flags,
        "--web.listen-address", f"127.0.0.1:{port}", cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                            text = await response.text()
                            break
                    await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    return {
        line
        for line in text.splitlines()
        if line.startswith(("import_info{", "import_state{")) and line.endswith(" 1.0")
    }


async def test_a_start_serves_the_same_restored_state_whichever_way_the_file_is_named(
    tmp_path: Path,
) -> None:
    """On the command line the file is restored before the config is read,
    and the config applied to it afterwards; named in the config, after. The
    same lines either way: a renamed import has its new name, an import no
    longer listed is gone, a registered one kept, one of a removed source
    parked (not exported)."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(STARTS_FROM.format(port=free_port()))
    store_to_start_from(tmp_path / "flag.db")
    on_the_command_line = await metrics_of_a_start(
        config_file, "--storage.path", str(tmp_path / "flag.db")
    )
    config_file.write_text("storage:\n  path: config.db\n" + config_file.read_text())
    store_to_start_from(tmp_path / "config.db")
    in_the_config = await metrics_of_a_start(config_file)
    assert on_the_command_line == in_the_config
    infos = {line for line in in_the_config if line.startswith("import_info{")}
    assert {line.split('import="')[1].split('"')[0] for line in infos} == {"kept", "pipeline"}
    assert any('import="kept",name="new name"' in line for line in infos)
    assert 'import_state{import="kept",source="shop",state="running"} 1.0' in in_the_config
