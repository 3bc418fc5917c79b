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
import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import compress, repeat
from operator import is_, is_not, itemgetter, sub
from typing import cast

from isal import isal_zlib
from prometheus_client import utils
from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.metrics import STATES, import_families
from exporter.model import PENDING, State
from exporter.state import ImportKey, ImportRecord, StateStore

Encoder = Callable[[Collector], bytes]
floatToGoString = cast(Callable[[float], str], utils.floatToGoString)

GZIP_LEVEL = 1
"""ISA-L's level (0-3) of a gzipped ``/metrics`` body. Measured on a
20,000-import body (28 MB): ISA-L's level 1 takes 12 ms and 2.0 MB, zlib's
level 1 52 ms and 2.2 MB, zlib's default 6 144 ms and 2.0 MB. On a machine
whose cores also poll, the CPU a scrape takes is what it takes from polling."""

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
POLL_LINES_SLICE = 1000
"""Imports whose poll lines alone are rendered between two yields (about 2 ms)."""
JOIN_SLICE = 2048
"""Imports whose lines of a family one C-level join copies (about 1.6 MB of
``import_state``, a millisecond or so): the render thread holds the GIL
through a join, so one join of a whole family (80 MB at 100,000 imports)
stopped the event loop for tens of milliseconds. Not much smaller either:
after each piece's join and gzip the thread waits for the GIL again, up to a
switch interval behind a busy event loop; with 256 imports a piece (5,000
pieces at 100,000 imports) back-to-back scrapes took twice as long."""


Entry = tuple[bytes | float | None, ...]
"""An import's kept lines, one bytes per family in :data:`FAMILY_NAMES` order
(empty where it has none), then its start time if its duration moves with time
(a running import; its ``import_duration_seconds`` item is then the line's
start, the value to come at scrape time), else None."""
_SINCE = len(FAMILY_NAMES)
_LINE_PREFIXES = {
    name: name.encode()
    for name in (
        "import_last_poll_attempt_timestamp_seconds",
        "import_last_poll_success_timestamp_seconds",
        "import_consecutive_poll_failures",
    )
}
_ATTEMPT, _SUCCESS, _FAILURES = (FAMILY_NAMES.index(name) for name in _LINE_PREFIXES)
_ATTEMPT_NAME, _SUCCESS_NAME, _FAILURES_NAME = _LINE_PREFIXES.values()


def render_entry(record: ImportRecord) -> Entry:
    """:func:`render_import` as an :data:`Entry`."""
    lines, duration_prefix, since = render_import(record)
    if since is None:
        return (*lines, None)
    return (*lines[:_DURATION], duration_prefix, *lines[_DURATION + 1 :], since)


def render_poll_lines(record: ImportRecord, entry: Entry) -> Entry | None:
    """``entry`` with its poll lines (last attempt, last success, failures in
    a row) rendered again from ``record``, the rest kept: what a poll that
    changed nothing else needs, a few times cheaper than :func:`render_entry`.
    None if ``entry`` has no attempt line to take the labels from."""
    attempt = entry[_ATTEMPT]
    if not isinstance(attempt, bytes) or not attempt:
        return None
    # '{labels} ', from the end of the name to the space before the value
    # (a value has no space; a label value's spaces come before it).
    labels = attempt[len(_ATTEMPT_NAME) : attempt.rindex(b" ") + 1]
    new = list(entry)
    new[_ATTEMPT] = _value_line(_ATTEMPT_NAME, labels, record.last_attempt)
    if record.observation is not None:
        new[_SUCCESS] = _value_line(_SUCCESS_NAME, labels, record.last_success)
    new[_FAILURES] = _value_line(_FAILURES_NAME, labels, record.consecutive_failures)
    return tuple(new)


def _untrack_young() -> None:
    """Collect the youngest generation now, while it holds one slice's new
    entries. Each replaces an old one, so allocations minus frees stay near
    zero and never trigger a collection: the new entries piled up (36,000
    at 100,000 imports) and one collection that untracked them all stalled
    the loop for 30-45 ms. Entries hold no containers: the first collection
    that sees them stops tracking them."""
    gc.collect(0)


def _value_line(name: bytes, labels: bytes, value: float | None) -> bytes:
    if value is None:
        return _EMPTY
    return name + labels + go_float(value).encode() + b"\n"


