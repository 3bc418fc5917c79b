"""The poller: intervals, backoff, Retry-After, terminal imports, isolation."""

from __future__ import annotations

import gc
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.model import ErrorReason, Observation, SourceError, State
from exporter.poller import BACKOFF_JITTER, MAX_RETRY_AFTER, Poller, SourceScheduler
from exporter.sources.base import ImportSpec
from exporter.state import StateStore
from tests.conftest import Clock, wait_until
from tests.fakes import FakeSource, raise_error
from tests.test_scheduling import T0, run_at

RUNNING = Observation(state=State.RUNNING, upstream_state="IN_PROGRESS")
SUCCEEDED = Observation(state=State.SUCCEEDED, upstream_state="SUCCESS")


def scheduler(source: FakeSource, clock: Clock, **kwargs: float) -> SourceScheduler:
    state = StateStore(clock=clock)
    state.add_source(source.name, source.system, kwargs.get("interval", 10.0))
    sched = SourceScheduler(
        source,
        state,
        interval=kwargs.get("interval", 10.0),
        concurrency=1,
        max_backoff=kwargs.get("max_backoff", 100.0),
        clock=clock,
        rng=random.Random(1),
    )
    for spec in source.imports():
        sched.add(spec)
    return sched


async def test_success_is_polled_again_after_the_interval() -> None:
    clock = Clock(1000.0)
    sched = scheduler(FakeSource("s", ["a"], lambda _: RUNNING), clock)
    assert await sched.poll_once("a") == clock.now + 10.0
    assert sched.state.imports[("s", "a")].state is State.RUNNING


async def test_failures_back_off_exponentially_with_jitter_capped_and_reset() -> None:
    clock = Clock(1000.0)
    source = FakeSource("s", ["a"], raise_error(SourceError(ErrorReason.SERVER_ERROR, "HTTP 500")))
    sched = scheduler(source, clock, interval=10.0, max_backoff=60.0)
    delays = []
    for _ in range(6):
        due = await sched.poll_once("a")
        assert due is not None
        delays.append(due - clock.now)
    # 10, 20, 40, then capped at 60; each within +-20% jitter.
    for delay, base in zip(delays, [10, 20, 40, 60, 60, 60], strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    assert len(set(delays)) > 1  # jittered, not lockstep
    source.behaviour = lambda _: RUNNING
    assert await sched.poll_once("a") == clock.now + 10.0  # reset on success
    source.behaviour = raise_error(SourceError(ErrorReason.SERVER_ERROR, "HTTP 500"))
    due = await sched.poll_once("a")
    assert due is not None
    assert due - clock.now <= 12.0


async def test_retry_after_holds_the_whole_source() -> None:
    clock = Clock(1000.0)
    error = SourceError(ErrorReason.RATE_LIMITED, "HTTP 429", retry_after=120.0)
    sched = scheduler(FakeSource("s", ["a", "b"], raise_error(error)), clock)
    due = await sched.poll_once("a")
    assert due is not None
    assert due >= clock.now + 120.0
    assert sched._paused_until == clock.now + 120.0
    assert sched.state.sources["s"].errors_total[ErrorReason.RATE_LIMITED] == 1


async def test_an_absurd_retry_after_holds_the_source_an_hour_at_most() -> None:
    clock = Clock(1000.0)
    error = SourceError(ErrorReason.RATE_LIMITED, "HTTP 429", retry_after=float("inf"))
    sched = scheduler(FakeSource("s", ["a"], raise_error(error)), clock)
    due = await sched.poll_once("a")
    assert due is not None
    assert due <= clock.now + MAX_RETRY_AFTER * (1 + BACKOFF_JITTER)


async def test_terminal_import_is_confirmed_once_then_no_longer_polled_but_kept() -> None:
    clock = Clock(1000.0)
    sched = scheduler(FakeSource("s", ["a"], lambda _: SUCCEEDED), clock)
    assert await sched.poll_once("a") is not None  # first sight: poll once more to confirm
    assert await sched.poll_once("a") is None  # confirmed: stop polling
    assert sched.state.imports[("s", "a")].state is State.SUCCEEDED


async def test_a_server_source_keeps_being_polled_after_a_terminal_state() -> None:
    clock = Clock(1000.0)
    source = FakeSource("s", ["chat"], lambda _: SUCCEEDED)
    source.follows_server = True  # type: ignore[misc]
    sched = scheduler(source, clock)
    for _ in range(3):
        assert await sched.poll_once("chat") == clock.now + 10.0


async def test_an_adapter_bug_is_counted_and_does_not_stop_polling() -> None:
    clock = Clock(1000.0)

    def broken(_: str) -> Observation:
        raise KeyError("status")

    sched = scheduler(FakeSource("s", ["a"], broken), clock)
    assert await sched.poll_once("a") is not None
    assert sched.state.sources["s"].errors_total[ErrorReason.INVALID_RESPONSE] == 1


async def test_a_hanging_source_does_not_delay_another() -> None:
    state = StateStore()
    poller = Poller(state)
    dead = FakeSource("dead", ["x", "y"], lambda _: RUNNING)
    dead.hanging = True
    alive = FakeSource("alive", ["a", "b"], lambda _: RUNNING)
    for source in (dead, alive):
        poller.add_source(
            source, interval=0.05, concurrency=1, max_backoff=1.0, imports=source.imports()
        )
    poller.start()
    try:
        await wait_until(lambda: min(alive.polls["a"], alive.polls["b"]) >= 5)
        assert dead.polls["x"] + dead.polls["y"] == 1  # one worker, stuck on its first poll
    finally:
        await poller.stop()


async def test_a_slow_import_only_holds_one_worker() -> None:
    state = StateStore()
    poller = Poller(state)
    source = FakeSource("s", ["slow", "fast"], lambda _: RUNNING)
    original = source.poll

    async def poll(import_id: str) -> Observation:
        if import_id == "slow":
            source.polls[import_id] += 1
            await source.hang.wait()
        return await original(import_id)

    source.poll = poll  # type: ignore[method-assign]
    poller.add_source(
        source, interval=0.05, concurrency=2, max_backoff=1.0, imports=source.imports()
    )
    poller.start()
    try:
        await wait_until(lambda: source.polls["fast"] >= 5)
        assert source.polls["slow"] == 1
    finally:
        await poller.stop()


async def test_removed_import_is_no_longer_polled() -> None:
    state = StateStore()
    poller = Poller(state)
    source = FakeSource("s", ["a", "b"], lambda _: RUNNING)
    sched = poller.add_source(
        source, interval=0.05, concurrency=1, max_backoff=1.0, imports=source.imports()
    )
    sched.remove("a")
    poller.start()
    try:
        await wait_until(lambda: source.polls["b"] >= 3)
        assert source.polls["a"] == 0
        assert ("s", "a") not in state.imports
    finally:
        await poller.stop()


async def test_an_import_removed_and_added_again_is_polled_once_an_interval() -> None:
    """A registration deleted and made again (DELETE, then POST) while its
    next poll waits, or while a poll of it is in flight: one poll an
    interval from then on, never two."""
    clock = Clock(T0)
    in_flight_once: list[bool] = []

    def answer(import_id: str) -> Observation:
        if import_id == "a" and not in_flight_once:
            in_flight_once.append(True)
            sched.remove("a")
            sched.add(ImportSpec("a"))
        return RUNNING

    source = FakeSource("s", ["a", "b"], answer)
    sched = scheduler(source, clock, interval=10.0)
    sched.remove("a")
    sched.add(ImportSpec("a"))  # while its first poll waits
    for step in range(1, 5):
        await run_at(sched, clock, T0 + 10.0 * step)
    assert (source.polls["a"], source.polls["b"]) == (4, 4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50).map(float), st.booleans()), min_size=1, max_size=40))
