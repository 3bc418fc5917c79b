"""The import registration API: pipelines tell the exporter about imports they start.

``POST /api/v1/imports`` starts tracking an import, ``DELETE
/api/v1/imports/{source}/{id}`` stops it, ``GET /api/v1/imports[/{source}/{id}]``
shows what the exporter knows, and ``GET /api/v1/openapi.json`` describes all of
it. The OpenAPI document is built from the same pydantic models that validate
requests and shape responses, so it cannot drift from what the handlers do.

Writes need ``Authorization: Bearer <token>`` with a token of ``api.tokens_file``
(without tokens the write API is off). Reads are protected like ``/metrics``
(the basic auth of ``--web.config.file``); a request under ``/api/`` carrying a
valid bearer token passes that basic auth too (see :func:`bearer_passes`).
This module only speaks HTTP and JSON: the exporter, behind
:class:`~exporter.tracking.ImportTracker`, decides.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import heapq
import hmac
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, ValidationError
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue, models_json_schema
from pydantic_core import CoreSchema, ErrorDetails

from exporter import __version__
from exporter.config import ID_RULE, DisplayName, ImportId
from exporter.model import ErrorReason, Origin, State
from exporter.reads import BulkReads, unpaced
from exporter.state import ImportIndex, ImportRecord
from exporter.tracking import ImportTracker, Refusal, TrackingError

PREFIX = "/api/v1"
MAX_BODY_BYTES = 4096
"""Larger request bodies are refused with 413 (a registration is ~100 bytes)."""
API_OFF = "the write API is off: set api.tokens_file in the config"
SOURCE_RULE = "must be a source name of 1-100 characters"
NAME_RULE = "must be a string of at most 200 characters without control characters, or null"
_REALM = 'realm="import-status-exporter"'
DEFAULT_PAGE = 500
MAX_PAGE = 5000
VIEWS_PER_SLICE = 250
SCAN_PER_PAGE = 5000
"""Imports looked at for one page at most (about 2 ms on the event loop): a
filter matching few of 50,000 imports ends a page early (with a ``next``)
instead of scanning them all."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- models: they validate, serialize, and are the OpenAPI schemas -----------


def _import_id_pattern() -> str:
    """The pattern inside config's ``ImportId``.

    pydantic applies it after the ``BeforeValidator`` and leaves it out of the
    JSON schema; it is read from the type itself, so it cannot drift."""
    for meta in get_args(ImportId)[1:]:
        if isinstance(meta, FieldInfo):
            for constraint in meta.metadata:
                pattern = getattr(constraint, "pattern", None)
                if isinstance(pattern, str):
                    return pattern
    raise RuntimeError("exporter.config.ImportId has no pattern")


class _DocumentImportId:
    """Completes the JSON schema of an ``ImportId``: its pattern, and (in a
    body) that a JSON integer is accepted and taken as its decimal string."""

    def __init__(self, *, or_integer: bool) -> None:
        self.or_integer = or_integer

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = dict(handler(core_schema))
        schema.setdefault("pattern", _import_id_pattern())
        if self.or_integer:
            return {"anyOf": [schema, {"type": "integer"}]}
        return schema


