"""Config reload (SIGHUP, POST /-/reload), web security on every endpoint, and
secrets never shown anywhere."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp.test_utils import TestServer

from exporter.app import Exporter
from exporter.config import load_config
from exporter.model import ErrorReason, State
from exporter.simulator import DEMO_CREDENTIALS, Fault, Simulator, create_app
from tests.fakes import wait_for

ServerFactory = Callable[..., Awaitable[TestServer]]
ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, url: str, ids: list[str], key_file: str = "key") -> None:
    imports = "".join(f"\n      - id: '{i}'" for i in ids)
    path.write_text(
        f"""
sources:
  - name: elevate
    type: elevate
    url: {url}
    api_key_file: {key_file}
    interval: 0.3s
    timeout: 0.3s
    max_backoff: 0.3s
    imports:{imports}
"""
    )


async def simulator_url(aiohttp_server: ServerFactory, simulator: Simulator) -> str:
    server = await aiohttp_server(create_app(simulator))
    return str(server.make_url("")).rstrip("/")


async def test_reload_applies_valid_config_keeps_state_and_rejects_invalid(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    url = await simulator_url(aiohttp_server, Simulator())
    (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
    config_file = tmp_path / "config.yaml"
    write_config(config_file, url, ["1003", "1004"])
    exporter = Exporter(
        load_config(config_file), "127.0.0.1:0", None, lambda: load_config(config_file)
    )
    await exporter.start()
    state = exporter.state
    try:
        await wait_for(lambda: state.ready() and ("elevate", "1004") in state.imports)
        kept = state.imports[("elevate", "1004")]
        since = kept.state_since
        write_config(config_file, url, ["1004", "1005"])
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{exporter.port}/-/reload") as response:
                assert response.status == 200
            assert set(state.imports) == {("elevate", "1004"), ("elevate", "1005")}
            assert state.imports[("elevate", "1004")].state_since == since  # state kept
            await wait_for(lambda: state.imports[("elevate", "1005")].state is not None)

            config_file.write_text(
                "sources:\n  - name: elevate\n    type: elevate\n    interval: soon\n"
            )
            async with session.post(f"http://127.0.0.1:{exporter.port}/-/reload") as response:
                assert response.status == 400
                body = await response.json()
            assert any(
                "sources[0].interval: must be a duration like 30s" in e for e in body["errors"]
            )
            assert set(state.imports) == {
                ("elevate", "1004"),
                ("elevate", "1005"),
            }  # old config runs
            async with session.get(f"http://127.0.0.1:{exporter.port}/metrics") as response:
                text = await response.text()
            assert "import_exporter_config_last_reload_successful 0.0" in text
            assert "import_exporter_config_last_reload_success_timestamp_seconds" in text
    finally:
        await exporter.stop()


async def test_reload_rereads_secret_files(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    url = await simulator_url(aiohttp_server, Simulator())
    (tmp_path / "key").write_text("an-old-rotated-key")
    config_file = tmp_path / "config.yaml"
    write_config(config_file, url, ["1004"])
    exporter = Exporter(
        load_config(config_file), "127.0.0.1:0", None, lambda: load_config(config_file)
    )
    await exporter.start()
    source = exporter.state.sources["elevate"]
    try:
        await wait_for(lambda: source.errors_total[ErrorReason.UNAUTHORIZED] >= 1)
        (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
        assert await exporter.reload() == []
        await wait_for(lambda: exporter.state.imports[("elevate", "1004")].state is State.RUNNING)
        assert source.up is True
    finally:
        await exporter.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_sighup_reloads_the_running_process(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    url = await simulator_url(aiohttp_server, Simulator())
    (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
    config_file = tmp_path / "config.yaml"
    write_config(config_file, url, ["1004"])
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", "--config.file", str(config_file),
        "--web.listen-address", f"127.0.0.1:{port}",
        "--storage.path", str(tmp_path / "state.db"), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:

            async def metrics() -> str:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                        return await response.text()
                except aiohttp.ClientError:
                    return ""

            async with asyncio.timeout(20):
                while 'import="1004"' not in await metrics():
                    await asyncio.sleep(0.1)
            write_config(config_file, url, ["1005"])
            proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while True:
                    text = await metrics()
                    if 'import="1005"' in text and 'import="1004"' not in text:
                        break
                    await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_basic_auth_guards_every_endpoint_of_a_running_exporter(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    url = await simulator_url(aiohttp_server, Simulator())
    (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
    write_config(tmp_path / "config.yaml", url, ["1004"])
    hashed = bcrypt.hashpw(b"scrape-password", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(f'basic_auth_users:\n  prometheus: "{hashed}"\n')
    exporter = Exporter(
        load_config(tmp_path / "config.yaml"), "127.0.0.1:0", str(tmp_path / "web.yml")
    )
    await exporter.start()
    good = "Basic " + base64.b64encode(b"prometheus:scrape-password").decode()
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/", "/-/healthy", "/-/ready"):
                target = f"http://127.0.0.1:{exporter.port}{path}"
                async with session.get(target) as response:
                    assert response.status == 401, path
            async with session.get(
                f"http://127.0.0.1:{exporter.port}/metrics", headers={"Authorization": good}
            ) as response:
                assert response.status == 200
            async with session.post(f"http://127.0.0.1:{exporter.port}/-/reload") as response:
                assert response.status == 401
    finally:
        await exporter.stop()


SECRETS = {
    "api_key": "elevate-KEY-7f3a9c",
    "client_secret": "sf-CLIENT-SECRET-1b2c",
    "password": "sf-PASSWORD-9e8d",
    "auth_token": "rc-TOKEN-4d5e6f",
}


async def test_no_secret_appears_in_logs_pages_metrics_or_errors(
    aiohttp_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    simulator = Simulator()
    url = await simulator_url(aiohttp_server, simulator)
    os.environ["TEST_RC_TOKEN"] = SECRETS["auth_token"]
    (tmp_path / "key").write_text(SECRETS["api_key"])
    (tmp_path / "config.yaml").write_text(
        f"""
