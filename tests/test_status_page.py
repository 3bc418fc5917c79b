"""The status page at ``/``: what an operator sees, from the renderer on a
hand-built state (the real browser's view is in tests/integration/)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.registry import CollectorRegistry

from exporter.model import ErrorReason, Observation, SourceError, State
from exporter.pages import (
    DEFAULT_REFRESH,
    DEFAULT_SHOWN,
    parse_refresh,
    render_status_page,
)
from exporter.state import ERROR_TIMES_KEPT, StateStore
from exporter.web import create_web_app
from tests.conftest import Clock

if TYPE_CHECKING:
    pass

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0
HOSTILE_REASON = "<script>alert(1)</script>"
HOSTILE_NAME = '<img src=x onerror="alert(2)"> & "quoted"'


@dataclass
class Row:
    cells: list[str] = field(default_factory=list)
    progress: dict[str, str] | None = None

    @property
    def text(self) -> str:
        return " | ".join(self.cells)


class Page(HTMLParser):
    """The rendered page as a user sees it: rows, cells, controls, tags."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.links: list[str] = []
        self.refresh: str | None = None
        self.imports: dict[tuple[str, str], Row] = {}
        self.sources: dict[str, Row] = {}
        self.counts: dict[str, Row] = {}
        self.selected: dict[str, str] = {}
        self.hidden: dict[str, str] = {}
        self.text_parts: list[str] = []
        self._row: Row | None = None
        self._select = ""
        self._skip = False
        self.feed(markup)
        self.close()

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.text_parts).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "style":
            self._skip = True
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = a["content"]
        elif tag == "tr" and "data-counts" in a:
            self._row = self.counts[a["data-counts"]] = Row()
        elif tag == "tr" and "data-import" in a:
            self._row = self.imports[(a["data-source"], a["data-import"])] = Row()
        elif tag == "tr" and "data-source" in a:
            self._row = self.sources[a["data-source"]] = Row()
        elif tag == "td" and self._row is not None:
            self._row.cells.append("")
        elif tag == "progress" and self._row is not None:
            self._row.progress = a
        elif tag == "select":
            self._select = a["name"]
        elif tag == "option" and "selected" in a:
            self.selected[self._select] = a["value"]
        elif tag == "input" and a.get("type") == "hidden":
            self.hidden[a["name"]] = a["value"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._skip = False
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text_parts.append(data)
        if self._row is not None and self._row.cells:
            joined = f"{self._row.cells[-1]} {data}"
            self._row.cells[-1] = " ".join(joined.split())


@pytest.fixture
def state(clock: Clock) -> StateStore:
    """Two sources and five imports, one of each interesting kind."""
    store = StateStore(clock=clock)
    store.add_source("shop", "elevate", 30.0)
    store.add_source("chat", "rocketchat", 30.0)
    store.track("shop", "1001", name="nightly catalogue")
    store.track("shop", "1002", name="price feed")
    store.track("shop", "1003", name=HOSTILE_NAME)
    store.track("shop", "1004")  # never answered: pending
    store.track("chat", "chat.example.com")
    store.record_observation("shop", "1001", Observation(State.SUCCEEDED, "SUCCESS"))
    store.record_observation(
        "shop", "1002", Observation(State.FAILED, "FAILURE", reason=HOSTILE_REASON)
    )
    store.record_observation("shop", "1003", Observation(State.WAITING, "WAITING"))
    store.record_observation(
        "chat",
        "chat.example.com",
        Observation(
            State.RUNNING,
            "importer_importing_messages",
            items_completed=123,
            items_expected=456,
            items_failed=2,
        ),
    )
    return store


def render(state: StateStore, now: float, **query: Any) -> Page:
    return Page(render_status_page(state, now, **query))


# --- the renderer -------------------------------------------------------------


def test_lists_every_import_with_its_state_name_and_upstream_state(
    state: StateStore, clock: Clock
) -> None:
    clock.now = T0 + 150
    page = render(state, clock.now)
    assert set(page.imports) == {
        ("chat", "chat.example.com"),
        ("shop", "1001"),
        ("shop", "1002"),
        ("shop", "1003"),
        ("shop", "1004"),
    }
    source, name, badge, _, started, duration, since, _ = page.imports[("shop", "1001")].cells
    assert (source, name, badge) == ("shop", "nightly catalogue 1001", "succeeded SUCCESS")
    # Running: started when first seen running, 150 s ago, and counting.
    chat = page.imports[("chat", "chat.example.com")].cells
    assert chat[2] == "running importer_importing_messages"
    assert chat[4] == "2023-11-14 22:13:20"
    assert chat[5] == "2m"
    assert chat[6] == "2m ago polled 2m ago"
    assert (started, duration, since) == ("", "", "2m ago polled 2m ago")  # SUCCESS only
    assert page.imports[("shop", "1004")].cells[2] == "pending"
    assert page.imports[("shop", "1004")].cells[6] == "polled never"
    assert "5 of 5" in page.text
    # Relative, so they work under a path prefix (a reverse proxy, --web.route-prefix).
    for href in ("metrics", "-/healthy", "-/ready", "api/v1/imports"):
        assert href in page.links
    assert page.tags.count("script") == 0
    assert "link" not in page.tags


def test_upstream_and_configured_text_is_shown_as_text(state: StateStore) -> None:
    markup = render_status_page(state, T0)
    page = Page(markup)
    assert HOSTILE_REASON in page.imports[("shop", "1002")].cells[-1]
    assert HOSTILE_NAME in page.imports[("shop", "1003")].cells[1]
    assert HOSTILE_REASON not in markup
    assert "<img" not in markup
    assert "script" not in page.tags
    assert "img" not in page.tags


def test_badges_carry_a_class_per_state(state: StateStore) -> None:
    markup = render_status_page(state, T0)
    for label in ("succeeded", "failed", "waiting", "running", "pending"):
        assert f'<span class="badge s-{label}">{label}</span>' in markup
    # Every normalized state has a colour of its own (pending keeps the grey default).
    for value in State:
        if value is not State.NOT_FOUND:
            assert f".s-{value.value}" in markup


def test_progress_bar_shows_completed_of_expected(state: StateStore) -> None:
    row = render(state, T0).imports[("chat", "chat.example.com")]
    assert row.progress == {"max": "456", "value": "123"}
    assert row.cells[3] == "123 / 456 2 failed"
    # More done than expected (upstreams do that) fills the bar, the numbers stay true.
    state.record_observation(
        "chat",
        "chat.example.com",
        Observation(State.RUNNING, "importer_finishing", items_completed=500, items_expected=456),
    )
    row = render(state, T0).imports[("chat", "chat.example.com")]
    assert row.progress == {"max": "456", "value": "456"}
    assert row.cells[3] == "500 / 456"
    assert render(state, T0).imports[("shop", "1001")].progress is None  # no counts: no bar


def test_sources_show_up_down_last_success_and_errors_of_the_last_15_minutes(
    state: StateStore, clock: Clock
) -> None:
    page = render(state, T0 + 5)
    assert page.sources["shop"].cells == ["shop", "elevate", "up", "5s ago", "0", "0", ""]
    for offset in (0, 400, 800):
        clock.now = T0 + 100 + offset
        state.record_error("shop", "1001", SourceError(ErrorReason.TIMEOUT, "took > 10s"))
    # One import failing while another still answers: the source is up.
    assert render(state, clock.now).sources["shop"].cells[2] == "up"
    for import_id in ("1002", "1003"):  # now every answering import fails: down
        state.record_error("shop", import_id, SourceError(ErrorReason.TIMEOUT, "took > 10s"))
    clock.now = T0 + 100 + 15 * 60 + 1  # the first error is now 15 min and 1 s old
    assert state.sources["shop"].recent_errors(clock.now, 15 * 60) == 4
    cells = render(state, clock.now).sources["shop"].cells
    assert cells[2:6] == ["down", "16m ago", "4", "5"]
    assert cells[6] == "timeout: took > 10s 101s ago"
    # The recent-error record is bounded; a full record says "at least".
    for _ in range(ERROR_TIMES_KEPT + 10):
        state.record_error("shop", "1001", SourceError(ErrorReason.SERVER_ERROR, "503"))
    assert len(state.sources["shop"].error_times) == ERROR_TIMES_KEPT
    assert render(state, clock.now).sources["shop"].cells[4] == f"{ERROR_TIMES_KEPT}+"
    # A poll error is shown on its import too, next to the upstream's own reason.
    assert "poll error 0s ago: 503" in render(state, clock.now).imports[("shop", "1001")].text


def test_an_error_is_current_only_while_the_latest_poll_failed(clock: Clock) -> None:
    """One 500, then an answer: the 500 is history, not a current problem."""
    state = StateStore(clock=clock)
    state.add_source("shop", "elevate", 30.0)
    state.track("shop", "1001")
    state.record_observation("shop", "1001", Observation(State.RUNNING, "IN_PROGRESS"))
    clock.now = T0 + 30
    state.record_error("shop", "1001", SourceError(ErrorReason.SERVER_ERROR, "HTTP 500"))
    clock.now = T0 + 60
    state.record_error("shop", "1001", SourceError(ErrorReason.SERVER_ERROR, "HTTP 500"))
    markup = render_status_page(state, clock.now)
    row = Page(markup).imports[("shop", "1001")].text
    assert "poll error 0s ago: HTTP 500 (2 polls failed in a row)" in row
    assert 'class="error">poll error' in markup
    clock.now = T0 + 90
    state.record_observation("shop", "1001", Observation(State.SUCCEEDED, "SUCCESS"))
    markup = render_status_page(state, clock.now + 60)
    row = Page(markup).imports[("shop", "1001")].text
    assert "poll error" not in row.replace("last poll error", "")
    assert "last poll error 90s ago, since answered: HTTP 500" in row
    assert 'class="error"' not in markup


def test_a_source_never_polled_is_pending_not_down(clock: Clock) -> None:
    store = StateStore(clock=clock)
    store.add_source("new", "zilliant", 30.0)
    page = render(store, T0)
    assert page.sources["new"].cells[2:4] == ["pending", "never"]
    assert "No imports tracked yet." in page.text


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"source_filter": "chat"}, {("chat", "chat.example.com")}),
        ({"state_filter": "failed"}, {("shop", "1002")}),
        ({"state_filter": "pending"}, {("shop", "1004")}),
        ({"source_filter": "shop", "state_filter": "running"}, set()),
        ({"source_filter": "shop", "state_filter": "succeeded"}, {("shop", "1001")}),
    ],
)
def test_filters_by_source_and_by_state(
    state: StateStore, query: dict[str, str], expected: set[tuple[str, str]]
) -> None:
    page = render(state, T0, **query)
    assert set(page.imports) == expected
    assert f"{len(expected)} of 5" in page.text
    # The form shows the filter in force.
    assert page.selected.get("source", "") == query.get("source_filter", "")
    assert page.selected.get("state", "") == query.get("state_filter", "")
    if "source_filter" in query:
        assert set(page.sources) == {query["source_filter"]}


