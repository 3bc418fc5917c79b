"""End to end, for real: the exporter on the simulator, scraped by a real
Prometheus evaluating the shipped rules (durations shortened), alerting
through a real Alertmanager to a webhook receiver in this test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from exporter.demo import start_demo_simulator
from exporter.runtime import Exporter
from grafana.dashboard import dashboard_queries
from tests.conftest import free_port, tool
from tests.integration.grafana_helpers import shortened_rules, substitute_variables

SPEED = 20.0
RUNNING_TOO_LONG = 4  # seconds of an Elevate import; the demo's healthy ones finish sooner


STOP_TIMEOUT = 10.0


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args``; at the end SIGTERM it and reap it (SIGKILL if it lingers)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # The fields after the parenthesised command: state, then ppid.
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(fields[1]) == pid:
                    found.add(int(entry.name))
    return found


def assert_gone(proc: subprocess.Popen[bytes], name: str) -> None:
    """Exited on SIGTERM by itself (not killed) and reaped: no such process left."""
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}, see its log"
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


async def wait_ready(
    session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]
) -> None:
    async with asyncio.timeout(30):
        while True:
            assert proc.poll() is None, f"{url}: process exited with {proc.returncode}"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def alerts(request: web.Request) -> web.Response:
        received.extend((await request.json())["alerts"])
        return web.Response()

    app = web.Application()
    app.router.add_post("/alerts", alerts)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1]), received
    finally:
        await runner.cleanup()


async def test_prometheus_scrapes_dashboards_have_data_and_alerts_reach_the_webhook(
    tmp_path: Path, webhook: tuple[int, list[dict[str, Any]]]
) -> None:
    prometheus = tool("prometheus")
    alertmanager = tool("prometheus-alertmanager")
    hook_port, received = webhook
    prom_port, am_port = free_port(), free_port()
    children_before = children(os.getpid())

    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump(shortened_rules({"systems": {"elevate": {"running": RUNNING_TOO_LONG}}}))
    )
    (tmp_path / "alertmanager.yml").write_text(
        yaml.safe_dump(
            {
                "route": {
                    "receiver": "webhook",
                    "group_by": ["alertname", "source", "import"],
                    "group_wait": "0s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [
                    {
                        "name": "webhook",
                        "webhook_configs": [{"url": f"http://127.0.0.1:{hook_port}/alerts"}],
                    }
                ],
            }
        )
    )

    async with start_demo_simulator(SPEED) as config, aiohttp.ClientSession() as session:
        exporter = Exporter(config, "127.0.0.1:0")
        await exporter.start()
        try:
            (tmp_path / "prometheus.yml").write_text(
                yaml.safe_dump(
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(tmp_path / "rules.yaml")],
                        "alerting": {
                            "alertmanagers": [
                                {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}
                            ]
                        },
                        "scrape_configs": [
                            {
                                "job_name": "import-status",
                                "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}],
                            }
                        ],
                    }
                )
            )
            with (
                process(
                    [
                        alertmanager,
                        f"--config.file={tmp_path / 'alertmanager.yml'}",
                        f"--storage.path={tmp_path / 'am-data'}",
                        f"--web.listen-address=127.0.0.1:{am_port}",
                        "--cluster.listen-address=",
                    ],
                    tmp_path / "alertmanager.log",
                ) as am_proc,
                process(
                    [
                        prometheus,
                        f"--config.file={tmp_path / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                    ],
                    tmp_path / "prometheus.log",
                ) as prom_proc,
            ):
                await wait_ready(session, f"http://127.0.0.1:{am_port}/-/ready", am_proc)
                await wait_ready(session, f"http://127.0.0.1:{prom_port}/-/ready", prom_proc)
                api = f"http://127.0.0.1:{prom_port}/api/v1/query"

                async def query(expr: str) -> list[dict[str, Any]]:
                    async with session.get(api, params={"query": expr}) as response:
                        body = await response.json()
                        assert body["status"] == "success", body
                        return list(body["data"]["result"])

                async with asyncio.timeout(20):
                    while not await query('up{job="import-status"} == 1'):
                        await asyncio.sleep(0.2)

                # Every query of every dashboard panel returns data.
                pending = {substitute_variables(q, "5s") for q in dashboard_queries()}
                async with asyncio.timeout(25):
                    while pending:
                        for expr in list(pending):
                            if await query(expr):
                                pending.discard(expr)
                        await asyncio.sleep(0.3)

                def firing(name: str) -> list[dict[str, str]]:
                    return [
                        a["labels"]
                        for a in received
                        if a["labels"]["alertname"] == name and a["status"] == "firing"
                    ]

                async with asyncio.timeout(30):
                    while not (
                        any(a["import"] == "1002" for a in firing("ImportStatusImportFailed"))
                        and any(
                            a["import"] == "1004"
                            for a in firing("ImportStatusImportRunningTooLong")
                        )
                        and any(
                            a["import"] == "1006" for a in firing("ImportStatusImportUnreadable")
                        )
                    ):
                        await asyncio.sleep(0.2)
        finally:
            await exporter.stop()

    failed = next(a for a in firing("ImportStatusImportFailed") if a["import"] == "1002")
    assert failed["severity"] == "critical"
    assert failed["source"] == "elevate-demo"
    assert failed["name"] == "price feed"
    assert failed["upstream_state"] == "FAILURE"
    assert failed["job"] == "import-status"
    # An Elevate import reports no progress but its state: it runs too long, never "stuck".
    long = next(a for a in firing("ImportStatusImportRunningTooLong") if a["import"] == "1004")
    assert (long["severity"], long["name"]) == ("warning", "stuck promotions")
    assert not firing("ImportStatusImportStuck")
    # The import behind a broken proxy was never read: it shows, and alerts.
    unreadable = next(a for a in firing("ImportStatusImportUnreadable") if a["import"] == "1006")
    assert (unreadable["name"], unreadable["origin"]) == ("behind a broken proxy", "config")
    assert not [a for a in firing("ImportStatusImportUnreadable") if a["import"] != "1006"]
    # The healthy Rocket.Chat import, whose counts keep rising, raised nothing.
    assert not [a for a in received if a["labels"].get("source") == "rocketchat-demo"]
    # Nothing is left behind: both servers stopped on SIGTERM, within
    # STOP_TIMEOUT, and were reaped; the exporter (in this process) closed its port.
    assert_gone(am_proc, "alertmanager")
    assert_gone(prom_proc, "prometheus")
    assert children(os.getpid()) <= children_before
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", exporter.port))
