"""Keeps configured secrets out of everything the exporter writes.

Every secret the config resolves is registered here; logs, error messages kept
in state (and so pages, API and metrics) pass through :func:`redact`, so a
secret that an upstream echoes back in an error body is still never shown.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import deque
from urllib.parse import quote, quote_plus

REDACTED = "<redacted>"
_MIN_LENGTH = 4  # shorter strings would redact ordinary words
TRANSIENT_KEPT = 64
"""Fetched tokens kept for redaction: the latest few refreshes' worth, so a
process that refreshes tokens for months does not check ever more strings."""

_lock = threading.Lock()
_configured: set[str] = set()
_transient: deque[str] = deque(maxlen=TRANSIENT_KEPT)
_secrets: tuple[str, ...] = ()
"""Longest first: a secret that contains another (a token JSON and its access
token) is replaced whole, not around the inner one."""


def encodings(value: str) -> set[str]:
    """Every form in which the exporter itself may send a secret, and so in which
    an upstream may echo it back: raw, base64 (headers), percent-encoded with
    ``%20`` or ``+`` for spaces (URLs, form bodies) and JSON-escaped (ASCII-only
    and not)."""
    return {
        value,
        base64.b64encode(value.encode()).decode(),
        quote(value, safe=""),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    }


def register_secret(value: str, *, transient: bool = False) -> None:
    """Remember a secret in each of its :func:`encodings`.

    ``transient`` secrets (tokens the exporter fetched) are kept only until
    newer ones push them out; configured ones are kept for good."""
    global _secrets
    if len(value) < _MIN_LENGTH:
        return
    forms = {form for form in encodings(value) if len(form) >= _MIN_LENGTH}
    with _lock:
        if transient:
            _transient.extend(forms - _configured - set(_transient))
        else:
            _configured.update(forms)
        everything = _configured.union(_transient)
        _secrets = tuple(sorted(everything, key=len, reverse=True))


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def clear_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _secrets
    with _lock:
        _configured.clear()
        _transient.clear()
        _secrets = ()
