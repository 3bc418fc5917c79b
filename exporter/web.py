"""The HTTP side: /metrics, the status page and the health endpoints.

Every handler only reads the :class:`StateStore`; none waits on an upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from aiohttp.typedefs import Middleware
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter.api import add_api_routes, bearer_passes
from exporter.exposition import (
    FAMILY_NAMES,
    Encoder,
    ImportFamilies,
    render_body,
    render_registry,
)
from exporter.loop_slices import LoopSlices
from exporter.pages import parse_refresh, parse_show, prepare_status_page
from exporter.reads import BulkReads
from exporter.state import StateStore
from exporter.tracking import ImportTracker
from exporter.webconfig import WebConfig, WebSecurity, security_middlewares


def create_web_app(
    state: StateStore,
    registry: CollectorRegistry,
    clock: Callable[[], float] = time.time,
    web_config: WebConfig | WebSecurity | None = None,
    reload: Callable[[], Awaitable[list[str]]] | None = None,
    tracker: ImportTracker | None = None,
    store_failing: Callable[[], str | None] | None = None,
    max_requests: int = 0,
    route_prefix: str = "",
    import_lines: ImportFamilies | None = None,
) -> web.Application:
    """``store_failing`` says why the last write of the store failed (None: it
    succeeded); while it fails the exporter is not ready. ``max_requests`` > 0:
    requests served at once, beyond which 503 (the health endpoints are exempt,
    so an orchestrator does not kill a busy exporter). ``route_prefix``
    (``--web.route-prefix``, e.g. ``/exporter``): every endpoint is served
    under it, and the handlers see paths without it. ``import_lines``: the
    per-import families of ``/metrics`` (see :mod:`exporter.exposition`)."""
    prefix = normalize_route_prefix(route_prefix)
    middlewares = [strip_prefix(prefix)] if prefix else []
    middlewares += [request_cap(max_requests)] if max_requests > 0 else []
    if web_config is not None:
        middlewares += security_middlewares(web_config, bypass=bearer_passes(tracker))
    app = web.Application(middlewares=middlewares)
    ready = readiness(state, store_failing)

    async def healthy(_: web.Request) -> web.Response:
        return web.Response(text="OK\n")

    # The page's counts, ordering and table are rendered on the paced reads
    # thread (shared with the list API), not on the event loop nor on the
    # default executor (which renders /metrics).
    reads = BulkReads()

    async def landing(request: web.Request) -> web.Response:
        query = request.query
        render = prepare_status_page(
            state,
            clock(),
            # An empty value is the form's "all".
            source_filter=query.get("source") or None,
            state_filter=query.get("state") or None,
            refresh=parse_refresh(query.get("refresh")),
            show=parse_show(query.get("show")),
        )
        page = await reads.run(lambda bulk: render(bulk.pace))
        return web.Response(text=page, content_type="text/html")

    async def reload_config(request: web.Request) -> web.Response:
        refused = cross_site_refusal(request)
        if refused is not None:
            return web.json_response({"status": "refused", "errors": [refused]}, status=403)
        if reload is None:
            return web.json_response({"error": "reload is not available"}, status=501)
        errors = await reload()
        if errors:
            return web.json_response({"status": "rejected", "errors": errors}, status=400)
        return web.json_response({"status": "reloaded"})

    app.router.add_get("/metrics", metrics_handler(registry, import_lines))
    app.router.add_post("/-/reload", reload_config)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/", landing)
    add_api_routes(app, tracker, reads)
    if not prefix:
        return app
    root = web.Application()

    async def to_page(request: web.Request) -> web.Response:
        # The page's links are relative: they need the trailing slash.
        raise web.HTTPFound(request.rel_url.with_path(prefix + "/"))

    root.router.add_get(prefix, to_page)
    root.add_subapp(prefix, app)
    return root


def readiness(state: StateStore, store_failing: Callable[[], str | None] | None) -> Handler:
    """``/-/ready``: 503 while the store cannot be written or an import waits
    for its first poll of this process."""

    async def ready(_: web.Request) -> web.Response:
        failing = store_failing() if store_failing is not None else None
        if failing is not None:
            # The reason only: the database's path is for the logs.
            return web.Response(
                status=503, text=f"the store cannot be written ({failing}); see the log\n"
            )
        if state.ready():
            return web.Response(text="OK\n")
        return web.Response(status=503, text="waiting for the first poll of every import\n")

    return ready


def normalize_route_prefix(prefix: str) -> str:
    """``exporter/``, ``/exporter`` -> ``/exporter``; ``/`` or empty -> empty."""
    prefix = prefix.strip().strip("/")
    return f"/{prefix}" if prefix else ""


def route_prefix_of(external_url: str | None) -> str:
    """``--web.route-prefix``'s default: the path of ``--web.external-url``."""
    return normalize_route_prefix(urlsplit(external_url).path) if external_url else ""


