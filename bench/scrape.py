"""Scrape cost: rendering /metrics for N imports (text and OpenMetrics), as
the exporter does (each import's lines kept rendered, exporter.exposition),
against two baselines in the same run: the physical floor, a ``b"".join`` of
every import's lines already built as one bytes each, and the reference
collector (prometheus_client's ``generate_latest`` over ``StateCollector``,
which builds every family at each scrape, as the exporter did before). Also
gzip of the text body (ISA-L's level 1, which ``/metrics`` serves, and the
standard library zlib's levels 1 and 6), the CPU and page faults of a gzipped
body made as ``/metrics`` makes it, and the longest event-loop stall
while a live exporter serves scrapes and keeps polling.

    .venv/bin/python bench/scrape.py            # 1,000, 10,000 and 100,000 imports
    .venv/bin/python bench/scrape.py --quick    # seconds; what the tests run

"ours" is a scrape's render when every import's duration moves (they all
run) and nothing else changed since the last scrape; "ours, all changed" is
the render after every import changed (each rendered again, on the loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import zlib
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    bench_config,
    percentile,
    print_table,
    simulator_process,
    until_ready,
    write_json,
)
from exporter.exposition import (
    ImportLines,
    gzip_body,
    gzipped_body,
    render_metrics,
    return_large_buffers_to_the_os,
)
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
TARGET_RENDER_S = {10_000: 0.050, 100_000: 0.5}
TARGET_FLOOR_RATIO = 10.0
TARGET_MAX_STALL = 0.020
GZIPS = ("gzip_isal1", "gzip1", "gzip6")
FORMATS = {"text": "", "openmetrics": "application/openmetrics-text; version=1.0.0"}


def zlib_gzip(body: bytes, level: int) -> bytes:
    """The standard library's gzip, the baseline of ISA-L's (what ``/metrics`` uses)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(body) + compressor.flush()


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


def reference_registry(state: StateStore) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    return registry


def best_of(run: Any, repeat: int) -> tuple[list[float], Any]:
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    return times, result


