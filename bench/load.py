"""Scrapes under load: concurrent /metrics clients for a while, against an
exporter polling many imports while the simulator injects faults.

    .venv/bin/python bench/load.py             # 50 clients, 30 s, 1,000 imports
    .venv/bin/python bench/load.py --quick     # seconds; what the tests run

The clients run in a separate process (as Prometheus servers would), so
their work does not land on the exporter's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import aiohttp

from bench.common import bench_config, percentile, print_table, simulator_process, write_json
from exporter.runtime import Exporter

CLIENTS = """
import asyncio, json, sys, time
import aiohttp

async def main(url, clients, seconds):
    durations, failures = [], 0
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client():
            nonlocal failures
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
                        await r.read()
                        if r.status != 200:
                            failures += 1
                            continue
                except Exception:
                    failures += 1
                    continue
                durations.append(time.perf_counter() - t0)
        await asyncio.gather(*(client() for _ in range(clients)))
    print(json.dumps({"durations": durations, "failures": failures}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""

# Half the imports of each kind of answer: healthy, slow past the timeout,
# 500s, or bodies over the cap, rotating while the load runs.
FAULT_ROTATION = [
    {},
    {"elevate": {"delay": 3.0}},
    {"elevate": {"status": 503}},
    {"elevate": {"body_size": 1_000_000}},
    {"elevate": {"body": "<html>down</html>"}},
]


async def run(url: str, imports: int, clients: int, seconds: float) -> dict[str, Any]:
    config = bench_config(
        url,
        [{"id": f"bench-{i}"} for i in range(imports)],
        interval="2s",
        timeout="1s",
        max_backoff="4s",
        concurrency=16,
    )
    exporter = Exporter(config, "127.0.0.1:0")
    await exporter.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENTS,
            f"http://127.0.0.1:{exporter.port}/metrics",
            str(clients),
            str(seconds),
            stdout=asyncio.subprocess.PIPE,
        )
        async with aiohttp.ClientSession() as session:
            step = max(seconds / len(FAULT_ROTATION), 0.5)
            started = time.monotonic()
            while proc.returncode is None and time.monotonic() - started < seconds:
                for faults in FAULT_ROTATION:
                    async with session.post(f"{url}/_simulator/faults", json=faults) as response:
                        assert response.status == 200
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(proc.wait()), step)
            out, _ = await proc.communicate()
            async with session.post(f"{url}/_simulator/faults", json={}) as response:
                assert response.status == 200
        source = exporter.state.sources["bench"]
        polls, errors = source.requests_total, dict(source.errors_total)
    finally:
        await exporter.stop()
    result = json.loads(out)
    durations = result["durations"]
    return {
        "imports": imports,
        "clients": clients,
        "seconds": seconds,
        "scrapes_served": len(durations),
        "failures": result["failures"],
        "p50_s": percentile(durations, 50),
        "p99_s": percentile(durations, 99),
        "polls": polls,
        "poll_errors": {str(k): v for k, v in errors.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--imports", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # Thousands of failed polls are the point here; their log lines are not.
    logging.getLogger("exporter").setLevel(logging.CRITICAL)
    imports = args.imports or (100 if args.quick else 1000)
    clients = args.clients or (5 if args.quick else 50)
    seconds = args.seconds or (3.0 if args.quick else 30.0)
    with simulator_process() as url:
        data = asyncio.run(run(url, imports, clients, seconds))
    print_table(
        "Scrapes under load with upstream faults (target: no failed scrape)",
        [
            "imports",
            "clients",
            "seconds",
            "scrapes served",
            "failures",
            "p50 ms",
            "p99 ms",
            "polls",
        ],
        [
            [
                data["imports"],
                data["clients"],
                data["seconds"],
                data["scrapes_served"],
                data["failures"],
                data["p50_s"] * 1000,
                data["p99_s"] * 1000,
                data["polls"],
            ]
        ],
    )
    write_json("load", {"results": [data]}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
