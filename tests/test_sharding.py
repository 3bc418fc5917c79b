"""Shards: every import belongs to exactly one, whatever the number of shards;
each polls and exports only its own; a registration reaching the wrong shard
is told which one owns it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Config
from exporter.config.loader import parse_config_data
from exporter.runtime import Exporter
from exporter.sharding import Shard, ordinal_of
from exporter.simulator import DEMO_CREDENTIALS, Simulator, create_app
from exporter.tracking import Refusal, TrackingError
from tests.conftest import wait_until
from tests.fakes import zilliant_source

ServerFactory = Callable[..., Awaitable[TestServer]]
ELEVATE_IDS = [f"bench-{i}" for i in range(60)]  # running for ever in the simulator
ZILLIANT_ID = "7c9e6679-7425-40de-944b-e07fc1f69e29"  # running for ever
FAST = {"interval": "0.5s", "timeout": "0.5s"}


def test_every_key_belongs_to_exactly_one_shard() -> None:
    keys = [("shop", f"id-{i}") for i in range(3000)] + [(f"chat-{i}", None) for i in range(30)]
    for total in (1, 2, 3, 7):
        shards = [Shard(n, total) for n in range(total)]
        owners = [[s.index for s in shards if s.owns(*key)] for key in keys]
        assert all(len(found) == 1 for found in owners)
        assert all(
            shards[0].owner(*key) == found[0] for key, found in zip(keys, owners, strict=True)
        )
        counts = [sum(1 for found in owners if found == [n]) for n in range(total)]
        assert min(counts) > len(keys) / total * 0.8  # spread evenly enough


def test_the_shard_comes_from_a_statefulset_pod_name() -> None:
    assert ordinal_of("import-status-exporter-2") == 2
    with pytest.raises(ValueError, match="does not end in -<ordinal>"):
        ordinal_of("laptop")
    with pytest.raises(ValueError, match="must be from 0 to --total-shards - 1"):
        Shard(3, 3)


def config(url: str) -> Config:
    creds = DEMO_CREDENTIALS
    return parse_config_data(
        {
            "sources": [
                {
                    "name": "shop",
                    "type": "elevate",
                    "url": url,
                    "api_key": creds.elevate_api_key,
                    "imports": [{"id": i} for i in ELEVATE_IDS],
                    **FAST,
                },
                zilliant_source(url, [ZILLIANT_ID], **FAST),
                {
                    "name": "chat",
                    "type": "rocketchat",
                    "url": url,
                    "user_id": creds.rocketchat_user_id,
                    "auth_token": creds.rocketchat_auth_token,
                    **FAST,
                },
            ]
        },
        "test",
    )


@contextlib.asynccontextmanager
async def shards(url: str, total: int) -> AsyncIterator[list[Exporter]]:
    running = [Exporter(config(url), "127.0.0.1:0", shard=Shard(n, total)) for n in range(total)]
    try:
        for exporter in running:
            await exporter.start()
        for exporter in running:
            await wait_until(exporter.state.ready, timeout=20, what="every shard polled")
        yield running
    finally:
        for exporter in running:
            await exporter.stop()


async def exported(exporter: Exporter) -> dict[str, Any]:
    """The imports and token requests a shard's /metrics shows."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{exporter.port}/metrics") as response,
    ):
        text = await response.text()
    imports, tokens = set(), 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "import_info":
                imports.add((sample.labels["source"], sample.labels["import"]))
            if sample.name == "import_source_token_requests_total":
                tokens += sample.value
    return {"imports": imports, "tokens": tokens}


async def test_shards_split_the_imports_without_gap_or_overlap(
    aiohttp_server: ServerFactory,
) -> None:
    simulator = Simulator()
    server = await aiohttp_server(create_app(simulator))
    url = str(server.make_url("")).rstrip("/")
    server_label = url.removeprefix("http://")
    everything = {("shop", i) for i in ELEVATE_IDS} | {("pricing", ZILLIANT_ID)}
    everything |= {("chat", server_label)}
    for total in (3, 2):  # resharded: every shard restarted with the new count
        async with shards(url, total) as running:
            seen = [await exported(exporter) for exporter in running]
        sets = [shown["imports"] for shown in seen]
        assert set().union(*sets) == everything, total
        assert sum(len(found) for found in sets) == len(everything), total  # no overlap
        assert all(found for found in sets), total  # each shard got a share
        # Only the shard that polls the Zilliant import logs in to Salesforce.
        fetching = [n for n, shown in enumerate(seen) if shown["tokens"]]
        assert fetching == [n for n, found in enumerate(sets) if ("pricing", ZILLIANT_ID) in found]
    assert simulator.counters["token"] == 2  # one login per sharding, not one per shard


async def test_a_registration_reaching_the_wrong_shard_names_the_owner(
    aiohttp_server: ServerFactory,
) -> None:
    server = await aiohttp_server(create_app(Simulator()))
    url = str(server.make_url("")).rstrip("/")
    async with shards(url, 2) as running:
        owner = Shard(0, 2).owner("shop", "bench-new")
        other = running[1 - owner]
        with pytest.raises(TrackingError, match=f"belongs to shard {owner} of 2") as refused:
            await other.register("shop", "bench-new", None)
        assert refused.value.refusal is Refusal.OTHER_SHARD
        _, new = await running[owner].register("shop", "bench-new", None)
        assert new
        assert ("shop", "bench-new") not in other.state.imports
