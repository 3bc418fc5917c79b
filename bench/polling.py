"""Polling overhead: the exporter's polls per second and CPU per 1,000 polls,
against a bare aiohttp loop doing the same requests at the same concurrency;
and the same polls through the declarative source (Elevate configured as
``http_json``) against the native Elevate adapter.

    .venv/bin/python bench/polling.py            # 100, 1,000 and 10,000 imports
    .venv/bin/python bench/polling.py --quick    # seconds; what the tests run

The simulator runs in its own process; all share it, interleaved (baseline,
exporter, ``http_json``, then again, :data:`ROUNDS` times). The baseline runs
in this process, which has imported the exporter's web stack and set glibc's
allocation thresholds as the exporter does from its start (the same heap
conditions), and builds each request URL once. The simulator's answers
change every second, so the exporter's store really writes; each window (2 s) covers two
of its periodic writes. Ten rounds of short windows rather than two of 8 s:
the machine's speed moves by up to a third in phases of a few seconds, and
short windows in turn let each phase touch all three kinds
(``bench/window_noise.py``). A first window at each size warms the simulator
up and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_config, cpu_seconds, print_table, simulator_process, write_json
from exporter.exposition import return_large_buffers_to_the_os
from exporter.persistence import PERSIST_INTERVAL
from exporter.runtime import Exporter
from exporter.simulator import DEMO_CREDENTIALS

TARGET_RATE_RATIO = 0.85
TARGET_CPU_RATIO = 1.2
"""Issue 17's target against the honest baseline (an older issue had 1.25)."""
WINDOW_SECONDS = 2.0
"""A window's length (``--seconds``; 1 with ``--quick``)."""
ROUNDS = 10
"""Rounds of windows per size (baseline, exporter, ``http_json``); 1 with ``--quick``."""
WARM_UP_SECONDS = 4.0
"""A window of the baseline at each size, before the measured ones, not
counted (a quarter of it with ``--quick``): the first window against a
fresh simulator ran 10-20 % slower (more CPU a poll: the client waited on
a simulator still warming up), and it went to whichever contender came
first."""
TARGET_HTTP_JSON_CPU_RATIO = 1.2
"""CPU per poll through ``http_json`` over the native Elevate adapter's."""


def as_http_json(native: Any) -> Any:
    """The bench's Elevate source said in configuration (``http_json``)."""
    from exporter.config.loader import parse_config_data
    from exporter.sources.elevate import STATUS_MAP

    source = native.sources[0]
    declared = {
        "name": source.name,
        "type": "http_json",
        "system": "elevate",
        "url": source.url,
        "concurrency": source.concurrency,
        "interval": "1h",
        "timeout": "10s",
        "request": {"path": "/api/admin/v4/import/status", "query": {"id": "{id}"}},
        "auth": {"type": "header", "header": "Api-Key", "value": DEMO_CREDENTIALS.elevate_api_key},
        "extract": {
            "state": "type(status) == 'string' && status || null",
            "reason": "reason",
            "id": "id",
        },
        "states": {status: state.value for status, state in STATUS_MAP.items()},
        "imports": [{"id": entry.id} for entry in source.imports],
    }
    return parse_config_data({"sources": [declared]}, "bench")


def bench_ids(count: int) -> list[str]:
    # churn-*: the simulator's answer changes every second, so the exporter's
    # store really writes (an unchanging answer is only a newer poll time).
    return [f"churn-{i}" for i in range(count)]


async def measure_baseline(
    url: str, count: int, concurrency: int, seconds: float
) -> dict[str, float]:
    """One ClientSession, ``concurrency`` workers cycling over the ids, parsing
    JSON; each request URL built once, as the exporter does."""
    urls = itertools.cycle(
        [URL(f"{url}/api/admin/v4/import/status").with_query(id=i) for i in bench_ids(count)]
    )
    headers = {"Api-Key": DEMO_CREDENTIALS.elevate_api_key, "Accept-Encoding": "gzip"}
    polls = 0
    measuring = False
    stop = False

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal polls
        while not stop:
            async with session.get(next(urls), headers=headers) as response:
                json.loads(await response.read())
            if measuring:
                polls += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(min(1.0, seconds / 3))  # warm up connections
        measuring = True
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, t1 = cpu_seconds(), time.perf_counter()
        measuring = False
        done = polls
        stop = True
        await asyncio.gather(*tasks)
    return {"polls": done, "seconds": t1 - t0, "cpu": cpu1 - cpu0}


async def measure_exporter(
    url: str,
    count: int,
    concurrency: int,
    seconds: float,
    storage: bool = True,
    *,
    declarative: bool = False,
) -> dict[str, float]:
    config = bench_config(
        url,
        [{"id": i} for i in bench_ids(count)],
        concurrency=concurrency,
        interval="1h",
        timeout="10s",
    )
    config = as_fast_as_allowed(as_http_json(config) if declarative else config)
    # With its SQLite store, as it runs in production: every poll changes the
    # state, so every import is written about once a second.
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/bench.db" if storage else None
        return await _measure(Exporter(config, "127.0.0.1:0", storage_path=path), seconds)


