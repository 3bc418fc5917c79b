"""``/metrics`` at the speed of a memory copy: each import's lines kept rendered.

The design of kube-state-metrics (``pkg/metrics_store``): per object, its
lines of each metric family are kept as bytes, rendered again only when the
object changes, and a scrape writes the stored bytes family by family. Here
the state names the imports that changed (:meth:`StateStore.take_unrendered`);
a scrape renders those again on the event loop, a slice at a time
(:meth:`ImportLines.refresh`), then joins every family's bytes with C-level
joins, also on the loop a slice at a time (:meth:`ImportLines.render`,
:func:`build_body`). Gzipped, as Prometheus asks for it, the lines are kept
joined and compressed too, in chunks of a few hundred imports, each chunk's
family compressed again only once its lines change; a render copies the
compressed parts under one gzip header (:meth:`ImportLines.render_packed`,
:func:`gzipped_body`).

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
import ctypes
import ctypes.util
import gc
import itertools
import math
import struct
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from itertools import accumulate, chain, compress, repeat
from operator import sub
from typing import NamedTuple, Protocol, TypeVar, cast

from isal import isal_zlib
from prometheus_client import utils
from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.loop_slices import LoopSlices
from exporter.metrics import STATES, import_families
from exporter.model import PENDING, State
from exporter.state import (
    Clock,
    ImportKey,
    ImportRecord,
    StateStore,
    millisecond_clock,
    milliseconds,
)

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
_LABELS_AT = len(_STATE_START)
_STATE_LABEL = b',state="'


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


Inputs = tuple[
    str,  # source
    str,  # import id
    str,  # system
    str | None,  # name
    str,  # origin
    str | None,  # state (None: no answer yet, pending)
    str,  # upstream state
    int | None,  # items completed
    int | None,  # items expected
    int | None,  # items failed
    float | None,  # start
    float | None,  # end
    float | None,  # state since
    float | None,  # last progress
    float | None,  # last success
    float | None,  # last attempt
    int,  # failures in a row
]
"""What an import's lines are made of (:func:`inputs_of`), as plain values:
a render process gets them through a pipe, where a tuple of these pickles
in about 1.5 microseconds, an :class:`ImportRecord` (enums, a dataclass's
state) in 5, nearly as long as rendering the lines."""
PollInputs = tuple[float | None, float | None, bool, int]
"""What an import's poll lines are made of (:func:`poll_inputs_of`): last
attempt, last success, whether it has an answer, failures in a row."""


def inputs_of(record: ImportRecord) -> Inputs:
    """An import's :data:`Inputs`: its record, read now."""
    obs = record.observation
    if obs is None:
        return (
            record.source,
            record.import_id,
            record.system,
            record.name,
            record.origin.value,
            None,
            "",
            None,
            None,
            None,
            None,
            None,
            record.state_since,
            record.last_progress,
            record.last_success,
            record.last_attempt,
            record.consecutive_failures,
        )
    return (
        record.source,
        record.import_id,
        record.system,
        record.name,
        record.origin.value,
        obs.state.value,
        obs.upstream_state,
        obs.items_completed,
        obs.items_expected,
        obs.items_failed,
        record.start_timestamp,
        record.end_timestamp,
        record.state_since,
        record.last_progress,
        record.last_success,
        record.last_attempt,
        record.consecutive_failures,
    )


def poll_inputs_of(record: ImportRecord) -> PollInputs:
    """An import's :data:`PollInputs`: its record, read now."""
    return (
        record.last_attempt,
        record.last_success,
        record.observation is not None,
        record.consecutive_failures,
    )


def render_lines(record: ImportRecord) -> tuple[tuple[bytes, ...], Running | None]:
    """:func:`lines_from` the record's :data:`Inputs`."""
    return lines_from(inputs_of(record))


