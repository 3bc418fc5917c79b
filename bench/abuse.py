"""Clients without credentials against a running exporter: password guessing,
half-sent requests holding connections, and big reads, each while a legitimate
client scrapes /metrics (with cached basic auth) and registers imports.

    .venv/bin/python bench/abuse.py             # 10,000 imports, 15 s a scenario
    .venv/bin/python bench/abuse.py --quick     # seconds; what the tests run

The exporter runs as a real process (`python -m exporter`, started with a soft
open-file limit of 1,024 as many systems give), basic auth on at bcrypt cost
12; the attackers run in another process. Per scenario the legitimate client's
p50/p99 latencies are printed as ratios to the same client on the idle
exporter. Targets: ratio <= 3 for password guessing and big reads; no failed
legitimate request while connections are held. A second table times what the
status page and a page of the list API hold the event loop for at 50,000
imports (in this process: the on-loop part of each handler).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import bcrypt

from bench.common import ROOT, free_port, percentile, print_table, simulator_process, write_json
from exporter.simulator import DEMO_CREDENTIALS

USER, PASSWORD = "prometheus", "scrape-password"
TOKEN = "abuse-bench-token-0123456789"
GOOD = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}

ATTACKER = r"""
import asyncio, base64, json, resource, sys, time
import aiohttp

mode, base, seconds, width = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
good = json.loads(sys.argv[5])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
statuses = {}
deadline = time.monotonic() + seconds

def count(key):
    statuses[str(key)] = statuses.get(str(key), 0) + 1

async def guess(session, n):
    # A different wrong password each time: nothing to cache.
    i = 0
    while time.monotonic() < deadline:
        i += 1
        auth = base64.b64encode(f"prometheus:guess-{n}-{i}".encode()).decode()
        try:
            headers = {"Authorization": "Basic " + auth}
            async with session.get(base + "/metrics", headers=headers) as r:
                await r.read()
                count(r.status)
        except Exception as exc:
            count(type(exc).__name__)

async def read(session, n):
    # Walk the list API page by page, and load the status page.
    after = None
    while time.monotonic() < deadline:
        try:
            if n % 2:
                async with session.get(base + "/", headers=good) as r:
                    await r.read()
                    count(r.status)
                continue
            params = {"limit": "5000"} | ({"after": after} if after else {})
            async with session.get(base + "/api/v1/imports", params=params, headers=good) as r:
                body = await r.json()
                count(r.status)
                after = body.get("next")
        except Exception as exc:
            count(type(exc).__name__)

async def hold(host, port):
    # Half a request, then silence; open again when the exporter hangs up.
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            count("held")
            try:
                await asyncio.wait_for(reader.read(), max(0.01, deadline - time.monotonic()))
                count("closed by exporter")
            except asyncio.TimeoutError:
                pass
            writer.close()
        except Exception as exc:
            count(type(exc).__name__)
            await asyncio.sleep(0.1)

async def main():
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if mode == "guess":
            await asyncio.gather(*(guess(session, n) for n in range(width)))
        elif mode == "read":
            await asyncio.gather(*(read(session, n) for n in range(width)))
        else:
            host, port = base.split("//")[1].split(":")
            await asyncio.gather(*(hold(host, int(port)) for _ in range(width)))
    print(json.dumps(statuses))

