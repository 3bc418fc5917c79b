"""Window noise: how much of a benchmark's ratio is the machine's speed.

    .venv/bin/python bench/window_noise.py           # a trace of 900 s
    .venv/bin/python bench/window_noise.py --quick   # 20 s; what the tests run

A fixed piece of work (a pure Python loop of about 10 ms) is timed over and
over on one core; how fast it goes is the machine's speed at that moment,
which on a shared host moves by a third within seconds (slow phases of 2-10
s), for the exporter's polling as for this loop. Then the windows of
``bench/scale.py`` (alone and scraped) and ``bench/polling.py`` (the
baseline and the exporter), each benchmark's order of windows and the gaps
between them, are laid over the trace at every start: the ratio of the
speed in the measured windows to the speed in the baseline's is what the
benchmark's ratio would read if the two ran alike (1). Its spread over the
starts is the ratio's noise from the machine alone; short windows and many
read it with less (each slow phase then touches both kinds of window) for
about the same time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import polling, scale
from bench.common import percentile, print_table, write_json

BIN = 0.1
"""Seconds per sample of the machine's speed."""


@dataclass(frozen=True)
class Scheme:
    """A benchmark's windows: ``rounds`` of its ``order``, each window
    ``seconds`` long; the ratio read is ``measured`` over ``baseline``."""

    bench: str
    seconds: float
    rounds: int
    order: Callable[[int, float], list[Segment]]
    """Round number, seconds: the round's segments in turn."""
    baseline: str
    measured: str


Segment = tuple[str | None, float]
"""A window of a kind, or a gap (None) not counted, and its seconds."""


SCRAPE_OVERRUN = 0.7
"""How long a scraped window of ``bench/scale.py`` runs past its seconds on
average: to the end of the scrape under way then, half a scrape at 100,000
imports."""


def scale_order(pair: int, seconds: float) -> list[Segment]:
    """``bench/scale.py``: (alone, scraped), then (scraped, alone); before a
    window alone, the render of what polls changed (0.5 s at 100,000
    imports); before a scraped one, that render, the scraper's start and
    its first scrape, not counted (2 s); after it, the settling."""
    alone: list[Segment] = [(None, 0.5), ("alone", seconds)]
    scraped: list[Segment] = [
        (None, 2.0),
        ("scraped", seconds + SCRAPE_OVERRUN),
        (None, scale.SETTLE_SECONDS),
    ]
    return alone + scraped if pair % 2 == 0 else scraped + alone


def polling_order(_: int, seconds: float) -> list[Segment]:
    """``bench/polling.py`` until the nineteenth session: the baseline after
    its connections warm up (up to 1 s), the exporter and ``http_json``
    each after its start, its first round of polls and that round's write
    (4 s at 10,000 imports, less at 100 and 1,000)."""
    return [
        (None, min(1.0, seconds / 3)),
        ("baseline", seconds),
        (None, 4.0),
        ("exporter", seconds),
        (None, 4.0),
        ("http_json", seconds),
    ]


def polling_turns_order(round_: int, seconds: float) -> list[Segment]:
    """``bench/polling.py``: each contender's process in its turn, the two
    others stopped, with no gap (a mark at the end of a turn: about 1 ms),
    each round in another order (the first turns, not counted, left out)."""
    kinds = list(polling.CONTENDERS)
    shift = round_ % len(kinds)
    return [(kind, seconds) for kind in kinds[shift:] + kinds[:shift]]


SCHEMES = [
    Scheme("scale.py", 8.0, 4, scale_order, "alone", "scraped"),
    Scheme("scale.py", 3.0, 10, scale_order, "alone", "scraped"),
    Scheme("scale.py", scale.WINDOW_SECONDS, scale.WINDOW_PAIRS, scale_order, "alone", "scraped"),
    Scheme("scale.py", 2.0, 20, scale_order, "alone", "scraped"),
    Scheme("polling.py", 8.0, 2, polling_order, "baseline", "exporter"),
    Scheme("polling.py", 3.0, 8, polling_order, "baseline", "exporter"),
    Scheme("polling.py", 2.0, 10, polling_order, "baseline", "exporter"),
    Scheme(
        "polling.py",
        polling.TURN_SECONDS,
        polling.ROUNDS,
        polling_turns_order,
        "baseline",
        "exporter",
    ),
]
"""For each benchmark: its windows before the eighteenth session, then
others, its own among them (``scale.py``'s ``WINDOW_SECONDS`` and pairs;
``polling.py``'s windows of the eighteenth session, 10 rounds of 2 s, and
its turns since the nineteenth)."""
QUICK = [Scheme("scale.py", 2.0, 2, scale_order, "alone", "scraped")]


