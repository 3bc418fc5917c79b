"""The per-import families kept in a child process (exporter.render_process)
say byte for byte what the same lines kept in this process say, as the
state changes; a child that dies fails one scrape, loudly, and the next
scrape serves every import again from a new child."""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
import pickle
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.exposition import choose_encoder

from exporter import exposition, render_process
from exporter.exposition import ImportLines
from exporter.loop_slices import LOOP_SLICE_SECONDS, LoopSlices
from exporter.metrics import build_registry
from exporter.model import ErrorReason, Observation, Origin, SourceError, State
from exporter.render_process import REFRESH_FRAME, RenderProcess, RenderProcessError
from exporter.state import StateStore
from exporter.web import create_web_app
from tests.test_exposition import (
    ODD,
    OPENMETRICS,
    TEXT,
    Clock,
    random_observation,
    reference,
    running_series,
    same_system,
    stable_lines,
)

Client = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


def new_state(clock: Clock) -> StateStore:
    state = StateStore(clock=clock)
    state.add_source("elevate", "elevate", 30.0)
    state.add_source("zilliant", "zilliant", 60.0, fetches_tokens=True)
    return state


def random_step(state: StateStore, rng: random.Random, clock: Clock) -> None:
    """One change of many kinds, as polls, registrations and reloads make them."""
    source = rng.choice(["elevate", "zilliant"])
    import_id = rng.choice([*(f"i{n}" for n in range(40)), *ODD])
    action = rng.random()
    if action < 0.2:
        state.track(
            source,
            import_id,
            name=rng.choice([None, "nightly", *ODD]),
            origin=rng.choice([Origin.CONFIG, Origin.API]),
        )
    elif action < 0.55:
        state.record_observation(source, import_id, random_observation(rng, clock.now))
    elif action < 0.7:
        record = state.imports.get((source, import_id))
        if record is not None and record.observation is not None:  # the same answer again
            state.record_observation(source, import_id, record.observation)
    elif action < 0.78:
        reason = rng.choice(list(ErrorReason))
        state.record_error(source, import_id, SourceError(reason, rng.choice(ODD)))
    elif action < 0.86:
        state.untrack(source, import_id)
    elif action < 0.9:
        state.park(source)
    else:
        state.unpark(source, functools.partial(same_system, source))
    clock.now += rng.choice([0.0, 0.5, 30.0])


@pytest.fixture
async def process_of() -> AsyncIterator[Callable[[StateStore], RenderProcess]]:
    made: list[RenderProcess] = []

    def make(state: StateStore) -> RenderProcess:
        made.append(RenderProcess(state))
        return made[-1]

    yield make
    for process in made:
        await process.close()


async def bodies(
    lines: ImportLines, process: RenderProcess, accept: str, names: frozenset[str] | None
) -> tuple[bytes, bytes, bytes]:
    """The body of the lines kept here, and the child's plain and gzipped."""
    encoder, content_type = choose_encoder(accept)
    await lines.refresh()
    here = bytes(await lines.body(encoder, content_type, names, gzipped=False))
    await process.refresh()
    plain = bytes(await process.body(encoder, content_type, names, gzipped=False))
    packed = bytes(await process.body(encoder, content_type, names, gzipped=True))
    return here, plain, packed


@pytest.mark.parametrize("seed", range(3))
async def test_the_childs_body_is_the_body_kept_here_as_the_state_changes(
    seed: int,
    process_of: Callable[[StateStore], RenderProcess],
) -> None:
    """Two states driven alike: one's lines kept here, the other's in a
    child; after every few changes both render, in both formats, filtered
    or not, gzipped or not: the same bytes."""
    here_clock, there_clock = Clock(), Clock()
    here_state, there_state = new_state(here_clock), new_state(there_clock)
    lines = ImportLines(here_state)
    process = process_of(there_state)
    here_rng, there_rng = random.Random(seed), random.Random(seed)
    for step in range(240):
        random_step(here_state, here_rng, here_clock)
        random_step(there_state, there_rng, there_clock)
        if step % 7 == 0:
            accept = OPENMETRICS if step % 2 else TEXT
            names = frozenset({"import_state", "import_duration_seconds"}) if step % 3 else None
            here, plain, packed = await bodies(lines, process, accept, names)
            assert plain == here
            assert gzip.decompress(packed) == here
    assert len(there_state.imports) > 10
    here, plain, packed = await bodies(lines, process, TEXT, None)
    assert plain == here
    assert b"import_state{" in here
    running = running_series(there_state)
    assert stable_lines(plain.decode() + reference_registry(there_state), running) == stable_lines(
        reference(there_state, TEXT), running
    )


