"""Each adapter's response parser, fuzzed: for any status, headers and body it
returns an observation or raises the one error type, never anything else."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from exporter.model import Observation, SourceError
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
header_values = st.dictionaries(
    st.sampled_from(["Retry-After", "X-RateLimit-Reset", "Content-Type"]),
    st.text(max_size=30).filter(lambda v: "\n" not in v and "\r" not in v),
    max_size=3,
)


def shaped(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the real keys and arbitrary values (the likely malformations)."""
    return st.fixed_dictionaries({}, optional={key: json_values for key in keys})


elevate_bodies = shaped(["id", "reason", "status"])
zilliant_bodies = shaped(
    ["status", "startDate", "stopDate", "clientErrorCallingService", "entityImportId"]
)
rocketchat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "step": json_values,
        "success": json_values,
        "count": shaped(["completed", "total", "error"]) | json_values,
    },
)


def response(status: int, headers: dict[str, str], body: bytes) -> HttpResponse:
    return HttpResponse(status, CIMultiDictProxy(CIMultiDict(headers)), body)


def assert_total(parse: Any, *args: Any) -> None:
    try:
        result = parse(*args)
    except SourceError:
        return
    assert isinstance(result, Observation)


def bodies(objects: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return (
        st.binary(max_size=200)
        | objects.map(lambda o: json.dumps(o).encode())
        | json_values.map(lambda o: json.dumps(o).encode())
    )


@settings(max_examples=300, deadline=None)
@given(statuses, header_values, bodies(elevate_bodies))
def test_elevate_parser_is_total(status: int, headers: dict[str, str], body: bytes) -> None:
    assert_total(elevate.parse_status, response(status, headers, body), "1")


@settings(max_examples=300, deadline=None)
@given(statuses, header_values, bodies(zilliant_bodies))
def test_zilliant_parser_is_total(status: int, headers: dict[str, str], body: bytes) -> None:
    assert_total(zilliant.parse_status, response(status, headers, body))


@settings(max_examples=200, deadline=None)
@given(statuses, header_values, bodies(json_values))
def test_salesforce_token_parser_is_total(
    status: int, headers: dict[str, str], body: bytes
) -> None:
    try:
        token = zilliant.parse_token(response(status, headers, body))
    except SourceError:
        return
    assert json.loads(token)["access_token"]


@settings(max_examples=300, deadline=None)
@given(statuses, header_values, bodies(rocketchat_bodies))
def test_rocketchat_parser_is_total(status: int, headers: dict[str, str], body: bytes) -> None:
    assert_total(rocketchat.parse_progress, response(status, headers, body))


@settings(max_examples=200, deadline=None)
@given(statuses, bodies(shaped(["operation", "success"])))
def test_rocketchat_operation_parser_is_total(status: int, body: bytes) -> None:
    assert rocketchat.parse_operation_valid(response(status, {}, body)) in (True, False, None)
