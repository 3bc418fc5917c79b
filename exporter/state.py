"""The one in-memory truth about every source and every tracked import.

Only the poller and the exporter's registration calls write here; the metrics
collector, the pages, the API and the persistence (which takes the changed and
forgotten imports with :meth:`StateStore.take_changes`) only read. Timestamps
are wall-clock epoch seconds, because they are exported as
``*_timestamp_seconds``, read to the millisecond (:func:`millisecond_clock`).

Over 400 lines because every transition of a record (observed, failed, held,
parked, expired) belongs beside the others: they keep one invariant.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from exporter.import_index import ImportIndex, ImportKey

__all__ = ["ImportIndex", "ImportKey", "ImportRecord", "SourceRecord", "StateStore"]
from exporter.model import TERMINAL_STATES, ErrorReason, Observation, Origin, SourceError, State
from exporter.redact import redact

REQUEST_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ERROR_TIMES_KEPT = 1000
"""Error times kept per source for the status page's recent count; bounded so
a source failing every poll of 10,000 imports cannot grow memory."""

SHARED_OBSERVATIONS = 4096
"""Distinct answers without counts or times kept as shared objects, at most."""
SORT_CHANGES_BELOW = 16
"""Changes taken for the store are sorted when fewer than one import in this
many changed (100,000 imports: up to 6,000 keys, about 3 ms), else picked out
of the sorted index as they are read (cheaper than a sort once many changed)."""

Clock = Callable[[], float]


@dataclass(slots=True)
class ImportRecord:
    """What the exporter knows about one import."""

    source: str
    import_id: str
    system: str
    name: str | None = None
    origin: Origin = Origin.CONFIG
    observation: Observation | None = None
    first_seen: float | None = None
    """When the first successful poll of this import came back."""
    state_since: float | None = None
    """When the current state was first seen."""
    last_progress: float | None = None
    """When state, step or completed count last changed."""
    seen_running_at: float | None = None
    """When the exporter first saw the import running (start fallback)."""
    seen_finished_at: float | None = None
    """When the exporter first saw the import in a terminal state (end fallback)."""
    last_success: float | None = None
    last_attempt: float | None = None
    """When the latest poll of this process came back, answered or failed."""
    consecutive_failures: int = 0
    """Polls in a row that failed since the last answer (0 after an answer)."""
    last_error: str | None = None
    last_error_reason: ErrorReason | None = None
    last_error_at: float | None = None
    confirmed_final: bool = False
    """A terminal state was seen twice in a row: no need to poll again."""
    polled_this_run: bool = False
    """A poll of this process answered (restored records start without)."""
    parked_at: float | None = None
    """When its source left the config (registered imports only): kept, but
    neither polled nor exported, until a source of that name returns."""
    key: ImportKey = field(init=False, repr=False, compare=False)
    """``(source, import_id)``: the one tuple the state's tables hold for this
    import. A poll marks its import changed under this key, not a new tuple:
    a tuple a poll, alive until the next write or scrape took it, was most
    of what each young collection of the cyclic GC walked."""

    def __post_init__(self) -> None:
        self.key = (self.source, self.import_id)

    @property
    def state(self) -> State | None:
        return self.observation.state if self.observation else None

    @property
    def poll_failing(self) -> bool:
        """The latest poll failed: ``last_error`` is current, not history."""
        return self.consecutive_failures > 0

    @property
    def start_timestamp(self) -> float | None:
        obs = self.observation
        if obs is not None and obs.started_at is not None:
            return obs.started_at
        return self.seen_running_at

    @property
    def end_timestamp(self) -> float | None:
        obs = self.observation
        if obs is None or obs.state not in TERMINAL_STATES:
            return None
        if obs.ended_at is not None:
            return obs.ended_at
        return self.seen_finished_at

    def duration(self, now: float) -> float | None:
        start = self.start_timestamp
        if start is None:
            return None
        end = self.end_timestamp
        if end is None:
            if self.state is not State.RUNNING:
                return None
            # Moving with the clock: to the millisecond, as /metrics makes it
            # at each scrape (exporter.exposition).
            return max(0, milliseconds(now) - milliseconds(start)) / 1000
        return max(0.0, end - start)


@dataclass(slots=True)
class SourceRecord:
    """What the exporter knows about one configured upstream."""

    name: str
    system: str
    interval: float
    up: bool | None = None
    requests_total: int = 0
    errors_total: Counter[ErrorReason] = field(default_factory=Counter)
    duration_bucket_counts: list[int] = field(
        default_factory=lambda: [0] * (len(REQUEST_DURATION_BUCKETS) + 1)
    )
    duration_sum: float = 0.0
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    error_times: deque[float] = field(default_factory=lambda: deque(maxlen=ERROR_TIMES_KEPT))
    """When the latest failed polls happened, oldest first."""
    token_requests: Counter[str] | None = None
    """Token-endpoint calls by outcome; None for a source that fetches no tokens."""
    answering: set[str] = field(default_factory=set)
    """Imports still polled whose latest poll got an answer. The source is up
    while any has: one broken import among many does not make it flap."""

    def recent_errors(self, now: float, window: float) -> int:
        """Failed polls in the last ``window`` seconds (at most ERROR_TIMES_KEPT)."""
        count = 0
        for when in reversed(self.error_times):
            if when < now - window:
                break
            count += 1
        return count


MILLISECONDS_LIMIT = float(2**62)
"""About 146 million years either side of 1970: any time an upstream may
send, clamped, fits in 64 bits."""


def milliseconds(seconds: float) -> int:
    """A time in whole milliseconds (nearest), the precision of a running
    import's duration; within :data:`MILLISECONDS_LIMIT`, and 0 for NaN
    (which no source lets through: a render must never fail on one)."""
    scaled = seconds * 1000
    if -MILLISECONDS_LIMIT <= scaled <= MILLISECONDS_LIMIT:  # False for NaN
        return round(scaled)
    if math.isnan(scaled):
        return 0
    return round(min(max(scaled, -MILLISECONDS_LIMIT), MILLISECONDS_LIMIT))


def millisecond_clock() -> float:
    """Epoch seconds to the millisecond, the precision of a Prometheus
    timestamp: the polls answered within one millisecond share a reading,
    so ``/metrics`` makes its number text once for them all, and the text
    is shorter (re-rendering a changed import at 100,000 imports: 8.1 ->
    7.2 us)."""
    return time.time_ns() // 1_000_000 / 1000


class StateStore:
    """Sources and imports, keyed by source name and (source, import id)."""

    def __init__(self, clock: Clock = millisecond_clock) -> None:
        self.clock = clock
        self.sources: dict[str, SourceRecord] = {}
        self.imports: ImportIndex = ImportIndex()
        self.parked: ImportIndex = ImportIndex()
        """Registered imports of sources no longer configured (see :meth:`park`)."""
        # For persistence: imports that changed, imports whose only news is a
        # newer poll time (written less often: most polls change nothing else;
        # oldest first, a share at each write), and imports forgotten, since
        # they were last taken.
        self._changed: set[ImportKey] = set()
        self._touched: OrderedDict[ImportKey, float] = OrderedDict()
        """Imports whose only news is a newer poll time, with when they first
        had it since they were last written."""
        self._touched_taken: dict[ImportKey, float] = {}
        """The last take's imports whose only news was a newer poll time,
        with their times: given back (a failed write), they wait as such."""
        self._forgotten: set[ImportKey] = set()
        self._unrendered: dict[ImportKey, bool] = {}
        """Imports whose exported lines may differ from the last render, for
        :mod:`exporter.exposition`, in the order they were first marked since
        (for most, the order their polls answered in: an import polled twice
        keeps the place of its first poll): True where they
        changed (or were added, or are gone), False where they were only
        polled again, their news in their poll lines alone (last attempt,
        last success, failures in a row): most polls. Rendering just those
        lines again is a few times cheaper than the whole import."""
        self._waiting: set[ImportKey] = set()
        """Tracked imports neither polled by this process nor finished and no
        longer polled: :meth:`ready` is O(1) (probes come every few seconds).
        Their records have ``polled_this_run`` False: only such a poll looks here."""
        self._retention_at = 0
        """Where the next slice of the retention scan starts (see :meth:`expired`)."""
        self._observations: dict[Observation, Observation] = {}
        """Answers without counts or times, one object each (see record_observation)."""
        self.last_reload_successful = True
        self.last_reload_success_at: float | None = None

    def record_reload(self, *, success: bool) -> None:
        self.last_reload_successful = success
        if success:
            self.last_reload_success_at = self.clock()

    # --- registration -------------------------------------------------------

    def add_source(
        self, name: str, system: str, interval: float, *, fetches_tokens: bool = False
    ) -> SourceRecord:
        record = self.sources.get(name)
        if record is None or record.system != system:
            record = SourceRecord(name=name, system=system, interval=interval)
            self.sources[name] = record
        record.interval = interval
        if fetches_tokens and record.token_requests is None:
            record.token_requests = Counter()
        elif not fetches_tokens:
            record.token_requests = None
        return record

    def remove_source(self, name: str) -> None:
        self.sources.pop(name, None)
        for key in [key for key in self.imports if key[0] == name]:
            self.untrack(*key)

    def track(
        self,
        source: str,
        import_id: str,
        *,
        name: str | None = None,
        origin: Origin = Origin.CONFIG,
    ) -> ImportRecord:
        """Start (or keep) tracking an import; returns its record."""
        key = (source, import_id)
        record = self.imports.get(key)
        if record is None:
            record = ImportRecord(
                source=source,
                import_id=import_id,
                system=self.sources[source].system,
                name=name,
                origin=origin,
            )
            key = record.key
            self.imports[key] = record
            self._changed.add(key)
            self._unrendered[key] = True
            self._waiting.add(key)
        else:
            key = record.key
            if name is not None and name != record.name:
                record.name = name
                self._changed.add(key)
                self._unrendered[key] = True
            if origin is Origin.CONFIG and record.origin is not Origin.CONFIG:
                # Listed in the config now: the file owns it from here on.
                record.origin = Origin.CONFIG
                self._changed.add(key)
                self._unrendered[key] = True
        return record

    def untrack(self, source: str, import_id: str) -> None:
        key = (source, import_id)
        source_record = self.sources.get(source)
        if source_record is not None:
            source_record.answering.discard(import_id)
        if self.imports.pop(key, None) is not None:
            self._waiting.discard(key)
            self._changed.discard(key)
            self._touched.pop(key, None)
            self._forgotten.add(key)
            self._unrendered[key] = True

    def restore(self, records: list[ImportRecord]) -> None:
        """Put back what a previous run knew (before its sources are applied)."""
        for record in records:
            key = record.key
            (self.imports if record.parked_at is None else self.parked)[key] = record
            self._unrendered[key] = True
            if record.parked_at is None and not (record.polled_this_run or record.confirmed_final):
                self._waiting.add(key)
            # A row of schema 1 has no count of failures in a row; an error
            # newer than the last answer still means the import could not be read.
            error_at = record.last_error_at
            if error_at is not None and (
                record.last_success is None or error_at > record.last_success
            ):
                record.consecutive_failures = max(record.consecutive_failures, 1)

    def take_changes(
        self, *, with_poll_times: bool = False
    ) -> tuple[list[ImportRecord], list[ImportKey]]:
        """Imports changed and keys forgotten since they were last taken; with
        ``with_poll_times`` also the imports whose only news is a newer poll."""
        keys, forgotten = self.take_change_keys(poll_times=1.0 if with_poll_times else 0.0)
        imports, parked = self.imports, self.parked
        changed = [record for key in keys if (record := imports.get(key) or parked.get(key))]
        return changed, forgotten

    def take_change_keys(
        self, *, poll_times: float = 0.0, due: float | None = None
    ) -> tuple[Iterator[ImportKey], list[ImportKey]]:
        """:meth:`take_changes` as keys, to be read a chunk at a time, in key
        order: the store's rows are kept in that order, and a write that walks
        them in order touches each page once (a third less CPU than in hash
        order). Cheap here: a few keys are sorted; many are picked out of
        the sorted index lazily (the sets are handed over, not merged), so
        taking 100,000 newer poll times costs the event loop no sort. A key
        may name an import forgotten since (then it is in neither index).

        ``poll_times``: the share (0 to 1, rounded up to a whole import) of
        the imports whose only news is a newer poll time to take as well,
        those waiting longest first, and at least each that has waited
        since ``due`` (a time of :attr:`clock`) or before. A changed import
        is written with its poll time, so it no longer waits for that."""
        changed = self._changed
        self._changed = set()
        waiting = self._touched
        for key in changed:
            waiting.pop(key, None)
        touched: dict[ImportKey, float] = {}
        if poll_times >= 1.0:
            touched, self._touched = waiting, OrderedDict()
        elif poll_times > 0.0 and waiting:
            oldest = waiting.popitem
            touched = dict(oldest(last=False) for _ in range(math.ceil(len(waiting) * poll_times)))
            while due is not None and waiting:
                key, since = oldest(last=False)
                if since > due:
                    waiting[key] = since
                    waiting.move_to_end(key, last=False)
                    break
                touched[key] = since
        self._touched_taken = touched
        forgotten = list(self._forgotten)
        self._forgotten = set()
        if (len(changed) + len(touched)) * SORT_CHANGES_BELOW < len(self.imports):
            return iter(sorted(changed.union(touched))), forgotten
        # The indexes as they are now: they may change while the keys are read.
        imports = self.imports
        tracked = [*imports.ordered, *(key for key in self.parked.ordered if key not in imports)]
        if not touched:
            return (key for key in tracked if key in changed), forgotten
        return (key for key in tracked if key in changed or key in touched), forgotten

    def requeue_keys(self, keys: Iterable[ImportKey], forgotten: list[ImportKey]) -> None:
        """Give back keys taken by :meth:`take_change_keys` that could not be
        written: an import whose only news was a newer poll time waits as
        such again, before those that had it later (unless it has changed
        since); the others are changes."""
        imports, parked, taken = self.imports, self.parked, self._touched_taken
        waiting, changed = self._touched, self._changed
        poll_times = []
        for key in keys:
            if key not in imports and key not in parked:
                continue
            since = taken.get(key)
            if since is None:
                changed.add(key)
            elif key not in changed:
                poll_times.append((since, key))
        for since, key in sorted(poll_times, reverse=True):
            waiting[key] = min(since, waiting.get(key, since))
            waiting.move_to_end(key, last=False)
        self._forgotten.update(key for key in forgotten if key not in imports and key not in parked)

    def requeue(self, changed: list[ImportRecord], forgotten: list[ImportKey]) -> None:
        """Give back changes that could not be written, to be taken again."""
        for record in changed:
            key = record.key
            if key in self.imports or key in self.parked:
                self._changed.add(key)
        self._forgotten.update(
            key for key in forgotten if key not in self.imports and key not in self.parked
        )

    def expired(self, retention: float, *, at_most: int | None = None) -> list[ImportRecord]:
        """Registered imports that ended (or were not found) over ``retention`` ago.

        Imports listed in the config file stay while they are listed: the file
        says to watch them. ``at_most``: look at that many imports only, the
        next ones in key order after those the previous call looked at (from
        the first again after the last), so a periodic scan of 100,000
        imports costs the event loop a slice at a time."""
        cutoff = self.clock() - retention
        out = []
        records: Iterable[ImportRecord] = self.imports.values()
        if at_most is not None:
            ordered, imports = self.imports.ordered, self.imports
            start = self._retention_at if self._retention_at < len(ordered) else 0
            keys = ordered[start : start + at_most]
            self._retention_at = start + len(keys)
            records = [imports[key] for key in keys]
        for record in records:
            if record.origin is Origin.CONFIG:
                continue
            ended = record.end_timestamp
            if ended is None and record.state is State.NOT_FOUND:
                ended = record.state_since
            if ended is not None and ended < cutoff:
                out.append(record)
        return out

    def imports_of(self, source: str) -> list[ImportRecord]:
        return [record for record in self.imports.values() if record.source == source]

    # --- what the poller learns ---------------------------------------------

    def record_request(self, source: str, duration: float) -> None:
        record = self.sources.get(source)
        if record is None:
            return
        record.requests_total += 1
        record.duration_sum += duration
        record.duration_bucket_counts[bisect.bisect_left(REQUEST_DURATION_BUCKETS, duration)] += 1

    def record_token_request(self, source: str, outcome: str) -> None:
        record = self.sources.get(source)
        if record is not None and record.token_requests is not None:
            record.token_requests[outcome] += 1

    def record_observation(self, source: str, import_id: str, obs: Observation) -> ImportRecord:
        now = self.clock()
        record = self.imports.get((source, import_id))
        if record is None:
            # Untracked while the poll was in flight: the answer is dropped.
            return ImportRecord(source=source, import_id=import_id, system="", observation=obs)
        key = record.key
        previous = record.observation
        same = obs is previous
        if (
            same
            and record.polled_this_run
            and not record.consecutive_failures
            and not record.confirmed_final
            and obs.state not in TERMINAL_STATES
            and (record.seen_running_at is not None or obs.state is not State.RUNNING)
            and record.seen_finished_at is None
        ):
            # The same answer as this process's last poll had, still under
            # way: only its poll time is new (most polls in production).
            return self._polled_again(record, source, import_id, now)
        if not same:  # not the same shared answer again
            # A record's first poll in this process takes the shared answer,
            # not the equal one the store gave back: its next polls then go
            # the short way above. An equal answer is no change all the same.
            if record.polled_this_run:
                obs = self._shared_observation(obs, previous)
                same = obs is previous  # an equal answer is the kept one by now
            else:
                obs = self._shared_observation(obs, None)
                same = obs == previous
        was_final = record.confirmed_final
        seen = (record.seen_running_at, record.seen_finished_at)
        if record.first_seen is None:
            record.first_seen = now
        _note_times(record, previous, obs, now)
        record.observation = obs
        record.last_success = now
        record.last_attempt = now
        if record.consecutive_failures:
            record.consecutive_failures = 0
            self._changed.add(key)
        if not record.polled_this_run:  # else not waiting: a probe fewer a poll
            record.polled_this_run = True
            self._waiting.discard(key)
        source_record = self.sources.get(source)
        if source_record is not None:
            source_record.up = True
            source_record.last_success = now
            if record.confirmed_final:
                source_record.answering.discard(import_id)  # no longer polled
            else:
                source_record.answering.add(import_id)
        if not same or record.confirmed_final != was_final:
            self._changed.add(key)
        else:
            self._touched.setdefault(key, now)
        if same and seen == (record.seen_running_at, record.seen_finished_at):
            self._unrendered.setdefault(key, False)
        else:
            self._unrendered[key] = True
        return record

    def _polled_again(
        self, record: ImportRecord, source: str, import_id: str, now: float
    ) -> ImportRecord:
        """:meth:`record_observation` of the answer the import's last poll in
        this process had (not final): nothing but the poll's time changes
        (:func:`_note_times` would change nothing)."""
        record.last_success = now
        record.last_attempt = now
        source_record = self.sources.get(source)
        if source_record is not None:
            source_record.up = True
            source_record.last_success = now
            source_record.answering.add(import_id)
        key = record.key
        self._touched.setdefault(key, now)
        self._unrendered.setdefault(key, False)
        return record

    def _shared_observation(self, obs: Observation, previous: Observation | None) -> Observation:
        """The same answer again keeps the object kept so far; an answer
        without counts or times (all of Elevate's) is one shared object per
        distinct value. An observation holds an enum member, so the cyclic GC
        tracks it: 100,000 fresh ones kept would make every full collection
        walk them all (those kept since start-up are frozen, see app.py)."""
        if previous is not None and previous == obs:
            return previous
        if (
            obs.items_completed is None
            and obs.items_expected is None
            and obs.items_failed is None
            and obs.started_at is None
            and obs.ended_at is None
        ):
            shared = self._observations.get(obs)
            if shared is not None:
                return shared
            if len(self._observations) < SHARED_OBSERVATIONS:
                self._observations[obs] = obs
        return obs

    def record_error(self, source: str, import_id: str, error: SourceError) -> None:
        """A poll of one import failed."""
        now = self.clock()
        message = redact(error.message)
        source_record = self.sources.get(source)
        if source_record is not None:
            source_record.answering.discard(import_id)
            source_record.up = bool(source_record.answering)
            self._count_error(source_record, error, message, now)
        self._import_failed((source, import_id), error, message, now)

    def record_source_error(
        self, source: str, error: SourceError, import_ids: Iterable[str]
    ) -> None:
        """A failure about the whole source (refused credentials, a wrong URL):
        counted once, the source down, shown on every import in ``import_ids``."""
        now = self.clock()
        message = redact(error.message)
        source_record = self.sources.get(source)
        if source_record is not None:
            source_record.answering.clear()
            source_record.up = False
            self._count_error(source_record, error, message, now)
        for import_id in import_ids:
            self._import_failed((source, import_id), error, message, now)

    def record_discovery_error(self, source: str, error: SourceError) -> None:
        """A discovery that failed: counted and shown as the source's last
        error, but no import's and not the source's state (polls say that)."""
        source_record = self.sources.get(source)
        if source_record is not None:
            message = f"discovery: {redact(error.message)}"
            self._count_error(source_record, error, message, self.clock())

    @staticmethod
    def _count_error(record: SourceRecord, error: SourceError, message: str, now: float) -> None:
        record.errors_total[error.reason] += 1
        record.last_error = f"{error.reason.value}: {message}"
        record.last_error_at = now
        record.error_times.append(now)

    def _import_failed(self, key: ImportKey, error: SourceError, message: str, now: float) -> None:
        record = self.imports.get(key)
        if record is None:
            return
        key = record.key
        if not record.polled_this_run:
            record.polled_this_run = True
            self._waiting.discard(key)
        news = (
            record.last_error != message
            or record.last_error_reason != error.reason
            or not record.consecutive_failures
        )
        record.consecutive_failures += 1
        record.last_error = message
        record.last_error_reason = error.reason
        record.last_error_at = now
        record.last_attempt = now
        if news:
            self._changed.add(key)
        else:
            self._touched.setdefault(key, now)
        self._unrendered.setdefault(key, False)  # an error is not in an import's lines

    # --- readers' helpers ---------------------------------------------------

    def take_unrendered(self) -> dict[ImportKey, bool]:
        """Since the last call, in the order they were first marked (for
        most, the order their polls answered in): each import added, changed
        or gone (True), or only polled again (False), its news in its poll
        lines alone. O(changed): the dict is handed over, not copied. Call
        it on the event loop, where the records change, so no change falls
        between two takes."""
        unrendered, self._unrendered = self._unrendered, {}
        return unrendered

    def put_back_unrendered(self, unrendered: dict[ImportKey, bool]) -> None:
        """Imports taken by :meth:`take_unrendered` but not rendered (a
        refresh interrupted): the next take has them again, first (the dict
        given is kept, the marks made since merged into it)."""
        if not unrendered:
            return
        newer, self._unrendered = self._unrendered, unrendered
        for key, changed in newer.items():
            if changed:
                unrendered[key] = True
            else:
                unrendered.setdefault(key, False)

    def changed_since_taken(self, key: ImportKey) -> bool:
        """Whether the import was marked changed since the last
        :meth:`take_unrendered` (a refresh that took it as only polled again,
        and reads its record now, must render it whole: its lines would
        otherwise mix two answers until the next)."""
        return self._unrendered.get(key, False)

    def unrendered_all(self) -> None:
        """Every tracked import to render again, as changed (a new renderer
        that has nothing yet), in the order of the index, after those
        marked already."""
        unrendered = self._unrendered
        for key in self.imports:
            unrendered[key] = True

    def ready(self) -> bool:
        """Every tracked import has been polled by this process (or is finished
        and no longer polled): what was restored from the store is not news."""
        return not self._waiting

    # --- parking: registered imports of sources no longer configured ---------

    def park(
        self, source: str, *, keep: Callable[[ImportRecord], bool] | None = None
    ) -> tuple[list[ImportRecord], list[ImportRecord]]:
        """Set aside the imports of a source that left the config (or, with
        ``keep``, those of it that ``keep`` does not accept: another system
        than the source's now, or owned by another shard).

        Registered ones are parked: kept and stored, but neither polled nor
        exported; ones the config listed are forgotten (the file owned them).
        Returns (parked, forgotten)."""
        now = self.clock()
        parked, forgotten = [], []
        for key, record in list(self.imports.items()):
            if key[0] != source or (keep is not None and keep(record)):
                continue
            if record.origin is Origin.CONFIG:
                self.untrack(*key)
                forgotten.append(record)
                continue
            self.untrack(*key)
            self._forgotten.discard(key)
            record.parked_at = now
            record.polled_this_run = False
            self.parked[key] = record
            self._changed.add(key)
            parked.append(record)
        return parked, forgotten

    def unpark(self, source: str, accept: Callable[[ImportRecord], bool]) -> list[ImportRecord]:
        """Bring back the parked imports of a returning source that ``accept``
        takes (of the source's system, owned by this shard)."""
        back = [r for k, r in self.parked.items() if k[0] == source and accept(r)]
        for record in back:
            key = record.key
            del self.parked[key]
            record.parked_at = None
            self.imports[key] = record
            self._changed.add(key)
            self._unrendered[key] = True
            if not record.confirmed_final:  # parking took its poll of this run
                self._waiting.add(key)
        return back

    def expired_parked(self, retention: float) -> list[ImportRecord]:
        """Parked imports parked (or ended) over ``retention`` ago."""
        cutoff = self.clock() - retention
        return [
            record
            for record in self.parked.values()
            if (record.parked_at is not None and record.parked_at < cutoff)
            or ((ended := record.end_timestamp) is not None and ended < cutoff)
        ]

    def forget_parked(self, source: str, import_id: str) -> None:
        if self.parked.pop((source, import_id), None) is not None:
            self._changed.discard((source, import_id))
            self._forgotten.add((source, import_id))


def _note_times(
    record: ImportRecord, previous: Observation | None, obs: Observation, now: float
) -> None:
    """What an answer changes of an import's times (state change, progress,
    seen running or finished) and whether its final state is confirmed."""
    changed_state = previous is None or previous.state != obs.state
    ended_before = previous is not None and previous.state in TERMINAL_STATES
    if ended_before and obs.state not in TERMINAL_STATES:
        # A server's next import (Rocket.Chat): its own start time.
        record.seen_running_at = None
    if changed_state:
        record.state_since = now
        record.confirmed_final = False
    elif obs.state in TERMINAL_STATES:
        record.confirmed_final = True
    if (
        changed_state
        or previous is None
        or previous.step != obs.step
        or previous.items_completed != obs.items_completed
    ):
        record.last_progress = now
    if obs.state is State.RUNNING and record.seen_running_at is None:
        record.seen_running_at = now
    if obs.state not in TERMINAL_STATES:
        record.seen_finished_at = None
    elif record.seen_finished_at is None or changed_state:
        record.seen_finished_at = now
