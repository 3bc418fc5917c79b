"""Never silently wrong about an upstream: an import that cannot be read still
shows, a refused credential holds its source once instead of once per import,
a 404 from a wrong URL is an error and not "import not found", and an old
error is not shown as a current one. Each against a real server on loopback."""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.config.loader import load_config, parse_config_data
from exporter.model import ErrorReason, Observation, Origin, SourceError, State
from exporter.pages import render_status_page
from exporter.runtime import Exporter
from exporter.simulator import DEMO_CREDENTIALS, Fault, Simulator, create_app
from exporter.state import StateStore
from tests.conftest import wait_until
from tests.fakes import zilliant_source
from tests.test_faults import Metrics

ServerFactory = Callable[..., Awaitable[TestServer]]
FAST = {"interval": "0.2s", "timeout": "0.2s", "max_backoff": "0.4s"}

BROKEN_ANSWERS: dict[str, tuple[ErrorReason, Callable[[], Awaitable[web.StreamResponse]]]] = {}


async def _html() -> web.StreamResponse:
    return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")


async def _no_status() -> web.StreamResponse:
    return web.json_response({"id": "x", "reason": None})


async def _huge() -> web.StreamResponse:
    return web.json_response({"status": "IN_PROGRESS", "pad": "x" * 20_000})


async def _error_500() -> web.StreamResponse:
    return web.Response(status=500, text="oops")


async def _slow() -> web.StreamResponse:
    await asyncio.sleep(2)
    return web.json_response({"status": "IN_PROGRESS"})


BROKEN_ANSWERS.update(
    {
        "html": (ErrorReason.INVALID_RESPONSE, _html),
        "no-status": (ErrorReason.INVALID_RESPONSE, _no_status),
        "huge": (ErrorReason.TOO_LARGE, _huge),
        "e500": (ErrorReason.SERVER_ERROR, _error_500),
        "slow": (ErrorReason.TIMEOUT, _slow),
    }
)


async def elevate_upstream(aiohttp_server: ServerFactory) -> str:
    """An Elevate API where ids ``ok-*`` are running and each broken kind of
    id (``html``, ``no-status``, ...; registered ones as ``api-<kind>``) always
    answers that way."""

    async def status(request: web.Request) -> web.StreamResponse:
        import_id = request.query["id"]
        kind = import_id.removeprefix("api-")
        if kind in BROKEN_ANSWERS:
            return await BROKEN_ANSWERS[kind][1]()
        return web.json_response({"id": import_id, "status": "IN_PROGRESS", "reason": None})

    server = await aiohttp_server(
        _app(web.get("/api/admin/v4/import/status", status)), shutdown_timeout=0.1
    )
    return str(server.make_url("")).rstrip("/")


def _app(*routes: web.RouteDef) -> web.Application:
    app = web.Application()
    app.add_routes(routes)
    return app


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Exporter], Awaitable[Exporter]]]:
    started: list[Exporter] = []

    async def start(exporter: Exporter) -> Exporter:
        await exporter.start()
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        await exporter.stop()


async def scrape(exporter: Exporter, query: str = "") -> Metrics:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{exporter.port}/metrics{query}") as response,
    ):
        assert response.status == 200
        return Metrics(await response.text())


# --- 1. an import that could never be read ------------------------------------


