"""The pre-rendered ``/metrics`` (exporter.exposition) says exactly what the
reference collector says over the same state, series by series, in both
formats, as the state changes under one long-lived cache."""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from exporter import exposition, loop_slices
from exporter.exposition import FAMILY_NAMES, RENDER_BATCH, ImportLines, render_metrics
from exporter.metrics import build_registry
from exporter.model import ErrorReason, Observation, Origin, SourceError, State
from exporter.state import ImportRecord, StateStore
from exporter.web import create_web_app

TEXT = ""
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
VOLATILE = ("process_", "python_")
"""Families of the process, whose values move between two renders."""

Series = dict[str, tuple[str, str, frozenset[tuple[str, frozenset[tuple[str, str]], float]]]]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def families(body: str, accept: str) -> Iterator[tuple[str, str, str, list[Sample]]]:
    parse = openmetrics_families if accept == OPENMETRICS else text_string_to_metric_families
    for family in parse(body):
        yield family.name, family.type, family.documentation, family.samples


def series(body: str, accept: str) -> Series:
    """Family name -> (type, help, samples); each family must appear once."""
    out: Series = {}
    for name, kind, documentation, samples in families(body, accept):
        assert name not in out, f"{name} appears twice"
        volatile = name.startswith(VOLATILE)
        out[name] = (
            kind,
            documentation,
            frozenset(
                (s.name, frozenset(s.labels.items()), 0.0 if volatile else s.value) for s in samples
            ),
        )
    return out


def stable_lines(body: str, running: frozenset[str] = frozenset()) -> list[str]:
    """The body's lines but the process's, sorted; the duration of a running
    import (its series in ``running``) as ``repr`` writes its value (ours is
    written to the millisecond, ``12.500``, where prometheus_client writes
    ``12.5``: one value)."""

    def normal(line: str) -> str:
        series, _, value = line.rpartition(" ")
        return f"{series} {float(value)!r}" if series in running else line

    return sorted(normal(line) for line in body.splitlines() if not line.startswith(VOLATILE))


def running_series(state: StateStore) -> frozenset[str]:
    """The duration series of the imports whose duration moves with the clock."""
    return frozenset(
        f'import_duration_seconds{{import="{exposition.escape(r.import_id)}",'
        f'source="{exposition.escape(r.source)}"}}'
        for r in state.imports.values()
        if r.state is State.RUNNING and r.start_timestamp is not None and r.end_timestamp is None
    )


def ours(lines: ImportLines, accept: str, names: tuple[str, ...] = ()) -> str:
    encoder, content_type = choose_encoder(accept)
    lines.take_changes()  # what the handler does on the loop before each render
    registry = build_registry(lines.state, imports=False)
    return render_metrics(registry, encoder, content_type, lines, names).decode()


def reference(state: StateStore, accept: str, names: tuple[str, ...] = ()) -> str:
    encoder, _ = choose_encoder(accept)
    registry = build_registry(state)
    return encoder(registry.restricted_registry(list(names)) if names else registry).decode()


def assert_same(lines: ImportLines, accept: str, names: tuple[str, ...] = ()) -> None:
    mine = ours(lines, accept, names)
    theirs = reference(lines.state, accept, names)
    assert series(mine, accept) == series(theirs, accept)
    # Byte for byte, too, but for the order of imports within a family and
    # the text of a running import's duration.
    running = running_series(lines.state)
    assert stable_lines(mine, running) == stable_lines(theirs, running)
    if accept == OPENMETRICS:
        assert mine.endswith("# EOF\n")
        assert mine.count("# EOF") == 1


T = TypeVar("T")
ODD = ['a"b', "back\\slash", "new\nline", "ünïcödé ✓", "", "{LABELS}", "x,y=z}"]


def same_system(system: str, record: ImportRecord) -> bool:
    return record.system == system