class ImportLines:
    """The per-import families of ``/metrics``, each import's lines kept as bytes.

    :meth:`refresh` renders the imports changed since the last one, on the
    event loop (where the records change, so each is a consistent snapshot),
    a slice at a time, into one dict the loop alone writes; :meth:`render`
    takes that dict's entries with one C-level copy (atomic under the GIL)
    and joins them, in a worker thread, with C-level joins only: a thread
    running Python code would take the GIL from the event loop at every
    switch interval, and the loop's every wake-up would queue behind it. This
    object must be the only one taking the state's unrendered imports.
    """

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self._entries: dict[ImportKey, Entry] = {}
        self._headers: dict[str, tuple[bytes, ...]] = {}
        self._refreshing: asyncio.Lock | None = None

    async def refresh(self) -> None:
        """Render again the imports changed since the last refresh, for the
        next :meth:`render`. On the event loop: O(changed), in slices."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:  # one at a time: the newest render wins
            changed, repolled = self.state.take_unrendered()
            keys = list(changed)
            for at in range(0, len(keys), RENDER_SLICE):
                if at:
                    await asyncio.sleep(0)
                self._render_keys(keys[at : at + RENDER_SLICE])
                _untrack_young()
            keys = list(repolled)
            for at in range(0, len(keys), POLL_LINES_SLICE):
                await asyncio.sleep(0)
                self._render_poll_lines(keys[at : at + POLL_LINES_SLICE])
                _untrack_young()

    def take_changes(self) -> None:
        """:meth:`refresh` at once, in one piece (tests, benchmarks)."""
        changed, repolled = self.state.take_unrendered()
        self._render_keys(list(changed))
        self._render_poll_lines(list(repolled))

    def _render_keys(self, keys: list[ImportKey]) -> None:
        entries = self._entries
        imports = self.state.imports
        for key in keys:
            record = imports.get(key)
            if record is None:
                entries.pop(key, None)
            else:
                entries[key] = render_entry(record)

    def _render_poll_lines(self, keys: list[ImportKey]) -> None:
        entries = self._entries
        imports = self.state.imports
        for key in keys:
            record = imports.get(key)
            if record is None:
                entries.pop(key, None)
                continue
            entry = entries.get(key)
            new = None if entry is None else render_poll_lines(record, entry)
            entries[key] = render_entry(record) if new is None else new

    def render(
        self, encoder: Encoder, content_type: str, names: frozenset[str] | None = None
    ) -> Iterator[bytes]:
        """The per-import families (only those in ``names`` if given), each its
        ``# HELP``/``# TYPE`` and its lines, as parts to join, made as they
        are taken (so a consumer that compresses each holds one at a time).
        Any thread; the lines are those of when the first part is taken."""
        entries = list(self._entries.values())
        headers = self._headers_of(encoder, content_type)
        now = self.state.clock()
        since = itemgetter(_SINCE)
        for index, name in enumerate(FAMILY_NAMES):
            if names is not None and name not in names:
                continue
            yield headers[index]
            line = itemgetter(index)
            if index == _DURATION:
                # Finished imports' lines as kept; running ones' made now.
                stopped = list(compress(entries, map(is_, map(since, entries), repeat(None))))
                running = list(compress(entries, map(is_not, map(since, entries), repeat(None))))
            else:
                stopped, running = entries, []
            for at in range(0, len(stopped), JOIN_SLICE):
                yield b"".join(cast(Iterable[bytes], map(line, stopped[at : at + JOIN_SLICE])))
            for at in range(0, len(running), JOIN_SLICE):
                yield _running_lines(running[at : at + JOIN_SLICE], now)

    def _headers_of(self, encoder: Encoder, content_type: str) -> tuple[bytes, ...]:
        headers = self._headers.get(content_type)
        if headers is None:
            headers = tuple(
                _strip_eof(encoder(_Families([family]))) for family in import_families()
            )
            self._headers[content_type] = headers
        return headers


def _running_lines(entries: Sequence[Entry], now: float) -> bytes:
    """The duration lines of running imports, at ``now``: C-level maps only."""
    since = cast(Callable[[Entry], float], itemgetter(_SINCE))
    took = list(map(max, map(sub, repeat(now), map(since, entries)), repeat(0.0)))
    if max(took) < 1e6:
        # Below 1e6, repr is floatToGoString (which switches to an exponent
        # from seven integer digits).
        texts: Iterable[str] = map(repr, took)
    else:
        texts = map(floatToGoString, took)
    prefixes = cast(Iterable[bytes], map(itemgetter(_DURATION), entries))
    lines = map(bytes.__add__, prefixes, map(str.encode, texts))
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


GZIP_BATCH = 4 * 1024 * 1024
"""Bytes of parts gzipped by one call. ISA-L (like zlib) releases the GIL while it
compresses, and the render thread then waits up to a switch interval to take
it back from a busy event loop: one call per part (650 at 100,000 imports)
made a render under polling five times as long as on an idle process."""


def gzip_parts(parts: Iterable[bytes], level: int = GZIP_LEVEL) -> bytes:
    """``parts`` gzipped as one body, about :data:`GZIP_BATCH` bytes at a time
    as they come (the uncompressed body is never joined nor held whole)."""
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
    out: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for part in parts:
        batch.append(part)
        size += len(part)
        if size >= GZIP_BATCH:
            out.append(compressor.compress(b"".join(batch)))
            batch.clear()
            size = 0
    out.append(compressor.compress(b"".join(batch)))
    out.append(compressor.flush())
    return b"".join(out)


def gzip_body(body: bytes, level: int = GZIP_LEVEL) -> bytes:
    """``body`` gzipped (ISA-L releases the GIL while it compresses)."""
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
