"""The demo: the built-in simulator of the upstream APIs and a config pointing at it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from exporter.config import Config
from exporter.config.loader import parse_config_data
from exporter.simulator import DEMO_CREDENTIALS, Simulator, create_app

log = logging.getLogger(__name__)

DEMO_INTERVAL = 2.0
"""Real seconds between polls of each demo import at speed 1: the story
(demo_scenarios) unfolds in its first 15 s."""
DEMO_API_TOKEN = "demo-api-token-not-a-secret"
"""The demo's write API is on with this well-known token, so the registration
API can be tried at once; a real config names a tokens file instead."""


def salesforce_bulk_demo(base_url: str, common: dict[str, str]) -> dict[str, Any]:
    """The recipe examples/recipes/salesforce-bulk-ingest.yaml as the demo runs
    it: the simulator's URLs, the demo credentials, polled and discovering at
    the demo's pace (tests/test_demo_story.py holds it to the file)."""
    creds = DEMO_CREDENTIALS
    jobs = f"{base_url}/services/data/v62.0/jobs/ingest"
    return {
        "name": "salesforce-bulk-demo",
        "type": "http_json",
        "system": "salesforce_bulk",
        "url": base_url,
        "request": {"path": "/services/data/v62.0/jobs/ingest/{id}"},
        "auth": {
            "type": "oauth2",
            "token_url": f"{base_url}/services/oauth2/token",
            "client_id": creds.client_id,
            "client_secret": creds.client_secret,
        },
        "extract": {
            "state": "state",
            "reason": "errorMessage",
            "completed": "numberRecordsProcessed",
            "failed": "numberRecordsFailed",
            "started": "createdDate",
            "ended": "contains(['JobComplete', 'Failed', 'Aborted'], state) "
            "&& systemModstamp || null",
            "time_format": "iso8601",
        },
        "states": {
            "Open": "waiting",
            "UploadComplete": "waiting",
            "InProgress": "running",
            "JobComplete": "succeeded",
            "Failed": "failed",
            "Aborted": "aborted",
        },
        "not_found": {"status": [404], "when": "[?errorCode == 'NOT_FOUND']"},
        "discovery": {
            "interval": common["interval"],
            "request": {"path": jobs.removeprefix(base_url), "query": {"jobType": "V2Ingest"}},
            "items": "records",
            "id": "id",
            "name": "join(' ', [operation, object])",
            "next": "done == `false` && nextRecordsUrl || null",
        },
        **common,
    }


def demo_config(base_url: str, speed: float = 1.0) -> Config:
    """One source of each type, pointed at the simulator at ``base_url``; the
    ``http_json`` one is the Salesforce Bulk API recipe, finding its jobs."""
    creds = DEMO_CREDENTIALS
    interval = f"{max(0.2, DEMO_INTERVAL / speed):.3f}s"
    timeout = f"{max(0.2, min(2.0, DEMO_INTERVAL / speed)):.3f}s"
    common = {"interval": interval, "timeout": timeout}
    config = parse_config_data(
        {
            "sources": [
                {
                    "name": "elevate-demo",
                    "type": "elevate",
                    "url": base_url,
                    "api_key": creds.elevate_api_key,
                    "imports": [
                        {"id": "1001", "name": "nightly catalogue"},
                        {"id": "1002", "name": "price feed"},
                        {"id": "1003", "name": "stock levels"},
                        {"id": "1004", "name": "stuck promotions"},
                        {"id": "1005", "name": "cancelled import"},
                        {"id": "1006", "name": "behind a broken proxy"},
                    ],
                    **common,
                },
                {
                    "name": "zilliant-demo",
                    "type": "zilliant",
                    "url": base_url,
                    "forwarded_host": creds.forwarded_host,
                    "salesforce": {
                        "token_url": f"{base_url}/services/oauth2/token",
                        "grant_type": "password",
                        "client_id": creds.client_id,
                        "client_secret": creds.client_secret,
                        "username": creds.username,
                        "password": creds.password,
                    },
                    "imports": [
                        {"id": "2587c81c-b9fc-4873-ae2f-421b292d2c2b", "name": "price rules"},
                        {"id": "7c9e6679-7425-40de-944b-e07fc1f69e29", "name": "customer segments"},
                        {
                            "id": "2587c81c-bs9fc-4873-ae2f-421b292d2c2b",
                            "name": "product hierarchy",
                        },
                    ],
                    **common,
                },
                {
                    "name": "rocketchat-demo",
                    "type": "rocketchat",
                    "url": base_url,
                    "user_id": creds.rocketchat_user_id,
                    "auth_token": creds.rocketchat_auth_token,
                    **common,
                },
                salesforce_bulk_demo(base_url, common),
            ]
        },
        "built-in demo config",
    )
    config.api.allow_tokens((DEMO_API_TOKEN,))
    return config


@asynccontextmanager
async def start_demo_simulator(
    speed: float = 1.0, simulator: Simulator | None = None
) -> AsyncIterator[Config]:
    """Run the simulator on a free loopback port; yield the demo config for it.

    ``simulator``: serve this one (a test adds scripted imports to it while it
    runs) instead of a new ``Simulator(speed=speed)``; give it the same speed."""
    if simulator is None:
        simulator = Simulator(speed=speed)
    runner = web.AppRunner(create_app(simulator), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base_url = f"http://127.0.0.1:{port}"
    log.info("demo: simulator of the upstream APIs at %s (speed %g)", base_url, speed)
    log.info("demo: the write API takes Authorization: Bearer %s", DEMO_API_TOKEN)
    try:
        yield demo_config(base_url, speed)
    finally:
        await runner.cleanup()
