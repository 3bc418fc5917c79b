"""What lets one process hold 100,000 imports: batch writes of the store in
one statement and in chunks a registration does not wait behind, and the
long-lived objects out of the cyclic collector's way. (Their speed is shown
by bench/scale.py, not timed here.)"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import random
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.exposition import choose_encoder
from yarl import URL

from bench.scale import prepare
from exporter import loop_slices
from exporter import persistence as persistence_module
from exporter.config.loader import load_config
from exporter.exposition import ImportLines, render_metrics
from exporter.metrics import build_registry
from exporter.model import ErrorReason, Observation, Origin, SourceError, State
from exporter.runtime import Exporter
from exporter.state import ImportRecord, StateStore
from exporter.storage import Row, to_row
from exporter.storage.sqlite import SQLiteStorage as Store
from tests.conftest import Clock, wait_until
from tests.integration.test_persistence import ServerFactory, simulator_server, write_config

ODD = ['a"b', "back\\slash", "new\nline", "ünïcödé ✓", "emoji 🙂", "", "null", "[1]"]


def odd_records(count: int) -> list[ImportRecord]:
    rng = random.Random(7)
    clock = [1_700_000_000.0]
    state = StateStore(clock=lambda: clock[0])
    state.add_source("s", "elevate", 30.0)
    for n in range(count):
        import_id = f"{n}-{rng.choice(ODD)}"
        state.track("s", import_id, name=rng.choice([None, *ODD]), origin=rng.choice(list(Origin)))
        clock[0] += rng.uniform(0, 1000) + rng.random() / 3
        if rng.random() < 0.7:
            state.record_observation(
                "s",
                import_id,
                Observation(
                    rng.choice(list(State)),
                    rng.choice(ODD),
                    items_completed=rng.choice([None, 0, 2**53 + 1]),
                    started_at=rng.choice([None, clock[0] - 1 / 3]),
                ),
            )
        if rng.random() < 0.3:
            state.record_error("s", import_id, SourceError(ErrorReason.TIMEOUT, rng.choice(ODD)))
    return list(state.imports.values())


def stored(store: Store) -> set[Row]:
    return {to_row(record) for record in store.load()}


def test_a_batch_write_keeps_every_value_exactly(tmp_path: Path) -> None:
    """Rows go to SQLite as one JSON array: strings, big integers and floats
    come back as they were written, None as None."""
    records = odd_records(3000)
    store = Store(tmp_path / "state.db")
    try:
        store.write([to_row(record) for record in records])
        assert stored(store) == {to_row(record) for record in records}
        gone = [(r.source, r.import_id) for r in records[::3]]
        changed = [to_row(r) for r in records[1::3]]  # written again, unchanged
        store.write(changed, gone)
        assert stored(store) == {to_row(r) for r in records if (r.source, r.import_id) not in gone}
        store.write([], [])  # nothing: no statement, no error
    finally:
        store.close()


async def test_periodic_writes_come_in_chunks_and_registrations_write_their_own_row(
    aiohttp_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulator: TestServer = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    monkeypatch.setattr(persistence_module, "WRITE_CHUNK", 2)
    exporter = Exporter(load_config(config_file), "127.0.0.1:0", storage_path=str(tmp_path / "db"))
    await exporter.start()
    assert exporter.store is not None
    assert exporter.persistence.task is not None
    exporter.persistence.task.cancel()  # the test decides when the periodic write runs
    writes: list[int] = []
    original = exporter.store.write

    def spy(
        rows: list[Row],
        deleted: list[tuple[str, str]] = [],  # noqa: B006
        refresh: list[Row] = [],  # noqa: B006
    ) -> None:
        writes.append(len(rows) + len(refresh))  # registrations, or what polls learnt
        original(rows, deleted, refresh)

    monkeypatch.setattr(exporter.store, "write", spy)
    try:
        for n in range(5):
            await exporter.register("elevate", f"20{n}", None)
        assert writes == [1] * 5  # each registration: its own row, nothing pending
        records = [exporter.state.imports[("elevate", f"20{n}")] for n in range(5)]
        await wait_until(lambda: all(r.observation is not None for r in records))
        writes.clear()
        await exporter.persistence.write_pending(poll_times=1.0)
        assert writes
        assert max(writes) <= 2
        assert sum(writes) >= 5
        stored_ids = {record.import_id for record in exporter.store.load()}
        assert {f"20{n}" for n in range(5)} <= stored_ids
    finally:
        await exporter.stop()


async def test_long_lived_objects_are_frozen_after_start_and_reload(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    exporter = Exporter(
        load_config(config_file), "127.0.0.1:0", config_loader=lambda: load_config(config_file)
    )
    gc.unfreeze()  # earlier tests in this process may have frozen theirs
    await exporter.start()
    try:
        after_start = gc.get_freeze_count()
        assert after_start > 0
        gc.unfreeze()
        assert await exporter.reload() == []
        assert gc.get_freeze_count() > 0
    finally:
        await exporter.stop()


async def test_what_the_first_round_of_polls_built_is_frozen_too(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """Each import's request URL is built at its first poll and kept (or
    its parts, past :data:`~exporter.sources.base.URLS_KEPT`): once every
    import was polled, those are out of the collector's sight as well, and
    the URLs it sees are a few polls' in flight."""
    simulator = await simulator_server(aiohttp_server)
    config_file = write_config(tmp_path, str(simulator.make_url("")).rstrip("/"))
    exporter = Exporter(load_config(config_file), "127.0.0.1:0")
    await exporter.start()
    try:
        async with asyncio.timeout(20):
            await exporter.first_round_frozen.wait()
        assert exporter.state.ready()
        kept = [
            kept
            for scheduler in exporter.poller.schedulers.values()
            for kept in [*scheduler.source._import_urls.values(), *scheduler.source._urls.values()]
        ]
        assert len(kept) >= len(exporter.state.imports) // 2
        collected = {id(obj) for obj in gc.get_objects()}
        assert not [url for url in kept if id(url) in collected]
        assert len([obj for obj in gc.get_objects() if isinstance(obj, URL)]) < len(kept)
    finally:
        await exporter.stop()


