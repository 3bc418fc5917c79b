"""Log output in logfmt or JSON, one line per event, with secrets redacted.

Context travels as real fields, not inside the message: a call passes
``extra=context(source=..., import_=..., reason=..., error=...)`` and both
formats write them as their own keys (``source=shop import=1001 ...`` in
logfmt, ``"source": "shop"`` in JSON), so Loki or a JSON pipeline can filter
by source, import or reason. The standard library does this without a new
dependency: a formatter reads the record's extra attributes."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

from exporter.redact import redact

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


_STANDARD_ATTRIBUTES = frozenset(
    (*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime", "taskName")
)
CONTEXT_FIRST = ("source", "import", "reason", "error")
"""Context fields in the order they are written (others follow as given)."""


def context(**fields: object) -> dict[str, object]:
    """``extra=`` for a log call: each keyword a field of the line. ``import_``
    is written as ``import`` (a Python keyword); None values are left out."""
    return {key.rstrip("_"): value for key, value in fields.items() if value is not None}


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields a record carries (see :func:`context`)."""
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES}
    ordered = {key: extra.pop(key) for key in CONTEXT_FIRST if key in extra}
    return {**ordered, **extra}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower().replace("warning", "warn"),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in context_of(record).items():
        fields.setdefault(key, value)
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key, value in _fields(record).items():
            text = str(value)
            if not text or any(c in text for c in ' "=\n\t'):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return redact(" ".join(parts))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(json.dumps(_fields(record)))


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # aiohttp's access log is noise at info level for a scrape target.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class RateLimitedLog:
    """Logs a repeated message at most ``burst`` times per ``interval`` per key;
    the first line after a quiet spell says how many were left out.

    For errors that can repeat thousands of times a second (accept errors,
    store writes, polls of many imports failing alike): the log stays readable
    and cannot fill a disk.
    """

    MAX_KEYS = 10_000

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.clock = clock
        # key -> [window start, lines logged in it, lines left out since last logged]
        self._windows: dict[Hashable, list[float]] = {}

    def log(
        self,
        level: int,
        key: Hashable,
        msg: str,
        *args: object,
        exc_info: Any = None,
        extra: dict[str, object] | None = None,
    ) -> bool:
        """Log ``msg % args`` unless ``key`` used up its lines; True if logged."""
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            left_out = int(window[2]) if window is not None else 0
            if len(self._windows) >= self.MAX_KEYS:
                self._windows.clear()
            self._windows[key] = [now, 1, 0]
            if left_out:
                msg += " (%d more like this in the last %gs were not logged)"
                args = (*args, left_out, self.interval)
        elif window[1] < self.burst:
            window[1] += 1
        else:
            window[2] += 1
            return False
        self.logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
        return True