async def test_an_import_that_could_never_be_read_has_series_from_the_start(
    aiohttp_server: ServerFactory, running: Callable[[Exporter], Awaitable[Exporter]]
) -> None:
    url = await elevate_upstream(aiohttp_server)
    healthy = [{"id": f"ok-{i}"} for i in range(10)]
    broken = [{"id": kind} for kind in BROKEN_ANSWERS]
    config = parse_config_data(
        {
            "sources": [
                {
                    "name": "shop",
                    "type": "elevate",
                    "url": url,
                    "api_key": "k" * 8,
                    "max_response_bytes": 4096,
                    "imports": healthy + broken,
                    **FAST,
                }
            ]
        },
        "test",
    )
    exporter = await running(Exporter(config, "127.0.0.1:0"))
    for kind in BROKEN_ANSWERS:  # registered ones alike
        await exporter.register("shop", f"api-{kind}", None)
    state = exporter.state
    unreadable = [*BROKEN_ANSWERS, *(f"api-{kind}" for kind in BROKEN_ANSWERS)]

    def failed_twice() -> bool:
        return all(state.imports[("shop", i)].consecutive_failures >= 2 for i in unreadable)

    await wait_until(failed_twice, timeout=15)
    metrics = await scrape(exporter)
    assert metrics.get("import_source_up", source="shop") == 1  # the others answer
    for import_id in unreadable:
        ids = {"source": "shop", "import": import_id}
        assert metrics.get("import_state", state="pending", **ids) == 1, import_id
        assert metrics.get("import_state", state="running", **ids) == 0, import_id
        failures = metrics.get("import_consecutive_poll_failures", **ids)
        assert failures is not None, import_id
        assert failures >= 2, import_id
        assert metrics.get("import_last_poll_attempt_timestamp_seconds", **ids), import_id
        assert metrics.get("import_last_poll_success_timestamp_seconds", **ids) is None
        kind = import_id.removeprefix("api-")
        assert state.imports[("shop", import_id)].last_error_reason is BROKEN_ANSWERS[kind][0]
    for import_id, origin in (("html", "config"), ("api-html", "api")):
        info = {"source": "shop", "import": import_id, "upstream_state": "", "origin": origin}
        assert metrics.get("import_info", **info) == 1
    for entry in healthy:
        ids = {"source": "shop", "import": entry["id"]}
        assert metrics.get("import_consecutive_poll_failures", **ids) == 0


# --- 2. one wrong password ------------------------------------------------------


def zilliant_config(path: Path, url: str, imports: int, interval: str, max_backoff: str) -> None:
    ids = "".join(f"\n      - id: imp-{i:03d}" for i in range(imports))
    path.write_text(
        f"""
sources:
  - name: pricing
    type: zilliant
    url: {url}
    forwarded_host: {DEMO_CREDENTIALS.forwarded_host}
    interval: {interval}
    timeout: {interval}
    max_backoff: {max_backoff}
    salesforce:
      token_url: {url}/services/oauth2/token
      client_id: {DEMO_CREDENTIALS.client_id}
      client_secret: {DEMO_CREDENTIALS.client_secret}
      username: {DEMO_CREDENTIALS.username}
      password_file: password
    imports:{ids}
"""
    )