def strip_prefix(prefix: str) -> Middleware:
    """Hand the request on with its path relative to the route prefix, so the
    handlers, the API and the health exemptions see /metrics, /api/... as usual."""

    @web.middleware
    async def strip(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.rel_url.path
        if path.startswith(prefix + "/"):
            request = request.clone(rel_url=request.rel_url.with_path(path[len(prefix) :]))
        return await handler(request)

    return strip


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNCAPPED_PATHS = frozenset({"/-/healthy", "/-/ready"})


def request_cap(limit: int) -> Middleware:
    """``--web.max-requests``: answer 503 at once beyond ``limit`` requests in flight."""
    in_flight = 0

    @web.middleware
    async def cap(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight
        if request.path in UNCAPPED_PATHS:
            return await handler(request)
        if in_flight >= limit:
            return web.Response(
                status=503,
                text=f"Too many requests at once (--web.max-requests={limit}); retry later\n",
                headers={"Retry-After": "1"},
            )
        in_flight += 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    return cap


FORM_CONTENT_TYPES = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}
)
"""What an HTML form can send to another site without a CORS preflight."""


def cross_site_refusal(request: web.Request) -> str | None:
    """Why a state-changing request may come from another site's page, or None.

    A browser names the page's origin in ``Origin`` on every cross-site POST;
    a form can only send the content types above (a script's ``fetch`` with
    another type needs a preflight, which this server never grants). Tools
    like curl send neither, so they keep working without a flag.
    """
    origin = request.headers.get("Origin")
    if origin is not None:
        parsed = urlsplit(origin)
        if parsed.scheme not in ("http", "https") or parsed.netloc.lower() != request.host.lower():
            return f"Origin {origin[:100]!r} is not this exporter ({request.host[:100]})"
    if request.headers.get("Sec-Fetch-Site", "") == "cross-site":
        return "a cross-site request (Sec-Fetch-Site)"
    if request.content_type in FORM_CONTENT_TYPES and "Content-Type" in request.headers:
        return f"Content-Type {request.content_type} (what a cross-site HTML form sends)"
    return None


MetricsKey = tuple[str, tuple[str, ...], bool]
"""A render's kind: content type, ``name[]`` filter, gzipped."""
PACE_FACTOR = 3.0
PACE_MIN_SECONDS = 0.010
PACE_MAX_SECONDS = 1.0


class ScrapePacing:
    """When the next render of each kind may start (see :func:`metrics_handler`).

    ``name[]`` filters are the client's to choose, and a client cycling
    through them must not grow this for ever: each slow render drops the
    times that have passed, so what is kept is bounded by what can be
    rendered (one at a time) within :data:`PACE_MAX_SECONDS`."""

    def __init__(self) -> None:
        self._not_before: dict[MetricsKey, float] = {}

    def __len__(self) -> int:
        return len(self._not_before)

    def wait(self, key: MetricsKey, now: float) -> float:
        """Seconds a render of this kind must still wait (0: none)."""
        return max(0.0, self._not_before.get(key, 0.0) - now)

    def rendered(self, key: MetricsKey, took: float, now: float) -> None:
        """A render of this kind that took ``took`` seconds ended ``now``."""
        if took < PACE_MIN_SECONDS:
            self._not_before.pop(key, None)
            return
        passed = [kind for kind, when in self._not_before.items() if when <= now]
        for kind in passed:
            del self._not_before[kind]
        self._not_before[key] = now + min(PACE_FACTOR * took, PACE_MAX_SECONDS)


BODY_PART = 256 * 1024
"""A ``/metrics`` body goes to the socket this much at a time (see :class:`PartedBody`)."""


