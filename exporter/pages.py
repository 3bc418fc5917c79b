"""The status page at ``/``: sources, imports, progress and errors at a glance.

A pure reader of the :class:`StateStore`: :func:`render_status_page` turns the
state, the time and the page's query parameters into one self-contained HTML
document (inline CSS, no scripts or assets to fetch, so it works offline and
behind any proxy). Every piece of upstream, configured or user-given text goes
through :func:`html.escape`: upstreams are not trusted to send plain text.

Over 400 lines because it is one page: its HTML pieces and its CSS read best
together, and nothing else uses them.
"""

from __future__ import annotations

import heapq
import html
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlencode

from exporter import __version__
from exporter.model import PENDING, State
from exporter.reads import unpaced
from exporter.state import ERROR_TIMES_KEPT, ImportRecord, SourceRecord, StateStore

DEFAULT_REFRESH = 10
"""Seconds between reloads of the page unless ``?refresh=N`` says otherwise."""
MAX_REFRESH = 3600
RECENT_ERRORS_WINDOW = 15 * 60.0
"""The window of the sources' "recent errors" count."""
STATE_CHOICES = (PENDING, *(state.value for state in State))
RECORDS_PER_SLICE = 5000
DEFAULT_SHOWN = 200
"""Imports listed by default, those that most need attention first."""
MAX_SHOWN = 5000

_e = html.escape


def parse_refresh(raw: str | None) -> int:
    """``?refresh=N``: seconds between reloads, 0 for never.

    Anything that is not a whole number >= 0 gets the default; other values
    are bounded to 1..3600, so a typo cannot make the page hammer the exporter.
    """
    if raw is None:
        return DEFAULT_REFRESH
    try:
        value = int(raw)
    except ValueError:
        return DEFAULT_REFRESH
    if value < 0:
        return DEFAULT_REFRESH
    return bound_refresh(value)


def bound_refresh(seconds: int) -> int:
    return 0 if seconds <= 0 else min(MAX_REFRESH, seconds)


def state_label(record: ImportRecord) -> str:
    """The normalized state, or "pending" before the first answer."""
    return record.observation.state.value if record.observation else PENDING


def render_status_page(
    state: StateStore,
    now: float,
    *,
    source_filter: str | None = None,
    state_filter: str | None = None,
    refresh: int = DEFAULT_REFRESH,
    show: int = DEFAULT_SHOWN,
) -> str:
    """The whole page. Filters match exactly; an unknown value matches nothing."""
    return prepare_status_page(
        state,
        now,
        source_filter=source_filter,
        state_filter=state_filter,
        refresh=refresh,
        show=show,
    )()


def prepare_status_page(
    state: StateStore,
    now: float,
    *,
    source_filter: str | None = None,
    state_filter: str | None = None,
    refresh: int = DEFAULT_REFRESH,
    show: int = DEFAULT_SHOWN,
) -> Callable[..., str]:
    """Take what the page needs from the state, on the event loop (the sources
    table and a snapshot list of the imports: cheap at any size); return the
    rest of the rendering (counts, ordering, the bounded table), which may run
    in a worker thread: at 50,000 imports it takes tens of milliseconds."""
    refresh = bound_refresh(refresh)
    show = bound_show(show)
    sources = [s for n, s in sorted(state.sources.items()) if source_filter in (None, n)]
    sources_html = _sources_table(sources, now, source_filter if state.sources else None)
    source_names = sorted(state.sources)
    every_import = list(state.imports.values())

    def render(pace: Callable[[float], float] = unpaced) -> str:
        """``pace`` is called between slices of work (see exporter.reads)."""
        counts: Counter[tuple[str, str]] = Counter()
        shown: list[ImportRecord] = []
        started = time.perf_counter()
        for start in range(0, len(every_import), RECORDS_PER_SLICE):
            for record in every_import[start : start + RECORDS_PER_SLICE]:
                label = state_label(record)
                counts[(record.source, label)] += 1
                if source_filter in (None, record.source) and state_filter in (None, label):
                    shown.append(record)
            started = pace(started)
        first = heapq.nsmallest(show, shown, key=attention_key)
        started = pace(started)
        keep = _query(source_filter, state_filter, refresh, show)
        more = ""
        if len(shown) > len(first):
            more = _show_more(source_filter, state_filter, refresh, show, len(shown))
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{_refresh_meta(refresh, keep)}<title>Import status</title>
<style>{_CSS}</style></head><body>
<header><h1>Import status</h1>
<nav><a href="metrics">Metrics</a> · <a href="api/v1/imports">JSON API</a> ·
<a href="-/healthy">Health</a> · <a href="-/ready">Readiness</a></nav></header>
<p class="meta">Updated <time>{_e(_utc(now))}</time> UTC ·
{_refresh_note(refresh, source_filter, state_filter)}</p>
{_counts_table(counts, source_names, refresh)}
<h2>Sources</h2>
{sources_html}
<h2>Imports <span class="count">{len(shown)} of {len(every_import)}</span></h2>
{_filter_form(source_names, source_filter, state_filter, refresh)}
{_imports_table(first, now, source_filter, state_filter, bool(every_import))}
{more}
<footer>import-status-exporter {_e(__version__)}</footer>
</body></html>
"""

    return render


ATTENTION_ORDER = (
    State.FAILED.value,
    State.ABORTED.value,
    State.UNKNOWN.value,
    State.NOT_FOUND.value,
    State.BLOCKED.value,
    State.RUNNING.value,
    State.WAITING.value,
    PENDING,
    State.SUCCEEDED.value,
)
"""States by how much they need someone's attention, most first."""
_RANK = {label: rank for rank, label in enumerate(ATTENTION_ORDER)}
_ERRORING_RANK = _RANK[State.UNKNOWN.value]


