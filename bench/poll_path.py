"""The exporter's own work per poll, without aiohttp and the network:
building the request, keeping its deadline, reading and parsing the answer,
scheduling and recording, for an Elevate source whose HTTP session answers
at once (after yielding to the event loop twice, as a request does);
against a bare loop of workers making the same requests of the same session
and parsing the JSON, as ``polling.py``'s baseline does.

``polling.py`` measures the whole poll, aiohttp, simulator, kernel and
store included: its runs differ by several us a poll on this machine
class, more than a change of the exporter's own path moves them. This measures
that path alone, to about 0.1 us.

    .venv/bin/python bench/poll_path.py            # 1,000, 10,000 and 100,000 imports
    .venv/bin/python bench/poll_path.py --quick    # seconds; what the tests run

The answers change every second (running, then waiting, at a different
second for each import), as the simulator's ``churn-*`` imports do. Bare
loop and exporter are interleaved. The exporter runs without its store:
against a loop that never waits on I/O, as here, the storage thread starves
for the GIL (the loop takes it back within microseconds of each release,
before the woken thread can), so its writes fall behind and its CPU is
spent on wake-ups; ``polling.py``, whose loop waits on the network,
measures the store as it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
import unittest.mock
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_config, cpu_seconds, print_table, until_ready, write_json
from bench.polling import as_fast_as_allowed
from exporter.exposition import return_large_buffers_to_the_os
from exporter.runtime import Exporter
from exporter.simulator import DEMO_CREDENTIALS

STATUSES = ("IN_PROGRESS", "WAITING")
answered = 0
"""Answers given, to either contender."""


def bench_ids(count: int) -> list[str]:
    """Named like the simulator's ``churn-*`` imports, whose answers
    :class:`InstantRequest` emulates."""
    return [f"churn-{i}" for i in range(count)]


class InstantResponse:
    """What ``http_request`` and the bare loop ask of an aiohttp response."""

    status = 200

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.content_length = len(body)
        self.headers = CIMultiDictProxy(
            CIMultiDict({"Content-Type": "application/json", "Content-Length": str(len(body))})
        )

    async def read(self) -> bytes:
        return self.body


class InstantRequest:
    """``async with session.request(...) as response``: two yields to the
    loop (the request's write, its answer), then the import's status this
    second, as the simulator answers it."""

    def __init__(self, url: URL) -> None:
        self.url = url

    async def __aenter__(self) -> InstantResponse:
        global answered
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        import_id = self.url.raw_query_string.removeprefix("id=")
        status = STATUSES[(int(time.monotonic()) + hash(import_id)) % 2]
        answered += 1
        return InstantResponse(
            f'{{"id": "{import_id}", "reason": null, "status": "{status}"}}'.encode()
        )

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


class InstantSession:
    """The part of ``aiohttp.ClientSession`` the Elevate source and the bare loop use."""

    def __init__(self, *_args: object, **_settings: object) -> None:
        pass

    def request(self, _method: str, url: URL, **_options: object) -> InstantRequest:
        return InstantRequest(url)

    def get(self, url: URL, **_options: object) -> InstantRequest:
        return InstantRequest(url)

    async def close(self) -> None:
        return None


async def measure_bare(count: int, concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` workers cycling over the ids, each URL built once,
    parsing the JSON: ``polling.py``'s baseline on the instant session."""
    base = "http://127.0.0.1:9/api/admin/v4/import/status"
    urls = itertools.cycle([URL(base).with_query(id=i) for i in bench_ids(count)])
    headers = {"Api-Key": DEMO_CREDENTIALS.elevate_api_key, "Accept-Encoding": "gzip"}
    session = InstantSession()
    stop = False

    async def worker() -> None:
        while not stop:
            async with session.get(next(urls), headers=headers) as response:
                json.loads(await response.read())

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(min(1.0, seconds / 3))
    result = await _window(seconds)
    stop = True
    await asyncio.gather(*tasks)
    return result


async def measure_exporter(count: int, concurrency: int, seconds: float) -> dict[str, float]:
    config = as_fast_as_allowed(
        bench_config(
            "http://127.0.0.1:9",  # never asked: the instant session answers
            [{"id": i} for i in bench_ids(count)],
            concurrency=concurrency,
            interval="1h",
            timeout="10s",
        )
    )
    exporter = Exporter(config, "127.0.0.1:0")  # its session: an InstantSession
    await exporter.start()
    try:
        await until_ready(exporter)
        await asyncio.sleep(min(1.0, seconds / 3))
        result = await _window(seconds)
        errors = exporter.state.sources["bench"].errors_total
        if errors:  # a poll the instant session answered wrongly measures nothing
            raise RuntimeError(f"polls failed: {dict(errors)}")
        return result
    finally:
        await exporter.stop()


async def _window(seconds: float) -> dict[str, float]:
    polls0, cpu0 = answered, cpu_seconds()
    await asyncio.sleep(seconds)
    return {"polls": answered - polls0, "cpu": cpu_seconds() - cpu0}


def per_poll_us(runs: list[dict[str, float]]) -> float:
    return sum(run["cpu"] for run in runs) / max(sum(run["polls"] for run in runs), 1) * 1e6


async def main_async(
    sizes: list[int], concurrency: int, seconds: float, rounds: int
) -> dict[str, Any]:
    return_large_buffers_to_the_os()
    results = []
    # What Exporter.start makes its sources' session of.
    with unittest.mock.patch.object(aiohttp, "ClientSession", InstantSession):
        for count in sizes:
            await measure_bare(count, concurrency, seconds / 2)  # warm up, not counted
            bares, ourses = [], []
            for _ in range(rounds):
                bares.append(await measure_bare(count, concurrency, seconds))
                ourses.append(await measure_exporter(count, concurrency, seconds))
            bare, ours = per_poll_us(bares), per_poll_us(ourses)
            results.append(
                {
                    "imports": count,
                    "bare_cpu_us_per_poll": bare,
                    "exporter_cpu_us_per_poll": ours,
                    "exporter_path_us_per_poll": ours - bare,
                }
            )
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "rounds": rounds,
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = args.sizes or ([1000] if args.quick else [1000, 10000, 100000])
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    rounds = args.rounds or (1 if args.quick else 3)
    data = asyncio.run(main_async(sizes, args.concurrency, seconds, rounds))
    print_table(
        f"The exporter's own work per poll, without the network (concurrency "
        f"{args.concurrency}, {rounds} x {seconds:g}s each)",
        ["imports", "bare CPU us/poll", "exporter CPU us/poll", "exporter's path us/poll"],
        [
            [
                r["imports"],
                r["bare_cpu_us_per_poll"],
                r["exporter_cpu_us_per_poll"],
                r["exporter_path_us_per_poll"],
            ]
            for r in data["results"]
        ],
    )
    write_json("poll_path", data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