sources:
  - {{name: elevate, type: elevate, url: "{url}", api_key_file: key, interval: 0.3s,
      timeout: 0.3s, max_backoff: 0.3s, imports: [{{id: "1004"}}]}}
  - name: zilliant
    type: zilliant
    url: "{url}"
    forwarded_host: {DEMO_CREDENTIALS.forwarded_host}
    interval: 0.3s
    timeout: 0.3s
    max_backoff: 0.3s
    salesforce:
      token_url: "{url}/services/oauth2/token"
      client_id: {DEMO_CREDENTIALS.client_id}
      client_secret: {SECRETS["client_secret"]}
      username: {DEMO_CREDENTIALS.username}
      password: {SECRETS["password"]}
    imports: [{{id: "7c9e6679-7425-40de-944b-e07fc1f69e29"}}]
  - {{name: chat, type: rocketchat, url: "{url}", user_id: u1, auth_token_env: TEST_RC_TOKEN,
      interval: 0.3s, timeout: 0.3s, max_backoff: 0.3s}}
"""
    )
    caplog.set_level(logging.DEBUG)
    exporter = Exporter(load_config(tmp_path / "config.yaml"), "127.0.0.1:0")
    await exporter.start()
    outputs: list[str] = []
    try:
        # Every upstream answers badly, echoing the secrets back at us.
        echo = ("error: bad key " + " ".join(SECRETS.values())).encode()
        for kind in ("elevate", "token", "zilliant", "rocketchat_progress"):
            simulator.faults[kind] = Fault(status=500, body=echo)
        state = exporter.state
        await wait_for(lambda: all(s.errors_total for s in state.sources.values()))
        for kind in ("elevate", "rocketchat_progress"):
            simulator.faults[kind] = Fault(status=200, body=echo)
        await wait_for(
            lambda: state.sources["elevate"].errors_total[ErrorReason.INVALID_RESPONSE] >= 1
        )
        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/", "/-/ready"):
                async with session.get(f"http://127.0.0.1:{exporter.port}{path}") as response:
                    outputs.append(await response.text())
            async with session.post(f"http://127.0.0.1:{exporter.port}/-/reload") as response:
                outputs.append(await response.text())
        outputs += [r.getMessage() for r in caplog.records]
        outputs += [str(r.exc_info) for r in caplog.records if r.exc_info]
        outputs += [f"{s.last_error}" for s in state.sources.values()]
        outputs += [f"{r.last_error} {r.observation}" for r in state.imports.values()]
    finally:
        await exporter.stop()
        del os.environ["TEST_RC_TOKEN"]
    text = "\n".join(outputs)
    assert "unauthorized" in text or "server_error" in text  # the errors were recorded
    for name, secret in SECRETS.items():
        assert secret not in text, name
        assert base64.b64encode(secret.encode()).decode() not in text, name
