"""What every test shares: waiting on a condition with a deadline, a clock the
test moves, free loopback ports, and skipping when a real tool is missing.

Tests under ``tests/integration/`` (subprocesses, real Prometheus and
Alertmanager, Chromium, kubectl, systemd, the wheel) carry the
``integration`` marker: ``pytest -m "not integration"`` is the quick loop;
``.ci/run`` runs everything.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
INTEGRATION = Path(__file__).resolve().parent / "integration"
T0 = 1_700_000_000.0
"""The epoch second a :class:`Clock` starts at unless told otherwise."""


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Wait until ``condition()`` is true; fail after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(
            f"timed out after {timeout:g} s waiting for {what or condition}"
        ) from None


def wait_until_sync(condition: Callable[[], bool], timeout: float, what: str = "") -> None:
    """:func:`wait_until` for code without an event loop (subprocess checks)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(0.05)


class Clock:
    """A clock that stands still until the test moves it (``clock.now += 30``);
    counts how often it was read."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tool(name: str) -> str:
    """The path of a real tool the test talks to; skip if it is missing
    (``scripts/setup --test`` installs every one)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup --test installs it)")
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (stopped at its end); skips
    only if PostgreSQL or psycopg is not installed. Take a fresh database for
    a test with ``postgres.database()``."""
    from tests.postgres import running_server

    with running_server() as server:
        if isinstance(server, str):
            pytest.skip(server)
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
