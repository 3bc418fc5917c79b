"""Each adapter against a fake upstream on loopback: statuses, errors, auth."""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL
from yarl._url import from_parts_uncached

from exporter.config.loader import parse_config_data
from exporter.model import ErrorReason, ParseError, SourceError, State
from exporter.poller import SourceScheduler
from exporter.sources import base as base_module
from exporter.sources.base import AUTHORITY_PROPERTIES, HttpResponse, ImportSpec, Source
from exporter.sources.registry import build_source
from exporter.sources.zilliant import ZilliantSource
from exporter.state import StateStore

ServerFactory = Callable[..., Awaitable[TestServer]]
Seen = list[web.Request]


def json_response(data: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        content_type="application/json",
        headers=headers,
    )


async def serve(aiohttp_server: ServerFactory, routes: list[web.RouteDef]) -> str:
    app = web.Application()
    app.add_routes(routes)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


def build(settings: dict[str, Any], session: aiohttp.ClientSession) -> Source[Any]:
    config = parse_config_data({"sources": [settings]}, "test.yaml")
    return build_source(config.sources[0], session)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


# --- Elevate -----------------------------------------------------------------

ELEVATE_MAP = [
    ("WAITING", State.WAITING),
    ("BLOCKED", State.BLOCKED),
    ("IN_PROGRESS", State.RUNNING),
    ("SUCCESS", State.SUCCEEDED),
    ("FAILURE", State.FAILED),
    ("ABORTED", State.ABORTED),
    ("NOT_FOUND", State.NOT_FOUND),
    ("PAUSED_BY_NEW_RELEASE", State.UNKNOWN),
]


def elevate_settings(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "e",
        "type": "elevate",
        "url": url,
        "api_key": "pkA123456789AB1BE",
        "timeout": "1s",
        **extra,
    }


@pytest.mark.parametrize(("status", "state"), ELEVATE_MAP)
async def test_elevate_maps_every_status(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, status: str, state: State
) -> None:
    seen: Seen = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return json_response({"id": request.query["id"], "reason": "why", "status": status})

    url = await serve(aiohttp_server, [web.get("/api/admin/v4/import/status", handler)])
    obs = await build(elevate_settings(url), session).poll("5537431447739019570")
    assert (obs.state, obs.upstream_state, obs.reason) == (state, status, "why")
    assert seen[0].headers["Api-Key"] == "pkA123456789AB1BE"
    assert "gzip" in seen[0].headers["Accept-Encoding"]
    assert seen[0].query["id"] == "5537431447739019570"


