"""The benchmark scripts in quick mode: they run and produce their figures.

Values are not asserted (shared machines drift); that the figures exist is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str, out: Path) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "imports" in result.stdout  # the table was printed
    data: dict[str, object] = json.loads(out.read_text())
    machine = data["machine"]
    assert isinstance(machine, dict)
    assert machine["cpus"]
    return data


@pytest.mark.parametrize(
    "script",
    [
        "polling.py",
        "poll_path.py",
        "scrape.py",
        "memory.py",
        "load.py",
        "abuse.py",
        "shards.py",
        "scale.py",
    ],
)
def test_benchmark_quick_mode_produces_figures(script: str, tmp_path: Path) -> None:
    data = run_quick(script, tmp_path / "out.json")
    results = data["results"]
    assert isinstance(results, list)
    assert results
    row = results[-1]
    assert isinstance(row, dict)
    if script == "polling.py":
        assert row["exporter_polls_per_s"] > 0
        assert row["baseline_polls_per_s"] > 0
        assert row["rate_ratio"] > 0
        assert row["cpu_ratio"] > 0
        # Every contender had its turns (the quick mode's four), each counted.
        assert {kind: turns["turns"] for kind, turns in row["turns"].items()} == {
            "baseline": 4,
            "exporter": 4,
            "http_json": 4,
        }
    elif script == "poll_path.py":
        assert row["bare_cpu_us_per_poll"] > 0
        assert row["exporter_cpu_us_per_poll"] > 0
    elif script == "scrape.py":
        assert row["text"]["reference_ratio"] > 0
        assert row["openmetrics"]["bytes"] > 0
        assert row["floor_ratio"] > 0
        assert 0 < row["gzip_isal1_bytes"] <= row["gzip1_bytes"] * 1.25
        assert row["live"]["max_loop_stall_s"] >= 0
    elif script == "scale.py":
        assert row["start_to_served_s"] > 0
        assert row["rss_per_import_bytes"] != 0
        assert row["scraping"]["scrape_p99_s"] > 0
        assert row["polls_ratio"] >= 0
        # Polls counted by the simulator, in both kinds of window.
        assert row["polling"]["polls_per_s"] > 0
        assert row["scraping"]["polls_per_s"] > 0
        assert row["scraping"]["max_delay_s"] > 0
        # The idle server's probe ran in the same windows: the machine's floor.
        assert row["polling"]["idle_server_max_delay_s"] > 0
        assert row["scraping"]["idle_server_max_delay_s"] > 0
    elif script == "memory.py":
        assert row["rss_bytes"] > 0
        assert "bytes_per_import" in row
    elif script == "abuse.py":
        assert [r["scenario"] for r in results][1:] == [
            "1 password guessing",
            "2 half-sent requests",
            "3 big reads",
        ]
        assert row["scrapes_p50_ratio"] > 0
        assert row["registrations_p99_ratio"] > 0
        assert data["loop_hold"]["page_max_ms"] >= 0  # type: ignore[index]
    elif script == "shards.py":
        # Two shards together poll every import once, no more and no fewer.
        assert [r["shards"] for r in results] == [1, 2]
        assert results[0]["imports"] == row["imports"] == 200
        assert row["polls_per_s"] > 0
        assert row["cpu_ms_per_poll"] > 0
        assert row["upstream_cores"] >= 0
    else:
        assert row["scrapes_served"] > 0
        assert row["failures"] >= 0
        assert row["polls"] > 0


def test_the_window_noise_benchmark_reads_the_machine_alone(tmp_path: Path) -> None:
    """bench/window_noise.py lays bench/scale.py's windows over a trace of
    the machine's speed: a ratio near 1 (nothing costs more in one kind of
    window than in the other), and its spread."""
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "bench/window_noise.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "alone" in result.stdout
    (row,) = json.loads(out.read_text())["results"]
    assert row["starts"] > 0
    assert 0.5 < row["ratio_min"] <= row["ratio_p5"] < 1.5
    assert row["ratio_sd"] >= 0