async def test_a_wrong_password_is_one_login_per_hold_not_one_per_import(
    aiohttp_server: ServerFactory,
    running: Callable[[Exporter], Awaitable[Exporter]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100 imports, a wrong password, 16 intervals: a handful of token requests
    (the source's own hold of max_backoff each), every import shows the
    refusal, and fixing the secret file and reloading recovers at once."""
    caplog.set_level(logging.INFO)
    simulator = Simulator()
    for i in range(100):
        simulator.add_zilliant_import(f"imp-{i:03d}", simulator.scenarios.zilliant[_RUNNING])
    server = await aiohttp_server(create_app(simulator))
    url = str(server.make_url("")).rstrip("/")
    (tmp_path / "password").write_text("wrong password")
    config_file = tmp_path / "config.yaml"
    zilliant_config(config_file, url, imports=100, interval="0.5s", max_backoff="2s")
    exporter = await running(
        Exporter(load_config(config_file), "127.0.0.1:0", None, lambda: load_config(config_file))
    )
    source = exporter.state.sources["pricing"]
    records = [exporter.state.imports[("pricing", f"imp-{i:03d}")] for i in range(100)]
    started = time.monotonic()
    await wait_until(lambda: all(r.poll_failing for r in records), timeout=5)
    await wait_until(lambda: time.monotonic() - started >= 8, timeout=10)  # 16 intervals

    assert source.token_requests is not None
    logins = simulator.counters["token"]
    assert 1 <= logins <= 6, logins  # one per hold of max_backoff (2 s) over 8 s
    assert source.token_requests["unauthorized"] == logins
    assert simulator.counters["zilliant"] == 0  # no status call without a token
    assert source.up is False
    for record in records:
        assert record.last_error_reason is ErrorReason.UNAUTHORIZED
        assert record.last_error is not None
        assert "invalid_grant" in record.last_error
    held = [r for r in caplog.records if "source held" in r.getMessage()]
    assert len(held) == logins  # once per hold, not once per import
    metrics = await scrape(exporter)
    exported = metrics.get(
        "import_source_token_requests_total", source="pricing", outcome="unauthorized"
    )
    # A hold may have ended meanwhile: between what was counted before and after.
    assert exported is not None
    assert logins <= exported <= simulator.counters["token"]

    (tmp_path / "password").write_text(DEMO_CREDENTIALS.password)
    assert await exporter.reload() == []
    reloaded = time.monotonic()
    await wait_until(lambda: exporter.state.sources["pricing"].up is True, timeout=5)
    assert time.monotonic() - reloaded <= 0.5 + 0.5  # one interval (and slack for a busy CI)
    await wait_until(lambda: all(not r.poll_failing for r in _records(exporter)), timeout=5)
    tokens = exporter.state.sources["pricing"].token_requests
    assert tokens is not None
    assert tokens["success"] == 1


_RUNNING = "7c9e6679-7425-40de-944b-e07fc1f69e29"  # a demo import running for ever


def _records(exporter: Exporter) -> list[Any]:
    return [r for r in exporter.state.imports.values() if r.source == "pricing"]


async def test_concurrent_polls_share_one_token_fetch_and_a_rejected_token_is_not_resent(
    aiohttp_server: ServerFactory, running: Callable[[Exporter], Awaitable[Exporter]]
) -> None:
    simulator = Simulator()
    server = await aiohttp_server(create_app(simulator))
    url = str(server.make_url("")).rstrip("/")
    config = parse_config_data(
        {
            "sources": [
                zilliant_source(
                    url, [_RUNNING, *(f"x{i}" for i in range(20))], concurrency=8, **FAST
                )
            ]
        },
        "test",
    )
    exporter = await running(Exporter(config, "127.0.0.1:0"))
    await wait_until(lambda: exporter.state.ready(), timeout=10)
    assert simulator.counters["token"] == 1  # 21 imports, 8 at once, one login
    # Every token expires (Zilliant answers 401): one new login for all.
    simulator.expire_tokens()
    polled = simulator.counters["zilliant"]
    await wait_until(lambda: simulator.counters["zilliant"] >= polled + 42, timeout=10)
    assert simulator.counters["token"] == 2
    # The token endpoint now refuses: the rejected token is never sent again.
    simulator.faults["token"] = Fault(status=400, body=b'{"error": "invalid_grant"}')
    simulator.expire_tokens()
    await wait_until(lambda: exporter.state.sources["pricing"].up is False, timeout=10)
    after_refusal = simulator.counters["zilliant"]
    await wait_until(lambda: simulator.counters["token"] >= 4, timeout=10)  # two more holds
    # Only the polls in flight when the token was rejected reached Zilliant.
    assert simulator.counters["zilliant"] - after_refusal <= 8


# --- 3. a 404 that is not about the import --------------------------------------


NOT_THE_API = {
    "plain text": (b"404: Not Found", "text/plain"),
    "an HTML page": (b"<html><h1>Not Found</h1></html>", "text/html"),
    "JSON about a tenant": (b'{"error": "unknown tenant acme"}', "application/json"),
}


@pytest.mark.parametrize("body", NOT_THE_API.values(), ids=NOT_THE_API.keys())
async def test_a_zilliant_url_typo_is_an_error_not_not_found(
    aiohttp_server: ServerFactory,
    running: Callable[[Exporter], Awaitable[Exporter]],
    caplog: pytest.LogCaptureFixture,
    body: tuple[bytes, str],
) -> None:
    caplog.set_level(logging.WARNING)

    async def everything(_: web.Request) -> web.Response:
        return web.Response(status=404, body=body[0], content_type=body[1])

    server = await aiohttp_server(_app(web.route("*", "/{tail:.*}", everything)))
    url = str(server.make_url("")).rstrip("/")
    config = parse_config_data(
        {
            "retention": "0.1s",
            "sources": [
                {
                    "name": "pricing",
                    "type": "zilliant",
                    "url": url,
                    "forwarded_host": "x.my.salesforce.com",
                    "token_json": '{"access_token": "static-token-value"}',
                    "imports": [{"id": f"imp-{i}"} for i in range(5)],
                    **FAST,
                }
            ],
        },
        "test",
    )
    exporter = await running(Exporter(config, "127.0.0.1:0"))
    await exporter.register("pricing", "registered-1", None)
    records = [r for r in exporter.state.imports.values() if r.source == "pricing"]
    await wait_until(lambda: all(r.consecutive_failures >= 2 for r in records), timeout=10)
    source = exporter.state.sources["pricing"]
    assert source.up is False
    for record in records:
        assert record.state is None  # never "not_found"
        assert record.last_error_reason is ErrorReason.CLIENT_ERROR
    assert ("pricing", "registered-1") in exporter.state.imports  # retention does not apply
    held = [r.getMessage() for r in caplog.records if getattr(r, "source", None) == "pricing"]
    # Once per hold of the source, not once per import and poll.
    assert held
    assert all("source held" in line for line in held)
    assert len(held) <= source.errors_total[ErrorReason.CLIENT_ERROR]
    page = render_status_page(exporter.state, time.time())
    assert "endpoint not found, check url" in page
    assert "not_found" not in page.split("<h2>Imports")[1].split("</form>")[1]


async def test_only_the_apis_own_answer_means_not_found(
    aiohttp_server: ServerFactory, running: Callable[[Exporter], Awaitable[Exporter]]
) -> None:
    simulator = Simulator()  # answers {"message": "Import ID not found."} for unknown ids
    server = await aiohttp_server(create_app(simulator))
    url = str(server.make_url("")).rstrip("/")
    config = parse_config_data(
        {"sources": [zilliant_source(url, ["no-such-import", _RUNNING], **FAST)]},
        "test",
    )
    exporter = await running(Exporter(config, "127.0.0.1:0"))
    await wait_until(lambda: exporter.state.ready(), timeout=10)
    assert exporter.state.imports[("pricing", "no-such-import")].state is State.NOT_FOUND
    assert exporter.state.sources["pricing"].up is True


async def test_a_rocketchat_route_404_is_a_wrong_url(
    aiohttp_server: ServerFactory, running: Callable[[Exporter], Awaitable[Exporter]]
) -> None:
    async def everything(_: web.Request) -> web.Response:
        return web.Response(status=404, text="Not Found")

    server = await aiohttp_server(_app(web.route("*", "/{tail:.*}", everything)))
    url = str(server.make_url("")).rstrip("/")
    config = parse_config_data(
        {
            "sources": [
                {
                    "name": "chat",
                    "type": "rocketchat",
                    "url": url,
                    "user_id": "u",
                    "auth_token": "t" * 8,
                    **FAST,
                }
            ]
        },
        "test",
    )
    exporter = await running(Exporter(config, "127.0.0.1:0"))
    record = next(iter(exporter.state.imports.values()))
    await wait_until(lambda: record.consecutive_failures >= 1, timeout=10)
    assert record.state is None
    assert record.last_error is not None
    assert "endpoint not found, check url" in record.last_error
    assert exporter.state.sources["chat"].up is False


def test_errors_never_expire_a_registered_import() -> None:
    """Retention forgets registered imports that ended or were not found, never
    ones whose polls fail: an error says nothing about the import."""
    state = StateStore(clock=lambda: 1_000.0)
    state.add_source("pricing", "zilliant", 30.0)
    state.track("pricing", "failing", origin=Origin.API)
    state.track("pricing", "gone", origin=Origin.API)
    error = SourceError(ErrorReason.CLIENT_ERROR, "HTTP 404", source_wide=True)
    state.record_source_error("pricing", error, ["failing"])
    state.record_observation("pricing", "gone", Observation(State.NOT_FOUND, "NOT_FOUND"))
    later = StateStore(clock=lambda: 10_000.0)
    later.imports = state.imports
    assert [r.import_id for r in later.expired(retention=60)] == ["gone"]


# --- 5. old errors shown as current ------------------------------------------------


async def test_the_api_tells_a_current_error_from_an_old_one(
    aiohttp_server: ServerFactory, running: Callable[[Exporter], Awaitable[Exporter]]
) -> None:
    simulator = Simulator()
    server = await aiohttp_server(create_app(simulator))
    url = str(server.make_url("")).rstrip("/")
    config = parse_config_data(
        {
            "sources": [
                {
                    "name": "shop",
                    "type": "elevate",
                    "url": url,
                    "api_key": DEMO_CREDENTIALS.elevate_api_key,
                    "imports": [{"id": "1004"}],
                    **FAST,
                }
            ]
        },
        "test",
    )
    exporter = await running(Exporter(config, "127.0.0.1:0"))
    record = exporter.state.imports[("shop", "1004")]
    await wait_until(lambda: record.last_success is not None)
    simulator.faults["elevate"] = Fault(status=500)
    await wait_until(lambda: record.poll_failing)

    async def view() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{exporter.port}/api/v1/imports/shop/1004") as response,
        ):
            assert response.status == 200
            data: dict[str, Any] = await response.json()
            return data

    failing = await view()
    assert failing["poll_failing"] is True
    assert failing["consecutive_poll_failures"] >= 1
    assert "HTTP 500" in failing["last_error"]["message"]
    simulator.faults.clear()
    await wait_until(lambda: not record.poll_failing)
    answered = await view()
    assert answered["poll_failing"] is False
    assert answered["consecutive_poll_failures"] == 0
    assert "HTTP 500" in answered["last_error"]["message"]  # kept, as history
    assert answered["last_error"]["at"] < answered["last_poll_success_at"]


# --- 6. name[] over HTTP ------------------------------------------------------------


async def test_the_name_filter_works_on_metrics(
    aiohttp_server: ServerFactory, running: Callable[[Exporter], Awaitable[Exporter]]
) -> None:
    url = await elevate_upstream(aiohttp_server)
    config = parse_config_data(
        {
            "sources": [
                {
                    "name": "shop",
                    "type": "elevate",
                    "url": url,
                    "api_key": "k" * 8,
                    "imports": [{"id": "ok-1"}],
                    **FAST,
                }
            ]
        },
        "test",
    )
    exporter = await running(Exporter(config, "127.0.0.1:0"))
    await wait_until(lambda: exporter.state.ready())
    metrics = await scrape(exporter, "?name[]=import_source_up&name[]=process_open_fds")
    assert {s.name for s in metrics.samples} == {"import_source_up", "process_open_fds"}


# --- 6. smaller ways to mislead ---------------------------------------------------------

PASSWORD = "pä&ss word+1"


async def test_a_secret_echoed_back_in_the_form_it_was_sent_is_redacted(
    aiohttp_server: ServerFactory,
    running: Callable[[Exporter], Awaitable[Exporter]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Salesforce password goes out form-encoded (p%C3%A4%26ss+word%2B1); a
    token endpoint that quotes the request back must not reveal it anywhere."""
    caplog.set_level(logging.DEBUG)

    async def token(request: web.Request) -> web.Response:
        raw = (await request.read()).decode()
        sent = raw.split("password=", 1)[1].split("&", 1)[0]
        assert sent == quote_plus(PASSWORD)  # what the exporter itself sends
        return web.json_response({"error": f"bad {sent}", "error_description": raw}, status=400)

    server = await aiohttp_server(_app(web.post("/services/oauth2/token", token)))
    url = str(server.make_url("")).rstrip("/")
    config = parse_config_data(
        {
            "sources": [
                {
                    "name": "pricing",
                    "type": "zilliant",
                    "url": url,
                    "forwarded_host": "x.my.salesforce.com",
                    "salesforce": {
                        "token_url": f"{url}/services/oauth2/token",
                        "client_id": "client",
                        "client_secret": "client-secret-value",
                        "username": "user@example.com",
                        "password": PASSWORD,
                    },
                    "imports": [{"id": "imp-1"}],
                    **FAST,
                }
            ]
        },
        "test",
    )
    exporter = await running(Exporter(config, "127.0.0.1:0"))
    record = exporter.state.imports[("pricing", "imp-1")]
    await wait_until(lambda: record.poll_failing)
    assert record.last_error is not None
    assert "<redacted>" in record.last_error
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{exporter.port}"
        shown = [await (await session.get(f"{base}{path}")).text() for path in ("/", "/metrics")]
        shown.append(await (await session.get(f"{base}/api/v1/imports")).text())
    shown += [r.getMessage() for r in caplog.records]
    for form in (PASSWORD, quote_plus(PASSWORD), quote(PASSWORD, safe="")):
        for text in shown:
            assert form not in text
            assert html.escape(form) not in text


async def test_elevate_v3_logs_a_deprecation_at_start_and_on_reload(
    aiohttp_server: ServerFactory,
    running: Callable[[Exporter], Awaitable[Exporter]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    url = await elevate_upstream(aiohttp_server)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"sources:\n  - {{name: shop, type: elevate, url: '{url}', api_key: kkkkkkkk,"
        " api_version: v3, imports: [{id: ok-1}]}\n"
    )
    exporter = await running(
        Exporter(load_config(config_file), "127.0.0.1:0", None, lambda: load_config(config_file))
    )

    def deprecations() -> int:
        return sum(
            r.getMessage().startswith("deprecated setting") and getattr(r, "source", None) == "shop"
            for r in caplog.records
        )

    assert deprecations() == 1
    assert await exporter.reload() == []
    assert deprecations() == 2
    assert all(
        "2026-12-31" in r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()
    )
