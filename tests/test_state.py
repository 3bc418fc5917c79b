"""The state: what an answer, a failure, a source-wide failure, parking and
retention do to the records, as the readers then see them."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from exporter.model import ErrorReason, Observation, Origin, SourceError, State
from exporter.state import ImportRecord, StateStore, milliseconds
from tests.conftest import Clock


def world(clock: Clock) -> StateStore:
    state = StateStore(clock=clock)
    state.add_source("shop", "elevate", 30.0)
    state.track("shop", "1001", name="catalogue")
    state.track("shop", "1002", origin=Origin.API)
    return state


def test_times_follow_what_the_answers_say(clock: Clock) -> None:
    state = world(clock)
    record = state.imports[("shop", "1001")]
    state.record_observation("shop", "1001", Observation(State.WAITING, "WAITING"))
    assert (record.first_seen, record.state_since, record.last_progress) == (clock.now,) * 3
    clock.now += 30
    state.record_observation("shop", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    assert record.state_since == clock.now
    assert record.seen_running_at == clock.now
    started = clock.now
    clock.now += 30
    state.record_observation("shop", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    assert record.last_progress == started  # nothing moved
    assert record.duration(clock.now) == 30
    clock.now += 30
    state.record_observation("shop", "1001", Observation(State.SUCCEEDED, "SUCCESS"))
    assert not record.confirmed_final  # seen once: polled again to confirm
    state.record_observation("shop", "1001", Observation(State.SUCCEEDED, "SUCCESS"))
    assert record.confirmed_final
    assert record.end_timestamp == clock.now
    assert record.duration(clock.now + 999) == 60


def test_a_running_duration_is_to_the_millisecond(clock: Clock) -> None:
    """It moves with the clock, so ``/metrics`` makes it at each scrape: to
    the millisecond, without a float difference's noise past it."""
    state = world(clock)
    clock.now = 1_700_000_000.0004
    started = clock.now - 12.3456
    running = Observation(State.RUNNING, "IN_PROGRESS", started_at=started)
    state.record_observation("shop", "1001", running)
    record = state.imports[("shop", "1001")]
    assert clock.now - started != 12.345
    assert record.duration(clock.now) == 12.345
    assert record.duration(started - 5) == 0  # a clock behind the upstream's
    nonsense = Observation(State.RUNNING, "IN_PROGRESS", started_at=math.nan)
    state.record_observation("shop", "1001", nonsense)  # no source lets one through
    assert record.duration(clock.now) == milliseconds(clock.now) / 1000  # and no crash


