"""Issue 11: never acknowledge what the exporter will not keep. One process owns
a database; a database deleted under a running exporter is noticed; memory
changes only after the store accepted; store failures are visible to
monitoring; registrations and reloads are ordered; a config edit parks
registered imports instead of deleting them; SIGHUP during start-up is safe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from exporter.config.loader import load_config
from exporter.model import Observation, Origin, State
from exporter.runtime import Exporter
from exporter.simulator import DEMO_CREDENTIALS
from exporter.state import ImportRecord
from exporter.storage import StoreError, to_row
from exporter.storage.sqlite import SQLiteStorage as Store
from tests.conftest import free_port, wait_until
from tests.integration.test_persistence import (
    AUTH,
    ROOT,
    TOKEN,
    api_list,
    exporter_process,
    simulator_server,
    stored_states,
    wait_listing,
    write_config,
)

ServerFactory = Callable[..., Awaitable[TestServer]]
IMPORTS = "/api/v1/imports"
RUNNING = "bench-1"  # the simulator answers IN_PROGRESS for any id starting with bench-


@contextlib.asynccontextmanager
async def running_exporter(
    config_file: Path, database: Path, *, reloadable: bool = False
) -> AsyncIterator[Exporter]:
    loader = (lambda: load_config(config_file)) if reloadable else None
    exporter = Exporter(
        load_config(config_file), "127.0.0.1:0", None, loader, storage_path=str(database)
    )
    await exporter.start()
    try:
        yield exporter
    finally:
        await exporter.stop()


async def call(
    http: aiohttp.ClientSession, method: str, exporter: Exporter, path: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, f"http://127.0.0.1:{exporter.port}{path}", **kwargs) as answer:
        if answer.content_type == "application/json":
            return answer.status, await answer.json()
        return answer.status, await answer.text()


async def register(
    http: aiohttp.ClientSession, exporter: Exporter, import_id: str, name: str | None = None
) -> tuple[int, Any]:
    body = {"source": "elevate", "id": import_id, "name": name}
    return await call(http, "POST", exporter, IMPORTS, json=body, headers=AUTH)


# --- 2. one process per database ---------------------------------------------------


def test_a_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    first = Store(database)
    try:
        with pytest.raises(StoreError, match="in use") as refused:
            Store(database)
        assert str(database) in str(refused.value)
    finally:
        first.close()
    Store(database).close()  # released with the first one


async def test_a_second_exporter_on_the_same_database_refuses_to_start(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    database = tmp_path / "state.db"
    port = free_port()
    async with aiohttp.ClientSession() as session, exporter_process(config_file, port) as first:
        await wait_listing(session, port, lambda listing: "1005" in listing)
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "exporter", "--config.file", str(config_file),
             "--web.listen-address", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert str(database) in lines[0]
        assert "in use" in lines[0]
        # The first one runs on, undisturbed.
        assert first.returncode is None
        await wait_listing(session, port, lambda listing: "1005" in listing)


# --- 3. the database vanishes under a running exporter --------------------------


async def test_a_deleted_database_is_noticed_and_nothing_more_is_acknowledged(
    aiohttp_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    folder = tmp_path / "data"
    database = folder / "state.db"
    async with running_exporter(config_file, database) as exporter, aiohttp.ClientSession() as http:
        assert (await register(http, exporter, RUNNING))[0] == 201
        await wait_until(lambda: exporter.state.ready(), timeout=20)
        assert (await call(http, "GET", exporter, "/-/ready"))[0] == 200

        shutil.rmtree(folder)  # an operator's rm -rf of the storage folder

        status, body = await register(http, exporter, "bench-2")
        assert status == 503, body
        assert str(folder) not in str(body)
        assert "state.db" not in str(body)
        status, _ = await call(http, "GET", exporter, "/-/ready")
        assert status == 503
        assert ("elevate", "bench-2") not in exporter.state.imports

        # The persist loop keeps trying (polls keep changing things); one log
        # line says what happened, naming the file, not one per attempt.
        assert exporter.store is not None
        store = exporter.store
        await wait_until(lambda: store.health.write_errors["vanished"] >= 3, timeout=20)
        lines = [r.getMessage() for r in caplog.records if "deleted or replaced" in r.getMessage()]
        assert len(lines) == 1, lines
        assert str(database) in lines[0]
        assert not database.exists()  # not quietly recreated half-empty


# --- 1. registrations and reloads are ordered ------------------------------------


def write_race_config(tmp_path: Path, url: str, interval: str) -> Path:
    (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"""
