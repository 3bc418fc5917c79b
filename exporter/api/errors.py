"""Refusals as JSON ``{error, field}``, and the one map from a domain refusal
to an HTTP status."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from exporter.api.constants import MAX_PAGE, NAME_RULE, SOURCE_RULE
from exporter.api.models import ErrorBody
from exporter.config import ID_RULE
from exporter.model import State
from exporter.tracking import Refusal, TrackingError

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


def first_problem(exc: ValidationError, kind_of_field: str = "field") -> ApiError:
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


REFUSAL_STATUS = {
    Refusal.UNKNOWN_SOURCE: 404,
    Refusal.NOT_TRACKED: 404,
    Refusal.TAKES_NO_IDS: 400,
    Refusal.LIMIT_REACHED: 409,
    Refusal.LISTED_IN_CONFIG: 409,
    Refusal.NOT_STORED: 503,
    Refusal.OTHER_SHARD: 421,  # Misdirected Request: the message names the owner
}
"""The one place a domain refusal becomes an HTTP status."""


def tracking_error(exc: TrackingError) -> ApiError:
    return ApiError(REFUSAL_STATUS[exc.refusal], exc.message, exc.field)
