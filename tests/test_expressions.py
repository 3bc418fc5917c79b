"""The closures http_json searches with give what jmespath.py's own search
gives, for any JSON, on the expressions they cover and on those they leave
to jmespath.py."""

from __future__ import annotations

from typing import Any

import jmespath
import jmespath.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jmespath.parser import ParsedResult

from exporter.sources.expressions import compile_search

FAST = [
    "a",
    "a.b",
    "a.b.c",
    "@",
    "`[1, 2]`",
    "a == 'x'",
    "a != `1`",
    "a == `true`",
    "a == `0`",
    "a.b == c",
    "a && b",
    "a || b",
    "a && b || c",
    "!a",
    "!a.b",
    "type(a)",
    "type(a) == 'string' && a || null",
    "contains_nothing == null",
]
FALLBACK = ["a[0]", "a[?b == 'x']", "length(a)", "a[*].b", "a < `3`", "contains(['x'], a)"]

scalars = (
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, 0.0, 1.0, "", "x", "0"])
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "c", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
documents = st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=3) | values


def outcome(search: Any, data: Any) -> tuple[str, Any]:
    try:
        return "value", search(data)
    except (jmespath.exceptions.JMESPathError, TypeError) as exc:
        return "error", type(exc)


@pytest.mark.parametrize("expression", FAST)
def test_common_expressions_become_closures(expression: str) -> None:
    assert not isinstance(getattr(compile_search(expression), "__self__", None), ParsedResult)


@pytest.mark.parametrize("expression", FALLBACK)
def test_others_are_left_to_jmespath(expression: str) -> None:
    assert isinstance(getattr(compile_search(expression), "__self__", None), ParsedResult)


@settings(max_examples=300, deadline=None)
@given(data=documents)
def test_same_results_as_jmespath(data: Any) -> None:
    for expression in FAST + FALLBACK:
        expected = outcome(jmespath.compile(expression).search, data)
        got = outcome(compile_search(expression), data)
        # Compared with their types: 1 == True in Python, not in JMESPath.
        assert (got, type(got[1])) == (expected, type(expected[1])), expression
