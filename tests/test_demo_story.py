"""The demo's simulator: its story is short, and it knows ids the demo does not
watch, which move once someone asks about them (the README's registration example)."""

from __future__ import annotations

from typing import Any

from exporter.demo import DEMO_INTERVAL
from exporter.simulator import DEMO_CREDENTIALS, Simulator, create_app
from exporter.simulator.scenarios import DEMO_STORY_SECONDS, demo_scenarios


def test_the_story_ends_within_its_first_15_seconds() -> None:
    scenarios = demo_scenarios()
    for scripts in (scenarios.elevate, scenarios.zilliant):
        for script in scripts.values():
            assert script.phases[-1].at + DEMO_INTERVAL <= DEMO_STORY_SECONDS == 15


async def test_a_walk_in_id_waits_runs_and_ends_from_its_first_poll(aiohttp_client: Any) -> None:
    now = [0.0]
    sim = Simulator(speed=1.0, clock=lambda: now[0])
    client = await aiohttp_client(create_app(sim))
    headers = {"Api-Key": DEMO_CREDENTIALS.elevate_api_key}

    async def status(import_id: str) -> tuple[str, str | None]:
        response = await client.get(
            "/api/admin/v4/import/status", params={"id": import_id}, headers=headers
        )
        body = await response.json()
        return body["status"], body["reason"]

    now[0] = 500.0  # long after the demo's story: the walk-in starts when first asked
    assert await status("5001") == ("WAITING", None)
    assert await status("5002") == ("WAITING", None)
    now[0] = 515.0
    assert (await status("5001"))[0] == "IN_PROGRESS"
    now[0] = 531.0
    assert await status("5001") == ("SUCCESS", None)
    assert (await status("5002"))[0] == "FAILURE"
    assert await status("5003") == ("NOT_FOUND", None)
    assert "5001" not in demo_scenarios().elevate  # the demo config does not watch it
