"""What keeps clients without credentials from starving the exporter:
the open file limit, a header-read timeout, --web.max-requests, and logs
that cannot flood."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from exporter.logs import RateLimitedLog
from exporter.state import StateStore
from exporter.web import (
    PACE_FACTOR,
    PACE_MAX_SECONDS,
    ScrapePacing,
    create_web_app,
    metrics_handler,
)
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def soft_nofile_of(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open files line")


async def test_the_process_raises_its_file_limit_and_drops_silent_connections(
    tmp_path: Path,
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard open file limit is too low to show a raise")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}",
        "--web.read-header-timeout", "0.5", "--web.max-requests", "5",
        cwd=tmp_path, preexec_fn=low_soft_limit,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    errors = asyncio.ensure_future(process.stderr.read())
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                assert process.returncode is None, (await errors).decode()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/-/healthy") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
        soft, hard_seen = soft_nofile_of(process.pid)
        assert soft == hard_seen != "256"

        # Half a request, then nothing: the exporter hangs up.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
        # A connection that sends nothing at all is closed too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        with contextlib.suppress(Exception):
            await errors
    assert process.returncode == 0
    assert "raised the open file limit from 256" in (await errors).decode()


class Blocking(Collector):
    """A collector whose render waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def collect(self) -> list[GaugeMetricFamily]:
        self.started.release()
        self.release.wait(30)
        return [GaugeMetricFamily("slow", "a slow metric", value=1)]


async def test_max_requests_answers_503_beyond_the_cap_but_not_to_health_checks() -> None:
    registry = CollectorRegistry()
    blocking = Blocking()
    registry.register(blocking)
    app = create_web_app(StateStore(), registry, max_requests=2)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:

            async def get(path: str, accept: str = "text/plain") -> int:
                async with session.get(base + path, headers={"Accept": accept}) as response:
                    await response.read()
                    return response.status

            # Two scrapes of different formats do not share a render: both wait.
            first = asyncio.ensure_future(get("/metrics"))
            openmetrics = "application/openmetrics-text; version=1.0.0"
            second = asyncio.ensure_future(get("/metrics", accept=openmetrics))
            loop = asyncio.get_running_loop()
            for _ in range(2):
                assert await loop.run_in_executor(None, blocking.started.acquire, True, 10)
            assert await get("/metrics") == 503
            assert await get("/") == 503
            assert await get("/-/healthy") == 200
            assert await get("/-/ready") == 200
            blocking.release.set()
            assert list(await asyncio.wait_for(asyncio.gather(first, second), 30)) == [200, 200]
            assert await get("/") == 200  # the slots are free again
    finally:
        blocking.release.set()
        await runner.cleanup()


def test_a_repeated_error_is_logged_a_few_times_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    logger = logging.getLogger("test.flood")
    quiet = RateLimitedLog(logger, interval=60, burst=3, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="test.flood"):
        for n in range(10_000):
            quiet.log(logging.ERROR, "accept", "accept failed: %s", f"EMFILE {n}")
        quiet.log(logging.ERROR, "store", "cannot store: %s", "disk full")
        assert [r.getMessage() for r in caplog.records] == [
            "accept failed: EMFILE 0",
            "accept failed: EMFILE 1",
            "accept failed: EMFILE 2",
            "cannot store: disk full",
        ]
        caplog.clear()
        now[0] += 61
        quiet.log(logging.ERROR, "accept", "accept failed: %s", "EMFILE again")
        assert [r.getMessage() for r in caplog.records] == [
            "accept failed: EMFILE again (9997 more like this in the last 60s were not logged)"
        ]


def test_the_state_counts_imports_per_source_and_keeps_them_sorted() -> None:
    """What lets a registration check its limit, and the list API find a page,
    without a scan of every import."""
    from exporter.state import ImportRecord

    state = StateStore()
    state.add_source("b", "elevate", 1.0)
    state.add_source("a", "elevate", 1.0)
    for n in (3, 1, 2):
        state.track("b", f"id-{n}")
    state.track("a", "x")
    state.restore([ImportRecord("a", "w", "elevate"), ImportRecord("a", "x", "elevate")])
    assert state.imports.count_of("a") == 2
    assert state.imports.count_of("b") == 3
    assert state.imports.ordered == [
        ("a", "w"),
        ("a", "x"),
        ("b", "id-1"),
        ("b", "id-2"),
        ("b", "id-3"),
    ]
    state.untrack("b", "id-2")
    state.untrack("b", "never-tracked")
    state.remove_source("a")
    assert state.imports.count_of("a") == 0
    assert state.imports.count_of("b") == 2
    assert state.imports.ordered == [("b", "id-1"), ("b", "id-3")] == sorted(state.imports)


