"""When the first polls of newly tracked imports happen: spread with jitter over
a tenth of the source's interval (at most 5 s), so that a source with many
imports does not send them all to its upstream in the same instant."""

from __future__ import annotations

import random

import pytest

from exporter.model import Observation, State
from exporter.poller import SourceScheduler
from exporter.state import StateStore
from tests.conftest import Clock, wait_until
from tests.fakes import FakeSource

T0 = 1000.0
IMPORTS = 100
STEPS = 20
"""Instants per window at which the scheduler is let run."""


async def run_at(scheduler: SourceScheduler, clock: Clock, now: float) -> None:
    """Let the scheduler run at the instant ``now``: its worker polls whatever is
    due, then would wait for the next due time; it is stopped there instead of
    waiting in real time. A FakeSource poll never suspends, so once the worker
    has read the clock, its whole pass over the due imports is done."""
    clock.now = now
    reads = clock.reads
    scheduler.start()
    try:
        await wait_until(lambda: clock.reads > reads, timeout=5)
    finally:
        await scheduler.stop()


async def first_poll_steps(interval: float, window: float, seed: int) -> list[int]:
    """Track IMPORTS imports at T0, then let the scheduler run at the instants
    T0 + window * k / STEPS for k = 0 .. 1.5 * STEPS; return, for each import,
    the step k at which it was first polled."""
    clock = Clock(T0)
    step = 0
    first_step: dict[str, int] = {}

    def answer(import_id: str) -> Observation:
        first_step.setdefault(import_id, step)
        return Observation(State.RUNNING, "IN_PROGRESS")

    source = FakeSource("s", [str(i) for i in range(IMPORTS)], answer)
    state = StateStore()
    state.add_source(source.name, source.system, interval)
    scheduler = SourceScheduler(
        source,
        state,
        interval=interval,
        concurrency=1,
        max_backoff=interval,
        clock=clock,
        rng=random.Random(seed),
    )
    for spec in source.imports():
        scheduler.add(spec)  # all at T0, as when a source with many imports starts
    for step in range(STEPS * 3 // 2 + 1):
        await run_at(scheduler, clock, T0 + window * step / STEPS)
    assert len(first_step) == IMPORTS, "some imports were never polled"
    assert set(source.polls.values()) == {1}  # the next polls are an interval away
    return list(first_step.values())


@pytest.mark.parametrize(
    ("interval", "window"),
    [
        (10.0, 1.0),  # a tenth of the interval ...
        (30.0, 3.0),
        (3600.0, 5.0),  # ... but at most 5 s (a tenth would be 6 minutes)
    ],
)
@pytest.mark.parametrize("seed", [1, 2])
async def test_first_polls_are_spread_over_the_start_window(
    interval: float, window: float, seed: int
) -> None:
    steps = await first_poll_steps(interval, window, seed)
    assert max(steps) <= STEPS  # every first poll within the window
    assert min(steps) >= 1  # none at the instant they were all tracked
    # Spread over the whole window, not bunched: its first and last tenths each
    # see a first poll, most steps see some, and no step sees more than a fifth.
    assert min(steps) <= STEPS // 10
    assert max(steps) > STEPS - STEPS // 10
    assert len(set(steps)) >= STEPS * 3 // 4
    assert max(steps.count(k) for k in steps) <= IMPORTS // 5
