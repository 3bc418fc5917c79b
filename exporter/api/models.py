"""The API's models: they validate requests, shape answers, and are the
OpenAPI document's schemas, so the document cannot drift from the handlers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from exporter.api.constants import DEFAULT_PAGE, MAX_PAGE
from exporter.config import DisplayName, ImportId
from exporter.config.base import IMPORT_ID_PATTERN, SOURCE_NAME_PATTERN
from exporter.model import ErrorReason, Origin, State
from exporter.state import ImportRecord

# --- models: they validate, serialize, and are the OpenAPI schemas -----------


class _DocumentImportId:
    """Completes the JSON schema of an ``ImportId``: its pattern, and (in a
    body) that a JSON integer is accepted and taken as its decimal string."""

    def __init__(self, *, or_integer: bool) -> None:
        self.or_integer = or_integer

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = dict(handler(core_schema))
        schema.setdefault("pattern", IMPORT_ID_PATTERN)
        if self.or_integer:
            return {"anyOf": [schema, {"type": "integer"}]}
        return schema


SourceName = Annotated[str, Field(min_length=1, max_length=100, pattern=SOURCE_NAME_PATTERN)]
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
        # A cursor is base64url of a source name and an id (at most ~420 characters).
        max_length=600,
        pattern=r"^[A-Za-z0-9_-]+$",
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
    origin: Origin = Field(
        description="listed in the config file, registered through this API, or found by "
        "the source's discovery"
    )
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