def test_imports_are_taken_in_the_order_they_fall_due_whatever_order_they_came_in(
    pushes: list[tuple[float, bool]],
) -> None:
    """Most imports are due again an interval after their poll, later than
    every one before them (kept in a queue); backoffs and first polls may
    fall anywhere (kept in a heap). Taken, both are one order of due times;
    an import removed meanwhile is never taken, and none before it is due."""
    clock = Clock(0.0)
    ids = [str(n) for n in range(len(pushes))]
    sched = scheduler(FakeSource("s", [], lambda _: RUNNING), clock)
    for import_id, (due, _) in zip(ids, pushes, strict=True):
        sched._push(import_id, due)
    for gone, (_, removed) in zip(ids, pushes, strict=True):
        if removed:
            sched.remove(gone)
    taken: list[str] = []
    for now in range(51):
        clock.now = float(now)
        while (taken_id := sched._take_due()) is not None:
            assert pushes[int(taken_id)][0] <= now
            taken.append(taken_id)
    kept = [i for i, (_, removed) in zip(ids, pushes, strict=True) if not removed]
    assert sorted(taken, key=int) == kept
    assert [pushes[int(i)][0] for i in taken] == sorted(pushes[int(i)][0] for i in kept)


class NoJitter(random.Random):
    """First polls at once (no start spread)."""

    def uniform(self, a: float, _b: float) -> float:
        return a


async def test_an_import_added_while_every_worker_waits_for_a_later_one_is_polled_at_once() -> None:
    """Workers waiting (with a timeout) for an import due in an hour are woken
    by an import added now: it is polled at once, not after that hour."""
    source = FakeSource("s", ["a"], lambda _: RUNNING)
    state = StateStore()
    state.add_source("s", "fake", 3600.0)
    sched = SourceScheduler(
        source, state, interval=3600.0, concurrency=2, max_backoff=3600.0, rng=NoJitter()
    )
    sched.add(ImportSpec("a"))
    sched.start()
    try:
        await wait_until(lambda: source.polls["a"] == 1, what="the first poll of a")
        await wait_until(lambda: sched._idle_workers == 2, what="both workers waiting")
        source.ids.append("b")
        sched.add(ImportSpec("b"))
        await wait_until(lambda: source.polls["b"] == 1, timeout=2, what="the poll of b")
        assert source.polls["a"] == 1  # not due for an hour
    finally:
        await sched.stop()


async def test_a_round_of_polls_leaves_nothing_for_the_cyclic_gc_to_walk() -> None:
    """What a poll leaves behind until the next write or scrape takes it (the
    import's next due time, its mark as changed or polled) holds no new
    object the cyclic GC tracks: a young collection walks what the polls
    left since the last one, and a tuple a poll made each one 1-3 ms at
    10,000 imports polled as fast as they answer (``bench/scale.py``)."""
    clock = Clock(T0)
    ids = [f"i{n}" for n in range(1000)]
    source = FakeSource("s", ids, lambda _: RUNNING)
    sched = scheduler(source, clock, interval=10.0)
    await run_at(sched, clock, T0 + 10.0)  # the first polls, spread over a second
    assert sum(source.polls.values()) == 1000
    sched.state.take_changes(with_poll_times=True)  # as a write takes them
    sched.state.take_unrendered()  # as a scrape does
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects(generation=0))
        await run_at(sched, clock, T0 + 25.0)  # every import polled again
        left = len(gc.get_objects(generation=0)) - before
    finally:
        gc.enable()
    assert sum(source.polls.values()) == 2000
    assert len(sched.state.take_unrendered()) == 1000  # each marked polled again
    assert left < 100
