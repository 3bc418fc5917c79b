"""The normalized vocabulary shared by sources, poller, state and readers.

Nothing here knows any upstream wire format: each source module turns its
API's answer into an :class:`Observation` or raises a :class:`SourceError`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class State(StrEnum):
    """Normalized import states; every import is exactly one of these."""

    WAITING = "waiting"
    BLOCKED = "blocked"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    NOT_FOUND = "not_found"
    UNKNOWN = "unknown"


TERMINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.ABORTED})


class Origin(StrEnum):
    """Who asked the exporter to watch an import (the ``origin`` label)."""

    CONFIG = "config"
    """Listed in the config file: watched while it is listed."""
    API = "api"
    """Registered through the API: kept across restarts, forgotten after ``retention``."""
    DISCOVERED = "discovered"
    """Found by a source's discovery (its list of jobs): kept across restarts,
    forgotten after ``retention``, as registered ones."""


PENDING = "pending"
"""What an import is before any poll has answered about it (never read yet):
shown on the page and exported as ``import_state{state="pending"}``, so a
tracked import always has series."""


class ErrorReason(StrEnum):
    """The fixed, bounded set of reasons an upstream request can fail for.

    They become the ``reason`` label of ``import_source_errors_total``, so the
    set must stay small and fixed; details go to logs and pages.
    """

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    CLIENT_ERROR = "client_error"
    INVALID_RESPONSE = "invalid_response"
    TOO_LARGE = "too_large"


class Observation(NamedTuple):
    """One upstream answer about one import, normalized.

    ``started_at``/``ended_at`` are epoch seconds reported by the upstream
    (None where the upstream does not report them). Counts are None where the
    upstream does not report them. A NamedTuple, not a frozen dataclass: one
    is made per poll, and it is immutable all the same at a third of the cost.
    """

    state: State
    upstream_state: str
    step: str | None = None
    reason: str | None = None
    items_completed: int | None = None
    items_expected: int | None = None
    items_failed: int | None = None
    started_at: float | None = None
    ended_at: float | None = None


class SourceError(Exception):
    """A poll that did not produce an observation.

    ``retry_after`` is how many seconds from now the upstream asked us to wait
    (Retry-After, X-RateLimit-Reset), if it said so.

    ``source_wide`` says the failure is about the source, not this import: its
    credentials were refused or its URL answers for no import (a route 404).
    The poller then holds the whole source and shows the error on every one of
    its imports, instead of repeating the same failing call once per import.
    """

    def __init__(
        self,
        reason: ErrorReason,
        message: str,
        retry_after: float | None = None,
        *,
        source_wide: bool = False,
    ):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.source_wide = source_wide

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


class ParseError(SourceError):
    """The upstream answered, but not in a shape we understand.

    The only exception a source's response parser may raise.
    """

    def __init__(self, message: str):
        super().__init__(ErrorReason.INVALID_RESPONSE, message)
