"""Zilliant Entity Import: ``GET /v1/EntityImport/{importId}/status``.

Authorization is ``OAuth <base64 of the whole Salesforce token JSON>``. The
token comes from the config as is, or from the Salesforce token endpoint,
which the exporter calls itself, caches, and calls again once on a 401.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import aiohttp
from pydantic import Field
from yarl import URL

from exporter.config import HttpUrl, SecretHolder, WithImports
from exporter.logs import context
from exporter.model import ErrorReason, Observation, ParseError, SourceError, State
from exporter.redact import register_secret
from exporter.sources.base import (
    HttpResponse,
    SharedToken,
    Source,
    SourceHooks,
    error_for_status,
    parse_json,
    upstream_text,
)

log = logging.getLogger(__name__)


class SalesforceConfig(SecretHolder):
    SECRETS: ClassVar[dict[str, bool]] = {"client_secret": False, "password": False}

    token_url: HttpUrl = "https://login.salesforce.com/services/oauth2/token"
    grant_type: Literal["password", "client_credentials"] = "password"
    client_id: str = Field(min_length=1)
    client_secret: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    username: str | None = None
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        if self.grant_type == "password":
            if not self.username:
                yield "username", "required for grant_type password"
            if self.given_field("password") is None:
                yield "password", "required for grant_type password (or password_env/password_file)"
        if self.given_field("client_secret") is None:
            yield "client_secret", "required (or client_secret_env/client_secret_file)"


class ZilliantConfig(WithImports):
    SECRETS: ClassVar[dict[str, bool]] = {"token_json": False}

    type: Literal["zilliant"]
    url: HttpUrl
    forwarded_host: str = Field(min_length=1)
    token_json: str | None = None
    token_json_env: str | None = None
    token_json_file: str | None = None
    salesforce: SalesforceConfig | None = None

    def secret_holders(self) -> Iterator[tuple[str, SecretHolder]]:
        yield "", self
        if self.salesforce is not None:
            yield "salesforce", self.salesforce

    def check(self) -> Iterator[tuple[str, str]]:
        if (self.given_field("token_json") is not None) == (self.salesforce is not None):
            yield "", "give exactly one of token_json (or token_json_env/_file) and salesforce"
        static = self.secret("token_json")
        if static is not None:
            try:
                parsed = json.loads(static)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict) or "access_token" not in parsed:
                yield (
                    self.given_field("token_json") or "token_json",
                    "must hold the Salesforce token response (a JSON object with access_token)",
                )
        if self.salesforce is not None:
            for field, problem in self.salesforce.check():
                yield f"salesforce.{field}", problem


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


NOT_FOUND_MESSAGE = re.compile(r"\bimport\b.*\bnot found\b", re.IGNORECASE)
"""The documented 404 answer is "Import ID not found."."""


def is_import_not_found(response: HttpResponse, import_id: str) -> bool:
    """A 404 is about the import only when its body is the API's JSON about
    it: an object naming the import (``entityImportId``) or saying "Import ID
    not found". A proxy's page, a plain-text 404 or JSON about something else
    (an unknown tenant) means the URL is wrong, not that the import is gone."""
    try:
        body = parse_json(response.body)
    except ParseError:
        return False
    if not isinstance(body, dict):
        return False
    if body.get("entityImportId") == import_id:
        return True
    return any(isinstance(v, str) and NOT_FOUND_MESSAGE.search(v) for v in body.values())


def parse_status(response: HttpResponse, import_id: str) -> Observation:
    """Turn one status answer into an observation (or raise SourceError)."""
    if response.status == 404:
        if is_import_not_found(response, import_id):
            return Observation(state=State.NOT_FOUND, upstream_state="NOT_FOUND")
        raise SourceError(
            ErrorReason.CLIENT_ERROR,
            "EntityImport status: HTTP 404 that is not the API's 'Import ID not found' "
            "(endpoint not found, check url)",
            source_wide=True,
        )
    if response.status == 401:
        raise SourceError(
            ErrorReason.UNAUTHORIZED,
            "EntityImport status: HTTP 401 (token rejected)",
            source_wide=True,
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
    """Check a Salesforce token answer; return its raw JSON text.

    A 400, 401 or 403 (``invalid_grant``, ``invalid_client``: wrong
    credentials, not a passing fault) raises reason ``unauthorized``."""
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


class ZilliantSource(Source[ZilliantConfig]):
    system = "zilliant"
    config_model = ZilliantConfig

    def __init__(
        self,
        config: ZilliantConfig,
        session: aiohttp.ClientSession,
        hooks: SourceHooks | None = None,
    ) -> None:
        super().__init__(config, session, hooks)
        self.salesforce: SalesforceConfig | None = config.salesforce
        self.fetches_tokens = config.salesforce is not None
        self.token = SharedToken(self._login)
        static = config.secret("token_json")
        if static is not None:
            self.token.keep(self._encode(static, fetched=False))

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

    async def _login(self) -> tuple[str, None]:
        """A new Authorization value (Salesforce tokens carry no expiry: a 401
        is how expiry shows)."""
        authorization = self._encode(await self._fetch_token(), fetched=True)
        log.info("fetched a new Salesforce token", extra=context(source=self.name))
        return authorization, None

    async def _fetch_token(self) -> str:
        """One call of the token endpoint. Any failure is source-wide: it holds
        the source, and refused credentials hold it for ``max_backoff``
        (Salesforce locks a user out after repeated failed logins)."""
        sf = self.salesforce
        assert sf is not None
        form = {"grant_type": sf.grant_type, "client_id": sf.client_id}
        form["client_secret"] = sf.secret("client_secret") or ""
        if sf.grant_type == "password":
            form["username"] = sf.username or ""
            form["password"] = sf.secret("password") or ""
        try:
            response = await self.request(
                "POST", sf.token_url, data=form, headers={"Accept": "application/json"}
            )
            token_json = parse_token(response)
        except SourceError as exc:
            self._count_token(exc.reason.value)
            refused = exc.reason is ErrorReason.UNAUTHORIZED
            hold = max(self.config.max_backoff, self.config.interval) if refused else None
            message = exc.message
            if not message.startswith("Salesforce token"):
                # Say which endpoint failed: the status endpoint may be fine.
                message = f"Salesforce token: {message}"
            raise SourceError(
                exc.reason,
                message,
                hold if hold is not None else exc.retry_after,
                source_wide=True,
            ) from exc
        self._count_token("success")
        return token_json

    def _count_token(self, outcome: str) -> None:
        if self.hooks.token is not None:
            self.hooks.token(outcome)

    def build_import_url(self, import_id: str) -> URL:
        return URL(f"{self.config.url}/v1/EntityImport/{quote(import_id, safe='')}/status")

    async def poll(self, import_id: str) -> Observation:
        url = self.import_url(import_id)
        authorization = self.token.current() or await self.token.get()
        response = await self._get(url, authorization)
        if response.status == 401 and self.salesforce is not None:
            # Salesforce tokens carry no expiry: a 401 is how expiry shows. A
            # rejected token is never sent again.
            self.token.forget(authorization)
            authorization = await self.token.get(authorization)
            response = await self._get(url, authorization)
            if response.status == 401:
                self.token.forget(authorization)
        return parse_status(response, import_id)

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