def lines_from(inputs: Inputs) -> tuple[tuple[bytes, ...], Running | None]:
    """One import's lines of each per-import family (in :data:`FAMILY_NAMES`
    order; empty where it has none), and its duration line as
    :data:`Running` when that line moves with time (a running import: its
    duration line is then empty here)."""
    # Labels sorted by name, as prometheus_client writes them: byte for byte
    # the same lines as the reference collector's (but for a running
    # import's duration value, written at scrape time to the millisecond).
    # Made as bytes from bytes: a third less time than text encoded per line.
    (
        source,
        import_id,
        system,
        name,
        origin,
        current,
        upstream,
        items_completed,
        items_expected,
        items_failed,
        started,
        ended,
        state_since,
        last_progress,
        last_success,
        last_attempt,
        failures_in_a_row,
    ) = inputs
    values: tuple[str, ...] = (import_id, source, name or "", system, upstream)
    if _needs_escape("".join(values)):  # one look at them all: most need none
        values = tuple(map(escape, values))
    import_id, source, name, system, upstream = values
    inner = f'import="{import_id}",source="{source}"'.encode()
    labels = b"{" + inner + b"} "
    state = _STATE_LINES[PENDING if current is None else current].replace(
        b"\0", _STATE_START + inner
    )
    info = (
        f'import_info{{import="{import_id}",name="{name}",origin="{origin}",'
        f'source="{source}",system="{system}",upstream_state="{upstream}"}} 1.0\n'
    ).encode()
    running = None
    duration = _EMPTY
    if current is None:
        completed = expected = failed = start = end = changed = progress = success = _EMPTY
    else:
        completed = _line(_COMPLETED_NAME, labels, items_completed)
        expected = _line(_EXPECTED_NAME, labels, items_expected)
        failed = _line(_FAILED_NAME, labels, items_failed)
        start = _line(_START_NAME, labels, started)
        end = _line(_END_NAME, labels, ended)
        if started is not None:
            if ended is not None:
                duration = _line(_DURATION_NAME, labels, max(0.0, ended - started))
            elif current == _RUNNING:
                running = (_DURATION_NAME + labels, milliseconds(started))
        changed = _line(_CHANGED_NAME, labels, state_since)
        progress = _line(_PROGRESS_NAME, labels, last_progress)
        success = _line(_SUCCESS_NAME, labels, last_success)
    attempt = _line(_ATTEMPT_NAME, labels, last_attempt)
    failures = _line(_FAILURES_NAME, labels, failures_in_a_row)
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


_RUNNING = State.RUNNING.value


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
CHUNK_IMPORTS = 256
"""Places for imports in a chunk (:class:`_Chunk`). A chunk's part of a
family is what a render joins, and gzips and keeps, in one piece: 256
imports' nine ``import_state`` lines are about 200 KB, below
:data:`MMAP_THRESHOLD` (so each join's memory comes from the heap, reused
part after part, not fresh from ``mmap``, zeroed and faulted in page by
page: at 100,000 imports a gzipped body took 177 ms of CPU and 24,000 page
faults in parts of 2,048 imports, 125-133 ms and 4,000-11,000 in parts of
512). Fewer imports a chunk would gzip less of a body again after each
change, at more calls per render."""
DURATION_SLICE = 1024
"""Imports whose running ones' duration lines are made in one part: a
line takes about 0.5 microseconds under polling (the most of any line made
at scrape time), so a part of every running import of many chunks would
hold the loop for a few milliseconds."""
SCAN_BATCH = 4096
"""Imports looked at between two looks at the clock where each is a dict
lookup or two (about 1 ms)."""
COMPACT_SLACK = 2 * CHUNK_IMPORTS
"""Empty places (beyond as many as there are imports) the chunks may hold
before :meth:`ImportLines.compact` moves the imports of chunks less than
half full to the tail."""

Line = bytes | Running
Part = bytes | memoryview
"""A part of a body: lines joined, or a view of a sealed chunk's (:class:`_Chunk`)."""
_STATE, _ATTEMPT, _SUCCESS, _FAILURES = (
    FAMILY_NAMES.index(name.decode())
    for name in (_STATE_NAME, _ATTEMPT_NAME, _SUCCESS_NAME, _FAILURES_NAME)
)
_NO_FAILURES = b"} 0.0\n"
"""The end of a failures line whose count is 0 (one failure is ``} 1.0``)."""


class Packed(NamedTuple):
    """A part of a gzipped body, compressed on its own: raw deflate ending
    with a full flush (on a byte boundary, no reference to what came before),
    so parts compressed at different times join in any order under one gzip
    header (:func:`gzipped_body`); with the CRC-32 and the length of what it
    holds, which the gzip trailer needs."""

    deflated: bytes
    crc: int
    size: int


_NOTHING = Packed(_EMPTY, 0, 0)
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
"""A gzip member's header: deflate, no name, no time, an unknown system."""
_DEFLATE_END = b"\x03\x00"
"""An empty final block of fixed codes: the end of the deflate stream."""


def pack(data: Part, level: int = GZIP_LEVEL) -> Packed:
    """``data`` compressed as a :class:`Packed` part, on the calling thread.

    On the event loop, not in a worker thread: ISA-L lets go of the GIL while
    it compresses, and a thread taking it back from a busy loop after each of
    many small parts waits up to a switch interval each time (one call per
    part made a render under polling five times as long as on an idle
    process). A part is at most a chunk's family, about 200 KB: 0.2 ms."""
    if not data:
        return _NOTHING
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)  # -15: raw deflate
    deflated = compressor.compress(data) + compressor.flush(isal_zlib.Z_FULL_FLUSH)
    return Packed(deflated, isal_zlib.crc32(data), len(data))


def _untrack_young() -> None:
    """Collect the youngest generation now, at a slice's end in a refresh:
    what the polls left young since is collected a slice's worth at a time.
    Left to its threshold, a collection at 10,000 imports paused the loop
    up to 6.6-7.2 ms against 2.5 ms (``bench/scale.py``'s worst GC pause in
    its windows, two runs each)."""
    gc.collect(0)