SourceName = Annotated[str, Field(min_length=1, max_length=100)]
BodyImportId = Annotated[ImportId, _DocumentImportId(or_integer=True)]
PathImportId = Annotated[ImportId, _DocumentImportId(or_integer=False)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterRequest(_Input):
    """Start tracking an import of a configured source."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"source": "elevate-prod", "id": "5537431447739019570", "name": "nightly catalogue"}
            ]
        },
    )

    source: SourceName = Field(description="a configured source (its `name`)")
    id: BodyImportId = Field(
        description="the upstream's import id; a JSON integer is taken as its decimal string"
    )
    name: DisplayName | None = Field(
        default=None, description="shown as the `name` label of `import_info`"
    )


class ListQuery(_Input):
    source: SourceName | None = Field(default=None, description="only this source's imports")
    state: State | None = Field(default=None, description="only imports in this state")
    limit: int = Field(
        default=DEFAULT_PAGE,
        ge=1,
        le=MAX_PAGE,
        description=f"imports per page, at most {MAX_PAGE}",
    )
    after: str | None = Field(
        default=None,
        max_length=1000,
        description="continue after this cursor: the `next` of the previous page "
        "(keep the same filters)",
    )


class ImportPath(_Input):
    source: SourceName = Field(description="the source's name")
    id: PathImportId = Field(description="the import id")


class LastError(BaseModel):
    message: str
    reason: ErrorReason
    at: datetime


class ImportView(BaseModel):
    """What the exporter knows about one tracked import. Times are RFC 3339 UTC."""

    source: str
    id: str
    name: str | None
    system: str
    origin: Origin = Field(description="listed in the config file, or registered through this API")
    state: State | None = Field(description="the normalized state; null before the first poll")
    upstream_state: str | None
    step: str | None
    reason: str | None
    items_completed: int | None
    items_expected: int | None
    items_failed: int | None
    started_at: datetime | None
    ended_at: datetime | None
    duration_seconds: float | None
    state_changed_at: datetime | None
    last_progress_at: datetime | None
    last_poll_success_at: datetime | None
    first_seen_at: datetime | None
    poll_failing: bool = Field(
        description="the latest poll failed: `last_error` is current (else it is history)"
    )
    consecutive_poll_failures: int = Field(
        description="polls in a row that failed since the last answer (0 once answered)"
    )
    last_poll_attempt_at: datetime | None = Field(
        description="when the latest poll of this process came back, answered or failed"
    )
    last_error: LastError | None = Field(
        description="the last failed poll; current only while `poll_failing`, else kept "
        "as history (see `at`)"
    )
    parked: bool = Field(
        default=False,
        description="registered, but its source is no longer configured: kept, neither "
        "polled nor exported, until a source of that name returns (at most `retention`)",
    )


class ImportList(BaseModel):
    """One page of tracked imports, by source and id."""

    imports: list[ImportView]
    next: str | None = Field(
        description="pass as `?after=` (with the same filters) for the next page; "
        "null on the last page. A page may hold fewer than `limit` imports and "
        "still have a `next` (a filter matched few of the imports scanned)"
    )


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong, for a person")
    field: str | None = Field(description="the request field at fault, if it is one field")


def _time(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def import_view(record: ImportRecord, now: float) -> ImportView:
    obs = record.observation
    last_error = None
    if (
        record.last_error is not None
        and record.last_error_reason is not None
        and record.last_error_at is not None
    ):
        last_error = LastError(
            message=record.last_error,
            reason=record.last_error_reason,
            at=datetime.fromtimestamp(record.last_error_at, UTC),
        )
    return ImportView(
        source=record.source,
        id=record.import_id,
        name=record.name,
        system=record.system,
        # Anything not from the config file was registered at runtime.
        origin=record.origin,
        state=obs.state if obs else None,
        upstream_state=obs.upstream_state if obs else None,
        step=obs.step if obs else None,
        reason=obs.reason if obs else None,
        items_completed=obs.items_completed if obs else None,
        items_expected=obs.items_expected if obs else None,
        items_failed=obs.items_failed if obs else None,
        started_at=_time(record.start_timestamp),
        ended_at=_time(record.end_timestamp),
        duration_seconds=record.duration(now),
        state_changed_at=_time(record.state_since),
        last_progress_at=_time(record.last_progress),
        last_poll_success_at=_time(record.last_success),
        first_seen_at=_time(record.first_seen),
        poll_failing=record.poll_failing,
        consecutive_poll_failures=record.consecutive_failures,
        last_poll_attempt_at=_time(record.last_attempt),
        last_error=last_error,
        parked=record.parked_at is not None,
    )


# --- errors --------------------------------------------------------------------


class ApiError(Exception):
    """A request the API refuses; becomes ``{"error": ..., "field": ...}``."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_response(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = ErrorBody(error=message, field=field).model_dump(mode="json")
    return web.json_response(body, status=status, headers=headers)


_FIELD_RULES = {"id": ID_RULE, "source": SOURCE_RULE, "name": NAME_RULE}


def _first_problem(exc: ValidationError, kind_of_field: str = "field") -> ApiError:
    """The first failing field, named, with what is wrong (never its value)."""
    error: ErrorDetails = exc.errors()[0]
    loc = error["loc"]
    field = str(loc[0])[:100] if loc else None
    kind = error["type"]
    if kind == "missing":
        message = "required"
    elif kind == "extra_forbidden":
        message = f"unknown {kind_of_field}"
    elif field in _FIELD_RULES:
        message = _FIELD_RULES[field]
    elif field == "state":
        message = "must be one of " + ", ".join(state.value for state in State)
    elif field == "limit":
        message = f"must be a whole number from 1 to {MAX_PAGE}"
    else:
        message = error["msg"]
    return ApiError(400, f"{field}: {message}" if field is not None else message, field)


# --- auth ----------------------------------------------------------------------


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _token_ok(tokens: Iterable[str], presented: str) -> bool:
    """Constant-time comparison against every token (no early exit)."""
    given = presented.encode()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(token.encode(), given)
    return ok


def bearer_passes(tracker: ImportTracker | None) -> Callable[[web.Request], bool] | None:
    """For the basic-auth middleware: a request under ``/api/`` with a valid API
    bearer token needs no basic auth (a request has one Authorization header)."""
    if tracker is None:
        return None

    def passes(request: web.Request) -> bool:
        if not request.path.startswith("/api/"):
            return False
        presented = _bearer(request)
        tokens = tracker.api_tokens
        return presented is not None and bool(tokens) and _token_ok(tokens, presented)

    return passes


def _require_writer(request: web.Request, tracker: ImportTracker) -> None:
    tokens = tracker.api_tokens
    if not tokens:
        raise ApiError(403, API_OFF)
    presented = _bearer(request)
    if presented is None:
        raise ApiError(
            401,
            "this call needs Authorization: Bearer <token> (a token of api.tokens_file)",
            headers={"WWW-Authenticate": f"Bearer {_REALM}"},
        )
    if not _token_ok(tokens, presented):
        raise ApiError(
            401,
            "the bearer token is not valid",
            headers={"WWW-Authenticate": f'Bearer {_REALM}, error="invalid_token"'},
        )


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
        raise _first_problem(exc, "query parameter") from None
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
    if not (isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) for k in key)):
        raise ApiError(400, "after: not a cursor from this API (use the `next` of a page)", "after")
    return key[0], key[1]