asyncio.run(main())
"""


async def legit_client(base: str, seconds: float, tag: str) -> dict[str, Any]:
    """For a while, scrape /metrics in a loop and, alongside, register an
    import (and forget it again, untimed) in another loop, as a Prometheus
    server and a pipeline would."""
    scrapes: list[float] = []
    registrations: list[float] = []
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    async def timed(
        session: aiohttp.ClientSession, what: str, method: str, url: str, **kwargs: Any
    ) -> float | None:
        started = time.perf_counter()
        try:
            async with session.request(method, url, **kwargs) as response:
                await response.read()
                if response.status in (200, 201, 204):
                    return time.perf_counter() - started
                failures[f"{what} {response.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures[f"{what} {type(exc).__name__}"] += 1
        return None

    async def scrape(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            took = await timed(session, "/metrics", "GET", f"{base}/metrics", headers=GOOD)
            if took is not None:
                scrapes.append(took)

    async def register(session: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            body = {"source": "bench", "id": f"bench-{tag}-{n}"}
            url = f"{base}/api/v1/imports"
            took = await timed(session, "register", "POST", url, json=body, headers=bearer)
            if took is not None:
                registrations.append(took)
                # Every scenario sees as many imports.
                one = f"{url}/bench/{body['id']}"
                await timed(session, "forget", "DELETE", one, headers=bearer)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(scrape(session), register(session))
    return {"scrapes": scrapes, "registrations": registrations, "failures": dict(failures)}


async def scenario(
    base: str, name: str, tag: str, mode: str | None, width: int, seconds: float
) -> dict[str, Any]:
    attacker = None
    if mode is not None:
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ATTACKER, mode, base, str(seconds + 1), str(width),
            json.dumps(GOOD), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(min(1.0, seconds / 3))  # let the attack build up
    legit = await legit_client(base, seconds, tag)
    attack: dict[str, int] = {}
    if attacker is not None:
        out, _ = await asyncio.wait_for(attacker.communicate(), seconds + 60)
        attack = json.loads(out or b"{}")
    return {"scenario": name, "width": width, **legit, "attack": attack}


def summary(result: dict[str, Any], idle: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "scenario": result["scenario"],
        "attackers": result["width"],
        "attack_answers": result["attack"],
        "failed_legit_requests": sum(result["failures"].values()),
        "failures": result["failures"],
    }
    for kind in ("scrapes", "registrations"):
        values = result[kind]
        out[f"{kind}_n"] = len(values)
        for q in (50, 99):
            out[f"{kind}_p{q}_s"] = percentile(values, q)
            base = idle[f"{kind}_p{q}_s"] if idle else out[f"{kind}_p{q}_s"]
            out[f"{kind}_p{q}_ratio"] = out[f"{kind}_p{q}_s"] / base if base else float("nan")
    return out


def write_configs(folder: Path, url: str, imports: int) -> tuple[Path, Path]:
    (folder / "tokens").write_text(TOKEN + "\n")
    ids = "".join(f"\n      - id: 'bench-{n}'" for n in range(imports))
    config = folder / "config.yaml"
    config.write_text(
        f"""
api:
  tokens_file: tokens
  max_imports_per_source: 1000000
sources:
  - name: bench
    type: elevate
    url: {url}
    api_key: {DEMO_CREDENTIALS.elevate_api_key}
    interval: 10m
    concurrency: 4
    imports:{ids}
