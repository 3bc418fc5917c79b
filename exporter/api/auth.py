"""Bearer tokens for writes, compared in constant time; a valid token also
passes the basic auth of ``--web.config.file`` under ``/api/``."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable

from aiohttp import web

from exporter.api.constants import API_OFF, REALM
from exporter.api.errors import ApiError
from exporter.tracking import ImportTracker

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


def require_writer(request: web.Request, tracker: ImportTracker) -> None:
    tokens = tracker.api_tokens
    if not tokens:
        raise ApiError(403, API_OFF)
    presented = _bearer(request)
    if presented is None:
        raise ApiError(
            401,
            "this call needs Authorization: Bearer <token> (a token of api.tokens_file)",
            headers={"WWW-Authenticate": f"Bearer {REALM}"},
        )
    if not _token_ok(tokens, presented):
        raise ApiError(
            401,
            "the bearer token is not valid",
            headers={"WWW-Authenticate": f'Bearer {REALM}, error="invalid_token"'},
        )
