"""The declarative ``http_json`` source against a fake upstream on loopback:
the request it makes, each kind of auth, extraction, the state map, "not
found" and error-despite-200 answers, and config errors with their location."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from exporter.config import ConfigError
from exporter.config.loader import parse_config_data
from exporter.model import ErrorReason, ParseError, SourceError, State
from exporter.sources.base import HttpResponse, SourceHooks
from exporter.sources.http_json import Extractor, HttpJsonConfig, HttpJsonSource
from exporter.sources.registry import build_source
from tests.conftest import wait_until
from tests.test_source_adapters import ServerFactory, json_response, serve


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def settings_for(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "jobs",
        "type": "http_json",
        "system": "acme",
        "url": url,
        "timeout": "1s",
        "request": {"path": "/jobs/{id}"},
        "extract": {"state": "status"},
        "states": {"DONE": "succeeded", "RUNNING": "running", "BROKEN": "failed"},
        **extra,
    }


def load(settings: dict[str, Any]) -> HttpJsonConfig:
    config = parse_config_data({"sources": [settings]}, "c.yaml").sources[0]
    assert isinstance(config, HttpJsonConfig)
    return config


def build(
    settings: dict[str, Any], session: aiohttp.ClientSession, hooks: SourceHooks | None = None
) -> HttpJsonSource:
    source = build_source(load(settings), session, hooks)
    assert isinstance(source, HttpJsonSource)
    return source


def answer(body: Any, status: int = 200) -> HttpResponse:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status, CIMultiDictProxy(CIMultiDict()), data)


class Upstream:
    """A job API that records requests and answers what the test sets."""

    def __init__(self) -> None:
        self.seen: list[tuple[web.Request, bytes]] = []
        self.body: Any = {"status": "RUNNING"}
        self.status = 200
        self.headers: dict[str, str] = {}

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request, await request.read()))
        return json_response(self.body, self.status, **self.headers)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/jobs/{id}", self.handle), web.post("/graphql", self.handle)]


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> tuple[Upstream, str]:
    fake = Upstream()
    return fake, await serve(aiohttp_server, fake.routes())


# --- the request -----------------------------------------------------------------


async def test_get_with_escaped_id_query_headers_and_static_header_auth(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    settings = settings_for(
        url,
        request={
            "path": "/jobs/{id}",
            "query": {"expand": "counts", "job": "{id}"},
            "headers": {"X-Tenant": "t1"},
        },
        auth={"type": "header", "header": "X-Api-Key", "value": "key-secret-123456"},
    )
    source = build(settings, session)
    obs = await source.poll("a:b@c")
    assert (obs.state, obs.upstream_state) == (State.RUNNING, "RUNNING")
    request, _ = fake.seen[0]
    assert request.match_info["id"] == "a:b@c"
    # Whatever an id holds stays one path segment.
    assert source.build_import_url("a/b c?#").raw_path == "/jobs/a%2Fb%20c%3F%23"
    # Polled through the URL's kept parts: the same URL, byte for byte.
    for tricky in ("a/b c?#", "ü%20&=+", "a:b@c"):
        assert str(source.import_url(tricky)) == str(source.build_import_url(tricky))
        assert source.import_url(tricky) == source.build_import_url(tricky)
    assert dict(request.query) == {"expand": "counts", "job": "a:b@c"}
    assert request.headers["X-Tenant"] == "t1"
    assert request.headers["X-Api-Key"] == "key-secret-123456"
    assert source.system == "acme"


async def test_graphql_post_puts_the_id_into_variables(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    fake.body = {"data": {"node": {"status": "DONE"}}}
    query = "query($id: ID!) { node(id: $id) { ... on Job { status } } }"
    settings = settings_for(
        url,
        request={
            "method": "POST",
            "path": "/graphql",
            "body": {"query": query, "variables": {"id": "gid://acme/Job/{id}"}},
        },
        extract={"state": "data.node.status"},
    )
    source = build(settings, session)
    assert (await source.poll("42")).state is State.SUCCEEDED
    request, body = fake.seen[0]
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"query": query, "variables": {"id": "gid://acme/Job/42"}}
    # The id is JSON-escaped where it goes: a quote cannot end the string.
    sent = source.body('x"y\\z')
    assert sent is not None
    assert json.loads(sent)["variables"]["id"] == 'gid://acme/Job/x"y\\z'


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"type": "bearer", "token": "tok-secret-123456"}, "Bearer tok-secret-123456"),
        (
            {"type": "basic", "username": "me", "password": "pw-secret-123456"},
            "Basic " + base64.b64encode(b"me:pw-secret-123456").decode(),
        ),
    ],
)
async def test_bearer_and_basic_auth(
    upstream: tuple[Upstream, str],
    session: aiohttp.ClientSession,
    auth: dict[str, Any],
    expected: str,
) -> None:
    fake, url = upstream
    await build(settings_for(url, auth=auth), session).poll("1")
    assert fake.seen[0][0].headers["Authorization"] == expected


async def test_secrets_from_env_and_file(
    upstream: tuple[Upstream, str],
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    fake, url = upstream
    monkeypatch.setenv("ACME_TOKEN", "env-secret-123456")
    await build(
        settings_for(url, auth={"type": "bearer", "token_env": "ACME_TOKEN"}), session
    ).poll("1")
    (tmp_path / "key").write_text("file-secret-123456\n")
    auth = {"type": "header", "header": "X-Key", "value_file": str(tmp_path / "key")}
    await build(settings_for(url, auth=auth), session).poll("1")
    assert fake.seen[0][0].headers["Authorization"] == "Bearer env-secret-123456"
    assert fake.seen[1][0].headers["X-Key"] == "file-secret-123456"


# --- OAuth2 client_credentials -------------------------------------------------------


class TokenServer:
    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []
        self.valid: set[str] = set()
        self.release = asyncio.Event()
        self.release.set()
        self.refuse = False

    async def token(self, request: web.Request) -> web.Response:
        self.forms.append({key: str(value) for key, value in (await request.post()).items()})
        await self.release.wait()
        if self.refuse:
            return json_response({"error": "invalid_client"}, status=401)
        token = f"access-{len(self.forms)}-abcdefgh"
        self.valid.add(token)
        return json_response({"access_token": token, "token_type": "Bearer"})

    async def job(self, request: web.Request) -> web.Response:
        _, _, token = request.headers.get("Authorization", "").partition(" ")
        if token not in self.valid:
            return json_response({"message": "expired"}, status=401)
        return json_response({"status": "DONE"})

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/oauth/token", self.token), web.get("/jobs/{id}", self.job)]


def oauth_settings(url: str, secret: str = "cs-secret-123456") -> dict[str, Any]:
    auth = {
        "type": "oauth2",
        "token_url": f"{url}/oauth/token",
        "client_id": "client-1",
        "client_secret": secret,
        "scope": "jobs.read",
    }
    return settings_for(url, auth=auth)


async def test_oauth2_token_single_flight_cached_and_refreshed_once_on_401(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    fake = TokenServer()
    url = await serve(aiohttp_server, fake.routes())
    outcomes: list[str] = []
    source = build(oauth_settings(url), session, SourceHooks(token=outcomes.append))
    assert source.fetches_tokens
    fake.release.clear()
    polls = [asyncio.ensure_future(source.poll(str(i))) for i in range(5)]
    await wait_until(lambda: len(fake.forms) == 1, what="the token request")
    fake.release.set()
    assert {obs.state for obs in await asyncio.gather(*polls)} == {State.SUCCEEDED}
    assert len(fake.forms) == 1  # one fetch for five polls
    assert fake.forms[0] == {
        "grant_type": "client_credentials",
        "client_id": "client-1",
        "client_secret": "cs-secret-123456",
        "scope": "jobs.read",
    }
    fake.valid.clear()  # the token expired
    assert (await source.poll("a")).state is State.SUCCEEDED
    assert len(fake.forms) == 2
    assert outcomes == ["success", "success"]


async def test_oauth2_password_grant_as_salesforce_has_it(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    fake = TokenServer()
    url = await serve(aiohttp_server, fake.routes())
    settings = oauth_settings(url)
    settings["auth"] |= {
        "grant_type": "password",
        "username": "u@example.com",
        "password": "pw-secret-123456",
    }
    assert (await build(settings, session).poll("a")).state is State.SUCCEEDED
    assert fake.forms[0] == {
        "grant_type": "password",
        "username": "u@example.com",
        "password": "pw-secret-123456",
        "client_id": "client-1",
        "client_secret": "cs-secret-123456",
        "scope": "jobs.read",
    }


async def test_oauth2_refused_credentials_hold_the_source(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    fake = TokenServer()
    fake.refuse = True
    url = await serve(aiohttp_server, fake.routes())
    outcomes: list[str] = []
    hooks = SourceHooks(token=outcomes.append)
    source = build(oauth_settings(url, "wrong-secret-1234"), session, hooks)
    with pytest.raises(SourceError) as caught:
        await source.poll("a")
    error = caught.value
    assert (error.reason, error.source_wide) == (ErrorReason.UNAUTHORIZED, True)
    assert error.retry_after == 300  # max_backoff: no login storm
    assert "invalid_client" in error.message
    assert "wrong-secret" not in str(error)
    assert outcomes == ["unauthorized"]


# --- extraction ------------------------------------------------------------------------


FULL_EXTRACT = {
    "state": "job.state",
    "reason": "job.errorMessage",
    "step": "job.phase",
    "completed": "job.processed",
    "expected": "job.total",
    "failed": "job.failed",
    "started": "job.createdDate",
    "ended": "job.finishedAt",
}


async def test_every_field_through_a_fake_upstream(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    fake.body = {
        "job": {
            "state": "BROKEN",
            "errorMessage": "bad row 7",
            "phase": "load",
            "processed": 10,
            "total": "12",  # GraphQL's 64-bit integers are strings
            "failed": 2.0,
            "createdDate": "2024-05-01T10:00:00.000+0000",
            "finishedAt": 1714557660000,
        }
    }
    obs = await build(settings_for(url, extract=FULL_EXTRACT), session).poll("1")
    assert obs.state is State.FAILED
    assert (obs.reason, obs.step) == ("bad row 7", "load")
    assert (obs.items_completed, obs.items_expected, obs.items_failed) == (10, 12, 2)
    assert (obs.started_at, obs.ended_at) == (1714557600.0, 1714557660.0)


@pytest.mark.parametrize(
    ("value", "time_format", "expected"),
    [
        ("2024-05-01T10:00:00Z", "auto", 1714557600.0),
        ("2024-05-01T12:00:00+02:00", "iso8601", 1714557600.0),
        ("2024-05-01T10:00:00", "auto", 1714557600.0),  # no zone: UTC
        (1714557600, "auto", 1714557600.0),
        (1714557600000, "auto", 1714557600.0),
        ("1714557600", "epoch_s", 1714557600.0),
        (1714557600000, "epoch_ms", 1714557600.0),
        (None, "auto", None),
    ],
)
def test_times_in_every_format(value: Any, time_format: str, expected: float | None) -> None:
    config = load(
        settings_for("http://x", extract={"state": "s", "started": "t", "time_format": time_format})
    )
    obs = Extractor(config).parse(answer({"s": "DONE", "t": value}))
    assert obs.started_at == expected


@pytest.mark.parametrize(
    ("extract", "body"),
    [
        ({"state": "s", "started": "t"}, {"s": "DONE", "t": "yesterday"}),
        ({"state": "s", "started": "t", "time_format": "iso8601"}, {"s": "DONE", "t": 17}),
        ({"state": "s", "completed": "n"}, {"s": "DONE", "n": -1}),
        ({"state": "s", "completed": "n"}, {"s": "DONE", "n": "12 rows"}),
        ({"state": "s", "completed": "n"}, {"s": "DONE", "n": True}),
        ({"state": "s"}, {"other": "DONE"}),
        ({"state": "length(s)"}, {"s": 5}),  # a function on the wrong type
        ({"state": "s", "reason": "r < `3`"}, {"s": "DONE", "r": ""}),  # jmespath's TypeError
    ],
)
def test_values_that_make_no_sense_are_invalid_responses(
    extract: dict[str, Any], body: Any
) -> None:
    extractor = Extractor(load(settings_for("http://x", extract=extract)))
    with pytest.raises(ParseError):
        extractor.parse(answer(body))


def test_unmapped_states_are_unknown_and_numbers_are_states() -> None:
    extractor = Extractor(load(settings_for("http://x", states={"3": "succeeded"})))
    assert extractor.parse(answer({"status": "PAUSED"})).state is State.UNKNOWN
    assert extractor.parse(answer({"status": "PAUSED"})).upstream_state == "PAUSED"
    assert extractor.parse(answer({"status": 3})).state is State.SUCCEEDED
    with pytest.raises(ParseError):
        extractor.parse(answer(b"<html>"))


def test_reason_that_is_not_text_is_shown_as_json() -> None:
    config = load(settings_for("http://x", extract={"state": "status", "reason": "errors"}))
    obs = Extractor(config).parse(answer({"status": "BROKEN", "errors": [{"row": 1}]}))
    assert obs.reason == '[{"row":1}]'


# --- not found and errors despite a 200 --------------------------------------------------


async def test_not_found_only_where_configured(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    fake.status, fake.body = 404, {"errorCode": "NOT_FOUND", "message": "no such job"}
    plain = build(settings_for(url), session)
    with pytest.raises(SourceError) as caught:
        await plain.poll("1")  # a 404 nobody said means "not found": a wrong URL
    assert (caught.value.reason, caught.value.source_wide) == (ErrorReason.CLIENT_ERROR, True)
    configured = build(
        settings_for(url, not_found={"status": [404], "when": "errorCode == 'NOT_FOUND'"}), session
    )
    assert (await configured.poll("1")).state is State.NOT_FOUND
    fake.body = {"message": "no route"}  # a 404 of the router, not of the API
    with pytest.raises(SourceError) as caught:
        await configured.poll("1")
    assert caught.value.source_wide


def test_not_found_by_body_condition_on_a_200() -> None:
    config = load(settings_for("http://x", not_found={"when": "data.node == null"}))
    extractor = Extractor(config)
    assert extractor.parse(answer({"data": {"node": None}})).state is State.NOT_FOUND
    assert extractor.parse(answer({"data": {"node": {}}, "status": "DONE"})).state is (
        State.SUCCEEDED
    )


GRAPHQL_ERRORS = [
    {
        "when": "errors[?extensions.code == 'THROTTLED']",
        "reason": "rate_limited",
        "message": "errors[0].message",
        "retry_after": "`2`",
    },
    {"when": "errors", "reason": "client_error", "message": "errors[0].message"},
]


async def test_errors_despite_a_200_and_throttling_holds_the_source(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    fake.body = {"errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED"}}]}
    # The throttled answer has no data: error rules come before "not found".
    settings = settings_for(url, errors=GRAPHQL_ERRORS, not_found={"when": "data.node == null"})
    source = build(settings, session)
    with pytest.raises(SourceError) as caught:
        await source.poll("1")
    error = caught.value
    assert (error.reason, error.source_wide, error.retry_after) == (
        ErrorReason.RATE_LIMITED,
        True,
        2.0,
    )
    assert "Throttled" in error.message
    fake.body = {"errors": [{"message": "Field 'nope' doesn't exist"}]}
    with pytest.raises(SourceError) as caught:
        await source.poll("1")
    assert (caught.value.reason, caught.value.source_wide) == (ErrorReason.CLIENT_ERROR, False)
    fake.body = {"data": {"node": {}}, "status": "DONE", "errors": []}  # [] is no error
    assert (await source.poll("1")).state is State.SUCCEEDED
    fake.body = {"data": {"node": None}}
    assert (await source.poll("1")).state is State.NOT_FOUND


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (401, ErrorReason.UNAUTHORIZED),
        (429, ErrorReason.RATE_LIMITED),
        (503, ErrorReason.SERVER_ERROR),
    ],
)
async def test_http_errors(
    upstream: tuple[Upstream, str],
    session: aiohttp.ClientSession,
    status: int,
    reason: ErrorReason,
) -> None:
    fake, url = upstream
    fake.status, fake.headers = status, {"Retry-After": "9"}
    with pytest.raises(SourceError) as caught:
        await build(settings_for(url), session).poll("1")
    assert caught.value.reason is reason
    if reason is not ErrorReason.UNAUTHORIZED:
        assert caught.value.retry_after == 9


# --- config errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"extract": {"state": "a["}}, "sources[0].extract.state: invalid JMESPath: "),
        (
            {"extract": {"state": "s", "reason": "x | | y"}},
            "sources[0].extract.reason: invalid JMESPath",
        ),
        ({"extract": {"state": ""}}, "sources[0].extract.state: invalid JMESPath: empty"),
        (
            {"extract": {"state": "upper(status)"}},
            "sources[0].extract.state: invalid JMESPath: unknown function upper()",
        ),
        (
            {"extract": {"state": "s", "ended": "a && contains(b)"}},
            "sources[0].extract.ended: invalid JMESPath: contains() takes 2 arguments, not 1",
        ),
        ({"extract": {}}, "sources[0].extract.state: required"),
        ({"not_found": {"when": "=="}}, "sources[0].not_found.when: invalid JMESPath"),
        ({"not_found": {}}, "sources[0].not_found: give status, when or both"),
        ({"errors": [{"when": "errors", "reason": "oops"}]}, "sources[0].errors[0].reason: "),
        (
            {"errors": [{"when": "[", "reason": "rate_limited"}]},
            "sources[0].errors[0].when: invalid",
        ),
        ({"states": {"DONE": "finished"}}, "sources[0].states.DONE: "),
        ({"auth": {"type": "bearer"}}, "sources[0].auth.token: required"),
        ({"auth": {"type": "digest"}}, "sources[0].auth.type: "),
        (
            {"auth": {"type": "bearer", "token": "t", "username": "u"}},
            "sources[0].auth.username: not used with type bearer",
        ),
        (
            {"auth": {"type": "oauth2", "token_url": "http://x/t", "client_id": "c"}},
            "sources[0].auth.client_secret: required for type oauth2",
        ),
        (
            {
                "auth": {
                    "type": "oauth2",
                    "grant_type": "password",
                    "token_url": "http://x/t",
                    "client_id": "c",
                    "client_secret": "s",
                    "password": "p",
                }
            },
            "sources[0].auth.username: required for type oauth2 with grant_type password",
        ),
        (
            {"auth": {"type": "bearer", "token": "t", "grant_type": "password"}},
            "sources[0].auth.grant_type: not used with type bearer",
        ),
        (
            {"auth": {"type": "oauth2", "client_id": "c", "client_secret": "s"}},
            "sources[0].auth.token_url: required",
        ),
        ({"request": {"body": {"q": 1}}}, "sources[0].request.body: a body needs method POST"),
        ({"request": {"path": "jobs/{id}"}}, "sources[0].request.path: must start with /"),
        ({"url": "ftp://x"}, "sources[0].url: must be an http"),
    ],
)
def test_config_errors_name_their_location(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_data({"sources": [settings_for("http://x") | change]}, "c.yaml")
    assert any(line.startswith(f"c.yaml: {expected}") for line in caught.value.errors), (
        caught.value.errors
    )


# --- the parser's contract, fuzzed ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
FUZZED = Extractor(
    load(settings_for("http://x", extract=FULL_EXTRACT, not_found={"status": [404]}))
)


@settings(max_examples=300, deadline=None)
@given(
    status=st.sampled_from([200, 200, 404, 401, 500]),
    body=st.fixed_dictionaries(
        {},
        optional={
            "job": st.fixed_dictionaries(
                {},
                optional={
                    k: json_values
                    for k in (
                        "state",
                        "errorMessage",
                        "phase",
                        "processed",
                        "total",
                        "failed",
                        "createdDate",
                        "finishedAt",
                    )
                },
            )
            | json_values
        },
    ),
)
def test_parse_is_total(status: int, body: Any) -> None:
    try:
        obs = FUZZED.parse(answer(body, status))
    except ParseError:
        assert status == 200
    except SourceError:
        assert status not in (200, 404)
    else:
        assert status in (200, 404)
        assert obs.state in State