def reference_registry(state: StateStore) -> str:
    """The registry's families as ``/metrics`` adds them after the imports'."""
    encoder, _ = choose_encoder(TEXT)
    return encoder(build_registry(state, imports=False)).decode()


def running_state(clock: Clock, count: int) -> StateStore:
    state = new_state(clock)
    for n in range(count):
        state.track("elevate", f"{n}", name=f"import {n}")
        state.record_observation(
            "elevate", f"{n}", Observation(State.RUNNING, "IN_PROGRESS", started_at=clock.now - n)
        )
    return state


async def test_a_dead_child_fails_one_render_and_the_next_child_gets_every_import(
    process_of: Callable[[StateStore], RenderProcess],
) -> None:
    clock = Clock()
    state = running_state(clock, 300)
    process = process_of(state)
    encoder, content_type = choose_encoder(TEXT)
    await process.refresh()
    before = bytes(await process.body(encoder, content_type, None, gzipped=False))
    child = process._child
    assert child is not None
    child.kill()
    child.wait()

    async def render() -> bytes:
        await process.refresh()
        return bytes(await process.body(encoder, content_type, None, gzipped=False))

    with pytest.raises(RenderProcessError, match="render process"):
        await render()
    after = await render()
    assert after == before
    assert process.starts == 2