_TEMPLATE = len(FAMILY_NAMES)
"""A sealed chunk's section after its families': its duration template."""
_TEMPLATE_END = b"%de-3\n"
"""The end of a running import's duration line in a chunk's template (see
:data:`_RUNNING_LINE`): the milliseconds since its start."""


class _Chunk:
    """Up to :data:`CHUNK_IMPORTS` imports' lines, by family, each import at
    one place (index) in every family; a family's lines also kept gzipped
    (:attr:`packed`) until one of them changes.

    Imports are only ever added at the end of the newest chunk (the tail):
    an import whose lines change leaves its place empty and goes to the tail
    (:meth:`ImportLines._put`). Polls come round in a stable order (each
    import is due again an interval after its poll), so the imports of a
    chunk are polled again at about the same time: their chunk empties and
    is dropped, the tail fills, and the chunks in between, most of the body,
    keep their gzipped parts from render to render.

    The tail keeps a list of lines per family. A full chunk is sealed: each
    family's lines joined into one bytes, with the end of each place's line
    in an array, and its running imports' duration lines as one template;
    an import leaving it only marks its place empty (:attr:`holes`), and its
    lines are left out when the family is joined next (:meth:`family`).
    Neither bytes nor arrays are tracked by the cyclic garbage collector: a
    list of lines is walked by every full collection, which reads each line
    it holds (a cache miss each: 60-130 ms with the event loop stopped at
    100,000 imports). And one bytes per family instead of one per line
    saves each line's object header (about 600 bytes an import)."""

    __slots__ = (
        "_live_template",
        "ends",
        "holes",
        "kept",
        "lines",
        "live",
        "number",
        "packed",
        "prefixes",
        "running",
        "running_starts",
        "vacated",
        "whole",
    )

    def __init__(self, number: int) -> None:
        self.number = number
        self.live = 0
        self.holes = bytearray()
        """Per place, 1 once its import has left."""
        self.running = bytearray()
        """Per place, 1 for a running import (whose duration is made at each render)."""
        self.running_starts = array("q")
        """Per place, a running import's start in milliseconds."""
        self.lines: list[list[bytes]] | None = [[] for _ in FAMILY_NAMES]
        """While this is the tail: per family, each place's line."""
        self.prefixes: list[bytes] | None = []
        """While this is the tail: per place, a running import's duration line
        up to the value (its line in the family is then empty), and empty for
        the others."""
        self.whole = _EMPTY
        """Once sealed: every family's lines, family after family, each's
        places in order, then the template of the running imports' duration
        lines, each's value left to a ``%d`` (their prefixes' ``%``
        doubled): one bytes, so that its memory, over
        :data:`MMAP_THRESHOLD`, is mapped on its own and given back whole
        when the chunk goes (a bytes per family, 20-200 KB each, of a few
        hundred imports, fragmented the heap between the short-lived lines:
        4.6 KB of RSS an import at 100,000 against 3.2 with one bytes)."""
        self.ends = array("I")
        """Once sealed: where each place's line of each section ends in
        :attr:`whole` (section by section, each place's in order)."""
        self.vacated = False
        """Whether an import has left since the chunk was sealed."""
        self._live_template: bytes | None = None
        self.packed: list[Packed | None] = [None] * len(FAMILY_NAMES)
        """Per family, its lines joined and gzipped (None: not since they changed)."""
        self.kept = False
        """Whether :attr:`packed` holds any part."""

    @property
    def size(self) -> int:
        """Places, empty ones included."""
        return len(self.holes)

    def append(self, lines: Sequence[bytes], prefix: bytes, start: int) -> int:
        """Only while this is the tail."""
        assert self.lines is not None
        assert self.prefixes is not None
        index = len(self.holes)
        for family, line in zip(self.lines, lines, strict=True):
            family.append(line)
        self.prefixes.append(prefix)
        self.running.append(1 if prefix else 0)
        self.running_starts.append(start)
        self.holes.append(0)
        self.live += 1
        self._changed()
        return index

    def replace(self, index: int, lines: Sequence[bytes], prefix: bytes, start: int) -> None:
        """Only while this is the tail."""
        assert self.lines is not None
        assert self.prefixes is not None
        for family, line in zip(self.lines, lines, strict=True):
            family[index] = line
        self.prefixes[index] = prefix
        self.running[index] = 1 if prefix else 0
        self.running_starts[index] = start
        self._changed()

    def clear(self, index: int) -> None:
        """The import at ``index`` has left."""
        if self.lines is not None and self.prefixes is not None:
            for family in self.lines:
                family[index] = _EMPTY
            self.prefixes[index] = _EMPTY
        else:
            self.vacated = True
            self._live_template = None
        self.holes[index] = 1
        self.running[index] = 0
        self.running_starts[index] = 0
        self.live -= 1
        self._changed()

    def seal(self) -> None:
        """The lines joined into one bytes, family after family, then the
        duration template (see the class)."""
        if self.lines is None or self.prefixes is None:
            return
        template = [
            prefix.replace(b"%", b"%%") + _TEMPLATE_END if prefix else _EMPTY
            for prefix in self.prefixes
        ]
        sections = [*self.lines, template]
        self.whole = b"".join(chain.from_iterable(sections))
        self.ends = array("I", accumulate(map(len, chain.from_iterable(sections))))
        self.lines = self.prefixes = None

    def _begin(self, at: int) -> int:
        """Where the ``at``-th line of a sealed chunk (sections in turn) begins."""
        return self.ends[at - 1] if at else 0

    def _section(self, section: int, index: int) -> bytes:
        """The line at place ``index`` of a section (a family, or the template)."""
        at = section * len(self.holes) + index
        return self.whole[self._begin(at) : self.ends[at]]

    def lines_at(self, index: int) -> list[bytes]:
        """The lines at place ``index``, in :data:`FAMILY_NAMES` order."""
        if self.lines is not None:
            return [family[index] for family in self.lines]
        size, ends = len(self.holes), self.ends
        stops = ends[index : _TEMPLATE * size : size]
        if index:
            starts = ends[index - 1 : _TEMPLATE * size - 1 : size]
        else:  # where each section before a family ends
            starts = array("I", [0, *ends[size - 1 : (_TEMPLATE - 1) * size : size]])
        return list(map(self.whole.__getitem__, map(slice, starts, stops)))

    def prefix_at(self, index: int) -> bytes:
        """The duration line's prefix of a running import at ``index`` (else empty)."""
        if self.prefixes is not None:
            return self.prefixes[index]
        if not self.running[index]:
            return _EMPTY
        segment = self._section(_TEMPLATE, index)
        return segment[: -len(_TEMPLATE_END)].replace(b"%%", b"%") if segment else _EMPTY

    def family(self, index: int) -> bytes | memoryview:
        """The family's lines, joined, but those of places left empty."""
        if self.lines is not None:
            return b"".join(self.lines[index])
        return self._live(index)

    def _live(self, section: int) -> bytes | memoryview:
        """A section's lines but those of places left empty, joined a run
        of places at a time (one view of :attr:`whole` if none is empty)."""
        size = len(self.holes)
        first = section * size
        ends = self.ends
        view = memoryview(self.whole)
        if not self.vacated:
            return view[self._begin(first) : ends[first + size - 1]]
        holes = self.holes
        parts = []
        start = 0
        while start < size:
            hole = holes.find(1, start)
            if hole < 0:
                hole = size
            if hole > start:
                parts.append(view[self._begin(first + start) : ends[first + hole - 1]])
            start = holes.find(0, hole)
            if start < 0:
                break
        return b"".join(parts)

    def packed_family(self, index: int) -> Packed:
        """:meth:`family` gzipped, kept until the chunk changes."""
        packed = self.packed[index]
        if packed is None:
            packed = self.packed[index] = pack(self.family(index))
            self.kept = True
        return packed

    def durations(self, now_ms: int) -> bytes:
        """The running imports' duration lines at ``now_ms``."""
        starts = compress(self.running_starts, self.running)
        if self.prefixes is not None:
            prefixes = list(compress(self.prefixes, self.running))
            return _running_lines(prefixes, starts, now_ms) if prefixes else _EMPTY
        template = self._live_template
        if template is None:
            template = self._live_template = bytes(self._live(_TEMPLATE))
        return template % tuple(_elapsed(starts, now_ms)) if template else _EMPTY

    def _changed(self) -> None:
        if self.kept:
            self.packed = [None] * len(FAMILY_NAMES)
            self.kept = False