"""
    )
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()
    web = folder / "web.yml"
    web.write_text(f'basic_auth_users:\n  {USER}: "{hashed}"\n')
    return config, web


@contextlib.asynccontextmanager
async def exporter_process(folder: Path, url: str, imports: int) -> Any:
    config, web = write_configs(folder, url, imports)
    port = free_port()

    def soft_limit_1024() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", "--config.file", str(config),
        "--web.config.file", str(web), "--web.listen-address", f"127.0.0.1:{port}",
        "--storage.path", str(folder / "state.db"), "--log.level", "error",
        cwd=ROOT, preexec_fn=soft_limit_1024,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    log = asyncio.ensure_future(process.stderr.read())
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(120):
            while True:
                if process.returncode is not None:
                    raise RuntimeError((await log).decode()[-2000:])
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{base}/-/healthy", headers=GOOD) as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield base, process.pid
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log_bytes = len(await log)
        print(f"exporter log: {log_bytes} bytes at level error")


async def run(url: str, imports: int, seconds: float, quick: bool) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="abuse-bench-") as folder:
        async with exporter_process(Path(folder), url, imports) as (base, _pid):
            await legit_client(base, min(seconds, 3.0), "warm")  # connections, caches
            idle = summary(await scenario(base, "idle", "s0", None, 0, seconds), None)
            rows = [idle]
            plan = [
                ("1 password guessing", "guess", 16 if quick else 64),
                ("2 half-sent requests", "hold", 200 if quick else 1100),
                ("3 big reads", "read", 2 if quick else 4),
            ]
            for n, (name, mode, width) in enumerate(plan, 1):
                # Let queued password checks and held connections of the
                # previous scenario drain first.
                await asyncio.sleep(min(12.0, seconds))
                result = await scenario(base, name, f"s{n}", mode, width, seconds)
                rows.append(summary(result, idle))
    for row in rows:
        row["imports"] = imports
        row["seconds"] = seconds
    return rows


def loop_hold_at(imports: int) -> dict[str, Any]:
    """What the status page and the list API do on the event loop, timed."""
    from exporter.api.models import ListQuery
    from exporter.api.routes import _page
    from exporter.model import Observation, State
    from exporter.pages import prepare_status_page
    from exporter.state import StateStore

    state = StateStore()
    state.add_source("bench", "elevate", 60.0)
    states = [State.SUCCEEDED, State.RUNNING, State.FAILED, State.WAITING]
    for n in range(imports):
        state.track("bench", f"bench-{n}")
        kind = states[n % len(states)]
        state.record_observation("bench", f"bench-{n}", Observation(kind, kind.value))
    now = time.time()
    holds: dict[str, list[float]] = {"page": [], "api": [], "api_filtered": [], "register": []}
    thread_render: list[float] = []
    for n in range(20):
        started = time.perf_counter()
        render = prepare_status_page(state, now)
        holds["page"].append(time.perf_counter() - started)
        started = time.perf_counter()
        render()
        thread_render.append(time.perf_counter() - started)
        started = time.perf_counter()
        _page((state.imports, state.parked), ListQuery(limit=5000))
        holds["api"].append(time.perf_counter() - started)
        started = time.perf_counter()
        _page(
            (state.imports, state.parked), ListQuery(limit=5000, state=State.BLOCKED)
        )  # matches none
        holds["api_filtered"].append(time.perf_counter() - started)
        started = time.perf_counter()
        state.imports.count_of("bench")
        state.track("bench", f"extra-{n}")
        holds["register"].append(time.perf_counter() - started)
    return {
        "imports": imports,
        **{f"{k}_max_ms": max(v) * 1000 for k, v in holds.items()},
        "page_thread_render_ms": percentile(thread_render, 50) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--imports", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    imports = args.imports or (300 if args.quick else 10_000)
    seconds = args.seconds or (2.0 if args.quick else 15.0)
    with simulator_process() as url:
        rows = asyncio.run(run(url, imports, seconds, args.quick))
    print_table(
        "A legitimate client under attack, as a ratio to the idle exporter "
        "(targets: <= 3 for 1 and 3; no failed request in 2)",
        [
            "scenario",
            "imports",
            "attackers",
            "/metrics p50 ms",
            "p50 ratio",
            "p99 ratio",
            "register p50 ms",
            "p50 ratio",
            "p99 ratio",
            "failed",
        ],
        [
            [
                r["scenario"],
                r["imports"],
                r["attackers"],
                r["scrapes_p50_s"] * 1000,
                r["scrapes_p50_ratio"],
                r["scrapes_p99_ratio"],
                r["registrations_p50_s"] * 1000,
                r["registrations_p50_ratio"],
                r["registrations_p99_ratio"],
                r["failed_legit_requests"],
            ]
            for r in rows
        ],
    )
    for r in rows[1:]:
        print(f"  {r['scenario']}: attacker answers {r['attack_answers']}")
    hold = loop_hold_at(5_000 if args.quick else 50_000)
    print_table(
        "Event-loop time per request (max of 20)",
        ["imports", "status page ms", "list page ms", "filtered page ms", "register ms"],
        [
            [
                hold["imports"],
                hold["page_max_ms"],
                hold["api_max_ms"],
                hold["api_filtered_max_ms"],
                hold["register_max_ms"],
            ]
        ],
    )
    write_json("abuse", {"results": rows, "loop_hold": hold}, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