def attention_key(record: ImportRecord) -> tuple[int, float, str, str]:
    """Failed first, then aborted, unreadable (unknown state, or the last poll
    failed), not found, blocked, running, waiting, pending, succeeded last;
    within each, the latest change first."""
    rank = _RANK.get(state_label(record), len(_RANK))
    error_at = record.last_error_at
    if error_at is not None and (record.last_success is None or error_at > record.last_success):
        rank = min(rank, _ERRORING_RANK)
    return (rank, -(record.state_since or 0.0), record.source, record.import_id)


def bound_show(rows: int) -> int:
    return max(1, min(MAX_SHOWN, rows))


def parse_show(raw: str | None) -> int:
    """``?show=N``: how many imports the table lists (1-5,000; default 200)."""
    try:
        return bound_show(int(raw)) if raw is not None else DEFAULT_SHOWN
    except ValueError:
        return DEFAULT_SHOWN


# --- pieces -----------------------------------------------------------------


def _sources_table(sources: list[SourceRecord], now: float, source_filter: str | None) -> str:
    if not sources:
        if source_filter is None:
            return '<p class="empty">No sources configured.</p>'
        return f'<p class="empty">No source named “{_e(source_filter)}”.</p>'
    rows = []
    for s in sources:
        status = PENDING if s.up is None else ("up" if s.up else "down")
        recent = s.recent_errors(now, RECENT_ERRORS_WINDOW)
        # The record keeps only the latest error times; say so when it is full.
        recent_text = f"{recent}+" if recent >= ERROR_TIMES_KEPT else str(recent)
        last_error = ""
        if s.last_error:
            when = _ago(now, s.last_error_at)
            recovered = s.up and (s.last_success or 0) > (s.last_error_at or 0)
            since = ", since answered" if recovered else ""
            last_error = (
                f'<span class="{"sub" if recovered else "error"}">{_e(s.last_error)}</span> '
                f'<span class="sub">{when}{since}</span>'
            )
        rows.append(
            f'<tr data-source="{_e(s.name)}"><td class="nw">{_e(s.name)}</td>'
            f"<td>{_e(s.system)}</td>"
            f'<td><span class="badge s-{status}">{status}</span></td>'
            f"<td>{_ago(now, s.last_success)}</td>"
            f'<td class="num{" bad" if recent else ""}">{recent_text}</td>'
            f'<td class="num">{sum(s.errors_total.values())}</td>'
            f'<td class="msg">{last_error}</td></tr>'
        )
    return (
        '<table class="sources"><thead><tr><th>Source</th><th>System</th><th>Status</th>'
        '<th>Last successful poll</th><th class="num">Errors (15 min)</th>'
        '<th class="num">Errors (total)</th>'
        f"<th>Last error</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _imports_table(
    records: list[ImportRecord],
    now: float,
    source_filter: str | None,
    state_filter: str | None,
    any_tracked: bool,
) -> str:
    if not records:
        if not any_tracked:
            return '<p class="empty">No imports tracked yet.</p>'
        wanted = [
            f"{key} “{_e(value)}”"
            for key, value in (("source", source_filter), ("state", state_filter))
            if value
        ]
        return f'<p class="empty">No imports match {" and ".join(wanted)}.</p>'
    rows = []
    for r in records:
        obs = r.observation
        label = state_label(r)
        name = f'<div class="name">{_e(r.name)}</div>' if r.name else ""
        took = r.duration(now)
        start = r.start_timestamp
        message = ""
        if obs is not None and obs.reason:
            message += f'<div class="reason">{_e(obs.reason)}</div>'
        if r.last_error and r.poll_failing:
            in_a_row = (
                f" ({r.consecutive_failures} polls failed in a row)"
                if r.consecutive_failures > 1
                else ""
            )
            message += (
                f'<div class="error">poll error {_ago(now, r.last_error_at)}: '
                f"{_e(r.last_error)}{in_a_row}</div>"
            )
        elif r.last_error:
            # History: a later poll was answered, so this is no current problem.
            message += (
                f'<div class="sub past-error">last poll error {_ago(now, r.last_error_at)}, '
                f"since answered: {_e(r.last_error)}</div>"
            )
        rows.append(
            f'<tr data-source="{_e(r.source)}" data-import="{_e(r.import_id)}" '
            f'data-state="{label}">'
            f'<td class="nw">{_e(r.source)}</td>'
            f"<td>{name}<code>{_e(r.import_id)}</code></td>"
            f'<td><span class="badge s-{label}">{label}</span>'
            f'<div class="sub upstream">{_e(obs.upstream_state) if obs else ""}</div></td>'
            f'<td class="progress">{_progress(r)}</td>'
            f'<td class="nw">{_utc(start) if start is not None else ""}</td>'
            f'<td class="nw">{"" if took is None else _human(took)}</td>'
            f"<td>{_ago(now, r.state_since) if r.state_since is not None else ''}"
            f'<div class="sub">polled {_ago(now, r.last_success)}</div></td>'
            f'<td class="msg">{message}</td></tr>'
        )
    return (
        '<table class="imports"><thead><tr><th>Source</th><th>Import</th><th>State</th>'
        "<th>Progress</th><th>Started (UTC)</th><th>Duration</th><th>Last change</th>"
        f"<th>Message</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _counts_table(counts: Counter[tuple[str, str]], sources: list[str], refresh: int) -> str:
    """Imports per source and state, each count a link to that filter."""
    if not counts:
        return ""
    labels = [label for label in ATTENTION_ORDER if any(counts[(s, label)] for s in sources)]
    labels += sorted({label for _, label in counts} - set(labels) - set(ATTENTION_ORDER))
    names = sources + sorted({source for source, _ in counts} - set(sources))
    head = "".join(
        f'<th class="num"><span class="badge s-{_e(x)}">{_e(x)}</span></th>' for x in labels
    )

    def cell(source: str | None, label: str | None, value: int) -> str:
        if not value:
            return '<td class="num zero">0</td>'
        href = _e(_href(_query(source, label, refresh)))
        return f'<td class="num"><a href="{href}">{value}</a></td>'

    rows = []
    for source in [*names, None]:
        row_counts = [
            sum(counts[(s, label)] for s in names) if source is None else counts[(source, label)]
            for label in labels
        ]
        title = "all" if source is None else _e(source)
        rows.append(
            f'<tr data-counts="{title}"><th>{title}</th>'
            + "".join(cell(source, label, n) for label, n in zip(labels, row_counts, strict=True))
            + cell(source, None, sum(row_counts))
            + "</tr>"
        )
    return (
        '<h2>Summary</h2><table class="counts"><thead><tr><th>Source</th>'
        f'{head}<th class="num">total</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _show_more(
    source_filter: str | None, state_filter: str | None, refresh: int, show: int, matching: int
) -> str:
    shown = min(show, matching)
    text = f'<p class="more">Showing the {shown} imports that most need attention of {matching}.'
    if show < MAX_SHOWN:
        more = bound_show(show * 2)
        href = _e(_href(_query(source_filter, state_filter, refresh, more)))
        text += f' <a href="{href}">Show {min(more, matching)}</a>.'
    else:
        text += " Filter by source or state, or use the JSON API, to see the rest."
    return text + "</p>"


def _filter_form(
    source_names: list[str], source_filter: str | None, state_filter: str | None, refresh: int
) -> str:
    def options(values: list[str], selected: str | None) -> str:
        return "".join(
            f'<option value="{_e(v)}"{" selected" if v == selected else ""}>{_e(v)}</option>'
            for v in values
        )

    # A plain GET form works without JavaScript; the one-line handler only
    # saves a click. The refresh setting rides along so filtering keeps it.
    hidden = (
        f'<input type="hidden" name="refresh" value="{refresh}">'
        if refresh != DEFAULT_REFRESH
        else ""
    )
    return (
        '<form method="get" class="filter">'
        '<label>Source <select name="source" onchange="this.form.submit()">'
        f'<option value="">all</option>{options(source_names, source_filter)}'
        "</select></label> "
        '<label>State <select name="state" onchange="this.form.submit()">'
        f'<option value="">all</option>{options(list(STATE_CHOICES), state_filter)}'
        f"</select></label> {hidden}"
        '<button type="submit">Filter</button> '
        f'<a href="{_e(_href(_query(None, None, refresh)))}">clear</a></form>'
    )


def _progress(record: ImportRecord) -> str:
    obs = record.observation
    if obs is None or obs.items_completed is None:
        return ""
    failed = f'<div class="sub">{obs.items_failed} failed</div>' if obs.items_failed else ""
    if obs.items_expected is None or obs.items_expected <= 0:
        return f'<span class="num">{obs.items_completed}</span>{failed}'
    return (
        f'<progress max="{obs.items_expected}" '
        f'value="{min(obs.items_completed, obs.items_expected)}"></progress> '
        f'<span class="num">{obs.items_completed} / {obs.items_expected}</span>{failed}'
    )


def _refresh_meta(refresh: int, keep: list[tuple[str, str]]) -> str:
    if refresh == 0:
        return ""
    # Reload the same filtered view, not whatever the address bar last held.
    return f'<meta http-equiv="refresh" content="{refresh}; url={_e(_href(keep))}">\n'


def _refresh_note(refresh: int, source_filter: str | None, state_filter: str | None) -> str:
    if refresh == 0:
        resume = _href(_query(source_filter, state_filter, DEFAULT_REFRESH))
        return f'auto-refresh off (<a href="{_e(resume)}">turn on</a>)'
    stop = _href(_query(source_filter, state_filter, 0))
    return f'refreshes every {refresh} s (<a href="{_e(stop)}">stop</a>)'


def _query(
    source: str | None, state: str | None, refresh: int, show: int = DEFAULT_SHOWN
) -> list[tuple[str, str]]:
    params = [("source", source or ""), ("state", state or "")]
    if refresh != DEFAULT_REFRESH:
        params.append(("refresh", str(refresh)))
    if show != DEFAULT_SHOWN:
        params.append(("show", str(show)))
    return [(k, v) for k, v in params if v]


def _href(params: list[tuple[str, str]]) -> str:
    """A link to this page with these parameters (relative, so a path prefix
    added by a reverse proxy is kept)."""
    return f"?{urlencode(params)}" if params else "./"


# --- formatting -------------------------------------------------------------


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))