async def measure_renders(state: StateStore, repeat: int) -> dict[str, Any]:
    lines = ImportLines(state)
    lines.take_changes()
    ours_registry = CollectorRegistry(auto_describe=False)  # and the per-source families
    ours_registry.register(StateCollector(state, imports=False))
    reference = reference_registry(state)
    row: dict[str, Any] = {}
    for fmt, accept in FORMATS.items():
        encoder, content_type = choose_encoder(accept)

        ours = partial(render_metrics, ours_registry, encoder, content_type, lines)

        ours()  # the first render applies every import's lines
        ours_times, body = best_of(ours, repeat)

        def all_changed(ours: Any = ours) -> bytes:
            render_every_import_again(lines)
            return bytes(ours())

        changed_times, _ = best_of(all_changed, max(1, repeat // 3))
        ref_times, ref_body = best_of(partial(encoder, reference), max(1, repeat // 3))
        row[fmt] = {
            "ours_p50_s": percentile(ours_times, 50),
            "ours_p99_s": percentile(ours_times, 99),
            "ours_all_changed_p50_s": percentile(changed_times, 50),
            "reference_p50_s": percentile(ref_times, 50),
            "reference_ratio": percentile(ours_times, 50) / percentile(ref_times, 50),
            "bytes": len(body),
            "reference_bytes": len(ref_body),
        }
        if fmt == "text":
            # The floor: every import's lines already one bytes each, joined.
            per_import = [
                b"".join(line if isinstance(line, bytes) else line[0] for line in kept)
                for kept in map(lines.lines_of, state.imports)
                if kept is not None
            ]
            floor_times, _ = best_of(partial(b"".join, per_import), repeat)
            row["floor_p50_s"] = percentile(floor_times, 50)
            row["floor_ratio"] = row[fmt]["ours_p50_s"] / row["floor_p50_s"]
            gzips = {
                "gzip_isal1": partial(gzip_body, body),  # the level /metrics serves at
                "gzip1": partial(zlib_gzip, body, 1),
                "gzip6": partial(zlib_gzip, body, 6),
            }
            for key, gzip in gzips.items():
                gz_times, gz = best_of(gzip, 3)
                row[f"{key}_s"] = min(gz_times)
                row[f"{key}_bytes"] = len(gz)
            row["served"] = await served_cost(lines, encoder, content_type, repeat)
    return row


def render_every_import_again(lines: ImportLines) -> None:
    """Every import marked changed and its lines rendered again, as after
    polls in no stable order (or a first render)."""
    lines.state._unrendered.update(dict.fromkeys(lines.state.imports, True))
    lines.take_changes()


async def served_cost(
    lines: ImportLines, encoder: Any, content_type: str, repeat: int
) -> dict[str, Any]:
    """A gzipped body as ``/metrics`` makes it (:func:`gzipped_body` of
    :meth:`ImportLines.render_packed`: each chunk's families compressed once
    they change, kept, and copied): the median CPU time of the process and
    page faults per body (fresh memory is zeroed and faulted in by the
    kernel, on the CPU of a render), when only the clock moved since the
    last render and when every import changed (a render then compresses
    every chunk: a first render, or polls in no stable order)."""

    def usage() -> tuple[float, int]:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_utime + use.ru_stime, use.ru_minflt

    row: dict[str, Any] = {}
    for kind, before in (("", None), ("all_changed_", render_every_import_again)):
        cpu, faults = [], []
        for _ in range(max(3, repeat // 3)):
            if before is not None:
                before(lines)
            cpu0, faults0 = usage()
            await gzipped_body(lines.render_packed(encoder, content_type))
            cpu1, faults1 = usage()
            cpu.append(cpu1 - cpu0)
            faults.append(faults1 - faults0)
        row[f"{kind}cpu_s"] = percentile(cpu, 50)
        row[f"{kind}page_faults"] = percentile(faults, 50)
    return row


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
        await until_ready(exporter)
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


async def main_async(sizes: list[int], repeat: int, scrapes: int, live: int) -> dict[str, Any]:
    return_large_buffers_to_the_os()  # every figure with memory handled as the exporter does
    results = []
    with simulator_process() as url:
        for count in sizes:
            row: dict[str, Any] = {"imports": count}
            row |= await measure_renders(filled_state(count), repeat)
            if count <= live:
                row["live"] = await loop_stall_during_scrapes(url, count, scrapes)
            results.append(row)
    return {"repeat": repeat, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument(
        "--live-up-to", type=int, default=10_000, help="largest size also run live (default 10,000)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = args.sizes or ([100] if args.quick else [1000, 10_000, 100_000])
    repeat = 3 if args.quick else 15
    scrapes = 2 if args.quick else 10
    data = asyncio.run(main_async(sizes, repeat, scrapes, args.live_up_to))
    rows = []
    for r in data["results"]:
        for fmt in FORMATS:
            f = r[fmt]
            rows.append(
                [
                    r["imports"],
                    fmt,
                    f["ours_p50_s"] * 1000,
                    f["ours_p99_s"] * 1000,
                    f["ours_all_changed_p50_s"] * 1000,
                    r["floor_p50_s"] * 1000 if fmt == "text" else "",
                    r["floor_ratio"] if fmt == "text" else "",
                    f["reference_p50_s"] * 1000,
                    f["reference_ratio"],
                    f["bytes"],
                    " / ".join(f"{r[k + '_s'] * 1000:.3g}" for k in GZIPS) if fmt == "text" else "",
                    " / ".join(f"{r[k + '_bytes']:,}" for k in GZIPS) if fmt == "text" else "",
                    (
                        f"{r['served']['cpu_s'] * 1000:.3g} / "
                        f"{r['served']['all_changed_cpu_s'] * 1000:.3g}"
                        if fmt == "text"
                        else ""
                    ),
                    (
                        f"{r['served']['page_faults']:,.0f} / "
                        f"{r['served']['all_changed_page_faults']:,.0f}"
                        if fmt == "text"
                        else ""
                    ),
                    r["live"]["max_loop_stall_s"] * 1000 if fmt == "text" and "live" in r else "",
                ]
            )
    print_table(
        f"Scrape cost (targets: p50 <= 50 ms at 10,000 and 0.5 s at 100,000; "
        f"<= {TARGET_FLOOR_RATIO:g}x the floor; loop stall <= {TARGET_MAX_STALL * 1000:g} ms)",
        [
            "imports",
            "format",
            "ours p50 ms",
            "p99 ms",
            "all changed ms",
            "floor ms",
            "x floor",
            "reference ms",
            "x reference",
            "bytes",
            "gzip ISA-L 1 / zlib 1 / 6 ms",
            "gzip ISA-L 1 / zlib 1 / 6 bytes",
            "served gzipped CPU ms (clock moved / all changed)",
            "page faults (same)",
            "max stall ms",
        ],
        rows,
    )
    write_json("scrape", data, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
