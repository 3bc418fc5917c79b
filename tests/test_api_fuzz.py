"""Fuzz the registration API from the OpenAPI document it serves (schemathesis).

Valid and invalid requests are generated for every documented operation and
sent to a real exporter on loopback (in a thread with its own event loop,
polling the simulator). Checks: no 5xx, every status code, content type and
body is the documented one, and no invalid input is accepted (a negative case
must not get a 2xx). Deterministic (derandomized, no example database) and
bounded so it runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web

from exporter.config.loader import parse_config_data
from exporter.runtime import Exporter
from exporter.simulator import DEMO_CREDENTIALS, Simulator, create_app

TOKEN = "fuzzing-pipeline-token-31c5e0"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 100
REJECTION_STATUSES = ["400", "401", "403", "404", "405", "409", "413"]


def fuzz_config(base_url: str, base_dir: Path) -> Any:
    (base_dir / "tokens").write_text(f"{TOKEN}\n")
    creds = DEMO_CREDENTIALS
    # A slow interval: the fuzzer registers many imports; polling them is not the point.
    common = {"interval": "5s", "timeout": "2s"}
    return parse_config_data(
        {
            "api": {"tokens_file": "tokens", "max_imports_per_source": 40},
            "sources": [
                {
                    # The name of the documented example, so the example registers.
                    "name": "elevate-prod",
                    "type": "elevate",
                    "url": base_url,
                    "api_key": creds.elevate_api_key,
                    "imports": [{"id": "1001"}],
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
        },
        "fuzz config",
        base_dir=base_dir,
    )


class ExporterThread(threading.Thread):
    """The simulator and an exporter, on their own event loop in a thread."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(name="exporter-under-fuzz", daemon=True)
        self.base_dir = base_dir
        self.port = 0
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread
            self.error = exc
        finally:
            self.started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        runner = web.AppRunner(create_app(Simulator()), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            simulator = f"http://127.0.0.1:{runner.addresses[0][1]}"
            exporter = Exporter(fuzz_config(simulator, self.base_dir), "127.0.0.1:0")
            await exporter.start()
            try:
                self.port = exporter.port
                self.started.set()
                await self._stopping.wait()
            finally:
                await exporter.stop()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(timeout=15)
        assert not self.is_alive(), "the exporter thread did not stop"


@pytest.fixture(scope="module")
def exporter_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    thread = ExporterThread(tmp_path_factory.mktemp("fuzz"))
    thread.start()
    try:
        assert thread.started.wait(timeout=15), "the exporter did not start"
        if thread.error is not None:
            raise thread.error
        yield f"http://127.0.0.1:{thread.port}"
    finally:
        thread.stop()


CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {
            "mode": "all",  # valid and invalid data
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
        },
        "phases": {"stateful": {"enabled": False}},
        "checks": {
            "enabled": False,
            "not_a_server_error": {"enabled": True},
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},
            "response_headers_conformance": {"enabled": True},
            "negative_data_rejection": {
                "enabled": True,
                "expected-statuses": REJECTION_STATUSES,
            },
        },
        "headers": AUTH,
    }
)


@pytest.fixture(scope="module")
def api_schema(exporter_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{exporter_url}/api/v1/openapi.json", config=CONFIG)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32 (pytest/lazy.py) reads ``node._nodeid``, which pytest
    # 9.2 no longer has; give it one (harmless once schemathesis stops using it).
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_api_keeps_its_documented_promises(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(headers=AUTH)
