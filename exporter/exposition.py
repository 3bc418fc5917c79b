"""``/metrics`` at the speed of a memory copy: each import's lines kept rendered.

The design of kube-state-metrics (``pkg/metrics_store``): per object, its
lines of each metric family are kept as bytes, rendered again only when the
object changes, and a scrape writes the stored bytes family by family. Here
the state names the imports that changed (:meth:`StateStore.take_unrendered`);
a scrape renders those again on the event loop, a slice at a time
(:meth:`ImportLines.refresh`), then joins every family's bytes with C-level
joins, also on the loop a slice at a time, copied into batches that a
worker thread gzips
(:meth:`ImportLines.render`, :func:`build_body`).

What moves with time on its own, a running import's
``import_duration_seconds`` (now minus its start, to the millisecond), is the
one line rendered at scrape time, from the import's cached label bytes and
its start, kept apart from the family's other lines as packed numbers.

The per-import families are gauges, whose lines are the same in the text
format and in OpenMetrics; their ``# HELP``/``# TYPE`` lines come from the
negotiated ``prometheus_client`` encoder rendering the empty families, once
per content type. The few per-source and per-process families are rendered
by that encoder from the registry, as before; the two parts are joined (an
OpenMetrics body keeps its one ``# EOF`` at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import math
import mmap
import os
import sys
import threading
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain, compress, repeat
from operator import sub
from typing import TypeVar, cast

from isal import isal_zlib
from prometheus_client import utils
from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.loop_slices import LoopSlices
from exporter.metrics import STATES, import_families
from exporter.model import PENDING, State
from exporter.state import ImportKey, ImportRecord, StateStore, milliseconds

Encoder = Callable[[Collector], bytes]
T = TypeVar("T")
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
# Each family's name as bytes, in FAMILY_NAMES order (render_lines' order):
# a family added to or dropped from import_families() fails here, not silently.
(
    _STATE_NAME,
    _INFO_NAME,
    _COMPLETED_NAME,
    _EXPECTED_NAME,
    _FAILED_NAME,
    _START_NAME,
    _END_NAME,
    _DURATION_NAME,
    _CHANGED_NAME,
    _PROGRESS_NAME,
    _SUCCESS_NAME,
    _ATTEMPT_NAME,
    _FAILURES_NAME,
) = (name.encode() for name in FAMILY_NAMES)

# Per current state, the import's nine import_state lines but for their
# start (``import_state{`` and the import's labels), which takes the place of NUL.
_STATE_LINES = {
    current: "".join(
        f'\0,state="{value}"}} {"1.0" if value == current else "0.0"}\n' for value in STATES
    ).encode()
    for current in STATES
}
_STATE_START = _STATE_NAME + b"{"


def escape(value: str) -> str:
    """A label value as the exposition formats want it (backslash, newline and
    double quote escaped), like ``prometheus_client``."""
    if _needs_escape(value):
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _needs_escape(value: str) -> bool:
    return "\\" in value or "\n" in value or '"' in value


_GO_EXPONENTS = {dot: f"e+{dot - 1:02d}" for dot in range(7, 17)}


def _go_text(value: float) -> str:
    """``floatToGoString``, a third faster for what a render writes most: a
    timestamp (Go writes a positive number from 1e6 with an exponent)."""
    text = repr(value)
    dot = text.find(".")
    if dot > 6 and value > 0:
        return (text[0] + "." + text[1:dot] + text[dot + 1 :]).rstrip("0.") + _GO_EXPONENTS[dot]
    if dot < 0:  # inf, nan, an exponent already, or an int
        return floatToGoString(value)
    return text


GO_TEXTS_KEPT = 4096
_value_ends: dict[float, bytes] = {}
_ZERO_END, _MINUS_ZERO_END = b"0.0\n", b"-0.0\n"


def _value_end(value: float) -> bytes:
    """A line's end: the value as ``floatToGoString`` writes it, and the
    newline, as bytes, remembered for the latest values: an import's times
    are mostly one poll's clock reading, written three or four times. Zero
    is not remembered: 0.0 and -0.0 are one key but two texts."""
    end = _value_ends.get(value)
    if end is None or not value:
        if not value:  # most often a count of failures
            return _ZERO_END if math.copysign(1.0, value) > 0 else _MINUS_ZERO_END
        if len(_value_ends) >= GO_TEXTS_KEPT:
            _value_ends.clear()
        end = _value_ends[value] = _go_text(value).encode() + b"\n"
    return end


def _line(name: bytes, labels: bytes, value: float | None) -> bytes:
    """A line of family ``name``; ``labels``: ``{...} ``, the braces and the space."""
    if value is None:
        return _EMPTY
    end = _value_ends.get(value)  # :func:`_value_end`'s look, without its call
    if end is None or not value:
        end = _value_end(value)
    return name + labels + end


Running = tuple[bytes, int]
"""A running import's duration line: its start (up to the value) and the
import's start in milliseconds; the value, the time since, is made at scrape
time (:func:`_running_lines`)."""


def render_lines(record: ImportRecord) -> tuple[tuple[bytes, ...], Running | None]:
    """One import's lines of each per-import family (in :data:`FAMILY_NAMES`
    order; empty where it has none), and its duration line as
    :data:`Running` when that line moves with time (a running import: its
    duration line is then empty here)."""
    # Labels sorted by name, as prometheus_client writes them: byte for byte
    # the same lines as the reference collector's (but for a running
    # import's duration value, written at scrape time to the millisecond).
    # Made as bytes from bytes: a third less time than text encoded per line.
    obs = record.observation
    values: tuple[str, ...] = (
        record.import_id,
        record.source,
        record.name or "",
        record.system,
        obs.upstream_state if obs is not None else "",
    )
    if _needs_escape("".join(values)):  # one look at them all: most need none
        values = tuple(map(escape, values))
    import_id, source, name, system, upstream = values
    inner = f'import="{import_id}",source="{source}"'.encode()
    labels = b"{" + inner + b"} "
    current = obs.state if obs is not None else PENDING
    state = _STATE_LINES[current].replace(b"\0", _STATE_START + inner)
    info = (
        f'import_info{{import="{import_id}",name="{name}",origin="{record.origin}",'
        f'source="{source}",system="{system}",upstream_state="{upstream}"}} 1.0\n'
    ).encode()
    running = None
    duration = _EMPTY
    if obs is None:
        completed = expected = failed = start = end = changed = progress = success = _EMPTY
    else:
        completed = _line(_COMPLETED_NAME, labels, obs.items_completed)
        expected = _line(_EXPECTED_NAME, labels, obs.items_expected)
        failed = _line(_FAILED_NAME, labels, obs.items_failed)
        started = record.start_timestamp
        ended = record.end_timestamp
        start = _line(_START_NAME, labels, started)
        end = _line(_END_NAME, labels, ended)
        if started is not None:
            if ended is not None:
                duration = _line(_DURATION_NAME, labels, max(0.0, ended - started))
            elif current is State.RUNNING:
                running = (_DURATION_NAME + labels, milliseconds(started))
        changed = _line(_CHANGED_NAME, labels, record.state_since)
        progress = _line(_PROGRESS_NAME, labels, record.last_progress)
        success = _line(_SUCCESS_NAME, labels, record.last_success)
    attempt = _line(_ATTEMPT_NAME, labels, record.last_attempt)
    failures = _line(_FAILURES_NAME, labels, record.consecutive_failures)
    lines = (
        state,
        info,
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
    return lines, running


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


RENDER_BATCH = 20
"""Imports rendered again between two looks at the clock (a tenth of a
slice, :data:`~exporter.loop_slices.LOOP_SLICE_SECONDS`, or less: counts of
200 and 1,000 imports between yields held the loop 4-6 ms under polling,
where each import's record and lines are no longer in the CPU's caches)."""
POLL_LINES_BATCH = 100
"""Imports whose poll lines alone are rendered between two looks at the clock."""
JOIN_SLICE = 2048
"""Imports whose lines of a family one C-level join copies at most, on the
event loop: one join of a whole family (80 MB at 100,000 imports) would stop
it for tens of milliseconds."""
JOIN_BYTES = 256 * 1024
"""About how many bytes one join makes (fewer imports than
:data:`JOIN_SLICE` where lines are long, as ``import_state``'s nine): below
:data:`MMAP_THRESHOLD`, so each part's memory comes from the heap, reused
part after part, not fresh from ``mmap``, zeroed and faulted in by the
kernel page by page. At 100,000 imports a gzipped body took 177 ms of CPU
and 24,000 page faults in parts of 2,048 imports, 125-133 ms and 4,000-11,000
in parts of 512 (``bench/scrape.py``)."""


DURATION_SLICE = 1024
"""Imports whose running ones' duration lines are made in one part: a
line takes about 0.5 microseconds under polling (the most of any line made
at scrape time), so a part of every running import of :data:`JOIN_SLICE`
held the loop for a few milliseconds."""


def _slice_of(lines: Sequence[bytes]) -> int:
    """Imports per join of a family's lines: :data:`JOIN_BYTES` worth, judged
    by the longest of 16 lines spread over the family (long ids make every
    line of an import long)."""
    spread = lines[:: max(1, len(lines) // 16)]
    longest = max(map(len, spread), default=0)
    return max(1, min(JOIN_SLICE, JOIN_BYTES // max(longest, 1)))


Line = bytes | Running
_ATTEMPT, _SUCCESS, _FAILURES = (
    FAMILY_NAMES.index(name.decode()) for name in (_ATTEMPT_NAME, _SUCCESS_NAME, _FAILURES_NAME)
)
_NO_FAILURES = b"} 0.0\n"
"""The end of a failures line whose count is 0 (one failure is ``} 1.0``)."""


def _untrack_young() -> None:
    """Collect the youngest generation now, at a slice's end in a refresh:
    what the polls left young since is collected a slice's worth at a time.
    Left to its threshold, a collection at 10,000 imports paused the loop
    up to 6.6-7.2 ms against 2.5 ms (``bench/scale.py``'s worst GC pause in
    its windows, two runs each)."""
    gc.collect(0)


class ImportLines:
    """The per-import families of ``/metrics``, each import's lines kept as bytes.

    Kept by family, as kube-state-metrics does: one list per family, an import
    at the same position in each, so a family's join reads its lines and
    nothing else (a join through per-import tuples took 2.4 times as long at
    100,000 imports: a cache miss per tuple).

    :meth:`refresh` renders the imports changed since the last one, on the
    event loop (where the records change, so each is a consistent snapshot),
    a slice at a time; the loop alone writes the lists. :meth:`render` joins
    each family's lines a slice at a time with C-level joins, never while a
    refresh runs (the caller sees to it). This object must be the only one
    taking the state's unrendered imports.
    """

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self._families: list[list[bytes]] = [[] for _ in FAMILY_NAMES]
        self._keys: list[ImportKey] = []
        self._slots: dict[ImportKey, int] = {}
        """Each import's position in :attr:`_keys` and every family's list."""
        self._running_prefixes: list[bytes] = []
        """Per import, a running one's duration line up to the value (its line
        in the family's list is empty), and empty for the others."""
        self._running_starts = array("q")
        """Per import, a running one's start in milliseconds."""
        self._headers: dict[str, tuple[bytes, ...]] = {}
        self._refreshing: asyncio.Lock | None = None

    def lines_of(self, key: ImportKey) -> tuple[Line, ...] | None:
        """An import's kept lines, in :data:`FAMILY_NAMES` order (a running
        one's duration line as :data:`Running`)."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        lines: list[Line] = [family[slot] for family in self._families]
        if prefix := self._running_prefixes[slot]:
            lines[_DURATION] = (prefix, self._running_starts[slot])
        return tuple(lines)

    async def refresh(self, slices: LoopSlices | None = None) -> None:
        """Render again the imports changed since the last refresh, for the
        next :meth:`render`. On the event loop: O(changed), a slice of time
        at a time (``slices``: the caller's, whose next step goes on
        counting from where this one ends)."""
        if slices is None:
            slices = LoopSlices()
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:  # one at a time: the newest render wins
            changed, repolled = self.state.take_unrendered()
            keys, polled = list(changed), list(repolled)
            done = polled_done = 0
            try:
                while done < len(keys):
                    self._render_keys(keys[done : done + RENDER_BATCH])
                    done += RENDER_BATCH
                    if slices.due():
                        _untrack_young()
                        await slices.yield_now()
                while polled_done < len(polled):
                    self._render_poll_lines(polled[polled_done : polled_done + POLL_LINES_BATCH])
                    polled_done += POLL_LINES_BATCH
                    await slices.pause()
            finally:
                # Interrupted (cancelled): what is not rendered yet is for the next.
                self.state.put_back_unrendered(keys[done:], polled[polled_done:])

    def take_changes(self, in_order: Iterable[ImportKey] = ()) -> None:
        """:meth:`refresh` at once, in one piece (start-up, tests, benchmarks).
        ``in_order``: imports to render first, in that order, if changed: a
        store's, whose records lie in memory in that order (a fifth faster
        than a set's order at 100,000, and ``/metrics`` lists them sorted)."""
        changed, repolled = self.state.take_unrendered()
        first = [key for key in in_order if key in changed]
        changed.difference_update(first)
        self._render_keys(first)
        self._render_keys(list(changed))
        self._render_poll_lines(list(repolled))

    def _render_keys(self, keys: list[ImportKey]) -> None:
        imports = self.state.imports
        for key in keys:
            record = imports.get(key)
            if record is None:
                self._remove(key)
            else:
                self._put(key, *render_lines(record))

    def _put(self, key: ImportKey, lines: tuple[bytes, ...], running: Running | None) -> None:
        prefix, start = (_EMPTY, 0) if running is None else running
        slot = self._slots.get(key)
        if slot is None:
            self._slots[key] = len(self._keys)
            self._keys.append(key)
            for family, line in zip(self._families, lines, strict=True):
                family.append(line)
            self._running_prefixes.append(prefix)
            self._running_starts.append(start)
        else:
            for family, line in zip(self._families, lines, strict=True):
                family[slot] = line
            self._running_prefixes[slot] = prefix
            self._running_starts[slot] = start

    def _remove(self, key: ImportKey) -> None:
        """The last import takes the removed one's place in every list."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        last = self._keys.pop()
        prefix, start = self._running_prefixes.pop(), self._running_starts.pop()
        if last != key:
            self._keys[slot] = last
            self._slots[last] = slot
            for family in self._families:
                family[slot] = family.pop()
            self._running_prefixes[slot] = prefix
            self._running_starts[slot] = start
        else:
            for family in self._families:
                family.pop()

    def _render_poll_lines(self, keys: list[ImportKey]) -> None:
        """Only the poll lines of imports polled again with the same answer
        (last attempt, last success, failures in a row), a few times cheaper
        than all their lines; the labels are taken from the kept attempt line
        (from the end of the name to the space before the value: a value has
        no space, and a label value's spaces come before it)."""
        imports = self.state.imports
        attempts = self._families[_ATTEMPT]
        successes = self._families[_SUCCESS]
        failures = self._families[_FAILURES]
        for key in keys:
            record = imports.get(key)
            slot = self._slots.get(key)
            attempt = None if slot is None else attempts[slot]
            if record is None or slot is None or not attempt:
                self._render_keys([key])
                continue
            labels = attempt[len(_ATTEMPT_NAME) : attempt.rindex(b" ") + 1]
            attempted = record.last_attempt
            when = _value_end(attempted) if attempted is not None else None
            attempts[slot] = _EMPTY if when is None else _ATTEMPT_NAME + labels + when
            if record.observation is not None:
                success = record.last_success
                successes[slot] = (
                    _SUCCESS_NAME + labels + when
                    if when is not None and success == attempted
                    else _line(_SUCCESS_NAME, labels, success)
                )
            count = record.consecutive_failures
            if count or not failures[slot].endswith(_NO_FAILURES):
                failures[slot] = _line(_FAILURES_NAME, labels, count)

    def render(
        self, encoder: Encoder, content_type: str, names: frozenset[str] | None = None
    ) -> Iterator[bytes]:
        """The per-import families (only those in ``names`` if given), each its
        ``# HELP``/``# TYPE`` and its lines, as parts to join, made as they
        are taken (so a consumer that compresses each holds one at a time).
        The lines are read as they are, a slice at a time: no :meth:`refresh`
        may run until the last part is taken (``/metrics`` renders and
        refreshes under one lock), so every family is of one moment."""
        headers = self._headers_of(encoder, content_type)
        for index, name in enumerate(FAMILY_NAMES):
            if names is not None and name not in names:
                continue
            yield headers[index]
            if index == _DURATION:
                yield from self._durations(self.state.clock())
            else:
                yield from self._family(index)

    def _family(self, index: int) -> Iterator[bytes]:
        lines = self._families[index]
        step = _slice_of(lines)
        for at in range(0, len(lines), step):
            yield b"".join(lines[at : at + step])

    def _durations(self, now: float) -> Iterator[bytes]:
        """Running imports' duration lines made now, then finished ones' as
        kept (a slice at a time, both: the running ones of
        :data:`DURATION_SLICE` imports at a time)."""
        all_prefixes, all_starts = self._running_prefixes, self._running_starts
        now_ms = milliseconds(now)
        for at in range(0, len(all_prefixes), DURATION_SLICE):
            running = all_prefixes[at : at + DURATION_SLICE]
            prefixes = list(compress(running, running))
            if prefixes:
                starts = compress(all_starts[at : at + DURATION_SLICE], running)
                yield _running_lines(prefixes, starts, now_ms)
        yield from self._family(_DURATION)

    def _headers_of(self, encoder: Encoder, content_type: str) -> tuple[bytes, ...]:
        headers = self._headers.get(content_type)
        if headers is None:
            headers = tuple(
                _strip_eof(encoder(_Families([family]))) for family in import_families()
            )
            self._headers[content_type] = headers
        return headers


_RUNNING_LINE = b"%b%de-3\n"
"""A running import's duration line: its prefix (labels as arguments, never
part of the template) and the milliseconds since its start as a number with
an exponent, ``12345e-3`` for 12.345 seconds: a number of both exposition
formats (Go's ``ParseFloat``, OpenMetrics' ``realnumber``), exact to the
millisecond, and one integer to write per line instead of whole seconds and
three decimals (50,000 running imports: 12 against 23 ms)."""


def _running_lines(prefixes: list[bytes], starts: Iterable[int], now_ms: int) -> bytes:
    """Duration lines (at least one) at ``now_ms``, to the millisecond, with
    C-level maps and one format of a template repeated per line, a third
    faster than a format per line."""
    took = list(map(sub, repeat(now_ms), starts))
    if min(took) < 0:  # a clock behind the upstream's: never negative
        took = list(map(max, took, repeat(0)))
    values = tuple(chain.from_iterable(zip(prefixes, took, strict=True)))
    return (_RUNNING_LINE * len(prefixes)) % values


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
    yield render_registry(registry, encoder, names)


def render_registry(registry: CollectorRegistry, encoder: Encoder, names: Sequence[str]) -> bytes:
    """The registry's families (only ``names`` if given), through ``encoder``."""
    return encoder(registry.restricted_registry(list(names)) if names else registry)


def render_metrics(
    registry: CollectorRegistry,
    encoder: Encoder,
    content_type: str,
    imports: ImportLines | None = None,
    names: Sequence[str] = (),
) -> bytes:
    """:func:`render_parts` joined, as one bytes."""
    return b"".join(render_parts(registry, encoder, content_type, imports, names))


GZIP_BATCH = 8 * 1024 * 1024
"""Bytes of a body compressed by one call in the gzip thread. ISA-L (like
zlib) releases the GIL while it compresses, and the thread then waits up to
a switch interval to take it back from a busy event loop: one call per part
(650 at 100,000 imports) made a render under polling five times as long as
on an idle process. At 100,000 imports (a 147 MB body) scraped back to
back, a scrape's p99 was 2.03 s with batches of 4 MB (then copied in the
thread), 1.77 s with 8 MB (one run each)."""


def gzip_body(body: bytes, level: int = GZIP_LEVEL) -> bytes:
    """``body`` gzipped as ``/metrics`` serves it."""
    return _compress_last(_gzip_compressor(level), body)


def _gzip_compressor(level: int) -> isal_zlib.Compress:
    return isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)  # 31: a gzip header


