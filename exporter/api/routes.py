"""The routes: parse a request, ask the tracker, answer JSON. Pages of the
list are chosen on the event loop from the sorted index (bounded work) and
serialized on the paced reads thread."""

from __future__ import annotations

import base64
import binascii
import bisect
import heapq
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from exporter.api.auth import require_writer
from exporter.api.constants import MAX_BODY_BYTES, PREFIX, SCAN_PER_PAGE, VIEWS_PER_SLICE, Handler
from exporter.api.errors import ApiError, error_response, first_problem, tracking_error
from exporter.api.models import ImportPath, ListQuery, RegisterRequest, import_view
from exporter.api.openapi import openapi_document
from exporter.config.base import IMPORT_ID_PATTERN, SOURCE_NAME_PATTERN
from exporter.import_index import ImportIndex
from exporter.reads import BulkReads, unpaced
from exporter.state import ImportRecord
from exporter.tracking import ImportTracker, TrackingError

# --- requests ------------------------------------------------------------------


async def _read_json_object(request: web.Request) -> dict[str, Any]:
    too_large = ApiError(413, f"the body must be at most {MAX_BODY_BYTES} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    while len(body) <= MAX_BODY_BYTES:
        chunk = await request.content.read(MAX_BODY_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > MAX_BODY_BYTES:
        raise too_large
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _query(request: web.Request) -> ListQuery:
    params: dict[str, str] = {}
    for key, value in request.query.items():
        if key in params:
            raise ApiError(400, f"{key[:100]}: given more than once", key[:100])
        params[key] = value
    try:
        query = ListQuery.model_validate(params)
    except ValidationError as exc:
        raise first_problem(exc, "query parameter") from None
    if query.after is not None:
        _cursor_key(query.after)  # a bad cursor is a 400 before any work
    return query


def _cursor(key: tuple[str, str]) -> str:
    """An opaque cursor for the page after ``key`` (URL-safe)."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _cursor_key(cursor: str) -> tuple[str, str]:
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        key = None
    if not (
        isinstance(key, list)
        and len(key) == 2
        and isinstance(key[0], str)
        and isinstance(key[1], str)
        and re.fullmatch(SOURCE_NAME_PATTERN, key[0])
        and re.fullmatch(IMPORT_ID_PATTERN, key[1])
    ):
        raise ApiError(400, "after: not a cursor from this API (use the `next` of a page)", "after")
    return key[0], key[1]


def _path(request: web.Request) -> ImportPath:
    try:
        return ImportPath.model_validate(dict(request.match_info))
    except ValidationError as exc:
        raise first_problem(exc) from None


# --- the routes ----------------------------------------------------------------


class _Api:
    def __init__(self, tracker: ImportTracker, reads: BulkReads | None = None) -> None:
        self.tracker = tracker
        self.document = json.dumps(openapi_document(), indent=1).encode()
        # Pages are serialized on the app's paced reads thread, not on the
        # default executor that renders /metrics and writes the store.
        self.reads = reads or BulkReads()

    async def _record(self, source: str, import_id: str) -> ImportRecord:
        state = self.tracker.state
        record = state.imports.get((source, import_id)) or state.parked.get((source, import_id))
        if record is not None:
            return record  # polled here: fresher than what the database has
        if self.tracker.shared:
            try:
                record = await self.tracker.stored(source, import_id)
            except TrackingError as exc:
                raise tracking_error(exc) from None
            if record is not None:
                return record
        if source not in state.sources:
            raise ApiError(404, f"unknown source {source!r}", "source")
        raise ApiError(404, f"{source}/{import_id} is not tracked", "id")

    def _view(self, record: ImportRecord, status: int = 200) -> web.Response:
        view = import_view(record, self.tracker.state.clock())
        return web.json_response(view.model_dump(mode="json"), status=status)

    async def list_imports(self, request: web.Request) -> web.Response:
        """One page of imports. The page is chosen on the event loop from the
        state's sorted index (bounded work: at most SCAN_PER_PAGE imports
        looked at); its views are built and serialized in a worker thread."""
        query = _query(request)
        state = self.tracker.state
        known = {*state.sources, *(record.source for record in state.parked.values())}
        if query.source is not None and query.source not in known:
            raise ApiError(404, f"unknown source {query.source!r}", "source")
        if self.tracker.shared:
            records, next_key = await self._stored_page(query)
        else:
            # Parked imports are listed too, in key order among the tracked ones.
            records, next_key = _page((state.imports, state.parked), query)
        now = state.clock()
        body = await self.reads.run(lambda reads: _page_body(records, now, next_key, reads.pace))
        return web.Response(body=body, content_type="application/json")

    async def _stored_page(
        self, query: ListQuery
    ) -> tuple[list[ImportRecord], tuple[str, str] | None]:
        """A page of the registry replicas share, so every replica lists every
        import: each as this process has it if it polls it (fresher), else as
        the database has it (its owner writes what it learns within a second)."""
        after = _cursor_key(query.after) if query.after is not None else None
        wanted = query.state.value if query.state is not None else None
        try:
            stored = await self.tracker.stored_page(after, query.source, wanted, query.limit + 1)
        except TrackingError as exc:
            raise tracking_error(exc) from None
        state = self.tracker.state
        page = stored[: query.limit]
        records = [
            state.imports.get(key) or state.parked.get(key) or record
            for record in page
            for key in [(record.source, record.import_id)]
        ]
        if query.state is not None:  # this process may know a newer state
            records = [record for record in records if record.state == query.state]
        if len(stored) <= query.limit:
            return records, None
        return records, (page[-1].source, page[-1].import_id)

    async def register(self, request: web.Request) -> web.Response:
        require_writer(request, self.tracker)
        data = await _read_json_object(request)
        try:
            wanted = RegisterRequest.model_validate(data)
        except ValidationError as exc:
            raise first_problem(exc) from None
        try:
            record, new = await self.tracker.register(wanted.source, wanted.id, wanted.name)
        except TrackingError as exc:
            raise tracking_error(exc) from None
        return self._view(record, status=201 if new else 200)

    async def show(self, request: web.Request) -> web.Response:
        path = _path(request)
        return self._view(await self._record(path.source, path.id))

    async def unregister(self, request: web.Request) -> web.Response:
        require_writer(request, self.tracker)
        path = _path(request)
        try:
            await self.tracker.unregister(path.source, path.id)
        except TrackingError as exc:
            raise tracking_error(exc) from None
        return web.Response(status=204)

    async def openapi(self, _: web.Request) -> web.Response:
        return web.Response(body=self.document, content_type="application/json")


def _page(
    indexes: Iterable[ImportIndex], query: ListQuery
) -> tuple[list[ImportRecord], tuple[str, str] | None]:
    """The records of one page and the key to continue after (None: no more),
    in key order across ``indexes`` (each sorted; merged as they are read)."""
    after = _cursor_key(query.after) if query.after is not None else None
    streams = []
    for index in indexes:
        keys = index.ordered
        start = 0 if after is None else bisect.bisect_right(keys, after)
        end = len(keys)
        if query.source is not None:
            start = max(start, bisect.bisect_left(keys, (query.source, "")))
            end = bisect.bisect_left(keys, (query.source + "\0", ""), start)
        streams.append(_keys_of(index, start, end))
    records: list[ImportRecord] = []
    merged = heapq.merge(*streams, key=lambda item: item[0])
    last: tuple[str, str] | None = None
    for key, index in itertools.islice(merged, SCAN_PER_PAGE):
        last = key
        record = index.get(key)
        if record is not None and (query.state is None or record.state == query.state):
            records.append(record)
            if len(records) >= query.limit:
                break
    if next(merged, None) is None:
        return records, None
    return records, last


def _keys_of(
    index: ImportIndex, start: int, end: int
) -> Iterator[tuple[tuple[str, str], ImportIndex]]:
    keys = index.ordered
    for position in range(start, end):
        yield keys[position], index


def _page_body(
    records: list[ImportRecord],
    now: float,
    next_key: tuple[str, str] | None,
    pace: Callable[[float], float] = unpaced,
) -> bytes:
    """The JSON of a page (an ``ImportList``), built in slices with ``pace``
    between them."""
    parts = []
    started = time.perf_counter()
    for first in range(0, len(records), VIEWS_PER_SLICE):
        views = [import_view(r, now) for r in records[first : first + VIEWS_PER_SLICE]]
        parts += [view.model_dump_json() for view in views]
        started = pace(started)
    cursor = json.dumps(_cursor(next_key) if next_key else None)
    return f'{{"imports":[{",".join(parts)}],"next":{cursor}}}'.encode()


def add_api_routes(
    app: web.Application, tracker: ImportTracker | None, reads: BulkReads | None = None
) -> None:
    """Serve the API on ``app`` (nothing without a tracker)."""
    if tracker is None:
        return
    api = _Api(tracker, reads)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer under ``/api/`` is JSON, even for unknown paths and methods."""
        if request.path.startswith("/api/"):
            missing = request.match_info.http_exception
            if isinstance(missing, web.HTTPMethodNotAllowed):
                return error_response(
                    405,
                    f"method {request.method} is not allowed here",
                    headers={"Allow": ", ".join(sorted(missing.allowed_methods))},
                )
            if missing is not None:
                return error_response(404, "no such API endpoint (see /api/v1/openapi.json)")
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.field, exc.headers)

    app.middlewares.append(errors)
    app.router.add_get(f"{PREFIX}/imports", api.list_imports, allow_head=False)
    app.router.add_post(f"{PREFIX}/imports", api.register)
    app.router.add_get(f"{PREFIX}/imports/{{source}}/{{id}}", api.show, allow_head=False)
    app.router.add_delete(f"{PREFIX}/imports/{{source}}/{{id}}", api.unregister)
    app.router.add_get(f"{PREFIX}/openapi.json", api.openapi, allow_head=False)