Update = tuple[ImportKey, Inputs | PollInputs | None, bool]
"""An import to render again: its key; its :data:`Inputs` (None: it is
gone), or only its :data:`PollInputs` where it was only polled again, its
news in its poll lines alone; whether it changed (False: only polled)."""


class KeptLines:
    """The per-import families of ``/metrics``, each import's lines kept as bytes.

    Kept by family, as kube-state-metrics does, in chunks of
    :data:`CHUNK_IMPORTS` imports (:class:`_Chunk`): per chunk, one list per
    family, an import at the same index in each, so a family's join reads
    its lines and nothing else (a join through per-import tuples took 2.4
    times as long at 100,000 imports: a cache miss per tuple). A gzipped
    render (what Prometheus asks for) joins and compresses only the chunks'
    families that changed since the last one, and copies the others' kept
    gzipped parts: at 100,000 imports, about 9 MB instead of 135 MB of lines.

    Fed :data:`Update` s (:meth:`update`): by :class:`ImportLines` from a
    state in this process, or by a render process from its pipe
    (:mod:`exporter.render_process`). :meth:`render` and
    :meth:`render_packed` read the chunks; no update may come until their
    last part is taken, so every family is of one moment.
    """

    def __init__(self, clock: Clock = millisecond_clock) -> None:
        self.clock = clock
        """Now, for the running imports' durations (see :meth:`render`)."""
        self._chunks: dict[int, _Chunk] = {}
        """By number, oldest first: the order of the lines in each family."""
        self._tail: _Chunk | None = None
        self._numbers = itertools.count()
        self._places = 0
        """Places in the chunks, empty ones included."""
        self._slots: dict[ImportKey, int] = {}
        """Each import's place: its chunk's number times
        :data:`CHUNK_IMPORTS`, plus its index there."""
        self._headers: dict[str, tuple[bytes, ...]] = {}
        self._packed_headers: dict[str, tuple[Packed, ...]] = {}

    def lines_of(self, key: ImportKey) -> tuple[Line, ...] | None:
        """An import's kept lines, in :data:`FAMILY_NAMES` order (a running
        one's duration line as :data:`Running`)."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        chunk, index = self._place(slot)
        lines: list[Line] = list(chunk.lines_at(index))
        if prefix := chunk.prefix_at(index):
            lines[_DURATION] = (prefix, chunk.running_starts[index])
        return tuple(lines)

    def update(self, key: ImportKey, inputs: Inputs | PollInputs | None, changed: bool) -> None:
        """One :data:`Update`: the import's lines rendered again, at the
        tail. Raises KeyError for poll lines of an import not kept (every
        import is first sent as changed: a bug, which a render process
        must not hide by leaving the import out)."""
        if inputs is None:
            self._remove(key)
        elif changed:
            self.put(key, cast(Inputs, inputs))
        elif not self.poll(key, cast(PollInputs, inputs)):
            raise KeyError(f"poll lines of an import not kept: {key!r}")

    def put(self, key: ImportKey, inputs: Inputs) -> None:
        """All of an import's lines rendered again, at the tail."""
        lines, running = lines_from(inputs)
        prefix, start = (_EMPTY, 0) if running is None else running
        self._put(key, lines, prefix, start)

    def _place(self, slot: int) -> tuple[_Chunk, int]:
        number, index = divmod(slot, CHUNK_IMPORTS)
        return self._chunks[number], index

    def _put(self, key: ImportKey, lines: Sequence[bytes], prefix: bytes, start: int) -> None:
        """An import's new lines, at the tail: in its place if it is there
        already, else at the tail's end (a new tail if it is full), its old
        place left empty."""
        slot = self._slots.get(key)
        tail = self._tail
        if slot is not None:
            chunk, index = self._place(slot)
            if chunk is tail:
                tail.replace(index, lines, prefix, start)
                return
            self._vacate(chunk, index)
        if tail is None or tail.size >= CHUNK_IMPORTS:
            if tail is not None:
                if tail.live:
                    tail.seal()
                else:
                    self._drop(tail)
            tail = self._tail = _Chunk(next(self._numbers))
            self._chunks[tail.number] = tail
        self._slots[key] = tail.number * CHUNK_IMPORTS + tail.append(lines, prefix, start)
        self._places += 1

    def _vacate(self, chunk: _Chunk, index: int) -> None:
        chunk.clear(index)
        if not chunk.live and chunk is not self._tail:
            self._drop(chunk)

    def _drop(self, chunk: _Chunk) -> None:
        del self._chunks[chunk.number]
        self._places -= chunk.size

    def _remove(self, key: ImportKey) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._vacate(*self._place(slot))

    def _wasted(self) -> bool:
        """Empty places beyond as many as there are imports, and then some."""
        return self._places > 2 * len(self._slots) + COMPACT_SLACK

    def compact(self) -> Iterator[None]:
        """If the chunks hold too many empty places (:meth:`_wasted`), the
        imports of those less than half full but the tail (an import that
        never changes again, finished and no longer polled, keeps its chunk)
        moved to the tail. Their imports are found in one pass over every
        import, as rare as a compaction; None is yielded between steps (for
        the caller to yield to the loop)."""
        if not self._wasted():
            return
        half = CHUNK_IMPORTS // 2
        places: dict[int, list[tuple[int, ImportKey]]] = {
            number: []
            for number, chunk in self._chunks.items()
            if chunk is not self._tail and chunk.live < half
        }
        slots = list(self._slots.items())
        for at in range(0, len(slots), SCAN_BATCH):
            for key, slot in slots[at : at + SCAN_BATCH]:
                number, index = divmod(slot, CHUNK_IMPORTS)
                if number in places:
                    places[number].append((index, key))
            yield None
        for number, chunk_places in places.items():
            if (chunk := self._chunks.get(number)) is not None:
                self._move_to_tail(chunk, chunk_places)
            yield None

    def _move_to_tail(self, chunk: _Chunk, places: list[tuple[int, ImportKey]]) -> None:
        """The imports at ``places`` in ``chunk`` (all of them) to the tail,
        with their lines as they are; the chunk, emptied, is dropped."""
        for index, key in sorted(places):
            lines = chunk.lines_at(index)
            self._put(key, lines, chunk.prefix_at(index), chunk.running_starts[index])
        if chunk.number in self._chunks:  # empty already, it was not dropped
            self._drop(chunk)

    def poll(self, key: ImportKey, inputs: PollInputs) -> bool:
        """Only the poll lines of an import polled again with the same answer
        (last attempt, last success, failures in a row), a few times cheaper
        than all its lines; its labels taken from its first ``import_state``
        line, which every import has (up to ``,state="``: a label value's
        double quotes are escaped). False for an import not kept (nothing
        done)."""
        slot = self._slots.get(key)
        if slot is None:
            return False
        chunk, index = self._place(slot)
        lines = chunk.lines_at(index)
        state = lines[_STATE]
        labels = b"{" + state[_LABELS_AT : state.index(_STATE_LABEL, _LABELS_AT)] + b"} "
        attempted, success, observed, count = inputs
        when = _value_end(attempted) if attempted is not None else None
        lines[_ATTEMPT] = _EMPTY if when is None else _ATTEMPT_NAME + labels + when
        if observed:
            lines[_SUCCESS] = (
                _SUCCESS_NAME + labels + when
                if when is not None and success == attempted
                else _line(_SUCCESS_NAME, labels, success)
            )
        if count or not lines[_FAILURES].endswith(_NO_FAILURES):
            lines[_FAILURES] = _line(_FAILURES_NAME, labels, count)
        self._put(key, lines, chunk.prefix_at(index), chunk.running_starts[index])
        return True

    def render(
        self,
        encoder: Encoder,
        content_type: str,
        names: frozenset[str] | None = None,
        now: float | None = None,
    ) -> Iterator[Part]:
        """The per-import families (only those in ``names`` if given), each its
        ``# HELP``/``# TYPE`` and its lines, as parts to join, made as they
        are taken (so a consumer holds one at a time), a chunk's family a
        part; the running imports' durations as at ``now`` (else
        :attr:`clock`'s now). The lines are read as they are: no update
        may come until the last part is taken, so every family is of one
        moment."""
        headers = self._headers_of(encoder, content_type)
        return self._parts(names, headers, _Chunk.family, _same, now)

    def render_packed(
        self,
        encoder: Encoder,
        content_type: str,
        names: frozenset[str] | None = None,
        now: float | None = None,
    ) -> Iterator[Packed]:
        """:meth:`render`'s parts gzipped (for :func:`gzipped_body`): a
        chunk's family as kept since the last render if none of its lines
        changed, else joined and compressed now (and kept)."""
        headers = self._packed_headers.get(content_type)
        if headers is None:
            plain = self._headers_of(encoder, content_type)
            headers = self._packed_headers[content_type] = tuple(map(pack, plain))
        return self._parts(names, headers, _Chunk.packed_family, pack, now)

    def _parts(
        self,
        names: frozenset[str] | None,
        headers: Sequence[T],
        family: Callable[[_Chunk, int], T],
        durations: Callable[[bytes], T],
        now: float | None,
    ) -> Iterator[T]:
        """Each wanted family's header, then its lines: the running imports'
        durations made at ``now`` (if the family is theirs), and each chunk's
        ``family``, from a list of the chunks taken at the start."""
        chunks = list(self._chunks.values())
        for index, name in enumerate(FAMILY_NAMES):
            if names is not None and name not in names:
                continue
            yield headers[index]
            if index == _DURATION:
                at = self.clock() if now is None else now
                yield from map(durations, _running_parts(chunks, at))
            for chunk in chunks:
                yield family(chunk, index)

    def _headers_of(self, encoder: Encoder, content_type: str) -> tuple[bytes, ...]:
        headers = self._headers.get(content_type)
        if headers is None:
            headers = tuple(
                _strip_eof(encoder(_Families([family]))) for family in import_families()
            )
            self._headers[content_type] = headers
        return headers