async def _paced(items: Iterable[T], slices: LoopSlices) -> AsyncIterator[T]:
    """``items``, yielding to the event loop whenever the work on them (the
    caller's, between two items) has used up a slice of ``slices``."""
    for item in items:
        yield item
        await slices.pause()


async def build_body(
    parts: Iterable[bytes],
    gzipped: bool,
    level: int = GZIP_LEVEL,
    then: Awaitable[bytes] | None = None,
    slices: LoopSlices | None = None,
) -> bytearray:
    """``parts`` (made as they are taken: C-level joins of kept lines) joined,
    gzipped if asked. The parts are made on the event loop a slice at a time
    and, gzipped, copied there at once into a batch of :data:`GZIP_BATCH`
    bytes, which a worker thread (of lower priority, see
    :data:`GZIP_NICENESS`) compresses while the loop fills the next one.

    Not the whole render in a thread: while a thread wants the GIL for its
    joins of many small lines, the loop gives it up at each of its many
    system calls and waits up to a switch interval to get it back (the
    convoy effect), which cut polling under back-to-back scrapes by a third
    at 100,000 imports. The thread needs the GIL only to start and finish a
    batch. The loop copies each part while it is in the cache, and it is
    freed at once; copied in the thread, under the GIL, the copies held the
    loop up, and the parts waiting for them made the heap grow. ``then``:
    the last part, made elsewhere (the registry's families, by collectors
    that may block, in a worker thread). ``slices``: the caller's job's
    time on the loop (see :class:`~exporter.loop_slices.LoopSlices`)."""
    if slices is None:
        slices = LoopSlices()
    if not gzipped:
        return await _joined(await _collected(parts, then, slices), slices)
    compressor = _gzip_compressor(level)
    out: list[bytes] = []
    batches = [_Batch()]
    filling = batches[0]
    in_thread: tuple[Future[bytes], _Batch] | None = None

    async def copy(part: bytes) -> None:
        """``part`` into the batch being filled; each batch that fills up to
        the thread (once the one before is back), the other filled next."""
        nonlocal filling, in_thread
        rest = memoryview(part)
        while len(rest := filling.add(rest)):
            free = None
            if in_thread is not None:
                out.append(await asyncio.wrap_future(in_thread[0]))
                slices.restart()  # the loop went on while the thread compressed
                free = in_thread[1].emptied()
            in_thread = (_gzip_thread().submit(_compress_batch, compressor, filling), filling)
            if free is None:
                free = _Batch()
                batches.append(free)
            filling = free

    try:
        async for part in _paced(parts, slices):
            await copy(part)
        if then is not None:
            registry_part = await then
            slices.restart()
            await copy(registry_part)
        if in_thread is not None:
            out.append(await asyncio.wrap_future(in_thread[0]))
        in_thread = (_gzip_thread().submit(_compress_batch, compressor, filling, True), filling)
        out.append(await asyncio.wrap_future(in_thread[0]))
        in_thread = None
    finally:
        for batch in batches:
            if in_thread is not None and batch is in_thread[1]:
                # Cancelled: closed when the thread is done with it, not under it.
                in_thread[0].add_done_callback(functools.partial(_close_batch, batch))
            else:
                batch.close()
    return await _joined(out, slices)