async def test_elevate_v4_path_numeric_id_null_reason_and_gzip(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    async def handler(_: web.Request) -> web.Response:
        body = gzip.compress(b'{"id": 5537431447739019570, "reason": null, "status": "SUCCESS"}')
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    url = await serve(aiohttp_server, [web.get("/api/admin/v4/import/status", handler)])
    source = build(elevate_settings(url, api_version="v4"), session)
    obs = await source.poll("5537431447739019570")
    assert (obs.state, obs.reason) == (State.SUCCEEDED, None)


URL_SHAPES = [
    "http://127.0.0.1:8080",
    "https://elevate.example.com",
    "http://[::1]:9000",
    "http://user:p%40ss@host.example.:81",
    "https://xn--r8jz45g.jp:443",
    "http://127.0.0.1:80/prefix%20path",
    "http://bücher.example:8080",
]


@pytest.mark.parametrize("base", URL_SHAPES)
async def test_a_polled_url_is_the_url_yarl_builds(
    base: str, session: aiohttp.ClientSession
) -> None:
    """Each poll's URL is built with what its source's authority decides
    already known: it must be the URL ``URL.build`` makes, in every property
    aiohttp reads, and its string."""
    source = build(elevate_settings(base), session)
    for import_id in ("5537431447739019570", "a/b c?#", "ü%20&=+", "a:b@c"):
        polled, reference = source.import_url(import_id), source.build_import_url(import_id)
        assert str(polled) == str(reference)
        assert polled == reference
        for name in (*AUTHORITY_PROPERTIES, "raw_path_qs", "host", "path_qs", "raw_authority"):
            assert getattr(polled, name) == getattr(reference, name), name
    assert None not in source._authorities.values()  # the fast way was taken


def _kept_wrong(url: URL) -> URL:
    url._cache["host_port_subcomponent"] = "elsewhere:1"
    return url


@pytest.mark.parametrize(
    "maker",
    [
        None,  # a yarl without that constructor
        lambda *_: URL("http://elsewhere:1/x"),
        # Keeps another value under a property's name than the property is.
        lambda *parts: _kept_wrong(from_parts_uncached(*parts)),
    ],
)
async def test_a_yarl_that_builds_otherwise_gets_urls_built_the_public_way(
    maker: Any, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base_module, "_yarl_from_parts", maker)
    source = build(elevate_settings("http://127.0.0.1:8080"), session)
    polled = source.import_url("42")
    assert str(polled) == "http://127.0.0.1:8080/api/admin/v4/import/status?id=42"
    assert polled.host_port_subcomponent == "127.0.0.1:8080"
    assert list(source._authorities.values()) == [None]


async def test_urls_stay_right_when_the_kept_parts_are_dropped(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base_module, "URLS_KEPT", 0)
    monkeypatch.setattr(base_module, "URL_CACHE_SIZE", 2)
    source = build(elevate_settings("http://127.0.0.1:8080"), session)
    for import_id in ("1", "2", "3", "4", "5", "1"):
        polled = source.import_url(import_id)
        assert str(polled) == f"http://127.0.0.1:8080/api/admin/v4/import/status?id={import_id}"
        assert polled.host_port_subcomponent == "127.0.0.1:8080"
    assert len(source._import_urls) <= 2


async def test_the_first_imports_keep_their_urls_and_the_rest_build_equal_ones(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to :data:`URLS_KEPT` imports poll with the same URL object every
    time (aiohttp's cache in it filled); past that, each poll gets a URL
    built anew, equal in every property aiohttp reads. An import no longer
    polled makes room."""
    monkeypatch.setattr(base_module, "URLS_KEPT", 2)
    source = build(elevate_settings("http://127.0.0.1:8080"), session)
    kept = {import_id: source.import_url(import_id) for import_id in ("1", "2")}
    beyond = source.import_url("3")
    assert all(source.import_url(import_id) is url for import_id, url in kept.items())
    again = source.import_url("3")
    assert again is not beyond
    for name in (*AUTHORITY_PROPERTIES, "raw_path_qs", "host", "path_qs", "raw_authority"):
        assert getattr(again, name) == getattr(beyond, name), name
    assert str(again) == "http://127.0.0.1:8080/api/admin/v4/import/status?id=3"
    source.forget_url("1")
    assert source.import_url("4") is source.import_url("4")
    assert set(source._urls) == {"2", "4"}


async def test_an_import_past_the_kept_ones_takes_a_slot_an_ended_import_frees(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base_module, "URLS_KEPT", 2)
    source = build(elevate_settings("http://127.0.0.1:8080"), session)
    for import_id in ("1", "2", "3"):
        source.import_url(import_id)
    assert source.import_url("3") is not source.import_url("3")
    source.forget_url("1")
    kept = source.import_url("3")
    assert source.import_url("3") is kept
    assert str(kept) == "http://127.0.0.1:8080/api/admin/v4/import/status?id=3"
    assert set(source._urls) == {"2", "3"}
    assert not source._import_urls
    source.import_url("4")  # past the kept ones
    source.forget_url("2")
    source.import_url("5")  # new: takes the freed slot
    for import_id in ("4", "5", "3"):
        assert str(source.import_url(import_id)).endswith(f"?id={import_id}")
    assert set(source._urls) == {"3", "5"}  # never more than URLS_KEPT


async def test_an_import_no_longer_polled_leaves_no_url_kept(
    session: aiohttp.ClientSession,
) -> None:
    source = build(elevate_settings("http://127.0.0.1:8080"), session)
    state = StateStore()
    state.add_source(source.name, source.system, 60.0)
    scheduler = SourceScheduler(source, state, interval=60.0, concurrency=1, max_backoff=60.0)
    scheduler.add(ImportSpec("1"))
    source.import_url("1")
    scheduler.remove("1")
    assert "1" not in source._urls


async def test_a_finished_import_leaves_no_url_kept(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """Polled until its end is confirmed, then not again: its URL's slot
    goes to an import still polled."""

    async def handler(request: web.Request) -> web.Response:
        return json_response({"id": request.query["id"], "reason": None, "status": "SUCCESS"})

    url = await serve(aiohttp_server, [web.get("/api/admin/v4/import/status", handler)])
    source = build(elevate_settings(url), session)
    state = StateStore()
    state.add_source(source.name, source.system, 60.0)
    scheduler = SourceScheduler(source, state, interval=60.0, concurrency=1, max_backoff=60.0)
    scheduler.add(ImportSpec("1"))
    assert await scheduler.poll_once("1") is not None  # seen once: polled again to confirm
    assert "1" in source._urls
    assert await scheduler.poll_once("1") is None
    assert state.imports[(source.name, "1")].state is State.SUCCEEDED
    assert "1" not in source._urls


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (404, ErrorReason.CLIENT_ERROR),
        (403, ErrorReason.UNAUTHORIZED),
        (406, ErrorReason.CLIENT_ERROR),
        (500, ErrorReason.SERVER_ERROR),
        (503, ErrorReason.SERVER_ERROR),
    ],
)
async def test_elevate_error_codes(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, status: int, reason: ErrorReason
) -> None:
    async def handler(_: web.Request) -> web.Response:
        return json_response(
            {"message": "Cluster not found"}, status=status, **{"Retry-After": "7"}
        )

    url = await serve(aiohttp_server, [web.get("/api/admin/v4/import/status", handler)])
    with pytest.raises(SourceError) as caught:
        await build(elevate_settings(url), session).poll("1")
    assert caught.value.reason is reason
    if reason is ErrorReason.SERVER_ERROR:
        assert caught.value.retry_after == 7


@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b"[]", b'{"status": 3}', b'{"id": "other", "status": "SUCCESS"}'],
)
async def test_elevate_bad_bodies_are_invalid_responses(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, body: bytes
) -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    url = await serve(aiohttp_server, [web.get("/api/admin/v4/import/status", handler)])
    with pytest.raises(SourceError) as caught:
        await build(elevate_settings(url), session).poll("1")
    assert caught.value.reason is ErrorReason.INVALID_RESPONSE


async def test_body_over_the_cap_is_too_large(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    async def plain(_: web.Request) -> web.Response:
        return web.Response(body=b" " * 5000 + b"{}", content_type="application/json")

    async def bomb(_: web.Request) -> web.Response:
        body = gzip.compress(b" " * 10_000_000 + b"{}")
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    url = await serve(
        aiohttp_server,
        [
            web.get("/api/admin/v3/import/status", plain),
            web.get("/api/admin/v4/import/status", bomb),
        ],
    )
    for version in ("v3", "v4"):
        settings = elevate_settings(url, max_response_bytes=4096, api_version=version)
        with pytest.raises(SourceError) as caught:
            await build(settings, session).poll("1")
        assert caught.value.reason is ErrorReason.TOO_LARGE


async def test_timeout_and_connection_refused(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    import asyncio

    never = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    url = await serve(aiohttp_server, [web.get("/api/admin/v4/import/status", hang)])
    with pytest.raises(SourceError) as caught:
        await build(elevate_settings(url, timeout="0.2s"), session).poll("1")
    assert caught.value.reason is ErrorReason.TIMEOUT
    with pytest.raises(SourceError) as caught:
        await build(elevate_settings("http://127.0.0.1:9"), session).poll("1")
    assert caught.value.reason is ErrorReason.CONNECTION


# --- Zilliant ------------------------------------------------------------------


class FakeSalesforce:
    """A token endpoint and a Zilliant status endpoint sharing issued tokens."""

    def __init__(self) -> None:
        self.token_requests: list[dict[str, str]] = []
        self.valid: set[str] = set()
        self.answer: dict[str, Any] = {
            "status": "RUNNING",
            "startDate": "2021-09-28T13:09:25Z",
            "clientErrorCallingService": False,
            "entityImportId": "2587c81c-b9fc-4873-ae2f-421b292d2c2b",
        }
        self.seen: Seen = []

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.token_requests.append({k: str(v) for k, v in form.items()})
        if form.get("client_secret") != "cs-secret-1":
            return json_response({"error": "invalid_client"}, status=400)
        access = f"00D!token{len(self.token_requests)}"
        self.valid.add(access)
        return json_response(
            {
                "access_token": access,
                "instance_url": "https://x.my.salesforce.com",
                "id": "https://login.salesforce.com/id/00D/005",
                "token_type": "Bearer",
                "issued_at": str(int(time.time() * 1000)),
                "signature": "c2ln",
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        self.seen.append(request)
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = json.loads(base64.b64decode(value)) if scheme == "OAuth" else {}
        if token.get("access_token") not in self.valid:
            return json_response({"message": "Unauthorized"}, status=401)
        if request.match_info["id"] == "missing":
            return json_response({"message": "Import ID not found."}, status=404)
        return json_response(self.answer)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/services/oauth2/token", self.token),
            web.get("/v1/EntityImport/{id}/status", self.status),
        ]


def zilliant_settings(url: str, grant: str = "password") -> dict[str, Any]:
    salesforce: dict[str, Any] = {
        "token_url": f"{url}/services/oauth2/token",
        "grant_type": grant,
        "client_id": "3MVG9",
        "client_secret": "cs-secret-1",
    }
    if grant == "password":
        salesforce |= {"username": "u@example.com", "password": "pw-secret-1"}
    return {
        "name": "z",
        "type": "zilliant",
        "url": url,
        "forwarded_host": "x.my.salesforce.com",
        "salesforce": salesforce,
    }


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("RUNNING", State.RUNNING),
        ("SUCCEEDED", State.SUCCEEDED),
        ("FAILED", State.FAILED),
        ("NEW", State.UNKNOWN),
    ],
)
async def test_zilliant_statuses_dates_and_headers(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, status: str, state: State
) -> None:
    fake = FakeSalesforce()
    fake.answer["status"] = status
    if status != "RUNNING":
        fake.answer["stopDate"] = "2021-09-28T13:16:06Z"
    url = await serve(aiohttp_server, fake.routes())
    obs = await build(zilliant_settings(url), session).poll("2587c81c-b9fc-4873-ae2f-421b292d2c2b")
    assert obs.state is state
    assert obs.started_at == 1632834565.0
    assert obs.ended_at == (None if status == "RUNNING" else 1632834966.0)
    request = fake.seen[0]
    assert request.headers["X-Forwarded-Host"] == "x.my.salesforce.com"
    sent = json.loads(base64.b64decode(request.headers["Authorization"].split(" ", 1)[1]))
    # The whole token JSON is sent, not only the access token.
    assert set(sent) >= {
        "access_token",
        "instance_url",
        "id",
        "token_type",
        "issued_at",
        "signature",
    }


async def test_zilliant_null_stop_date_and_not_found(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    fake = FakeSalesforce()
    fake.answer["stopDate"] = None
    url = await serve(aiohttp_server, fake.routes())
    source = build(zilliant_settings(url), session)
    obs = await source.poll("2587c81c-bs9fc-4873-ae2f-421b292d2c2b")
    assert (obs.state, obs.ended_at) == (State.RUNNING, None)
    assert (await source.poll("missing")).state is State.NOT_FOUND


async def test_zilliant_token_is_cached_and_refreshed_once_on_401(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    fake = FakeSalesforce()
    url = await serve(aiohttp_server, fake.routes())
    source = build(zilliant_settings(url), session)
    await source.poll("a")
    await source.poll("b")
    assert len(fake.token_requests) == 1  # cached
    fake.valid.clear()  # the token expired
    assert (await source.poll("a")).state is State.RUNNING
    assert len(fake.token_requests) == 2  # exactly one refresh
    form = fake.token_requests[0]
    assert form["grant_type"] == "password"
    assert (form["username"], form["password"]) == ("u@example.com", "pw-secret-1")


async def test_zilliant_client_credentials_grant_and_rejected_token(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    fake = FakeSalesforce()
    url = await serve(aiohttp_server, fake.routes())
    source = build(zilliant_settings(url, grant="client_credentials"), session)
    await source.poll("a")
    assert fake.token_requests[0]["grant_type"] == "client_credentials"
    assert "password" not in fake.token_requests[0]
    bad = zilliant_settings(url)
    bad["salesforce"]["client_secret"] = "wrong-secret"
    with pytest.raises(SourceError) as caught:
        await build(bad, session).poll("a")
    assert caught.value.reason is ErrorReason.UNAUTHORIZED
    assert "wrong-secret" not in str(caught.value)


async def test_zilliant_static_token_is_never_refreshed(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    fake = FakeSalesforce()
    fake.valid.add("static-token")
    url = await serve(aiohttp_server, fake.routes())
    settings = zilliant_settings(url)
    del settings["salesforce"]
    settings["token_json"] = json.dumps({"access_token": "static-token", "token_type": "Bearer"})
    source = build(settings, session)
    assert isinstance(source, ZilliantSource)
    assert (await source.poll("a")).state is State.RUNNING
    fake.valid.clear()
    with pytest.raises(SourceError) as caught:
        await source.poll("a")
    assert caught.value.reason is ErrorReason.UNAUTHORIZED
    assert fake.token_requests == []


# --- Rocket.Chat ---------------------------------------------------------------

STEPS = [
    *[
        (s, State.WAITING)
        for s in (
            "importer_new",
            "importer_uploading",
            "importer_downloading_file",
            "importer_file_loaded",
            "importer_user_selection",
        )
    ],
    *[
        (s, State.RUNNING)
        for s in (
            "importer_preparing_started",
            "importer_preparing_users",
            "importer_preparing_channels",
            "importer_preparing_messages",
            "importer_preparing_contacts",
            "importer_importing_started",
            "importer_importing_users",
            "importer_importing_channels",
            "importer_importing_messages",
            "importer_importing_contacts",
            "importer_importing_files",
            "importer_finishing",
        )
    ],
    ("importer_done", State.SUCCEEDED),
    ("importer_import_failed", State.FAILED),
    ("importer_import_cancelled", State.ABORTED),
    ("importer_something_new", State.UNKNOWN),
]


def rocketchat_settings(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "chat",
        "type": "rocketchat",
        "url": url,
        "user_id": "d26x6zSkaPSe5gCyy",
        "auth_token": "Zu-Z6eKzIIz7MCCRGeHi29bYkXZCJ4SxFC0JAasqm92",
        **extra,
    }


@pytest.mark.parametrize(("step", "state"), STEPS)
async def test_rocketchat_maps_every_step_with_counts(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, step: str, state: State
) -> None:
    seen: Seen = []

    async def progress(request: web.Request) -> web.Response:
        seen.append(request)
        count = {"completed": 120, "total": 5000, "error": 3}
        return json_response(
            {"key": "slack", "name": "Slack", "step": step, "count": count, "success": True}
        )

    url = await serve(aiohttp_server, [web.get("/api/v1/getImportProgress", progress)])
    source = build(rocketchat_settings(url, check_operation=False), session)
    assert [spec.id for spec in source.imports()] == [url.removeprefix("http://")]
    obs = await source.poll(source.imports()[0].id)
    assert (obs.state, obs.step, obs.upstream_state) == (state, step, step)
    assert (obs.items_completed, obs.items_expected, obs.items_failed) == (120, 5000, 3)
    assert seen[0].headers["X-User-Id"] == "d26x6zSkaPSe5gCyy"
    assert seen[0].headers["X-Auth-Token"] == "Zu-Z6eKzIIz7MCCRGeHi29bYkXZCJ4SxFC0JAasqm92"


async def test_rocketchat_seed_example_without_error_count(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    async def progress(_: web.Request) -> web.Response:
        return json_response(
            {
                "key": "pending-avatars",
                "name": "Pending Avatars",
                "step": "importer_user_selection",
                "count": {"completed": 0, "total": 0},
                "success": True,
            }
        )

    url = await serve(aiohttp_server, [web.get("/api/v1/getImportProgress", progress)])
    obs = await build(rocketchat_settings(url, check_operation=False), session).poll("x")
    assert (obs.state, obs.items_failed, obs.items_expected) == (State.WAITING, None, 0)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            400,
            {
                "success": False,
                "error": "Import Operation Not Found [error-operation-not-found]",
                "errorType": "error-operation-not-found",
            },
            State.NOT_FOUND,
        ),
        (
            401,
            {"success": False, "error": "You must be logged in to do this."},
            ErrorReason.UNAUTHORIZED,
        ),
        (
            401,
            {"status": "error", "message": "You must be logged in to do this."},
            ErrorReason.UNAUTHORIZED,
        ),
        (
            403,
            {
                "success": False,
                "error": "User does not have the permissions required for this action"
                " [error-unauthorized]",
            },
            ErrorReason.UNAUTHORIZED,
        ),
        (403, {"success": False, "error": "unauthorized"}, ErrorReason.UNAUTHORIZED),
        (400, {"success": False, "error": "something else"}, ErrorReason.CLIENT_ERROR),
        (502, {}, ErrorReason.SERVER_ERROR),
    ],
)
async def test_rocketchat_error_bodies(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    status: int,
    body: dict[str, Any],
    expected: State | ErrorReason,
) -> None:
    async def progress(_: web.Request) -> web.Response:
        return json_response(body, status=status)

    url = await serve(aiohttp_server, [web.get("/api/v1/getImportProgress", progress)])
    source = build(rocketchat_settings(url, check_operation=False), session)
    if isinstance(expected, State):
        obs = await source.poll("x")
        assert (obs.state, obs.upstream_state) == (expected, "no_import")
    else:
        with pytest.raises(SourceError) as caught:
            await source.poll("x")
        assert caught.value.reason is expected


async def test_rocketchat_429_honours_rate_limit_reset(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    reset_ms = int((time.time() + 42) * 1000)

    async def progress(_: web.Request) -> web.Response:
        return json_response(
            {"success": False, "error": "Error, too many requests. [error-too-many-requests]"},
            status=429,
            **{
                "X-RateLimit-Limit": "10",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(reset_ms),
            },
        )

    url = await serve(aiohttp_server, [web.get("/api/v1/getImportProgress", progress)])
    with pytest.raises(SourceError) as caught:
        await build(rocketchat_settings(url), session).poll("x")
    assert caught.value.reason is ErrorReason.RATE_LIMITED
    assert caught.value.retry_after is not None
    assert 39 < caught.value.retry_after <= 42


async def test_rocketchat_invalid_operation_is_failed_and_403_is_skipped_for_good(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    operation_answers = [
        json_response({"operation": {"_id": "op1", "valid": False}, "success": True}),
        json_response({"success": False, "error": "unauthorized"}, status=403),
    ]
    operation_calls = 0

    async def progress(_: web.Request) -> web.Response:
        return json_response(
            {
                "step": "importer_importing_messages",
                "count": {"completed": 5, "total": 9},
                "success": True,
            }
        )

    async def operation(_: web.Request) -> web.Response:
        nonlocal operation_calls
        operation_calls += 1
        return operation_answers[min(operation_calls, 2) - 1]

    url = await serve(
        aiohttp_server,
        [
            web.get("/api/v1/getImportProgress", progress),
            web.get("/api/v1/getCurrentImportOperation", operation),
        ],
    )
    source = build(rocketchat_settings(url), session)
    dead = await source.poll("x")
    assert dead.state is State.FAILED
    assert dead.reason
    assert "invalid" in dead.reason
    assert dead.step == "importer_importing_messages"
    assert (await source.poll("x")).state is State.RUNNING  # 403: carry on without it
    assert (await source.poll("x")).state is State.RUNNING
    assert operation_calls == 2  # never asked again after the 403


@pytest.mark.parametrize(
    "body",
    [
        # A count no database column holds (PostgreSQL's BIGINT): refused as
        # the answer of that one import, not left to fail every store write.
        b'{"success": true, "step": "importer_done", "count": {"completed": 9223372036854775808}}',
        # NaN and Infinity are not JSON (RFC 8259), though Python reads them.
        b'{"success": true, "step": "importer_done", "count": {"completed": NaN}}',
        b'{"success": true, "step": "importer_done", "count": {"total": 1e999}}',
    ],
)
def test_numbers_no_store_can_hold_are_an_invalid_answer(body: bytes) -> None:
    from exporter.sources.http_json import to_count
    from exporter.sources.rocketchat import parse_progress

    with pytest.raises(ParseError):
        parse_progress(HttpResponse(200, CIMultiDictProxy(CIMultiDict()), body))
    with pytest.raises(ParseError, match="is not a count"):
        to_count(2**63, "extract.completed")
    assert to_count(2**63 - 1, "extract.completed") == 2**63 - 1
