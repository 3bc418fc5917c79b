"""What a scrape shows for a given state: names, labels, fallbacks, lint."""

from __future__ import annotations

import subprocess
import weakref
from pathlib import Path

import pytest
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

from exporter.exposition import ImportLines, render_metrics
from exporter.metrics import build_registry
from exporter.model import ErrorReason, Observation, Origin, SourceError, State
from exporter.state import StateStore
from exporter.storage import to_row
from exporter.storage.sqlite import SQLiteStorage as Store
from tests.conftest import Clock, tool

_lines: weakref.WeakKeyDictionary[StateStore, ImportLines] = weakref.WeakKeyDictionary()


def scrape(state: StateStore, names: tuple[str, ...] = ()) -> bytes:
    """``/metrics`` as the exporter renders it (text format), from one
    long-lived cache per state as in the exporter."""
    lines = _lines.setdefault(state, ImportLines(state))
    lines.take_changes()
    encoder, content_type = choose_encoder("")
    return render_metrics(build_registry(state, imports=False), encoder, content_type, lines, names)


def samples(state: StateStore) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = scrape(state).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def key(metric: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (metric, frozenset(labels.items()))


@pytest.fixture
def world() -> tuple[StateStore, Clock]:
    clock = Clock()
    state = StateStore(clock=clock)
    state.add_source("elevate-prod", "elevate", 30.0)
    state.add_source("chat", "rocketchat", 60.0)
    state.track("elevate-prod", "1001", name="nightly catalogue")
    state.track("chat", "chat.example.com")
    return state, clock


def test_state_set_is_emitted_whole(world: tuple[StateStore, Clock]) -> None:
    state, _ = world
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    values = samples(state)
    ids = {"source": "elevate-prod", "import": "1001"}
    assert values[key("import_state", **ids, state="running")] == 1
    for other in ("waiting", "blocked", "succeeded", "failed", "aborted", "not_found", "unknown"):
        assert values[key("import_state", **ids, state=other)] == 0
    info = key(
        "import_info",
        **ids,
        system="elevate",
        upstream_state="IN_PROGRESS",
        name="nightly catalogue",
        origin="config",
    )
    assert values[info] == 1
    assert values[key("import_state", **ids, state="pending")] == 0
    assert values[key("import_consecutive_poll_failures", **ids)] == 0


def test_a_tracked_import_has_series_before_any_answer(
    world: tuple[StateStore, Clock],
) -> None:
    """Never read is a state of its own: pending, with its failures counted."""
    state, clock = world
    ids = {"source": "elevate-prod", "import": "1001"}
    values = samples(state)
    assert values[key("import_state", **ids, state="pending")] == 1
    assert values[key("import_state", **ids, state="running")] == 0
    info = key(
        "import_info", **ids, system="elevate", upstream_state="", name="nightly catalogue",
        origin="config",
    )  # fmt: skip
    assert values[info] == 1
    assert values[key("import_consecutive_poll_failures", **ids)] == 0
    assert key("import_last_poll_attempt_timestamp_seconds", **ids) not in values
    assert (
        values[key("import_source_tracked_imports", source="elevate-prod", system="elevate")] == 1
    )
    for _ in range(3):
        clock.now += 30
        state.record_error("elevate-prod", "1001", SourceError(ErrorReason.INVALID_RESPONSE, "x"))
    values = samples(state)
    assert values[key("import_consecutive_poll_failures", **ids)] == 3
    assert values[key("import_last_poll_attempt_timestamp_seconds", **ids)] == clock.now
    assert values[key("import_state", **ids, state="pending")] == 1
    clock.now += 30
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    values = samples(state)
    assert values[key("import_consecutive_poll_failures", **ids)] == 0
    assert values[key("import_state", **ids, state="pending")] == 0
    assert values[key("import_last_poll_attempt_timestamp_seconds", **ids)] == clock.now


def test_registered_imports_say_so_in_import_info(world: tuple[StateStore, Clock]) -> None:
    state, _ = world
    state.track("elevate-prod", "1009", origin=Origin.API)
    values = samples(state)
    ids = {"source": "elevate-prod", "import": "1009"}
    info = key(
        "import_info", **ids, system="elevate", upstream_state="", name="", origin=Origin.API
    )
    assert values[info] == 1


def test_name_filter_finds_a_metric_of_each_collector(world: tuple[StateStore, Clock]) -> None:
    """``/metrics?name[]=...`` as the README documents it, for every collector."""
    state, _ = world
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    for name, family in (
        ("import_source_up", "import_source_up"),
        ("import_state", "import_state"),
        ("import_source_errors_total", "import_source_errors"),
        ("import_exporter_build_info", "import_exporter_build_info"),
        ("process_cpu_seconds_total", "process_cpu_seconds"),
        ("python_info", "python_info"),
    ):
        text = scrape(state, (name,)).decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert names == {family}, (name, names)


def test_token_requests_are_counted_by_outcome(world: tuple[StateStore, Clock]) -> None:
    state, _ = world
    state.add_source("zilliant-prod", "zilliant", 30.0, fetches_tokens=True)
    state.record_token_request("zilliant-prod", "unauthorized")
    state.record_token_request("zilliant-prod", "unauthorized")
    state.record_token_request("zilliant-prod", "success")
    values = samples(state)
    src = {"source": "zilliant-prod", "system": "zilliant"}
    name = "import_source_token_requests_total"
    assert values[key(name, **src, outcome="unauthorized")] == 2
    assert values[key(name, **src, outcome="success")] == 1
    assert values[key(name, **src, outcome="timeout")] == 0
    # Sources without a token endpoint have no such series.
    assert not [k for k in values if k[0] == name and ("source", "elevate-prod") in k[1]]


def test_timestamps_fall_back_to_what_the_exporter_saw(world: tuple[StateStore, Clock]) -> None:
    state, clock = world
    ids = {"source": "elevate-prod", "import": "1001"}
    state.record_observation("elevate-prod", "1001", Observation(State.WAITING, "WAITING"))
    clock.now += 10
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    started = clock.now
    clock.now += 50
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    values = samples(state)
    assert values[key("import_start_timestamp_seconds", **ids)] == started
    assert values[key("import_duration_seconds", **ids)] == 50
    assert values[key("import_state_change_timestamp_seconds", **ids)] == started
    assert values[key("import_last_progress_timestamp_seconds", **ids)] == started
    assert values[key("import_last_poll_success_timestamp_seconds", **ids)] == clock.now
    assert key("import_end_timestamp_seconds", **ids) not in values
    clock.now += 40
    state.record_observation("elevate-prod", "1001", Observation(State.SUCCEEDED, "SUCCESS"))
    values = samples(state)
    assert values[key("import_end_timestamp_seconds", **ids)] == clock.now
    assert values[key("import_duration_seconds", **ids)] == 90


def test_upstream_times_win_and_counts_appear_only_where_reported(
    world: tuple[StateStore, Clock],
) -> None:
    state, _ = world
    obs = Observation(
        State.RUNNING,
        "importer_importing_messages",
        step="importer_importing_messages",
        items_completed=10,
        items_expected=100,
        items_failed=1,
        started_at=1_699_999_000.0,
    )
    state.record_observation("chat", "chat.example.com", obs)
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    values = samples(state)
    chat = {"source": "chat", "import": "chat.example.com"}
    assert values[key("import_items_completed", **chat)] == 10
    assert values[key("import_items_expected", **chat)] == 100
    assert values[key("import_items_failed", **chat)] == 1
    assert values[key("import_start_timestamp_seconds", **chat)] == 1_699_999_000.0
    assert key("import_items_completed", source="elevate-prod", import_="1001") not in values
    assert not any(
        name == "import_items_completed" and ("source", "elevate-prod") in labels
        for name, labels in values
    )


def test_progress_timestamp_moves_only_when_something_changes(
    world: tuple[StateStore, Clock],
) -> None:
    state, clock = world
    ids = {"source": "chat", "import": "chat.example.com"}

    def obs(completed: int) -> Observation:
        return Observation(State.RUNNING, "s", step="s", items_completed=completed)

    state.record_observation("chat", "chat.example.com", obs(1))
    first = clock.now
    clock.now += 30
    state.record_observation("chat", "chat.example.com", obs(1))
    assert samples(state)[key("import_last_progress_timestamp_seconds", **ids)] == first
    clock.now += 30
    state.record_observation("chat", "chat.example.com", obs(2))
    assert samples(state)[key("import_last_progress_timestamp_seconds", **ids)] == clock.now


def test_source_health_counters(world: tuple[StateStore, Clock]) -> None:
    state, _ = world
    state.record_request("elevate-prod", 0.2)
    state.record_request("elevate-prod", 3.0)
    state.record_error("elevate-prod", "1001", SourceError(ErrorReason.TIMEOUT, "slow"))
    values = samples(state)
    src = {"source": "elevate-prod", "system": "elevate"}
    assert values[key("import_source_up", **src)] == 0
    assert values[key("import_source_requests_total", **src)] == 2
    assert values[key("import_source_errors_total", **src, reason="timeout")] == 1
    assert values[key("import_source_errors_total", **src, reason="too_large")] == 0
    assert values[key("import_source_request_duration_seconds_count", **src)] == 2
    assert values[key("import_source_request_duration_seconds_bucket", **src, le="0.25")] == 1
    assert values[key("import_source_request_duration_seconds_bucket", **src, le="+Inf")] == 2
    assert values[key("import_source_poll_interval_seconds", **src)] == 30
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    assert samples(state)[key("import_source_up", **src)] == 1


def test_exposition_passes_promtool_check_metrics(world: tuple[StateStore, Clock]) -> None:
    promtool = tool("promtool")
    state, _ = world
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    text = scrape(state)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_a_servers_next_import_gets_its_own_start_time(world: tuple[StateStore, Clock]) -> None:
    state, clock = world
    chat = {"source": "chat", "import": "chat.example.com"}
    state.record_observation(
        "chat", "chat.example.com", Observation(State.RUNNING, "importer_importing_users")
    )
    first_start = clock.now
    clock.now += 60
    state.record_observation(
        "chat", "chat.example.com", Observation(State.SUCCEEDED, "importer_done")
    )
    clock.now += 5000  # the server's next import starts much later
    state.record_observation("chat", "chat.example.com", Observation(State.WAITING, "importer_new"))
    clock.now += 10
    state.record_observation(
        "chat", "chat.example.com", Observation(State.RUNNING, "importer_importing_users")
    )
    next_start = clock.now
    clock.now += 30
    values = samples(state)
    assert next_start > first_start
    assert values[key("import_start_timestamp_seconds", **chat)] == next_start
    assert values[key("import_duration_seconds", **chat)] == 30


def test_one_broken_import_does_not_make_its_source_flap(world: tuple[StateStore, Clock]) -> None:
    state, _ = world
    state.track("elevate-prod", "1002")
    up = key("import_source_up", source="elevate-prod", system="elevate")
    broken = SourceError(ErrorReason.CLIENT_ERROR, "HTTP 400")
    for _ in range(3):
        state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
        state.record_error("elevate-prod", "1002", broken)
        assert samples(state)[up] == 1
    # Every watched import failing is the API being down.
    state.record_error("elevate-prod", "1001", SourceError(ErrorReason.TIMEOUT, "no answer"))
    assert samples(state)[up] == 0
    state.record_observation("elevate-prod", "1002", Observation(State.RUNNING, "IN_PROGRESS"))
    assert samples(state)[up] == 1


def test_restored_imports_are_not_ready_until_polled_again(
    world: tuple[StateStore, Clock], tmp_path: Path
) -> None:
    state, _ = world
    state.record_observation("elevate-prod", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    state.record_observation("chat", "chat.example.com", Observation(State.RUNNING, "x"))
    assert state.ready()
    restarted = StateStore()
    store = Store(tmp_path / "state.db")
    store.write([to_row(record) for record in state.imports.values()])
    restarted.restore(store.load())
    assert not restarted.ready()  # last run's answers are not this run's
    restarted.add_source("elevate-prod", "elevate", 30.0)
    restarted.add_source("chat", "rocketchat", 60.0)
    restarted.record_error("elevate-prod", "1001", SourceError(ErrorReason.TIMEOUT, "no answer"))
    restarted.record_observation("chat", "chat.example.com", Observation(State.RUNNING, "x"))
    assert restarted.ready()
