"""Shards: polls per second of 1 and 2 shard processes together, each polling
as fast as its concurrency allows, and the CPU each one spends per poll.

    .venv/bin/python bench/shards.py            # 2,000 imports, 10 s per run, 2 rounds
    .venv/bin/python bench/shards.py --quick    # seconds; what the tests run

Each shard is its own process (the way shards run), started with
``--shard=N --total-shards=M`` semantics; the figure is the sum of their
polls/s, as a ratio to one process polling every import, measured in the same
round (rounds interleave 1 and 2 shards).

The upstream is a lean HTTP/1.1 server of its own process (raw asyncio, one
fixed Elevate answer per id, keep-alive) standing for upstreams on other
machines: it costs a fraction of a poll's CPU, so the 2 cores go to the
shards. (Against the aiohttp simulator, which spends about as much CPU per
answer as the exporter per poll, one shard and the simulator already fill two
cores, and the ratio shows only that shards add no overhead.) What one
shard does per CPU-second, times the cores, predicts more shards on a bigger
machine; the table prints both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    bench_config,
    cpu_seconds,
    free_port,
    print_table,
    until_ready,
    write_json,
)

TICKS = os.sysconf("SC_CLK_TCK")


class LeanUpstream(asyncio.Protocol):
    """Answers every ``GET ...?id=X`` with Elevate's status of a running X."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            target = head.split(b" ", 2)[1]
            import_id = target.rpartition(b"id=")[2]
            body = b'{"id":"%s","status":"IN_PROGRESS"}' % import_id
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


async def serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(LeanUpstream, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) another process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@contextlib.contextmanager
def upstream_process() -> Iterator[tuple[str, int]]:
    """The lean upstream in its own process: its URL and pid."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--upstream", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the upstream did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


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
            await until_ready(exporter)
            polls0, t0, cpu0 = record.requests_total, time.perf_counter(), cpu_seconds()
            await asyncio.sleep(seconds)
            polls1, t1, cpu1 = record.requests_total, time.perf_counter(), cpu_seconds()
            owned = len(exporter.state.imports)
        finally:
            await exporter.stop()
    return {
        "polls_per_s": (polls1 - polls0) / (t1 - t0),
        "imports": owned,
        "cpu_s": cpu1 - cpu0,
        "polls": polls1 - polls0,
        "seconds": t1 - t0,
    }


def run_shards(
    url: str, upstream_pid: int, count: int, total: int, seconds: float
) -> dict[str, float]:
    """``total`` shard processes at once: their polls/s together, and CPU."""
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", *map(str, (n, total, url, count, seconds))],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(total)
    ]
    # The upstream's CPU over the whole run, start-up included (when it idles):
    # its share while the shards poll is somewhat higher.
    upstream0, started = process_cpu(upstream_pid), time.perf_counter()
    shards = []
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 180)
        assert process.returncode == 0, f"shard exited with {process.returncode}"
        shards.append(json.loads(out.strip().splitlines()[-1]))
    upstream_cores = (process_cpu(upstream_pid) - upstream0) / (time.perf_counter() - started)
    polls = sum(s["polls"] for s in shards)
    cpu = sum(s["cpu_s"] for s in shards)
    return {
        "shards": total,
        "imports": sum(int(s["imports"]) for s in shards),
        "polls_per_s": sum(s["polls_per_s"] for s in shards),
        "cpu_ms_per_poll": 1000 * cpu / polls if polls else float("nan"),
        "shard_cores": sum(s["cpu_s"] / s["seconds"] for s in shards),
        "upstream_cores": upstream_cores,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--imports", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        asyncio.run(serve_upstream(args.upstream))
        return 0
    if args.worker:
        index, total, url, count, seconds = args.worker
        figures = asyncio.run(worker(url, int(count), int(index), int(total), float(seconds)))
        print(json.dumps(figures))
        return 0
    count = 200 if args.quick else args.imports
    seconds = 2.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    cores = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    with upstream_process() as (url, pid):
        for round_ in range(1, rounds + 1):
            one = run_shards(url, pid, count, 1, seconds)
            two = run_shards(url, pid, count, 2, seconds)
            for measured in (one, two):
                rows.append(
                    {
                        **measured,
                        "round": round_,
                        "ratio_to_one_process": measured["polls_per_s"] / one["polls_per_s"],
                        # Each shard keeps a core busy at this CPU per poll:
                        # what M shards on M free cores would poll together.
                        "predicted_polls_per_s_per_core": 1000 / measured["cpu_ms_per_poll"],
                    }
                )
    print_table(
        f"Shards polling {count} imports ({seconds:g} s a run, {cores} cores, lean upstream)",
        [
            "round",
            "shards",
            "imports",
            "polls/s",
            "ratio to one process",
            "CPU ms per poll",
            "cores used by shards",
            "upstream cores",
        ],
        [
            [
                r["round"],
                r["shards"],
                r["imports"],
                r["polls_per_s"],
                r["ratio_to_one_process"],
                r["cpu_ms_per_poll"],
                r["shard_cores"],
                r["upstream_cores"],
            ]
            for r in rows
        ],
    )
    write_json("shards", {"results": rows, "cores": cores}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