def test_unknown_and_hostile_filter_values_match_nothing_and_are_escaped(
    state: StateStore,
) -> None:
    hostile = '"><script>alert(3)</script>'
    markup = render_status_page(state, T0, source_filter=hostile, state_filter="sleeping")
    page = Page(markup)
    assert page.imports == {}
    assert page.sources == {}
    assert f"No source named “{hostile}”." in page.text
    assert f"No imports match source “{hostile}” and state “sleeping”." in page.text
    assert "script" not in page.tags
    assert "<script>alert(3)" not in markup
    assert page.selected == {}  # neither value is offered as an option
    # The refresh keeps the filter, URL-encoded.
    assert page.refresh is not None
    assert "alert" in page.refresh
    assert "<" not in page.refresh


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (None, DEFAULT_REFRESH),
        ("", DEFAULT_REFRESH),
        ("abc", DEFAULT_REFRESH),
        ("2.5", DEFAULT_REFRESH),
        ("-5", DEFAULT_REFRESH),
        ("9" * 5000, DEFAULT_REFRESH),
        ("0", 0),
        ("1", 1),
        ("30", 30),
        ("3600", 3600),
        ("3601", 3600),
        ("99999999", 3600),
    ],
)
def test_refresh_parameter_is_bounded(raw: str | None, seconds: int) -> None:
    assert parse_refresh(raw) == seconds


