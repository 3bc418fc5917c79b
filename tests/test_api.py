"""The import registration API against a real exporter polling the simulator on
loopback: registering, reading, unregistering, every kind of bad input (which
must change nothing), auth with and without basic auth, the OpenAPI document
matching the routes, and the ``track``/``untrack`` CLI as a pipeline runs it."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from exporter.api.constants import API_OFF
from exporter.api.models import ImportView
from exporter.config import ID_RULE
from exporter.config.loader import parse_config_data
from exporter.registration import Registration
from exporter.runtime import Exporter
from exporter.sharding import Shard
from exporter.simulator import DEMO_CREDENTIALS, Simulator, create_app
from exporter.tracking import Refusal, TrackingError

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "pipeline-token-7d1c9a4e2b"
OTHER_TOKEN = "second-pipeline-token-55aa"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(b"prometheus:scrape-password").decode()}
IMPORTS = "/api/v1/imports"
# The simulator answers IN_PROGRESS for any Elevate id starting with "bench-".
RUNNING_ID = "bench-7001"

Membership = dict[tuple[str, str], tuple[str | None, str]]
ExporterFactory = Callable[..., AbstractAsyncContextManager[Exporter]]


@pytest.fixture
async def simulator_url() -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(Simulator(speed=20)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def api_config(
    base_url: str, tmp_path: Path, *, tokens: bool = True, max_imports: int | None = None
) -> Any:
    """An Elevate source with one configured import, and a Rocket.Chat server."""
    creds = DEMO_CREDENTIALS
    common = {"interval": "0.25s", "timeout": "0.25s", "max_backoff": "0.25s"}
    api: dict[str, Any] = {}
    if tokens:
        (tmp_path / "tokens").write_text(f"# pipelines\n{TOKEN}\n{OTHER_TOKEN}\n")
        api["tokens_file"] = "tokens"
    if max_imports is not None:
        api["max_imports_per_source"] = max_imports
    data = {
        "api": api,
        "sources": [
            {
                "name": "elevate-prod",
                "type": "elevate",
                "url": base_url,
                "api_key": creds.elevate_api_key,
                "imports": [{"id": "1001", "name": "nightly catalogue"}],
                **common,
            },
            {
                "name": "chat",
                "type": "rocketchat",
                "url": base_url,
                "user_id": creds.rocketchat_user_id,
                "auth_token": creds.rocketchat_auth_token,
                **common,
            },
        ],
    }
    return parse_config_data(data, "test config", base_dir=tmp_path)


@pytest.fixture
def make_exporter(simulator_url: str, tmp_path: Path) -> ExporterFactory:
    @asynccontextmanager
    async def make(
        *, tokens: bool = True, max_imports: int | None = None, web_config: str | None = None
    ) -> AsyncIterator[Exporter]:
        config = api_config(simulator_url, tmp_path, tokens=tokens, max_imports=max_imports)
        running = Exporter(config, "127.0.0.1:0", web_config)
        await running.start()
        try:
            yield running
        finally:
            await running.stop()

    return make


@pytest.fixture
async def exporter(make_exporter: ExporterFactory) -> AsyncIterator[Exporter]:
    async with make_exporter() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(exporter: Exporter, path: str) -> str:
    return f"http://127.0.0.1:{exporter.port}{path}"


def membership(exporter: Exporter) -> Membership:
    """Which imports are tracked, with their name and origin."""
    return {key: (r.name, r.origin) for key, r in exporter.state.imports.items()}


async def call(
    http: aiohttp.ClientSession, method: str, target: str, **kwargs: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with http.request(method, target, **kwargs) as response:
        if response.content_type == "application/json":
            body: Any = await response.json()
        else:
            body = await response.text()
        return response.status, body, response.headers


async def metrics(http: aiohttp.ClientSession, exporter: Exporter, **headers: str) -> str:
    async with http.get(url(exporter, "/metrics"), headers=headers) as response:
        assert response.status == 200
        return await response.text()


async def list_all(
    http: aiohttp.ClientSession, exporter: Exporter, limit: int | None = None, **filters: str
) -> list[dict[str, Any]]:
    """Every import the list API shows, following its pages to the end."""
    params = dict(filters)
    if limit is not None:
        params["limit"] = str(limit)
    found: list[dict[str, Any]] = []
    for _ in range(10_000):
        status, page, _ = await call(http, "GET", url(exporter, IMPORTS), params=params)
        assert status == 200, page
        assert limit is None or len(page["imports"]) <= limit
        found += page["imports"]
        if page["next"] is None:
            return found
        params["after"] = page["next"]
    raise AssertionError("the pages never ended")


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.05)


# --- the happy path -------------------------------------------------------------


async def test_register_poll_show_and_unregister(
    exporter: Exporter, http: aiohttp.ClientSession
) -> None:
    body = {"source": "elevate-prod", "id": RUNNING_ID, "name": "nightly prices"}
    status, created, _ = await call(http, "POST", url(exporter, IMPORTS), json=body, headers=BEARER)
    assert status == 201, created
    assert set(created) == set(ImportView.model_fields)
    assert created["source"] == "elevate-prod"
    assert created["id"] == RUNNING_ID
    assert created["name"] == "nightly prices"
    assert created["origin"] == "api"
    assert created["system"] == "elevate"

    status, again, _ = await call(http, "POST", url(exporter, IMPORTS), json=body, headers=BEARER)
    assert status == 200
    assert again["id"] == RUNNING_ID
    assert sum(1 for key in exporter.state.imports if key[1] == RUNNING_ID) == 1

    # A JSON number is taken as its decimal string, as in the config file.
    number = {"source": "elevate-prod", "id": 5537431447739019570}
    status, numeric, _ = await call(
        http, "POST", url(exporter, IMPORTS), json=number, headers=BEARER
    )
    assert status == 201
    assert numeric["id"] == "5537431447739019570"

    one = url(exporter, f"{IMPORTS}/elevate-prod/{RUNNING_ID}")
    seen: dict[str, Any] = {}

    async def polled() -> bool:
        nonlocal seen
        status, seen, _ = await call(http, "GET", one)
        assert status == 200
        return bool(seen["state"] == "running")

    await eventually(polled)
    assert seen["upstream_state"] == "IN_PROGRESS"
    for field in ("started_at", "state_changed_at", "last_poll_success_at", "first_seen_at"):
        when = datetime.fromisoformat(seen[field])
        offset = when.utcoffset()
        assert offset is not None, field
        assert offset.total_seconds() == 0, field
    assert seen["duration_seconds"] >= 0
    assert seen["ended_at"] is None
    assert seen["last_error"] is None

    listed = {(i["source"], i["id"]): i for i in await list_all(http, exporter)}
    assert {("elevate-prod", RUNNING_ID), ("elevate-prod", "5537431447739019570")} <= set(listed)
    assert listed[("elevate-prod", "1001")]["origin"] == "config"
    running = await list_all(http, exporter, source="elevate-prod", state="running")
    assert RUNNING_ID in {i["id"] for i in running}
    assert all(i["state"] == "running" for i in running)

    series = f'import_state{{import="{RUNNING_ID}",source="elevate-prod",state="running"}} 1.0'
    assert series in await metrics(http, exporter)

    status, gone, _ = await call(http, "DELETE", one, headers=BEARER)
    assert status == 204
    assert gone == ""
    # Gone at once: from the API and from /metrics.
    status, _, _ = await call(http, "GET", one)
    assert status == 404
    assert f'import="{RUNNING_ID}"' not in await metrics(http, exporter)
    assert RUNNING_ID not in {i["id"] for i in await list_all(http, exporter)}
    status, again_gone, _ = await call(http, "DELETE", one, headers=BEARER)
    assert status == 404
    assert again_gone["error"]


# --- bad input changes nothing ----------------------------------------------------

GOOD = {"source": "elevate-prod", "id": "bench-9"}
ID_MESSAGE = f"id: {ID_RULE}"
CONTROL_CHARACTERS = {
    "NUL": "\x00",
    "ESC": "\x1b",
    "a C1 control": "\x9b",
    "DEL": "\x7f",
    "U+2028": "\u2028",
    "U+2029": "\u2029",
}
"""Each would reach anyone's terminal raw through /metrics or a log."""