class PartedBody(Payload):
    """A body written a part at a time, the transport drained between parts.

    Handed over whole, a body the socket cannot take at once (6 MB gzipped
    at 100,000 imports) is copied into the transport's buffer, and Python
    3.11's socket transport moves what is left of that buffer down after
    every send: megabytes moved at each of tens of sends, on the event loop.
    A part at a time, the buffer holds a part at most."""

    _value: bytes | bytearray

    def __init__(self, value: bytes | bytearray) -> None:
        super().__init__(value, content_type=None)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)[:content_length]
        for at in range(0, len(view), BODY_PART):
            await writer.write(view[at : at + BODY_PART])


def metrics_handler(
    registry: CollectorRegistry,
    imports: ImportFamilies | None = None,
    pacing: ScrapePacing | None = None,
) -> Handler:
    """``/metrics`` like ``prometheus_client.aiohttp.make_aiohttp_handler``
    (the same encoders, content negotiation and ``name[]`` filter), with the
    per-import families from ``imports`` (kept rendered, and kept gzipped
    in chunks until they change: by the exporter in a render process,
    :mod:`exporter.render_process`, whose body the loop only waits for; in
    this process, :class:`~exporter.exposition.ImportLines`, joined on the
    event loop a slice at a time), so polls never wait long on a scrape.
    Scrapes that arrive while a render of the same kind is running share
    it, gzip included.

    Paced: after a render that took over :data:`PACE_MIN_SECONDS` (from about
    10,000 imports), the next of its kind starts :data:`PACE_FACTOR` times
    that later at the earliest (at most :data:`PACE_MAX_SECONDS`); a scrape
    arriving sooner waits for it. Scrapes back to back then spend at most a
    quarter of the time rendering while a render takes up to a third of
    :data:`PACE_MAX_SECONDS`, less than half while it takes less than that
    cap (at 100,000 imports under polling, about 0.2-0.3 s: a scrape's p50
    0.8-1.1 s, pacing included), and polling goes on;
    a body is never older than its scrape.
    """
    in_flight: dict[MetricsKey, asyncio.Future[bytes | bytearray]] = {}
    if pacing is None:
        pacing = ScrapePacing()
    rendering = asyncio.Lock()

    async def render(
        encoder: Encoder,
        content_type: str,
        names: tuple[str, ...],
        gzipped: bool,
        took: list[float],
    ) -> bytes | bytearray:
        # The registry's families in a worker thread (a collector may block),
        # the kept lines on the loop meanwhile.
        loop = asyncio.get_running_loop()
        collected = loop.run_in_executor(None, render_registry, registry, encoder, names)
        # Retrieved even if the render fails first (no "never retrieved" log).
        collected.add_done_callback(lambda done: done.cancelled() or done.exception())
        # The kept lines one render at a time, refresh included: a refresh
        # (on the loop, where the records change) never runs while a render
        # reads them, so every family of a body is of the same moment.
        async with rendering:
            # One count of the loop's time for every step of the render: the
            # step from a refresh to the body's first parts is a slice too.
            slices = LoopSlices()
            started = time.perf_counter()
            try:
                wanted = frozenset(names) or None
                # A filter of the exporter's own families only (a job watching
                # the exporter) leaves what polls changed for the next render.
                lines = imports
                if wanted is not None and wanted.isdisjoint(FAMILY_NAMES):
                    lines = None
                if lines is None:
                    return await render_body(
                        None, encoder, content_type, wanted, gzipped, collected, slices
                    )
                await lines.refresh(slices)
                return await lines.body(encoder, content_type, wanted, gzipped, collected, slices)
            finally:
                took[0] = time.perf_counter() - started

    async def handler(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(",".join(request.headers.getall("Accept", [])))
        names = tuple(request.query.getall("name[]", []))
        gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        key = (content_type, names, gzipped)
        loop = asyncio.get_running_loop()
        if key not in in_flight and (wait := pacing.wait(key, loop.time())) > 0:
            await asyncio.sleep(wait)
        future = in_flight.get(key)
        if future is None:
            took = [0.0]
            future = asyncio.ensure_future(render(encoder, content_type, names, gzipped, took))
            in_flight[key] = future

            def rendered(_done: asyncio.Future[bytes | bytearray], key: MetricsKey = key) -> None:
                in_flight.pop(key, None)
                pacing.rendered(key, took[0], loop.time())

            future.add_done_callback(rendered)
        body = await asyncio.shield(future)
        headers = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=PartedBody(body), headers=headers)

    return handler


def accepts_gzip(accept_encoding: str) -> bool:
    """``Accept-Encoding`` allows gzip (named, or ``*``, without ``q=0``)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False
