"""The shipped recipes (examples/recipes/), each file as it is, pasted under
``sources:`` and expanded with ``--config.expand-env``, against the simulator
of its API: states, counts, times, not found, token refresh, refused
credentials and throttling."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from exporter.config import ConfigError
from exporter.config.loader import parse_config_text
from exporter.model import ErrorReason, SourceError, State
from exporter.simulator.app import DEMO_CREDENTIALS, Simulator, create_app
from exporter.sources.base import SourceHooks
from exporter.sources.registry import build_source
from tests.conftest import ROOT, T0, Clock
from tests.test_source_adapters import ServerFactory

RECIPES = ROOT / "examples" / "recipes"


def pasted(*recipes: Path) -> str:
    """A config file with each recipe pasted under ``sources:``, as the README says."""
    entries = "".join(
        "  -\n" + textwrap.indent(recipe.read_text(encoding="utf-8"), "    ") for recipe in recipes
    )
    return f"sources:\n{entries}"


@dataclass
class Upstream:
    simulator: Simulator
    clock: Clock
    url: str


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def start(
    aiohttp_server: ServerFactory, bucket: tuple[float, float] | None = None
) -> Upstream:
    clock = Clock(0.0)
    simulator = Simulator(clock=clock, wall_clock=lambda: T0, shopify_bucket=bucket)
    server = await aiohttp_server(create_app(simulator))
    return Upstream(simulator, clock, str(server.make_url("")).rstrip("/"))


def salesforce_env(monkeypatch: pytest.MonkeyPatch, url: str, secret: str | None = None) -> None:
    monkeypatch.setenv("SALESFORCE_INSTANCE_URL", url)
    monkeypatch.setenv("SALESFORCE_TOKEN_URL", f"{url}/services/oauth2/token")
    monkeypatch.setenv("SALESFORCE_CLIENT_ID", DEMO_CREDENTIALS.client_id)
    monkeypatch.setenv("SALESFORCE_CLIENT_SECRET", secret or DEMO_CREDENTIALS.client_secret)
    monkeypatch.delenv("SALESFORCE_API_VERSION", raising=False)


def shopify_env(monkeypatch: pytest.MonkeyPatch, url: str, token: str | None = None) -> None:
    monkeypatch.setenv("SHOPIFY_SHOP_URL", url)
    monkeypatch.setenv("SHOPIFY_ACCESS_TOKEN", token or DEMO_CREDENTIALS.shopify_access_token)
    monkeypatch.delenv("SHOPIFY_API_VERSION", raising=False)


def test_every_recipe_loads_as_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    salesforce_env(monkeypatch, "https://example.my.salesforce.com")
    shopify_env(monkeypatch, "https://example.myshopify.com")
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert [r.name for r in recipes] == [
        "salesforce-bulk-ingest.yaml",
        "shopify-bulk-operations.yaml",
    ]
    config = parse_config_text(pasted(*recipes), "c.yaml", expand_env=True)
    assert [getattr(s, "system", None) for s in config.sources] == [
        "salesforce_bulk",
        "shopify_bulk",
    ]


def test_a_recipe_without_its_variables_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SHOPIFY_SHOP_URL", "SHOPIFY_ACCESS_TOKEN", "SHOPIFY_API_VERSION"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as caught:
        parse_config_text(
            pasted(RECIPES / "shopify-bulk-operations.yaml"), "c.yaml", expand_env=True
        )
    text = "\n".join(caught.value.errors)
    assert "environment variable SHOPIFY_SHOP_URL is not set" in text
    assert "environment variable SHOPIFY_ACCESS_TOKEN is not set" in text
    assert "SHOPIFY_API_VERSION" not in text  # it has a default


# --- Salesforce Bulk API 2.0 ------------------------------------------------------------


async def test_salesforce_bulk_recipe_follows_a_job_to_its_end(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await start(aiohttp_server)
    salesforce_env(monkeypatch, upstream.url)
    config = parse_config_text(
        pasted(RECIPES / "salesforce-bulk-ingest.yaml"), "c.yaml", expand_env=True
    )
    tokens: list[str] = []
    source = build_source(config.sources[0], session, SourceHooks(token=tokens.append))
    assert source.system == "salesforce_bulk"
    job = "7505e00000AbCdEAAZ"
    obs = await source.poll(job)
    assert (obs.state, obs.upstream_state, obs.items_completed) == (
        State.WAITING,
        "UploadComplete",
        0,
    )
    assert (obs.started_at, obs.ended_at) == (T0, None)
    upstream.clock.now = 7.5
    obs = await source.poll(job)
    assert obs.state is State.RUNNING
    assert 0 < (obs.items_completed or 0) < 4000
    upstream.clock.now = 20.0
    obs = await source.poll(job)
    assert (obs.state, obs.items_completed, obs.items_failed) == (State.SUCCEEDED, 4000, 12)
    assert obs.ended_at == T0 + 12
    failed = await source.poll("7505e00000AbCdFAAZ")
    assert (failed.state, failed.reason) == (
        State.FAILED,
        "InvalidBatch : Field name not found : Emial",
    )
    assert (await source.poll("7505e00000ZZZZZAAZ")).state is State.NOT_FOUND
    assert tokens == ["success"]  # one token for every poll
    upstream.simulator.expire_tokens()
    assert (await source.poll(job)).state is State.SUCCEEDED  # fetched again on the 401
    assert tokens == ["success", "success"]


async def test_salesforce_bulk_recipe_discovers_jobs_page_by_page(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await start(aiohttp_server)
    upstream.simulator.salesforce_page_size = 1  # one job a page: the paging is followed
    salesforce_env(monkeypatch, upstream.url)
    config = parse_config_text(
        pasted(RECIPES / "salesforce-bulk-ingest.yaml"), "c.yaml", expand_env=True
    )
    source = build_source(config.sources[0], session)
    assert source.discovery_interval == 300
    found = await source.discover()
    assert [(spec.id, spec.name) for spec in found] == [
        ("7505e00000AbCdEAAZ", "upsert Account"),
        ("7505e00000AbCdFAAZ", "upsert Account"),
    ]


async def test_salesforce_bulk_recipe_with_refused_credentials_holds_the_source(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await start(aiohttp_server)
    salesforce_env(monkeypatch, upstream.url, secret="not-the-secret")
    config = parse_config_text(
        pasted(RECIPES / "salesforce-bulk-ingest.yaml"), "c.yaml", expand_env=True
    )
    with pytest.raises(SourceError) as caught:
        await build_source(config.sources[0], session).poll("7505e00000AbCdEAAZ")
    assert (caught.value.reason, caught.value.source_wide) == (ErrorReason.UNAUTHORIZED, True)
    assert "invalid_client" in caught.value.message


# --- Shopify bulk operations -------------------------------------------------------------


async def test_shopify_recipe_follows_operations(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await start(aiohttp_server)
    shopify_env(monkeypatch, upstream.url)
    config = parse_config_text(
        pasted(RECIPES / "shopify-bulk-operations.yaml"), "c.yaml", expand_env=True
    )
    source = build_source(config.sources[0], session)
    assert source.system == "shopify_bulk"
    obs = await source.poll("4123456789")
    assert (obs.state, obs.upstream_state, obs.items_completed) == (State.WAITING, "CREATED", 0)
    assert obs.started_at == T0
    upstream.clock.now = 6.5
    obs = await source.poll("4123456789")
    assert obs.state is State.RUNNING
    assert 0 < (obs.items_completed or 0) < 25_000
    upstream.clock.now = 12.0
    obs = await source.poll("4123456789")
    assert (obs.state, obs.items_completed, obs.ended_at) == (State.SUCCEEDED, 25_000, T0 + 11)
    failed = await source.poll("4123456790")
    assert (failed.state, failed.reason) == (State.FAILED, "ACCESS_DENIED")
    assert (await source.poll("999")).state is State.NOT_FOUND


async def test_shopify_recipe_throttled_holds_the_source_and_a_bad_token_is_refused(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await start(aiohttp_server, bucket=(1.0, 1.0))
    shopify_env(monkeypatch, upstream.url)
    config = parse_config_text(
        pasted(RECIPES / "shopify-bulk-operations.yaml"), "c.yaml", expand_env=True
    )
    source = build_source(config.sources[0], session)
    assert (await source.poll("4123456789")).state is State.WAITING  # the bucket's one point
    with pytest.raises(SourceError) as caught:
        await source.poll("4123456789")
    error = caught.value
    assert (error.reason, error.source_wide) == (ErrorReason.RATE_LIMITED, True)
    assert "Throttled" in error.message
    upstream.clock.now = 1.5  # the bucket refills
    assert (await source.poll("4123456789")).state is State.WAITING
    shopify_env(monkeypatch, upstream.url, token="shpat_wrong")
    config = parse_config_text(
        pasted(RECIPES / "shopify-bulk-operations.yaml"), "c.yaml", expand_env=True
    )
    with pytest.raises(SourceError) as caught:
        await build_source(config.sources[0], session).poll("4123456789")
    assert (caught.value.reason, caught.value.source_wide) == (ErrorReason.UNAUTHORIZED, True)