def _path(request: web.Request) -> ImportPath:
    try:
        return ImportPath.model_validate(dict(request.match_info))
    except ValidationError as exc:
        raise _first_problem(exc) from None


REFUSAL_STATUS = {
    Refusal.UNKNOWN_SOURCE: 404,
    Refusal.NOT_TRACKED: 404,
    Refusal.TAKES_NO_IDS: 400,
    Refusal.LIMIT_REACHED: 409,
    Refusal.LISTED_IN_CONFIG: 409,
    Refusal.NOT_STORED: 503,
}
"""The one place a domain refusal becomes an HTTP status."""


def _tracking_error(exc: TrackingError) -> ApiError:
    return ApiError(REFUSAL_STATUS[exc.refusal], exc.message, exc.field)


# --- the routes ----------------------------------------------------------------


class _Api:
    def __init__(self, tracker: ImportTracker, reads: BulkReads | None = None) -> None:
        self.tracker = tracker
        self.document = json.dumps(openapi_document(), indent=1).encode()
        # Pages are serialized on the app's paced reads thread, not on the
        # default executor that renders /metrics and writes the store.
        self.reads = reads or BulkReads()

    def _record(self, source: str, import_id: str) -> ImportRecord:
        state = self.tracker.state
        record = state.imports.get((source, import_id)) or state.parked.get((source, import_id))
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
        # Parked imports are listed too, in key order among the tracked ones.
        records, next_key = _page((state.imports, state.parked), query)
        now = state.clock()
        body = await self.reads.run(lambda reads: _page_body(records, now, next_key, reads.pace))
        return web.Response(body=body, content_type="application/json")

    async def register(self, request: web.Request) -> web.Response:
        _require_writer(request, self.tracker)
        data = await _read_json_object(request)
        try:
            wanted = RegisterRequest.model_validate(data)
        except ValidationError as exc:
            raise _first_problem(exc) from None
        try:
            record, new = await self.tracker.register(wanted.source, wanted.id, wanted.name)
        except TrackingError as exc:
            raise _tracking_error(exc) from None
        return self._view(record, status=201 if new else 200)

    async def show(self, request: web.Request) -> web.Response:
        path = _path(request)
        return self._view(self._record(path.source, path.id))

    async def unregister(self, request: web.Request) -> web.Response:
        _require_writer(request, self.tracker)
        path = _path(request)
        try:
            await self.tracker.unregister(path.source, path.id)
        except TrackingError as exc:
            raise _tracking_error(exc) from None
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


# --- the OpenAPI document ------------------------------------------------------


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _error(description: str) -> dict[str, Any]:
    return _json("ErrorBody", description)


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field's schema without its ``null`` branch (for a query parameter)."""
    branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
        return {**rest, **branches[0]}
    return schema