BAD_BODIES: list[tuple[str, Any, int, str | None, str]] = [
    ("unknown source", {"source": "nope", "id": "1"}, 404, "source", "nope"),
    ("Rocket.Chat takes no ids", {"source": "chat", "id": "1"}, 400, "source", "chat"),
    ("source missing", {"id": "1"}, 400, "source", "source: required"),
    ("id missing", {"source": "elevate-prod"}, 400, "id", "id: required"),
    ("first failing field", {"id": "a b"}, 400, "source", "source: required"),
    ("id with a space", {**GOOD, "id": "a b"}, 400, "id", ID_MESSAGE),
    ("id with a slash", {**GOOD, "id": "a/b"}, 400, "id", ID_MESSAGE),
    ("empty id", {**GOOD, "id": ""}, 400, "id", ID_MESSAGE),
    ("id too long", {**GOOD, "id": "9" * 201}, 400, "id", ID_MESSAGE),
    ("id a float", {**GOOD, "id": 1.5}, 400, "id", ID_MESSAGE),
    ("id a boolean", {**GOOD, "id": True}, 400, "id", ID_MESSAGE),
    ("id null", {**GOOD, "id": None}, 400, "id", ID_MESSAGE),
    ("id an object", {**GOOD, "id": {"n": 1}}, 400, "id", ID_MESSAGE),
    ("empty source", {**GOOD, "source": ""}, 400, "source", "source: must be"),
    ("source too long", {**GOOD, "source": "s" * 101}, 400, "source", "source: must be"),
    ("source a number", {**GOOD, "source": 7}, 400, "source", "source: must be"),
    ("name too long", {**GOOD, "name": "n" * 201}, 400, "name", "name: must be"),
    ("name a number", {**GOOD, "name": 5}, 400, "name", "name: must be"),
    *(
        (f"name with {what}", {**GOOD, "name": f"a{char}b"}, 400, "name", "control characters")
        for what, char in CONTROL_CHARACTERS.items()
    ),
    ("unknown field", {**GOOD, "priority": 1}, 400, "priority", "priority: unknown field"),
    ("a JSON array", [GOOD], 400, None, "must be a JSON object"),
    ("a JSON string", "bench-9", 400, None, "must be a JSON object"),
]
BAD_RAW: list[tuple[str, bytes, int, str]] = [
    ("malformed JSON", b'{"source": "elevate-prod", "id": ', 400, "not valid JSON"),
    ("empty body", b"", 400, "not valid JSON"),
    ("not UTF-8", b'{"source": "\xff\xfe", "id": "1"}', 400, "not valid JSON"),
    ("JSON null", b"null", 400, "must be a JSON object"),
    ("deeply nested", b"[" * 4000, 400, "not valid JSON"),
    ("over 4 KiB", b'{"source": "elevate-prod", "id": "1", "name": "%s"}' % (b"n" * 5000), 413, ""),
]