async def test_big_reads_take_at_most_their_share_of_the_time() -> None:
    """A client looping on big reads gets them paced: after each slice of work
    the reads thread sleeps (holding no GIL) for the rest of its share."""
    from exporter.reads import SHARE, BulkReads

    def busy(reads: BulkReads) -> float:
        worked = 0.0
        started = time.perf_counter()
        for _ in range(3):
            while time.perf_counter() - started < 0.01:
                pass
            worked += time.perf_counter() - started
            started = reads.pace(started)
        return worked

    began = time.perf_counter()
    worked = await BulkReads().run(busy)
    assert time.perf_counter() - began >= worked / SHARE * 0.99


async def test_accept_errors_of_a_running_exporter_do_not_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio retries accept() every second when out of file descriptors and
    reports each failure: the exporter logs a few, not every one."""
    from exporter.config.loader import parse_config_data
    from exporter.runtime import Exporter

    exporter = Exporter(parse_config_data({"sources": []}, "test"), "127.0.0.1:0")
    await exporter.start()
    loop = asyncio.get_running_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="exporter.runtime"):
            for _ in range(1000):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                    }
                )
        lines = [r for r in caplog.records if "accept() out of system resource" in r.getMessage()]
        assert 1 <= len(lines) <= 5
        assert lines[0].exc_info is not None
        assert "Too many open files" in caplog.text
    finally:
        await exporter.stop()


# --- /metrics pacing ----------------------------------------------------------------

TEXT_KIND = ("text/plain", (), True)


def test_a_slow_render_paces_the_next_of_its_kind_within_a_cap() -> None:
    pacing = ScrapePacing()
    pacing.rendered(TEXT_KIND, 0.005, now=100.0)  # fast: no pacing
    assert pacing.wait(TEXT_KIND, 100.0) == 0.0
    pacing.rendered(TEXT_KIND, 0.1, now=100.0)
    assert pacing.wait(TEXT_KIND, 100.0) == pytest.approx(PACE_FACTOR * 0.1)
    assert pacing.wait(TEXT_KIND, 100.0 + PACE_FACTOR * 0.1) == 0.0
    assert pacing.wait(("text/plain", (), False), 100.0) == 0.0  # another kind
    pacing.rendered(TEXT_KIND, 60.0, now=200.0)
    assert pacing.wait(TEXT_KIND, 200.0) == PACE_MAX_SECONDS


def test_name_filters_a_client_cycles_through_are_not_kept_for_ever() -> None:
    """Each ``name[]`` filter is a kind of its own, and the client chooses
    them: only kinds rendered within the last pace are kept."""
    pacing = ScrapePacing()
    for n in range(10_000):
        pacing.rendered(("text/plain", (f"import_state_{n}",), True), 0.1, now=n * 0.1)
    assert len(pacing) <= PACE_FACTOR + 1


async def test_a_scrape_after_a_slow_render_waits_for_its_pace() -> None:
    registry = CollectorRegistry()
    pacing = ScrapePacing()
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry, None, pacing))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{port}/metrics"
            async with client.get(url) as response:
                assert response.status == 200
            _, content_type = choose_encoder("")
            kind = (content_type, (), True)
            pacing.rendered(kind, 0.1, asyncio.get_running_loop().time())
            started = time.monotonic()
            async with client.get(url) as response:
                assert response.status == 200
            assert time.monotonic() - started >= 0.9 * PACE_FACTOR * 0.1
    finally:
        await runner.cleanup()


@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from(["a", "b", "é", ""]),
            st.sampled_from(["1", "10", "2", "x", "", "Ω"]),
        ),
        max_size=40,
    )
)
def test_the_imports_stay_sorted_and_counted_whatever_the_order(
    steps: list[tuple[bool, str, str]],
) -> None:
    """Keys put in any order (a store's rows come sorted, a config's not)
    and removed again: the sorted list and the counts per source stay right."""
    from exporter.import_index import ImportIndex

    index = ImportIndex()
    for put, source, import_id in steps:
        if put:
            index[(source, import_id)] = None  # type: ignore[assignment]
        else:
            index.pop((source, import_id), None)
        assert index.ordered == sorted(index)
        assert index.per_source == Counter(source for source, _ in index)
