"""What every upstream adapter shares: the HTTP call with its limits, status
classification, and the :class:`Source` interface the poller drives."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Container, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar, cast

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from exporter.config import CONTROL_CHARACTERS, SourceConfig
from exporter.model import ErrorReason, Observation, ParseError, SourceError
from exporter.redact import redact
from exporter.sources.deadlines import Deadlines

MAX_DEFLATE_RATIO = 1032
"""Deflate (gzip) cannot inflate more than about 1032 times: a compressed body of
n bytes is at most n * 1032 bytes decompressed."""

URL_CACHE_SIZE = 100_000
URLS_KEPT = 16_384
"""Imports per source whose URL itself is kept, not only its parts: a poll
then hands aiohttp a URL it has seen, its cache filled (2-4 % of a poll's
CPU at 10,000 imports, ``bench/polling.py``), for about 450 bytes more an
import: 7.4 MB per source at most. A source with more imports has its
other URLs built of their parts on each poll (at 100,000 imports, 74 bytes
an import)."""

NO_TIMER = aiohttp.ClientTimeout()
"""No timeout of aiohttp's: a source's :class:`Deadlines` keeps the time."""


class UrlParts(NamedTuple):
    """A URL as its encoded parts (scheme and authority shared by a source's imports)."""

    scheme: str
    authority: str
    path: str
    query: str
    known: dict[str, object] | None = None
    """Its authority's :func:`authority_properties`, one dict per authority
    (kept with each URL's parts: no lookup of them per poll)."""


_yarl_from_parts: Callable[[str, str, str, str, str], URL] | None
try:  # yarl's own constructor from encoded parts, without URL.build's checks and LRU
    from yarl._url import from_parts_uncached as _yarl_from_parts
except ImportError:  # another yarl: URL.build, a few microseconds slower a poll
    _yarl_from_parts = None

AUTHORITY_PROPERTIES = (
    "scheme",
    "raw_user",
    "raw_password",
    "raw_host",
    "explicit_port",
    "port",
    "host_port_subcomponent",
    "raw_fragment",
)
"""What aiohttp asks of every request's URL that only its scheme and authority
decide: computed once per authority and handed to each URL built (each of
these is a property yarl computes in Python on a URL's first use)."""


def _built(parts: UrlParts) -> URL:
    return URL.build(
        scheme=parts.scheme,
        authority=parts.authority,
        path=parts.path,
        query_string=parts.query,
        encoded=True,
    )


def _prefilled(parts: UrlParts, known: dict[str, object]) -> URL:
    assert _yarl_from_parts is not None
    url = _yarl_from_parts(parts.scheme, parts.authority, parts.path, parts.query, "")
    cast(Any, url)._cache = known.copy()
    return url


def authority_properties(parts: UrlParts) -> dict[str, object] | None:
    """:data:`AUTHORITY_PROPERTIES` of ``parts``' scheme and authority, to
    build URLs with them known; None (build them the public way) unless
    yarl, working them out itself on a URL built of the parts, gets these
    values and keeps each in its cache under that name, and a URL built with
    them known is ``URL.build``'s in each and as a string: a yarl that keeps
    them otherwise is never handed them."""
    if _yarl_from_parts is None:
        return None
    try:
        reference = _built(parts)
        known = {name: getattr(reference, name) for name in AUTHORITY_PROPERTIES}
        plain = _yarl_from_parts(parts.scheme, parts.authority, parts.path, parts.query, "")
        worked_out = {name: getattr(plain, name) for name in AUTHORITY_PROPERTIES}
        kept = cast(Any, plain)._cache
        cached = {name: kept[name] for name in AUTHORITY_PROPERTIES if name in kept}
        candidate = _prefilled(parts, known)
        same = (
            worked_out == cached == known
            and str(candidate) == str(reference)
            and all(
                getattr(candidate, name) == getattr(reference, name)
                for name in (*AUTHORITY_PROPERTIES, "raw_path_qs", "host", "path_qs")
            )
        )
    except Exception:  # a yarl of other internals: the public way
        return None
    return known if same else None


RequestObserver = Callable[[float], None]
"""Called with the duration in seconds of every HTTP request a source makes."""


class HttpResponse(NamedTuple):
    """One upstream answer, its body already read (and capped)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(frozen=True, slots=True)
class ImportSpec:
    """One import a source watches: the id used upstream and an optional human name."""

    id: str
    name: str | None = None


async def http_request(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    timeout: float,
    max_bytes: int,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    data: Mapping[str, str] | bytes | None = None,
    observe: RequestObserver | None = None,
    deadlines: Deadlines | None = None,
) -> HttpResponse:
    """Make one request, reading at most ``max_bytes`` of (decompressed) body,
    within ``timeout`` seconds (kept by ``deadlines``, whose timeout it must
    be, when given: a source's).

    ``data`` is a form (a mapping) or a body as it is (bytes: say its
    Content-Type in ``headers``).

    Raises :class:`SourceError` with reason timeout, connection or too_large.
    Any HTTP status is returned, not raised: callers decide what it means.
    """
    started = time.perf_counter()
    deadline = deadlines.start() if deadlines is not None else None
    try:
        async with session.request(
            method,
            url,
            headers=headers,
            params=params,
            data=data,
            timeout=NO_TIMER if deadline is not None else aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response:
            length = response.content_length
            if length is not None and length > max_bytes:
                raise _too_large(max_bytes)
            if length is not None and (
                "Content-Encoding" not in response.headers
                or length * MAX_DEFLATE_RATIO <= max_bytes
            ):
                # A body of known size that cannot exceed the cap, even
                # decompressed: one read.
                return HttpResponse(response.status, response.headers, await response.read())
            body = bytearray()
            # Otherwise read in pieces so an oversized (or decompression-bomb)
            # body is cut off at the cap instead of being buffered whole.
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > max_bytes:
                    raise _too_large(max_bytes)
            return HttpResponse(response.status, response.headers, bytes(body))
    except asyncio.CancelledError as exc:
        if deadline is not None and deadline.finish():
            raise _timed_out(timeout) from exc
        raise
    except TimeoutError as exc:
        raise _timed_out(timeout) from exc
    except aiohttp.ClientPayloadError as exc:
        raise SourceError(ErrorReason.CONNECTION, f"body cut off: {_describe(exc)}") from exc
    except aiohttp.ClientError as exc:
        raise SourceError(ErrorReason.CONNECTION, _describe(exc)) from exc
    finally:
        if deadline is not None:
            deadline.finish()
        if observe is not None:
            observe(time.perf_counter() - started)


def _timed_out(timeout: float) -> SourceError:
    return SourceError(ErrorReason.TIMEOUT, f"no complete answer within {timeout:g}s")


def _too_large(max_bytes: int) -> SourceError:
    return SourceError(ErrorReason.TOO_LARGE, f"response body over the {max_bytes} byte cap")


def _describe(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")[:300]


MAX_COUNT = 2**63 - 1
"""The largest count an answer may carry: what every store's integer column
(PostgreSQL's BIGINT) holds. A larger one is an invalid answer of its import,
not a value that would fail every write of the store."""


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999: JSON, but no number
        raise ValueError(f"{text} is out of range")
    return number


_JSON = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)
_scan_json: Callable[[str, int], tuple[Any, int]] = cast(Any, _JSON).scan_once
"""The decoder's scanner (C): the value that starts at an index, and where it ends."""
JSON_WHITESPACE = " \t\n\r"


def parse_json(body: bytes) -> Any:
    """Decode a JSON body or raise :class:`ParseError`. NaN and Infinity
    (which Python reads, RFC 8259 does not) and numbers out of a double's
    range are not JSON here: nothing downstream has to guard against them.

    As ``json.loads`` reads bytes, through one decoder made once (json.loads
    with options makes a decoder per call), calling its scanner itself: an
    object's first byte ``{`` and a second byte other than NUL can only be
    UTF-8 (no BOM, no UTF-16 or UTF-32), and the whitespace around is
    stripped rather than matched with JSONDecoder.decode's regex: a poll's
    parse in half the time."""
    try:
        if body[:1] == b"{" and body[1:2] != b"\0":
            text = body.decode("utf-8", "surrogatepass")
        else:
            text = body.decode(json.detect_encoding(body), "surrogatepass")
        text = text.strip(JSON_WHITESPACE)
        value, end = _scan_json(text, 0)
        if end != len(text):
            raise ValueError("text after the JSON value")
        return value
    except (StopIteration, ValueError, UnicodeDecodeError) as exc:
        raise ParseError(f"body is not JSON ({len(body)} bytes)") from exc
    except RecursionError as exc:  # e.g. 100,000 "[": small, but deeper than Python recurses
        raise ParseError(f"body is JSON nested too deeply ({len(body)} bytes)") from exc


def upstream_text(value: str, limit: int, known: Container[str] = ()) -> str:
    """A string from an upstream's answer as it may be shown: configured secrets
    redacted first (an upstream may echo one back), then cut to ``limit``,
    control characters replaced. A
    ``known`` value (a documented status) is shown as it is: the common case,
    once a poll."""
    if value in known:
        return value
    # Control characters would reach terminals raw through labels and logs.
    return CONTROL_CHARACTERS.sub("\ufffd", redact(value)[:limit])


def wait_seconds(seconds: float) -> float | None:
    """A wait an upstream asked for, or None when it is no usable number (``inf``, ``nan``)."""
    return max(0.0, seconds) if math.isfinite(seconds) else None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse a Retry-After header: delta seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        return wait_seconds(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_for_status(response: HttpResponse, what: str) -> SourceError:
    """Classify a non-success HTTP answer into the fixed error reasons."""
    status = response.status
    detail = redact(f"{what}: HTTP {status}")
    if status in (401, 403):
        # Credentials are the source's, not the import's.
        return SourceError(ErrorReason.UNAUTHORIZED, detail, source_wide=True)
    if status == 429:
        return SourceError(
            ErrorReason.RATE_LIMITED,
            detail,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )
    if status >= 500:
        return SourceError(
            ErrorReason.SERVER_ERROR,
            detail,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )
    return SourceError(ErrorReason.CLIENT_ERROR, detail)


TokenObserver = Callable[[str], None]
"""Called with the outcome of every token request: ``success`` or an error reason."""


@dataclass(frozen=True, slots=True)
class SourceHooks:
    """How a source tells the exporter what it did, without knowing the state."""

    request: RequestObserver | None = None
    """Every HTTP request's duration."""
    token: TokenObserver | None = None
    """Every token request's outcome (sources that fetch tokens)."""


ConfigT = TypeVar("ConfigT", bound=SourceConfig)


class Source(ABC, Generic[ConfigT]):
    """One configured upstream: knows its API, watches a set of imports.

    A source type is one module: its config model (``config_model``, a
    :class:`~exporter.config.SourceConfig` whose ``type`` is ``system``), this
    adapter, and its wire format; listed once in :mod:`exporter.sources.registry`.
    The poller calls :meth:`poll` for each id in :meth:`imports`; it never
    sees the wire format.
    """

    system: str
    """The ``type`` in the config and the ``system`` label, e.g. ``elevate``
    (a class attribute; a type whose label the config names, ``http_json``,
    sets it per instance)."""

    config_model: ClassVar[type[SourceConfig]]

    follows_server: ClassVar[bool] = False
    """True where the target is a server whose *current* import can change
    (Rocket.Chat): it is polled for ever, even after a terminal state."""

    fetches_tokens: bool = False
    """True where the source calls a token endpoint of its own (counted by outcome)."""

    discovery_interval: float | None = None
    """Seconds between two calls of :meth:`discover`; None: the source finds
    no imports itself (they are configured or registered)."""

    def __init__(
        self, config: ConfigT, session: aiohttp.ClientSession, hooks: SourceHooks | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.session = session
        self.timeout = config.timeout
        self.max_bytes = config.max_response_bytes
        self.hooks = hooks or SourceHooks()
        self.deadlines = Deadlines(config.timeout)
        self._import_urls: dict[str, UrlParts] = {}
        self._urls: dict[str, URL] = {}
        """The first :data:`URLS_KEPT` imports' URLs (their parts are not kept)."""
        self._slot_freed = False
        """A kept URL was forgotten: a slot may be free for an import that has only its parts."""
        self._url_strings: dict[str, str] = {}
        self._authorities: dict[tuple[str, str], dict[str, object] | None] = {}
        """Per scheme and authority, its :func:`authority_properties`."""

    def import_url(self, import_id: str) -> URL:
        """The URL polled for one import, kept (up to :data:`URLS_KEPT`
        imports), else built of its encoded parts, kept: encoding the id into
        a query or a path on every poll cost more than the rest of an
        adapter. A URL keeps a cache of what aiohttp asks of it (about 450
        bytes); the parts are a tenth of that. A URL is built of them with
        what only the source's authority decides already known
        (:func:`authority_properties`): 4 % of a poll's CPU less than
        ``URL.build`` and aiohttp working those out on every poll."""
        url = self._urls.get(import_id)
        if url is not None:
            return url
        parts = self._import_urls.get(import_id)
        if parts is None:
            parts = self._parts_of(import_id)
            if len(self._urls) < URLS_KEPT:
                url = self._urls[import_id] = self._url_of(parts)
                return url
            if len(self._import_urls) >= URL_CACHE_SIZE:
                self._import_urls.clear()  # ids come and go; stay bounded
            self._import_urls[import_id] = parts
        elif self._slot_freed:
            # An import no longer polled left its slot: the next with only
            # its parts takes it (a flag first: this path is every poll past
            # the first imports).
            if len(self._urls) < URLS_KEPT:
                del self._import_urls[import_id]
                url = self._urls[import_id] = self._url_of(parts)
                return url
            self._slot_freed = False  # taken again
        return self._url_of(parts)

    def forget_url(self, import_id: str) -> None:
        """An import no longer polled: its URL (or parts) are not kept."""
        if self._urls.pop(import_id, None) is not None:
            self._slot_freed = True
        self._import_urls.pop(import_id, None)

    def _parts_of(self, import_id: str) -> UrlParts:
        url = self.build_import_url(import_id)
        # One string per scheme and authority, shared by the source's
        # imports (not interned: an authority may hold a password).
        scheme = self._url_strings.setdefault(url.scheme, url.scheme)
        authority = self._url_strings.setdefault(url.raw_authority, url.raw_authority)
        parts = UrlParts(scheme, authority, url.raw_path, url.raw_query_string)
        if (scheme, authority) not in self._authorities:
            self._authorities[scheme, authority] = authority_properties(parts)
        return parts._replace(known=self._authorities[scheme, authority])

    @staticmethod
    def _url_of(parts: UrlParts) -> URL:
        known = parts.known
        return _built(parts) if known is None else _prefilled(parts, known)

    def build_import_url(self, import_id: str) -> URL:
        """Adapters that poll one URL per import id say how it is made."""
        raise NotImplementedError

    def imports(self) -> list[ImportSpec]:
        """The imports this source watches by configuration."""
        return [ImportSpec(entry.id, entry.name) for entry in self.config.import_entries()]

    @abstractmethod
    async def poll(self, import_id: str) -> Observation:
        """Ask the upstream about one import. Raises :class:`SourceError`."""

    async def discover(self) -> list[ImportSpec]:
        """The imports the upstream lists now, for sources with a
        ``discovery_interval``. Raises :class:`SourceError`."""
        return []

    def request(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | bytes | None = None,
    ) -> Coroutine[Any, Any, HttpResponse]:
        """:func:`http_request` with this source's session, timeout, cap and
        observer (its coroutine: no coroutine of its own wrapped round it, on
        every poll)."""
        return http_request(
            self.session,
            method,
            url,
            timeout=self.timeout,
            max_bytes=self.max_bytes,
            headers=headers,
            params=params,
            data=data,
            observe=self.hooks.request,
            deadlines=self.deadlines,
        )


class SharedToken:
    """A credential a source fetches itself (an OAuth token) and every poll
    shares: cached until it expires or is rejected, and fetched single-flight:
    polls that need one while a fetch is under way wait for it and share its
    outcome, failure included (one login attempt, not one per import).

    ``fetch`` makes one call of the token endpoint and returns the value to
    send and its lifetime in seconds (None: until rejected); it raises
    :class:`SourceError` (source-wide, so the poller holds the source)."""

    EXPIRY_MARGIN = 0.9
    """A token is renewed after this share of its lifetime."""

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float | None]]]) -> None:
        self._fetch = fetch
        self._value: str | None = None
        self._expires = math.inf
        self._lock = asyncio.Lock()
        self._fetches = 0
        """Fetches finished: a poll that waited through one shares its outcome."""
        self._failure: SourceError | None = None

    def current(self) -> str | None:
        """The cached value, if it has not expired."""
        if self._value is not None and time.monotonic() >= self._expires:
            self._value = None
        return self._value

    def keep(self, value: str) -> None:
        """A value that is not fetched (configured), kept until rejected."""
        self._value, self._expires = value, math.inf

    def forget(self, value: str) -> None:
        """``value`` was rejected: it is never sent again."""
        if self._value == value:
            self._value = None

    async def get(self, rejected: str | None = None) -> str:
        """A value other than ``rejected``, fetched if need be."""
        fetches = self._fetches
        async with self._lock:
            if self._fetches != fetches and self._failure is not None:
                raise self._failure
            current = self.current()
            if current is not None and current != rejected:
                return current  # someone else refreshed meanwhile
            try:
                value, lifetime = await self._fetch()
            except SourceError as exc:
                self._failure = exc
                raise
            finally:
                self._fetches += 1
            self._failure = None
            self._value = value
            self._expires = (
                math.inf if lifetime is None else time.monotonic() + lifetime * self.EXPIRY_MARGIN
            )
            return value
