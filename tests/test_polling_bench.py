"""bench/polling.py's method: what it compares, not how fast anything is."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from bench import polling


def test_the_first_turn_of_each_contender_warms_up_and_is_not_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first seconds against a fresh simulator ran slower than the rest
    (66-74 against 60-62 us of CPU a poll for the baseline at 10,000 imports):
    they went to whichever contender came first, and flattered the exporter.
    A cold turn (here: one poll a second) must not count, for any contender
    at any size; the counted turns alternate, each contender's summed."""
    turns: list[tuple[str, int, float, bool]] = []

    class Contender:
        def __init__(self, kind: str, _url: str, count: int, *_: object) -> None:
            self.kind, self.count = kind, count
            self.totals = polling.Totals()

        def turn(self, seconds: float, *, counted: bool = True) -> None:
            cold = not any(turn[:2] == (self.kind, self.count) for turn in turns)
            turns.append((self.kind, self.count, seconds, counted))
            if counted:
                polls = int((1 if cold else 1000) * seconds)
                self.totals.polls += polls
                self.totals.cpu += polls * 60e-6
                self.totals.seconds += seconds
                self.totals.turns += 1

        def close(self) -> None:
            pass

    @contextlib.contextmanager
    def simulator() -> Iterator[str]:
        yield "http://127.0.0.1:9"

    monkeypatch.setattr(polling, "Contender", Contender)
    monkeypatch.setattr(polling, "simulator_process", simulator)

    data = polling.run_sizes([100, 1000], 4, 0.5, rounds=3, warm_up=4.0)

    for count in (100, 1000):
        firsts = [next(t for t in turns if t[:2] == (kind, count)) for kind in polling.CONTENDERS]
        assert [counted for *_, counted in firsts] == [False, False, False]
        assert firsts[0][2] == 4.0  # the baseline's warms the simulator up
        counted = [t[0] for t in turns if t[1] == count and t[3]]
        rounds = [counted[at : at + 3] for at in range(0, len(counted), 3)]
        # Each round, every contender once, each round in another order.
        assert [sorted(r) for r in rounds] == [sorted(polling.CONTENDERS)] * 3
        assert len({r[0] for r in rounds}) == 3
    for row in data["results"]:
        assert row["baseline_polls_per_s"] == pytest.approx(1000.0)
        assert row["rate_ratio"] == pytest.approx(1.0)
        assert row["cpu_ratio"] == pytest.approx(1.0)
        assert row["turns"]["exporter"]["turns"] == 3


def test_a_contenders_clock_leaves_out_its_stops() -> None:
    """A contender is stopped from each mark to its next turn: its event
    loop's time, which the exporter's once-a-second store write keeps,
    counts only the time it ran, so it writes as often as when it runs on."""
    now = [100.0]
    clock = polling.RunningClock(lambda: now[0])
    loop = polling.RunningClockLoop(clock)
    try:
        clock.mark()  # "ready": the bench stops it
        now[0] += 7.0  # the other contenders' start-ups and turns
        clock.resumed()
        assert loop.time() == 100.0
        now[0] += 0.5  # its turn
        clock.mark()
        now[0] += 1.0  # the other two turns
        clock.resumed()
        now[0] += 0.25
        assert loop.time() == 100.75
        clock.resumed()  # a resumption without a mark before it: no stop
        assert loop.time() == 100.75
    finally:
        loop.close()