def work() -> int:
    total = 0
    for i in range(100_000):
        total += i * i % 7
    return total


def speed_trace(seconds: float) -> list[float]:
    """The machine's speed per :data:`BIN` over ``seconds``: pieces of
    work a second, by those begun in it."""
    speeds: list[list[float]] = [[] for _ in range(int(seconds / BIN))]
    t0 = time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        work()
        at = int((now - t0) / BIN)
        if at < len(speeds):
            speeds[at].append(1 / (time.perf_counter() - now))
    trace = [statistics.fmean(bin_speeds) if bin_speeds else 0.0 for bin_speeds in speeds]
    for at in range(1, len(trace)):  # a bin no piece began in: the one before
        trace[at] = trace[at] or trace[at - 1]
    return trace


def segments(scheme: Scheme) -> list[Segment]:
    return [
        segment for turn in range(scheme.rounds) for segment in scheme.order(turn, scheme.seconds)
    ]


def ratios(trace: list[float], scheme: Scheme) -> list[float]:
    """The ratio ``scheme`` reads at each start in the trace (a bin apart):
    the mean speed over the measured windows over the mean over the
    baseline's (a benchmark divides polls by its windows' time)."""
    steps = [(kind, round(seconds / BIN)) for kind, seconds in segments(scheme)]
    span = sum(length for _, length in steps)
    bins = {kind: 0 for kind in (scheme.baseline, scheme.measured)}
    for kind, length in steps:
        if kind in bins:
            bins[kind] += length
    readings = []
    for start in range(len(trace) - span + 1):
        at, speed = start, {scheme.baseline: 0.0, scheme.measured: 0.0}
        for kind, length in steps:
            if kind in speed:
                speed[kind] += sum(trace[at : at + length])
            at += length
        measured = speed[scheme.measured] / bins[scheme.measured]
        readings.append(measured / (speed[scheme.baseline] / bins[scheme.baseline]))
    return readings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.quick else 900.0)
    trace = speed_trace(seconds)
    mean = statistics.fmean(trace)
    results: list[dict[str, Any]] = []
    for scheme in QUICK if args.quick else SCHEMES:
        readings = ratios(trace, scheme)
        if len(readings) < 2:
            print(f"{scheme.bench}, {scheme.rounds} x {scheme.seconds:g} s: longer than the trace")
            continue
        results.append(
            {
                "bench": scheme.bench,
                "window_seconds": scheme.seconds,
                "rounds": scheme.rounds,
                "ratio": f"{scheme.measured} / {scheme.baseline}",
                "span_s": sum(seconds for _, seconds in segments(scheme)),
                "starts": len(readings),
                "ratio_sd": statistics.stdev(readings),
                "ratio_p5": percentile(readings, 5),
                "ratio_min": min(readings),
            }
        )
    print_table(
        f"Ratios read from the machine's speed alone (true ratio 1; its speed over "
        f"{seconds:g} s: {min(trace) / mean:.2f}-{max(trace) / mean:.2f} of its mean)",
        ["bench", "window s", "rounds", "ratio", "span s", "starts", "sd", "p5", "min"],
        [
            [
                r["bench"],
                r["window_seconds"],
                r["rounds"],
                r["ratio"],
                r["span_s"],
                r["starts"],
                r["ratio_sd"],
                r["ratio_p5"],
                r["ratio_min"],
            ]
            for r in results
        ],
    )
    data = {"seconds": seconds, "bin_s": BIN, "results": results, "trace": trace}
    write_json("window_noise", data, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