storage:
  path: state.db
api:
  tokens_file: tokens
sources:
  - name: elevate
    type: elevate
    url: {url}
    api_key_file: key
    interval: {interval}
    timeout: 1s
"""
    )
    return config_file


REGISTRATIONS_PER_CLIENT = 300


async def test_registrations_racing_reloads_are_all_answered_and_all_polled(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    simulator = await simulator_server(aiohttp_server)
    url = str(simulator.make_url("")).rstrip("/")
    config_file = write_race_config(tmp_path, url, "2s")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    answers: dict[str, int] = {}
    reloads = 40
    done = asyncio.Event()

    async def interval_shown(session: aiohttp.ClientSession) -> float | None:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{base}/metrics") as response:
                for line in (await response.text()).splitlines():
                    if line.startswith("import_source_poll_interval_seconds{"):
                        return float(line.rsplit(" ", 1)[1])
        return None

    async def client(session: aiohttp.ClientSession, number: int) -> None:
        # Bounded, so a slow machine (fewer reloads a second) does not pile up
        # thousands of imports whose polling then takes longer than the deadline.
        for n in range(REGISTRATIONS_PER_CLIENT):
            if done.is_set():
                return
            import_id = f"bench-{number}-{n}"
            body = {"source": "elevate", "id": import_id}
            async with session.post(f"{base}{IMPORTS}", json=body, headers=AUTH) as response:
                answers[import_id] = response.status
                await response.read()

    async with aiohttp.ClientSession() as session, exporter_process(config_file, port) as proc:
        async with asyncio.timeout(30):
            while await interval_shown(session) != 2.0:
                await asyncio.sleep(0.05)
        clients = [asyncio.create_task(client(session, number)) for number in range(4)]
        try:
            for i in range(reloads):
                interval = 3.0 if i % 2 == 0 else 2.0
                write_race_config(tmp_path, url, f"{interval:g}s")
                if i % 4 == 3:  # every fourth by signal, the rest by the endpoint
                    proc.send_signal(signal.SIGHUP)
                else:
                    async with session.post(f"{base}/-/reload") as response:
                        assert response.status == 200, await response.text()
                async with asyncio.timeout(30):
                    while await interval_shown(session) != interval:
                        await asyncio.sleep(0.01)
        finally:
            done.set()
            await asyncio.gather(*clients)
        assert proc.returncode is None
        assert len(answers) > reloads  # the registrations did race the reloads
        refused = {import_id: status for import_id, status in answers.items() if status != 201}
        assert refused == {}
        await wait_all_polled(session, port, answers)
        async with session.get(f"{base}/-/ready") as response:
            assert response.status == 200


async def wait_all_polled(session: aiohttp.ClientSession, port: int, ids: Iterable[str]) -> None:
    """Every acknowledged import is polled (the interval is 2 s; the deadline is
    generous for a loaded machine, but a lost import never makes it)."""

    def all_polled(listing: dict[str, dict[str, Any]]) -> bool:
        return all(listing.get(i, {}).get("last_poll_success_at") is not None for i in ids)

    async with asyncio.timeout(60):
        while (listing := await api_list(session, port)) is None or not all_polled(listing):
            await asyncio.sleep(0.2)


# --- 5. memory changes only after the store accepted ------------------------------


def sqlite_of(exporter: Exporter) -> Store:
    """The exporter's storage, which these tests know to be SQLite."""
    assert isinstance(exporter.store, Store)
    return exporter.store


