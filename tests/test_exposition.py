"""The pre-rendered ``/metrics`` (exporter.exposition) says exactly what the
reference collector says over the same state, series by series, in both
formats, as the state changes under one long-lived cache."""

from __future__ import annotations

import asyncio
import functools
import gc
import gzip
import math
import random
import shutil
import subprocess
import sys
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
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
    """The body ``/metrics`` serves, plain; the per-import families gzipped
    from the kept compressed parts (what Prometheus is served) must say the
    same, byte for byte."""
    encoder, content_type = choose_encoder(accept)
    lines.take_changes()  # what the handler does on the loop before each render
    registry = build_registry(lines.state, imports=False)
    wanted = frozenset(names) if names else None
    packed = exposition.gzip_parts(lines.render_packed(encoder, content_type, wanted))
    assert gzip.decompress(packed) == b"".join(lines.render(encoder, content_type, wanted))
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


def counted_whole_renders(monkeypatch: pytest.MonkeyPatch) -> list[exposition.Inputs]:
    """Every import rendered whole from now on (not its poll lines alone)."""
    whole_renders: list[exposition.Inputs] = []
    lines_from = exposition.lines_from

    def counted(inputs: exposition.Inputs) -> tuple[tuple[bytes, ...], exposition.Running | None]:
        whole_renders.append(inputs)
        return lines_from(inputs)

    monkeypatch.setattr(exposition, "lines_from", counted)
    return whole_renders


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


@pytest.mark.parametrize("chunk", [exposition.CHUNK_IMPORTS, 3])
@pytest.mark.parametrize("seed", range(6))
def test_output_equals_the_reference_collector_as_the_state_changes(
    seed: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random changes, renders between some (each chunk's families kept
    gzipped from one render to the next; with chunks of 3 imports, changes
    empty and drop chunks, and move the imports of chunks less than half
    full to the tail)."""
    monkeypatch.setattr(exposition, "CHUNK_IMPORTS", chunk)
    monkeypatch.setattr(exposition, "COMPACT_SLACK", 2 * chunk)
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


@pytest.mark.parametrize("chunk", [exposition.CHUNK_IMPORTS, 2])
@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_running_durations_of_labels_with_format_characters_equal_the_reference(
    accept: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part's duration lines are made by one format of a template: a
    label value holding ``%`` is a value, never a format (in the tail, and
    in sealed chunks, whose template holds the labels)."""
    monkeypatch.setattr(exposition, "CHUNK_IMPORTS", chunk)
    clock = Clock()
    clock.now = 1_700_000_000.5
    state = StateStore(clock=clock)
    state.add_source("elevate-prod", "elevate", 30.0)
    ids = ("%(x)s", "50%d", "%s%b%%", "plain")
    for import_id in ids:
        state.track("elevate-prod", import_id)
        running = Observation(State.RUNNING, "IN_PROGRESS", started_at=clock.now - 2.25)
        state.record_observation("elevate-prod", import_id, running)
    lines = ImportLines(state)
    lines.take_changes(in_order=[("elevate-prod", import_id) for import_id in ids])
    assert_same(lines, accept)
    assert 'import_duration_seconds{import="%s%b%%",source="elevate-prod"} 2250e-3\n' in ours(
        lines, accept
    )
    state.untrack("elevate-prod", "50%d")  # a sealed chunk's template without it
    clock.now += 1
    assert_same(lines, accept)
    kept = lines.lines_of(("elevate-prod", "%(x)s"))  # its prefix, read back
    assert kept is not None
    prefix = b'import_duration_seconds{import="%(x)s",source="elevate-prod"} '
    start_ms = 1_700_000_000_500 - 2250
    assert kept[FAMILY_NAMES.index("import_duration_seconds")] == (prefix, start_ms)


@pytest.mark.parametrize("chunk", [exposition.CHUNK_IMPORTS, 2])
def test_an_import_removed_leaves_the_running_starts_of_the_others_in_place(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the tail, and in a sealed chunk (chunks of 2: "waiting" and
    "short" sealed, "long" in the tail)."""
    monkeypatch.setattr(exposition, "CHUNK_IMPORTS", chunk)
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
    state.untrack("elevate", "waiting")  # its place left empty
    clock.now += 1.5
    for accept in (TEXT, OPENMETRICS):
        assert_same(lines, accept)
    line = 'import_duration_seconds{import="long",source="elevate"} 78750e-3\n'
    assert line in ours(lines, TEXT)
    assert 'import_duration_seconds{import="short",source="elevate"} 6500e-3\n' in ours(lines, TEXT)


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
def test_a_body_joined_or_gzipped_in_parts_is_the_whole_body(
    accept: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``/metrics`` serves: every family's lines in chunks of a few
    imports (running ones' durations in parts of a few), joined, or
    gzipped from parts compressed on their own."""
    monkeypatch.setattr(exposition, "CHUNK_IMPORTS", 3)
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
    assert len(parts) > 2 * len(FAMILY_NAMES) + 1  # the families came in parts
    whole = b"".join(parts)
    assert_same(lines, accept)
    assert stable_lines(whole.decode()) == stable_lines(ours(lines, accept))
    assert asyncio.run(exposition.build_body(iter(parts))) == whole
    gzipped = asyncio.run(exposition.gzipped_body(iter(parts)))
    assert gzip.decompress(gzipped) == whole
    packed = list(lines.render_packed(encoder, content_type))
    assert len(packed) == len(parts) - 1  # but the registry's part
    assert gzip.decompress(exposition.gzip_parts(packed)) == b"".join(parts[:-1])


async def test_a_gzipped_body_ends_with_the_registry_part_and_may_be_empty() -> None:
    """``then`` (the registry's families, made in another thread) comes last;
    a body of nothing is a valid gzip."""
    loop = asyncio.get_running_loop()
    registry_part: asyncio.Future[bytes] = loop.create_future()
    loop.call_soon(registry_part.set_result, b"registry " * 500)
    parts: list[exposition.Packed | bytes] = [b"lines " * 300, exposition.pack(b"more " * 100)]
    parts.append(b"")
    body = await exposition.gzipped_body(iter(parts), then=registry_part)
    assert gzip.decompress(body) == b"lines " * 300 + b"more " * 100 + b"registry " * 500
    assert gzip.decompress(await exposition.gzipped_body(iter([]))) == b""


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=12), st.randoms(use_true_random=False))
def test_parts_compressed_at_different_times_join_in_any_order(
    chunks: list[bytes], rng: random.Random
) -> None:
    """A part compressed once and kept joins any others, before or after it,
    into a body that any gzip reader takes whole (Go's, Prometheus's, in
    ``tests/integration``)."""
    packed = [exposition.pack(chunk) for chunk in chunks]
    order = list(range(len(chunks)))
    rng.shuffle(order)
    body = exposition.gzip_parts(packed[i] for i in order)
    assert gzip.decompress(body) == b"".join(chunks[i] for i in order)
    assert zlib.decompress(body, 31) == b"".join(chunks[i] for i in order)


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
    whole_renders = counted_whole_renders(monkeypatch)
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

    def render_packed(
        self,
        encoder: exposition.Encoder,
        content_type: str,
        names: frozenset[str] | None = None,
        now: float | None = None,
    ) -> Iterator[exposition.Packed]:
        for count, part in enumerate(super().render_packed(encoder, content_type, names, now)):
            if count == 2:  # header and one chunk of import_state
                self.first_family_sent.set()
            yield part