def random_observation(rng: random.Random, now: float) -> Observation:
    state = rng.choice(list(State))

    def maybe(value: T) -> T | None:
        return value if rng.random() < 0.5 else None

    return Observation(
        state=state,
        upstream_state=rng.choice(["IN_PROGRESS", "DONE", *ODD]),
        step=maybe(rng.choice(["a", "b"])),
        items_completed=maybe(rng.randrange(0, 10**7)),
        items_expected=maybe(rng.randrange(0, 10**7)),
        items_failed=maybe(rng.randrange(0, 10)),
        started_at=maybe(now - rng.uniform(0, 10**6)),
        ended_at=maybe(now - rng.uniform(0, 100)),
    )


@pytest.mark.parametrize("join_slice", [exposition.JOIN_SLICE, 3])
@pytest.mark.parametrize("seed", range(6))
def test_output_equals_the_reference_collector_as_the_state_changes(
    seed: int, join_slice: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random changes, renders between some (each family's slices kept
    joined from one render to the next; with slices of 3 imports, removals
    move imports between slices)."""
    monkeypatch.setattr(exposition, "JOIN_SLICE", join_slice)
    rng = random.Random(seed)
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    state.add_source("zilliant", "zilliant", 60.0, fetches_tokens=True)
    lines = ImportLines(state)
    ids = [f"i{n}" for n in range(12)] + ODD
    for step in range(120):
        source = rng.choice(["elevate", "zilliant"])
        import_id = rng.choice(ids)
        action = rng.random()
        if action < 0.25:
            state.track(
                source,
                import_id,
                name=rng.choice([None, "nightly", *ODD]),
                origin=rng.choice([Origin.CONFIG, Origin.API]),
            )
        elif action < 0.6:
            state.record_observation(source, import_id, random_observation(rng, clock.now))
        elif action < 0.7:
            reason = rng.choice(list(ErrorReason))
            state.record_error(source, import_id, SourceError(reason, rng.choice(ODD)))
        elif action < 0.75:
            state.record_source_error(
                source, SourceError(ErrorReason.UNAUTHORIZED, "no"), [import_id]
            )
        elif action < 0.82:
            state.untrack(source, import_id)
        elif action < 0.86:
            state.park(source)
        elif action < 0.9:
            state.unpark(source, functools.partial(same_system, source))
        else:
            state.record_token_request("zilliant", rng.choice(["success", "timeout"]))
            state.record_request(source, rng.uniform(0, 3))
        clock.now += rng.choice([0.0, 0.5, 30.0, 1e6])
        if step % 3 == 0:  # several changes between some scrapes
            assert_same(lines, TEXT if step % 2 else OPENMETRICS)
    assert len(state.imports) > 3
    for accept in (TEXT, OPENMETRICS):
        assert_same(lines, accept)


@pytest.fixture
def busy() -> ImportLines:
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate-prod", "elevate", 30.0)
    for n in range(5):
        state.track("elevate-prod", f"{n}", name=f"import {n}")
    state.record_observation("elevate-prod", "0", Observation(State.RUNNING, "IN_PROGRESS"))
    state.record_observation("elevate-prod", "1", Observation(State.SUCCEEDED, "DONE"))
    state.record_error("elevate-prod", "2", SourceError(ErrorReason.TIMEOUT, "slow"))
    return ImportLines(state)


def test_running_durations_move_with_the_clock_alone(busy: ImportLines) -> None:
    """A running import's duration is current at each scrape, nothing else changing."""
    first = series(ours(busy, TEXT), TEXT)["import_duration_seconds"]
    assert_same(busy, TEXT)
    assert isinstance(busy.state.clock, Clock)
    busy.state.clock.now += 12.5
    second = series(ours(busy, TEXT), TEXT)["import_duration_seconds"]
    assert_same(busy, TEXT)
    running = ("import_duration_seconds", frozenset({("source", "elevate-prod"), ("import", "0")}))
    assert (*running, 0.0) in first[2]
    assert (*running, 12.5) in second[2]
    assert 'import_duration_seconds{import="0",source="elevate-prod"} 12500e-3\n' in ours(
        busy, TEXT
    )


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_running_durations_of_any_age_equal_the_reference(accept: str) -> None:
    """Durations of the reference's value, whether the upstream's start is
    ahead of our clock (0, never negative), fractional, a million seconds or
    more ago (where Go's float format, the reference's, switches to an
    exponent), or beyond any real time."""
    clock = Clock()
    clock.now = 1_700_000_000.123456
    state = StateStore(clock=clock)
    state.add_source("elevate-prod", "elevate", 30.0)
    for import_id, ago in [("ahead", -5.0), ("fresh", 0.1234567), ("day", 86_400.5)]:
        state.track("elevate-prod", import_id)
        started = clock.now - ago
        running = Observation(State.RUNNING, "IN_PROGRESS", started_at=started)
        state.record_observation("elevate-prod", import_id, running)
    lines = ImportLines(state)
    assert_same(lines, accept)
    durations = series(ours(lines, accept), accept)["import_duration_seconds"][2]
    ahead = (
        "import_duration_seconds",
        frozenset({("source", "elevate-prod"), ("import", "ahead")}),
    )
    assert (*ahead, 0.0) in durations
    for ago in (999_999.5, 1e6, 3e7, 1e300, -1e306):  # nonsense, too
        state.track("elevate-prod", f"{ago}")
        old = Observation(State.RUNNING, "IN_PROGRESS", started_at=clock.now - ago)
        state.record_observation("elevate-prod", f"{ago}", old)
        assert_same(lines, accept)


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_running_durations_of_labels_with_format_characters_equal_the_reference(
    accept: str,
) -> None:
    """A part's duration lines are made by one format of a repeated
    template: a label value holding ``%`` is a value, never a format."""
    clock = Clock()
    clock.now = 1_700_000_000.5
    state = StateStore(clock=clock)
    state.add_source("elevate-prod", "elevate", 30.0)
    for import_id in ("50%d", "%s%b%%", "%(x)s", "plain"):
        state.track("elevate-prod", import_id)
        running = Observation(State.RUNNING, "IN_PROGRESS", started_at=clock.now - 2.25)
        state.record_observation("elevate-prod", import_id, running)
    lines = ImportLines(state)
    assert_same(lines, accept)
    assert 'import_duration_seconds{import="%s%b%%",source="elevate-prod"} 2250e-3\n' in ours(
        lines, accept
    )


def test_an_import_removed_leaves_its_place_to_the_last_with_its_running_start() -> None:
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    for import_id, ago in (("waiting", None), ("short", 5.0), ("long", 77.25)):
        state.track("elevate", import_id)
        if ago is None:
            observation = Observation(State.WAITING, "WAITING")
        else:
            observation = Observation(State.RUNNING, "IN_PROGRESS", started_at=clock.now - ago)
        state.record_observation("elevate", import_id, observation)
        lines.take_changes()  # one at a time: in this order in every family
    state.untrack("elevate", "waiting")  # "long", the last, takes its place
    clock.now += 1.5
    for accept in (TEXT, OPENMETRICS):
        assert_same(lines, accept)
    line = 'import_duration_seconds{import="long",source="elevate"} 78750e-3\n'
    assert line in ours(lines, TEXT)


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_every_family_has_one_help_and_type(busy: ImportLines, accept: str) -> None:
    body = ours(busy, accept)
    for name in FAMILY_NAMES:
        assert body.count(f"# HELP {name} ") == 1
        assert body.count(f"# TYPE {name} gauge\n") == 1


@pytest.mark.parametrize(
    "names",
    [
        ("import_state",),
        ("import_duration_seconds", "import_source_up"),
        ("import_source_requests_total", "process_open_fds"),
        ("no_such_metric",),
    ],
)
@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_name_filter_equals_the_reference(
    busy: ImportLines, names: tuple[str, ...], accept: str
) -> None:
    assert_same(busy, accept, names)
    wanted = {"import_source_requests" if n.endswith("_total") else n for n in names}
    assert {name for name, *_ in families(ours(busy, accept, names), accept)} <= wanted


def test_promtool_accepts_the_text_format(busy: ImportLines) -> None:
    """(OpenMetrics is checked by its strict parser above: ``promtool check
    metrics`` lints the text format, and calls an OpenMetrics counter's
    family, named without ``_total``, a metric without help.)"""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup --test installs it)")
    busy.state.track("elevate-prod", 'odd"id\\', name="new\nline")
    body = ours(busy, TEXT).encode()
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_a_refresh_on_the_loop_in_slices_renders_every_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the handler does: more changes than one slice, refreshed on the
    event loop (yielding between slices), then rendered."""
    monkeypatch.setattr(loop_slices, "LOOP_SLICE_SECONDS", 0.0)  # a yield per batch
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    for n in range(3 * RENDER_BATCH + 7):
        state.track("elevate", f"{n}", name=f"import {n}")
        state.record_observation("elevate", f"{n}", Observation(State.RUNNING, "IN_PROGRESS"))
    await lines.refresh()
    state.untrack("elevate", "3")
    await lines.refresh()
    encoder, content_type = choose_encoder(TEXT)
    registry = build_registry(state, imports=False)
    body = render_metrics(registry, encoder, content_type, lines).decode()
    running = running_series(state)
    assert stable_lines(body, running) == stable_lines(reference(state, TEXT), running)
    assert 'import="3"' not in body


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_a_body_joined_or_gzipped_in_batches_is_the_whole_body(
    accept: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``/metrics`` serves: every family's lines in slices of a few
    imports (running ones too), joined, or gzipped a batch at a time."""
    monkeypatch.setattr(exposition, "JOIN_SLICE", 3)
    monkeypatch.setattr(exposition, "DURATION_SLICE", 3)
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    for n in range(10):
        state.track("elevate", f"{n}", name=f"import {n}")
        running = Observation(State.RUNNING, "IN_PROGRESS", started_at=clock.now - n)
        state.record_observation(
            "elevate", f"{n}", running if n % 2 else random_observation(random.Random(n), clock.now)
        )
    lines.take_changes()
    encoder, content_type = choose_encoder(accept)
    registry = build_registry(state, imports=False)
    parts = list(exposition.render_parts(registry, encoder, content_type, lines))
    assert len(parts) > len(FAMILY_NAMES) + 1  # the families came in slices
    whole = b"".join(parts)
    assert_same(lines, accept)
    assert stable_lines(whole.decode()) == stable_lines(ours(lines, accept))
    monkeypatch.setattr(exposition, "GZIP_BATCH", 1000)
    gzipped = asyncio.run(exposition.build_body(iter(parts), gzipped=True))
    assert gzip.decompress(gzipped) == whole
    assert asyncio.run(exposition.build_body(iter(parts), gzipped=False)) == whole


