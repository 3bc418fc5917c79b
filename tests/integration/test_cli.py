"""The command line: --version, log formats and levels on a real run, a bad
listen address, and the Elevate URL a cluster id stands for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exporter import __version__
from exporter.config.loader import parse_config_data
from exporter.sources.elevate import ElevateConfig, ElevateSource
from exporter.sources.registry import build_source
from tests.conftest import free_port

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"=]+)')


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
    )


def test_version_prints_the_name_and_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"import-status-exporter {__version__}\n"


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:", "127.0.0.1:70000", "[::1]"])
def test_a_bad_listen_address_exits_2_naming_the_flag(tmp_path: Path, address: str) -> None:
    result = run_cli("--demo", "--web.listen-address", address, cwd=tmp_path)
    assert result.returncode == 2
    assert "--web.listen-address" in result.stderr
    assert repr(address) in result.stderr
    assert "host:port" in result.stderr  # and says what is expected


def test_a_busy_listen_address_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        result = run_cli("--demo", "--web.listen-address", address, cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "level=" not in line]
    assert errors == [f"error: cannot listen on {address}: address already in use"]
    assert "Traceback" not in result.stderr
    assert "Unclosed" not in result.stderr


# --- logs of a real run ------------------------------------------------------------


@dataclass
class Run:
    port: int
    code: int
    stdout: str
    stderr: str


async def run_demo_until_ready(*flags: str, cwd: Path) -> Run:
    """Start the demo, wait until /-/ready answers 200, SIGTERM it, wait for
    its exit; the process never outlives this call."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", "--demo", "--demo.speed", "20",
        "--web.listen-address", f"127.0.0.1:{port}", *flags,
        cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    # Read both pipes all along, so that a full pipe can never block the process.
    output = asyncio.gather(process.stdout.read(), process.stderr.read())
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                assert process.returncode is None, f"exited early with {process.returncode}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/-/ready") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await process.wait()
            out, err = await output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(Exception):
            await output
    return Run(port, code, out.decode(), err.decode())


def parse_logfmt(line: str) -> dict[str, str]:
    pairs = LOGFMT_PAIR.findall(line)
    assert " ".join(f"{key}={value}" for key, value in pairs) == line, line
    return {key: json.loads(value) if value.startswith('"') else value for key, value in pairs}


def check_lines(events: list[dict[str, Any]], port: int) -> None:
    """What every run logs at info, in either format."""
    for event in events:
        assert set(event) >= {"ts", "level", "logger", "msg"}, event
        assert TIMESTAMP.fullmatch(event["ts"]), event
        assert event["level"] in {"debug", "info", "warn", "error"}, event
    listening = [e for e in events if e["msg"].startswith("listening on ")]
    assert len(listening) == 1
    assert listening[0]["level"] == "info"
    assert listening[0]["logger"] == "exporter.runtime"
    assert f"127.0.0.1:{port}" in listening[0]["msg"]
    assert events[-1]["msg"] == "shutting down"
    assert events[-1]["level"] == "info"


async def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    run = await run_demo_until_ready("--log.format", "json", cwd=tmp_path)
    assert run.code == 0
    assert run.stdout == ""  # logs go to stderr
    lines = run.stderr.splitlines()
    assert lines
    events = [json.loads(line) for line in lines]
    assert all(isinstance(event, dict) for event in events)
    check_lines(events, run.port)


async def test_logfmt_logs_are_key_value_lines(tmp_path: Path) -> None:
    run = await run_demo_until_ready("--log.format", "logfmt", cwd=tmp_path)
    assert run.code == 0
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines
    events = [parse_logfmt(line) for line in lines]
    check_lines(events, run.port)
    # Values with spaces are quoted; plain ones are not.
    assert any(line.startswith("ts=") and ' msg="shutting down"' in line for line in lines)
    assert all(" level=info " in line for line in lines if "listening on" in line)


async def test_log_level_warn_hides_info_lines(tmp_path: Path) -> None:
    run = await run_demo_until_ready("--log.level", "warn", cwd=tmp_path)
    assert run.code == 0
    events = [parse_logfmt(line) for line in run.stderr.splitlines()]
    # The same run at info says "listening on" and "shutting down" (above).
    assert all(event["level"] in {"warn", "error"} for event in events), run.stderr
    assert "listening on" not in run.stderr
    assert "shutting down" not in run.stderr


# --- Elevate's URL from a cluster id ------------------------------------------------


def elevate_config(**fields: str) -> dict[str, Any]:
    source = {"name": "shop", "type": "elevate", "api_key": "k-test-1", **fields}
    return {"sources": [source]}


@pytest.mark.parametrize(
    ("fields", "base", "polled"),
    [
        (  # v4 by default: v3 reaches its end of life on 2026-12-31
            {"cluster_id": "w1a2b3c4"},
            "https://w1a2b3c4.elevate-api.cloud",
            "https://w1a2b3c4.elevate-api.cloud/api/admin/v4/import/status",
        ),
        (
            {"cluster_id": "w1a2b3c4", "api_version": "v3"},
            "https://w1a2b3c4.elevate-api.cloud",
            "https://w1a2b3c4.elevate-api.cloud/api/admin/v3/import/status",
        ),
        (  # an older cluster, by URL; a trailing slash does not double
            {"url": "https://w1a2b3c4.api.esales.apptus.cloud/"},
            "https://w1a2b3c4.api.esales.apptus.cloud",
            "https://w1a2b3c4.api.esales.apptus.cloud/api/admin/v4/import/status",
        ),
    ],
)
async def test_elevate_cluster_id_gives_the_cloud_url(
    fields: dict[str, str], base: str, polled: str
) -> None:
    config = parse_config_data(elevate_config(**fields), "config.yaml")
    (source_config,) = config.sources
    assert isinstance(source_config, ElevateConfig)
    assert source_config.base_url == base
    async with aiohttp.ClientSession() as session:  # no request is made
        source = build_source(source_config, session)
    assert isinstance(source, ElevateSource)
    assert source.url == polled


def test_a_storage_url_from_the_command_line_or_the_config_wins_over_any_path(
    tmp_path: Path,
) -> None:
    from exporter.cli import DEFAULT_STORAGE_PATH, choose_storage
    from exporter.config.loader import parse_config_data

    url = "postgresql://exporter:pw@db/imports"
    plain = parse_config_data({}, "config.yaml", base_dir=tmp_path)
    assert choose_storage(None, None, plain) == (str(DEFAULT_STORAGE_PATH), None)
    assert choose_storage(None, url, plain)[1] == url
    (tmp_path / "pg-url").write_text(url)
    shared = parse_config_data({"storage": {"url_file": "pg-url"}}, "config.yaml", tmp_path)
    assert choose_storage(None, None, shared)[1] == url
    # A path (the image sets $IMPORT_STATUS_EXPORTER_STORAGE_PATH) never hides the database.
    assert choose_storage("other.db", None, shared)[1] == url
    assert choose_storage("other.db", None, plain) == ("other.db", None)