class ImportFamilies(Protocol):
    """The per-import families as ``/metrics`` serves them: kept in this
    process (:class:`ImportLines`) or in a render process
    (:class:`exporter.render_process.RenderProcess`)."""

    async def refresh(self, slices: LoopSlices | None = None) -> None:
        """Render again the imports changed since the last refresh."""

    async def body(
        self,
        encoder: Encoder,
        content_type: str,
        names: frozenset[str] | None,
        gzipped: bool,
        then: Awaitable[bytes] | None = None,
        slices: LoopSlices | None = None,
    ) -> bytes | bytearray:
        """The families (only ``names`` if given) then ``then``, gzipped or not."""


class ImportLines(KeptLines):
    """:class:`KeptLines` of a state's imports, in this process.

    :meth:`refresh` renders the imports changed since the last one, on the
    event loop (where the records change, so each is a consistent snapshot),
    a slice at a time; the loop alone writes the chunks. :meth:`render` and
    :meth:`render_packed` read them a slice at a time, never while a refresh
    runs (the caller sees to it). This object must be the only one taking
    the state's unrendered imports.
    """

    def __init__(self, state: StateStore) -> None:
        super().__init__(state.clock)
        self.state = state
        self._refreshing: asyncio.Lock | None = None

    async def refresh(self, slices: LoopSlices | None = None) -> None:
        """Render again the imports changed since the last refresh, for the
        next :meth:`render`. On the event loop: O(changed), a slice of time
        at a time (``slices``: the caller's, whose next step goes on
        counting from where this one ends). In the order the state first
        marked them, for most the order their polls answered in, which is the order
        the tail gets them in: polls coming round again in that order empty
        chunks one after the other, rather than leave each partly empty a
        render longer (and compressed again), as any other order would."""
        if slices is None:
            slices = LoopSlices()
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:  # one at a time: the newest render wins
            unrendered = self.state.take_unrendered()
            imports = self.state.imports
            changed_since = self.state.changed_since_taken
            keys = list(unrendered)
            done = 0
            try:
                while done < len(keys):
                    for key in keys[done : done + RENDER_BATCH]:
                        changed = unrendered[key] or changed_since(key)
                        self._render(key, imports.get(key), changed)
                        done += 1
                    if slices.due():
                        _untrack_young()
                        await slices.yield_now()
                for _ in self.compact():
                    await slices.pause()
            finally:
                # Interrupted (cancelled): what is not rendered yet is for the next.
                self.state.put_back_unrendered({key: unrendered[key] for key in keys[done:]})

    def take_changes(self, in_order: Iterable[ImportKey] = ()) -> None:
        """:meth:`refresh` at once, in one piece (start-up, tests, benchmarks).
        ``in_order``: imports to render first, in that order, if changed: a
        store's, whose records lie in memory in that order (a fifth faster
        than a set's order at 100,000, and ``/metrics`` lists them sorted
        until they change)."""
        unrendered = self.state.take_unrendered()
        imports = self.state.imports
        for key, changed in _in_order(unrendered, in_order):
            self._render(key, imports.get(key), changed)
        for _ in self.compact():
            pass

    def _render(self, key: ImportKey, record: ImportRecord | None, changed: bool) -> None:
        """An import's lines rendered again from its record (None: gone):
        its poll lines alone if it only was polled again (and is kept)."""
        if record is None:
            self._remove(key)
        elif changed or not self.poll(key, poll_inputs_of(record)):
            self.put(key, inputs_of(record))

    async def body(
        self,
        encoder: Encoder,
        content_type: str,
        names: frozenset[str] | None,
        gzipped: bool,
        then: Awaitable[bytes] | None = None,
        slices: LoopSlices | None = None,
    ) -> bytearray:
        """:func:`render_body` of these lines."""
        return await render_body(self, encoder, content_type, names, gzipped, then, slices)