def test_failures_count_in_a_row_and_an_answer_resets_them(clock: Clock) -> None:
    state = world(clock)
    error = SourceError(ErrorReason.SERVER_ERROR, "HTTP 500")
    for _ in range(3):
        state.record_error("shop", "1001", error)
    record = state.imports[("shop", "1001")]
    assert record.consecutive_failures == 3
    assert record.poll_failing
    assert state.sources["shop"].errors_total[ErrorReason.SERVER_ERROR] == 3
    state.record_observation("shop", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    assert record.consecutive_failures == 0
    assert not record.poll_failing
    assert record.last_error == "HTTP 500"  # kept as history


def test_a_source_wide_failure_counts_once_and_shows_on_every_import(clock: Clock) -> None:
    state = world(clock)
    state.record_observation("shop", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    assert state.sources["shop"].up
    refused = SourceError(ErrorReason.UNAUTHORIZED, "HTTP 403", source_wide=True)
    state.record_source_error("shop", refused, ["1001", "1002"])
    assert state.sources["shop"].up is False
    assert state.sources["shop"].errors_total[ErrorReason.UNAUTHORIZED] == 1
    for import_id in ("1001", "1002"):
        assert state.imports[("shop", import_id)].last_error_reason is ErrorReason.UNAUTHORIZED


def test_parking_keeps_registered_imports_and_forgets_configured_ones(clock: Clock) -> None:
    state = world(clock)
    parked, forgotten = state.park("shop")
    assert [r.import_id for r in parked] == ["1002"]
    assert [r.import_id for r in forgotten] == ["1001"]
    assert not state.imports
    assert ("shop", "1002") in state.parked
    back = state.unpark("shop", lambda record: record.system == "elevate")
    assert [r.import_id for r in back] == ["1002"]
    assert ("shop", "1002") in state.imports


def test_retention_forgets_registered_imports_that_ended_long_ago(clock: Clock) -> None:
    state = world(clock)
    for import_id in ("1001", "1002"):
        for _ in range(2):
            state.record_observation("shop", import_id, Observation(State.FAILED, "FAILURE"))
    assert state.expired(retention=60) == []
    clock.now += 61
    # The configured one stays while the file lists it.
    assert [r.import_id for r in state.expired(retention=60)] == ["1002"]


def test_changes_are_taken_once_and_given_back_when_a_write_fails(clock: Clock) -> None:
    state = world(clock)
    changed, forgotten = state.take_changes()
    assert {r.import_id for r in changed} == {"1001", "1002"}
    assert forgotten == []
    assert state.take_changes() == ([], [])
    state.untrack("shop", "1002")
    changed, forgotten = state.take_changes()
    assert forgotten == [("shop", "1002")]
    state.requeue(changed, forgotten)
    assert state.take_changes()[1] == [("shop", "1002")]


RUNNING = Observation(State.RUNNING, "IN_PROGRESS")


def answered_and_written(clock: Clock, count: int) -> tuple[StateStore, list[str]]:
    """``count`` imports that answered running once, that answer taken (written)."""
    state = StateStore(clock)
    state.add_source("shop", "elevate", 30.0)
    ids = [f"{n:03d}" for n in range(count)]
    for import_id in ids:
        state.track("shop", import_id)
        state.record_observation("shop", import_id, RUNNING)
    state.take_changes()
    return state, ids


def test_newer_poll_times_alone_are_taken_a_share_at_a_time_longest_waiting_first(
    clock: Clock,
) -> None:
    """Imports whose only news is a newer poll time are written a share per
    write, not all every 30th (a burst of every import); one that changes
    meanwhile is written with its change and waits no longer."""
    state, ids = answered_and_written(clock, 100)
    for import_id in reversed(ids):  # the same answers again: poll times only
        state.record_observation("shop", import_id, RUNNING)
    state.record_observation("shop", ids[99], Observation(State.FAILED, "FAILURE"))

    keys, _ = state.take_change_keys(poll_times=0.1)
    expected = ["099", "098", "097", "096", "095", "094", "093", "092", "091", "090", "089"]
    assert list(keys) == sorted(("shop", import_id) for import_id in expected)
    keys, _ = state.take_change_keys()  # poll times wait
    assert list(keys) == []
    taken: list[tuple[str, str]] = []
    for _ in range(30):  # a write a second
        clock.now += 1
        keys, _ = state.take_change_keys(poll_times=1 / 30, due=clock.now - 30)
        taken += keys
        for import_id in ids[:10]:  # polled again meanwhile: still waiting since the first
            state.record_observation("shop", import_id, RUNNING)
    assert sorted(taken) == [("shop", import_id) for import_id in ids[:89]]  # each within 30
    # Polled again after the last write: waiting for a later one.
    assert list(state.take_change_keys(poll_times=1.0)[0]) == [("shop", i) for i in ids[:10]]


def test_poll_times_given_back_after_a_failed_write_wait_as_poll_times(clock: Clock) -> None:
    """A write that fails (the store is down) gives its keys back: imports
    whose only news was a newer poll time wait again as such, longest
    waiting first, rather than all coming back as changes (one write of
    every one of them when the store is back); a change stays a change."""
    state, ids = answered_and_written(clock, 60)
    for import_id in ids:  # poll times only, oldest first
        clock.now += 1
        state.record_observation("shop", import_id, RUNNING)
    state.record_observation("shop", ids[0], Observation(State.FAILED, "FAILURE"))
    keys, forgotten = state.take_change_keys(poll_times=1 / 2)
    taken = list(keys)
    assert taken == [("shop", import_id) for import_id in ids[:31]]  # the change and 30
    clock.now += 1
    state.record_observation("shop", ids[59], RUNNING)  # polled again meanwhile

    state.requeue_keys(iter(taken), forgotten)

    keys, _ = state.take_change_keys()
    assert list(keys) == [("shop", ids[0])]  # the change only
    keys, _ = state.take_change_keys(poll_times=1 / 59)
    assert list(keys) == [("shop", ids[1])]  # still the longest waiting
    keys, _ = state.take_change_keys(poll_times=1.0)
    assert list(keys) == [("shop", import_id) for import_id in ids[2:]]


def running_imports(clock: Clock, rng: random.Random, count: int) -> tuple[StateStore, list[str]]:
    """A state of ``count`` running imports of one source, their ids
    numbers in no order."""
    state = StateStore(clock)
    state.add_source("shop", "elevate", 30.0)
    ids = [f"{n:04d}" for n in rng.sample(range(10_000), count)]
    for import_id in ids:
        state.track("shop", import_id)
        state.record_observation("shop", import_id, Observation(State.RUNNING, "IN_PROGRESS"))
    return state, ids


@pytest.mark.parametrize("changing", [3, 300], ids=["a few sorted", "many picked in order"])
def test_changes_are_taken_in_key_order_for_the_store(clock: Clock, changing: int) -> None:
    """The store keeps rows in key order; a write in that order touches each
    page once. Imports whose only news is a newer poll are in the order too."""
    state, ids = running_imports(clock, random.Random(1), 400)
    running = Observation(State.RUNNING, "IN_PROGRESS")
    state.take_changes(with_poll_times=True)
    shuffled = random.Random(2).sample(ids, len(ids))
    changed, repolled = shuffled[:changing], shuffled[changing : changing + 20]
    for import_id in changed:
        state.record_observation("shop", import_id, Observation(State.FAILED, "FAILURE"))
    for import_id in repolled:
        state.record_observation("shop", import_id, running)
    keys, _ = state.take_change_keys(poll_times=1.0)
    assert list(keys) == sorted(("shop", import_id) for import_id in changed + repolled)


def test_imports_to_render_again_come_in_the_order_their_polls_answered(clock: Clock) -> None:
    """``/metrics`` keeps imports polled together side by side: it takes
    them in the order of their polls, not of their ids, each marked changed
    if any of its news since the last take changed its lines (else only
    polled again); what a cancelled render gives back comes first."""
    state, ids = running_imports(clock, random.Random(3), 50)
    running = Observation(State.RUNNING, "IN_PROGRESS")
    state.take_unrendered()
    polls = random.Random(4).sample(ids, len(ids))
    for n, import_id in enumerate(polls):
        clock.now += 1
        answer = Observation(State.FAILED, "FAILURE") if n % 3 == 0 else running
        state.record_observation("shop", import_id, answer)
    clock.now += 1
    state.record_observation("shop", polls[1], Observation(State.SUCCEEDED, "SUCCESS"))
    state.record_observation("shop", polls[0], Observation(State.FAILED, "FAILURE"))
    taken = state.take_unrendered()
    assert list(taken) == [("shop", import_id) for import_id in polls]
    changed = {n for n in range(len(polls)) if n % 3 == 0} | {1}
    assert [n for n, is_changed in enumerate(taken.values()) if is_changed] == sorted(changed)
    clock.now += 1
    state.record_observation("shop", polls[5], running)  # polled again meanwhile
    state.record_observation("shop", polls[3], Observation(State.FAILED, "FAILURE"))  # same again
    state.record_observation("shop", polls[4], Observation(State.FAILED, "FAILURE"))  # changed
    state.put_back_unrendered({key: taken[key] for key in list(taken)[3:]})
    again = state.take_unrendered()
    assert list(again) == [("shop", import_id) for import_id in polls[3:]]
    assert again[("shop", polls[5])] is False
    assert again[("shop", polls[3])] is True
    assert again[("shop", polls[4])] is True


def test_ready_once_every_import_was_polled_by_this_process(clock: Clock) -> None:
    state = world(clock)
    assert not state.ready()
    state.record_observation("shop", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    assert not state.ready()
    state.record_error("shop", "1002", SourceError(ErrorReason.TIMEOUT, "slow"))
    assert state.ready()  # polled, even if it failed


def test_ready_follows_imports_added_parked_and_brought_back(clock: Clock) -> None:
    state = world(clock)
    for import_id in ("1001", "1002"):
        state.record_observation("shop", import_id, Observation(State.RUNNING, "IN_PROGRESS"))
    assert state.ready()
    state.track("shop", "1003", origin=Origin.API)
    assert not state.ready()  # a new registration waits for its first poll
    state.untrack("shop", "1003")
    assert state.ready()
    state.park("shop")
    assert state.ready()  # nothing tracked
    state.unpark("shop", lambda _record: True)
    assert not state.ready()  # back, but not polled since it came back
    state.record_observation("shop", "1002", Observation(State.RUNNING, "IN_PROGRESS"))
    assert state.ready()


def test_retention_scan_in_slices_covers_every_import(clock: Clock) -> None:
    state = world(clock)
    for import_id in ("1003", "1004", "1005"):
        state.track("shop", import_id, origin=Origin.API)
    for import_id in ("1002", "1004"):
        for _ in range(2):
            state.record_observation("shop", import_id, Observation(State.FAILED, "FAILURE"))
    clock.now += 61
    found = []
    for _ in range(3):  # five imports, two at a time: every one seen within three scans
        found += [r.import_id for r in state.expired(retention=60, at_most=2)]
    assert sorted(found) == ["1002", "1004"]
    assert [r.import_id for r in state.expired(retention=60, at_most=2)] == ["1002"]  # again


def test_the_exporter_reads_its_clock_to_the_millisecond() -> None:
    """A Prometheus timestamp holds milliseconds: the times the exporter
    exports are whole milliseconds of the wall clock, written short."""
    state = StateStore()
    state.add_source("shop", "elevate", 60.0)
    state.track("shop", "1001")
    before = time.time()
    record = state.record_observation("shop", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    after = time.time()
    assert record.last_attempt is not None
    assert before - 0.001 <= record.last_attempt <= after
    assert round(record.last_attempt, 3) == record.last_attempt
    assert len(repr(record.last_attempt).partition(".")[2]) <= 3


STEPS: list[Observation | str | None] = [
    Observation(State.WAITING, "WAITING"),
    Observation(State.RUNNING, "IN_PROGRESS"),
    Observation(State.RUNNING, "IN_PROGRESS", step="load"),
    Observation(State.SUCCEEDED, "SUCCESS"),
    Observation(State.FAILED, "FAILURE", reason="bad row"),
    None,  # the poll failed
    "source",  # the source failed as a whole
]


def count_short_ways(state: StateStore) -> Callable[[], int]:
    """Count the answers that take the state's short way (the same answer
    again); the count so far is what the returned function says."""
    taken = 0
    polled_again = state._polled_again

    def counted(*args: Any) -> ImportRecord:
        nonlocal taken
        taken += 1
        return polled_again(*args)

    state._polled_again = counted  # type: ignore[method-assign,assignment]
    return lambda: taken


@pytest.mark.parametrize("seed", range(40))
def test_the_same_answer_again_ends_as_an_equal_answer_does(clock: Clock, seed: int) -> None:
    """A poll whose answer is the very object the last one had (a shared
    known answer: most polls) takes a shorter way through the state; it
    must leave each record, and what is marked for the store and the
    renderer, as an equal but new answer does (the long way)."""
    rng = random.Random(seed)
    same, fresh = world(clock), world(clock)
    restored = same.imports[("shop", "1001")]
    running = Observation(State.RUNNING, "IN_PROGRESS")
    restored.observation = running  # as a store gives back
    restored.seen_running_at = clock.now - 5
    fresh.imports[("shop", "1001")].observation = running._replace()
    fresh.imports[("shop", "1001")].seen_running_at = clock.now - 5
    error = SourceError(ErrorReason.TIMEOUT, "no answer within 10s")
    short_ways = count_short_ways(same)
    for _ in range(60):
        clock.now += rng.choice([0.0, 0.5, 30.0])
        import_id = rng.choice(["1001", "1002"])
        step: Observation | str | None = (
            STEPS[rng.randrange(len(STEPS))] if rng.random() < 0.4 else None
        )
        if step is None and rng.random() < 0.8:
            step = same.imports[("shop", import_id)].observation or STEPS[0]
        for state, answer in ((same, step), (fresh, step)):
            if answer is None:
                state.record_error("shop", import_id, error)
            elif answer == "source":
                state.record_source_error("shop", error, [import_id])
            else:
                assert isinstance(answer, Observation)
                state.record_observation(
                    "shop", import_id, answer if state is same else answer._replace()
                )
        for key, record in same.imports.items():
            assert record == fresh.imports[key]
        assert same.sources["shop"] == fresh.sources["shop"]
        assert same.take_unrendered() == fresh.take_unrendered()
        keys, _ = same.take_change_keys(poll_times=1.0)
        fresh_keys, _ = fresh.take_change_keys(poll_times=1.0)
        assert list(keys) == list(fresh_keys)
    assert short_ways() > 5


def test_a_restored_import_takes_the_shared_answer_without_a_change_to_store(
    clock: Clock,
) -> None:
    """A record the store gave back holds an answer equal to the source's
    shared one but not the same object: after its first poll it holds the
    shared one, so later polls of the same answer take the short way, and
    an answer equal to the stored one is no change for the store."""
    before = world(clock)
    before.record_observation("shop", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    stored = before.imports[("shop", "1001")]
    stored.observation = Observation(State.RUNNING, "IN_PROGRESS")  # as a store gives back
    stored.polled_this_run = False
    after = StateStore(clock=clock)
    after.restore([stored])
    after.add_source("shop", "elevate", 30.0)
    after.take_change_keys()
    short_ways = count_short_ways(after)
    shared = Observation(State.RUNNING, "IN_PROGRESS")  # what the source answers every time
    for _ in range(3):
        clock.now += 30
        record = after.record_observation("shop", "1001", shared)
    assert record.observation is shared
    assert short_ways() == 2
    keys, _ = after.take_change_keys()
    assert list(keys) == []
