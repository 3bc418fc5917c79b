"""bench/polling.py's method: what it compares, not how fast anything is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from bench import polling


def test_the_first_window_at_each_size_warms_up_and_is_not_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first window against a fresh simulator ran slower than the rest
    (66-74 against 60-62 us of CPU a poll for the baseline at 10,000 imports):
    it went to whichever contender came first, the baseline, and flattered
    the exporter. A cold window (here: one poll a second) must not count."""
    windows: list[tuple[str, int]] = []

    def window(polls: float) -> dict[str, float]:
        return {"polls": polls, "seconds": 1.0, "cpu": polls * 60e-6, "errors": 0}

    async def baseline(_url: str, count: int, *_: object) -> dict[str, float]:
        windows.append(("baseline", count))
        cold = sum(1 for kind, size in windows if size == count) == 1
        return window(1.0 if cold else 1000.0)

    async def exporter(_url: str, count: int, *_: object, **__: object) -> dict[str, float]:
        windows.append(("exporter", count))
        return window(1000.0)

    @contextlib.contextmanager
    def simulator() -> Iterator[str]:
        yield "http://127.0.0.1:9"

    monkeypatch.setattr(polling, "measure_baseline", baseline)
    monkeypatch.setattr(polling, "measure_exporter", exporter)
    monkeypatch.setattr(polling, "simulator_process", simulator)
    monkeypatch.setattr(polling, "return_large_buffers_to_the_os", lambda: None)

    data = asyncio.run(polling.main_async([100, 1000], 4, 1.0, rounds=2))

    assert next(kind for kind, size in windows if size == 100) == "baseline"
    for row in data["results"]:
        assert row["baseline_polls_per_s"] == pytest.approx(1000.0)
        assert row["rate_ratio"] == pytest.approx(1.0)
        assert row["cpu_ratio"] == pytest.approx(1.0)
