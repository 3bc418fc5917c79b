"""Long jobs on the event loop give it back after each slice of time."""

from __future__ import annotations

import asyncio

from exporter.loop_slices import LOOP_SLICE_SECONDS, LoopSlices


async def test_a_job_yields_once_it_has_held_the_loop_a_slice_whichever_step_it_is_in() -> None:
    now = [0.0]
    slices = LoopSlices(clock=lambda: now[0])
    ran: list[str] = []

    async def other_work() -> None:
        ran.append("other")

    async def step(took: float) -> None:
        """Part of the job: works ``took`` seconds, then may yield."""
        other = asyncio.ensure_future(other_work())  # waits for the loop
        now[0] += took
        await slices.pause()
        ran.append("job")
        await other

    await step(LOOP_SLICE_SECONDS / 2)
    assert ran == ["job", "other"]  # half a slice: the job went on
    ran.clear()
    await step(LOOP_SLICE_SECONDS / 2)  # another step: the two make a slice
    assert ran == ["other", "job"]
    ran.clear()
    await step(LOOP_SLICE_SECONDS / 2)  # a new slice began at the yield
    assert ran == ["job", "other"]


def test_time_spent_waiting_on_something_else_starts_a_new_slice() -> None:
    now = [0.0]
    slices = LoopSlices(clock=lambda: now[0])
    now[0] += 10 * LOOP_SLICE_SECONDS  # awaited a thread; the loop went on
    slices.restart()
    assert not slices.due()
    now[0] += LOOP_SLICE_SECONDS * 1.01
    assert slices.due()