def updates_of(state: StateStore, in_order: Iterable[ImportKey] = ()) -> Iterator[Update]:
    """The state's unrendered imports (taken now) as updates, made as they
    are taken, in :func:`_in_order`."""
    unrendered = state.take_unrendered()
    imports = state.imports
    for key, changed in _in_order(unrendered, in_order):
        yield update_of(key, imports.get(key), changed)


def update_of(key: ImportKey, record: ImportRecord | None, changed: bool) -> Update:
    """The :data:`Update` of an import from its record (None: gone)."""
    if record is None:
        return key, None, True
    if changed:
        return key, inputs_of(record), True
    return key, poll_inputs_of(record), False


def _in_order(
    unrendered: dict[ImportKey, bool], in_order: Iterable[ImportKey]
) -> Iterator[tuple[ImportKey, bool]]:
    """Unrendered imports: first those of ``in_order`` (in that order) that
    changed, then the other changed ones, then those only polled again."""
    first = [key for key in in_order if unrendered.get(key)]
    for key in first:
        unrendered.pop(key, None)
    for key in first:
        yield key, True
    for key, changed in unrendered.items():
        if changed:
            yield key, True
    for key, changed in unrendered.items():
        if not changed:
            yield key, False


def _same(part: Part) -> Part:
    return part


