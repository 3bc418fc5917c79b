"""Shared pieces of the benchmarks: the simulator in its own process, the
table printer, the JSON writer and the machine description."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def die_with_parent() -> None:
    """In a child, between fork and exec: killed when the bench dies, even
    while stopped (a stopped process acts on no other signal). Linux only;
    one C call, libc found beforehand."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def simulator_process(speed: float = 1.0) -> Iterator[str]:
    """Run the simulator in a separate process, so its CPU is not counted
    against the exporter or the baseline; yield its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter.simulator",
            "--listen",
            f"127.0.0.1:{port}",
            "--speed",
            str(speed),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/admin/v4/import/status?id=x", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # answering (403 without a key): up
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("simulator did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size of a process (this one by default)."""
    with open(f"/proc/{pid}/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def rss_with_children_bytes() -> int:
    """:func:`rss_bytes` of this process and of its children (the render
    process), theirs included."""
    pid = os.getpid()

    def tree(pid: int) -> int:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return rss_bytes(pid) + sum(tree(int(child)) for child in children.read().split())

    return tree(pid)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in header]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if n == 0:
            print("  " + "  ".join("-" * width for width in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    print(f"\nwrote {path}")
    return path


async def until_ready(exporter: Any, timeout: float = 120) -> None:
    """Until ``exporter`` (an :class:`~exporter.runtime.Exporter`, started)
    has polled every import once."""
    async with asyncio.timeout(timeout):
        while not exporter.state.ready():
            await asyncio.sleep(0.05)


def bench_config(url: str, imports: list[dict[str, str]], **settings: object) -> Any:
    """A config with one Elevate source, ``bench``, watching ``imports`` on the
    simulator at ``url``; ``settings`` are that source's other fields."""
    # Imported here: memory.py measures a process that has not loaded them yet.
    from exporter.config.loader import parse_config_data
    from exporter.simulator import DEMO_CREDENTIALS

    source = {
        "name": "bench",
        "type": "elevate",
        "url": url,
        "api_key": DEMO_CREDENTIALS.elevate_api_key,
        **settings,
        "imports": imports,
    }
    return parse_config_data({"sources": [source]}, "bench")
