"""Zilliant Entity Import: ``GET /v1/EntityImport/{importId}/status``.

Authorization is ``OAuth <base64 of the whole Salesforce token JSON>``. The
token comes from the config as is, or from the Salesforce token endpoint,
which the exporter calls itself, caches, and calls again once on a 401.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from exporter.config import SalesforceConfig, ZilliantConfig
from exporter.model import ErrorReason, Observation, ParseError, SourceError, State
from exporter.redact import register_secret
from exporter.sources.base import (
    HttpResponse,
    ImportSpec,
    RequestObserver,
    Source,
    error_for_status,
    parse_json,
    upstream_text,
)

log = logging.getLogger(__name__)

STATUS_MAP = {
    "RUNNING": State.RUNNING,
    "SUCCEEDED": State.SUCCEEDED,
    "FAILED": State.FAILED,
}


def parse_date(value: Any, field: str) -> float | None:
    """RFC 3339 UTC (``2021-09-28T13:09:25Z``) to epoch seconds; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParseError(f"EntityImport status: {field} is not a string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ParseError(f"EntityImport status: {field} is not an RFC 3339 date") from exc
    if parsed.tzinfo is None:
        raise ParseError(f"EntityImport status: {field} has no time zone")
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError) as exc:
        raise ParseError(f"EntityImport status: {field} is out of range") from exc


def parse_status(response: HttpResponse) -> Observation:
    """Turn one status answer into an observation (or raise SourceError)."""
    if response.status == 404:
        # "Import ID not found" is an answer about the import, not a failure.
        return Observation(state=State.NOT_FOUND, upstream_state="NOT_FOUND")
    if response.status == 401:
        raise SourceError(
            ErrorReason.UNAUTHORIZED, "EntityImport status: HTTP 401 (token rejected)"
        )
    if response.status != 200:
        raise error_for_status(response, "EntityImport status")
    body: Any = parse_json(response.body)
    if not isinstance(body, dict):
        raise ParseError("EntityImport status: body is not a JSON object")
    status = body.get("status")
    if not isinstance(status, str):
        raise ParseError("EntityImport status: no status string in the answer")
    started = parse_date(body.get("startDate"), "startDate")
    stopped = parse_date(body.get("stopDate"), "stopDate")
    client_error = body.get("clientErrorCallingService")
    if client_error is not None and not isinstance(client_error, bool):
        raise ParseError("EntityImport status: clientErrorCallingService is not a boolean")
    return Observation(
        state=STATUS_MAP.get(status, State.UNKNOWN),
        upstream_state=upstream_text(status, 100, STATUS_MAP),
        reason="client error calling service" if client_error else None,
        started_at=started,
        ended_at=stopped,
    )


def parse_token(response: HttpResponse) -> str:
    """Check a Salesforce token answer; return its raw JSON text."""
    if response.status in (400, 401, 403):
        error = ""
        try:
            body = parse_json(response.body)
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                error = f" ({upstream_text(body['error'], 60)})"
        except ParseError:
            pass
        raise SourceError(
            ErrorReason.UNAUTHORIZED, f"Salesforce token: HTTP {response.status}{error}"
        )
    if response.status != 200:
        raise error_for_status(response, "Salesforce token")
    try:
        body = parse_json(response.body)
    except ParseError as exc:
        raise ParseError(f"Salesforce token: {exc.message}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise ParseError("Salesforce token: answer has no access_token")
    try:
        return response.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError("Salesforce token: answer is not UTF-8") from exc


class ZilliantSource(Source):
    system = "zilliant"

    def __init__(
        self,
        config: ZilliantConfig,
        session: aiohttp.ClientSession,
        observe: RequestObserver | None = None,
    ) -> None:
        super().__init__(
            config.name,
            session,
            timeout=config.timeout,
            max_bytes=config.max_response_bytes,
            observe=observe,
        )
        self.config = config
        self.salesforce: SalesforceConfig | None = config.salesforce
        self._authorization: str | None = None
        static = config.secret("token_json")
        if static is not None:
            self._authorization = self._encode(static, fetched=False)
        self._token_lock = asyncio.Lock()
        self.token_requests = 0

    @staticmethod
    def _encode(token_json: str, *, fetched: bool) -> str:
        # The token JSON, its access token and the header's base64 form are all
        # secrets: an upstream may echo any of them back. Fetched ones give way
        # to newer ones in time; a configured one is kept.
        register_secret(token_json, transient=fetched)
        with contextlib.suppress(ValueError, RecursionError):
            parsed = json.loads(token_json)
            if isinstance(parsed, dict) and isinstance(parsed.get("access_token"), str):
                register_secret(parsed["access_token"], transient=fetched)
        encoded = base64.b64encode(token_json.encode("utf-8")).decode("ascii")
        register_secret(encoded, transient=fetched)
        return f"OAuth {encoded}"

    def imports(self) -> list[ImportSpec]:
        return [ImportSpec(entry.id, entry.name) for entry in self.config.imports]

    async def _fetch_token(self, rejected: str | None) -> str:
        """A fresh Authorization value; concurrent callers share one fetch."""
        async with self._token_lock:
            if self._authorization is not None and self._authorization != rejected:
                return self._authorization  # someone else refreshed meanwhile
            sf = self.salesforce
            assert sf is not None
            form = {"grant_type": sf.grant_type, "client_id": sf.client_id}
            form["client_secret"] = sf.secret("client_secret") or ""
            if sf.grant_type == "password":
                form["username"] = sf.username or ""
                form["password"] = sf.secret("password") or ""
            self.token_requests += 1
            try:
                response = await self.request(
                    "POST", sf.token_url, data=form, headers={"Accept": "application/json"}
                )
            except SourceError as exc:
                # Say which endpoint failed: the status endpoint may be fine.
                raise SourceError(
                    exc.reason, f"Salesforce token: {exc.message}", exc.retry_after
                ) from exc
            token_json = parse_token(response)
            self._authorization = self._encode(token_json, fetched=True)
            log.info("source=%s fetched a new Salesforce token", self.name)
            return self._authorization

    def build_import_url(self, import_id: str) -> URL:
        return URL(f"{self.config.url}/v1/EntityImport/{quote(import_id, safe='')}/status")

    async def poll(self, import_id: str) -> Observation:
        url = self.import_url(import_id)
        authorization = self._authorization
        if authorization is None:
            authorization = await self._fetch_token(None)
        response = await self._get(url, authorization)
        if response.status == 401 and self.salesforce is not None:
            # Salesforce tokens carry no expiry: a 401 is how expiry shows.
            authorization = await self._fetch_token(authorization)
            response = await self._get(url, authorization)
        return parse_status(response)

    async def _get(self, url: URL, authorization: str) -> HttpResponse:
        return await self.request(
            "GET",
            url,
            headers={
                "Authorization": authorization,
                "X-Forwarded-Host": self.config.forwarded_host,
                "Accept": "application/json",
            },
        )
