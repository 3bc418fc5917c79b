"""The declarative source is complete enough to re-express a native one:
Elevate configured as ``http_json`` yields the same observations, and the
same errors, as the native adapter on every case of the native adapter's
tests (tests/test_source_adapters.py)."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.model import Observation, SourceError
from exporter.sources.elevate import STATUS_MAP
from exporter.sources.http_json import HttpJsonSource
from tests.test_source_adapters import (
    ELEVATE_MAP,
    ServerFactory,
    build,
    elevate_settings,
    serve,
)

API_KEY = "pkA123456789AB1BE"
IMPORT_ID = "5537431447739019570"


def elevate_as_http_json(url: str) -> dict[str, Any]:
    """The native Elevate adapter, said in configuration."""
    return {
        "name": "e",
        "type": "http_json",
        "system": "elevate",
        "url": url,
        "timeout": "1s",
        "request": {"path": "/api/admin/v4/import/status", "query": {"id": "{id}"}},
        "auth": {"type": "header", "header": "Api-Key", "value": API_KEY},
        "extract": {
            # Elevate's status is a string: anything else is an invalid answer.
            "state": "type(status) == 'string' && status || null",
            "reason": "reason",
            "id": "id",
        },
        "states": {status: state.value for status, state in STATUS_MAP.items()},
    }


Answer = tuple[int, bytes, dict[str, str]]


def json_answer(data: Any, status: int = 200, **headers: str) -> Answer:
    return status, json.dumps(data).encode(), {"Content-Type": "application/json", **headers}


ERROR_BODY = {"message": "Cluster not found"}
# Every answer the native adapter's tests give it.
CASES: dict[str, Answer] = {
    **{
        f"status {status}": json_answer({"id": IMPORT_ID, "reason": "why", "status": status})
        for status, _ in ELEVATE_MAP
    },
    "numeric id, null reason, gzip": (
        200,
        gzip.compress(f'{{"id": {IMPORT_ID}, "reason": null, "status": "SUCCESS"}}'.encode()),
        {"Content-Encoding": "gzip", "Content-Type": "application/json"},
    ),
    **{
        f"HTTP {status}": json_answer(ERROR_BODY, status, **{"Retry-After": "7"})
        for status in (404, 403, 406, 500, 503)
    },
    "html": (200, b"<html>oops</html>", {"Content-Type": "application/json"}),
    "a list": (200, b"[]", {"Content-Type": "application/json"}),
    "a number for a status": json_answer({"status": 3}),
    "another import": json_answer({"id": "other", "status": "SUCCESS"}),
}


def outcome(result: Observation | SourceError) -> tuple[Any, ...]:
    """What a user sees of a poll: the observation, or the error's kind."""
    if isinstance(result, Observation):
        return ("observation", result)
    return (type(result).__name__, result.reason, result.source_wide, result.retry_after)


async def poll(source: Any, import_id: str) -> Observation | SourceError:
    try:
        result: Observation = await source.poll(import_id)
    except SourceError as exc:
        return exc
    return result


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.mark.parametrize("case", list(CASES))
async def test_elevate_as_http_json_matches_the_native_adapter(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, case: str
) -> None:
    status, body, headers = CASES[case]
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(status=status, body=body, headers=headers)

    url = await serve(aiohttp_server, [web.get("/api/admin/v4/import/status", handler)])
    native = build(elevate_settings(url), session)
    declared = build(elevate_as_http_json(url), session)
    assert isinstance(declared, HttpJsonSource)
    assert declared.system == native.system == "elevate"
    assert outcome(await poll(declared, IMPORT_ID)) == outcome(await poll(native, IMPORT_ID))
    # The same request, too.
    first, second = seen
    assert first.query == second.query
    for header in ("Api-Key", "Accept-Encoding"):
        assert first.headers[header] == second.headers[header]
