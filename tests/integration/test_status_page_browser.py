"""The status page in a real headless Chromium (Debian's, driven by Playwright)
against the demo simulator: what an operator sees and clicks."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from exporter.demo import start_demo_simulator
from exporter.pages import (
    state_label,
)
from exporter.runtime import Exporter
from exporter.simulator import Phase, Simulator, scenarios
from exporter.state import StateStore
from tests.conftest import wait_until

if TYPE_CHECKING:
    from playwright.async_api import Locator


ROOT = Path(__file__).resolve().parents[2]


# --- in a real browser ---------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SPEED = 20.0
ARTIFACTS = ROOT / "test-artifacts"
FAILED_REASON = "Validation failed: 12 products reference unknown category 'shoes-xl'"
PWNED_REASON = "<script>window.__pwned=1</script>"
PWNED_NAME = "<img src=x onerror=window.__pwned=2> <b>bold</b>"


@pytest.fixture
def simulator() -> Simulator:
    """The demo's upstreams; a test may add scripted imports while they run."""
    return Simulator(speed=SPEED)


@pytest.fixture
async def demo_exporter(simulator: Simulator) -> AsyncIterator[Exporter]:
    async with start_demo_simulator(SPEED, simulator) as config:
        running = Exporter(config, "127.0.0.1:0")
        await running.start()
        try:
            yield running
        finally:
            await running.stop()


def label(state: StateStore, source: str, import_id: str) -> str | None:
    record = state.imports.get((source, import_id))
    return None if record is None else state_label(record)


async def test_status_page_in_chromium(demo_exporter: Exporter, simulator: Simulator) -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} missing: run scripts/setup --test")
    from playwright.async_api import async_playwright

    state = demo_exporter.state

    def settled() -> bool:
        chat = state.imports_of("rocketchat-demo")
        return (
            label(state, "elevate-demo", "1001") == "succeeded"
            and label(state, "elevate-demo", "1002") == "failed"
            and label(state, "elevate-demo", "1005") == "aborted"
            and bool(chat)
            and chat[0].observation is not None
            and (chat[0].observation.items_completed or 0) > 0
        )

    await wait_until(settled, timeout=30)
    base = f"http://127.0.0.1:{demo_exporter.port}/"
    started = time.monotonic()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            chat_progress = page.locator('tr[data-source="rocketchat-demo"] .progress .num')

            # 1. It reloads itself, keeping the filter: Rocket.Chat's count moves on.
            await page.goto(f"{base}?source=rocketchat-demo&refresh=1")
            first = await chat_progress.inner_text()
            await page.evaluate("window.__loaded_first = true")
            await page.wait_for_function(
                """(before) => window.__loaded_first === undefined
                && document.querySelector('tr[data-source="rocketchat-demo"] .progress .num')
                    ?.textContent !== before""",
                arg=first,
                timeout=15_000,
            )
            assert "source=rocketchat-demo" in page.url
            assert "refresh=1" in page.url
            assert await page.locator("tr[data-import]").count() == 1

            # 2. Every scripted import with its badge, reason and progress.
            await page.goto(base)
            assert await page.locator("meta[http-equiv=refresh]").get_attribute("content") == (
                "10; url=./"
            )

            def row(source: str, import_id: str) -> Locator:
                return page.locator(f'tr[data-source="{source}"][data-import="{import_id}"]')

            expected = {
                ("elevate-demo", "1001"): "succeeded",
                ("elevate-demo", "1002"): "failed",
                ("elevate-demo", "1003"): "blocked",
                ("elevate-demo", "1004"): "running",
                ("elevate-demo", "1005"): "aborted",
                ("zilliant-demo", "2587c81c-bs9fc-4873-ae2f-421b292d2c2b"): "failed",
            }
            for (source, import_id), badge in expected.items():
                assert await row(source, import_id).locator(".badge").inner_text() == badge
            failed = row("elevate-demo", "1002")
            assert FAILED_REASON in await failed.inner_text()
            assert "price feed" in await failed.inner_text()
            assert "FAILURE" in await failed.locator(".upstream").inner_text()
            colours = {
                await row("elevate-demo", i)
                .locator(".badge")
                .evaluate("el => getComputedStyle(el).backgroundColor")
                for i in ("1001", "1002", "1003", "1004")
            }
            assert len(colours) == 4  # succeeded, failed, blocked, running look different
            bar = page.locator('tr[data-source="rocketchat-demo"] progress')
            done, total = await bar.get_attribute("value"), await bar.get_attribute("max")
            assert total == "5000"
            assert done is not None
            assert 0 < int(done) <= 5000
            text = await chat_progress.inner_text()
            assert re.fullmatch(r"\d+ / 5000", text), text
            for source in ("elevate-demo", "zilliant-demo", "rocketchat-demo"):
                status = page.locator(f'table.sources tr[data-source="{source}"] .badge')
                assert await status.inner_text() == "up"
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=ARTIFACTS / "status-page.png", full_page=True)

            # 3. Filtering: with the inline script a choice submits itself ...
            await page.select_option("select[name=source]", "elevate-demo")
            await page.wait_for_url(f"{base}?source=elevate-demo&state=")
            await page.select_option("select[name=state]", "failed")
            await page.wait_for_url(f"{base}?source=elevate-demo&state=failed")
            assert await page.locator("tr[data-import]").count() == 1
            assert await row("elevate-demo", "1002").count() == 1

            # ... and without JavaScript the button does it.
            context = await browser.new_context(java_script_enabled=False)
            plain = await context.new_page()
            await plain.goto(base)
            await plain.select_option("select[name=source]", "zilliant-demo")
            await plain.select_option("select[name=state]", "running")
            await plain.click("button[type=submit]")
            await plain.wait_for_url(f"{base}?source=zilliant-demo&state=running")
            shown = plain.locator("tr[data-import]")
            assert await shown.count() == 1
            assert await shown.get_attribute("data-import") == (
                "7c9e6679-7425-40de-944b-e07fc1f69e29"
            )
            await context.close()

            # 4. Upstream text is text, even when it is markup: the upstream
            # answers with a script as the failure reason, and the import was
            # registered with markup as its name.
            simulator.add_elevate_import(
                "666", scenarios.elevate(Phase(0, "FAILURE", PWNED_REASON))
            )
            await demo_exporter.register("elevate-demo", "666", PWNED_NAME)
            await wait_until(lambda: label(state, "elevate-demo", "666") == "failed", timeout=10)
            await page.goto(f"{base}?source=elevate-demo&state=failed")
            hostile = row("elevate-demo", "666")
            assert await hostile.locator(".reason").inner_text() == PWNED_REASON
            assert await hostile.locator(".name").inner_text() == PWNED_NAME
            assert await page.evaluate("typeof window.__pwned") == "undefined"
            assert await page.locator("img, b, script").count() == 0
        finally:
            await browser.close()
    print(f"chromium part took {time.monotonic() - started:.1f}s")