def as_fast_as_allowed(config: Any) -> Any:
    """``config`` with its source polling "as fast as the concurrency
    allows": every import due again as soon as its poll returns. (A config
    file cannot say this: interval >= timeout.)"""
    source = config.sources[0].model_copy(update={"interval": 1e-6})
    return config.model_copy(update={"sources": [source]})


async def _measure(exporter: Exporter, seconds: float) -> dict[str, float]:
    await exporter.start()
    try:
        record = exporter.state.sources["bench"]
        # Steady state: every import polled once and that first round written
        # to the store (a one-off write of every row), then measure.
        await asyncio.sleep(min(1.0, seconds / 3))
        async with asyncio.timeout(120):
            while not exporter.state.ready():
                await asyncio.sleep(0.05)
        await asyncio.sleep(PERSIST_INTERVAL * 1.5)
        polls0, cpu0, t0 = record.requests_total, cpu_seconds(), time.perf_counter()
        await asyncio.sleep(seconds)
        polls1, cpu1, t1 = record.requests_total, cpu_seconds(), time.perf_counter()
        errors = sum(record.errors_total.values())
    finally:
        await exporter.stop()
    return {"polls": polls1 - polls0, "seconds": t1 - t0, "cpu": cpu1 - cpu0, "errors": errors}


def summarize(run: dict[str, float]) -> tuple[float, float]:
    rate = run["polls"] / run["seconds"]
    cpu_per_1000 = run["cpu"] / max(run["polls"], 1) * 1000
    return rate, cpu_per_1000


def merged(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(run.get(key, 0) for run in runs) for key in runs[0]}


async def main_async(
    sizes: list[int],
    concurrency: int,
    seconds: float,
    storage: bool = True,
    rounds: int = ROUNDS,
    warm_up: float = WARM_UP_SECONDS,
) -> dict[str, Any]:
    # As Exporter.start does: the same allocation settings from the first
    # baseline run on, not only after the first exporter run.
    return_large_buffers_to_the_os()
    results = []
    with simulator_process() as url:
        for count in sizes:
            # Interleaved, so a drift of the machine touches all three alike.
            bases, ourses, declareds = [], [], []
            await measure_baseline(url, count, concurrency, warm_up)
            for _ in range(rounds):
                bases.append(await measure_baseline(url, count, concurrency, seconds))
                ourses.append(await measure_exporter(url, count, concurrency, seconds, storage))
                declareds.append(
                    await measure_exporter(
                        url, count, concurrency, seconds, storage, declarative=True
                    )
                )
            base, ours, declared = merged(bases), merged(ourses), merged(declareds)
            base_rate, base_cpu = summarize(base)
            rate, cpu = summarize(ours)
            declared_rate, declared_cpu = summarize(declared)
            results.append(
                {
                    "imports": count,
                    "baseline_polls_per_s": base_rate,
                    "baseline_cpu_s_per_1000": base_cpu,
                    "exporter_polls_per_s": rate,
                    "exporter_cpu_s_per_1000": cpu,
                    "rate_ratio": rate / base_rate,
                    "cpu_ratio": cpu / base_cpu,
                    "exporter_errors": ours.get("errors", 0),
                    "http_json_polls_per_s": declared_rate,
                    "http_json_cpu_s_per_1000": declared_cpu,
                    "http_json_cpu_ratio": declared_cpu / cpu,
                    "http_json_errors": declared.get("errors", 0),
                }
            )
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "rounds": rounds,
        "warm_up_s": warm_up,
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--no-storage", action="store_true", help="run the exporter without its SQLite store"
    )
    args = parser.parse_args()
    sizes = args.sizes or ([100] if args.quick else [100, 1000, 10000])
    seconds = args.seconds or (1.0 if args.quick else WINDOW_SECONDS)
    rounds = 1 if args.quick else ROUNDS
    warm_up = WARM_UP_SECONDS / 4 if args.quick else WARM_UP_SECONDS
    data = asyncio.run(
        main_async(sizes, args.concurrency, seconds, not args.no_storage, rounds, warm_up)
    )
    print_table(
        f"Polling overhead (concurrency {args.concurrency}, {seconds:g}s each; "
        f"targets: rate ratio >= {TARGET_RATE_RATIO}, CPU ratio <= {TARGET_CPU_RATIO}, "
        f"http_json CPU ratio <= {TARGET_HTTP_JSON_CPU_RATIO})",
        [
            "imports",
            "base polls/s",
            "ours polls/s",
            "rate ratio",
            "base CPU/1k",
            "ours CPU/1k",
            "CPU ratio",
            "http_json CPU/1k",
            "http_json/native CPU",
        ],
        [
            [
                r["imports"],
                r["baseline_polls_per_s"],
                r["exporter_polls_per_s"],
                r["rate_ratio"],
                r["baseline_cpu_s_per_1000"],
                r["exporter_cpu_s_per_1000"],
                r["cpu_ratio"],
                r["http_json_cpu_s_per_1000"],
                r["http_json_cpu_ratio"],
            ]
            for r in data["results"]
        ],
    )
    write_json("polling", data, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
