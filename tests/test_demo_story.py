"""The demo's simulator: its story is short, and it knows ids the demo does not
watch, which move once someone asks about them (the README's registration example)."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from exporter.config.loader import parse_config_text
from exporter.demo import DEMO_INTERVAL, demo_config
from exporter.simulator import DEMO_CREDENTIALS, Simulator, create_app
from exporter.simulator.scenarios import DEMO_STORY_SECONDS, demo_scenarios
from exporter.sources.http_json import HttpJsonConfig
from tests.conftest import ROOT


def test_the_story_ends_within_its_first_15_seconds() -> None:
    scenarios = demo_scenarios()
    for scripts in (scenarios.elevate, scenarios.zilliant, scenarios.salesforce_bulk):
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


async def test_benchmark_ids_change_at_every_second_or_at_random(aiohttp_client: Any) -> None:
    """churn-* (bench/polling.py) changes with the second; coin-* (bench/scale.py)
    at random on each answer, whatever the pace of the polls."""
    now = [0.0]
    client = await aiohttp_client(create_app(Simulator(speed=1.0, clock=lambda: now[0])))
    headers = {"Api-Key": DEMO_CREDENTIALS.elevate_api_key}

    async def status(import_id: str) -> str:
        response = await client.get(
            "/api/admin/v4/import/status", params={"id": import_id}, headers=headers
        )
        return str((await response.json())["status"])

    churned = {await status("churn-1") for _ in range(5)}
    now[0] = 1.0
    assert len(churned) == 1
    assert await status("churn-1") not in churned
    coins = [await status("coin-1") for _ in range(64)]  # all in one second
    assert set(coins) == {"IN_PROGRESS", "WAITING"}


def test_the_demo_runs_the_salesforce_recipe_as_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's http_json source is examples/recipes/salesforce-bulk-ingest.yaml
    with the simulator's URLs and credentials, at the demo's pace."""
    base_url = "http://127.0.0.1:9"
    monkeypatch.setenv("SALESFORCE_INSTANCE_URL", base_url)
    monkeypatch.setenv("SALESFORCE_TOKEN_URL", f"{base_url}/services/oauth2/token")
    monkeypatch.setenv("SALESFORCE_CLIENT_ID", DEMO_CREDENTIALS.client_id)
    monkeypatch.setenv("SALESFORCE_CLIENT_SECRET", DEMO_CREDENTIALS.client_secret)
    monkeypatch.delenv("SALESFORCE_API_VERSION", raising=False)
    text = (ROOT / "examples" / "recipes" / "salesforce-bulk-ingest.yaml").read_text()
    pasted = "sources:\n  -\n" + textwrap.indent(text, "    ")
    (recipe,) = parse_config_text(pasted, "recipe", expand_env=True).sources
    (demo,) = [s for s in demo_config(base_url).sources if s.name == "salesforce-bulk-demo"]
    assert isinstance(recipe, HttpJsonConfig)
    assert isinstance(demo, HttpJsonConfig)
    assert recipe.discovery is not None
    assert demo.discovery is not None
    paced = recipe.model_copy(
        update={
            "name": demo.name,
            "interval": demo.interval,
            "timeout": demo.timeout,
            "discovery": recipe.discovery.model_copy(update={"interval": demo.discovery.interval}),
        }
    )
    assert paced == demo