def _running_parts(chunks: Iterable[_Chunk], now: float) -> Iterator[bytes]:
    """The running imports' duration lines made now, a part for every
    :data:`DURATION_SLICE` imports or so (whole chunks)."""
    now_ms = milliseconds(now)
    parts: list[bytes] = []
    places = 0
    for chunk in chunks:
        if lines := chunk.durations(now_ms):
            parts.append(lines)
        places += chunk.size
        if places >= DURATION_SLICE and parts:
            yield b"".join(parts)
            parts, places = [], 0
    if parts:
        yield b"".join(parts)


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
    took = _elapsed(starts, now_ms)
    values = tuple(chain.from_iterable(zip(prefixes, took, strict=True)))
    return (_RUNNING_LINE * len(prefixes)) % values


def _elapsed(starts: Iterable[int], now_ms: int) -> list[int]:
    """Milliseconds from each of ``starts`` (at least one) to ``now_ms``,
    with C-level maps; never negative (a clock behind the upstream's)."""
    took = list(map(sub, repeat(now_ms), starts))
    if min(took) < 0:
        took = list(map(max, took, repeat(0)))
    return took


def _strip_eof(body: bytes) -> bytes:
    return body[: -len(_EOF)] if body.endswith(_EOF) else body


def render_parts(
    registry: CollectorRegistry,
    encoder: Encoder,
    content_type: str,
    imports: KeptLines | None = None,
    names: Sequence[str] = (),
) -> Iterator[Part]:
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
    imports: KeptLines | None = None,
    names: Sequence[str] = (),
) -> bytes:
    """:func:`render_parts` joined, as one bytes."""
    return b"".join(render_parts(registry, encoder, content_type, imports, names))