def test_long_lines_are_joined_in_parts_of_about_join_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each part stays below the size that ``mmap`` serves (fresh pages each
    scrape): an import's nine ``import_state`` lines with long ids make
    parts of fewer imports."""
    monkeypatch.setattr(exposition, "JOIN_BYTES", 20_000)
    state = StateStore(clock=Clock())
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    for n in range(200):
        import_id = f"{n:03}-" + "x" * 200
        state.track("elevate", import_id)
        state.record_observation("elevate", import_id, Observation(State.RUNNING, "IN_PROGRESS"))
    lines.take_changes()
    encoder, content_type = choose_encoder(TEXT)
    parts = list(lines.render(encoder, content_type, frozenset({"import_state"})))
    longest_line = max(len(line) for line in b"".join(parts).splitlines(keepends=True))
    assert len(parts) > 20
    assert max(len(part) for part in parts[1:]) <= 20_000 + longest_line
    body = b"".join(parts).decode()
    assert stable_lines(body) == stable_lines(ours(lines, TEXT, ("import_state",)))


def test_a_gzipped_body_is_compressed_in_batches_by_the_gzip_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event loop copies the parts into batches of ``GZIP_BATCH`` bytes
    (a part larger than the room left spans two), and the gzip thread
    compresses each; a body's batches are two buffers, reused."""
    compressed_in: list[tuple[str, int, int]] = []
    compress_batch = exposition._compress_batch

    def watched(compressor: Any, batch: Any, last: bool = False) -> bytes:
        compressed_in.append((threading.current_thread().name, batch.used, id(batch)))
        return compress_batch(compressor, batch, last)

    monkeypatch.setattr(exposition, "_compress_batch", watched)
    monkeypatch.setattr(exposition, "GZIP_BATCH", 3000)
    parts = [bytes([65 + n]) * 1000 for n in range(7)] + [b"big" * 3000, b"end" * 10]
    body = asyncio.run(exposition.build_body(iter(parts), gzipped=True))
    assert gzip.decompress(body) == b"".join(parts)
    assert [used for _, used, _ in compressed_in] == [3000] * 5 + [1030]
    assert all(name.startswith("gzip") for name, _, _ in compressed_in)
    assert len({batch for _, _, batch in compressed_in}) == 2