def _parameters(model: dict[str, Any], where: Literal["query", "path"]) -> list[dict[str, Any]]:
    required = set(model.get("required", []))
    out = []
    for name, schema in model["properties"].items():
        schema = {k: v for k, v in schema.items() if k not in ("title", "description")}
        out.append(
            {
                "name": name,
                "in": where,
                "required": where == "path" or name in required,
                "description": model["properties"][name].get("description", ""),
                "schema": schema if where == "path" else _without_null(schema),
            }
        )
    return out


UNAUTHORIZED_READ = {
    "description": "the basic auth of --web.config.file failed (reads are protected like "
    "/metrics; a valid API bearer token passes too)",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API, from the models above."""
    _, top = models_json_schema(
        [
            (RegisterRequest, "validation"),
            (ListQuery, "validation"),
            (ImportPath, "validation"),
            (ImportView, "serialization"),
            (ImportList, "serialization"),
            (ErrorBody, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top["$defs"]
    query = _parameters(schemas.pop("ListQuery"), "query")
    path = _parameters(schemas.pop("ImportPath"), "path")
    reads: list[dict[str, list[str]]] = [{}, {"basicAuth": []}, {"bearerAuth": []}]
    writes: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    unauthorized_write = _error(
        "no bearer token, or not a token of api.tokens_file (with basic auth on, "
        "the basic-auth middleware answers in text/plain)"
    )
    unauthorized_write["content"]["text/plain"] = {"schema": {"type": "string"}}
    write_errors = {
        "401": unauthorized_write,
        "403": _error("the write API is off: no api.tokens_file in the config"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "import-status-exporter registration API",
            "version": __version__,
            "description": "Pipelines register the imports they start, so the exporter "
            "watches them. Errors are JSON: {error, field}.",
        },
        "paths": {
            f"{PREFIX}/imports": {
                "get": {
                    "operationId": "listImports",
                    "summary": "tracked imports, a page at a time",
                    "description": f"Pages of `limit` imports (default {DEFAULT_PAGE}, "
                    f"at most {MAX_PAGE}) by source and id; follow `next` with "
                    "`?after=` and the same filters until it is null.",
                    "security": reads,
                    "parameters": query,
                    "responses": {
                        "200": _json("ImportList", "a page of tracked imports, by source and id"),
                        "400": _error(
                            "a query parameter is invalid, unknown or repeated, or `after` "
                            "is not a cursor of this API"
                        ),
                        "401": UNAUTHORIZED_READ,
                        "404": _error("unknown source"),
                    },
                },
                "post": {
                    "operationId": "registerImport",
                    "summary": "start tracking an import",
                    "description": "Any content type is accepted if the body is JSON; "
                    f"at most {MAX_BODY_BYTES} bytes.",
                    "security": writes,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/RegisterRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": _json("ImportView", "already tracked (its name is updated)"),
                        "201": _json("ImportView", "now tracked"),
                        "400": _error(
                            "malformed JSON, not an object, a missing, invalid or unknown "
                            "field, or a source that takes no ids (Rocket.Chat)"
                        ),
                        **write_errors,
                        "404": _error("unknown source"),
                        "409": _error("the source tracks api.max_imports_per_source imports"),
                        "413": _error(f"the body is over {MAX_BODY_BYTES} bytes"),
                        "503": _error("the registration could not be stored"),
                    },
                },
            },
            f"{PREFIX}/imports/{{source}}/{{id}}": {
                "parameters": path,
                "get": {
                    "operationId": "showImport",
                    "summary": "one tracked import",
                    "security": reads,
                    "responses": {
                        "200": _json("ImportView", "the import"),
                        "400": _error("the source or id is malformed"),
                        "401": UNAUTHORIZED_READ,
                        "404": _error("unknown source, or the import is not tracked"),
                    },
                },
                "delete": {
                    "operationId": "unregisterImport",
                    "summary": "stop tracking an import and forget it",
                    "security": writes,
                    "responses": {
                        "204": {"description": "no longer tracked"},
                        "400": _error("the source or id is malformed"),
                        **write_errors,
                        "404": _error("unknown source, or the import is not tracked"),
                        "409": _error("listed in the config file: remove it there"),
                        "503": _error("the removal could not be stored: still tracked"),
                    },
                },
            },
            f"{PREFIX}/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "this document",
                    "security": reads,
                    "responses": {
                        "200": {
                            "description": "the OpenAPI document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "401": UNAUTHORIZED_READ,
                    },
                },
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token of api.tokens_file",
                },
                "basicAuth": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "basic_auth_users of --web.config.file, when set",
                },
            },
        },
    }
