"""An aiohttp app that answers like the three upstream APIs, a Salesforce
token endpoint, and the two APIs of the http_json recipes (Salesforce Bulk API
2.0 ingest jobs, Shopify bulk operations), playing back scripted imports, with
fault injection.

It is a fake of the vendors' servers: it imports nothing from the exporter.
Over 400 lines because the three fakes share their fault injection, rate
limits and scripts; one file keeps the fake readable end to end.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from exporter.simulator.scenarios import Scenarios, Script, demo_scenarios

JSON_TYPE = "application/json;charset=UTF-8"
STREAM_CHUNK = 64 * 1024
KINDS = (
    "elevate",
    "zilliant",
    "token",
    "rocketchat_progress",
    "rocketchat_operation",
    "salesforce_bulk",
    "shopify",
)


@dataclass(frozen=True)
class DemoCredentials:
    elevate_api_key: str = "demo-elevate-key"
    rocketchat_user_id: str = "demo-user"
    rocketchat_auth_token: str = "demo-rocketchat-token"
    client_id: str = "demo-client"
    client_secret: str = "demo-client-secret"
    username: str = "demo@example.com"
    password: str = "demo-password"
    forwarded_host: str = "demo.my.salesforce.com"
    shopify_access_token: str = "shpat_demo_access_token"


DEMO_CREDENTIALS = DemoCredentials()


@dataclass
class Fault:
    """What one endpoint does instead of answering normally.

    ``mode``: ``answer`` (status/body/headers after ``delay``), ``close``
    (drop the connection without answering), ``reset`` (send half the body,
    then drop the connection), ``drip`` (send the body a byte at a time,
    ``drip_interval`` apart), ``stream`` (send the body in chunks with no
    Content-Length, as a server streaming a huge answer would).
    """

    status: int | None = None
    delay: float = 0.0
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    mode: Literal["answer", "close", "reset", "drip", "stream"] = "answer"
    drip_interval: float = 0.2

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        body = data.get("body")
        if isinstance(body, str):
            body = body.encode()
        elif "body_base64" in data:
            body = base64.b64decode(data["body_base64"])
        elif "body_size" in data:
            body = b"x" * int(data["body_size"])
        return cls(
            status=data.get("status"),
            delay=float(data.get("delay", 0.0)),
            body=body,
            headers=dict(data.get("headers", {})),
            mode=data.get("mode", "answer"),
            drip_interval=float(data.get("drip_interval", 0.2)),
        )


class Simulator:
    """All state of the fake upstreams."""

    def __init__(
        self,
        speed: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        rocketchat_cycle: bool = True,
        rocketchat_rate_limit: int | None = None,
        scenarios: Scenarios | None = None,
        wall_clock: Callable[[], float] = time.time,
        credentials: DemoCredentials = DEMO_CREDENTIALS,
        shopify_bucket: tuple[float, float] | None = None,
    ) -> None:
        self.speed = speed
        self.credentials = credentials
        """The credentials the fake upstreams accept."""
        self.clock = clock
        self.start = clock()
        self.wall_start = wall_clock()
        self.wall_clock = wall_clock
        self.scenarios = scenarios or demo_scenarios()
        if not rocketchat_cycle:
            self.scenarios.rocketchat_cycle = None
        self.rocketchat_rate_limit = rocketchat_rate_limit
        self.counters: Counter[str] = Counter()
        self.faults: dict[str, Fault] = {}
        self.tokens: set[str] = set()
        self._calls: dict[tuple[str, str], deque[float]] = {}
        self.first_asked: dict[str, float] = {}
        """Simulated second each walk-in id was first asked about."""
        self.shopify_bucket = shopify_bucket
        """Shopify's leaky bucket: (points it holds, points restored a second);
        None: no limit."""
        self._shopify_points = shopify_bucket[0] if shopify_bucket else 0.0
        self.salesforce_page_size = 1000
        """Jobs a page of Salesforce's job list holds (1,000 upstream)."""
        self._shopify_checked = clock()

    def elapsed(self) -> float:
        return (self.clock() - self.start) * self.speed

    def wall_time(self, simulated: float) -> str:
        """RFC 3339 UTC of a simulated second, anchored at the simulator's start."""
        when = datetime.fromtimestamp(self.wall_start + simulated / self.speed, UTC)
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")

    def expire_tokens(self) -> None:
        self.tokens.clear()

    def add_elevate_import(self, import_id: str, script: Script) -> None:
        self.scenarios.elevate[import_id] = script

    def add_zilliant_import(self, import_id: str, script: Script) -> None:
        self.scenarios.zilliant[import_id] = script

    def rate_limited(self, route: str, client: str) -> float | None:
        """Rocket.Chat's default limit: N calls per 60 s per route and client.
        Returns the epoch second the window resets, if over the limit."""
        if self.rocketchat_rate_limit is None:
            return None
        now = time.time()
        calls = self._calls.setdefault((route, client), deque())
        while calls and calls[0] <= now - 60:
            calls.popleft()
        if len(calls) >= self.rocketchat_rate_limit:
            return calls[0] + 60
        calls.append(now)
        return None

    def shopify_spend(self, cost: float) -> dict[str, Any] | None:
        """Take a query's cost from the bucket; the throttleStatus when it
        does not hold enough (the query is throttled), else None."""
        if self.shopify_bucket is None:
            return None
        maximum, restore = self.shopify_bucket
        now = self.clock()
        self._shopify_points = min(
            maximum, self._shopify_points + (now - self._shopify_checked) * restore
        )
        self._shopify_checked = now
        status = {
            "maximumAvailable": maximum,
            "currentlyAvailable": int(self._shopify_points),
            "restoreRate": restore,
        }
        if self._shopify_points < cost:
            return status
        self._shopify_points -= cost
        return None


