"""Voyado Elevate / Apptus eSales: ``GET /api/admin/{v3|v4}/import/status?id=ID``."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import aiohttp
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from yarl import URL

from exporter.config import HttpUrl, WithImports
from exporter.model import ErrorReason, Observation, ParseError, SourceError, State
from exporter.sources.base import (
    HttpResponse,
    Source,
    SourceHooks,
    error_for_status,
    parse_json,
    upstream_text,
)


class ElevateConfig(WithImports):
    SECRETS: ClassVar[dict[str, bool]] = {"api_key": True}

    type: Literal["elevate"]
    url: HttpUrl | None = None
    cluster_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$")
    api_version: Literal["v3", "v4"] = "v4"
    """v3 reaches its end of life on 2026-12-31 (Voyado): v4 by default."""
    api_key: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None

    @model_validator(mode="after")
    def _url_or_cluster(self) -> ElevateConfig:
        if (self.url is None) == (self.cluster_id is None):
            raise PydanticCustomError("url", "give exactly one of url and cluster_id")
        return self

    def deprecations(self) -> list[str]:
        if self.api_version == "v3":
            return [
                "api_version v3: Voyado's admin import API v3 reaches its end of life on "
                "2026-12-31; set api_version: v4 (the default)"
            ]
        return []

    @property
    def base_url(self) -> str:
        if self.url is not None:
            return self.url
        return f"https://{self.cluster_id}.elevate-api.cloud"


STATUS_MAP = {
    "WAITING": State.WAITING,
    "BLOCKED": State.BLOCKED,
    "IN_PROGRESS": State.RUNNING,
    "SUCCESS": State.SUCCEEDED,
    "FAILURE": State.FAILED,
    "ABORTED": State.ABORTED,
    "NOT_FOUND": State.NOT_FOUND,
}


KNOWN_ANSWERS = {
    status: Observation(state=state, upstream_state=status) for status, state in STATUS_MAP.items()
}
"""The observation of each documented status without a reason: nearly every
answer, made once (an answer has no counts or times, so nothing else is in
it), and shared, so the state sees the same answer as the same object."""


def parse_status(response: HttpResponse, import_id: str) -> Observation:
    """Turn one import-status answer into an observation (or raise SourceError)."""
    if response.status == 200:
        body: Any = parse_json(response.body)
        # Nearly every answer: a documented status of this import, no reason.
        if type(body) is dict and body.get("id") == import_id and body.get("reason") is None:
            status = body.get("status")
            if type(status) is str and (known := KNOWN_ANSWERS.get(status)) is not None:
                return known
        return _observation(body, import_id)
    if response.status == 404:
        # Elevate documents 404 as "Cluster not found": the URL or cluster id
        # is wrong, which says nothing about the import itself (an unknown
        # import is a 200 with status NOT_FOUND).
        raise SourceError(
            ErrorReason.CLIENT_ERROR,
            "import/status: HTTP 404 (cluster not found: endpoint not found, check url "
            "or cluster_id)",
            source_wide=True,
        )
    if response.status == 403:
        raise SourceError(
            ErrorReason.UNAUTHORIZED, "import/status: HTTP 403 (bad API key)", source_wide=True
        )
    raise error_for_status(response, "import/status")


def _observation(body: Any, import_id: str) -> Observation:
    """An answer's observation, every field checked."""
    if not isinstance(body, dict):
        raise ParseError("import/status: body is not a JSON object")
    status = body.get("status")
    if not isinstance(status, str):
        raise ParseError("import/status: no status string in the answer")
    answered_id = body.get("id")
    # The id is a string in one doc version and a JSON number in another.
    if answered_id is not None and not isinstance(answered_id, bool):
        if isinstance(answered_id, str | int) and str(answered_id) != import_id:
            raise ParseError(
                f"import/status: answer is about import {upstream_text(str(answered_id), 40)!r}"
            )
        if not isinstance(answered_id, str | int):
            raise ParseError("import/status: id is neither a string nor an integer")
    reason = body.get("reason")
    if reason is None and (known := KNOWN_ANSWERS.get(status)) is not None:
        return known
    if reason is not None and not isinstance(reason, str):
        raise ParseError("import/status: reason is neither a string nor null")
    return Observation(
        state=STATUS_MAP.get(status, State.UNKNOWN),
        upstream_state=upstream_text(status, 100, STATUS_MAP),
        reason=upstream_text(reason, 1000) if reason else None,
    )


class ElevateSource(Source[ElevateConfig]):
    system = "elevate"
    config_model = ElevateConfig

    def __init__(
        self,
        config: ElevateConfig,
        session: aiohttp.ClientSession,
        hooks: SourceHooks | None = None,
    ) -> None:
        super().__init__(config, session, hooks)
        self.url = f"{config.base_url}/api/admin/{config.api_version}/import/status"
        api_key = config.secret("api_key")
        assert api_key is not None  # required; resolved when the config loaded
        self.headers = {
            "Api-Key": api_key,
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
        }

    def build_import_url(self, import_id: str) -> URL:
        return URL(self.url).with_query(id=import_id)

    async def poll(self, import_id: str) -> Observation:
        response = await self.request("GET", self.import_url(import_id), headers=self.headers)
        return parse_status(response, import_id)
