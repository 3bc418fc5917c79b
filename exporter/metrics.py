"""The exporter's metric families as ``prometheus_client`` collectors.

``/metrics`` serves the per-import families from :mod:`exporter.exposition`,
which keeps each import's lines rendered; the few per-source and per-process
families come from the collectors here (``StateCollector(state,
imports=False)``). ``StateCollector(state)`` with its import families is the
reference that exposition is tested against series by series, and the
baseline of ``bench/scrape.py``: it builds every family from the state on
each call, so it cannot leak series of imports that are gone.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from exporter import __version__
from exporter.model import PENDING, ErrorReason, State
from exporter.state import REQUEST_DURATION_BUCKETS, StateStore
from exporter.storage import WRITE_ERROR_REASONS, StoreHealth

POLLED = " Values come from background polls of the upstream API, not from scrape-time calls."
STATES = (*(state.value for state in State), PENDING)
"""The exported state set: the normalized states, and "pending" for an import
no poll has answered yet (so a tracked import always has series)."""
REASONS = tuple(ErrorReason)
TOKEN_OUTCOMES = ("success", *(reason.value for reason in ErrorReason))
_BUCKET_BOUNDS = [*(f"{b:g}" for b in REQUEST_DURATION_BUCKETS), "+Inf"]


class StateCollector(Collector):
    """Exposes every source and import in the :class:`StateStore`; with
    ``imports=False`` everything but the per-import families (which
    :class:`exporter.exposition.ImportLines` renders)."""

    def __init__(self, state: StateStore, *, imports: bool = True) -> None:
        self.state = state
        self.imports = imports

    def describe(self) -> Iterator[Metric]:
        """The families :meth:`collect` yields, without samples: what lets a
        ``name[]`` filter find this collector (and no render at registration)."""
        if self.imports:
            yield from import_families()
        yield from self._source_metrics(empty=True)
        yield GaugeMetricFamily("import_exporter_build_info", "")
        yield GaugeMetricFamily("import_exporter_config_last_reload_successful", "")
        yield GaugeMetricFamily("import_exporter_config_last_reload_success_timestamp_seconds", "")

    def collect(self) -> Iterator[Metric]:
        if self.imports:
            yield from self._import_metrics()
        yield from self._source_metrics()
        build = GaugeMetricFamily(
            "import_exporter_build_info",
            "Always 1; the version of the import status exporter.",
            labels=["version"],
        )
        build.add_metric([__version__], 1)
        yield build
        reload_ok = GaugeMetricFamily(
            "import_exporter_config_last_reload_successful",
            "1 if the last configuration load or reload succeeded, else 0.",
        )
        reload_ok.add_metric([], 1.0 if self.state.last_reload_successful else 0.0)
        yield reload_ok
        if self.state.last_reload_success_at is not None:
            yield GaugeMetricFamily(
                "import_exporter_config_last_reload_success_timestamp_seconds",
                "When the configuration was last loaded successfully.",
                value=self.state.last_reload_success_at,
            )

    def _import_metrics(self) -> Iterator[Metric]:
        now = self.state.clock()
        families = import_families()
        state, info, completed, expected, failed, start, end = families[:7]
        duration, changed, progress, success, attempt, failures = families[7:]
        for record in list(self.state.imports.values()):
            labels = [record.source, record.import_id]
            failures.add_metric(labels, record.consecutive_failures)
            if record.last_attempt is not None:
                attempt.add_metric(labels, record.last_attempt)
            obs = record.observation
            current = obs.state.value if obs is not None else PENDING
            for value in STATES:
                state.add_metric([*labels, value], 1.0 if value == current else 0.0)
            info.add_metric(
                [
                    *labels,
                    record.system,
                    obs.upstream_state if obs is not None else "",
                    record.name or "",
                    record.origin.value,
                ],
                1.0,
            )
            if obs is None:
                continue
            for family, number in (
                (completed, obs.items_completed),
                (expected, obs.items_expected),
                (failed, obs.items_failed),
                (start, record.start_timestamp),
                (end, record.end_timestamp),
                (duration, record.duration(now)),
                (changed, record.state_since),
                (progress, record.last_progress),
                (success, record.last_success),
            ):
                if number is not None:
                    family.add_metric(labels, number)
        yield from families

    def _source_metrics(self, *, empty: bool = False) -> Iterator[Metric]:
        keys = ["source", "system"]
        up = GaugeMetricFamily(
            "import_source_up",
            "1 while the latest background poll of at least one watched import reached "
            "the source's API and understood the answer; 0 when every one failed. Absent "
            "while the source watches no import in this process and never polled.",
            labels=keys,
        )
        requests = CounterMetricFamily(
            "import_source_requests",
            "HTTP requests made to the source's API by background polls.",
            labels=keys,
        )
        errors = CounterMetricFamily(
            "import_source_errors",
            "Background polls of the source that failed, by reason.",
            labels=[*keys, "reason"],
        )
        latency = HistogramMetricFamily(
            "import_source_request_duration_seconds",
            "Duration of HTTP requests to the source's API made by background polls.",
            labels=keys,
        )
        tracked = GaugeMetricFamily(
            "import_source_tracked_imports",
            "Imports the exporter currently watches on the source.",
            labels=keys,
        )
        interval = GaugeMetricFamily(
            "import_source_poll_interval_seconds",
            "The configured interval between background polls of each import.",
            labels=keys,
        )
        tokens = CounterMetricFamily(
            "import_source_token_requests",
            "Calls of the source's token endpoint (Salesforce for Zilliant) by outcome: "
            "success or the error reason. Only for sources that fetch tokens.",
            labels=[*keys, "outcome"],
        )
        families = (up, requests, errors, latency, tracked, interval, tokens)
        if empty:
            yield from families
            return
        counts = self.state.imports.per_source  # kept by the index: no walk of every import
        for source in list(self.state.sources.values()):
            labels = [source.name, source.system]
            if source.up is not None or counts.get(source.name):
                # Absent while the source watches nothing here and never did
                # (no import yet, or another shard owns them all): not "down".
                up.add_metric(labels, 1.0 if source.up else 0.0)
            requests.add_metric(labels, source.requests_total)
            for reason in REASONS:
                errors.add_metric([*labels, reason.value], source.errors_total.get(reason, 0))
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(_BUCKET_BOUNDS, source.duration_bucket_counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(labels, buckets, source.duration_sum)
            tracked.add_metric(labels, counts.get(source.name, 0))
            interval.add_metric(labels, source.interval)
            if source.token_requests is not None:
                for outcome in TOKEN_OUTCOMES:
                    tokens.add_metric([*labels, outcome], source.token_requests.get(outcome, 0))
        yield from families


def import_families() -> tuple[GaugeMetricFamily, ...]:
    """The per-import families, empty, in the order they are exposed."""
    keys = ["source", "import"]
    state = GaugeMetricFamily(
        "import_state",
        "1 for the import's current normalized state, 0 for the other states." + POLLED,
        labels=[*keys, "state"],
    )
    info = GaugeMetricFamily(
        "import_info",
        "Always 1; the upstream system, the raw upstream status (empty before the "
        "first answer), the import's name and its origin (config: listed in the config "
        "file, api: registered through the API)." + POLLED,
        labels=[*keys, "system", "upstream_state", "name", "origin"],
    )
    completed = GaugeMetricFamily(
        "import_items_completed",
        "Items the upstream reports as imported so far (only where it reports counts)." + POLLED,
        labels=keys,
    )
    expected = GaugeMetricFamily(
        "import_items_expected",
        "Items the upstream reports the import will process in total "
        "(only where it reports counts)." + POLLED,
        labels=keys,
    )
    failed = GaugeMetricFamily(
        "import_items_failed",
        "Items the upstream reports as failed (only where it reports counts)." + POLLED,
        labels=keys,
    )
    start = GaugeMetricFamily(
        "import_start_timestamp_seconds",
        "When the import started: the upstream's start time where it reports one "
        "(Zilliant), else when the exporter first saw it running." + POLLED,
        labels=keys,
    )
    end = GaugeMetricFamily(
        "import_end_timestamp_seconds",
        "When the import finished: the upstream's stop time where it reports one "
        "(Zilliant), else when the exporter first saw it in a final state." + POLLED,
        labels=keys,
    )
    duration = GaugeMetricFamily(
        "import_duration_seconds",
        "End minus start of a finished import, or now minus start while it runs." + POLLED,
        labels=keys,
    )
    changed = GaugeMetricFamily(
        "import_state_change_timestamp_seconds",
        "When the exporter first saw the import's current state." + POLLED,
        labels=keys,
    )
    progress = GaugeMetricFamily(
        "import_last_progress_timestamp_seconds",
        "When the exporter last saw the import's state, step or completed count change." + POLLED,
        labels=keys,
    )
    success = GaugeMetricFamily(
        "import_last_poll_success_timestamp_seconds",
        "When a background poll last got an answer about the import." + POLLED,
        labels=keys,
    )
    attempt = GaugeMetricFamily(
        "import_last_poll_attempt_timestamp_seconds",
        "When the latest background poll of the import came back, answered or failed.",
        labels=keys,
    )
    failures = GaugeMetricFamily(
        "import_consecutive_poll_failures",
        "Background polls of the import that failed in a row since the last answer "
        "about it (0 once a poll is answered). Above 0 the import's other series are "
        "out of date; never answered, its state is pending.",
        labels=keys,
    )
    return (
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


def build_registry(state: StateStore, *, imports: bool = True) -> CollectorRegistry:
    # auto_describe: the process and platform collectors have no describe();
    # without it a ``name[]`` filter finds none of their names.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StateCollector(state, imports=imports))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class StoreHealthCollector(Collector):
    """The health of the store's writes: a failing store refuses registrations
    (503) and keeps what polls learn only in memory, so it must be alertable."""

    def __init__(self, health: StoreHealth) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        health = self.health
        errors = CounterMetricFamily(
            "import_exporter_store_write_errors",
            "Writes to the exporter's database that failed, by reason.",
            labels=["reason"],
        )
        for reason in WRITE_ERROR_REASONS:  # all of them, so rate() sees the first error
            errors.add_metric([reason], health.write_errors.get(reason, 0))
        yield errors
        yield GaugeMetricFamily(
            "import_exporter_store_last_write_successful",
            "1 if the last write to the exporter's database succeeded, else 0 (registrations "
            "are refused and the exporter is not ready while writes fail).",
            value=1.0 if health.last_write_ok else 0.0,
        )
        if health.last_write_success_at is not None:
            yield GaugeMetricFamily(
                "import_exporter_store_last_write_success_timestamp_seconds",
                "When a write to the exporter's database last succeeded.",
                value=health.last_write_success_at,
            )
