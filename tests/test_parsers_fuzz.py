"""Each adapter's response parser, fuzzed: for any status, headers and body it
returns an observation or raises the one error type, never anything else.

The precise contract: a 200 answer gives an observation or exactly
:class:`ParseError`; any other status gives the source's answer for it (an
observation where the status means "not found") or a plain :class:`SourceError`
whose reason follows from the status, never a ParseError. A wait the upstream
asks for is a finite number of seconds, or none."""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from exporter.model import ErrorReason, Observation, ParseError, SourceError, State
from exporter.sources import elevate, rocketchat, zilliant
from exporter.sources.base import HttpResponse

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
statuses = st.sampled_from([200, 200, 200, 400, 401, 403, 404, 406, 429, 500, 503]) | st.integers(
    100, 599
)
# Waits as upstreams send them, and the numbers float() takes but no one can wait for.
WAITS = ["1", "120", "-5", "0.5", "inf", "-inf", "nan", "1e999", "Infinity", "1790000000000"]
header_values = st.dictionaries(
    st.sampled_from(["Retry-After", "X-RateLimit-Reset", "Content-Type"]),
    st.sampled_from(WAITS)
    | st.floats().map(repr)
    | st.integers(0, 2000).map(lambda s: email.utils.formatdate(1.79e9 + s, usegmt=True))
    | st.text(max_size=30).filter(lambda v: "\n" not in v and "\r" not in v),
    max_size=3,
)