async def test_metrics_answers_500_while_the_child_is_dead_then_serves_every_import(
    aiohttp_client: Client,
    process_of: Callable[[StateStore], RenderProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through ``/metrics``: the scrape that finds the child dead fails (the
    target is down for that scrape: never a body without the imports), the
    error is logged, and the next scrape has every import, gzipped as
    Prometheus asks."""
    clock = Clock()
    state = running_state(clock, 50)
    process = process_of(state)
    registry = build_registry(state, imports=False)
    client = await aiohttp_client(create_web_app(state, registry, import_lines=process))
    first = await client.get("/metrics")
    assert first.status == 200
    assert (await first.text()).count("import_info{") == 50
    child = process._child
    assert child is not None
    child.kill()
    child.wait()
    failed = await client.get("/metrics")
    assert failed.status == 500
    assert "the render process" in caplog.text
    again = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert again.status == 200
    assert again.headers["Content-Encoding"] == "gzip"
    text = await again.text()
    assert text.count("import_info{") == 50
    assert "import_source_up" in text


async def test_the_start_up_sends_every_import_before_the_loop_takes_the_pipe(
    process_of: Callable[[StateStore], RenderProcess],
) -> None:
    """Start-up hands the restored imports over with blocking writes (before
    listening); later refreshes go through the event loop."""
    clock = Clock()
    state = running_state(clock, 3000)
    process = process_of(state)
    lines = ImportLines(running_state(Clock(), 3000))
    process.take_changes(in_order=sorted(state.imports))
    lines.take_changes(in_order=sorted(lines.state.imports))
    encoder, content_type = choose_encoder(OPENMETRICS)
    await process.refresh()
    body = bytes(await process.body(encoder, content_type, None, gzipped=True))
    assert gzip.decompress(body) == bytes(
        await lines.body(encoder, content_type, None, gzipped=False)
    )


async def test_a_refresh_gives_the_loop_back_within_a_frame_of_its_slice(
    process_of: Callable[[StateStore], RenderProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a refresh does between two yields to the event loop, the
    pickling of what it read included, is its slice and one frame at most
    (read for a whole slice, then pickled, a step took half a slice more)."""
    read = LOOP_SLICE_SECONDS / 1500  # a slice reads 1,500 imports; pickling one, half that
    now = [0.0]
    yields: list[float] = []
    update_of, frame = exposition.update_of, render_process._frame

    def timed_update_of(*args: Any) -> Any:
        now[0] += read
        return update_of(*args)

    def timed_frame(message: tuple[Any, ...]) -> bytes:
        if message[0] == "updates":
            now[0] += read / 2 * len(message[1])
        return frame(message)

    class Recorded(LoopSlices):
        async def yield_now(self) -> None:
            yields.append(now[0])
            await super().yield_now()

    monkeypatch.setattr(render_process, "update_of", timed_update_of)
    monkeypatch.setattr(render_process, "_frame", timed_frame)
    process = process_of(running_state(Clock(), 6000))
    await process.refresh(Recorded(clock=lambda: now[0]))
    marks = [0.0, *yields, now[0]]
    steps = [after - before for before, after in itertools.pairwise(marks)]
    assert len(steps) >= 5
    assert max(steps) <= LOOP_SLICE_SECONDS + REFRESH_FRAME * read * 1.5 + 1e-9
    body = await process.body(*choose_encoder(TEXT), None, gzipped=False)
    assert body.count(b"\nimport_info{") == 6000  # every import got through


async def test_a_body_written_in_parts_is_the_whole_body(
    process_of: Callable[[StateStore], RenderProcess],
    aiohttp_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/metrics writes its body a part at a time (a few kilobytes here): the
    client gets every byte, once, in order, with its length and headers."""
    from exporter import web as exporter_web

    state = running_state(Clock(), 2000)
    process = process_of(state)
    client = await aiohttp_client(
        create_web_app(state, build_registry(state, imports=False), import_lines=process)
    )
    whole = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    monkeypatch.setattr(exporter_web, "BODY_PART", 4096)
    for accept_encoding in ("gzip", "identity"):
        parted = await client.get("/metrics", headers={"Accept-Encoding": accept_encoding})
        assert parted.status == 200
        assert parted.headers["Content-Type"] == whole.headers["Content-Type"]
        body = await parted.read()  # gunzipped by the client when gzipped
        assert int(parted.headers["Content-Length"]) > 10 * 4096
        assert stable_lines(body.decode()) == stable_lines((await whole.read()).decode())
        assert body.count(b"\nimport_info{") == 2000


def test_inputs_pickle_to_the_same_lines() -> None:
    """What crosses the pipe renders as the record does here."""
    clock = Clock()
    state = running_state(clock, 3)
    state.record_error("elevate", "1", SourceError(ErrorReason.TIMEOUT, 'slow "x"'))
    for record in state.imports.values():
        inputs = exposition.inputs_of(record)
        assert exposition.lines_from(pickle.loads(pickle.dumps(inputs))) == exposition.render_lines(
            record
        )


SILENT_CHILD = """
import struct, sys
for _ in range(2):
    (length,) = struct.unpack("<I", sys.stdin.buffer.read(4))
    sys.stdin.buffer.read(length)
open(sys.argv[1], "w").close()
sys.stdin.buffer.read()
"""


async def test_a_render_left_mid_answer_stops_its_child_and_the_next_gets_everything(
    process_of: Callable[[StateStore], RenderProcess], tmp_path: Path
) -> None:
    """A render cancelled while it waits for the child's answer (the
    exporter stopping): that answer would be read as the next render's, so
    the child is stopped, and the next refresh starts one that gets every
    import."""
    clock = Clock()
    state = running_state(clock, 20)
    process = process_of(state)
    # A child that says when it has read two frames (the updates and the
    # render's request), and never answers.
    asked = tmp_path / "asked"
    process.command = [sys.executable, "-c", SILENT_CHILD, str(asked)]
    encoder, content_type = choose_encoder(TEXT)
    await process.refresh()
    waiting = asyncio.create_task(process.body(encoder, content_type, None, gzipped=False))
    silent = process._child
    assert silent is not None
    async with asyncio.timeout(30):
        while not asked.exists():
            await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert silent.poll() is not None  # stopped
    process.command = RenderProcess(state).command
    await process.refresh()
    body = bytes(await process.body(encoder, content_type, None, gzipped=False))
    assert body.count(b"import_info{") == 20
    assert process.starts == 2


async def test_poll_lines_of_an_import_the_child_never_got_restart_it_with_everything(
    process_of: Callable[[StateStore], RenderProcess],
) -> None:
    """Every import reaches the child first as changed; poll lines of one it
    does not keep would be a bug, which must not leave the import out
    quietly: the child exits, the render fails, the next child gets all."""
    clock = Clock()
    state = running_state(clock, 10)
    process = process_of(state)
    encoder, content_type = choose_encoder(TEXT)
    await process.refresh()
    await process.body(encoder, content_type, None, gzipped=False)
    process._send_now(("updates", [(("elevate", "ghost"), (clock.now, clock.now, True, 0), False)]))
    with pytest.raises(RenderProcessError, match="exited"):
        await process.body(encoder, content_type, None, gzipped=False)
    await process.refresh()
    body = bytes(await process.body(encoder, content_type, None, gzipped=False))
    assert body.count(b"import_info{") == 10
    assert b"ghost" not in body


async def test_a_closed_render_process_starts_no_child_and_a_render_needs_a_refresh(
    process_of: Callable[[StateStore], RenderProcess],
) -> None:
    """Once the exporter stops, a render still queued fails rather than
    start a child nothing would stop; a render never asks an empty child."""
    state = running_state(Clock(), 3)
    process = process_of(state)
    encoder, content_type = choose_encoder(TEXT)
    with pytest.raises(RenderProcessError, match="no render process"):
        await process.body(encoder, content_type, None, gzipped=False)
    await process.refresh()
    child = process._child
    assert child is not None
    await process.close()
    assert child.poll() is not None  # stopped and reaped
    with pytest.raises(RenderProcessError, match="closed"):
        await process.refresh()
    assert process._child is None
    assert process.starts == 1
