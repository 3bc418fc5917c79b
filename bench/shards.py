"""Shards: polls per second of 1 and 2 shard processes together, each polling
as fast as its concurrency allows, against one simulator process.

    .venv/bin/python bench/shards.py            # 2,000 imports, 10 s per run
    .venv/bin/python bench/shards.py --quick    # seconds; what the tests run

Each shard is its own process (the way shards run), started with
``--shard=N --total-shards=M`` semantics; the figure is the sum of their
polls/s, as a ratio to one process polling every import. On 2 cores the
simulator takes a share of the CPU too, so the ratio says how far one more
core carries, not the ceiling of more shards on a bigger machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, bench_config, print_table, simulator_process, write_json


async def worker(url: str, count: int, index: int, total: int, seconds: float) -> dict[str, float]:
    """One shard: poll its share of ``count`` imports for ``seconds``."""
    from exporter.runtime import Exporter
    from exporter.sharding import Shard

    config = bench_config(
        url, [{"id": f"bench-{i}"} for i in range(count)], interval="1h", timeout="10s"
    )
    # As fast as the concurrency allows (a config file cannot say this).
    source = config.sources[0].model_copy(update={"interval": 1e-6})
    config = config.model_copy(update={"sources": [source]})
    with tempfile.TemporaryDirectory() as folder:
        exporter = Exporter(
            config, "127.0.0.1:0", storage_path=f"{folder}/shard.db", shard=Shard(index, total)
        )
        await exporter.start()
        try:
            record = exporter.state.sources["bench"]
            async with asyncio.timeout(120):
                while not exporter.state.ready():
                    await asyncio.sleep(0.05)
            polls0, t0 = record.requests_total, time.perf_counter()
            await asyncio.sleep(seconds)
            polls1, t1 = record.requests_total, time.perf_counter()
            owned = len(exporter.state.imports)
        finally:
            await exporter.stop()
    return {"polls_per_s": (polls1 - polls0) / (t1 - t0), "imports": owned}


def run_shards(url: str, count: int, total: int, seconds: float) -> list[dict[str, float]]:
    """``total`` shard processes at once; what each measured."""
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(n),
                str(total),
                url,
                str(count),
                str(seconds),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(total)
    ]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 180)
        assert process.returncode == 0, f"shard exited with {process.returncode}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--imports", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        index, total, url, count, seconds = args.worker
        figures = asyncio.run(worker(url, int(count), int(index), int(total), float(seconds)))
        print(json.dumps(figures))
        return 0
    count = 200 if args.quick else args.imports
    seconds = 2.0 if args.quick else args.seconds
    rows: list[dict[str, Any]] = []
    with simulator_process() as url:
        single = sum(s["polls_per_s"] for s in run_shards(url, count, 1, seconds))
        for total in (1, 2):
            measured = run_shards(url, count, total, seconds)
            rate = sum(s["polls_per_s"] for s in measured)
            rows.append(
                {
                    "shards": total,
                    "imports": sum(int(s["imports"]) for s in measured),
                    "polls_per_s": rate,
                    "ratio_to_one_process": rate / single,
                }
            )
    print_table(
        f"Shards polling {count} imports ({seconds:g} s a run)",
        ["shards", "imports", "polls/s", "ratio to one process"],
        [[r["shards"], r["imports"], r["polls_per_s"], r["ratio_to_one_process"]] for r in rows],
    )
    write_json("shards", {"results": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