@contextlib.contextmanager
def read_only_disk(store: Store, database: Path) -> Iterator[None]:
    """The disk turns read-only (a full or failing disk looks the same to the
    exporter) until the block ends."""
    writable = store._db
    with store._lock:
        store._db = sqlite3.connect(
            f"file:{database}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
    try:
        yield
    finally:
        with store._lock:
            store._db.close()
            store._db = writable


def stored_names(database: Path) -> dict[str, str | None]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT import_id, name FROM imports").fetchall())


async def test_a_refused_delete_or_rename_changes_nothing_anywhere(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    database = tmp_path / "state.db"
    one = f"{IMPORTS}/elevate/{RUNNING}"
    async with aiohttp.ClientSession() as http:
        async with running_exporter(config_file, database) as exporter:
            assert exporter.store is not None
            assert (await register(http, exporter, RUNNING, "prices"))[0] == 201
            await wait_until(lambda: exporter.state.ready(), timeout=20)
            with read_only_disk(sqlite_of(exporter), database):
                status, body = await call(http, "DELETE", exporter, one, headers=AUTH)
                assert status == 503, body
                assert str(database) not in str(body)
                status, shown = await call(http, "GET", exporter, one)
                assert status == 200
                assert shown["name"] == "prices"

                status, body = await register(http, exporter, RUNNING, "renamed")
                assert status == 503, body
                status, shown = await call(http, "GET", exporter, one)
                assert status == 200
                assert shown["name"] == "prices"
            assert stored_names(database)[RUNNING] == "prices"

        # A restart shows the same: neither the delete nor the rename happened.
        async with running_exporter(config_file, database) as exporter:
            status, shown = await call(http, "GET", exporter, one)
            assert status == 200
            assert shown["name"] == "prices"
            # And once the store accepts, a delete is durable when answered.
            status, _ = await call(http, "DELETE", exporter, one, headers=AUTH)
            assert status == 204
            assert RUNNING not in stored_names(database)
            assert (await call(http, "GET", exporter, one))[0] == 404


# --- 4. a config edit parks registered imports, never deletes them ----------------


def rename_source(config_file: Path, old: str, new: str) -> None:
    text = config_file.read_text()
    config_file.write_text(text.replace(f"- name: {old}\n", f"- name: {new}\n"))


async def exported(http: aiohttp.ClientSession, exporter: Exporter) -> str:
    return str((await call(http, "GET", exporter, "/metrics"))[1])


async def test_a_reload_without_the_source_parks_its_registered_imports_until_it_returns(
    aiohttp_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    database = tmp_path / "state.db"
    one = f"{IMPORTS}/elevate/{RUNNING}"
    async with (
        running_exporter(config_file, database, reloadable=True) as exporter,
        aiohttp.ClientSession() as http,
    ):
        for import_id in (RUNNING, "bench-2"):
            assert (await register(http, exporter, import_id, f"job {import_id}"))[0] == 201
        state = exporter.state
        await wait_until(lambda: state.ready() and len(state.imports) == 3, timeout=20)

        rename_source(config_file, "elevate", "elevate-new")
        assert await exporter.reload() == []
        assert any(
            r.getMessage().startswith("parked 2 imports")
            and getattr(r, "source", None) == "elevate"
            for r in caplog.records
        )
        text = await exported(http, exporter)
        assert f'import="{RUNNING}"' not in text
        assert 'source="elevate"' not in text
        status, shown = await call(http, "GET", exporter, one)
        assert status == 200
        assert shown["parked"] is True
        assert shown["name"] == f"job {RUNNING}"
        status, listing = await call(http, "GET", exporter, IMPORTS)
        parked = {item["id"] for item in listing["imports"] if item["parked"]}
        assert parked == {RUNNING, "bench-2"}
        await wait_until(lambda: {RUNNING, "bench-2"} <= set(stored_states(database)))
        # Parked imports are not polled, so readiness does not wait for them.
        await wait_until(state.ready, timeout=20)
        assert (await call(http, "GET", exporter, "/-/ready"))[0] == 200

        # A parked import can be forgotten for good.
        status, _ = await call(http, "DELETE", exporter, f"{IMPORTS}/elevate/bench-2", headers=AUTH)
        assert status == 204
        assert "bench-2" not in stored_states(database)

        rename_source(config_file, "elevate-new", "elevate")
        assert await exporter.reload() == []
        assert ("elevate", "bench-2") not in state.imports
        status, shown = await call(http, "GET", exporter, one)
        assert status == 200
        assert shown["parked"] is False
        assert shown["origin"] == "api"
        before = shown["last_poll_success_at"]

        async def polled_again() -> bool:
            _, again = await call(http, "GET", exporter, one)
            return bool(again["last_poll_success_at"] != before)

        async with asyncio.timeout(20):
            while not await polled_again():
                await asyncio.sleep(0.05)
        assert f'import="{RUNNING}"' in await exported(http, exporter)


async def test_a_restart_without_the_source_parks_its_stored_registrations(
    aiohttp_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    database = tmp_path / "state.db"
    async with aiohttp.ClientSession() as http:
        async with running_exporter(config_file, database) as exporter:
            assert (await register(http, exporter, RUNNING))[0] == 201
        rename_source(config_file, "elevate", "other")
        async with running_exporter(config_file, database) as exporter:
            assert any(
                r.getMessage().startswith("parked 1 imports")
                and getattr(r, "source", None) == "elevate"
                for r in caplog.records
            )
            status, shown = await call(http, "GET", exporter, f"{IMPORTS}/elevate/{RUNNING}")
            assert status == 200
            assert shown["parked"] is True
            assert ("elevate", RUNNING) not in exporter.state.imports
        assert RUNNING in stored_states(database)
        rename_source(config_file, "other", "elevate")
        async with running_exporter(config_file, database) as exporter:
            await wait_until(
                lambda: exporter.state.imports[("elevate", RUNNING)].polled_this_run, timeout=20
            )


async def test_parked_imports_are_forgotten_after_the_retention(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"), "1s")
    database = tmp_path / "state.db"
    async with (
        running_exporter(config_file, database, reloadable=True) as exporter,
        aiohttp.ClientSession() as http,
    ):
        assert (await register(http, exporter, RUNNING))[0] == 201
        rename_source(config_file, "elevate", "elevate-new")
        assert await exporter.reload() == []
        assert (await call(http, "GET", exporter, f"{IMPORTS}/elevate/{RUNNING}"))[0] == 200
        await wait_until(lambda: RUNNING not in stored_states(database), timeout=20)
        assert (await call(http, "GET", exporter, f"{IMPORTS}/elevate/{RUNNING}"))[0] == 404


def test_a_database_of_the_previous_schema_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    # The columns of schema 1, as its exporter created them.
    columns = [
        "source", "import_id", "system", "name", "origin", "state", "upstream_state", "step",
        "reason", "items_completed", "items_expected", "items_failed", "started_at",
        "ended_at", "first_seen", "state_since", "last_progress", "seen_running_at",
        "seen_finished_at", "last_success", "last_error", "last_error_reason",
        "last_error_at", "confirmed_final",
    ]  # fmt: skip
    with sqlite3.connect(database) as db:
        db.execute(f"CREATE TABLE imports ({', '.join(columns)}, PRIMARY KEY (source, import_id))")
        row: dict[str, object] = dict.fromkeys(columns)
        row.update(source="elevate", import_id="7", system="elevate", origin="api")
        row["confirmed_final"] = 0
        db.execute(
            f"INSERT INTO imports ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)})",
            [row[name] for name in columns],
        )
        db.execute("PRAGMA user_version=1")
    store = Store(database)
    try:
        (record,) = store.load()
        assert record.import_id == "7"
        assert record.origin == "api"
        assert record.parked_at is None
    finally:
        store.close()


# --- 6. store failures are visible to monitoring ----------------------------------


def sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f"{name} ") or line.startswith(f"{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_failing_writes_show_in_metrics_and_readiness_but_not_the_path_to_clients(
    aiohttp_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    database = tmp_path / "state.db"
    ok = "import_exporter_store_last_write_successful"
    read_only = 'import_exporter_store_write_errors_total{reason="read_only"}'
    async with running_exporter(config_file, database) as exporter, aiohttp.ClientSession() as http:
        assert exporter.store is not None
        assert (await register(http, exporter, RUNNING))[0] == 201
        await wait_until(exporter.state.ready, timeout=20)
        text = await exported(http, exporter)
        assert sample(text, ok) == 1.0
        assert sample(text, read_only) == 0.0
        promtool = shutil.which("promtool")
        if promtool is not None:  # the naming conventions hold for the new series too
            lint = subprocess.run(
                [promtool, "check", "metrics"], input=text, capture_output=True, text=True
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr
        assert sample(text, "import_exporter_store_last_write_success_timestamp_seconds")
        assert (await call(http, "GET", exporter, "/-/ready"))[0] == 200

        with read_only_disk(sqlite_of(exporter), database):
            status, body = await register(http, exporter, "bench-2")
            assert status == 503, body
            assert "read-only" in body["error"], body
            text = await exported(http, exporter)
            assert sample(text, ok) == 0.0
            assert (sample(text, read_only) or 0) >= 1
            status, page = await call(http, "GET", exporter, "/-/ready")
            assert status == 503
            assert "read_only" in page
            for answer in (body, page, text):
                assert str(tmp_path) not in str(answer)
            assert any(str(database) in r.getMessage() for r in caplog.records)

        # The disk is back: the next write succeeds and readiness returns.
        assert (await register(http, exporter, "bench-2"))[0] == 201
        assert sample(await exported(http, exporter), ok) == 1.0
        await wait_until(exporter.state.ready, timeout=20)
        assert (await call(http, "GET", exporter, "/-/ready"))[0] == 200


# --- 7. SIGHUP during start-up ----------------------------------------------------


def catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (Linux: SigCgt bit 0)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & 1)
    return False


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def write_finished_imports(database: Path, count: int) -> None:
    """A large database: imports that finished (so they are restored, not polled)."""
    now = time.time()
    done = Observation(state=State.SUCCEEDED, upstream_state="SUCCESS", ended_at=now)
    rows = [
        to_row(
            ImportRecord(
                source="elevate",
                import_id=f"done-{i}",
                system="elevate",
                origin=Origin.API,
                observation=done,
                seen_finished_at=now,
                confirmed_final=True,
            )
        )
        for i in range(count)
    ]
    store = Store(database)
    try:
        store.write(rows)
    finally:
        store.close()


async def test_sighup_during_start_up_is_a_reload_once_started_not_a_kill(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    await asyncio.to_thread(write_finished_imports, tmp_path / "state.db", 100_000)
    port = free_port()
    log_file = tmp_path / "exporter.log"
    with log_file.open("wb") as log_out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "exporter", "--config.file", str(config_file),
            "--web.listen-address", f"127.0.0.1:{port}", cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=log_out,
        )  # fmt: skip
    try:
        # As soon as it can be sent without killing the process by design.
        async with asyncio.timeout(30):
            while not catches_sighup(proc.pid) and proc.returncode is None:
                await asyncio.sleep(0.002)
        assert not listening(port), "SIGHUP was caught only once start-up was over"
        for _ in range(3):
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.01)  # spacing, not synchronisation: several during start-up
        assert not listening(port), "the database was too small to make start-up slow"

        def log_text() -> str:
            return log_file.read_text(errors="replace")

        await wait_until(lambda: "config reloaded" in log_text() or proc.returncode is not None, 60)
        assert proc.returncode is None, log_text()
        text = log_text()
        assert text.index("listening on") < text.index("config reloaded")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/-/healthy") as response,
        ):
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_deleted_database_fails_readiness_even_when_nothing_is_written(
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("sources: []\n")  # nothing polled: nothing to write
    folder = tmp_path / "data"
    async with (
        running_exporter(config_file, folder / "state.db") as exporter,
        aiohttp.ClientSession() as http,
    ):
        assert (await call(http, "GET", exporter, "/-/ready"))[0] == 200
        shutil.rmtree(folder)

        async def not_ready() -> bool:
            return (await call(http, "GET", exporter, "/-/ready"))[0] == 503

        async with asyncio.timeout(20):
            while not await not_ready():
                await asyncio.sleep(0.05)