def shaped(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the real keys and arbitrary values (the likely malformations)."""
    return st.fixed_dictionaries({}, optional={key: json_values for key in keys})


elevate_bodies = shaped(["id", "reason", "status"])
zilliant_bodies = shaped(
    ["status", "startDate", "stopDate", "clientErrorCallingService", "entityImportId"]
)
NOT_FOUND_TEXTS = st.sampled_from(
    ["error-operation-not-found", "Import Operation Not Found [error-operation-not-found]"]
)
rocketchat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "step": json_values,
        "success": json_values,
        "count": shaped(["completed", "total", "error"]) | json_values,
        "errorType": NOT_FOUND_TEXTS | json_values,
        "error": NOT_FOUND_TEXTS | json_values,
    },
)


def never_imported(r: HttpResponse) -> bool:
    """Rocket.Chat's 400 whose error (errorType, else error, else message) is
    error-operation-not-found: the server has never imported anything. A body
    that is not JSON (RFC 8259) says nothing."""
    if r.status != 400:
        return False
    try:
        body = reference_json(r.body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(body, dict):
        return False
    said = next(
        (v for k in ("errorType", "error", "message") if isinstance(v := body.get(k), str)), ""
    )
    return "error-operation-not-found" in said


def response(status: int, headers: dict[str, str], body: bytes) -> HttpResponse:
    return HttpResponse(status, CIMultiDictProxy(CIMultiDict(headers)), body)


def reason_for(status: int) -> ErrorReason:
    """How a non-200 status is classified (``error_for_status``)."""
    if status in (401, 403):
        return ErrorReason.UNAUTHORIZED
    if status == 429:
        return ErrorReason.RATE_LIMITED
    return ErrorReason.SERVER_ERROR if status >= 500 else ErrorReason.CLIENT_ERROR


def check_error(
    error: SourceError,
    response: HttpResponse,
    overrides: dict[int, ErrorReason],
    not_found: Callable[[HttpResponse], bool],
) -> None:
    """What a parser may raise for ``response``: ParseError only for a 200, a
    plain SourceError with the status's reason otherwise."""
    if isinstance(error, ParseError):
        assert response.status == 200, f"ParseError for HTTP {response.status}: {error}"
        assert error.reason is ErrorReason.INVALID_RESPONSE
        assert error.retry_after is None
        return
    assert response.status != 200, f"{type(error).__name__} for a 200 answer: {error}"
    assert type(error) is SourceError, type(error)
    assert error.reason is overrides.get(response.status, reason_for(response.status))
    assert not_found(response) is False, "a not-found answer raised"
    wait = error.retry_after
    assert wait is None or (math.isfinite(wait) and wait >= 0), wait
    if error.reason not in (ErrorReason.RATE_LIMITED, ErrorReason.SERVER_ERROR):
        assert wait is None


def assert_total(
    parse: Callable[[HttpResponse], Any],
    response: HttpResponse,
    *,
    overrides: dict[int, ErrorReason] | None = None,
    not_found: Callable[[HttpResponse], bool] = lambda _: False,
) -> Any:
    """Check the contract above; returns what the parser returned (None if it raised).

    ``overrides``: statuses a parser classifies its own way; ``not_found``: the
    non-200 answers that mean "no such import" (an observation, not an error).
    """
    try:
        result = parse(response)
    except SourceError as error:
        check_error(error, response, overrides or {}, not_found)
        return None
    if response.status != 200:
        assert not_found(response), f"an observation for HTTP {response.status}"
        assert isinstance(result, Observation)
        assert result.state is State.NOT_FOUND
    if isinstance(result, Observation):
        assert isinstance(result.upstream_state, str)
        assert len(result.upstream_state) <= 100
        for count in (result.items_completed, result.items_expected, result.items_failed):
            assert count is None or (type(count) is int and count >= 0)
    return result


# JSON nested deeper than the decoder's recursion limit, well within the size cap.
DEEP = st.sampled_from([b"[" * 100_000, b'{"status": ' * 50_000, b"[" * 5_000 + b"]" * 5_000])


def bodies(objects: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return (
        st.binary(max_size=200)
        | objects.map(lambda o: json.dumps(o).encode())
        | json_values.map(lambda o: json.dumps(o).encode())
        | DEEP
    )


@settings(max_examples=300, deadline=None)
@given(statuses, header_values, bodies(elevate_bodies))
def test_elevate_parser_is_total(status: int, headers: dict[str, str], body: bytes) -> None:
    result = assert_total(
        lambda r: elevate.parse_status(r, "1"),
        response(status, headers, body),
        overrides={404: ErrorReason.CLIENT_ERROR},  # "cluster not found": a bad URL
    )
    assert result is None or isinstance(result, Observation)


@settings(max_examples=300, deadline=None)
@given(statuses, header_values, bodies(zilliant_bodies))
def test_zilliant_parser_is_total(status: int, headers: dict[str, str], body: bytes) -> None:
    result = assert_total(
        lambda r: zilliant.parse_status(r, "1"),
        response(status, headers, body),
        overrides={404: ErrorReason.CLIENT_ERROR},  # a 404 not about the import: a bad URL
        not_found=lambda r: r.status == 404 and zilliant.is_import_not_found(r, "1"),
    )
    assert result is None or isinstance(result, Observation)


@settings(max_examples=200, deadline=None)
@given(statuses, header_values, bodies(json_values))
def test_salesforce_token_parser_is_total(
    status: int, headers: dict[str, str], body: bytes
) -> None:
    token = assert_total(
        zilliant.parse_token,
        response(status, headers, body),
        # Salesforce answers bad credentials with 400 invalid_grant / invalid_client.
        overrides=dict.fromkeys([400, 401, 403], ErrorReason.UNAUTHORIZED),
    )
    if token is not None:
        assert isinstance(json.loads(token)["access_token"], str)


@settings(max_examples=300, deadline=None)
@given(statuses, header_values, bodies(rocketchat_bodies))
# Not JSON (Infinity), so not the not-found answer either; found by this test.
@example(400, {}, b'{"":Infinity,"error":"error-operation-not-found"}')
def test_rocketchat_parser_is_total(status: int, headers: dict[str, str], body: bytes) -> None:
    result = assert_total(
        rocketchat.parse_progress, response(status, headers, body), not_found=never_imported
    )
    assert result is None or isinstance(result, Observation)


@settings(max_examples=200, deadline=None)
@given(statuses, bodies(shaped(["operation", "success"])))
def test_rocketchat_operation_parser_is_total(status: int, body: bytes) -> None:
    assert rocketchat.parse_operation_valid(response(status, {}, body)) in (True, False, None)


def reference_json(body: bytes) -> Any:
    """What a body means as JSON (RFC 8259): the standard library's reading,
    without the constants and out-of-range numbers Python reads but JSON has not."""

    def refuse(text: str) -> Any:
        raise ValueError(text)

    def finite(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(text)
        return number

    return json.loads(body, parse_constant=refuse, parse_float=finite)


# JSON texts, and what breaks them: whitespace around, text after, other
# encodings (the BOMs and null bytes that json.detect_encoding reads), bare bytes.
json_texts = st.one_of(
    st.builds(
        lambda value, ascii_only, before, after, encoding: (
            before + json.dumps(value, ensure_ascii=ascii_only) + after
        ).encode(encoding, "surrogatepass"),
        json_values,
        st.booleans(),
        # JSON's whitespace, and what is whitespace to str.strip but not to JSON.
        st.sampled_from(["", " ", "\n\t\r ", "\x0c", "\xa0", "\u2028"]),
        st.sampled_from(["", " ", "\n", " x", "}", "{}", "\x00", "\x0b", "\x85", "\u3000"]),
        st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]),
    ),
    st.sampled_from(
        [b"NaN", b"[Infinity]", b"-Infinity", b"1e999", b"[1e400]", b"{", b"", b" ", b"{}x"]
    ),
    st.binary(max_size=12),
)


@settings(max_examples=600)
@given(json_texts)
def test_any_body_is_read_as_json_reads_it_or_is_a_parse_error(body: bytes) -> None:
    from exporter.sources.base import parse_json

    try:
        expected = reference_json(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        with pytest.raises(ParseError):
            parse_json(body)
        return
    assert parse_json(body) == expected
