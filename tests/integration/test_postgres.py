"""The exporter on a shared PostgreSQL registry (``storage.url``), against a
real server (tests/postgres.py): registrations survive a SIGKILL and a
restart; PostgreSQL down at start is waited for (not ready, no crash);
PostgreSQL restarted under load, or failed over to a promoted standby, loses
no acknowledged registration, while polling and /metrics go on; the password
never reaches a log line. Two replicas on one database follow each other's
registrations and removals, a SIGKILL of either costs the other nothing, and
with shards any shard takes any registration and lists every import."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from exporter.config.loader import load_config
from exporter.persistence import MAX_WAITING_READS
from exporter.runtime import Exporter
from exporter.sharding import Shard
from exporter.storage.postgres import PostgresStorage
from tests.conftest import ROOT, free_port, wait_until
from tests.integration.test_durability import call, register
from tests.integration.test_persistence import (
    AUTH,
    post_registration,
    simulator_server,
    wait_listing,
    write_config,
)
from tests.postgres import FreezableProxy, PostgresServer, running_server

ServerFactory = Callable[..., Awaitable[TestServer]]


async def remove(http: aiohttp.ClientSession, exporter: Exporter, import_id: str) -> int:
    """``DELETE`` an Elevate import through ``exporter``'s API; the status."""
    status, _ = await call(
        http, "DELETE", exporter, f"/api/v1/imports/elevate/{import_id}", headers=AUTH
    )
    return status


def write_pg_config(tmp_path: Path, simulator_url: str, database_url: str) -> Path:
    """The persistence tests' config, on PostgreSQL: the URL from a file."""
    config_file = write_config(tmp_path, simulator_url)
    (tmp_path / "pg-url").write_text(database_url + "\n")
    text = config_file.read_text().replace("  path: state.db\n", "  url_file: pg-url\n")
    config_file.write_text(text)
    return config_file


async def simulated_config(
    aiohttp_server: ServerFactory, tmp_path: Path, database_url: str
) -> Path:
    """A simulator, and the persistence tests' config file on it and on the database."""
    simulator = await simulator_server(aiohttp_server)
    return write_pg_config(tmp_path, str(simulator.make_url("")).rstrip("/"), database_url)