async def _collected(
    parts: Iterable[bytes], then: Awaitable[bytes] | None, slices: LoopSlices
) -> list[bytes]:
    """``parts`` taken on the event loop, yielding to it between slices."""
    taken = [part async for part in _paced(parts, slices)]
    if then is not None:
        taken.append(await then)
    return taken


class _Batch:
    """:data:`GZIP_BATCH` bytes of memory that parts are copied into: an
    anonymous map, whose pages the kernel provides as they are first written
    and takes back at :meth:`close`. A body's batches are two, reused; not
    kept from body to body, which would keep 16 MB for good (1.6 KB an
    import at 10,000) to save about 4,000 page faults a large body."""

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, GZIP_BATCH)
        self.used = 0

    def add(self, part: memoryview) -> memoryview:
        """Copies what fits of ``part``; returns the rest (empty: all fitted)."""
        size = min(GZIP_BATCH - self.used, len(part))
        self.memory[self.used : self.used + size] = part[:size]
        self.used += size
        return part[size:]

    def emptied(self) -> _Batch:
        self.used = 0
        return self

    def close(self) -> None:
        self.memory.close()


GZIP_NICENESS = 10
"""The gzip thread's nice value (Linux sets it per thread; raising it needs
no privilege). On a busy machine the event loop, which polls and answers
probes, gets the CPU first: at 10,000 imports scraped back to back, the worst
``/-/healthy`` delay went from 24 to 19-20 ms; a scrape waits longer instead."""