async def test_a_gzipped_body_ends_with_the_registry_part_and_may_be_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``then`` (the registry's families, made in another thread) comes last,
    even when larger than a batch; a body of nothing is a valid gzip."""
    monkeypatch.setattr(exposition, "GZIP_BATCH", 1000)
    loop = asyncio.get_running_loop()
    registry_part: asyncio.Future[bytes] = loop.create_future()
    loop.call_soon(registry_part.set_result, b"registry " * 500)
    parts = [b"lines " * 300, b"more " * 100]
    body = await exposition.build_body(iter(parts), gzipped=True, then=registry_part)
    assert gzip.decompress(body) == b"".join(parts) + b"registry " * 500
    assert gzip.decompress(await exposition.build_body(iter([]), gzipped=True)) == b""


async def test_a_body_cancelled_while_a_batch_is_compressed_frees_it_after(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A scrape's render cancelled (the exporter stopping) while the thread
    compresses a batch: the other batch is closed at once, that one once the
    thread is done with it, not under it."""
    started, release = threading.Event(), threading.Event()
    compressed: list[Any] = []
    made: list[Any] = []
    compress_batch = exposition._compress_batch

    class Batch(exposition._Batch):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    def slow(compressor: Any, batch: Any, last: bool = False) -> bytes:
        compressed.append(batch)
        started.set()
        release.wait(10)
        return compress_batch(compressor, batch, last)

    monkeypatch.setattr(exposition, "_Batch", Batch)
    monkeypatch.setattr(exposition, "_compress_batch", slow)
    monkeypatch.setattr(exposition, "GZIP_BATCH", 1000)
    parts = [b"x" * 1000] * 4
    body = asyncio.create_task(exposition.build_body(iter(parts), gzipped=True))
    await asyncio.to_thread(started.wait, 10)
    body.cancel()
    with pytest.raises(asyncio.CancelledError):
        await body
    (in_thread,) = compressed
    assert [batch.memory.closed for batch in made] == [batch is not in_thread for batch in made]
    release.set()
    async with asyncio.timeout(10):
        while not in_thread.memory.closed:
            await asyncio.sleep(0.01)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_gzip_runs_in_a_thread_of_lower_priority_than_the_event_loop() -> None:
    """On a busy machine polling and probes get the CPU before a scrape's compression."""
    if os.getpriority(os.PRIO_PROCESS, 0) >= exposition.GZIP_NICENESS:
        pytest.skip("the tests run at that niceness or lower priority already")
    body = asyncio.run(exposition.build_body(iter([b"x" * 1000]), gzipped=True))
    assert gzip.decompress(body) == b"x" * 1000
    (thread,) = [t for t in threading.enumerate() if t.name.startswith("gzip")]
    assert thread.native_id is not None
    niceness = os.getpriority(os.PRIO_PROCESS, thread.native_id)
    assert niceness == exposition.GZIP_NICENESS > os.getpriority(os.PRIO_PROCESS, 0)


def test_remembered_number_texts_are_prometheus_clients() -> None:
    values: list[float] = [0, 0.0, -0.0, 0.0, 1, 1.0, True, 2**53 + 1, 1e6, 999999.5, 1.7e9]
    values += [1_700_000_000.123, 1e16, 1e-5, -3.5, float("inf"), float("-inf"), float("nan")]
    rng = random.Random(3)
    values += [rng.uniform(-1e10, 1e10) for _ in range(200)] * 2
    values += [1e15 + 0.5, 1.5e16, 1e22, 5e-324, -1.7e9, 1_700_000_000.0]
    values += [math.ldexp(rng.random(), rng.randint(-1074, 1023)) for _ in range(2000)]
    values += [10 ** rng.uniform(6, 16) for _ in range(2000)]
    for value in values:
        expected = exposition.floatToGoString(value).encode() + b"\n"
        assert exposition._value_end(value) == expected, value


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_polls_that_change_only_poll_times_show_their_new_times(
    accept: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Most polls bring the same answer: only the import's poll lines are
    rendered again (its labels taken from the kept attempt line, whatever
    they hold), and every line still equals the reference's."""
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    ids = ["plain", "odd } 1.0 id", *ODD]
    same = Observation(State.RUNNING, "IN_PROGRESS", items_completed=5, started_at=clock.now)
    for import_id in ids:
        state.track("elevate", import_id, name="with space } 2")
        state.record_observation("elevate", import_id, same)
    assert_same(lines, accept)
    whole_renders: list[ImportRecord] = []
    render_lines = exposition.render_lines

    def counted(record: ImportRecord) -> tuple[tuple[bytes, ...], exposition.Running | None]:
        whole_renders.append(record)
        return render_lines(record)

    monkeypatch.setattr(exposition, "render_lines", counted)
    for step in range(6):
        clock.now += 7.25
        for import_id in ids:
            if step in (2, 3):
                state.record_error("elevate", import_id, SourceError(ErrorReason.TIMEOUT, "slow"))
            else:
                state.record_observation("elevate", import_id, same)
        assert_same(lines, accept)
    assert whole_renders == []
    attempts = series(ours(lines, accept), accept)["import_last_poll_attempt_timestamp_seconds"]
    odd = frozenset({("source", "elevate"), ("import", "odd } 1.0 id")})
    assert ("import_last_poll_attempt_timestamp_seconds", odd, clock.now) in attempts[2]


class Watched(ImportLines):
    """Kept lines whose render says when it has sent its first family."""

    def __init__(self, state: StateStore) -> None:
        super().__init__(state)
        self.first_family_sent = asyncio.Event()

    def render(
        self, encoder: exposition.Encoder, content_type: str, names: frozenset[str] | None = None
    ) -> Iterator[bytes]:
        for count, part in enumerate(super().render(encoder, content_type, names)):
            if count == 2:  # header and one slice of import_state
                self.first_family_sent.set()
            yield part


async def test_a_change_during_a_render_shows_in_every_family_of_the_next_body_only(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two scrapes of different formats at once: the second one's refresh
    waits for the first render, so no body has an import in some families and
    not in others (a join of import_state and import_info would flicker)."""
    monkeypatch.setattr(exposition, "JOIN_SLICE", 1)
    monkeypatch.setattr(loop_slices, "LOOP_SLICE_SECONDS", 0.0)
    state = StateStore(clock=Clock())
    state.add_source("elevate", "elevate", 30.0)
    for n in range(20):
        state.track("elevate", f"{n}")
        state.record_observation("elevate", f"{n}", Observation(State.RUNNING, "IN_PROGRESS"))
    lines = Watched(state)
    registry = build_registry(state, imports=False)
    client = await aiohttp_client(create_web_app(state, registry, import_lines=lines))
    first = asyncio.ensure_future(client.get("/metrics"))
    await asyncio.wait_for(lines.first_family_sent.wait(), 10)
    state.untrack("elevate", "7")
    state.track("elevate", "new")
    second = asyncio.ensure_future(client.get("/metrics", headers={"Accept": OPENMETRICS}))
    bodies = [await (await first).text(), await (await second).text()]
    families = ("import_state", "import_info", "import_consecutive_poll_failures")
    for body, accept in zip(bodies, (TEXT, OPENMETRICS), strict=True):
        per_family = series(body, accept)
        for import_id in ("7", "new"):
            shown = {
                name
                for name in families
                if any(
                    dict(labels).get("import") == import_id for _, labels, _ in per_family[name][2]
                )
            }
            assert shown in (set(), set(families)), (import_id, accept)
    assert 'import="7"' in bodies[0]
    assert 'import="new"' not in bodies[0]
    assert 'import="7"' not in bodies[1]
    assert 'import="new"' in bodies[1]


async def test_a_refresh_cancelled_midway_leaves_the_rest_for_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loop_slices, "LOOP_SLICE_SECONDS", 0.0)  # a yield per batch
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    for n in range(3 * RENDER_BATCH):
        state.track("elevate", f"{n}")
        state.record_observation("elevate", f"{n}", Observation(State.RUNNING, "IN_PROGRESS"))
    refresh = asyncio.ensure_future(lines.refresh())
    await asyncio.sleep(0)  # the first slice rendered
    refresh.cancel()
    with pytest.raises(asyncio.CancelledError):
        await refresh
    kept = [lines.lines_of(("elevate", f"{n}")) for n in range(3 * RENDER_BATCH)]
    assert 0 < sum(lines is not None for lines in kept) < len(kept)
    assert_same(lines, TEXT)


_SOCKET_READS = """
import asyncio.selector_events, resource, socket, sys
from exporter.exposition import return_large_buffers_to_the_os
if not return_large_buffers_to_the_os():
    sys.exit("not glibc")
size = asyncio.selector_events._SelectorSocketTransport.max_size
left, right = socket.socketpair()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    left.send(b"{}")
    right.recv(size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_socket_reads_do_not_map_memory_once_large_buffers_go_back_to_the_os() -> None:
    """asyncio reads every socket into a new buffer of its transports'
    ``max_size``: one poll's answer must not cost a fresh mapping (and a page
    fault) because big buffers are mapped so they can be given back."""
    run = subprocess.run([sys.executable, "-c", _SOCKET_READS], capture_output=True, text=True)
    if run.stderr.strip() == "not glibc":
        pytest.skip("not glibc")
    assert int(run.stdout) < 200, run.stderr


_JOINED_PARTS = """
import resource, sys
from exporter.exposition import JOIN_BYTES, return_large_buffers_to_the_os
if not return_large_buffers_to_the_os():
    sys.exit("not glibc")
lines = [b"x" * 100] * (JOIN_BYTES // 100)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(300):
    part = b"".join(lines)
    del part
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_joined_parts_reuse_the_heap_instead_of_faulting_it_in_again() -> None:
    """A render joins each family a part of about :data:`JOIN_BYTES` at a
    time, each freed before the next: the heap must keep that memory for the
    next part, not give it back to the kernel and fault it in again page by
    page (17,000 page faults a gzipped render at 100,000 imports)."""
    run = subprocess.run([sys.executable, "-c", _JOINED_PARTS], capture_output=True, text=True)
    if run.stderr.strip() == "not glibc":
        pytest.skip("not glibc")
    assert int(run.stdout) < 1000, run.stderr


async def test_a_scrape_filtered_to_other_families_leaves_the_imports_unrendered(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
) -> None:
    """``name[]`` asking only for the exporter's own families (a second job
    watching the exporter) costs no render of what polls changed: at 100,000
    imports that is up to half a second of the event loop. The next scrape
    that shows the imports renders them."""
    state = StateStore(clock=Clock())
    state.add_source("elevate", "elevate", 30.0)
    state.track("elevate", "1")
    lines = ImportLines(state)
    registry = build_registry(state, imports=False)
    client = await aiohttp_client(create_web_app(state, registry, import_lines=lines))
    state.record_observation("elevate", "1", Observation(State.RUNNING, "IN_PROGRESS"))
    own = await client.get("/metrics?name[]=import_source_up")
    assert "import_source_up{" in await own.text()
    assert lines.lines_of(("elevate", "1")) is None  # not rendered yet
    body = await (await client.get("/metrics?name[]=import_state")).text()
    assert 'import_state{import="1",source="elevate",state="running"} 1.0' in body
