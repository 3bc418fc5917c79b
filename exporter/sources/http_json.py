"""Any JSON job-status API by configuration: ``type: http_json``.

The config says how to ask about one import (method, URL template with
``{id}``, query, headers, an optional JSON body template), how to log in
(a static header, bearer, basic, or an OAuth2 ``client_credentials`` token
fetched, cached and refreshed on a 401), and how to read the answer: JMESPath
expressions for the state, reason, counts and times, a map from upstream
states to the normalized ones, and which answers mean "not found" or an error
despite a 200 (GraphQL ``errors``, a throttled answer).

Every expression is compiled when the config loads (an invalid one is a config
error naming its field) and once more when the adapter is built, never per poll.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, NamedTuple
from urllib.parse import quote

import aiohttp
import jmespath
import jmespath.exceptions
import jmespath.functions
from jmespath.parser import ParsedResult
from multidict import CIMultiDict
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError
from yarl import URL

from exporter.config import Duration, HttpUrl, SecretHolder, StrictModel, WithImports
from exporter.config.base import IMPORT_ID_PATTERN
from exporter.logs import context
from exporter.model import ErrorReason, Observation, ParseError, SourceError, State
from exporter.redact import register_secret
from exporter.sources.base import (
    MAX_COUNT,
    HttpResponse,
    ImportSpec,
    SharedToken,
    Source,
    SourceHooks,
    error_for_status,
    parse_json,
    retry_after_seconds,
    upstream_text,
    wait_seconds,
)
from exporter.sources.expressions import Search, compile_search, is_false

log = logging.getLogger(__name__)

ID_PLACEHOLDER = "{id}"


# --- config --------------------------------------------------------------------


def _describe_jmespath_error(exc: jmespath.exceptions.JMESPathError) -> str:
    # The library's message spans lines (the expression and a caret): one line here.
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = first.removeprefix("Invalid jmespath expression: ").rstrip(":")
    position = getattr(exc, "lex_position", None)
    if isinstance(position, int):
        first += f" (at character {position + 1})"
    return first


def compile_expression(expression: str) -> ParsedResult:
    """Compile a JMESPath expression or raise a config error saying why."""
    if not expression.strip():
        raise PydanticCustomError("jmespath", "invalid JMESPath: empty expression")
    try:
        parsed = jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise PydanticCustomError(
            "jmespath", "invalid JMESPath: {detail}", {"detail": _describe_jmespath_error(exc)}
        ) from None
    # jmespath.py looks functions up only when it calls them: a misspelt one
    # would fail every poll instead of the load.
    problem = _function_problem(parsed.parsed)
    if problem is not None:
        raise PydanticCustomError("jmespath", "invalid JMESPath: {detail}", {"detail": problem})
    return parsed


_FUNCTIONS = jmespath.functions.Functions().FUNCTION_TABLE


def _function_problem(node: Mapping[str, Any]) -> str | None:
    """The first call of an unknown function, or with the wrong number of arguments."""
    if node.get("type") == "function_expression":
        name = node["value"]
        if name not in _FUNCTIONS:
            return f"unknown function {name}()"
        signature = _FUNCTIONS[name]["signature"]
        given = len(node.get("children", []))
        variadic = bool(signature) and signature[-1].get("variadic", False)
        if given != len(signature) and not (variadic and given >= len(signature)):
            least = "at least " if variadic else ""
            plural = "" if len(signature) == 1 else "s"
            return f"{name}() takes {least}{len(signature)} argument{plural}, not {given}"
    for child in node.get("children", []):
        if isinstance(child, Mapping) and (problem := _function_problem(child)) is not None:
            return problem
    return None


def _valid_expression(expression: str) -> str:
    compile_expression(expression)
    return expression


Expression = Annotated[str, AfterValidator(_valid_expression)]
"""A JMESPath expression, checked when the config loads."""

NormalizedState = Literal[
    "waiting", "blocked", "running", "succeeded", "failed", "aborted", "not_found", "unknown"
]


class RequestConfig(StrictModel):
    method: Literal["GET", "POST"] = "GET"
    path: str = ""
    """Appended to ``url``; ``{id}`` becomes the import id, URL-escaped."""
    query: dict[str, str] = Field(default_factory=dict)
    """Query parameters; ``{id}`` in a value becomes the import id."""
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None
    """A JSON body (sent with POST): ``{id}`` in any string becomes the id,
    JSON-escaped. For GraphQL: ``{query: "...", variables: {id: "{id}"}}``."""


AUTH_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (required fields, secrets it uses)
    "header": (("header",), ("value",)),
    "bearer": ((), ("token",)),
    "basic": (("username",), ("password",)),
    "oauth2": (("token_url", "client_id"), ("client_secret",)),
    "oauth2 with grant_type password": (
        ("token_url", "client_id", "username"),
        ("client_secret", "password"),
    ),
}
_OAUTH2_OPTIONAL = ("scope", "client_auth", "grant_type")
_AUTH_OPTIONAL = {"oauth2": _OAUTH2_OPTIONAL, "oauth2 with grant_type password": _OAUTH2_OPTIONAL}


class AuthConfig(SecretHolder):
    """How requests log in, one ``type`` with its fields: a static header (an
    API key), a bearer token, basic auth, or OAuth2 ``client_credentials``
    against a token endpoint (RFC 6749 4.4), the token fetched and cached.

    One model rather than one per type, so an error's location is the
    field's own (``auth.token_url``), not the type's."""

    SECRETS: ClassVar[dict[str, bool]] = {
        "value": False,
        "token": False,
        "password": False,
        "client_secret": False,
    }
    type: Literal["header", "bearer", "basic", "oauth2"]
    header: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    value: str | None = None
    value_env: str | None = None
    value_file: str | None = None
    token: str | None = None
    token_env: str | None = None
    token_file: str | None = None
    username: str | None = Field(default=None, min_length=1)
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    token_url: HttpUrl | None = None
    client_id: str | None = Field(default=None, min_length=1)
    client_secret: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    scope: str | None = None
    client_auth: Literal["body", "basic"] | None = None
    """OAuth2: how the client authenticates: form fields (``body``, the
    default) or HTTP basic."""
    grant_type: Literal["client_credentials", "password"] | None = None
    """OAuth2: ``client_credentials`` (the default) or ``password`` (with
    ``username`` and ``password``, as Salesforce's username-password flow)."""

    @property
    def kind(self) -> str:
        if self.type == "oauth2" and self.grant_type == "password":
            return "oauth2 with grant_type password"
        return self.type

    def check(self) -> Iterator[tuple[str, str]]:
        kind = self.kind
        required, secrets = AUTH_FIELDS[kind]
        for field in required:
            if getattr(self, field) is None:
                yield field, f"required for type {kind}"
        for secret in secrets:
            if self.given_field(secret) is None:
                yield secret, f"required for type {kind} (or {secret}_env/{secret}_file)"
        used = {*required, *_AUTH_OPTIONAL.get(kind, ())}
        used |= {f"{secret}{suffix}" for secret in secrets for suffix in ("", "_env", "_file")}
        for field in sorted(self.model_fields_set - used - {"type"}):
            yield field, f"not used with type {kind}"


class ExtractConfig(StrictModel):
    state: Expression
    id: Expression | None = None
    """The id the answer is about: when it is there and not the polled id
    (a string, or an integer compared as its digits), the answer is invalid."""
    reason: Expression | None = None
    step: Expression | None = None
    completed: Expression | None = None
    expected: Expression | None = None
    failed: Expression | None = None
    started: Expression | None = None
    ended: Expression | None = None
    time_format: Literal["auto", "iso8601", "epoch_s", "epoch_ms"] = "auto"
    """``auto``: numbers are epoch seconds (milliseconds above 1e11), strings ISO 8601."""


class NotFoundConfig(StrictModel):
    """Which answers say the import does not exist: an HTTP status, a body
    condition, or both (then both must hold). Nothing else is ``not_found``:
    an unexpected 404 is a wrong URL, an error."""

    status: list[int] = Field(default_factory=list)
    when: Expression | None = None


class ErrorRule(StrictModel):
    """An answer that is an error although its status is a success."""

    when: Expression
    reason: ErrorReason
    message: Expression | None = None
    retry_after: Expression | None = None
    """Seconds to wait, from the answer."""
    source_wide: bool | None = None
    """Hold the whole source; by default for rate_limited and unauthorized."""


class DiscoveryConfig(StrictModel):
    """How a source lists its recent jobs, so none has to be registered by
    hand: a list request (same templating and auth, without ``{id}``), where
    its items are, each item's id and name, which items to keep, and the
    next page."""

    interval: Duration = 300.0
    request: RequestConfig
    items: Expression
    """The list of jobs in an answer."""
    id: Expression
    """An item's import id (a string, or an integer taken as its digits)."""
    name: Expression | None = None
    filter: Expression | None = None
    """Keep the items for which this condition holds (e.g. one object type)."""
    next: Expression | None = None
    """Paging by link: the next page's URL, or a path on ``url``; none
    (null, false, "") on the last page."""
    cursor: Expression | None = None
    """Paging by cursor: the next page's cursor, put where the request says
    ``{cursor}`` (a query value, or a body string: JSON-escaped; on the first
    page such a query parameter is left out and a body string that is only
    ``{cursor}`` is null); none on the last page."""
    page_param: str | None = Field(default=None, min_length=1)
    """Paging by number: this query parameter counts pages from
    ``page_start`` until a page lists no items."""
    page_start: int = Field(default=1, ge=0)
    max_pages: int = Field(default=20, ge=1, le=1000)


class HttpJsonConfig(WithImports):
    type: Literal["http_json"]
    system: str = Field(
        default="http_json", min_length=1, max_length=50, pattern=r"^[A-Za-z0-9_.:-]+$"
    )
    """The ``system`` label and what the page shows."""
    url: HttpUrl
    request: RequestConfig = Field(default_factory=RequestConfig)
    auth: AuthConfig | None = None
    extract: ExtractConfig
    states: dict[str, NormalizedState] = Field(default_factory=dict)
    not_found: NotFoundConfig | None = None
    errors: list[ErrorRule] = Field(default_factory=list)
    discovery: DiscoveryConfig | None = None

    def secret_holders(self) -> Iterator[tuple[str, SecretHolder]]:
        yield "", self
        if self.auth is not None:
            yield "auth", self.auth

    def check(self) -> Iterator[tuple[str, str]]:
        if self.not_found is not None and not self.not_found.status and not self.not_found.when:
            yield "not_found", "give status, when or both"
        if self.request.body is not None and self.request.method == "GET":
            yield "request.body", "a body needs method POST"
        if self.discovery is not None:
            if self.discovery.request.body is not None and self.discovery.request.method == "GET":
                yield "discovery.request.body", "a body needs method POST"
            if self.discovery.request.path and not self.discovery.request.path.startswith("/"):
                yield "discovery.request.path", "must start with /"
            pagings = [self.discovery.next, self.discovery.cursor, self.discovery.page_param]
            if sum(paging is not None for paging in pagings) > 1:
                yield "discovery", "give at most one of next, cursor and page_param"
        if self.auth is not None:
            for field, problem in self.auth.check():
                yield f"auth.{field}", problem
        if self.request.path and not self.request.path.startswith("/"):
            yield "request.path", "must start with /"
        for status in self.not_found.status if self.not_found else []:
            if not 100 <= status <= 599:
                yield "not_found.status", f"{status} is not an HTTP status"


# --- the wire format ---------------------------------------------------------------

NOT_FOUND = Observation(state=State.NOT_FOUND, upstream_state="NOT_FOUND")

EPOCH_MS_ABOVE = 1e11
"""An epoch number above this is milliseconds (1e11 s is the year 5138)."""

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def truthy(value: Any) -> bool:
    """JMESPath's truth: null, false, "" and empty lists and objects are false."""
    return not is_false(value)


SEARCH_ERRORS = (jmespath.exceptions.JMESPathError, TypeError, ValueError, RecursionError)
"""What a search can raise: jmespath.py's errors, and a TypeError of its own
where it orders a string against a number (``a < `3``` on ``{"a": ""}``)."""


def search(expression: Search, data: Any, what: str) -> Any:
    try:
        return expression(data)
    except jmespath.exceptions.JMESPathError as exc:
        raise ParseError(f"{what}: {_describe_jmespath_error(exc)}") from exc
    except (TypeError, ValueError, RecursionError) as exc:
        raise ParseError(f"{what}: the expression cannot be applied to this answer") from exc


def to_count(value: Any, what: str) -> int | None:
    """A count: a JSON integer, an integral number or a string of digits
    (GraphQL's 64-bit integers are strings). Null stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ParseError(f"{what} is not a count")
    count: int | None = None
    if isinstance(value, str) and value.isdecimal() and value.isascii() and len(value) < 30:
        count = int(value)
    elif isinstance(value, int):
        count = value
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    if count is None or not 0 <= count <= MAX_COUNT:
        raise ParseError(f"{what} is not a count")
    return count


def to_timestamp(value: Any, time_format: str, what: str) -> float | None:
    """Epoch seconds from an ISO 8601 string (UTC where it names no zone) or
    an epoch number (seconds or milliseconds). Null stays None."""
    if value is None:
        return None
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(value, str) and time_format != "iso8601" and _NUMBER.match(value):
        numeric = True
    if not numeric and (not isinstance(value, str) or time_format in ("epoch_s", "epoch_ms")):
        raise ParseError(f"{what} is not a {_FORMAT_WORDS[time_format]}")
    if numeric:
        number = float(value)
        if time_format == "iso8601" or not math.isfinite(number):
            raise ParseError(f"{what} is not a {_FORMAT_WORDS[time_format]}")
        auto_ms = time_format == "auto" and abs(number) > EPOCH_MS_ABOVE
        return number / 1000 if time_format == "epoch_ms" or auto_ms else number
    return _iso_timestamp(value, what)


_FORMAT_WORDS = {
    "auto": "date (ISO 8601 or epoch number)",
    "iso8601": "ISO 8601 date",
    "epoch_s": "number of epoch seconds",
    "epoch_ms": "number of epoch milliseconds",
}


def _iso_timestamp(value: str, what: str) -> float:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ParseError(f"{what} is not an ISO 8601 date") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError) as exc:
        raise ParseError(f"{what} is out of range") from exc


def _text(value: Any, limit: int) -> str | None:
    """A reason or step as shown: strings as they are, other JSON as JSON."""
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return upstream_text(text, limit)


class Extractor:
    """The compiled reading of one source's answers: a pure function from an
    :class:`HttpResponse` to an :class:`Observation` (or a
    :class:`SourceError`), used by the adapter and by ``check-config``."""

    def __init__(self, config: HttpJsonConfig) -> None:
        self.what = config.system
        extract = config.extract
        self.state = compile_search(extract.state)
        self.id = compile_search(extract.id) if extract.id else None
        self.time_format = extract.time_format
        # The optional fields, compiled, in the Observation's order.
        self.fields: list[tuple[str, Search]] = [
            (name, compile_search(expression))
            for name in ("reason", "step", "completed", "expected", "failed", "started", "ended")
            if (expression := getattr(extract, name)) is not None
        ]
        self.states = {key: State(value) for key, value in config.states.items()}
        not_found = config.not_found
        self.not_found_status = frozenset(not_found.status if not_found else ())
        self.not_found_when = (
            compile_search(not_found.when) if not_found and not_found.when else None
        )
        self.has_not_found = not_found is not None
        self.errors = [
            (
                compile_search(rule.when),
                rule,
                compile_search(rule.message) if rule.message else None,
                compile_search(rule.retry_after) if rule.retry_after else None,
            )
            for rule in config.errors
        ]

    def parse(self, response: HttpResponse, import_id: str | None = None) -> Observation:
        """Turn one answer about ``import_id`` into an observation (or raise
        SourceError); without ``import_id`` the answer's id is not checked.

        A 200 is checked for error answers first (a throttled GraphQL answer
        has no data either), then for a configured "not found"."""
        if response.status != 200:
            if self.has_not_found and self._is_not_found(response, None):
                return NOT_FOUND
            raise self._status_error(response)
        body = parse_json(response.body)
        for rule in self.errors:
            self._check_error_rule(body, *rule, response)
        if self.has_not_found and self._is_not_found(response, body):
            return NOT_FOUND
        if self.id is not None and import_id is not None:
            self._check_id(body, import_id)
        return self._observation(body)

    def _check_id(self, body: Any, import_id: str) -> None:
        assert self.id is not None
        answered = search(self.id, body, f"{self.what} extract.id")
        if answered is None:
            return
        if isinstance(answered, bool) or not isinstance(answered, str | int):
            raise ParseError(f"{self.what}: extract.id is neither a string nor an integer")
        if str(answered) != import_id:
            raise ParseError(
                f"{self.what}: answer is about import {upstream_text(str(answered), 40)!r}"
            )

    def _is_not_found(self, response: HttpResponse, body: Any) -> bool:
        if self.not_found_status and response.status not in self.not_found_status:
            return False
        if self.not_found_when is None:
            return True  # a rule of statuses only, and this is one of them
        if body is None:
            try:
                body = parse_json(response.body)
            except ParseError:
                return False  # a proxy's page says nothing about the import
        try:
            return truthy(self.not_found_when(body))
        except SEARCH_ERRORS:
            return False

    def _status_error(self, response: HttpResponse) -> SourceError:
        what = f"{self.what} status"
        if response.status == 404:
            # Not a configured "not found": the URL answers for no import.
            return SourceError(
                ErrorReason.CLIENT_ERROR,
                f"{what}: HTTP 404 that is not a configured not_found answer "
                "(endpoint not found, check url and request.path)",
                source_wide=True,
            )
        return error_for_status(response, what)

    def _check_error_rule(
        self,
        body: Any,
        when: Search,
        rule: ErrorRule,
        message: Search | None,
        retry_after: Search | None,
        response: HttpResponse,
    ) -> None:
        if not truthy(search(when, body, f"{self.what} errors")):
            return
        detail = _text(search(message, body, f"{self.what} errors"), 300) if message else None
        wait: float | None = None
        if retry_after is not None:
            seconds = search(retry_after, body, f"{self.what} errors")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                wait = wait_seconds(float(seconds))
        if wait is None:
            wait = retry_after_seconds(response.headers.get("Retry-After"))
        source_wide = rule.source_wide
        if source_wide is None:
            source_wide = rule.reason in (ErrorReason.RATE_LIMITED, ErrorReason.UNAUTHORIZED)
        raise SourceError(
            rule.reason,
            f"{self.what}: error answer" + (f": {detail}" if detail else f" ({rule.when})"),
            wait,
            source_wide=source_wide,
        )

    def _observation(self, body: Any) -> Observation:
        raw = search(self.state, body, f"{self.what} extract.state")
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str):
            raise ParseError(f"{self.what}: extract.state found no string in the answer")
        values: dict[str, Any] = {}
        for name, expression in self.fields:
            value = search(expression, body, f"{self.what} extract.{name}")
            values[name] = self._convert(name, value)
        return Observation(
            state=self.states.get(raw, State.UNKNOWN),
            upstream_state=upstream_text(raw, 100, self.states),
            step=values.get("step"),
            reason=values.get("reason"),
            items_completed=values.get("completed"),
            items_expected=values.get("expected"),
            items_failed=values.get("failed"),
            started_at=values.get("started"),
            ended_at=values.get("ended"),
        )

    def _convert(self, name: str, value: Any) -> Any:
        what = f"{self.what}: extract.{name}"
        if name in ("reason", "step"):
            return _text(value, 1000 if name == "reason" else 200)
        if name in ("started", "ended"):
            return to_timestamp(value, self.time_format, what)
        return to_count(value, what)


class Page(NamedTuple):
    """What one answer of a list request says."""

    specs: list[ImportSpec]
    items: int
    next: str | None
    cursor: str | None


CURSOR_PLACEHOLDER = "{cursor}"


def with_cursor(template: Any, cursor: str | None) -> Any:
    """A body template with ``{cursor}`` put in (a string that is only the
    placeholder is null before the first cursor)."""
    if isinstance(template, str):
        if template == CURSOR_PLACEHOLDER:
            return cursor
        return template.replace(CURSOR_PLACEHOLDER, cursor or "")
    if isinstance(template, list):
        return [with_cursor(item, cursor) for item in template]
    if isinstance(template, dict):
        return {key: with_cursor(value, cursor) for key, value in template.items()}
    return template


class DiscoveryReader:
    """The compiled reading of one source's list answers: the imports named
    on a page, and the next page, if any."""

    def __init__(self, config: DiscoveryConfig, system: str) -> None:
        self.what = f"{system} discovery"
        self.items = compile_search(config.items)
        self.id = compile_search(config.id)
        self.name = compile_search(config.name) if config.name else None
        self.filter = compile_search(config.filter) if config.filter else None
        self.next = compile_search(config.next) if config.next else None
        self.cursor = compile_search(config.cursor) if config.cursor else None

    def read(self, response: HttpResponse) -> Page:
        if response.status != 200:
            raise error_for_status(response, self.what)
        body = parse_json(response.body)
        items = search(self.items, body, f"{self.what}.items")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise ParseError(f"{self.what}: items is not a list")
        specs = [spec for item in items if (spec := self._spec(item)) is not None]
        return Page(
            specs,
            len(items),
            self._text_of(self.next, body, "next"),
            self._text_of(self.cursor, body, "cursor"),
        )

    def _text_of(self, expression: Search | None, body: Any, name: str) -> str | None:
        value = search(expression, body, f"{self.what}.{name}") if expression else None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return value if isinstance(value, str) and value else None

    def _spec(self, item: Any) -> ImportSpec | None:
        """The import an item names; None for one filtered out or without a usable id."""
        if self.filter is not None and not truthy(search(self.filter, item, self.what)):
            return None
        raw = search(self.id, item, f"{self.what}.id")
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            return None
        import_id = str(raw)
        if len(import_id) > MAX_ID_LENGTH or not _IMPORT_ID.match(import_id):
            return None
        name = _text(search(self.name, item, f"{self.what}.name"), 200) if self.name else None
        return ImportSpec(import_id, name)


MAX_ID_LENGTH = 200
_IMPORT_ID = re.compile(IMPORT_ID_PATTERN)


# --- auth ---------------------------------------------------------------------------

"""A fetched token is used for this share of its ``expires_in``, then refreshed."""


def parse_token(response: HttpResponse) -> tuple[str, float | None]:
    """A token endpoint's answer: the access token and its lifetime (seconds)."""
    if response.status in (400, 401, 403):
        error = ""
        try:
            body = parse_json(response.body)
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                error = f" ({upstream_text(body['error'], 60)})"
        except ParseError:
            pass
        raise SourceError(ErrorReason.UNAUTHORIZED, f"token: HTTP {response.status}{error}")
    if response.status != 200:
        raise error_for_status(response, "token")
    body = parse_json(response.body)
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise ParseError("token: answer has no access_token")
    expires_in = body.get("expires_in")
    lifetime: float | None = None
    if isinstance(expires_in, int | float | str) and not isinstance(expires_in, bool):
        try:
            lifetime = wait_seconds(float(expires_in))
        except ValueError:
            lifetime = None
    return body["access_token"], lifetime


class TokenFetcher:
    """An OAuth2 token (``client_credentials`` or ``password`` grant): fetched,
    cached until shortly before ``expires_in``, refreshed when refused, and
    single-flight (:class:`~exporter.sources.base.SharedToken`)."""

    def __init__(self, source: HttpJsonSource, auth: AuthConfig) -> None:
        self.source = source
        self.auth = auth
        self.shared = SharedToken(self._login)
        self.current = self.shared.current
        self.forget = self.shared.forget
        self.get = self.shared.get

    async def _login(self) -> tuple[str, float | None]:
        token, lifetime = await self._fetch()
        register_secret(token, transient=True)
        log.info("fetched a new OAuth2 token", extra=context(source=self.source.name))
        return token, lifetime

    async def _fetch(self) -> tuple[str, float | None]:
        """One call of the token endpoint. Any failure holds the source;
        refused credentials hold it for ``max_backoff``."""
        auth = self.auth
        client_id = auth.client_id or ""
        secret = auth.secret("client_secret") or ""
        form: dict[str, str] = {"grant_type": auth.grant_type or "client_credentials"}
        if auth.grant_type == "password":
            form |= {"username": auth.username or "", "password": auth.secret("password") or ""}
        headers = {"Accept": "application/json"}
        if auth.client_auth == "basic":
            pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form |= {"client_id": client_id, "client_secret": secret}
        if auth.scope:
            form["scope"] = auth.scope
        config = self.source.config
        try:
            response = await self.source.request(
                "POST", auth.token_url or "", data=form, headers=headers
            )
            result = parse_token(response)
        except SourceError as exc:
            self.source.count_token(exc.reason.value)
            refused = exc.reason is ErrorReason.UNAUTHORIZED
            hold = max(config.max_backoff, config.interval) if refused else exc.retry_after
            message = exc.message if exc.message.startswith("token") else f"token: {exc.message}"
            raise SourceError(exc.reason, message, hold, source_wide=True) from exc
        self.source.count_token("success")
        return result


def static_headers(auth: AuthConfig | None) -> dict[str, str]:
    """The headers a configured (not fetched) credential adds."""
    if auth is None:
        return {}
    if auth.type == "header":
        return {auth.header or "": auth.secret("value") or ""}
    if auth.type == "bearer":
        return {"Authorization": f"Bearer {auth.secret('token') or ''}"}
    if auth.type == "basic":
        pair = f"{auth.username}:{auth.secret('password') or ''}"
        encoded = base64.b64encode(pair.encode("utf-8")).decode("ascii")
        register_secret(encoded)  # the header's form of a configured secret
        return {"Authorization": f"Basic {encoded}"}
    return {}


# --- the adapter ---------------------------------------------------------------------


class HttpJsonSource(Source[HttpJsonConfig]):
    system = "http_json"
    config_model = HttpJsonConfig

    def __init__(
        self,
        config: HttpJsonConfig,
        session: aiohttp.ClientSession,
        hooks: SourceHooks | None = None,
    ) -> None:
        super().__init__(config, session, hooks)
        self.system = config.system
        self.extractor = Extractor(config)
        request = config.request
        self.method = request.method
        self.path = request.path
        self.query = dict(request.query)
        self.query_has_id = any(ID_PLACEHOLDER in value for value in self.query.values())
        headers = CIMultiDict({"Accept": "application/json", "Accept-Encoding": "gzip"})
        headers.update(request.headers)
        headers.update(static_headers(config.auth))
        self.body_parts: list[str] | None = None
        if request.body is not None:
            headers.setdefault("Content-Type", "application/json")
            # Serialized once; the id goes between the parts, JSON-escaped.
            self.body_parts = json.dumps(request.body, separators=(",", ":")).split(ID_PLACEHOLDER)
        # A plain dict (the names already merged without regard to case):
        # aiohttp copies a dict faster than a multidict, once a poll.
        self.headers: Mapping[str, str] = dict(headers)
        self.header_has_id = any(ID_PLACEHOLDER in value for value in self.headers.values())
        self.tokens = (
            TokenFetcher(self, config.auth)
            if config.auth is not None and config.auth.type == "oauth2"
            else None
        )
        self.fetches_tokens = self.tokens is not None
        self.discovery = (
            DiscoveryReader(config.discovery, config.system) if config.discovery else None
        )
        self.discovery_interval = config.discovery.interval if config.discovery else None

    def count_token(self, outcome: str) -> None:
        if self.hooks.token is not None:
            self.hooks.token(outcome)

    def build_import_url(self, import_id: str) -> URL:
        path = self.path.replace(ID_PLACEHOLDER, quote(import_id, safe=""))
        url = URL(f"{self.config.url}{path}")
        if self.query:
            query = (
                {key: value.replace(ID_PLACEHOLDER, import_id) for key, value in self.query.items()}
                if self.query_has_id
                else self.query
            )
            url = url.update_query(query)
        return url

    def body(self, import_id: str) -> bytes | None:
        if self.body_parts is None:
            return None
        escaped = json.dumps(import_id)[1:-1]
        return escaped.join(self.body_parts).encode("utf-8")

    def _headers(self, import_id: str) -> Mapping[str, str]:
        if not self.header_has_id:
            return self.headers
        return {
            key: value.replace(ID_PLACEHOLDER, import_id) for key, value in self.headers.items()
        }

    async def poll(self, import_id: str) -> Observation:
        response = await self._call(
            self.method, self.import_url(import_id), self._headers(import_id), self.body(import_id)
        )
        return self.extractor.parse(response, import_id)

    async def _call(
        self, method: str, url: str | URL, headers: Mapping[str, str], data: bytes | None
    ) -> HttpResponse:
        """One request, with a fetched token where the source has one: an
        expired or revoked token is fetched again once on a 401, and a
        refused one is never sent again."""
        if self.tokens is None:
            return await self.request(method, url, headers=headers, data=data)
        token = self.tokens.current() or await self.tokens.get(None)
        response = await self.request(method, url, headers=_bearer(headers, token), data=data)
        if response.status == 401:
            self.tokens.forget(token)
            token = await self.tokens.get(token)
            response = await self.request(method, url, headers=_bearer(headers, token), data=data)
            if response.status == 401:
                self.tokens.forget(token)
        return response

    async def discover(self) -> list[ImportSpec]:
        """Every import the list request names, following the pages (by link,
        cursor or number) up to ``max_pages``; a next page on another host is
        not followed (it would be sent the source's credentials)."""
        discovery = self.config.discovery
        if discovery is None or self.discovery is None:
            return []
        request = discovery.request
        headers = {**self.headers, **request.headers}
        found: dict[str, ImportSpec] = {}
        url: URL | None = self._list_url(None, discovery.page_start)
        cursor: str | None = None
        for number in range(discovery.page_start, discovery.page_start + discovery.max_pages):
            assert url is not None
            response = await self._call(request.method, url, headers, self._list_body(cursor))
            page = self.discovery.read(response)
            for spec in page.specs:
                found.setdefault(spec.id, spec)
            url, cursor = self._next_page(discovery, page, number + 1)
            if url is None:
                break
        return list(found.values())

    def _next_page(
        self, discovery: DiscoveryConfig, page: Page, number: int
    ) -> tuple[URL | None, str | None]:
        """The next list request's URL and cursor; no URL after the last page."""
        if discovery.next is not None and page.next is not None:
            base = URL(self.config.url)
            url = base.join(URL(page.next))
            if url.origin() != base.origin():
                raise ParseError(f"{self.system} discovery: the next page is on another host")
            return url, None
        if discovery.cursor is not None and page.cursor is not None:
            return self._list_url(page.cursor, number), page.cursor
        if discovery.page_param is not None and page.items:
            return self._list_url(None, number), None
        return None, None

    def _list_url(self, cursor: str | None, number: int) -> URL:
        discovery = self.config.discovery
        assert discovery is not None
        query: dict[str, str] = {}
        for key, value in discovery.request.query.items():
            if CURSOR_PLACEHOLDER not in value:
                query[key] = value
            elif cursor is not None:
                query[key] = value.replace(CURSOR_PLACEHOLDER, cursor)
        if discovery.page_param is not None:
            query[discovery.page_param] = str(number)
        return URL(f"{self.config.url}{discovery.request.path}").update_query(query)

    def _list_body(self, cursor: str | None) -> bytes | None:
        discovery = self.config.discovery
        if discovery is None or discovery.request.body is None:
            return None
        body = with_cursor(discovery.request.body, cursor)
        return json.dumps(body, separators=(",", ":")).encode()


def _bearer(headers: Mapping[str, str], token: str) -> dict[str, str]:
    return {**headers, "Authorization": f"Bearer {token}"}
