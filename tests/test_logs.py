"""Log lines: context as real fields in logfmt and JSON, secrets redacted,
repeated errors rate-limited."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from exporter import redact
from exporter.logs import JsonFormatter, LogfmtFormatter, context


def record(msg: str, **fields: object) -> logging.LogRecord:
    logger = logging.getLogger("exporter.poller")
    return logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, msg, (), None, extra=context(**fields)
    )


def test_context_is_fields_of_the_line_in_both_formats() -> None:
    event = record(
        "poll failed", source="shop", import_="1001", reason="timeout", error="no answer in 10s"
    )
    line = LogfmtFormatter().format(event)
    assert 'msg="poll failed" source=shop import=1001 reason=timeout error="no answer in 10s"' in (
        line
    )
    parsed = json.loads(JsonFormatter().format(event))
    assert parsed["msg"] == "poll failed"
    assert (parsed["source"], parsed["import"], parsed["reason"]) == ("shop", "1001", "timeout")
    assert parsed["error"] == "no answer in 10s"


def test_fields_that_are_none_are_left_out_and_numbers_stay_numbers() -> None:
    event = record("source held", source="shop", hold_seconds=30, reason=None)
    parsed = json.loads(JsonFormatter().format(event))
    assert parsed["hold_seconds"] == 30
    assert "reason" not in parsed
    assert LogfmtFormatter().format(event).endswith("source=shop hold_seconds=30")


@pytest.fixture
def secret() -> Iterator[str]:
    redact.clear_secrets()
    redact.register_secret("hunter2-very-secret")
    yield "hunter2-very-secret"
    redact.clear_secrets()


def test_a_secret_in_a_field_is_redacted(secret: str) -> None:
    event = record("poll failed", source="shop", error=f"echoed {secret}")
    assert secret not in LogfmtFormatter().format(event)
    assert secret not in JsonFormatter().format(event)
    assert "<redacted>" in JsonFormatter().format(event)
