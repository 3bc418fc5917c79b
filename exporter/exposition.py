"""``/metrics`` at the speed of a memory copy: each import's lines kept rendered.

The design of kube-state-metrics (``pkg/metrics_store``): per object, its
lines of each metric family are kept as bytes, rendered again only when the
object changes, and a scrape writes the stored bytes family by family. Here
the state names the imports that changed (:meth:`StateStore.take_unrendered`);
a scrape renders those again on the event loop, a slice at a time
(:meth:`ImportLines.refresh`), and a worker thread joins every family's bytes
with C-level joins (:meth:`ImportLines.render`).

What moves with time on its own, a running import's
``import_duration_seconds`` (now minus its start), is the one line rendered at
scrape time, from the import's cached label bytes and start.

The per-import families are gauges, whose lines are the same in the text
format and in OpenMetrics; their ``# HELP``/``# TYPE`` lines come from the
negotiated ``prometheus_client`` encoder rendering the empty families, once
per content type. The few per-source and per-process families are rendered
by that encoder from the registry, as before; the two parts are joined (an
OpenMetrics body keeps its one ``# EOF`` at the end).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter, sub
from typing import cast

from prometheus_client import utils
from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.metrics import STATES, import_families
from exporter.model import PENDING, State
from exporter.state import ImportKey, ImportRecord, StateStore

Encoder = Callable[[Collector], bytes]
floatToGoString = cast(Callable[[float], str], utils.floatToGoString)

GZIP_LEVEL = 1
"""zlib level of a gzipped ``/metrics`` body. Measured on a 10,000-import body
(``bench/scrape.py`` prints it): level 1 compresses about 3x faster than the
default 6 for a few percent more bytes; a scrape is bound by the time, not by
loopback or LAN bandwidth."""

FAMILY_NAMES = tuple(family.name for family in import_families())
_DURATION = FAMILY_NAMES.index("import_duration_seconds")
_EMPTY = b""
_EOF = b"# EOF\n"

# Per current state, the suffixes of the import's nine import_state lines.
_STATE_SUFFIXES = {
    current: "".join(
        f'{{LABELS}},state="{value}"}} {"1.0" if value == current else "0.0"}\n' for value in STATES
    )
    for current in STATES
}


def escape(value: str) -> str:
    """A label value as the exposition formats want it (backslash, newline and
    double quote escaped), like ``prometheus_client``."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


GO_TEXTS_KEPT = 4096
_go_texts: dict[float, str] = {}


def go_float(value: float) -> str:
    """``floatToGoString``, remembered for the latest values: an import's
    times are mostly one poll's clock reading, written three or four times.
    Zero is not remembered: 0.0 and -0.0 are one key but two texts."""
    text = _go_texts.get(value)
    if text is None or not value:
        if not value:
            return floatToGoString(value)
        if len(_go_texts) >= GO_TEXTS_KEPT:
            _go_texts.clear()
        text = _go_texts[value] = floatToGoString(value)
    return text


def _line(name: str, labels: str, value: float | None) -> bytes:
    if value is None:
        return _EMPTY
    return f"{name}{{{labels}}} {go_float(value)}\n".encode()


def render_import(record: ImportRecord) -> tuple[tuple[bytes, ...], bytes, float | None]:
    """One import's lines of each per-import family (in :data:`FAMILY_NAMES`
    order; empty where it has none), the start of its duration line, and the
    start time when that line moves with time (a running import)."""
    # Labels sorted by name, as prometheus_client writes them: byte for byte
    # the same lines as the reference collector's.
    source = escape(record.source)
    labels = f'import="{escape(record.import_id)}",source="{source}"'
    obs = record.observation
    current = obs.state.value if obs is not None else PENDING
    state = _STATE_SUFFIXES[current].replace("{LABELS}", "import_state{" + labels)
    info = (
        f'import_info{{import="{escape(record.import_id)}",name="{escape(record.name or "")}",'
        f'origin="{record.origin.value}",source="{source}",'
        f'system="{escape(record.system)}",'
        f'upstream_state="{escape(obs.upstream_state) if obs is not None else ""}"}} 1.0\n'
    )
    duration_prefix = f"import_duration_seconds{{{labels}}} ".encode()
    running_since = None
    duration = _EMPTY
    if obs is None:
        completed = expected = failed = start = end = changed = progress = success = _EMPTY
    else:
        completed = _line("import_items_completed", labels, obs.items_completed)
        expected = _line("import_items_expected", labels, obs.items_expected)
        failed = _line("import_items_failed", labels, obs.items_failed)
        started = record.start_timestamp
        ended = record.end_timestamp
        start = _line("import_start_timestamp_seconds", labels, started)
        end = _line("import_end_timestamp_seconds", labels, ended)
        if started is not None:
            if ended is not None:
                duration = _line("import_duration_seconds", labels, max(0.0, ended - started))
            elif obs.state is State.RUNNING:
                running_since = started
        changed = _line("import_state_change_timestamp_seconds", labels, record.state_since)
        progress = _line("import_last_progress_timestamp_seconds", labels, record.last_progress)
        success = _line("import_last_poll_success_timestamp_seconds", labels, record.last_success)
    attempt = _line("import_last_poll_attempt_timestamp_seconds", labels, record.last_attempt)
    failures = _line("import_consecutive_poll_failures", labels, record.consecutive_failures)
    lines = (
        state.encode(),
        info.encode(),
        completed,
        expected,
        failed,
        start,
        end,
        duration,
        changed,
        progress,
        success,
        attempt,
        failures,
    )
    return lines, duration_prefix, running_since


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


