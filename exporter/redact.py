"""Keeps configured secrets out of everything the exporter writes.

Every secret the config resolves is registered here; logs, error messages kept
in state (and so pages, API and metrics) pass through :func:`redact`, so a
secret that an upstream echoes back in an error body is still never shown.
"""

from __future__ import annotations

import base64
import threading

REDACTED = "<redacted>"
_MIN_LENGTH = 4  # shorter strings would redact ordinary words

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()


def register_secret(value: str) -> None:
    """Remember a secret (and its base64 form, which some upstreams send)."""
    global _secrets
    if len(value) < _MIN_LENGTH:
        return
    forms = {value, base64.b64encode(value.encode()).decode()}
    with _lock:
        _secrets = _secrets | forms


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def clear_secrets() -> None:
    """Forget every registered secret (tests, config reload)."""
    global _secrets
    with _lock:
        _secrets = frozenset()
