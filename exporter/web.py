"""The HTTP side: /metrics, the landing page and the health endpoints.

Every handler only reads the :class:`StateStore`; none waits on an upstream.
"""

from __future__ import annotations

import asyncio
import gc
import html
import threading
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from exporter import __version__
from exporter.state import ImportRecord, StateStore
from exporter.tracking import ImportTracker
from exporter.webconfig import WebConfig, security_middlewares

STATE_KEY = web.AppKey("state", StateStore)


def create_web_app(
    state: StateStore,
    registry: CollectorRegistry,
    clock: Callable[[], float] = time.time,
    web_config: WebConfig | None = None,
    reload: Callable[[], Awaitable[list[str]]] | None = None,
    tracker: ImportTracker | None = None,
) -> web.Application:
    middlewares = security_middlewares(web_config) if web_config is not None else []
    app = web.Application(middlewares=middlewares)
    app[STATE_KEY] = state

    async def healthy(_: web.Request) -> web.Response:
        return web.Response(text="OK\n")

    async def ready(_: web.Request) -> web.Response:
        if state.ready():
            return web.Response(text="OK\n")
        return web.Response(status=503, text="waiting for the first poll of every import\n")

    async def landing(_: web.Request) -> web.Response:
        return web.Response(text=render_landing_page(state, clock()), content_type="text/html")

    async def reload_config(_: web.Request) -> web.Response:
        if reload is None:
            return web.json_response({"error": "reload is not available"}, status=501)
        errors = await reload()
        if errors:
            return web.json_response({"status": "rejected", "errors": errors}, status=400)
        return web.json_response({"status": "reloaded"})

    app.router.add_get("/metrics", metrics_handler(registry))
    app.router.add_post("/-/reload", reload_config)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/", landing)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """``/metrics`` like ``prometheus_client.aiohttp.make_aiohttp_handler``
    (the same encoders, content negotiation, ``name[]`` filter and gzip), but
    rendered in a worker thread: at 10,000 imports a render takes over a
    second, and on the event loop it would stall every poll for that long.
    Scrapes that arrive while a render of the same kind is running share it.
    """
    in_flight: dict[tuple[str, tuple[str, ...]], asyncio.Future[bytes]] = {}

    async def handler(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(",".join(request.headers.getall("Accept", [])))
        names = tuple(request.query.getall("name[]", []))
        key = (content_type, names)
        future = in_flight.get(key)
        if future is None:
            target = registry.restricted_registry(list(names)) if names else registry
            future = asyncio.get_running_loop().run_in_executor(None, _render, encoder, target)
            in_flight[key] = future
            future.add_done_callback(lambda _: in_flight.pop(key, None))
        body = await asyncio.shield(future)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()
        return response

    return handler


_gc_lock = threading.Lock()
_renders = 0


def _render(encoder: Callable[[Collector], bytes], target: Collector) -> bytes:
    """Encode with the cyclic garbage collector paused.

    A render allocates hundreds of thousands of short-lived objects (freed by
    reference counting; they form no cycles), which would trigger full
    collections that walk every live object with the GIL held: at 10,000
    imports that stalled the event loop by ~100 ms per scrape.
    """
    global _renders
    with _gc_lock:
        _renders += 1
        if _renders == 1:
            gc.disable()
    try:
        return encoder(target)
    finally:
        with _gc_lock:
            _renders -= 1
            if _renders == 0:
                gc.enable()


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


def _progress(record: ImportRecord) -> str:
    obs = record.observation
    if obs is None or obs.items_expected is None or obs.items_completed is None:
        return ""
    if obs.items_expected <= 0:
        return f"{obs.items_completed}"
    percent = min(100.0, 100.0 * obs.items_completed / obs.items_expected)
    return (
        f'<progress max="100" value="{percent:.0f}"></progress> '
        f"{obs.items_completed} / {obs.items_expected}"
    )


def render_landing_page(state: StateStore, now: float) -> str:
    e = html.escape
    source_rows = "".join(
        f"<tr><td>{e(s.name)}</td><td>{e(s.system)}</td>"
        f'<td class="{"up" if s.up else "down"}">{"up" if s.up else "down"}</td>'
        f"<td>{_ago(now, s.last_success)}</td><td>{sum(s.errors_total.values())}</td>"
        f"<td>{e(s.last_error or '')}</td></tr>"
        for s in state.sources.values()
    )
    import_rows = []
    for record in sorted(state.imports.values(), key=lambda r: (r.source, r.import_id)):
        obs = record.observation
        label = obs.state.value if obs else "pending"
        took = record.duration(now)
        import_rows.append(
            f"<tr><td>{e(record.source)}</td><td>{e(record.import_id)}</td>"
            f"<td>{e(record.name or '')}</td>"
            f'<td><span class="badge {e(label)}">{e(label)}</span></td>'
            f"<td>{e(obs.upstream_state if obs else '')}</td><td>{_progress(record)}</td>"
            f"<td>{'' if took is None else _human(took)}</td>"
            f"<td>{_ago(now, record.state_since)}</td>"
            f"<td>{e((obs.reason if obs else None) or record.last_error or '')}</td></tr>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Import status exporter</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}}
.up{{color:#1a7f37}}.down{{color:#cf222e}}
.badge{{padding:1px 8px;border-radius:8px;background:#eee}}
.running{{background:#ddf4ff}}.succeeded{{background:#dafbe1}}
.failed,.aborted{{background:#ffebe9}}.waiting,.blocked{{background:#fff8c5}}
</style></head><body>
<h1>Import status exporter</h1>
<p>Version {e(__version__)}. <a href="/metrics">Metrics</a> ·
<a href="/-/healthy">Health</a> · <a href="/-/ready">Readiness</a></p>
<h2>Sources</h2>
<table><tr><th>Source</th><th>System</th><th>Status</th><th>Last success</th>
<th>Errors</th><th>Last error</th></tr>{source_rows}</table>
<h2>Imports</h2>
<table><tr><th>Source</th><th>Import</th><th>Name</th><th>State</th><th>Upstream</th>
<th>Progress</th><th>Duration</th><th>Since</th><th>Message</th></tr>{"".join(import_rows)}</table>
</body></html>
"""