async def test_bad_registrations_are_refused_and_change_nothing(
    exporter: Exporter, http: aiohttp.ClientSession
) -> None:
    before = membership(exporter)
    target = url(exporter, IMPORTS)
    for case, body, want, field, message in BAD_BODIES:
        status, answer, headers = await call(http, "POST", target, json=body, headers=BEARER)
        assert (status, answer.get("field")) == (want, field), (case, answer)
        assert message in answer["error"], (case, answer)
        assert headers["Content-Type"].startswith("application/json"), case
        assert membership(exporter) == before, case
    for case, raw, want, message in BAD_RAW:
        status, answer, _ = await call(
            http, "POST", target, data=raw, headers={**BEARER, "Content-Type": "application/json"}
        )
        assert status == want, (case, answer)
        assert message in answer["error"], (case, answer)
        assert answer["field"] is None, case
        assert membership(exporter) == before, case

    # Over 4 KiB without a Content-Length (chunked): read no further than the limit.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"source": "elevate-prod", "id": "1", "name": "'
        for _ in range(10):
            yield b"n" * 1000
        yield b'"}'

    status, answer, _ = await call(http, "POST", target, data=chunks(), headers=BEARER)
    assert status == 413
    assert "4096" in answer["error"]
    # Any content type is fine when the body is JSON.
    status, answer, _ = await call(
        http, "POST", target, data=b'{"source": "nope", "id": "1"}', headers=BEARER
    )
    assert status == 404
    assert answer["field"] == "source"
    assert membership(exporter) == before