def gzip_body(body: bytes, level: int = GZIP_LEVEL) -> bytes:
    """``body`` gzipped in one piece."""
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)  # 31: a gzip header
    return compressor.compress(body) + compressor.flush()


async def _paced(items: Iterable[T], slices: LoopSlices) -> AsyncIterator[T]:
    """``items``, yielding to the event loop whenever the work on them (the
    caller's, between two items) has used up a slice of ``slices``."""
    for item in items:
        yield item
        await slices.pause()


async def build_body(
    parts: Iterable[Part],
    then: Awaitable[bytes] | None = None,
    slices: LoopSlices | None = None,
) -> bytearray:
    """``parts`` (made as they are taken: C-level joins of kept lines) joined
    on the event loop a slice at a time. ``then``: the last part, made
    elsewhere (the registry's families, by collectors that may block, in a
    worker thread). ``slices``: the caller's job's time on the loop (see
    :class:`~exporter.loop_slices.LoopSlices`)."""
    if slices is None:
        slices = LoopSlices()
    body = bytearray()
    async for part in _paced(parts, slices):
        body += part
    if then is not None:
        body += await then
    return body


async def render_body(
    imports: KeptLines | None,
    encoder: Encoder,
    content_type: str,
    names: frozenset[str] | None,
    gzipped: bool,
    then: Awaitable[bytes] | None = None,
    slices: LoopSlices | None = None,
) -> bytearray:
    """What ``/metrics`` serves: the per-import families from ``imports``
    (only ``names`` if given; none without ``imports``), then ``then``,
    gzipped (:func:`gzipped_body`) or not (:func:`build_body`)."""
    if gzipped:
        packed = imports.render_packed(encoder, content_type, names) if imports is not None else ()
        return await gzipped_body(packed, then, slices)
    parts = imports.render(encoder, content_type, names) if imports is not None else ()
    return await build_body(parts, then, slices)


class GzipMember:
    """One gzip member made of :class:`Packed` parts: the gzip header, every
    part's deflate blocks, an empty final block, and the trailer of the
    whole (the parts' CRC-32s combined, the total length)."""

    def __init__(self) -> None:
        self.body = bytearray(_GZIP_HEADER)
        self.crc = 0
        self.size = 0

    def add(self, item: Packed | Part) -> None:
        part = item if isinstance(item, Packed) else pack(item)
        if part.size:
            self.body += part.deflated
            self.crc = isal_zlib.crc32_combine(self.crc, part.crc, part.size)
            self.size += part.size

    def deflated(self) -> memoryview:
        """The parts' deflate blocks so far, without the header (a
        :class:`Packed` part of another member, with :attr:`crc` and
        :attr:`size`)."""
        return memoryview(self.body)[len(_GZIP_HEADER) :]

    def end(self) -> bytearray:
        self.body += _DEFLATE_END
        self.body += struct.pack("<II", self.crc, self.size & 0xFFFFFFFF)
        return self.body


def gzip_member(deflated: Iterable[Part], crc: int, size: int) -> bytes:
    """One gzip member of raw deflate blocks (each :class:`Packed` part's,
    on a byte boundary) whose data has CRC-32 ``crc`` and length ``size``:
    joined in one copy."""
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return b"".join([_GZIP_HEADER, *deflated, _DEFLATE_END, trailer])


def gzip_parts(parts: Iterable[Packed | Part]) -> bytearray:
    """:func:`gzipped_body` at once, in one piece."""
    member = GzipMember()
    for part in parts:
        member.add(part)
    return member.end()


async def gzipped_body(
    parts: Iterable[Packed | Part],
    then: Awaitable[bytes] | None = None,
    slices: LoopSlices | None = None,
) -> bytearray:
    """One gzip member of ``parts`` (each compressed already, or compressed
    now), taken and copied on the event loop a slice at a time; ``then``
    and ``slices`` as for :func:`build_body`."""
    if slices is None:
        slices = LoopSlices()
    member = GzipMember()
    async for part in _paced(parts, slices):
        member.add(part)
    if then is not None:
        registry_part = await then
        slices.restart()
        member.add(registry_part)
    return member.end()


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
more than a chunk's family (:data:`CHUNK_IMPORTS`) or a socket read takes. Its
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
