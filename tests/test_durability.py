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
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from exporter.app import Exporter
from exporter.config import load_config
from exporter.store import Store, StoreError
from tests.fakes import wait_for
from tests.test_persistence import (
    AUTH,
    ROOT,
    exporter_process,
    simulator_server,
    wait_listing,
    write_config,
)
from tests.test_reload_and_secrets import free_port

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
        assert str(database) in lines[0] and "in use" in lines[0]
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
        await wait_for(lambda: exporter.state.ready(), timeout=20)
        assert (await call(http, "GET", exporter, "/-/ready"))[0] == 200

        shutil.rmtree(folder)  # an operator's rm -rf of the storage folder

        status, body = await register(http, exporter, "bench-2")
        assert status == 503, body
        assert str(folder) not in str(body) and "state.db" not in str(body)
        status, _ = await call(http, "GET", exporter, "/-/ready")
        assert status == 503
        assert ("elevate", "bench-2") not in exporter.state.imports

        # The persist loop keeps trying (polls keep changing things); one log
        # line says what happened, naming the file, not one per attempt.
        assert exporter.store is not None
        store = exporter.store
        await wait_for(lambda: store.health.write_errors["vanished"] >= 3, timeout=20)
        lines = [r.getMessage() for r in caplog.records if "deleted or replaced" in r.getMessage()]
        assert len(lines) == 1, lines
        assert str(database) in lines[0]
        assert not database.exists()  # not quietly recreated half-empty