def test_identical_answers_share_one_object() -> None:
    """What the cyclic GC would walk at every full collection stays small:
    10,000 imports answering alike hold a handful of observations."""
    state = StateStore()
    state.add_source("s", "elevate", 30.0)
    for n in range(10_000):
        state.track("s", f"{n}")
    for round_ in range(3):
        for n in range(10_000):
            status = ("IN_PROGRESS", "WAITING")[(n + round_) % 2]
            state.record_observation(
                "s", f"{n}", Observation(State.RUNNING if n % 2 else State.WAITING, status)
            )
    held = {id(record.observation) for record in state.imports.values()}
    assert len(held) <= 4
    counted = Observation(State.RUNNING, "x", items_completed=5)
    state.record_observation("s", "0", counted)
    assert state.imports[("s", "0")].observation == counted  # counts are kept as they come


class LoopTicks:
    """Turns of the event loop, counted by :meth:`count` run as a task."""

    def __init__(self) -> None:
        self.ticks = 0

    async def count(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.ticks += 1


async def test_a_chunk_of_rows_is_made_a_slice_at_a_time_while_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Making 2,000 rows at once held the event loop 6-9 ms (polls and
    probes waited): between slices of rows the loop runs other work."""
    monkeypatch.setattr(loop_slices, "LOOP_SLICE_SECONDS", 0.0)  # a yield per batch
    state = StateStore()
    state.add_source("s", "elevate", 30.0)
    for n in range(1000):
        state.track("s", f"i{n}")
        state.record_observation("s", f"i{n}", Observation(State.RUNNING, "IN_PROGRESS"))
    loop = LoopTicks()
    written: list[tuple[int, int]] = []  # (rows, loop ticks when they reached the store)

    class Storage:
        def write(self, rows: list[Row], _deleted: object = (), refresh: list[Row] = []) -> None:  # noqa: B006
            written.append((len(rows) + len(refresh), loop.ticks))

    ticker = asyncio.create_task(loop.count())
    persistence = persistence_module.Persistence(state, Storage())  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0)
        started = loop.ticks
        await persistence.write_pending()
    finally:
        ticker.cancel()
    assert sum(rows for rows, _ in written) == 1000
    assert written[0][1] - started >= 1000 // persistence_module.ROW_BATCH - 1


async def test_the_retention_scans_a_step_at_a_time_and_forgets_every_import_it_should(
    monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    """The periodic retention scan gives the event loop back between steps
    of :data:`RETENTION_STEP` imports (10,000 at once held it 4-5 ms at
    10,000 imports), and one pass still looks at every import."""
    monkeypatch.setattr(loop_slices, "LOOP_SLICE_SECONDS", 0.0)  # a yield per step
    monkeypatch.setattr(persistence_module, "PERSIST_INTERVAL", 0.0)
    step = persistence_module.RETENTION_STEP
    state = StateStore(clock=clock)
    state.add_source("s", "elevate", 30.0)
    count = 3 * step + step // 2
    for n in range(count):
        state.track("s", f"i{n}", origin=Origin.API)
        state.record_observation("s", f"i{n}", Observation(State.SUCCEEDED, "DONE"))
    clock.now += 3600
    loop = LoopTicks()
    looked: list[tuple[int, int]] = []  # (imports looked at, loop ticks then)
    expired = state.expired

    def counted(retention: float, *, at_most: int | None = None) -> list[ImportRecord]:
        looked.append((at_most or 0, loop.ticks))
        return expired(retention, at_most=at_most)

    monkeypatch.setattr(state, "expired", counted)

    ticker = asyncio.create_task(loop.count())
    persistence = persistence_module.Persistence(state, None)
    forgotten: list[str] = []

    def forget(record: ImportRecord) -> None:  # as the exporter's: the poller stops it
        forgotten.append(record.import_id)
        state.untrack(record.source, record.import_id)

    persistence.start(lambda: 60.0, forget)
    try:
        await wait_until(lambda: not state.imports, what="every import forgotten")
    finally:
        ticker.cancel()
        assert persistence.task is not None
        persistence.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await persistence.task
    first_pass = looked[:4]
    assert [size for size, _ in first_pass] == [step] * 4
    assert all(later > earlier for (_, earlier), (_, later) in itertools.pairwise(first_pass))
    assert sorted(forgotten) == sorted(f"i{n}" for n in range(count))


async def test_a_write_cancelled_midway_leaves_what_it_had_not_written_for_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop cancels the periodic write wherever it is (building rows,
    waiting on the store, waiting for the lock): the stop's own last write
    must still store every change, none lost with the cancelled one."""
    monkeypatch.setattr(loop_slices, "LOOP_SLICE_SECONDS", 0.0)  # a yield per batch
    state = StateStore()
    state.add_source("s", "elevate", 30.0)
    keys = {("s", f"i{n}") for n in range(3 * persistence_module.WRITE_CHUNK)}
    for _, import_id in keys:
        state.track("s", import_id)
        state.record_observation("s", import_id, Observation(State.RUNNING, "IN_PROGRESS"))
    written: set[tuple[object, object]] = set()

    class Storage:
        def write(self, rows: list[Row], _deleted: object = (), refresh: list[Row] = []) -> None:  # noqa: B006
            written.update((row[0], row[1]) for row in [*rows, *refresh])

    persistence = persistence_module.Persistence(state, Storage())  # type: ignore[arg-type]
    for ticks in (3, 60):  # building the first chunk's rows; a later chunk
        written.clear()
        periodic = asyncio.create_task(persistence.write_pending())
        for _ in range(ticks):
            await asyncio.sleep(0)
        periodic.cancel()
        with pytest.raises(asyncio.CancelledError):
            await periodic
        assert written != keys  # cut short
        await persistence.write_pending(poll_times=1.0)  # what a stop writes
        assert keys <= written
        for _, import_id in keys:  # changed again for the second round
            state.record_observation("s", import_id, Observation(State.WAITING, "WAITING"))
            state.record_observation("s", import_id, Observation(State.RUNNING, "IN_PROGRESS"))


def test_the_scale_benchmark_knows_the_restored_state_served_whatever_the_polls_answer(
    tmp_path: Path,
) -> None:
    """bench/scale.py times start-up to the first ``/metrics`` that serves
    the restored state, by a line only that state has: a poll answered
    ``waiting`` before that ``/metrics`` must not hide it (the state line
    ``running`` it looked for before did), and no poll can make it."""
    _, database, restored = prepare(tmp_path, "http://127.0.0.1:1", 3)
    store = Store(database)
    try:
        records = store.load()
    finally:
        store.close()

    def served(state: StateStore) -> bytes:
        encoder, content_type = choose_encoder("")
        lines = ImportLines(state)
        lines.take_changes()
        return render_metrics(build_registry(state), encoder, content_type, lines)

    restarted = StateStore()
    restarted.add_source("bench", "elevate", 1.0)
    restarted.restore(records)
    restarted.track("bench", "coin-2", name="import coin-2")
    restarted.record_observation("bench", "coin-2", Observation(State.WAITING, "WAITING"))
    assert restored in served(restarted)

    fresh = StateStore()
    fresh.add_source("bench", "elevate", 1.0)
    fresh.track("bench", "coin-2", name="import coin-2")
    fresh.record_observation("bench", "coin-2", Observation(State.RUNNING, "IN_PROGRESS"))
    assert b'import_start_timestamp_seconds{import="coin-2"' in served(fresh)
    assert restored not in served(fresh)
