"""Rocket.Chat: ``GET /api/v1/getImportProgress`` (one import at a time per server).

The target is the server, not an import id. Where the token may call
``getCurrentImportOperation``, its ``valid: false`` (the record a server
restart leaves behind) reports the import as failed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any, ClassVar, Literal

import aiohttp
from pydantic import Field

from exporter.config import HttpUrl, SourceConfig
from exporter.logs import context
from exporter.model import ErrorReason, Observation, ParseError, SourceError, State
from exporter.sources.base import (
    MAX_COUNT,
    HttpResponse,
    ImportSpec,
    Source,
    SourceHooks,
    error_for_status,
    parse_json,
    retry_after_seconds,
    upstream_text,
    wait_seconds,
)

log = logging.getLogger(__name__)


class RocketChatConfig(SourceConfig):
    SECRETS: ClassVar[dict[str, bool]] = {"auth_token": True}

    type: Literal["rocketchat"]
    url: HttpUrl
    user_id: str = Field(min_length=1)
    auth_token: str | None = None
    auth_token_env: str | None = None
    auth_token_file: str | None = None
    check_operation: bool = True
    """Also ask getCurrentImportOperation, whose ``valid: false`` marks a dead import."""

    @property
    def server(self) -> str:
        """The import label of a Rocket.Chat source: the server it watches."""
        return re.sub(r"^https?://", "", self.url)


WAITING_STEPS = frozenset(
    {
        "importer_new",
        "importer_uploading",
        "importer_downloading_file",
        "importer_file_loaded",
        # Idle until an operator picks what to import.
        "importer_user_selection",
    }
)
RUNNING_STEPS = frozenset(
    {
        "importer_preparing_started",
        "importer_preparing_users",
        "importer_preparing_channels",
        "importer_preparing_messages",
        "importer_preparing_contacts",
        "importer_importing_started",
        "importer_importing_users",
        "importer_importing_channels",
        "importer_importing_messages",
        "importer_importing_contacts",
        "importer_importing_files",
        "importer_finishing",
    }
)
FINAL_STEPS = {
    "importer_done": State.SUCCEEDED,
    "importer_import_failed": State.FAILED,
    "importer_import_cancelled": State.ABORTED,
}
NO_IMPORT = "no_import"
INVALID_REASON = "import operation marked invalid (server restarted during the import?)"


KNOWN_STEPS = WAITING_STEPS | RUNNING_STEPS | FINAL_STEPS.keys()


def state_of_step(step: str) -> State:
    if step in WAITING_STEPS:
        return State.WAITING
    if step in RUNNING_STEPS:
        return State.RUNNING
    return FINAL_STEPS.get(step, State.UNKNOWN)


def _error_text(body: bytes) -> str:
    try:
        parsed = parse_json(body)
    except ParseError:
        return ""
    if not isinstance(parsed, dict):
        return ""
    for key in ("errorType", "error", "message"):
        value = parsed.get(key)
        if isinstance(value, str):
            return value
    return ""


def _count(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ParseError(f"getImportProgress: {field} is not a count")
    return value


def rate_limit_error(response: HttpResponse, what: str, now: float | None = None) -> SourceError:
    """A 429, with how long to wait from X-RateLimit-Reset (epoch ms) or Retry-After."""
    wait = retry_after_seconds(response.headers.get("Retry-After"))
    reset = response.headers.get("X-RateLimit-Reset")
    if reset is not None:
        with contextlib.suppress(ValueError):
            wait = wait_seconds(float(reset) / 1000 - (time.time() if now is None else now))
    return SourceError(ErrorReason.RATE_LIMITED, f"{what}: HTTP 429 (rate limited)", wait)


_PROGRESS_REFUSALS = {
    401: SourceError(
        ErrorReason.UNAUTHORIZED, "getImportProgress: HTTP 401 (not logged in)", source_wide=True
    ),
    403: SourceError(
        ErrorReason.UNAUTHORIZED,
        "getImportProgress: HTTP 403 (user lacks run-import)",
        source_wide=True,
    ),
    # The route exists on every Rocket.Chat server: a 404 is a wrong URL.
    404: SourceError(
        ErrorReason.CLIENT_ERROR,
        "getImportProgress: HTTP 404 (endpoint not found, check url)",
        source_wide=True,
    ),
}
"""Answers about the source, not the import: the same for every poll."""


def _progress_error(response: HttpResponse) -> Observation:
    """A getImportProgress answer that is not a 200: "no import" or an error."""
    if response.status == 400:
        text = _error_text(response.body)
        if "error-operation-not-found" in text:
            # The server has never imported anything: an answer, not a failure.
            return Observation(state=State.NOT_FOUND, upstream_state=NO_IMPORT)
        raise SourceError(ErrorReason.CLIENT_ERROR, "getImportProgress: HTTP 400")
    refusal = _PROGRESS_REFUSALS.get(response.status)
    if refusal is not None:
        raise SourceError(refusal.reason, refusal.message, source_wide=True)
    if response.status == 429:
        raise rate_limit_error(response, "getImportProgress")
    raise error_for_status(response, "getImportProgress")


def parse_progress(response: HttpResponse) -> Observation:
    """Turn one getImportProgress answer into an observation (or raise SourceError)."""
    if response.status != 200:
        return _progress_error(response)
    body: Any = parse_json(response.body)
    if not isinstance(body, dict):
        raise ParseError("getImportProgress: body is not a JSON object")
    if body.get("success") is False:
        raise ParseError("getImportProgress: answer says success: false")
    step = body.get("step")
    if not isinstance(step, str):
        raise ParseError("getImportProgress: no step string in the answer")
    count = body.get("count")
    if count is None:
        count = {}
    if not isinstance(count, dict):
        raise ParseError("getImportProgress: count is not an object")
    return Observation(
        state=state_of_step(step),
        upstream_state=upstream_text(step, 100, KNOWN_STEPS),
        step=upstream_text(step, 100, KNOWN_STEPS),
        items_completed=_count(count.get("completed"), "count.completed"),
        items_expected=_count(count.get("total"), "count.total"),
        items_failed=_count(count.get("error"), "count.error"),
    )


def parse_operation_valid(response: HttpResponse) -> bool | None:
    """``operation.valid`` of getCurrentImportOperation; None when it does not say."""
    if response.status != 200:
        return None
    try:
        body = parse_json(response.body)
    except ParseError:
        return None
    if not isinstance(body, dict):
        return None
    operation = body.get("operation")
    if not isinstance(operation, dict):
        return None
    valid = operation.get("valid")
    return valid if isinstance(valid, bool) else None


class RocketChatSource(Source[RocketChatConfig]):
    system = "rocketchat"
    config_model = RocketChatConfig
    follows_server = True

    def __init__(
        self,
        config: RocketChatConfig,
        session: aiohttp.ClientSession,
        hooks: SourceHooks | None = None,
    ) -> None:
        super().__init__(config, session, hooks)
        token = config.secret("auth_token")
        assert token is not None  # required; resolved when the config loaded
        self.headers = {
            "X-User-Id": config.user_id,
            "X-Auth-Token": token,
            "Accept": "application/json",
        }
        self.check_operation = config.check_operation

    def imports(self) -> list[ImportSpec]:
        return [ImportSpec(self.config.server)]

    async def poll(self, import_id: str) -> Observation:  # noqa: ARG002 (one server, one import)
        response = await self.request(
            "GET", f"{self.config.url}/api/v1/getImportProgress", headers=self.headers
        )
        observation = parse_progress(response)
        unfinished = observation.state in (State.WAITING, State.RUNNING)
        if self.check_operation and unfinished and await self._operation_is_dead():
            return observation._replace(state=State.FAILED, reason=INVALID_REASON)
        return observation

    async def _operation_is_dead(self) -> bool:
        try:
            response = await self.request(
                "GET", f"{self.config.url}/api/v1/getCurrentImportOperation", headers=self.headers
            )
        except SourceError:
            return False  # the progress answer stands on its own
        if response.status == 403:
            self.check_operation = False
            log.info(
                "no permission for getCurrentImportOperation; "
                "dead imports will show as stuck instead of failed",
                extra=context(source=self.name),
            )
            return False
        return parse_operation_valid(response) is False