SIMULATOR = web.AppKey("simulator", Simulator)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        content_type=None,
        headers={"Content-Type": JSON_TYPE},
    )


async def _apply_fault(request: web.Request, fault: Fault) -> web.StreamResponse:
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.mode == "close":
        assert request.transport is not None
        request.transport.close()
        return web.Response()  # never reaches the client
    body = fault.body if fault.body is not None else b"{}"
    headers = {"Content-Type": JSON_TYPE, **fault.headers}
    status = fault.status or 200
    if fault.mode == "stream":
        response = web.StreamResponse(status=status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        view = memoryview(body)
        try:
            for start in range(0, len(view), STREAM_CHUNK):
                await response.write(view[start : start + STREAM_CHUNK])
            await response.write_eof()
        except ConnectionError:
            pass  # the client hung up (e.g. at its size cap)
        return response
    if fault.mode in ("reset", "drip"):
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        if fault.mode == "reset":
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        for i in range(len(body)):
            await response.write(body[i : i + 1])
            await asyncio.sleep(fault.drip_interval)
        await response.write_eof()
        return response
    return web.Response(status=status, body=body, headers=headers)


def _fault(request: web.Request, kind: str) -> Fault | None:
    sim = request.app[SIMULATOR]
    sim.counters[kind] += 1
    return sim.faults.get(kind)


PROXY_ERROR_PAGE = b"<html><body><h1>502 Bad Gateway</h1><p>upstream unavailable</p></body></html>"


def _unreadable(sim: Simulator, import_id: str) -> web.Response | None:
    """A proxy's error page for an unreadable import, with status 200 as some send it."""
    if import_id not in sim.scenarios.unreadable:
        return None
    return web.Response(body=PROXY_ERROR_PAGE, content_type="text/html")


# --- Elevate -----------------------------------------------------------------


async def elevate_status(request: web.Request) -> web.StreamResponse:
    fault = _fault(request, "elevate")
    if fault is not None:
        return await _apply_fault(request, fault)
    sim = request.app[SIMULATOR]
    if request.headers.get("Api-Key") != sim.credentials.elevate_api_key:
        return _json({"message": "Invalid API key"}, status=403)
    import_id = request.query.get("id")
    if not import_id:
        return _json({"message": "Missing required query parameter: id"}, status=400)
    if (broken := _unreadable(sim, import_id)) is not None:
        return broken
    reason: str | None = None
    if import_id.startswith("bench-"):
        status = "IN_PROGRESS"
    elif import_id.startswith("churn-"):
        # Benchmarks whose store must really write: the answer changes every
        # second (running, then waiting), at a different second for each id.
        status = ("IN_PROGRESS", "WAITING")[(int(sim.elapsed()) + hash(import_id)) % 2]
    elif import_id.startswith("coin-"):
        # Running or waiting at random, each answer: half the polls change
        # their import whatever the polling rate. (With churn-*, polls that
        # sweep 100,000 ids in about 9 s see a change on nearly every poll or
        # on nearly none, as the sweep's length drifts against the 2 s cycle.)
        status = ("IN_PROGRESS", "WAITING")[random.getrandbits(1)]
    else:
        script = sim.scenarios.elevate.get(import_id)
        elapsed = sim.elapsed()
        if script is None and import_id in sim.scenarios.walk_ins:
            script = sim.scenarios.walk_ins[import_id]
            elapsed -= sim.first_asked.setdefault(import_id, elapsed)
        moment = script.at(elapsed) if script else None
        status = moment.phase.status if moment else "NOT_FOUND"
        reason = moment.phase.reason if moment else None
    # The docs disagree on the id's type: v3 sends a string, v4 a number.
    answered: str | int = import_id
    if request.match_info["version"] == "v4" and import_id.isdigit():
        answered = int(import_id)
    response = _json({"id": answered, "reason": reason, "status": status})
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        response.enable_compression()
    return response


# --- Salesforce token and Zilliant --------------------------------------------


async def salesforce_token(request: web.Request) -> web.StreamResponse:
    fault = _fault(request, "token")
    if fault is not None:
        return await _apply_fault(request, fault)
    sim = request.app[SIMULATOR]
    form = await request.post()
    creds = sim.credentials
    grant = form.get("grant_type")
    if form.get("client_id") != creds.client_id or form.get("client_secret") != creds.client_secret:
        return _json(
            {"error": "invalid_client", "error_description": "invalid client credentials"}, 400
        )
    if grant == "password":
        if form.get("username") != creds.username or form.get("password") != creds.password:
            return _json(
                {"error": "invalid_grant", "error_description": "authentication failure"}, 400
            )
    elif grant != "client_credentials":
        return _json(
            {"error": "unsupported_grant_type", "error_description": "grant type not supported"},
            400,
        )
    token = "00D" + secrets.token_urlsafe(24)
    sim.tokens.add(token)
    host = request.host
    return _json(
        {
            "access_token": token,
            "instance_url": f"http://{host}",
            "id": f"http://{host}/id/00Dxx0000001gEREAY/005xx000001SwiUAAS",
            "token_type": "Bearer",
            "issued_at": str(int(time.time() * 1000)),
            "signature": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
    )


def _zilliant_token_ok(sim: Simulator, header: str) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme != "OAuth":
        return False
    try:
        token = json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return False
    return isinstance(token, dict) and token.get("access_token") in sim.tokens


async def zilliant_status(request: web.Request) -> web.StreamResponse:
    fault = _fault(request, "zilliant")
    if fault is not None:
        return await _apply_fault(request, fault)
    sim = request.app[SIMULATOR]
    if not _zilliant_token_ok(sim, request.headers.get("Authorization", "")):
        return _json({"message": "Unauthorized"}, status=401)
    if request.headers.get("X-Forwarded-Host") != sim.credentials.forwarded_host:
        return _json({"message": "Bad request: missing or unknown X-Forwarded-Host"}, status=400)
    import_id = request.match_info["import_id"]
    if (broken := _unreadable(sim, import_id)) is not None:
        return broken
    if import_id.startswith("bench-"):
        return _json(
            {
                "status": "RUNNING",
                "startDate": sim.wall_time(0),
                "clientErrorCallingService": False,
                "entityImportId": import_id,
            }
        )
    script = sim.scenarios.zilliant.get(import_id)
    moment = script.at(sim.elapsed()) if script else None
    if moment is None:
        return _json({"message": "Import ID not found."}, status=404)
    body: dict[str, Any] = {
        "status": moment.phase.status,
        "startDate": sim.wall_time(moment.started_at or 0.0),
        "clientErrorCallingService": False,
        "entityImportId": import_id,
    }
    if moment.ended_at is not None:
        body["stopDate"] = sim.wall_time(moment.ended_at)
    elif import_id in sim.scenarios.zilliant_stop_null:
        body["stopDate"] = None
    return _json(body)


# --- Salesforce Bulk API 2.0 ingest jobs -----------------------------------------

SALESFORCE_INVALID_SESSION = [
    {"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}
]
SALESFORCE_NOT_FOUND = [
    {"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}
]


def _salesforce_time(sim: Simulator, simulated: float) -> str:
    """Salesforce's form of a date: ``2024-05-01T10:00:00.000+0000``."""
    when = datetime.fromtimestamp(sim.wall_start + simulated / sim.speed, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.000+0000")


def _bearer_ok(sim: Simulator, request: web.Request) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme == "Bearer" and token in sim.tokens


async def salesforce_bulk_job(request: web.Request) -> web.StreamResponse:
    """``GET /services/data/vXX.X/jobs/ingest/{jobId}``: Get Information About
    an Ingest Job (JobInfo), with the documented 401 and 404 answers."""
    fault = _fault(request, "salesforce_bulk")
    if fault is not None:
        return await _apply_fault(request, fault)
    sim = request.app[SIMULATOR]
    if not _bearer_ok(sim, request):
        return _json(SALESFORCE_INVALID_SESSION, status=401)
    job_id = request.match_info["job_id"]
    body = _salesforce_job(sim, job_id, request.match_info["version"])
    if body is None:
        return _json(SALESFORCE_NOT_FOUND, status=404)
    return _json(body)


def _salesforce_job(sim: Simulator, job_id: str, version: str) -> dict[str, Any] | None:
    """A job's JobInfo now; None before it exists."""
    script = sim.scenarios.salesforce_bulk.get(job_id)
    moment = script.at(sim.elapsed()) if script else None
    if moment is None:
        return None
    body: dict[str, Any] = {
        "id": job_id,
        "operation": "upsert",
        "object": "Account",
        "createdById": "005xx000001SwiUAAS",
        "createdDate": _salesforce_time(sim, 0.0),
        "systemModstamp": _salesforce_time(sim, moment.phase.at),
        "state": moment.phase.status,
        "externalIdFieldName": "External_Id__c",
        "concurrencyMode": "Parallel",
        "contentType": "CSV",
        "apiVersion": float(version.lstrip("v")),
        "jobType": "V2Ingest",
        "lineEnding": "LF",
        "columnDelimiter": "COMMA",
        "numberRecordsProcessed": moment.completed,
        "numberRecordsFailed": moment.errors,
        "retries": 0,
        "totalProcessingTime": 0,
        "apiActiveProcessingTime": 0,
        "apexProcessingTime": 0,
    }
    if moment.phase.reason:
        body["errorMessage"] = moment.phase.reason
    return body


SALESFORCE_LIST_FIELDS = (
    "id",
    "operation",
    "object",
    "createdById",
    "createdDate",
    "systemModstamp",
    "state",
    "concurrencyMode",
    "contentType",
    "apiVersion",
    "jobType",
    "lineEnding",
    "columnDelimiter",
)


async def salesforce_bulk_jobs(request: web.Request) -> web.StreamResponse:
    """``GET /services/data/vXX.X/jobs/ingest``: Get Information About All
    Ingest Jobs, ``salesforce_page_size`` a page (1,000 upstream), paged by
    ``nextRecordsUrl`` (a ``queryLocator``) until ``done``."""
    fault = _fault(request, "salesforce_bulk")
    if fault is not None:
        return await _apply_fault(request, fault)
    sim = request.app[SIMULATOR]
    if not _bearer_ok(sim, request):
        return _json(SALESFORCE_INVALID_SESSION, status=401)
    version = request.match_info["version"]
    jobs = [
        job
        for job_id in sim.scenarios.salesforce_bulk
        if (job := _salesforce_job(sim, job_id, version)) is not None
    ]
    try:
        start = int(request.query.get("queryLocator", "0"))
    except ValueError:
        return _json([{"errorCode": "INVALID_QUERY_LOCATOR", "message": "invalid"}], 400)
    end = start + sim.salesforce_page_size
    body: dict[str, Any] = {
        "done": end >= len(jobs),
        "records": [{k: job[k] for k in SALESFORCE_LIST_FIELDS} for job in jobs[start:end]],
    }
    if end < len(jobs):
        body["nextRecordsUrl"] = f"/services/data/{version}/jobs/ingest?queryLocator={end}"
    return _json(body)


# --- Shopify Admin GraphQL: bulk operations -----------------------------------------

SHOPIFY_GID = "gid://shopify/BulkOperation/"
SHOPIFY_INVALID_TOKEN = (
    "[API] Invalid API key or access token (unrecognized login or wrong password)"
)
SHOPIFY_NODE_COST = 1
"""The calculated cost of a ``node(id:)`` query on a BulkOperation (an object: 1)."""


def _shopify_cost(throttle: dict[str, Any], actual: int | None) -> dict[str, Any]:
    return {
        "cost": {
            "requestedQueryCost": SHOPIFY_NODE_COST,
            "actualQueryCost": actual,
            "throttleStatus": throttle,
        }
    }


def _shopify_node(sim: Simulator, gid: str) -> dict[str, Any] | None:
    number = gid.removeprefix(SHOPIFY_GID) if gid.startswith(SHOPIFY_GID) else None
    script = sim.scenarios.shopify.get(number) if number else None
    moment = script.at(sim.elapsed()) if script else None
    if moment is None:
        return None
    status = moment.phase.status
    done = status == "COMPLETED" and moment.ended_at is not None
    return {
        "id": gid,
        "status": status,
        "errorCode": moment.phase.reason,
        "createdAt": sim.wall_time(0.0),
        "completedAt": sim.wall_time(moment.ended_at or 0.0) if done else None,
        "objectCount": str(moment.completed),  # UnsignedInt64: a string
        "rootObjectCount": str(moment.completed),
        "fileSize": str(moment.completed * 180) if done else None,
        "url": f"https://storage.googleapis.com/shopify-bulk/{number}.jsonl" if done else None,
        "partialDataUrl": None,
        "type": "QUERY",
    }


async def shopify_graphql(request: web.Request) -> web.StreamResponse:
    """``POST /admin/api/{version}/graphql.json`` answering a ``node(id:)``
    query on a BulkOperation: ``data.node`` (null for an unknown id), errors
    with 200 as GraphQL does, THROTTLED when the leaky bucket is empty."""
    fault = _fault(request, "shopify")
    if fault is not None:
        return await _apply_fault(request, fault)
    sim = request.app[SIMULATOR]
    if request.headers.get("X-Shopify-Access-Token") != sim.credentials.shopify_access_token:
        return _json({"errors": SHOPIFY_INVALID_TOKEN}, status=401)
    try:
        payload = await request.json()
    except ValueError:
        return _json({"errors": {"query": "Required parameter missing or invalid"}}, status=400)
    variables = payload.get("variables") if isinstance(payload, dict) else None
    gid = variables.get("id") if isinstance(variables, dict) else None
    if not isinstance(payload.get("query"), str) or not isinstance(gid, str):
        return _json(
            {"errors": [{"message": "Variable $id of type ID! was provided invalid value"}]}
        )
    throttled = sim.shopify_spend(SHOPIFY_NODE_COST)
    if throttled is not None:
        error = {
            "message": "Throttled",
            "extensions": {
                "code": "THROTTLED",
                "documentation": "https://shopify.dev/api/usage/rate-limits",
            },
        }
        return _json({"errors": [error], "extensions": _shopify_cost(throttled, None)})
    status = {"maximumAvailable": 2000.0, "currentlyAvailable": 1999, "restoreRate": 100.0}
    return _json(
        {
            "data": {"node": _shopify_node(sim, gid)},
            "extensions": _shopify_cost(status, SHOPIFY_NODE_COST),
        }
    )


# --- Rocket.Chat ---------------------------------------------------------------


def _rocketchat_auth(request: web.Request) -> web.Response | None:
    creds = request.app[SIMULATOR].credentials
    if (
        request.headers.get("X-User-Id") != creds.rocketchat_user_id
        or request.headers.get("X-Auth-Token") != creds.rocketchat_auth_token
    ):
        return _json({"success": False, "error": "You must be logged in to do this."}, status=401)
    return None


def _rate_limit(request: web.Request, route: str) -> web.Response | None:
    sim = request.app[SIMULATOR]
    reset = sim.rate_limited(route, request.remote or "")
    if reset is None:
        return None
    wait = max(1, round(reset - time.time()))
    response = _json(
        {
            "success": False,
            "error": "Error, too many requests. Please slow down. You must wait "
            f"{wait} seconds before trying this endpoint again. [error-too-many-requests]",
        },
        status=429,
    )
    response.headers["X-RateLimit-Limit"] = str(sim.rocketchat_rate_limit)
    response.headers["X-RateLimit-Remaining"] = "0"
    response.headers["X-RateLimit-Reset"] = str(int(reset * 1000))
    return response


def _rocketchat_moment(sim: Simulator) -> tuple[int, Any]:
    """(import number, moment) of the server's current import."""
    script = sim.scenarios.rocketchat
    if script is None:
        return 0, None
    elapsed = sim.elapsed()
    cycle = sim.scenarios.rocketchat_cycle
    number = 0
    if cycle and elapsed >= cycle:
        number = int(elapsed // cycle)
        elapsed -= number * cycle
    moment = script.at(elapsed)
    if moment is None and number > 0:
        # Between imports the server keeps answering with the last one.
        number -= 1
        moment = script.at(cycle or 0.0)
    return number, moment


NOT_FOUND_BODY = {
    "success": False,
    "error": "Import Operation Not Found [error-operation-not-found]",
    "errorType": "error-operation-not-found",
}


async def rocketchat_progress(request: web.Request) -> web.StreamResponse:
    fault = _fault(request, "rocketchat_progress")
    if fault is not None:
        return await _apply_fault(request, fault)
    denied = _rocketchat_auth(request) or _rate_limit(request, "getImportProgress")
    if denied is not None:
        return denied
    _, moment = _rocketchat_moment(request.app[SIMULATOR])
    if moment is None:
        return _json(NOT_FOUND_BODY, status=400)
    return _json(
        {
            "key": "slack",
            "name": "Slack",
            "step": moment.phase.status,
            "count": {
                "completed": moment.completed,
                "total": moment.phase.total,
                "error": moment.errors,
            },
            "success": True,
        }
    )


async def rocketchat_operation(request: web.Request) -> web.StreamResponse:
    fault = _fault(request, "rocketchat_operation")
    if fault is not None:
        return await _apply_fault(request, fault)
    denied = _rocketchat_auth(request) or _rate_limit(request, "getCurrentImportOperation")
    if denied is not None:
        return denied
    sim = request.app[SIMULATOR]
    number, moment = _rocketchat_moment(sim)
    if moment is None:
        return _json(NOT_FOUND_BODY, status=400)
    return _json(
        {
            "operation": {
                "_id": f"op{number:06d}",
                "type": "import",
                "importerKey": "slack",
                "ts": sim.wall_time(0),
                "status": moment.phase.status,
                "valid": True,
                "count": {"completed": moment.completed, "total": moment.phase.total},
            },
            "success": True,
        }
    )


# --- control -------------------------------------------------------------------


async def set_faults(request: web.Request) -> web.Response:
    """``POST /_simulator/faults {"elevate": {"status": 500}, ...}``; ``{}`` clears."""
    sim = request.app[SIMULATOR]
    data = await request.json()
    sim.faults = {kind: Fault.from_json(spec) for kind, spec in data.items() if kind in KINDS}
    return _json({"faults": sorted(sim.faults)})


async def get_counters(request: web.Request) -> web.Response:
    return _json(dict(request.app[SIMULATOR].counters))


def create_app(simulator: Simulator | None = None) -> web.Application:
    app = web.Application()
    app[SIMULATOR] = simulator or Simulator()
    app.router.add_get("/api/admin/{version:v3|v4}/import/status", elevate_status)
    app.router.add_post("/services/oauth2/token", salesforce_token)
    app.router.add_get("/v1/EntityImport/{import_id}/status", zilliant_status)
    app.router.add_get("/api/v1/getImportProgress", rocketchat_progress)
    app.router.add_get("/api/v1/getCurrentImportOperation", rocketchat_operation)
    app.router.add_get(
        r"/services/data/{version:v\d+\.\d}/jobs/ingest/{job_id}", salesforce_bulk_job
    )
    app.router.add_get(r"/services/data/{version:v\d+\.\d}/jobs/ingest", salesforce_bulk_jobs)
    app.router.add_post(r"/admin/api/{version:[\w-]+}/graphql.json", shopify_graphql)
    app.router.add_post("/_simulator/faults", set_faults)
    app.router.add_get("/_simulator/counters", get_counters)
    return app