async def test_a_change_during_a_render_shows_in_every_family_of_the_next_body_only(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two scrapes of different formats at once: the second one's refresh
    waits for the first render, so no body has an import in some families and
    not in others (a join of import_state and import_info would flicker)."""
    monkeypatch.setattr(exposition, "CHUNK_IMPORTS", 1)
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
    keys = [("elevate", f"{n}") for n in range(3 * RENDER_BATCH)]
    refresh = asyncio.ensure_future(lines.refresh())
    for _ in range(10):  # until the first slice is rendered
        await asyncio.sleep(0)
        if any(map(lines.lines_of, keys)):
            break
    refresh.cancel()
    with pytest.raises(asyncio.CancelledError):
        await refresh
    kept = [lines.lines_of(key) for key in keys]
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
from exporter.exposition import return_large_buffers_to_the_os
if not return_large_buffers_to_the_os():
    sys.exit("not glibc")
lines = [b"x" * 100] * 2000  # about a chunk's import_state lines
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(300):
    part = b"".join(lines)
    del part
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_joined_parts_reuse_the_heap_instead_of_faulting_it_in_again() -> None:
    """A render joins each chunk's family, up to about 200 KB, one at a
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


def packs_per_render(
    lines: ImportLines, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], Awaitable[int]]:
    """A refresh and a gzipped render of ``lines``, as ``/metrics`` makes
    them, returning how many parts the render compressed."""
    packed: list[int] = []
    pack = exposition.pack

    def counted(data: bytes, level: int = exposition.GZIP_LEVEL) -> exposition.Packed:
        packed.append(len(data))
        return pack(data, level)

    monkeypatch.setattr(exposition, "pack", counted)
    encoder, content_type = choose_encoder(TEXT)

    async def render() -> int:
        await lines.refresh()
        packed.clear()
        body = await exposition.gzipped_body(lines.render_packed(encoder, content_type))
        assert gzip.decompress(body) == b"".join(lines.render(encoder, content_type))
        return len(packed)

    return render


