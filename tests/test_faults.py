"""Upstream faults against a live exporter: counted, logged, contained, recovered,
and never read past the response cap."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from exporter.config.loader import parse_config_data
from exporter.logs import LogfmtFormatter
from exporter.model import ErrorReason, SourceError, State
from exporter.runtime import Exporter
from exporter.simulator import DEMO_CREDENTIALS, Fault, Phase, Simulator, create_app
from exporter.simulator.scenarios import demo_scenarios, rocketchat
from exporter.sources.registry import build_source
from exporter.state import ImportRecord, SourceRecord
from tests.conftest import wait_until

ServerFactory = Callable[..., Awaitable[TestServer]]

ELEVATE_ID = "1004"  # running for ever in the simulator
ZILLIANT_ID = "7c9e6679-7425-40de-944b-e07fc1f69e29"  # running for ever
STATUS_ENDPOINTS = {"elevate": "elevate", "zilliant": "zilliant", "rocketchat_progress": "chat"}
"""Simulator fault kind of each status endpoint -> the source polling it."""
SOURCE_OF_KIND = {**STATUS_ENDPOINTS, "token": "zilliant"}
FAULTY = {"interval": "0.15s", "timeout": "0.15s", "max_backoff": "0.15s"}
CAP = 4096


class Upstream:
    """The simulator on a loopback port of its own, which a test can take down
    (connections are then refused) and bring back on the same port."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        # A short shutdown: handlers still sleeping in a latency fault are cancelled.
        runner = web.AppRunner(create_app(self.simulator), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def steady_simulator(**kwargs: Any) -> Simulator:
    """The demo scenarios, with the Rocket.Chat server importing for ever."""
    scenarios = demo_scenarios()
    scenarios.rocketchat = rocketchat(
        Phase(0, "importer_importing_messages", total=5000, completed=600)
    )
    scenarios.rocketchat_cycle = None
    return Simulator(speed=1.0, scenarios=scenarios, **kwargs)


def faulty_sources(url: str, creds: Any = DEMO_CREDENTIALS) -> list[dict[str, Any]]:
    """One source per status endpoint of the simulator at ``url``."""
    return [
        {
            "name": "elevate",
            "type": "elevate",
            "url": url,
            "api_key": creds.elevate_api_key,
            "max_response_bytes": CAP,
            "imports": [{"id": ELEVATE_ID, "name": "stuck promotions"}],
            **FAULTY,
        },
        {
            "name": "zilliant",
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
            "max_response_bytes": CAP,
            "imports": [{"id": ZILLIANT_ID}],
            **FAULTY,
        },
        {
            "name": "chat",
            "type": "rocketchat",
            "url": url,
            "user_id": creds.rocketchat_user_id,
            "auth_token": creds.rocketchat_auth_token,
            "check_operation": False,
            "max_response_bytes": CAP,
            **FAULTY,
        },
    ]


@dataclass
class World:
    simulator: Simulator
    """Behind the elevate, zilliant and chat sources; faults go here."""
    upstream: Upstream
    exporter: Exporter
    """Also polls ``healthy``, an Elevate source on a second simulator."""

    def source(self, name: str) -> SourceRecord:
        return self.exporter.state.sources[name]

    def target(self, source: str) -> str:
        """The import id each source watches."""
        return {
            "elevate": ELEVATE_ID,
            "healthy": ELEVATE_ID,
            "zilliant": ZILLIANT_ID,
            "chat": self.upstream.url.removeprefix("http://"),
        }[source]

    def record(self, source: str) -> ImportRecord:
        return self.exporter.state.imports[(source, self.target(source))]

    async def metrics(self) -> Metrics:
        async with aiohttp.ClientSession() as session:
            target = f"http://127.0.0.1:{self.exporter.port}/metrics"
            async with session.get(target) as response:
                assert response.status == 200
                return Metrics(await response.text())


class Metrics:
    """One scrape of /metrics, as a user's query would read it."""

    def __init__(self, text: str) -> None:
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def get(self, name: str, **labels: str) -> float | None:
        for sample in self.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
        return None


@pytest.fixture
async def world(aiohttp_server: ServerFactory) -> AsyncIterator[World]:
    upstream = Upstream(steady_simulator())
    await upstream.start()
    healthy = await aiohttp_server(create_app(Simulator()))
    config = parse_config_data(
        {
            "sources": [
                *faulty_sources(upstream.url),
                {
                    "name": "healthy",
                    "type": "elevate",
                    "url": str(healthy.make_url("")).rstrip("/"),
                    "api_key": DEMO_CREDENTIALS.elevate_api_key,
                    "imports": [{"id": ELEVATE_ID}],
                    "interval": "0.1s",
                    "timeout": "0.1s",
                    "max_backoff": "0.1s",
                },
            ]
        },
        "test",
    )
    exporter = Exporter(config, "127.0.0.1:0")
    await exporter.start()
    try:
        yield World(upstream.simulator, upstream, exporter)
    finally:
        await exporter.stop()
        await upstream.stop()


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


def gzip_bomb(size: int) -> bytes:
    """A gzip body of a few KiB per MiB that inflates to ``size`` bytes of spaces."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * (1 << 20)
    parts = [packer.compress(block) for _ in range(size // len(block))]
    return b"".join([*parts, packer.compress(b"{}"), packer.flush()])


GZIP = {"Content-Encoding": "gzip"}
Faults = Callable[[], dict[str, Fault]]


def everywhere(fault: Fault) -> Faults:
    """The same fault at the three status endpoints."""
    return lambda: dict.fromkeys(STATUS_ENDPOINTS, fault)


def token(fault: Fault) -> Faults:
    """A fault of the Salesforce token endpoint (the Zilliant source needs a new token)."""
    return lambda: {"token": fault}


@dataclass(frozen=True)
class Case:
    faults: Faults
    """Built when the case runs (dates are relative to then)."""
    reason: ErrorReason
    says: str | Mapping[str, str]
    """What the log line's error says, for every source or per source."""
    held: float = 0.0
    """The upstream named a time: no request to it for at least this long."""
    down: bool = False
    """The upstream does not listen at all: connections are refused."""
    source_wide: bool = False
    """About the source, not the import (credentials): the source is held, one log line a hold."""

    def affected(self, faults: dict[str, Fault]) -> list[str]:
        if self.down:
            return list(STATUS_ENDPOINTS.values())
        return sorted({SOURCE_OF_KIND[kind] for kind in faults})

    def text(self, source: str) -> str:
        return self.says if isinstance(self.says, str) else self.says[source]


RESET_BODY = b'{"status": "SUCCESS", "pad": "' + b"x" * 200 + b'"}'
BOMB = gzip.compress(b" " * 2_000_000 + b"{}")
TIMED_OUT = "no complete answer within 0.15s"

CASES: dict[str, Case] = {
    "latency beyond the timeout": Case(
        everywhere(Fault(delay=1.0)), ErrorReason.TIMEOUT, TIMED_OUT
    ),
    "connection refused": Case(
        lambda: {}, ErrorReason.CONNECTION, "Cannot connect to host", down=True
    ),
    "connection dropped without an answer": Case(
        everywhere(Fault(mode="close")), ErrorReason.CONNECTION, "Server disconnected"
    ),
    "connection reset mid-body": Case(
        everywhere(Fault(mode="reset", body=RESET_BODY)), ErrorReason.CONNECTION, "body cut off"
    ),
    "401": Case(
        everywhere(Fault(status=401, body=b'{"success": false}')),
        ErrorReason.UNAUTHORIZED,
        "HTTP 401",
        source_wide=True,
    ),
    "500": Case(everywhere(Fault(status=500)), ErrorReason.SERVER_ERROR, "HTTP 500"),
    "502": Case(everywhere(Fault(status=502)), ErrorReason.SERVER_ERROR, "HTTP 502"),
    "503": Case(everywhere(Fault(status=503)), ErrorReason.SERVER_ERROR, "HTTP 503"),
    "429 Retry-After seconds": Case(
        everywhere(Fault(status=429, headers={"Retry-After": "1"})),
        ErrorReason.RATE_LIMITED,
        "HTTP 429",
        held=0.7,
    ),
    "429 Retry-After HTTP-date": Case(
        # Whole seconds: the source is held between 0.75 and 2 s.
        lambda: everywhere(Fault(status=429, headers={"Retry-After": http_date(2)}))(),
        ErrorReason.RATE_LIMITED,
        "HTTP 429",
        held=0.5,
    ),
    "429 X-RateLimit-Reset": Case(
        lambda: {
            "rocketchat_progress": Fault(
                status=429,
                headers={"X-RateLimit-Reset": str(int((time.time() + 1.5) * 1000))},
                body=b'{"success": false, "error": "[error-too-many-requests]"}',
            )
        },
        ErrorReason.RATE_LIMITED,
        "HTTP 429",
        held=0.9,
    ),
    "429 with an infinite wait": Case(
        # Not a time anyone can wait for: the source must not be held for ever.
        everywhere(Fault(status=429, headers={"Retry-After": "1e999", "X-RateLimit-Reset": "inf"})),
        ErrorReason.RATE_LIMITED,
        "HTTP 429",
    ),
    "200 non-JSON": Case(
        everywhere(Fault(body=b"<html>maintenance</html>")),
        ErrorReason.INVALID_RESPONSE,
        "not JSON",
    ),
    "200 JSON of the wrong shape": Case(
        everywhere(Fault(body=b'[{"status": "IN_PROGRESS"}]')),
        ErrorReason.INVALID_RESPONSE,
        "not a JSON object",
    ),
    "200 JSON of the wrong types": Case(
        lambda: {
            "elevate": Fault(body=b'{"id": "1004", "status": ["IN_PROGRESS"]}'),
            "zilliant": Fault(body=b'{"status": "RUNNING", "startDate": 1632834565}'),
            "rocketchat_progress": Fault(
                body=b'{"success": true, "step": "importer_done", "count": {"completed": "9"}}'
            ),
        },
        ErrorReason.INVALID_RESPONSE,
        {
            "elevate": "no status string",
            "zilliant": "startDate is not a string",
            "chat": "count.completed is not a count",
        },
    ),
    "body far over the cap": Case(
        everywhere(Fault(body=b" " * 100_000 + b"{}")), ErrorReason.TOO_LARGE, "byte cap"
    ),
    "body far over the cap, without Content-Length": Case(
        everywhere(Fault(mode="stream", body=b" " * 2_000_000 + b"{}")),
        ErrorReason.TOO_LARGE,
        "byte cap",
    ),
    "gzip body inflating past the cap": Case(
        everywhere(Fault(body=BOMB, headers=GZIP)), ErrorReason.TOO_LARGE, "byte cap"
    ),
    "body dripping past the timeout": Case(
        everywhere(Fault(mode="drip", body=b'{"status": "SUCCESS"}', drip_interval=0.05)),
        ErrorReason.TIMEOUT,
        TIMED_OUT,
    ),
    "token endpoint: latency beyond the timeout": Case(
        token(Fault(delay=1.0)),
        ErrorReason.TIMEOUT,
        "Salesforce token: no complete answer",
        source_wide=True,
    ),
    "token endpoint: 500": Case(
        token(Fault(status=500)),
        ErrorReason.SERVER_ERROR,
        "Salesforce token: HTTP 500",
        source_wide=True,
    ),
    "token endpoint: 200 non-JSON": Case(
        token(Fault(body=b"<html>login</html>")),
        ErrorReason.INVALID_RESPONSE,
        "Salesforce token: body is not JSON",
        source_wide=True,
    ),
    "token endpoint: JSON without a token": Case(
        token(Fault(body=b'{"token_type": "Bearer"}')),
        ErrorReason.INVALID_RESPONSE,
        "Salesforce token: answer has no access_token",
        source_wide=True,
    ),
    "token endpoint: body far over the cap": Case(
        token(Fault(mode="stream", body=b" " * 100_000)),
        ErrorReason.TOO_LARGE,
        "Salesforce token: response body over",
        source_wide=True,
    ),
}


async def apply(world: World, case: Case) -> dict[str, Fault]:
    faults = case.faults()
    world.simulator.faults.update(faults)
    if "token" in faults:
        world.simulator.expire_tokens()  # the next Zilliant poll needs a new token
    if case.down:
        await world.upstream.stop()
    return faults


async def clear(world: World, case: Case) -> None:
    world.simulator.faults.clear()
    if case.down:
        await world.upstream.start()


def poll_failed_lines(
    caplog: pytest.LogCaptureFixture, source: str, reason: ErrorReason
) -> list[str]:
    """The log lines (as the exporter's formatter writes them) about polls of
    ``source`` that failed for ``reason``."""
    formatter = LogfmtFormatter()
    return [
        formatter.format(r)
        for r in caplog.records
        if r.levelno == logging.WARNING
        and getattr(r, "source", None) == source
        and getattr(r, "reason", None) == reason.value
    ]


def check_logged(lines: list[str], world: World, name: str, case: Case) -> None:
    """One line per failed poll (one per hold where the whole source is held),
    saying where and what happened, each one line."""
    for line in lines:
        assert "\n" not in line
    if case.source_wide:
        assert 1 <= len(lines) <= world.source(name).errors_total[case.reason], lines
        for line in lines:
            assert f'msg="source held: every import fails alike" source={name} ' in line
            assert f"reason={case.reason.value} error=" in line
    else:
        assert len(lines) == world.source(name).errors_total[case.reason], lines
        for line in lines:
            assert f"import={world.target(name)} reason={case.reason.value} error=" in line
    assert any(case.text(name) in line for line in lines), lines


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
async def test_fault_is_counted_logged_contained_and_recovered(
    world: World, caplog: pytest.LogCaptureFixture, case: Case
) -> None:
    caplog.set_level(logging.WARNING)
    names = ["elevate", "zilliant", "chat", "healthy"]
    await wait_until(lambda: all(world.source(n).up is True for n in names))
    faults = await apply(world, case)
    affected = case.affected(faults)
    before = {name: world.record(name).state for name in affected}
    errors_before = {name: world.source(name).errors_total.copy() for name in affected}
    healthy = world.source("healthy")
    healthy_requests = healthy.requests_total

    def failures(name: str) -> int:
        """Failed polls of a source with the case's reason since the fault began."""
        return world.source(name).errors_total[case.reason] - errors_before[name][case.reason]

    # Counted and down, on every source whose endpoint misbehaves.
    await wait_until(lambda: all(failures(n) >= 1 for n in affected))
    failed_at: dict[str, float] = {}
    for name in affected:
        last_success = world.record(name).last_success
        assert last_success is not None, name
        failed_at[name] = last_success
    failed_clock = time.monotonic()
    requests_at_failure = {name: world.source(name).requests_total for name in affected}
    metrics = await world.metrics()
    for name in affected:
        source = world.source(name)
        assert source.up is False, name
        labels = {"source": name, "system": source.system}
        assert metrics.get("import_source_up", **labels) == 0, name
        assert metrics.get("import_source_errors_total", reason=case.reason.value, **labels), name
        # Only that reason: the fault is not miscounted as something else too.
        assert set(source.errors_total - errors_before[name]) == {case.reason}, name

    if case.held:
        # The fault stops at once; the source must still wait for the named time.
        await clear(world, case)

    # Contained: the healthy source beside them keeps polling on its interval.
    await wait_until(lambda: healthy.requests_total >= healthy_requests + 3 and healthy.up is True)

    if not case.held:
        # Failing again changes nothing the user relies on: the last known
        # state stays, and the last success stays put, so staleness shows.
        await wait_until(lambda: all(failures(n) >= 2 for n in affected))
    metrics = await world.metrics()
    for name in affected:
        # Logged: one line per failed poll, saying where and what happened.
        check_logged(poll_failed_lines(caplog, name, case.reason), world, name, case)
        record = world.record(name)
        assert record.state is before[name], name
        assert record.last_success == failed_at[name], name
        labels = {"source": name, "import": world.target(name)}
        state = before[name]
        assert state is not None
        assert metrics.get("import_state", state=state.value, **labels) == 1, name
        last_success = metrics.get("import_last_poll_success_timestamp_seconds", **labels)
        assert last_success == failed_at[name], name

    # Recovered at the next poll once the fault stops, without a restart.
    if not case.held:
        await clear(world, case)

    def recovered(name: str) -> bool:
        last = world.record(name).last_success
        return world.source(name).up is True and last is not None and last > failed_at[name]

    await wait_until(lambda: all(recovered(n) for n in affected), timeout=10)
    if case.held:
        # Nothing was sent before the time the upstream named: the one request
        # since the 429 is the poll that recovered.
        assert time.monotonic() - failed_clock >= case.held
        for name in affected:
            assert world.source(name).requests_total == requests_at_failure[name] + 1, name
    metrics = await world.metrics()
    for name in affected:
        labels = {"source": name, "system": world.source(name).system}
        assert metrics.get("import_source_up", **labels) == 1, name


async def test_unknown_status_is_shown_as_unknown_with_the_raw_value(world: World) -> None:
    """An unknown status is an answer, not an error: the import is unknown, the
    source stays up, and the raw value is kept for import_info."""
    sources = ["elevate", "zilliant", "chat"]
    await wait_until(lambda: all(world.record(n).state is State.RUNNING for n in sources))
    world.simulator.faults.update(
        {
            "elevate": Fault(body=b'{"id": "1004", "status": "PAUSED", "reason": null}'),
            "zilliant": Fault(body=b'{"status": "QUEUED", "startDate": null}'),
            "rocketchat_progress": Fault(body=b'{"success": true, "step": "importer_paused"}'),
        }
    )
    await wait_until(lambda: all(world.record(n).state is State.UNKNOWN for n in sources))
    metrics = await world.metrics()
    for name, raw in [("elevate", "PAUSED"), ("zilliant", "QUEUED"), ("chat", "importer_paused")]:
        record = world.record(name)
        assert record.observation is not None
        assert record.observation.upstream_state == raw
        assert world.source(name).up is True
        assert world.source(name).errors_total.total() == 0
        labels = {"source": name, "import": world.target(name)}
        assert metrics.get("import_info", upstream_state=raw, **labels) == 1
        assert metrics.get("import_state", state="unknown", **labels) == 1
    world.simulator.faults.clear()
    await wait_until(lambda: all(world.record(n).state is State.RUNNING for n in sources))


BIG = 64 * 1024 * 1024
PEAK_LIMIT = 8 * 1024 * 1024


def plain_stream() -> Fault:
    return Fault(mode="stream", body=b" " * BIG)


def bomb_with_length() -> Fault:
    return Fault(body=gzip_bomb(BIG), headers=GZIP)


def bomb_stream() -> Fault:
    return Fault(mode="stream", body=gzip_bomb(BIG), headers=GZIP)


@pytest.mark.parametrize(
    "make_fault",
    [
        pytest.param(plain_stream, id="64 MiB without Content-Length"),
        pytest.param(bomb_with_length, id="gzip bomb of 64 MiB with Content-Length"),
        pytest.param(bomb_stream, id="gzip bomb of 64 MiB without Content-Length"),
    ],
)
async def test_memory_stays_bounded_no_body_is_read_past_the_cap(
    aiohttp_server: ServerFactory, make_fault: Callable[[], Fault]
) -> None:
    simulator = Simulator()
    simulator.faults["elevate"] = make_fault()  # built before memory is traced
    server = await aiohttp_server(create_app(simulator))
    settings = faulty_sources(str(server.make_url("")).rstrip("/"))[0] | {
        "interval": "5s",
        "timeout": "5s",
    }
    config = parse_config_data({"sources": [settings]}, "test")
    async with aiohttp.ClientSession() as session:
        source = build_source(config.sources[0], session)
        tracemalloc.start()
        try:
            async with asyncio.timeout(10):
                with pytest.raises(SourceError) as caught:
                    await source.poll(ELEVATE_ID)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # Cut off at the cap, not at the timeout after reading on...
    assert caught.value.reason is ErrorReason.TOO_LARGE
    # ...and this process (exporter and simulator both) never held more than a
    # small fraction of the body: neither the whole body nor a whole inflation
    # (reading it whole peaks at over 64 MiB; this stays at 0.4-2.5 MiB).
    assert peak < PEAK_LIMIT, f"peak {peak} bytes while polling a {BIG} byte body"