def _lower_priority() -> None:
    # A thread's id names the thread to setpriority on Linux only.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), GZIP_NICENESS)


@functools.cache
def _gzip_thread() -> ThreadPoolExecutor:
    """One thread for every body's compression (calls of one body run in order)."""
    return ThreadPoolExecutor(1, thread_name_prefix="gzip", initializer=_lower_priority)


def _compress_last(compressor: isal_zlib.Compress, data: bytes | memoryview) -> bytes:
    return compressor.compress(data) + compressor.flush()


def _close_batch(batch: _Batch, _done: Future[bytes]) -> None:
    batch.close()


def _compress_batch(compressor: isal_zlib.Compress, batch: _Batch, last: bool = False) -> bytes:
    """What ``batch`` holds, compressed, in the gzip thread (without the GIL
    but to start and to finish)."""
    with memoryview(batch.memory) as memory, memory[: batch.used] as data:
        return _compress_last(compressor, data) if last else compressor.compress(data)


async def _joined(parts: list[bytes], slices: LoopSlices) -> bytearray:
    """``parts`` as one buffer, copied on the loop a slice at a time."""
    body = bytearray()
    async for index, part in _paced(enumerate(parts), slices):
        body += part
        parts[index] = _EMPTY
    return body


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 320 * 1024
"""Above 256 KiB: asyncio reads every socket into a new 256 KiB buffer (its
transports' ``max_size``) and shrinks it to what arrived. At 256 KiB each
read cost an ``mmap``, an ``mremap``, a ``munmap`` and a page fault: about
5 microseconds of every poll."""
TRIM_THRESHOLD = 1024 * 1024
"""Free memory at the top of a heap that glibc keeps rather than gives back:
more than a family's part (:data:`JOIN_BYTES`) or a socket read takes. Its
default, 128 KiB (no longer raised once :data:`MMAP_THRESHOLD` is set), gave
back each part's memory as it was freed, and the next part faulted it in
again page by page: a gzipped render at 100,000 imports, in a process doing
nothing else, took 17,000 page faults and 146 ms of CPU, against 9,000 and
130 ms with 1 MiB. (Under polling the heap's top is mostly held by live
objects: ``bench/scale.py`` showed no change beyond its noise.)"""


def return_large_buffers_to_the_os() -> bool:
    """glibc only (elsewhere a no-op, False): allocations of
    :data:`MMAP_THRESHOLD` and more (a body, its gzip)
    always from ``mmap``, so freeing them
    gives the memory back. Left alone, glibc raises that threshold to the
    largest block freed so far, after which every scrape's tens of megabytes
    come from the heaps of the threads that render and stay there,
    fragmented: RSS per import after scrapes was three times what the state
    needs. Two arenas at most, for the same reason (a heap per thread). Up to
    :data:`TRIM_THRESHOLD` free at the top of a heap is kept for the next
    allocations below the threshold."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_ARENA_MAX, 2),
    )
    # A list, not a generator: every setting is made even after one is refused.
    return all([bool(mallopt(option, value)) for option, value in settings])