async def test_the_tracked_import_limit(
    make_exporter: ExporterFactory, http: aiohttp.ClientSession
) -> None:
    # elevate-prod has one import in the config file; two imports may be tracked.
    async with make_exporter(max_imports=2) as exporter:
        target = url(exporter, IMPORTS)
        body = {"source": "elevate-prod", "id": "bench-1"}
        status, _, _ = await call(http, "POST", target, json=body, headers=BEARER)
        assert status == 201
        before = membership(exporter)
        status, answer, _ = await call(
            http, "POST", target, json={**body, "id": "bench-2"}, headers=BEARER
        )
        assert status == 409, answer
        assert "api.max_imports_per_source" in answer["error"], answer
        assert membership(exporter) == before
        # An import already tracked may still be registered again.
        status, _, _ = await call(http, "POST", target, json=body, headers=BEARER)
        assert status == 200
        assert membership(exporter) == before


async def test_bad_reads_and_deletes(exporter: Exporter, http: aiohttp.ClientSession) -> None:
    before = membership(exporter)
    cases: list[tuple[str, str, dict[str, Any], int, str | None]] = [
        ("DELETE", f"{IMPORTS}/elevate-prod/1001", {}, 409, None),  # listed in the config
        ("DELETE", f"{IMPORTS}/elevate-prod/bench-never", {}, 404, None),
        ("DELETE", f"{IMPORTS}/nope/1", {}, 404, None),
        ("DELETE", f"{IMPORTS}/elevate-prod/a%20b", {}, 400, "id"),
        ("GET", f"{IMPORTS}/elevate-prod/bench-never", {}, 404, "id"),
        ("GET", f"{IMPORTS}/nope/1", {}, 404, "source"),
        ("GET", f"{IMPORTS}/elevate-prod/a%20b", {}, 400, "id"),
        ("GET", f"{IMPORTS}/{'s' * 101}/1", {}, 400, "source"),
        ("GET", f"{IMPORTS}/elev%00ate/1", {}, 400, "source"),
        ("GET", IMPORTS, {"source": "elev\x00ate"}, 400, "source"),
        ("GET", IMPORTS, {"source": "nope"}, 404, "source"),
        ("GET", IMPORTS, {"source": ""}, 400, "source"),
        ("GET", IMPORTS, {"state": "exploded"}, 400, "state"),
        ("GET", IMPORTS, {"colour": "red"}, 400, "colour"),
        ("GET", f"{IMPORTS}?state=running&state=failed", {}, 400, "state"),
        ("GET", "/api/v1/nothing-here", {}, 404, None),
        ("PUT", IMPORTS, {}, 405, None),
    ]
    for method, path, params, want, field in cases:
        status, answer, headers = await call(
            http, method, url(exporter, path), params=params, headers=BEARER
        )
        assert (status, answer["field"]) == (want, field), (method, path, params, answer)
        assert answer["error"]
        assert headers["Content-Type"].startswith("application/json")
        assert membership(exporter) == before, (method, path)
    status, answer, _ = await call(http, "GET", url(exporter, IMPORTS), params={"state": "x"})
    assert "must be one of waiting, blocked, running" in answer["error"]
    status, answer, _ = await call(http, "GET", url(exporter, IMPORTS), params={"colour": "red"})
    assert answer["error"] == "colour: unknown query parameter"


# --- auth -------------------------------------------------------------------------------