def poll(state: StateStore, clock: Clock, rng: random.Random, ids: list[str]) -> None:
    """A poll of each of ``ids``, one after the other, half the answers new."""
    for import_id in ids:
        clock.now += 1
        running = rng.random() < 0.5
        answer = Observation(State.RUNNING if running else State.WAITING, "RUN")
        state.record_observation("elevate", import_id, answer)


async def test_a_gzipped_render_compresses_only_the_chunks_that_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Polls come round in a stable order: a render after some polls
    compresses the few chunks they emptied or filled, not the whole body; a
    chunk whose imports all moved to the tail is dropped. The tail takes
    the polled imports in the order of their polls (not in any order), so
    the next round's polls empty chunks one after the other."""
    monkeypatch.setattr(exposition, "CHUNK_IMPORTS", 8)
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    ids = [f"{n}" for n in range(96)]
    rng = random.Random(4)
    order = ids[:]
    rng.shuffle(order)  # the order polls come round in, not the ids'
    lines = ImportLines(state)
    render = packs_per_render(lines, monkeypatch)
    waiting = Observation(State.WAITING, "WAITING")
    for import_id in ids:
        state.track("elevate", import_id)
        state.record_observation("elevate", import_id, waiting)
    families = len(FAMILY_NAMES)
    assert await render() > 10 * (families - 4)  # the first: every chunk's families
    assert await render() == 0  # nothing changed
    polls = [*order[4:], *order * 3]  # rounds of polls in one order, from the 5th
    for at in range(0, len(order), 24):  # a render every 24 polls
        poll(state, clock, rng, order[at : at + 24])
        await render()
    for at in range(0, len(polls), 8):  # then every 8, across the chunks the tail filled
        poll(state, clock, rng, polls[at : at + 8])
        # The part of one chunk, the rest of the one before, and up to two
        # that the tail fills: the tail took the imports in the order of
        # their polls (in any order, 8 polls leave 3 chunks of the 24 part full).
        assert await render() <= 4 * families + 1, at  # and the durations
    assert len(lines._chunks) <= len(ids) // 8 + 1


