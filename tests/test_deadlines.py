"""A source's request timeouts, kept by one timer per source (sources/deadlines.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.model import ErrorReason, SourceError
from exporter.sources.base import HttpResponse, http_request
from exporter.sources.deadlines import Deadlines
from tests.conftest import wait_until

ServerFactory = Callable[..., Awaitable[TestServer]]


class Upstream:
    """``/quick`` answers at once; ``/hang`` never answers."""

    def __init__(self) -> None:
        self.url = ""
        self.hanging = 0
        self._never = asyncio.Event()

    async def quick(self, _: web.Request) -> web.Response:
        return web.Response(text="{}")

    async def hang(self, _: web.Request) -> web.Response:
        self.hanging += 1
        await self._never.wait()
        return web.Response()


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> Upstream:
    fake = Upstream()
    app = web.Application()
    app.add_routes([web.get("/quick", fake.quick), web.get("/hang", fake.hang)])
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def get(
    session: aiohttp.ClientSession, url: str, deadlines: Deadlines
) -> Coroutine[Any, Any, HttpResponse]:
    return http_request(
        session, "GET", url, timeout=deadlines.timeout, max_bytes=1024, deadlines=deadlines
    )


async def test_a_request_past_its_time_fails_as_a_timeout_and_its_task_goes_on(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    deadlines = Deadlines(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SourceError) as caught:
        await get(session, f"{upstream.url}/hang", deadlines)
    assert caught.value.reason is ErrorReason.TIMEOUT
    assert caught.value.message == "no complete answer within 0.2s"
    assert loop.time() - started >= 0.2
    # The cancellation that cut it off is withdrawn: the poller's task works on.
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0)
    answer = await get(session, f"{upstream.url}/quick", deadlines)
    assert answer.status == 200


async def test_only_the_requests_past_their_time_are_cut_off(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    deadlines = Deadlines(0.3)

    async def one(path: str) -> str:
        try:
            answer = await get(session, f"{upstream.url}/{path}", deadlines)
        except SourceError as error:
            return error.reason.value
        return str(answer.status)

    paths = ["hang", "quick"] * 3 + ["quick"] * 20
    outcomes = await asyncio.gather(*(one(path) for path in paths))
    assert [o for p, o in zip(paths, outcomes, strict=True) if p == "hang"] == ["timeout"] * 3
    assert {o for p, o in zip(paths, outcomes, strict=True) if p == "quick"} == {"200"}


async def test_quick_requests_one_after_another_need_no_timer_each(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """The point of it: one timer for all of a source's requests, not one
    pushed on the event loop's heap and cancelled for each."""
    deadlines = Deadlines(30.0)
    loop = asyncio.get_running_loop()
    with mock.patch.object(loop, "call_at", wraps=loop.call_at) as call_at:
        for _ in range(50):
            await get(session, f"{upstream.url}/quick", deadlines)
    owners = [type(getattr(call.args[1], "__self__", None)) for call in call_at.call_args_list]
    assert owners.count(Deadlines) == 1
    assert not [owner for owner in owners if owner.__name__ == "TimeoutHandle"]  # aiohttp's


async def test_a_cancellation_from_outside_is_not_taken_for_a_timeout(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """A reload or a shutdown cancels a poller's task: it must stop, not
    record a timeout and go on polling."""
    deadlines = Deadlines(30.0)
    task = asyncio.create_task(get(session, f"{upstream.url}/hang", deadlines))
    await wait_until(lambda: upstream.hanging == 1, what="the request to arrive")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def request_without_answer(
    deadlines: Deadlines, *, losing_a_cancellation: bool = False
) -> bool:
    """A request whose answer never comes, timed by ``deadlines`` as
    :func:`http_request` times one: True once it timed out; a cancellation
    from outside goes on up. ``losing_a_cancellation``: the first
    cancellation is swallowed on the way."""
    deadline = deadlines.start()
    assert deadline is not None
    try:
        if losing_a_cancellation:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        if deadline.finish():
            return True
        raise
    finally:
        deadline.finish()
    return False


async def test_a_cancellation_that_meets_the_deadline_is_still_a_cancellation() -> None:
    """The deadline passes and the task is cancelled from outside in the same
    turn of the loop: both requests count, so the task stops."""
    task = asyncio.create_task(request_without_answer(Deadlines(0.0)))
    await asyncio.sleep(0)  # the task waits; the deadline's timer is due
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_swallowed_on_the_way_is_made_again() -> None:
    """A cancellation can be lost inside the request (aiohappyeyeballs
    cancels and awaits its losing connection attempts): the request must
    still end, as a timeout, not run on without a limit."""
    async with asyncio.timeout(5):
        task = asyncio.create_task(
            request_without_answer(Deadlines(0.05), losing_a_cancellation=True)
        )
        assert await task
    assert task.cancelling() == 0


def test_a_source_used_from_another_event_loop_still_times_out() -> None:
    deadlines = Deadlines(0.05)

    async def quick() -> None:
        deadline = deadlines.start()
        assert deadline is not None
        deadline.finish()  # done at once: the timer is left pending

    asyncio.run(quick())

    async def on_a_new_loop() -> bool:
        async with asyncio.timeout(5):
            return await request_without_answer(deadlines)

    assert asyncio.run(on_a_new_loop())
