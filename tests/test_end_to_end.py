"""The exporter against the simulator, scraped the way Prometheus scrapes it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.demo import DEMO_API_TOKEN, start_demo_simulator
from exporter.runtime import Exporter
from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
SPEED = 5.0  # the demo story is 15 s long: 3 s at this speed

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def current_state(samples: Samples, source: str, import_id: str) -> str | None:
    for (name, labels), value in samples.items():
        label = dict(labels)
        if (
            name == "import_state"
            and value == 1
            and label["source"] == source
            and label["import"] == import_id
        ):
            return label["state"]
    return None


def value(samples: Samples, metric: str, **labels: str) -> float | None:
    for (name, have), v in samples.items():
        if name == metric and labels.items() <= dict(have).items():
            return v
    return None


@pytest.fixture
async def exporter() -> AsyncIterator[Exporter]:
    async with start_demo_simulator(SPEED) as config:
        running = Exporter(config, "127.0.0.1:0")
        await running.start()
        try:
            yield running
        finally:
            await running.stop()


async def scrape(session: aiohttp.ClientSession, port: int, **headers: str) -> str:
    async with session.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as response:
        assert response.status == 200
        return await response.text()


async def test_scripted_imports_show_their_states_and_counts(exporter: Exporter) -> None:
    latest: Samples = {}
    async with aiohttp.ClientSession() as session:

        async def settled() -> bool:
            nonlocal latest
            latest = parse(await scrape(session, exporter.port))
            return (
                current_state(latest, "elevate-demo", "1001") == "succeeded"
                and current_state(latest, "elevate-demo", "1002") == "failed"
                and current_state(latest, "zilliant-demo", "2587c81c-b9fc-4873-ae2f-421b292d2c2b")
                == "succeeded"
                and (value(latest, "import_items_completed", source="rocketchat-demo") or 0) > 0
                # The Salesforce Bulk API recipe found its jobs and followed them.
                and current_state(latest, "salesforce-bulk-demo", "7505e00000AbCdEAAZ")
                == "succeeded"
                and current_state(latest, "salesforce-bulk-demo", "7505e00000AbCdFAAZ") == "failed"
            )

        async with asyncio.timeout(30):
            while not await settled():
                await asyncio.sleep(0.1)

    assert current_state(latest, "elevate-demo", "1003") == "blocked"
    assert current_state(latest, "elevate-demo", "1004") == "running"
    assert current_state(latest, "elevate-demo", "1005") == "aborted"
    assert (
        current_state(latest, "zilliant-demo", "7c9e6679-7425-40de-944b-e07fc1f69e29") == "running"
    )
    assert (
        current_state(latest, "zilliant-demo", "2587c81c-bs9fc-4873-ae2f-421b292d2c2b") == "failed"
    )
    info = value(
        latest,
        "import_info",
        source="elevate-demo",
        system="elevate",
        upstream_state="FAILURE",
        name="price feed",
    )
    assert info == 1
    # Zilliant reports start/stop dates: the metrics carry the upstream's times.
    zid = "2587c81c-b9fc-4873-ae2f-421b292d2c2b"
    start = value(
        latest, "import_start_timestamp_seconds", source="zilliant-demo", **{"import": zid}
    )
    end = value(latest, "import_end_timestamp_seconds", source="zilliant-demo", **{"import": zid})
    assert start is not None
    assert end is not None
    assert end > start
    assert value(
        latest,
        "import_info",
        source="salesforce-bulk-demo",
        system="salesforce_bulk",
        origin="discovered",
        name="upsert Account",
    )
    assert (
        value(
            latest,
            "import_items_completed",
            source="salesforce-bulk-demo",
            **{"import": "7505e00000AbCdEAAZ"},
        )
        == 4000
    )
    for source, system in [
        ("elevate-demo", "elevate"),
        ("zilliant-demo", "zilliant"),
        ("rocketchat-demo", "rocketchat"),
        ("salesforce-bulk-demo", "salesforce_bulk"),
    ]:
        assert value(latest, "import_source_up", source=source, system=system) == 1
        assert (value(latest, "import_source_requests_total", source=source) or 0) > 0
    expected = value(latest, "import_items_expected", source="rocketchat-demo")
    assert expected is not None
    assert expected > 0


async def test_rocketchat_counts_rise_between_scrapes(exporter: Exporter) -> None:
    async with aiohttp.ClientSession() as session:
        seen: list[float] = []

        async def rose_twice() -> bool:
            done = value(
                parse(await scrape(session, exporter.port)),
                "import_items_completed",
                source="rocketchat-demo",
            )
            if done is not None and (not seen or done > seen[-1]):
                seen.append(done)
            return len(seen) >= 3

        async with asyncio.timeout(30):
            while not await rose_twice():
                await asyncio.sleep(0.1)
    assert seen == sorted(seen)
    assert seen[0] < seen[-1]


async def test_openmetrics_and_gzip_are_served(exporter: Exporter) -> None:
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: exporter.state.ready(), timeout=15)
        async with session.get(
            f"http://127.0.0.1:{exporter.port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await response.text()).rstrip().endswith("# EOF")
        async with session.get(
            f"http://127.0.0.1:{exporter.port}/metrics",
            headers={"Accept-Encoding": "gzip"},
            auto_decompress=False,
        ) as response:
            assert response.headers.get("Content-Encoding") == "gzip"
        async with session.get(f"http://127.0.0.1:{exporter.port}/-/ready") as response:
            assert response.status == 200
        async with session.get(f"http://127.0.0.1:{exporter.port}/") as response:
            page = await response.text()
            assert "price feed" in page
            assert "elevate-demo" in page


async def test_demo_command_serves_lintable_metrics_and_stops_on_sigterm() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        "--demo",
        "--demo.speed",
        str(SPEED),
        "--web.listen-address",
        f"127.0.0.1:{port}",
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        text = ""
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    try:
                        text = await scrape(session, port)
                    except aiohttp.ClientConnectionError:
                        text = ""
                    samples = parse(text) if text else {}
                    systems = {
                        dict(labels)["system"]
                        for (name, labels), _ in samples.items()
                        if name == "import_info"
                    }
                    if systems == {"elevate", "zilliant", "rocketchat", "salesforce_bulk"}:
                        break
                    await asyncio.sleep(0.1)
        promtool = shutil.which("promtool")
        if promtool is not None:
            lint = subprocess.run(
                [promtool, "check", "metrics"], input=text.encode(), capture_output=True
            )
            assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await process.wait()
        assert code == 0
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
        assert "level=info" in log
        assert "shutting down" in log
        if promtool is None:
            pytest.skip("promtool not installed; exposition not linted")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_demo_takes_registrations_with_its_documented_token(exporter: Exporter) -> None:
    base = f"http://127.0.0.1:{exporter.port}"
    body = {"source": "elevate-demo", "id": "4242", "name": "tried by hand"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/api/v1/imports", json=body) as response:
            assert response.status == 401  # no token: refused
        auth = {"Authorization": f"Bearer {DEMO_API_TOKEN}"}
        async with session.post(f"{base}/api/v1/imports", json=body, headers=auth) as response:
            assert response.status == 201
        await wait_until(lambda: exporter.state.imports[("elevate-demo", "4242")].state is not None)
        samples = parse(await scrape(session, exporter.port))
        assert current_state(samples, "elevate-demo", "4242") == "not_found"