RENDER_SLICE = 200
"""Imports rendered on the event loop between two yields to it (about 2 ms)."""
JOIN_SLICE = 2048
"""Imports whose lines of a family one C-level join copies (about 1.6 MB of
``import_state``, a millisecond or so): the render thread holds the GIL
through a join, so one join of a whole family (80 MB at 100,000 imports)
stopped the event loop for tens of milliseconds. Not much smaller either:
after each piece's join and gzip the thread waits for the GIL again, up to a
switch interval behind a busy event loop; with 256 imports a piece (5,000
pieces at 100,000 imports) back-to-back scrapes took twice as long."""


@dataclass(slots=True)
class _Update:
    """Imports rendered again on the loop, for the next render to apply."""

    lines: dict[ImportKey, tuple[bytes, ...]] = field(default_factory=dict)
    running: dict[ImportKey, tuple[bytes, float]] = field(default_factory=dict)
    gone: list[ImportKey] = field(default_factory=list)
    """Imports no longer tracked."""
    stopped: list[ImportKey] = field(default_factory=list)
    """Imports whose duration no longer moves with time."""


class ImportLines:
    """The per-import families of ``/metrics``, each import's lines kept as bytes.

    :meth:`refresh` renders the imports changed since the last one, on the
    event loop (where the records change, so each is a consistent snapshot),
    a slice at a time; :meth:`render` joins, in a worker thread, with C-level
    joins only: a thread running Python code would take the GIL from the
    event loop at every switch interval, and the loop's every wake-up would
    queue behind it. This object must be the only one taking the state's
    unrendered imports.
    """

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self._lines: dict[ImportKey, tuple[bytes, ...]] = {}
        self._running: dict[ImportKey, tuple[bytes, float]] = {}
        """Running imports' duration line start and start time (rendered at scrape)."""
        self._pending: deque[_Update] = deque()
        self._headers: dict[str, tuple[bytes, ...]] = {}
        self._lock = threading.Lock()
        self._refreshing: asyncio.Lock | None = None

    async def refresh(self) -> None:
        """Render again the imports changed since the last refresh, for the
        next :meth:`render`. On the event loop: O(changed), in slices."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:  # one at a time: the newest render wins
            keys = list(self.state.take_unrendered())
            for at in range(0, len(keys), RENDER_SLICE):
                if at:
                    await asyncio.sleep(0)
                self._pending.append(self._render_keys(keys[at : at + RENDER_SLICE]))

    def take_changes(self) -> None:
        """:meth:`refresh` at once, in one piece (tests, benchmarks)."""
        self._pending.append(self._render_keys(list(self.state.take_unrendered())))

    def _render_keys(self, keys: list[ImportKey]) -> _Update:
        update = _Update()
        imports = self.state.imports
        for key in keys:
            record = imports.get(key)
            if record is None:
                update.gone.append(key)
                continue
            update.lines[key], prefix, since = render_import(record)
            if since is None:
                update.stopped.append(key)
            else:
                update.running[key] = (prefix, since)
        return update

    def render(
        self, encoder: Encoder, content_type: str, names: frozenset[str] | None = None
    ) -> Iterator[bytes]:
        """The per-import families (only those in ``names`` if given), each its
        ``# HELP``/``# TYPE`` and its lines, as parts to join, made as they
        are taken (so a consumer that compresses each holds one at a time).
        Any thread; the lines are those of when the first part is taken."""
        with self._lock:
            self._apply_pending()
            headers = self._headers_of(encoder, content_type)
            now = self.state.clock()
            values = list(self._lines.values())
            running = list(self._running.values())
            for index, name in enumerate(FAMILY_NAMES):
                if names is not None and name not in names:
                    continue
                yield headers[index]
                line = itemgetter(index)
                for at in range(0, len(values), JOIN_SLICE):
                    yield b"".join(map(line, values[at : at + JOIN_SLICE]))
                if index == _DURATION:
                    for at in range(0, len(running), JOIN_SLICE):
                        yield _running_lines(running[at : at + JOIN_SLICE], now)

    def _apply_pending(self) -> None:
        lines, running = self._lines, self._running
        while self._pending:
            update = self._pending.popleft()
            lines.update(update.lines)
            running.update(update.running)
            for key in update.gone:
                lines.pop(key, None)
                running.pop(key, None)
            for key in update.stopped:
                running.pop(key, None)

    def _headers_of(self, encoder: Encoder, content_type: str) -> tuple[bytes, ...]:
        headers = self._headers.get(content_type)
        if headers is None:
            headers = tuple(
                _strip_eof(encoder(_Families([family]))) for family in import_families()
            )
            self._headers[content_type] = headers
        return headers


def _running_lines(values: Sequence[tuple[bytes, float]], now: float) -> bytes:
    """The duration lines of running imports, at ``now``: C-level maps only."""
    took = list(map(max, map(sub, repeat(now), map(itemgetter(1), values)), repeat(0.0)))
    if max(took) < 1e6:
        # Below 1e6, repr is floatToGoString (which switches to an exponent
        # from seven integer digits).
        texts: Iterable[str] = map(repr, took)
    else:
        texts = map(floatToGoString, took)
    lines = map(bytes.__add__, map(itemgetter(0), values), map(str.encode, texts))
    return b"\n".join(lines) + b"\n"


def _strip_eof(body: bytes) -> bytes:
    return body[: -len(_EOF)] if body.endswith(_EOF) else body


def render_parts(
    registry: CollectorRegistry,
    encoder: Encoder,
    content_type: str,
    imports: ImportLines | None = None,
    names: Sequence[str] = (),
) -> Iterator[bytes]:
    """The whole ``/metrics`` body as parts to join, made as they are taken:
    the per-import families from ``imports``, then the registry's families,
    through ``encoder`` (``choose_encoder``'s); ``names``: only these (the
    ``name[]`` filter)."""
    if imports is not None:
        yield from imports.render(encoder, content_type, frozenset(names) if names else None)
    yield encoder(registry.restricted_registry(list(names)) if names else registry)


def render_metrics(
    registry: CollectorRegistry,
    encoder: Encoder,
    content_type: str,
    imports: ImportLines | None = None,
    names: Sequence[str] = (),
) -> bytes:
    """:func:`render_parts` joined, as one bytes."""
    return b"".join(render_parts(registry, encoder, content_type, imports, names))


def join_parts(parts: Iterable[bytes]) -> bytearray:
    """``parts`` as one buffer, copied a part at a time (each copy a short
    hold of the GIL, where one ``b"".join`` of a 150 MB body held it for
    tens of milliseconds). Each part is released once copied."""
    parts = list(parts)
    body = bytearray(sum(map(len, parts)))
    view = memoryview(body)
    at = 0
    for index, part in enumerate(parts):
        view[at : at + len(part)] = part
        at += len(part)
        parts[index] = _EMPTY
    view.release()
    return body


def gzip_parts(parts: Iterable[bytes], level: int = GZIP_LEVEL) -> bytes:
    """``parts`` gzipped as one body, a part at a time as they come (zlib
    releases the GIL while it compresses; the uncompressed body is never
    joined nor held whole)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    out = list(map(compressor.compress, parts))
    out.append(compressor.flush())
    return b"".join(out)


def gzip_body(body: bytes, level: int = GZIP_LEVEL) -> bytes:
    """``body`` gzipped (zlib releases the GIL while it compresses)."""
    return gzip_parts([body], level)


_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024


def return_large_buffers_to_the_os() -> bool:
    """glibc only (elsewhere a no-op, False): allocations of 256 KiB and more
    (a body, its gzip, a family's join) always from ``mmap``, so freeing them
    gives the memory back. Left alone, glibc raises that threshold to the
    largest block freed so far, after which every scrape's tens of megabytes
    come from the heaps of the threads that render and stay there,
    fragmented: RSS per import after scrapes was three times what the state
    needs. Two arenas at most, for the same reason (a heap per thread)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, 2))