async def test_without_tokens_the_write_api_is_off(
    make_exporter: ExporterFactory, http: aiohttp.ClientSession
) -> None:
    async with make_exporter(tokens=False) as exporter:
        before = membership(exporter)
        for method, path, kwargs in [
            ("POST", IMPORTS, {"json": {"source": "elevate-prod", "id": "bench-1"}}),
            ("DELETE", f"{IMPORTS}/elevate-prod/1001", {}),
        ]:
            for headers in ({}, BEARER):
                status, answer, _ = await call(
                    http, method, url(exporter, path), headers=headers, **kwargs
                )
                assert status == 403
                assert answer == {"error": API_OFF, "field": None}
        assert membership(exporter) == before
        for path in (IMPORTS, f"{IMPORTS}/elevate-prod/1001", "/api/v1/openapi.json"):
            status, _, _ = await call(http, "GET", url(exporter, path))
            assert status == 200, path


async def test_writes_need_a_valid_bearer_token(
    exporter: Exporter, http: aiohttp.ClientSession
) -> None:
    before = membership(exporter)
    body = {"source": "elevate-prod", "id": "bench-1"}
    wrong = [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer not-the-token-at-all"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]
    for headers in wrong:
        for method, path in [("POST", IMPORTS), ("DELETE", f"{IMPORTS}/elevate-prod/1001")]:
            status, answer, got = await call(
                http, method, url(exporter, path), json=body, headers=headers
            )
            assert status == 401, (headers, answer)
            assert got["WWW-Authenticate"].startswith("Bearer "), headers
            assert TOKEN not in str(answer)
            assert TOKEN not in str(dict(got))
    assert membership(exporter) == before
    # Either token of the file works; the scheme is case-insensitive.
    for headers in ({"Authorization": f"bearer {OTHER_TOKEN}"}, BEARER):
        status, _, _ = await call(http, "POST", url(exporter, IMPORTS), json=body, headers=headers)
        assert status in (200, 201)
    # Reads need no token when no basic auth is configured.
    status, _, _ = await call(http, "GET", url(exporter, IMPORTS))
    assert status == 200


async def test_bearer_token_passes_basic_auth_on_the_api_only(
    make_exporter: ExporterFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    hashed = bcrypt.hashpw(b"scrape-password", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(f'basic_auth_users:\n  prometheus: "{hashed}"\n')
    async with make_exporter(web_config=str(tmp_path / "web.yml")) as exporter:
        listing = url(exporter, IMPORTS)
        # Reads: basic auth (Prometheus, people) or a pipeline's bearer token.
        assert (await call(http, "GET", listing))[0] == 401
        assert (await call(http, "GET", listing, headers=BASIC))[0] == 200
        assert (await call(http, "GET", listing, headers=BEARER))[0] == 200
        openapi = url(exporter, "/api/v1/openapi.json")
        assert (await call(http, "GET", openapi, headers=BEARER))[0] == 200
        # Writes: the bearer token, alone in the one Authorization header.
        body = {"source": "elevate-prod", "id": "bench-5"}
        status, created, _ = await call(http, "POST", listing, json=body, headers=BEARER)
        assert status == 201, created
        status, _, headers = await call(http, "POST", listing, json=body, headers=BASIC)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        wrong = {"Authorization": "Bearer not-the-token-at-all"}
        assert (await call(http, "POST", listing, json=body, headers=wrong))[0] == 401
        one = url(exporter, f"{IMPORTS}/elevate-prod/bench-5")
        assert (await call(http, "DELETE", one, headers=BEARER))[0] == 204
        # Everything else still wants basic auth, bearer token or not.
        for path in ("/metrics", "/", "/-/ready"):
            assert (await call(http, "GET", url(exporter, path), headers=BEARER))[0] == 401, path
        assert "import_state" in await metrics(http, exporter, **BASIC)
        # A dot segment does not smuggle the token past basic auth to /metrics.
        reader, writer = await asyncio.open_connection("127.0.0.1", exporter.port)
        writer.write(
            b"GET /api/../metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        answer_bytes = await reader.read()
        writer.close()
        assert b"import_state" not in answer_bytes
        assert not answer_bytes.startswith(b"HTTP/1.1 200")


# --- the OpenAPI document is true -----------------------------------------------------


async def test_openapi_document_matches_the_routes_and_their_status_codes(
    make_exporter: ExporterFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hashed = bcrypt.hashpw(b"scrape-password", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(f'basic_auth_users:\n  prometheus: "{hashed}"\n')
    async with make_exporter(web_config=str(tmp_path / "web.yml"), max_imports=2) as exporter:
        openapi = "/api/v1/openapi.json"
        status, document, _ = await call(http, "GET", url(exporter, openapi), headers=BASIC)
        assert status == 200
        assert document["openapi"].startswith("3.1")
        documented = {
            (method.upper(), path): set(operation["responses"])
            for path, item in document["paths"].items()
            for method, operation in item.items()
            if method != "parameters"
        }
        served = {
            (route.method, route.resource.canonical)
            for route in exporter.web_app.router.routes()
            if route.resource is not None and route.resource.canonical.startswith("/api/")
        }
        assert served == set(documented)

        one = f"{IMPORTS}/{{source}}/{{id}}"
        good = {"source": "elevate-prod", "id": "bench-1"}
        unknown = {**good, "source": "x"}
        over_limit = {**good, "id": "bench-2"}
        # (operation, path, request) -> the status it must get; together they
        # reach every documented status of every operation.
        requests: list[tuple[tuple[str, str], str, dict[str, Any], int]] = [
            (("GET", IMPORTS), IMPORTS, {"headers": BASIC}, 200),
            (("GET", IMPORTS), IMPORTS, {"headers": BASIC, "params": {"state": "x"}}, 400),
            (("GET", IMPORTS), IMPORTS, {}, 401),
            (("GET", IMPORTS), IMPORTS, {"headers": BASIC, "params": {"source": "x"}}, 404),
            (("POST", IMPORTS), IMPORTS, {"headers": BEARER, "json": good}, 201),
            (("POST", IMPORTS), IMPORTS, {"headers": BEARER, "json": good}, 200),
            (("POST", IMPORTS), IMPORTS, {"headers": BEARER, "json": {}}, 400),
            (("POST", IMPORTS), IMPORTS, {"headers": BASIC, "json": good}, 401),
            (("POST", IMPORTS), IMPORTS, {"headers": BEARER, "json": unknown}, 404),
            (("POST", IMPORTS), IMPORTS, {"headers": BEARER, "json": over_limit}, 409),
            (("POST", IMPORTS), IMPORTS, {"headers": BEARER, "data": b"[" * 5000}, 413),
            (("GET", one), f"{IMPORTS}/elevate-prod/bench-1", {"headers": BASIC}, 200),
            (("GET", one), f"{IMPORTS}/elevate-prod/a%20b", {"headers": BASIC}, 400),
            (("GET", one), f"{IMPORTS}/elevate-prod/bench-1", {}, 401),
            (("GET", one), f"{IMPORTS}/elevate-prod/bench-0", {"headers": BASIC}, 404),
            (("DELETE", one), f"{IMPORTS}/elevate-prod/a%20b", {"headers": BEARER}, 400),
            (("DELETE", one), f"{IMPORTS}/elevate-prod/bench-1", {"headers": BASIC}, 401),
            (("DELETE", one), f"{IMPORTS}/elevate-prod/bench-0", {"headers": BEARER}, 404),
            (("DELETE", one), f"{IMPORTS}/elevate-prod/1001", {"headers": BEARER}, 409),
            (("DELETE", one), f"{IMPORTS}/elevate-prod/bench-1", {"headers": BEARER}, 204),
            (("GET", openapi), openapi, {"headers": BASIC}, 200),
            (("GET", openapi), openapi, {}, 401),
        ]

        reached: dict[tuple[str, str], set[str]] = {operation: set() for operation in documented}

        async def check(operation: tuple[str, str], path: str, kwargs: Any, want: int) -> None:
            status, body, headers = await call(http, operation[0], url(exporter, path), **kwargs)
            assert status == want, (operation, path, body)
            response = document["paths"][operation[1]][operation[0].lower()]["responses"]
            assert str(status) in response, (operation, status)
            content = response[str(status)].get("content", {})
            if status == 204:
                assert content == {}
                assert body == ""
            else:
                assert headers["Content-Type"].split(";")[0] in content, (operation, status)
            reached[operation].add(str(status))

        for operation, path, kwargs, want in requests:
            await check(operation, path, kwargs, want)

        # The two that need the exporter in another state: the write API off,
        # and a store that cannot write.
        monkeypatch.setattr(Registration, "api_tokens", property(lambda _: ()))
        for operation, path in [(("POST", IMPORTS), IMPORTS), (("DELETE", one), f"{IMPORTS}/e/1")]:
            await check(operation, path, {"headers": BASIC, "json": good}, 403)
        monkeypatch.undo()

        async def failing_store(*_: object) -> None:
            raise TrackingError(Refusal.NOT_STORED, "cannot store the registration: disk full")

        monkeypatch.setattr(exporter.registration, "register", failing_store)
        await check(("POST", IMPORTS), IMPORTS, {"headers": BEARER, "json": good}, 503)
        monkeypatch.setattr(exporter.registration, "unregister", failing_store)
        await check(("DELETE", one), f"{IMPORTS}/elevate-prod/1001", {"headers": BEARER}, 503)
        monkeypatch.undo()

        # Shards without a shared database: another shard's import is refused.
        shard = Shard(0, 2)
        theirs = next(
            f"bench-{n}" for n in range(100) if not shard.owns("elevate-prod", f"bench-{n}")
        )
        monkeypatch.setattr(exporter.registration, "shard", shard)
        await check(
            ("POST", IMPORTS), IMPORTS, {"headers": BEARER, "json": {**good, "id": theirs}}, 421
        )
        # A shared registry that cannot be read: lists and lookups say so.
        monkeypatch.setattr(Registration, "shared", property(lambda _: True))
        monkeypatch.setattr(exporter.registration, "stored", failing_store)
        monkeypatch.setattr(exporter.registration, "stored_page", failing_store)
        await check(("GET", IMPORTS), IMPORTS, {"headers": BASIC}, 503)
        await check(("GET", one), f"{IMPORTS}/elevate-prod/{theirs}", {"headers": BASIC}, 503)

        assert reached == documented


# --- the CLI a pipeline runs ------------------------------------------------------------


async def run_cli(*args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IMPORT_STATUS_EXPORTER_TOKEN"}
    if token is not None:
        env["IMPORT_STATUS_EXPORTER_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_track_and_untrack(exporter: Exporter, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{exporter.port}"
    token_file = tmp_path / "pipeline-token"
    token_file.write_text(f"{TOKEN}\n")
    target = ["--source", "elevate-prod", "--id", RUNNING_ID, "--url", base]
    outputs: list[str] = []

    code, out, err = await run_cli(
        "track", *target, "--name", "nightly catalogue", "--token-file", str(token_file)
    )
    outputs += [out, err]
    assert (code, out) == (0, f"tracking elevate-prod/{RUNNING_ID} (new)\n"), err
    record = exporter.state.imports[("elevate-prod", RUNNING_ID)]
    assert (record.name, record.origin) == ("nightly catalogue", "api")

    # The token from the environment; the same import again; untrack.
    code, out, err = await run_cli("track", *target, token=TOKEN)
    outputs += [out, err]
    assert (code, out) == (0, f"tracking elevate-prod/{RUNNING_ID} (already tracked)\n"), err
    code, out, err = await run_cli("untrack", *target, token=TOKEN)
    outputs += [out, err]
    assert (code, out) == (0, f"stopped tracking elevate-prod/{RUNNING_ID}\n"), err
    assert ("elevate-prod", RUNNING_ID) not in exporter.state.imports

    # The server's refusals exit 1 with its message; usage errors exit 2.
    code, out, err = await run_cli("untrack", *target, token=TOKEN)
    outputs += [out, err]
    assert code == 1
    assert out == ""
    assert "404" in err
    assert "not tracked" in err
    code, out, err = await run_cli(
        "track", "--source", "nope", "--id", "1", "--url", base, token=TOKEN
    )
    outputs += [out, err]
    assert code == 1
    assert "no source named 'nope'" in err
    code, out, err = await run_cli("track", *target, token="not-the-token-at-all")
    outputs += [out, err]
    assert code == 1
    assert "401" in err
    code, out, err = await run_cli("track", "--source", "elevate-prod", "--url", base)
    assert code == 2
    assert "--id" in err
    code, out, err = await run_cli("track", *target, "--token-file", str(tmp_path / "missing"))
    assert code == 2
    assert "cannot read" in err
    assert ("elevate-prod", RUNNING_ID) not in exporter.state.imports
    assert TOKEN not in "".join(outputs)


async def test_the_list_comes_in_pages_with_a_cursor_that_keeps_the_filters(
    exporter: Exporter, http: aiohttp.ClientSession
) -> None:
    ids = [f"bench-{n:03d}" for n in range(12)] + ["5537431447739019570"]
    for import_id in ids:
        body = {"source": "elevate-prod", "id": import_id}
        status, _, _ = await call(http, "POST", url(exporter, IMPORTS), json=body, headers=BEARER)
        assert status == 201
    everything = await list_all(http, exporter)
    keys = [(i["source"], i["id"]) for i in everything]
    assert keys == sorted(keys)
    assert len(keys) == len(set(keys)) == len(exporter.state.imports)
    # Small pages add up to the same list, each at most `limit` long.
    assert [(i["source"], i["id"]) for i in await list_all(http, exporter, limit=4)] == keys
    assert [i["id"] for i in await list_all(http, exporter, limit=5, source="elevate-prod")] == [
        i for s, i in keys if s == "elevate-prod"
    ]
    status, first, _ = await call(
        http, "GET", url(exporter, IMPORTS), params={"limit": "3", "source": "elevate-prod"}
    )
    assert status == 200
    assert len(first["imports"]) == 3
    assert first["next"]
    status, rest, _ = await call(
        http,
        "GET",
        url(exporter, IMPORTS),
        params={"limit": "3", "source": "elevate-prod", "after": first["next"]},
    )
    assert [i["id"] for i in rest["imports"]] == [i for s, i in keys if s == "elevate-prod"][3:6]
    for params, field in [
        ({"limit": "0"}, "limit"),
        ({"limit": "5001"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"after": "not-a-cursor"}, "after"),
        # Keys no source or import can have (a NUL, which a database refuses).
        ({"after": base64.urlsafe_b64encode(b'["a\\u0000","b"]').decode()}, "after"),
        ({"after": base64.urlsafe_b64encode(b'["elevate-prod","a b"]').decode()}, "after"),
    ]:
        status, answer, _ = await call(http, "GET", url(exporter, IMPORTS), params=params)
        assert status == 400, answer
        assert answer["field"] == field, answer
    status, answer, _ = await call(http, "GET", url(exporter, IMPORTS), params={"limit": "5000"})
    assert status == 200
    assert answer["next"] is None


async def test_cli_list_follows_the_pages(exporter: Exporter) -> None:
    base = f"http://127.0.0.1:{exporter.port}"
    for n in range(7):
        code, _, err = await run_cli(
            "track", "--source", "elevate-prod", "--id", f"bench-{n}", "--url", base, token=TOKEN
        )
        assert code == 0, err
    code, out, err = await run_cli(
        "list", "--url", base, "--source", "elevate-prod", "--page-size", "3", token=TOKEN
    )
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[:2] for line in lines] == [
        ["elevate-prod", i] for i in sorted(["1001", *(f"bench-{n}" for n in range(7))])
    ]
    assert lines[0][3] == "nightly catalogue"
    code, out, err = await run_cli("list", "--url", base, "--state", "sideways")
    assert code == 1
    assert "400" in err
    assert "state" in err