def test_page_refreshes_itself_keeping_the_filter(state: StateStore) -> None:
    assert render(state, T0).refresh == "10; url=./"
    page = render(state, T0, source_filter="chat", state_filter="running")
    assert page.refresh == "10; url=?source=chat&state=running"
    assert page.hidden == {}
    page = render(state, T0, source_filter="chat", refresh=5)
    assert page.refresh == "5; url=?source=chat&refresh=5"
    assert page.hidden == {"refresh": "5"}  # filtering keeps the chosen rate
    assert "refreshes every 5 s" in page.text
    assert render(state, T0, refresh=10**6).refresh == "3600; url=?refresh=3600"
    off = render(state, T0, refresh=0)
    assert off.refresh is None
    assert "auto-refresh off" in off.text
    assert off.hidden == {"refresh": "0"}


async def test_the_route_reads_filter_and_refresh_from_the_query(
    state: StateStore,
    clock: Clock,
    aiohttp_client: Callable[[Any], Awaitable[TestClient[Any, Any]]],
) -> None:
    client = await aiohttp_client(create_web_app(state, CollectorRegistry(), clock))
    response = await client.get("/", params={"source": "chat", "refresh": "99999"})
    assert response.status == 200
    assert response.content_type == "text/html"
    page = Page(await response.text())
    assert set(page.imports) == {("chat", "chat.example.com")}
    assert page.refresh == "3600; url=?source=chat&refresh=3600"
    # What the form sends for "all": empty values, no filter.
    response = await client.get("/?source=&state=&refresh=nonsense")
    page = Page(await response.text())
    assert len(page.imports) == 5
    assert page.refresh == "10; url=./"


