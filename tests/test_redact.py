"""Redaction: configured secrets for good, fetched tokens for a while, longest first."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest

from exporter import redact


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    redact.clear_secrets()
    yield
    redact.clear_secrets()


def test_configured_secrets_stay_and_fetched_tokens_are_bounded() -> None:
    redact.register_secret("configured-api-key")
    tokens = [f"fetched-token-{i:04d}" for i in range(500)]
    for token in tokens:
        redact.register_secret(token, transient=True)
    assert redact.redact("key configured-api-key") == "key <redacted>"
    assert redact.redact(tokens[-1]) == "<redacted>"  # the current token
    # Months of refreshes do not make every redaction check more strings.
    assert len(redact._secrets) <= 2 + redact.TRANSIENT_KEPT


def test_a_secret_holding_another_is_replaced_whole() -> None:
    token_json = '{"access_token":"00Dxx!AQ0AQ","signature":"sig-abcdef"}'
    redact.register_secret("00Dxx!AQ0AQ")
    redact.register_secret(token_json)
    assert redact.redact(f"echo {token_json}") == "echo <redacted>"


@pytest.mark.parametrize("secret", ["pä&ss word+=/", 'quo"te\\back ä€'])
def test_every_encoding_the_exporter_sends_a_secret_in_is_redacted(secret: str) -> None:
    """An upstream may echo a secret back as it received it: in a header
    (base64), a URL or form body (percent-encoded, spaces as %20 or +) or JSON."""
    redact.register_secret(secret)
    forms = {
        "raw": secret,
        "base64": base64.b64encode(secret.encode()).decode(),
        "percent": quote(secret, safe=""),
        "form": quote_plus(secret),
        "JSON": json.dumps(secret)[1:-1],
        "JSON, not ASCII-escaped": json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    for kind, form in forms.items():
        assert redact.redact(f"echo {form}!") == "echo <redacted>!", kind
