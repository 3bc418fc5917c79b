"""Scrape cost: rendering /metrics for N imports (text and OpenMetrics)
against prometheus_client.generate_latest on a registry of labelled gauges
holding the same series, and the longest event-loop stall while a live
exporter serves scrapes and keeps polling.

    .venv/bin/python bench/scrape.py            # 100, 1,000 and 10,000 imports
    .venv/bin/python bench/scrape.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_config, percentile, print_table, simulator_process, write_json
from exporter.metrics import StateCollector
from exporter.model import Observation, State
from exporter.runtime import Exporter
from exporter.state import StateStore

SCRAPER = """
import json, sys, time, urllib.request
durations = []
for _ in range(int(sys.argv[2])):
    request = urllib.request.Request(sys.argv[1], headers={"Accept-Encoding": "gzip"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        assert response.status == 200
    durations.append(time.perf_counter() - t0)
print(json.dumps(durations))
"""
TARGET_RENDER_RATIO = 1.0
TARGET_MAX_STALL = 0.100


def filled_state(count: int) -> StateStore:
    """A state of ``count`` running imports, each polled twice."""
    clock = [1_700_000_000.0]
    state = StateStore(clock=lambda: clock[0])
    state.add_source("bench", "elevate", 30.0)
    for i in range(count):
        state.track("bench", f"bench-{i}", name=f"import {i}")
    for _ in range(2):
        for i in range(count):
            obs = Observation(State.RUNNING, "IN_PROGRESS", items_completed=i, items_expected=count)
            state.record_observation("bench", f"bench-{i}", obs)
        clock[0] += 30
    return state


def ours_registry(state: StateStore) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    return registry


def baseline_registry(source: CollectorRegistry) -> CollectorRegistry:
    """Labelled gauges holding exactly the samples our collector renders."""
    registry = CollectorRegistry(auto_describe=False)
    for family in source.collect():
        if family.type not in ("gauge", "counter"):
            continue  # the histogram is per source: a handful of samples
        names = sorted({key for sample in family.samples for key in sample.labels})
        gauge = Gauge(family.name, family.documentation, names, registry=registry)
        for sample in family.samples:
            if names:
                gauge.labels(**sample.labels).set(sample.value)
            else:
                gauge.set(sample.value)
    return registry


def time_renders(render: Any, registry: CollectorRegistry, repeat: int) -> tuple[list[float], int]:
    times = []
    size = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        size = len(render(registry))
        times.append(time.perf_counter() - t0)
    return times, size


async def loop_stall_during_scrapes(url: str, count: int, scrapes: int) -> dict[str, float]:
    config = bench_config(
        url,
        [{"id": f"bench-{i}"} for i in range(count)],
        interval="2s",
        timeout="2s",
        concurrency=8,
    )
    exporter = Exporter(config, "127.0.0.1:0")
    await exporter.start()
    try:
        async with asyncio.timeout(120):
            while not exporter.state.ready():
                await asyncio.sleep(0.05)
        requests_before = exporter.state.sources["bench"].requests_total
        worst = 0.0
        running = True

        async def watch_loop() -> None:
            nonlocal worst
            while running:
                t0 = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - t0 - 0.001)

        watcher = asyncio.create_task(watch_loop())
        # Scrape from another process, as Prometheus does (with gzip), so the
        # client's own work does not land on the exporter's event loop.
        scraper = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SCRAPER,
            f"http://127.0.0.1:{exporter.port}/metrics",
            str(scrapes),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await scraper.communicate()
        durations = json.loads(out)
        running = False
        await watcher
        polls = exporter.state.sources["bench"].requests_total - requests_before
    finally:
        await exporter.stop()
    return {
        "max_loop_stall_s": worst,
        "scrape_p50_s": percentile(durations, 50),
        "polls_during_scrapes": polls,
    }


async def main_async(sizes: list[int], repeat: int, scrapes: int) -> dict[str, Any]:
    results = []
    with simulator_process() as url:
        for count in sizes:
            state = filled_state(count)
            ours = ours_registry(state)
            base = baseline_registry(ours)
            row: dict[str, Any] = {"imports": count}
            for fmt, render in (("text", generate_latest), ("openmetrics", generate_openmetrics)):
                ours_times, ours_bytes = time_renders(render, ours, repeat)
                base_times, base_bytes = time_renders(render, base, repeat)
                row[fmt] = {
                    "ours_p50_s": percentile(ours_times, 50),
                    "ours_p99_s": percentile(ours_times, 99),
                    "baseline_p50_s": percentile(base_times, 50),
                    "baseline_p99_s": percentile(base_times, 99),
                    "ratio_p50": percentile(ours_times, 50) / percentile(base_times, 50),
                    "bytes": ours_bytes,
                    "baseline_bytes": base_bytes,
                }
            row["live"] = await loop_stall_during_scrapes(url, count, scrapes)
            results.append(row)
    return {"repeat": repeat, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = args.sizes or ([100] if args.quick else [100, 1000, 10000])
    repeat = 3 if args.quick else 15
    scrapes = 2 if args.quick else 10
    data = asyncio.run(main_async(sizes, repeat, scrapes))
    rows = []
    for r in data["results"]:
        for fmt in ("text", "openmetrics"):
            f = r[fmt]
            rows.append(
                [
                    r["imports"],
                    fmt,
                    f["ours_p50_s"] * 1000,
                    f["ours_p99_s"] * 1000,
                    f["baseline_p50_s"] * 1000,
                    f["ratio_p50"],
                    f["bytes"],
                    r["live"]["max_loop_stall_s"] * 1000 if fmt == "text" else "",
                ]
            )
    print_table(
        f"Scrape cost (targets: ratio <= {TARGET_RENDER_RATIO}, "
        f"loop stall <= {TARGET_MAX_STALL * 1000:g} ms)",
        [
            "imports",
            "format",
            "ours p50 ms",
            "ours p99 ms",
            "base p50 ms",
            "ratio",
            "bytes",
            "max stall ms",
        ],
        rows,
    )
    write_json("scrape", data, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
