"""Test doubles shared by the poller and state tests."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from exporter.config import WithImports
from exporter.model import Observation, SourceError
from exporter.simulator import DEMO_CREDENTIALS
from exporter.sources.base import ImportSpec, Source

Behaviour = Callable[[str], Observation]


class FakeConfig(WithImports):
    type: Literal["fake"] = "fake"


class FakeSource(Source[FakeConfig]):
    """A source whose answers the test scripts; counts polls per import."""

    system = "elevate"
    config_model = FakeConfig

    def __init__(self, name: str, ids: list[str], behaviour: Behaviour) -> None:
        config = FakeConfig(name=name, timeout=1.0, max_response_bytes=1024)
        super().__init__(config, session=None)  # type: ignore[arg-type]
        self.ids = ids
        self.behaviour = behaviour
        self.polls: Counter[str] = Counter()
        self.hang = asyncio.Event()  # set to release hanging polls
        self.hanging = False

    def imports(self) -> list[ImportSpec]:
        return [ImportSpec(id=i) for i in self.ids]

    async def poll(self, import_id: str) -> Observation:
        self.polls[import_id] += 1
        if self.hanging:
            await self.hang.wait()
        return self.behaviour(import_id)


def raise_error(error: SourceError) -> Behaviour:
    def behave(_: str) -> Observation:
        raise error

    return behave


def zilliant_source(url: str, ids: list[str], **settings: Any) -> dict[str, Any]:
    """A Zilliant source entry (named ``pricing``) for the simulator at ``url``,
    logging in to its Salesforce token endpoint with the demo credentials."""
    creds = DEMO_CREDENTIALS
    return {
        "name": "pricing",
        "type": "zilliant",
        "url": url,
        "forwarded_host": creds.forwarded_host,
        "salesforce": {
            "token_url": f"{url}/services/oauth2/token",
            "client_id": creds.client_id,
            "client_secret": creds.client_secret,
            "username": creds.username,
            "password": creds.password,
        },
        "imports": [{"id": i} for i in ids],
        **settings,
    }
