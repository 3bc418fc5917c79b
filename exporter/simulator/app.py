"""An aiohttp app that answers like the three upstream APIs and a Salesforce
token endpoint, playing back scripted imports, with fault injection.

It is a fake of the vendors' servers: it imports nothing from the exporter.
Over 400 lines because the three fakes share their fault injection, rate
limits and scripts; one file keeps the fake readable end to end.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
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
KINDS = ("elevate", "zilliant", "token", "rocketchat_progress", "rocketchat_operation")


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
    app.router.add_post("/_simulator/faults", set_faults)
    app.router.add_get("/_simulator/counters", get_counters)
    return app
