"""The API's fixed numbers and rules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

PREFIX = "/api/v1"
MAX_BODY_BYTES = 4096
"""Larger request bodies are refused with 413 (a registration is ~100 bytes)."""
API_OFF = "the write API is off: set api.tokens_file in the config"
SOURCE_RULE = "must be a source name of 1-100 characters"
NAME_RULE = "must be a string of at most 200 characters without control characters, or null"
REALM = 'realm="import-status-exporter"'
DEFAULT_PAGE = 500
MAX_PAGE = 5000
VIEWS_PER_SLICE = 250
SCAN_PER_PAGE = 5000
"""Imports looked at for one page at most (about 2 ms on the event loop): a
filter matching few of 50,000 imports ends a page early (with a ``next``)
instead of scanning them all."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
