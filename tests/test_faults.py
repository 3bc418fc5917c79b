"""Upstream faults against a live exporter: counted, logged, contained, recovered."""

from __future__ import annotations

import email.utils
import gzip
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp.test_utils import TestServer

from exporter.app import Exporter
from exporter.config import parse_config_data
from exporter.model import ErrorReason, State
from exporter.simulator import DEMO_CREDENTIALS, Fault, Simulator, create_app
from exporter.state import ImportRecord, SourceRecord
from tests.fakes import wait_for

ServerFactory = Callable[..., Awaitable[TestServer]]


@dataclass
class World:
    simulator: Simulator
    exporter: Exporter

    def source(self, name: str) -> SourceRecord:
        return self.exporter.state.sources[name]

    def record(self, source: str, import_id: str) -> ImportRecord:
        return self.exporter.state.imports[(source, import_id)]


@pytest.fixture
async def world(aiohttp_server: ServerFactory) -> AsyncIterator[World]:
    simulator = Simulator(speed=1.0)
    server = await aiohttp_server(create_app(simulator))
    url = str(server.make_url("")).rstrip("/")
    creds = DEMO_CREDENTIALS
    fast = {"interval": "0.4s", "timeout": "0.4s", "max_backoff": "0.4s"}
    config = parse_config_data(
        {
            "sources": [
                {
                    "name": "elevate",
                    "type": "elevate",
                    "url": url,
                    "api_key": creds.elevate_api_key,
                    "max_response_bytes": 4096,
                    "imports": [{"id": "1004", "name": "stuck promotions"}],
                    **fast,
                },
                {
                    "name": "chat",
                    "type": "rocketchat",
                    "url": url,
                    "user_id": creds.rocketchat_user_id,
                    "auth_token": creds.rocketchat_auth_token,
                    "check_operation": False,
                    "max_response_bytes": 4096,
                    **fast,
                },
            ]
        },
        "test",
    )
    exporter = Exporter(config, "127.0.0.1:0")
    await exporter.start()
    try:
        yield World(simulator, exporter)
    finally:
        await exporter.stop()


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


BOMB = gzip.compress(b" " * 2_000_000 + b"{}")

FAULTS = [
    ("timeout", "elevate", Fault(delay=3.0), ErrorReason.TIMEOUT),
    (
        "drip",
        "elevate",
        Fault(mode="drip", body=b'{"status": "SUCCESS"}', drip_interval=0.1),
        ErrorReason.TIMEOUT,
    ),
    ("closed", "elevate", Fault(mode="close"), ErrorReason.CONNECTION),
    (
        "reset",
        "elevate",
        Fault(mode="reset", body=b'{"status": "SUCCESS", "pad": "' + b"x" * 200 + b'"}'),
        ErrorReason.CONNECTION,
    ),
    ("500", "elevate", Fault(status=500), ErrorReason.SERVER_ERROR),
    ("502", "elevate", Fault(status=502), ErrorReason.SERVER_ERROR),
    ("503", "elevate", Fault(status=503), ErrorReason.SERVER_ERROR),
    (
        "429 seconds",
        "elevate",
        Fault(status=429, headers={"Retry-After": "1"}),
        ErrorReason.RATE_LIMITED,
    ),
    ("non-JSON", "elevate", Fault(body=b"<html>maintenance</html>"), ErrorReason.INVALID_RESPONSE),
    (
        "wrong shape",
        "elevate",
        Fault(body=b'{"status": ["IN_PROGRESS"]}'),
        ErrorReason.INVALID_RESPONSE,
    ),
    ("over the cap", "elevate", Fault(body=b" " * 100_000 + b"{}"), ErrorReason.TOO_LARGE),
    (
        "gzip bomb",
        "elevate",
        Fault(body=BOMB, headers={"Content-Encoding": "gzip"}),
        ErrorReason.TOO_LARGE,
    ),
    (
        "rocketchat 401",
        "rocketchat_progress",
        Fault(status=401, body=b'{"success":false}'),
        ErrorReason.UNAUTHORIZED,
    ),
    ("rocketchat 500", "rocketchat_progress", Fault(status=500), ErrorReason.SERVER_ERROR),
]


@pytest.mark.parametrize(
    ("kind", "fault", "reason"),
    [pytest.param(k, f, r, id=name) for name, k, f, r in FAULTS],
)
async def test_fault_is_counted_logged_contained_and_recovered(
    world: World, caplog: pytest.LogCaptureFixture, kind: str, fault: Fault, reason: ErrorReason
) -> None:
    faulty, healthy = ("elevate", "chat") if kind == "elevate" else ("chat", "elevate")
    import_id = "1004" if faulty == "elevate" else world.exporter.config.sources[1].server  # type: ignore[union-attr]
    record = world.record(faulty, import_id)
    await wait_for(lambda: record.last_success is not None and world.source(faulty).up is True)
    state_before = record.state
    world.simulator.faults[kind] = fault
    await wait_for(lambda: world.source(faulty).errors_total[reason] >= 1, timeout=10)
    failed_at = record.last_success
    assert world.source(faulty).up is False
    assert record.state is state_before  # the last known state is kept
    healthy_requests = world.source(healthy).requests_total
    await wait_for(lambda: world.source(healthy).requests_total >= healthy_requests + 3)
    assert record.last_success == failed_at  # staleness stays visible
    assert world.source(healthy).up is True
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and f"reason={reason.value}" in r.getMessage()
    ]
    assert lines and f"source={faulty}" in lines[0] and "\n" not in lines[0]

    del world.simulator.faults[kind]
    await wait_for(
        lambda: (
            world.source(faulty).up is True
            and record.last_success is not None
            and failed_at is not None
            and record.last_success > failed_at
        ),
        timeout=10,
    )


async def test_unknown_status_is_shown_as_unknown_with_the_raw_value(world: World) -> None:
    record = world.record("elevate", "1004")
    await wait_for(lambda: record.state is State.RUNNING)
    world.simulator.faults["elevate"] = Fault(
        body=b'{"id": "1004", "status": "PAUSED", "reason": null}'
    )
    await wait_for(lambda: record.state is State.UNKNOWN)
    assert record.observation is not None and record.observation.upstream_state == "PAUSED"
    assert world.source("elevate").up is True


async def test_rate_limit_http_date_and_rocketchat_reset_hold_the_source(world: World) -> None:
    elevate = world.source("elevate")
    world.simulator.faults["elevate"] = Fault(status=429, headers={"Retry-After": http_date(30)})
    await wait_for(lambda: elevate.errors_total[ErrorReason.RATE_LIMITED] >= 1)
    held = elevate.requests_total
    chat = world.source("chat")
    reset_ms = str(int((time.time() + 30) * 1000))
    world.simulator.faults["rocketchat_progress"] = Fault(
        status=429, headers={"X-RateLimit-Reset": reset_ms}, body=b'{"success": false}'
    )
    await wait_for(lambda: chat.errors_total[ErrorReason.RATE_LIMITED] >= 1)
    chat_held = chat.requests_total
    # Both sources are held for ~30 s: a burst of further requests would show here.
    scheduler = world.exporter.poller.schedulers["elevate"]
    assert scheduler._paused_until - time.monotonic() > 20
    assert world.exporter.poller.schedulers["chat"]._paused_until - time.monotonic() > 20
    assert (elevate.requests_total, chat.requests_total) == (held, chat_held)