def _ago(now: float, when: float | None) -> str:
    if when is None:
        return "never"
    return f"{_human(now - when)} ago"


def _human(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em 2em;color:#1f2328}
header{display:flex;align-items:baseline;gap:2em;flex-wrap:wrap}
h1{font-size:1.5em;margin:0}h2{font-size:1.15em;margin:1.6em 0 .5em}
a{color:#0969da}.meta,footer,.sub,.count{color:#656d76;font-size:.9em}
.count{font-weight:normal;margin-left:.5em}footer{margin-top:2em}
table{border-collapse:collapse;width:100%}table.sources{width:auto;min-width:60%}
th,td{border-bottom:1px solid #d8dee4;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600;white-space:nowrap}
tbody tr:hover{background:#f6f8fa}
td.num,th.num{text-align:right}.bad{color:#cf222e;font-weight:600}
code{font-size:.9em;color:#424a53;overflow-wrap:anywhere}.nw{white-space:nowrap}.name{font-weight:600}
.msg{max-width:32em;overflow-wrap:anywhere}.reason{color:#1f2328}.error{color:#cf222e}
.progress{white-space:nowrap}progress{width:7em;vertical-align:middle}
.badge{display:inline-block;padding:0 8px;border-radius:10px;font-size:.85em;font-weight:600;
background:#eaeef2;color:#424a53;white-space:nowrap}
.s-up,.s-succeeded{background:#dafbe1;color:#116329}
.s-down,.s-failed{background:#ffebe9;color:#a40e26}
.s-aborted{background:#fff1e5;color:#953800}
.s-running{background:#ddf4ff;color:#0550ae}
.s-waiting,.s-blocked{background:#fff8c5;color:#7d4e00}
.s-unknown{background:#fbefff;color:#6639ba}
.filter{margin:0 0 .8em}.filter select{margin-right:1em}
.empty{color:#656d76;font-style:italic}
table.counts{width:auto}td.zero{color:#afb8c1}.more{color:#656d76}
"""
