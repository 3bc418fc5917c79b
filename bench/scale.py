"""Scale: one exporter process with 10,000, 50,000 and 100,000 imports,
measured from outside.

    .venv/bin/python bench/scale.py            # 10,000, 50,000 and 100,000 imports
    .venv/bin/python bench/scale.py --quick    # 1,000 imports, seconds; what the tests run

Per size, a fresh exporter process (the command line, its config read from a
YAML file, its SQLite store holding a previous run's rows of every import)
polls the simulator (its own process), whose answer to each poll is running
or waiting at random, so half the polls change their import (the store really
writes, ``/metrics`` renders them again) whatever the polling rate. Measured:

- start-up: from spawning the process to listening, and to the first
  ``/metrics`` that serves the restored state (to its gzipped body's last
  byte, see :func:`until`), the package's bytecode compiled beforehand;
- the worst event-loop delay: ``/-/healthy`` probed every 10 ms from this
  process, in windows of polling alone and windows where another process
  scrapes ``/metrics`` back to back (gzip), :data:`WINDOW_PAIRS` pairs
  interleaved in the order alone, scraped, scraped, alone, alone, scraped,
  and so on (each kind's windows have the same mean place in time, so a
  steady drift of the machine or the process touches both alike), the
  first once the simulator has had three rounds of polls (:data:`WARM_ROUNDS`: past the start-up's
  transient); all cover the store's writes (every second). A scraped window's count of
  polls covers whole cycles of back-to-back scrapes: it starts where the
  scraper's first scrape ends (that scrape, after a window without any,
  is not paced: a window counted from its start held one render more than
  its length's share) and ends where the first scrape ending after
  ``seconds`` ends; its probes run from the first scrape on. The scraper is
  then killed (the scrape it has begun is not counted), and the next window
  starts :data:`SETTLE_SECONDS` later, once the render that scrape started
  is over, and after a render of what polls changed meanwhile (see
  :func:`render_changes`);
- beside it, the same probe of an aiohttp server that does nothing else, in
  a process of its own (:data:`IDLE_SERVER`), over the same windows: its
  worst is a floor of the machine's and the probe's own share (the probe's
  round trip, a process that waited for a core; an idle process, woken,
  gets one sooner than a busy one does), which the exporter's worst
  includes; it cannot be subtracted (the two worsts fall at other moments);
- polls/s of both kinds of window, and scrape p50/p99 over the scrapes
  the scraped windows count;
- cyclic GC collections and the longest pause per generation, recorded in the
  exporter process by ``gc.callbacks``;
- RSS after the scrapes under polling, per import, the render process's included (less a
  one-import process's).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import gc
import gzip
import json
import os
import signal
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    die_with_parent,
    free_port,
    percentile,
    print_table,
    simulator_process,
    write_json,
)

TARGETS = {
    "start_to_served_s": 5.0,  # at 100,000
    "max_delay_s_10k": 0.020,
    "max_delay_s_100k": 0.050,
    "scrape_p99_s_100k": 2.0,
    "polls_ratio": 0.8,
    "rss_per_import_bytes": 4096,
}
CONCURRENCY = 8
SCRAPER = """
import sys, time, urllib.request
print("scraping", flush=True)
while True:  # until killed: each scrape's duration as a line
    request = urllib.request.Request(sys.argv[1], headers={"Accept-Encoding": "gzip"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        assert response.status == 200
    print(time.perf_counter() - t0, flush=True)
"""


IDLE_SERVER = """
import sys
from aiohttp import web

async def healthy(request):
    return web.Response(text="OK")

app = web.Application()
app.router.add_get("/-/healthy", healthy)
web.run_app(
    app,
    host="127.0.0.1",
    port=int(sys.argv[1]),
    print=lambda *_: print("listening", flush=True),
    access_log=None,
)
"""


@contextlib.asynccontextmanager
async def idle_server() -> AsyncIterator[str]:
    """An aiohttp server answering ``/-/healthy`` and doing nothing else, in
    a process of its own: the probe's floor on this machine. Its base URL."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        IDLE_SERVER,
        str(port),
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    try:
        assert server.stdout is not None
        if await asyncio.wait_for(server.stdout.readline(), 60) != b"listening\n":
            raise RuntimeError("the idle server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()


def child(stats_path: str, argv: list[str]) -> int:
    """The exporter's command line, with its GC pauses recorded to ``stats_path``."""
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    long: list[tuple[float, int, float]] = []
    started = [0.0]

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            took = time.perf_counter() - started[0]
            pauses[info["generation"]].append(took)
            if took > 0.001:
                long.append((time.time(), info["generation"], took))

    gc.callbacks.append(watch)
    from exporter.cli import main

    code = main(argv)
    Path(stats_path).write_text(
        json.dumps(
            {
                "by_generation": {
                    str(gen): {"count": len(p), "max_s": max(p, default=0.0), "total_s": sum(p)}
                    for gen, p in pauses.items()
                },
                "over_1ms": long,
            }
        )
    )
    return code


def prepare(folder: Path, url: str, count: int) -> tuple[Path, Path, bytes]:
    """A YAML config watching ``count`` imports, a store holding a row of
    each (what a previous run learnt), and a line of ``/metrics`` that only
    the restored state has: the last import's start, a time of this run
    (no poll can write it: the simulator's answers carry no times, and a
    poll keeps the start of an import seen running before)."""
    from exporter.exposition import FAMILY_NAMES, render_lines
    from exporter.model import Observation, State
    from exporter.simulator import DEMO_CREDENTIALS
    from exporter.state import StateStore
    from exporter.storage import to_row
    from exporter.storage.sqlite import SQLiteStorage as Store

    ids = [f"coin-{i}" for i in range(count)]
    config = folder / "config.yaml"
    lines = [
        "sources:",
        "  - name: bench",
        "    type: elevate",
        f"    url: {url}",
        f"    api_key: {DEMO_CREDENTIALS.elevate_api_key}",
        "    interval: 1s",
        "    timeout: 1s",
        f"    concurrency: {CONCURRENCY}",
        "    imports:",
        *(f"      - id: {i}\n        name: import {i}" for i in ids),
    ]
    config.write_text("\n".join(lines) + "\n")
    state = StateStore()
    state.add_source("bench", "elevate", 1.0)
    for i in ids:
        state.track("bench", i, name=f"import {i}")
        state.record_observation("bench", i, Observation(State.RUNNING, "IN_PROGRESS"))
    database = folder / "state.db"
    store = Store(database)
    try:
        store.write([to_row(record) for record in state.imports.values()])
    finally:
        store.close()
    last, _ = render_lines(state.imports[("bench", ids[-1])])
    return config, database, last[FAMILY_NAMES.index("import_start_timestamp_seconds")]


class Probe:
    """``/-/healthy`` every 10 ms; the worst answer time is the worst
    event-loop delay (plus one loopback round trip)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.url = f"{base}/-/healthy"
        self.worst = 0.0
        self.count = 0
        self.since = 0.0
        self.task: asyncio.Task[None] | None = None

    def check(self) -> None:
        """Raise why the probe stopped, if it did (its worst would not move)."""
        if self.task is not None and self.task.done():
            self.task.result()
            raise RuntimeError(f"the probe of {self.url} stopped")

    def reset(self) -> None:
        """Count from now: a probe sent before does not count."""
        self.worst, self.count, self.since = 0.0, 0, time.perf_counter()

    async def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            async with self.session.get(self.url) as response:
                await response.read()
            took = time.perf_counter() - t0
            if t0 >= self.since:
                self.worst = max(self.worst, took)
                self.count += 1
            await asyncio.sleep(max(0.0, 0.010 - took))


async def render_changes(session: aiohttp.ClientSession, base: str) -> None:
    """Have the exporter render what polls changed since its last render,
    by a scrape of one per-import family with no lines here (no answer has
    an end): between windows, so a scraped window's first scrape does not
    pay for what changed while nothing scraped."""
    async with session.get(f"{base}/metrics?name[]=import_end_timestamp_seconds") as response:
        await response.read()


async def polls_received(session: aiohttp.ClientSession, upstream: str) -> int:
    """Polls the simulator has received so far: counted there, not by a
    scrape of the exporter, which would wait for a render in progress (and
    count the polls made meanwhile) under the exporter's render lock."""
    async with session.get(f"{upstream}/_simulator/counters") as response:
        counters = await response.json()
    return int(counters.get("elevate", 0))


WARM_ROUNDS = 3
"""Rounds of polls (``WARM_ROUNDS`` times the imports' count of polls in
all, counted by the simulator from the exporter's start) before the first
window. Windows polling alone, back to back from
readiness at 100,000 imports, made 5,836, 6,521, 5,524 polls/s, then
4,052-5,065 from about three rounds on (one run; in a full run the first
window alone made 6,179 against 4,088-5,185): the windows measure a
process past its start-up, whose state has been rewritten by polls, as
one that has run for days."""


async def warmed_up(
    session: aiohttp.ClientSession,
    upstream: str,
    process: asyncio.subprocess.Process,
    before: int,
    count: int,
    timeout: float = 600,
) -> None:
    """Until the simulator has had :data:`WARM_ROUNDS` times ``count`` polls
    since it had ``before``."""
    deadline = time.monotonic() + timeout
    while await polls_received(session, upstream) - before < WARM_ROUNDS * count:
        if process.returncode is not None:
            raise RuntimeError(f"the exporter exited ({process.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {WARM_ROUNDS * count} polls in {timeout} s")
        await asyncio.sleep(0.5)


def rss_of(pid: int) -> tuple[int, int]:
    """The resident memory of process ``pid``, and of its children (the
    render process) with theirs."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return rss, sum(sum(rss_of(int(child))) for child in children.read().split())


async def scraper_line(scraper: asyncio.subprocess.Process) -> bytes:
    """The scraper's next line (``scraping``, then each scrape's duration);
    its exit fails the run with its exit code."""
    assert scraper.stdout is not None
    line = await asyncio.wait_for(scraper.stdout.readline(), 120)
    if not line:
        raise RuntimeError(f"the scraper stopped (exit {await scraper.wait()})")
    return line


async def window(
    session: aiohttp.ClientSession,
    base: str,
    upstream: str,
    probe: Probe,
    floor: Probe,
    seconds: float,
    scrape: bool,
) -> dict[str, Any]:
    """Polls and the worst probe delay over the next ``seconds`` (scraped:
    over whole scrape cycles of ``seconds`` or more, and their scrapes), and
    the worst of ``floor``, the idle server's probe, over the same time."""
    await render_changes(session, base)
    durations: list[float] = []
    scraper = None
    if scrape:
        scraper = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SCRAPER, f"{base}/metrics", stdout=asyncio.subprocess.PIPE
        )
    try:
        if scraper is None:
            probe.reset()
            floor.reset()
        else:
            if await scraper_line(scraper) != b"scraping\n":
                raise RuntimeError("the scraper did not start")
            probe.reset()
            floor.reset()
            await scraper_line(scraper)  # the first scrape, unpaced: not counted
        polls0 = await polls_received(session, upstream)
        t0 = time.perf_counter()
        wall0 = time.time()
        if scraper is None:
            await asyncio.sleep(seconds)
        else:
            while time.perf_counter() - t0 < seconds:
                durations.append(float(await scraper_line(scraper)))
        elapsed = time.perf_counter() - t0
        probe.check()
        floor.check()
        worst, probes, floor_worst = probe.worst, probe.count, floor.worst
        polls = await polls_received(session, upstream) - polls0
    finally:
        if scraper is not None:
            if scraper.returncode is None:
                scraper.kill()  # a scrape it has begun is not counted
            await scraper.communicate()
    return {
        "seconds": elapsed,
        "polls": polls,
        "polls_per_s": polls / elapsed,
        "max_delay_s": worst,
        "probes": probes,
        "idle_server_max_delay_s": floor_worst,
        "wall": [wall0, time.time()],
        "durations": durations,
    }


WINDOW_SECONDS = 4.0
"""A window's length (``--seconds``; 2 with ``--quick``)."""
WINDOW_PAIRS = 12
"""Pairs of windows per size: (alone, scraped), then (scraped, alone), and
so on (two with ``--quick``). Short windows and many: the machine's speed
moves by up to a third in phases of 2-10 s (``bench/window_noise.py``), and
a phase inside both kinds of window touches the ratio less than one inside
a single window. Over a trace of 900 s of that script, four pairs of 8 s
(the windows before) read the polls ratio of a process whose scrapes cost
nothing with a spread (sd) of 0.064 (0.072 ; 0.060 in the trace's two
halves), twelve pairs of 4 s with 0.038 (0.043 ; 0.038), in 1.9 times as
long."""
SETTLE_SECONDS = 2.0
"""After a scraped window: the render of the scrape cut short ends (under a
second at 100,000 imports) before the next window counts polls."""


def merged(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows of one kind as one: polls/s over their whole time, the worst
    delay of any, scrape percentiles over all their scrapes."""
    seconds = sum(w["seconds"] for w in windows)
    result: dict[str, Any] = {
        "seconds": seconds,
        "polls_per_s": sum(w["polls"] for w in windows) / seconds,
        "max_delay_s": max(w["max_delay_s"] for w in windows),
        "idle_server_max_delay_s": max(w["idle_server_max_delay_s"] for w in windows),
        "probes": sum(w["probes"] for w in windows),
        "windows": windows,
    }
    durations = [took for w in windows for took in w.get("durations", [])]
    if durations:
        result |= {
            "scrapes": len(durations),
            "scrape_p50_s": percentile(durations, 50),
            "scrape_p99_s": percentile(durations, 99),
        }
    return result


async def measure(url: str, idle: str, count: int, seconds: float, pairs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config, database, restored = prepare(folder, url, count)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        stats = folder / "gc.json"
        t0 = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *[
                sys.executable,
                __file__,
                "--child",
                str(stats),
                "--config.file",
                str(config),
                "--storage.path",
                str(database),
                "--web.listen-address",
                f"127.0.0.1:{port}",
                "--log.level",
                "warn",
            ],
            cwd=ROOT,
        )
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                polls_before = await polls_received(session, url)  # not polling yet
                listening = await until(session, f"{base}/-/healthy", t0, process)
                served = await until(session, f"{base}/metrics", t0, process, restored)
                probe = Probe(session, base)
                probe.task = asyncio.create_task(probe.run())
                floor = Probe(session, idle)
                floor.task = asyncio.create_task(floor.run())
                ready = await until(session, f"{base}/-/ready", t0, process, timeout=600)
                await asyncio.sleep(2.0)  # the first round's write
                await warmed_up(session, url, process, polls_before, count)
                warm = time.perf_counter() - t0
                windows: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
                for pair in range(pairs):
                    for scrape in (False, True) if pair % 2 == 0 else (True, False):
                        windows[scrape].append(
                            await window(session, base, url, probe, floor, seconds, scrape)
                        )
                        await asyncio.sleep(SETTLE_SECONDS if scrape else 0.0)
                polling, scraping = merged(windows[False]), merged(windows[True])
                rss, children_rss = rss_of(process.pid)
                probe.task.cancel()
                floor.task.cancel()
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 120)
        gc_stats = json.loads(stats.read_text()) if stats.exists() else {}
    walls = [w["wall"] for kind in (polling, scraping) for w in kind["windows"]]
    in_windows = [
        took
        for when, _, took in gc_stats.get("over_1ms", [])
        if any(start <= when <= end for start, end in walls)
    ]
    gc_stats["max_pause_in_windows_s"] = max(in_windows, default=0.0)
    return {
        "imports": count,
        "start_to_listening_s": listening,
        "start_to_served_s": served,
        "start_to_ready_s": ready,
        "start_to_windows_s": warm,
        "polling": polling,
        "scraping": scraping,
        "polls_ratio": scraping["polls_per_s"] / max(polling["polls_per_s"], 1e-9),
        "rss_bytes": rss + children_rss,
        "render_process_rss_bytes": children_rss,
        "gc": gc_stats,
    }


async def until(
    session: aiohttp.ClientSession,
    url: str,
    t0: float,
    process: asyncio.subprocess.Process,
    needle: bytes | None = None,
    timeout: float = 300,
) -> float:
    """Seconds from ``t0`` until ``url`` answers 200 (with ``needle`` in its
    body): until its body's last byte has arrived, gzipped as a scraper asks
    for it, as the scrape p99 is timed (by a scraper that reads the gzipped
    body); the check for ``needle`` decompresses it after that, at this
    client's cost, not counted (at 100,000 imports, 135 MB: 0.23-0.28 s
    alone, on a 2-core machine the exporter shares with this process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError(f"the exporter exited ({process.returncode})")
        try:
            async with session.get(
                url, headers={"Accept-Encoding": "gzip"}, auto_decompress=False
            ) as response:
                body = await response.read()
                took = time.perf_counter() - t0
                if response.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if response.status == 200 and (needle is None or needle in body):
                    return took
        except (aiohttp.ClientError, OSError, EOFError, zlib.error):  # a body cut short: again
            pass
        await asyncio.sleep(0.01)
    raise TimeoutError(url)


async def main_async(sizes: list[int], seconds: float, pairs: int) -> dict[str, Any]:
    # The package's bytecode compiled first, as an install has it (pip, and
    # so the image, compiles it even under PYTHONDONTWRITEBYTECODE, which CI
    # sets): else every start-up compiled the source again (about 0.1 s).
    if not compileall.compile_dir(ROOT / "exporter", quiet=1):
        raise RuntimeError("the package's bytecode could not be compiled")
    results = []
    with simulator_process() as url:
        async with idle_server() as idle:
            one = await measure(url, idle, 1, min(seconds, 2.0), 2)
            for count in sizes:
                row = await measure(url, idle, count, seconds, pairs)
                row["rss_per_import_bytes"] = (row["rss_bytes"] - one["rss_bytes"]) / (count - 1)
                results.append(row)
    return {
        "one_import_rss_bytes": one["rss_bytes"],
        "seconds": seconds,
        "window_pairs": pairs,
        "results": results,
    }


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = args.sizes or ([1000] if args.quick else [10_000, 50_000, 100_000])
    seconds = args.seconds or (2.0 if args.quick else WINDOW_SECONDS)
    data = asyncio.run(main_async(sizes, seconds, 2 if args.quick else WINDOW_PAIRS))
    rows = []
    for r in data["results"]:
        gen2 = r["gc"].get("by_generation", {}).get("2", {})
        rows.append(
            [
                r["imports"],
                r["start_to_listening_s"],
                r["start_to_served_s"],
                r["polling"]["polls_per_s"],
                r["scraping"]["polls_per_s"],
                r["polls_ratio"],
                r["polling"]["max_delay_s"] * 1000,
                r["scraping"]["max_delay_s"] * 1000,
                r["polling"]["idle_server_max_delay_s"] * 1000,
                r["scraping"]["idle_server_max_delay_s"] * 1000,
                r["scraping"]["scrape_p50_s"],
                r["scraping"]["scrape_p99_s"],
                r["gc"]["max_pause_in_windows_s"] * 1000,
                gen2.get("count", ""),
                r["rss_per_import_bytes"],
            ]
        )
    print_table(
        "Scale (targets: served <= 5 s and delay <= 50 ms at 100,000, delay <= 20 ms at "
        "10,000; polls ratio >= 0.8; scrape p99 < 2 s; RSS <= 4,096 B/import)",
        [
            "imports",
            "listening s",
            "served s",
            "polls/s",
            "polls/s scraped",
            "ratio",
            "delay ms",
            "delay ms scraped",
            "idle server ms",
            "idle ms scraped",
            "scrape p50 s",
            "p99 s",
            "GC max ms (windows)",
            "gen2 GCs",
            "RSS B/import",
        ],
        rows,
    )
    write_json("scale", data, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    raise SystemExit(main())