def test_counts_per_source_and_state_come_first_and_link_to_their_filter(
    state: StateStore,
) -> None:
    page = render(state, T0)
    # Columns: the states present, most urgent first, then the total.
    assert page.counts["shop"].cells == ["1", "0", "1", "1", "1", "4"]
    assert page.counts["chat"].cells == ["0", "1", "0", "0", "0", "1"]
    assert page.counts["all"].cells == ["1", "1", "1", "1", "1", "5"]
    assert "?source=shop&state=failed" in page.links
    assert "?state=running" in page.links
    assert page.text.index("Summary") < page.text.index("Sources") < page.text.index("Imports")


def test_imports_that_need_attention_come_first(state: StateStore, clock: Clock) -> None:
    # A succeeded import whose latest poll failed cannot be read: it moves up.
    state.track("shop", "1005")
    state.record_observation("shop", "1005", Observation(State.SUCCEEDED, "SUCCESS"))
    clock.now = T0 + 60
    state.record_error("shop", "1005", SourceError(ErrorReason.SERVER_ERROR, "HTTP 500"))
    assert list(render(state, clock.now).imports) == [
        ("shop", "1002"),  # failed
        ("shop", "1005"),  # the last poll failed
        ("chat", "chat.example.com"),  # running
        ("shop", "1003"),  # waiting
        ("shop", "1004"),  # pending
        ("shop", "1001"),  # succeeded
    ]


def test_the_table_is_bounded_and_offers_to_show_more(clock: Clock) -> None:
    store = StateStore(clock=clock)
    store.add_source("shop", "elevate", 30.0)
    for n in range(450):
        store.track("shop", f"{n:04d}")
        state_of = State.FAILED if n % 150 == 0 else State.SUCCEEDED
        store.record_observation("shop", f"{n:04d}", Observation(state_of, state_of.value))
    page = render(store, T0)
    assert len(page.imports) == DEFAULT_SHOWN
    # The three failed imports lead the first page, whatever their ids.
    assert list(page.imports)[:3] == [("shop", "0000"), ("shop", "0150"), ("shop", "0300")]
    assert "450 of 450" in page.text
    assert "?show=400" in page.links
    more = render(store, T0, show=400)
    assert len(more.imports) == 400
    assert "?show=800" in more.links
    assert len(render(store, T0, show=800).imports) == 450
    assert "Show" not in render(store, T0, show=800).text.split("Imports")[-1]