@contextlib.asynccontextmanager
async def exporter_process(
    config_file: Path, port: int
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """The exporter as a process; its log (stderr) goes to a file beside the config."""
    log = config_file.parent / f"exporter-{port}-{free_port()}.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "exporter", "--config.file", str(config_file),
            "--web.listen-address", f"127.0.0.1:{port}", cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    try:
        yield proc, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_registrations_survive_a_sigkill_and_the_password_is_never_logged(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    config_file = await simulated_config(aiohttp_server, tmp_path, postgres.database())
    port = free_port()
    registered = [f"pipeline-{i}" for i in range(10)]
    async with aiohttp.ClientSession() as session:
        async with exporter_process(config_file, port) as (proc, log):
            await wait_listing(session, port, lambda listing: "1005" in listing)
            for import_id in registered:
                assert await post_registration(session, port, import_id, f"job {import_id}") == 201
            proc.send_signal(signal.SIGKILL)  # at once: acknowledged means committed
            await proc.wait()
        async with exporter_process(config_file, port) as (proc, log2):
            listing = await wait_listing(session, port, lambda listing: len(listing) > 1)
            assert set(registered) <= set(listing)
            assert listing["pipeline-3"]["name"] == "job pipeline-3"
            assert listing["pipeline-3"]["origin"] == "api"
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await proc.wait() == 0
    logged = log.read_text() + log2.read_text()
    assert "restored" in logged
    assert "postgresql://postgres:***@127.0.0.1" in logged
    assert postgres.password not in logged


async def test_postgres_down_at_start_is_waited_for_not_a_crash(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    config_file = await simulated_config(aiohttp_server, tmp_path, postgres.database())
    port = free_port()
    async with aiohttp.ClientSession() as session:
        await asyncio.to_thread(postgres.stop)
        try:
            async with exporter_process(config_file, port) as (proc, log):
                await wait_until(
                    lambda: "cannot reach PostgreSQL, retrying" in log.read_text(),
                    timeout=20,
                    what="the log to say PostgreSQL cannot be reached",
                )
                assert proc.returncode is None  # waiting, not crashed
                with contextlib.suppress(aiohttp.ClientError):  # not ready: not even listening
                    async with session.get(f"http://127.0.0.1:{port}/-/ready") as response:
                        assert response.status != 200
                await asyncio.to_thread(postgres.start)
                # The backoff is at most a few seconds this early.
                listing = await wait_listing(session, port, lambda listing: "1005" in listing)
                assert "1005" in listing
                assert postgres.password not in log.read_text()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(postgres.start)  # already up: pg_ctl says so


class RegistrationStream:
    """Registrations sent one after another while it runs (a steady stream,
    not a busy loop): which were acknowledged, and when each answer came."""

    def __init__(self, http: aiohttp.ClientSession, exporter: Exporter) -> None:
        self.http = http
        self.exporter = exporter
        self.acknowledged: list[str] = []
        self.answers: list[tuple[float, int]] = []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        for n in range(100_000):
            status, body = await register(self.http, self.exporter, f"load-{n}")
            assert status in (201, 503), body
            self.answers.append((loop.time(), status))
            if status == 201:
                self.acknowledged.append(f"load-{n}")
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RegistrationStream]:
        task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def answered_since(self, moment: float, status: int) -> bool:
        return any(at > moment and got == status for at, got in self.answers)


async def test_postgres_restarted_under_load_loses_no_acknowledged_registration(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.database()
    config_file = await simulated_config(aiohttp_server, tmp_path, url)
    exporter = Exporter(load_config(config_file), "127.0.0.1:0", store=PostgresStorage(url))
    await exporter.start()
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as http:
            async with RegistrationStream(http, exporter).running() as stream:
                await wait_until(lambda: len(stream.acknowledged) >= 20, timeout=20)
                await wait_until(exporter.state.ready, timeout=20)
                polls_before = exporter.state.imports[("elevate", "1005")].last_attempt

                down_at = loop.time()
                await asyncio.to_thread(postgres.stop)
                try:
                    await wait_until(lambda: stream.answered_since(down_at, 503), timeout=20)
                    status, page = await call(http, "GET", exporter, "/-/ready")
                    assert status == 503
                    assert "unavailable" in page
                    status, text = await call(http, "GET", exporter, "/metrics")
                    assert status == 200
                    assert 'import_exporter_store_write_errors_total{reason="unavailable"}' in text
                    # Polling goes on from memory.
                    await wait_until(
                        lambda: (
                            exporter.state.imports[("elevate", "1005")].last_attempt != polls_before
                        ),
                        timeout=10,
                    )
                finally:
                    await asyncio.to_thread(postgres.start)
                up_at = loop.time()
                await wait_until(lambda: stream.answered_since(up_at, 201), timeout=20)
                # And a restart in one go (pg_ctl restart) while the stream runs.
                restart_at = loop.time()
                await asyncio.to_thread(postgres.restart)
                await wait_until(lambda: stream.answered_since(restart_at, 201), timeout=20)
            await wait_until(lambda: exporter.persistence.failing() is None, timeout=10)
            await wait_until(exporter.state.ready, timeout=30)  # every new import polled
            assert (await call(http, "GET", exporter, "/-/ready"))[0] == 200
    finally:
        await exporter.stop()
    check = PostgresStorage(url)
    try:
        stored = {record.import_id for record in check.load()}
    finally:
        check.close()
    assert set(stream.acknowledged) <= stored
    assert len(stream.acknowledged) >= 22  # 20 before, one after each outage


async def test_a_registration_on_one_replica_is_polled_by_the_other_within_seconds(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.database()
    config_file = await simulated_config(aiohttp_server, tmp_path, url)
    a = Exporter(load_config(config_file), "127.0.0.1:0", store=PostgresStorage(url))
    b = Exporter(load_config(config_file), "127.0.0.1:0", store=PostgresStorage(url))
    await a.start()
    try:
        await b.start()
        try:
            async with aiohttp.ClientSession() as http:

                async def listed_by_b() -> set[str]:
                    status, body = await call(http, "GET", b, "/api/v1/imports")
                    assert status == 200
                    return {item["id"] for item in body["imports"]}

                def polled_by_b(import_id: str) -> bool:
                    record = b.state.imports.get(("elevate", import_id))
                    return record is not None and record.observation is not None

                assert (await register(http, a, "bench-7", "nightly"))[0] == 201
                await wait_until(
                    lambda: ("elevate", "bench-7") in b.state.imports,
                    timeout=5,
                    what="B to track it",
                )
                await wait_until(lambda: polled_by_b("bench-7"), timeout=5, what="B to poll it")
                assert "bench-7" in await listed_by_b()
                assert b.state.imports[("elevate", "bench-7")].name == "nightly"

                # And back: a registration on B reaches A; a removal on A leaves B.
                assert (await register(http, b, "bench-8"))[0] == 201
                await wait_until(lambda: ("elevate", "bench-8") in a.state.imports, timeout=5)
                assert await remove(http, a, "bench-7") == 204
                await wait_until(lambda: ("elevate", "bench-7") not in b.state.imports, timeout=5)
                assert "bench-7" not in await listed_by_b()
                # What B learns by polling never brings the removed import back.
                await wait_until(lambda: polled_by_b("bench-8"), timeout=5)
                await wait_until(b.state.ready, timeout=10)
        finally:
            await b.stop()
    finally:
        await a.stop()
    check = PostgresStorage(url)
    try:
        stored = {r.import_id for r in check.load()}
    finally:
        check.close()
    assert "bench-7" not in stored
    assert "bench-8" in stored


async def test_a_sigkilled_replica_costs_the_other_nothing_and_catches_up_on_restart(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    config_file = await simulated_config(aiohttp_server, tmp_path, postgres.database())
    port_a, port_b = free_port(), free_port()

    async with aiohttp.ClientSession() as session, exporter_process(config_file, port_a) as (a, _):
        async with exporter_process(config_file, port_b) as (b, _):
            await wait_listing(session, port_a, lambda listing: "1005" in listing)
            await wait_listing(session, port_b, lambda listing: "1005" in listing)
            assert await post_registration(session, port_a, "bench-1") == 201
            await wait_listing(session, port_b, lambda listing: "bench-1" in listing)
            b.send_signal(signal.SIGKILL)
            await b.wait()
        # A goes on alone, and B, restarted, has what was registered meanwhile.
        assert await post_registration(session, port_a, "bench-2") == 201
        async with exporter_process(config_file, port_b) as (b, _):
            await wait_listing(
                session, port_b, lambda listing: {"bench-1", "bench-2"} <= set(listing)
            )
            a.send_signal(signal.SIGKILL)
            await a.wait()
            assert await post_registration(session, port_b, "bench-3") == 201
            listing = await wait_listing(session, port_b, lambda listing: "bench-3" in listing)
            assert {"bench-1", "bench-2", "bench-3"} <= set(listing)


async def test_shards_on_one_database_keep_each_others_registrations(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.database()
    config_file = await simulated_config(aiohttp_server, tmp_path, url)
    shards = [Shard(0, 2), Shard(1, 2)]
    ids = [
        next(f"bench-{n}" for n in range(100) if s.owns("elevate", f"bench-{n}")) for s in shards
    ]

    def shard_exporter(shard: Shard) -> Exporter:
        return Exporter(
            load_config(config_file), "127.0.0.1:0", store=PostgresStorage(url), shard=shard
        )

    first, second = shard_exporter(shards[0]), shard_exporter(shards[1])
    await first.start()
    try:
        await second.start()
        try:
            async with aiohttp.ClientSession() as http:
                assert (await register(http, first, ids[0]))[0] == 201
                assert (await register(http, second, ids[1]))[0] == 201
        finally:
            await second.stop()
    finally:
        await first.stop()
    # Shard 0 restarted alone: it restores its own, and neither parks nor
    # forgets shard 1's registration in the shared database.
    again = shard_exporter(shards[0])
    await again.start()
    try:
        assert ("elevate", ids[0]) in again.state.imports
        assert ("elevate", ids[1]) not in again.state.imports
        assert ("elevate", ids[1]) not in again.state.parked
    finally:
        await again.stop()
    check = PostgresStorage(url)
    try:
        stored = {r.import_id: r for r in check.load()}
    finally:
        check.close()
    assert {ids[0], ids[1]} <= set(stored)
    assert stored[ids[1]].parked_at is None


async def test_any_shard_takes_a_registration_and_lists_every_import_with_its_state(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.database()
    config_file = await simulated_config(aiohttp_server, tmp_path, url)
    shards = [Shard(0, 2), Shard(1, 2)]
    # Registered on shard 0, owned (and so polled) by shard 1.
    theirs = next(f"bench-{n}" for n in range(100) if shards[1].owns("elevate", f"bench-{n}"))
    config_owner = 0 if shards[0].owns("elevate", "1005") else 1
    exporters = [
        Exporter(load_config(config_file), "127.0.0.1:0", store=PostgresStorage(url), shard=shard)
        for shard in shards
    ]
    here, owner = exporters
    for exporter in exporters:
        await exporter.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def listed(exporter: Exporter) -> dict[str, Any]:
                status, body = await call(http, "GET", exporter, "/api/v1/imports")
                assert status == 200, body
                return {item["id"]: item for item in body["imports"]}

            def every_import_with_its_state(listing: dict[str, dict[str, Any]]) -> bool:
                return {"1005", theirs} <= set(listing) and all(
                    item["state"] is not None for item in listing.values()
                )

            status, created = await register(http, here, theirs, "nightly")
            assert status == 201, created
            assert created["state"] is None  # answered before its owner polled it
            assert ("elevate", theirs) not in here.state.imports  # not polled here
            await wait_until(
                lambda: (
                    (record := owner.state.imports.get(("elevate", theirs))) is not None
                    and record.observation is not None
                ),
                timeout=5,
                what="the owning shard to poll the registration",
            )
            assert owner.state.imports[("elevate", theirs)].name == "nightly"
            # Either shard lists every import, each with its latest state.
            for exporter in exporters:
                await wait_listing(http, exporter.port, every_import_with_its_state)
            status, shown = await call(http, "GET", here, f"/api/v1/imports/elevate/{theirs}")
            assert status == 200
            assert shown["state"] is not None
            assert shown["name"] == "nightly"
            # The same registration again, on either shard: it is there already.
            assert (await register(http, owner, theirs))[0] == 200
            assert (await register(http, here, theirs))[0] == 200
            # A config-listed import cannot be removed through the other shard either.
            assert await remove(http, exporters[1 - config_owner], "1005") == 409
            # Removed through the shard that does not poll it: its owner stops.
            assert await remove(http, here, theirs) == 204
            await wait_until(
                lambda: ("elevate", theirs) not in owner.state.imports,
                timeout=5,
                what="the owning shard to stop polling it",
            )
            for exporter in exporters:
                assert theirs not in await listed(exporter)
                status, _ = await call(http, "GET", exporter, f"/api/v1/imports/elevate/{theirs}")
                assert status == 404
    finally:
        for exporter in reversed(exporters):
            await exporter.stop()


async def test_a_failover_to_the_promoted_standby_loses_no_acknowledged_registration(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """A primary with a synchronous standby, both in the URL with
    ``target_session_attrs=read-write`` (how libpq finds the primary); the
    primary crashes under a stream of registrations and the standby is
    promoted: the exporter answers 503 meanwhile, then writes to the new
    primary, which has every registration that was acknowledged."""
    with running_server() as primary:
        if isinstance(primary, str):
            pytest.skip(primary)
        standby = await asyncio.to_thread(primary.standby)
        try:
            database = primary.database().rsplit("/", 1)[1]
            url = (
                f"postgresql://postgres:{primary.password}@127.0.0.1:{primary.port},"
                f"127.0.0.1:{standby.port}/{database}?target_session_attrs=read-write"
            )
            simulator = await simulator_server(aiohttp_server)
            config_file = write_pg_config(tmp_path, str(simulator.make_url("")).rstrip("/"), url)
            exporter = Exporter(load_config(config_file), "127.0.0.1:0", store=PostgresStorage(url))
            await exporter.start()
            loop = asyncio.get_running_loop()
            try:
                async with aiohttp.ClientSession() as http:
                    async with RegistrationStream(http, exporter).running() as stream:
                        await wait_until(lambda: len(stream.acknowledged) >= 20, timeout=20)
                        crashed_at = loop.time()
                        await asyncio.to_thread(primary.crash)
                        await wait_until(lambda: stream.answered_since(crashed_at, 503), timeout=20)
                        assert (await call(http, "GET", exporter, "/-/ready"))[0] == 503
                        await asyncio.to_thread(standby.promote)
                        promoted_at = loop.time()
                        await wait_until(
                            lambda: stream.answered_since(promoted_at, 201), timeout=30
                        )
                        written_after = len(stream.acknowledged)
                        await wait_until(
                            lambda: len(stream.acknowledged) >= written_after + 5, timeout=10
                        )
                    await wait_until(lambda: exporter.persistence.failing() is None, timeout=10)
                    await wait_until(exporter.state.ready, timeout=30)
                    assert (await call(http, "GET", exporter, "/-/ready"))[0] == 200
            finally:
                await exporter.stop()
            check = PostgresStorage(standby.url(database))
            try:
                stored = {record.import_id for record in check.load()}
            finally:
                check.close()
            assert set(stream.acknowledged) <= stored
        finally:
            standby.close()


@contextlib.asynccontextmanager
async def running(*exporters: Exporter) -> AsyncIterator[None]:
    """The exporters started in order, stopped in reverse (those that started)."""
    started: list[Exporter] = []
    try:
        for exporter in exporters:
            await exporter.start()
            started.append(exporter)
        yield
    finally:
        for exporter in reversed(started):
            await exporter.stop()


def shard_pair(config_file: Path, url: str, **kwargs: Any) -> list[Exporter]:
    return [
        Exporter(
            load_config(config_file),
            "127.0.0.1:0",
            store=PostgresStorage(url),
            shard=Shard(n, 2),
            **kwargs,
        )
        for n in range(2)
    ]


def owned_by(shard: int, prefix: str = "bench") -> str:
    return next(
        f"{prefix}-{n}" for n in range(100) if Shard(shard, 2).owns("elevate", f"{prefix}-{n}")
    )


async def test_a_rename_through_another_shard_is_kept_by_the_owner(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.database()
    config_file = await simulated_config(aiohttp_server, tmp_path, url)
    here, owner = shard_pair(config_file, url)
    theirs = owned_by(1)
    async with running(here, owner):
        async with aiohttp.ClientSession() as http:
            assert (await register(http, here, theirs, "nightly"))[0] == 201
            await wait_until(lambda: ("elevate", theirs) in owner.state.imports, timeout=5)
            status, renamed = await register(http, here, theirs, "weekly")
            assert status == 200
            assert renamed["name"] == "weekly"
            await wait_until(
                lambda: owner.state.imports[("elevate", theirs)].name == "weekly",
                timeout=5,
                what="the owner to take the new name",
            )
            # The owner's writes of what it polls (poll times included) keep it.
            await owner.persistence.write_pending(poll_times=1.0)
            status, shown = await call(http, "GET", here, f"/api/v1/imports/elevate/{theirs}")
            assert shown["name"] == "weekly"


async def test_the_limit_of_a_source_counts_every_shard_and_spares_a_repeat(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.database()
    config_file = await simulated_config(aiohttp_server, tmp_path, url)
    text = config_file.read_text().replace(
        "  tokens_file: tokens\n", "  tokens_file: tokens\n  max_imports_per_source: 3\n"
    )
    config_file.write_text(text)
    first, second = shard_pair(config_file, url)
    async with running(first, second):
        # 1005 (listed in the config) counts too, once its shard wrote it.
        config_owner = first if Shard(0, 2).owns("elevate", "1005") else second
        await config_owner.persistence.write_pending()
        async with aiohttp.ClientSession() as http:
            assert (await register(http, first, owned_by(0)))[0] == 201
            assert (await register(http, first, owned_by(1)))[0] == 201
            status, refused = await register(http, second, owned_by(0, "more"))
            assert status == 409, refused
            assert "api.max_imports_per_source" in refused["error"]
            # Registering one that is there already is no new import: 200 on either.
            assert (await register(http, second, owned_by(0)))[0] == 200
            assert (await register(http, second, owned_by(1)))[0] == 200


async def test_a_parked_import_removed_through_another_shard_is_forgotten_by_its_owner(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.database()
    config_file = await simulated_config(aiohttp_server, tmp_path, url)
    # The owner's config loses the source on reload: its registrations park.
    without = tmp_path / "without.yaml"
    without.write_text(config_file.read_text().replace("name: elevate", "name: elevate-new"))
    here = Exporter(
        load_config(config_file), "127.0.0.1:0", store=PostgresStorage(url), shard=Shard(0, 2)
    )
    owner = Exporter(
        load_config(config_file),
        "127.0.0.1:0",
        store=PostgresStorage(url),
        shard=Shard(1, 2),
        config_loader=lambda: load_config(without),
    )
    theirs = owned_by(1)
    async with running(here, owner):
        async with aiohttp.ClientSession() as http:
            assert (await register(http, here, theirs))[0] == 201
            await wait_until(lambda: ("elevate", theirs) in owner.state.imports, timeout=5)
            assert await owner.reload() == []
            assert ("elevate", theirs) in owner.state.parked
            await owner.persistence.write_pending()
            assert await remove(http, here, theirs) == 204
            await wait_until(
                lambda: ("elevate", theirs) not in owner.state.parked,
                timeout=5,
                what="the owner to forget the parked import",
            )
            for exporter in (here, owner):
                status, _ = await call(http, "GET", exporter, f"/api/v1/imports/elevate/{theirs}")
                assert status == 404


async def test_a_hung_database_never_holds_up_metrics_and_reads_are_bounded(
    aiohttp_server: ServerFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    """The database stops answering without closing anything: API reads that
    need it wait (at most MAX_WAITING_READS of them; the rest answer 503 at
    once), and /metrics, which never needs it, answers meanwhile."""
    simulator = await simulator_server(aiohttp_server)
    url = postgres.database()
    proxy = FreezableProxy(postgres.port)
    proxied = url.replace(f":{postgres.port}/", f":{await proxy.start()}/")
    config_file = write_pg_config(tmp_path, str(simulator.make_url("")).rstrip("/"), proxied)
    # Opened in a thread: the proxy runs on this event loop.
    store = await asyncio.to_thread(PostgresStorage, proxied)
    exporter = Exporter(load_config(config_file), "127.0.0.1:0", store=store)
    await exporter.start()
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until(exporter.state.ready, timeout=10)
            proxy.freeze()
            readers = [
                asyncio.create_task(call(http, "GET", exporter, f"/api/v1/imports/elevate/x-{n}"))
                for n in range(MAX_WAITING_READS + 4)
            ]
            await wait_until(
                lambda: sum(r.done() for r in readers) >= 4, timeout=10, what="reads refused"
            )
            assert all(r.result()[0] == 503 for r in readers if r.done())
            async with asyncio.timeout(5):  # a hung database is not a hung /metrics
                status, text = await call(http, "GET", exporter, "/metrics")
            assert status == 200
            assert "import_state" in text
            proxy.thaw()
            answers = await asyncio.gather(*readers)
            assert {status for status, _ in answers} <= {404, 503}
            assert [status for status, _ in answers].count(404) == MAX_WAITING_READS
    finally:
        proxy.thaw()
        await exporter.stop()
        await proxy.close()
