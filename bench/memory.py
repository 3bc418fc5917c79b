"""Memory: resident set size of an exporter process (its render process
included) with 0 and N tracked imports, after every import has been polled
and rendered. Each size runs in a fresh
process, so one measurement cannot inherit another's heap.

    .venv/bin/python bench/memory.py            # 0, 100, 1,000 and 10,000 imports
    .venv/bin/python bench/memory.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    bench_config,
    print_table,
    rss_with_children_bytes,
    simulator_process,
    until_ready,
    write_json,
)

TARGET_BYTES_PER_IMPORT = 4096


async def measure_one(url: str, count: int) -> dict[str, float]:
    from prometheus_client.exposition import choose_encoder

    from exporter.runtime import Exporter

    config = bench_config(
        url,
        [{"id": f"bench-{i}", "name": f"import {i}"} for i in range(count)],
        interval="1h",
        concurrency=16,
    )
    # With its SQLite store, as it runs in production (SQLite's page cache counts).
    folder = tempfile.mkdtemp()
    exporter = Exporter(config, "127.0.0.1:0", storage_path=f"{folder}/bench.db")
    await exporter.start()
    try:
        await until_ready(exporter, 300)
        # Two full polls' worth of state: every import has an observation,
        # and its lines as a scrape renders them (in the render process).
        await exporter.import_lines.refresh()
        await exporter.import_lines.body(*choose_encoder(""), None, gzipped=True)
        gc.collect()
        rss = rss_with_children_bytes()
    finally:
        await exporter.stop()
        shutil.rmtree(folder)
    return {"imports": count, "rss_bytes": rss}


def child(url: str, count: int) -> None:
    print(json.dumps(asyncio.run(measure_one(url, count))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("URL", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    sizes = args.sizes or ([100] if args.quick else [100, 1000, 10000])
    results: list[dict[str, Any]] = []
    with simulator_process() as url:
        for count in [0, *sizes]:
            out = subprocess.run(
                [sys.executable, __file__, "--child", url, str(count)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]["rss_bytes"]
    for r in results:
        r["bytes_per_import"] = (r["rss_bytes"] - base) / r["imports"] if r["imports"] else 0.0
    print_table(
        f"Memory (target: < {TARGET_BYTES_PER_IMPORT} bytes per tracked import)",
        ["imports", "RSS MiB", "bytes/import over 0"],
        [[r["imports"], r["rss_bytes"] / 2**20, r["bytes_per_import"]] for r in results],
    )
    write_json("memory", {"results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