@pytest.mark.parametrize("seed", range(3))
async def test_chunks_emptied_at_random_are_compacted(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes in no order (imports removed, finished, changed at random)
    leave chunks part empty: their places stay within twice the imports
    (and some slack), and every import shows once."""
    monkeypatch.setattr(exposition, "CHUNK_IMPORTS", 4)
    monkeypatch.setattr(exposition, "COMPACT_SLACK", 8)
    monkeypatch.setattr(exposition, "SCAN_BATCH", 5)
    monkeypatch.setattr(loop_slices, "LOOP_SLICE_SECONDS", 0.0)  # a yield per step
    rng = random.Random(seed)
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    live: set[str] = set()
    for step in range(400):
        import_id = f"{rng.randrange(60)}"
        if rng.random() < 0.2:
            state.untrack("elevate", import_id)
            live.discard(import_id)
        else:
            state.track("elevate", import_id)
            state.record_observation("elevate", import_id, random_observation(rng, clock.now))
            live.add(import_id)
        if step % 7 == 0:
            await lines.refresh()
            assert lines._places <= 2 * len(live) + 8 + 4
            assert sum(chunk.live for chunk in lines._chunks.values()) == len(live)
    assert_same(lines, TEXT)


def test_a_body_over_4_gib_has_its_length_modulo_2_to_the_32_in_the_trailer() -> None:
    """RFC 1952: ISIZE is the input's size modulo 2^32 (a body that large
    is not made here: the parts say their sizes)."""
    part = exposition.pack(b"x")
    big = exposition.Packed(part.deflated, part.crc, 2**32 + 5)
    trailer = bytes(exposition.gzip_parts([big]))[-4:]
    assert int.from_bytes(trailer, "little") == 5


async def test_kept_lines_are_out_of_the_cyclic_collectors_sight() -> None:
    """A full collection reads every object that a tracked container holds:
    at 100,000 imports, lines held in lists made collections stop the loop
    for 60-130 ms. Only the tail chunk's lines are held so, after the first
    render as after changes."""
    state = StateStore(clock=Clock())
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    for n in range(1000):
        state.track("elevate", f"{n}")
        state.record_observation("elevate", f"{n}", Observation(State.RUNNING, "IN_PROGRESS"))
    for step in range(3):
        if step:
            for n in range(step, 1000, 7):
                state.record_observation("elevate", f"{n}", Observation(State.SUCCEEDED, "DONE"))
        await lines.refresh()
        gc.collect()
        held = sum(
            len(held)
            for held in gc.get_objects()
            if isinstance(held, list | tuple)
            and any(isinstance(line, bytes) and line.startswith(b"import_") for line in held)
        )
        assert 0 < held <= exposition.CHUNK_IMPORTS * len(FAMILY_NAMES), step


@given(st.lists(st.tuples(st.binary(max_size=20), st.booleans()), min_size=1, max_size=40))
def test_a_sealed_chunks_family_leaves_out_the_lines_of_empty_places(
    places: list[tuple[bytes, bool]],
) -> None:
    """Each family of a sealed chunk (its lines in one bytes) is joined again
    without the places its imports left, whichever they are."""
    chunk = exposition._Chunk(0)
    others = len(FAMILY_NAMES) - 2
    for n, (line, _) in enumerate(places):
        chunk.append((line, b"%d" % n, *[b"x"] * others), b"", 0)
    chunk.seal()
    for n, (_, empty) in enumerate(places):
        if empty:
            chunk.clear(n)
    kept = [(n, line) for n, (line, empty) in enumerate(places) if not empty]
    assert bytes(chunk.family(0)) == b"".join(line for _, line in kept)
    assert bytes(chunk.family(1)) == b"".join(b"%d" % n for n, _ in kept)
    assert chunk.durations(0) == b""
    for n, line in kept:
        assert chunk.lines_at(n)[:2] == [line, b"%d" % n]


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_a_first_poll_of_a_restored_import_without_poll_times_shows_them(
    accept: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import restored with an answer but no poll time (a row of an
    older schema) whose first poll fails: only its poll lines are rendered
    again, though it had none to take its labels from."""
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    answer = Observation(State.RUNNING, "IN_PROGRESS", started_at=clock.now - 60)
    state.restore(
        [
            ImportRecord("elevate", import_id, "elevate", name="n", observation=answer)
            for import_id in ("plain", *ODD)
        ]
    )
    lines = ImportLines(state)
    assert_same(lines, accept)
    whole_renders = counted_whole_renders(monkeypatch)
    clock.now += 5.0
    for import_id in ("plain", *ODD):
        state.record_error("elevate", import_id, SourceError(ErrorReason.TIMEOUT, "slow"))
    assert_same(lines, accept)
    assert whole_renders == []
    body = ours(lines, accept)
    assert 'import_consecutive_poll_failures{import="plain",source="elevate"} 1.0' in body


async def test_an_import_changed_while_a_refresh_runs_is_rendered_whole_by_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refresh took an import as only polled again; before it reaches it
    (it yields to the loop between batches) a poll brings a new answer:
    the record it reads then is rendered whole, so no line shows the new
    poll next to the old answer."""
    monkeypatch.setattr(loop_slices, "LOOP_SLICE_SECONDS", 0.0)  # a yield per batch
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    lines = ImportLines(state)
    ids = [f"{n}" for n in range(3 * RENDER_BATCH)]
    waiting = Observation(State.WAITING, "QUEUED")
    for import_id in ids:
        state.track("elevate", import_id)
        state.record_observation("elevate", import_id, waiting)
    await lines.refresh()
    clock.now += 30.0
    for import_id in ids:
        state.record_observation("elevate", import_id, waiting)  # the same answer: poll lines
    refreshing = asyncio.create_task(lines.refresh())
    await asyncio.sleep(0)  # the refresh's first batch, then its first yield
    assert not refreshing.done()
    clock.now += 1.0
    state.record_observation("elevate", ids[-1], Observation(State.RUNNING, "IN_PROGRESS"))
    await refreshing
    encoder, content_type = choose_encoder(TEXT)
    body = b"".join(lines.render(encoder, content_type)).decode()
    last = f'import="{ids[-1]}",source="elevate"'
    assert f'import_state{{{last},state="running"}} 1.0' in body
    info = (
        f'import_info{{import="{ids[-1]}",name="",origin="config",source="elevate",'
        'system="elevate",upstream_state="IN_PROGRESS"} 1.0'
    )
    assert info in body
