"""JMESPath expressions made into plain Python closures where they can be.

jmespath.py compiles an expression into a tree that an interpreter walks on
every search, dispatching on each node's type by name: at 10,000 polls a
second of three expressions each, that walk cost more than the rest of an
``http_json`` poll. The expressions recipes use most (``a.b.c``, ``a == 'x'``,
``a && b || c``, ``type(a)``) are turned here into nested closures with the
same semantics as jmespath.py's interpreter (its equality and truth rules,
copied below); anything else is searched by jmespath.py itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Number
from typing import Any

import jmespath
from jmespath.parser import ParsedResult

Search = Callable[[Any], Any]


def _is_actual_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, Number)


def _equals(left: Any, right: Any) -> bool:
    # jmespath.py: 0 and 1 never equal false and true, unlike in Python.
    if _is_actual_number(left) and left in (0, 1) and isinstance(right, bool):
        return False
    if _is_actual_number(right) and right in (0, 1) and isinstance(left, bool):
        return False
    return bool(left == right)


def is_false(value: Any) -> bool:
    """JMESPath's falsehood: null, false, and empty strings, lists and objects."""
    return value == "" or value == [] or value == {} or value is None or value is False


def _type_name(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, float | int):
        return "number"
    return "null" if value is None else None


def _field(name: str) -> Search:
    def search(value: Any) -> Any:
        return value.get(name) if isinstance(value, dict) else None

    return search


def _chain(steps: list[Search]) -> Search:
    if len(steps) == 2:
        first, second = steps

        def search_two(value: Any) -> Any:
            return second(first(value))

        return search_two

    def search(value: Any) -> Any:
        for step in steps:
            value = step(value)
        return value

    return search


def _comparator(operator: str, left: Search, right: Search) -> Search:
    if operator == "eq":
        return lambda value: _equals(left(value), right(value))
    return lambda value: not _equals(left(value), right(value))


def _and(left: Search, right: Search) -> Search:
    def search(value: Any) -> Any:
        matched = left(value)
        return matched if is_false(matched) else right(value)

    return search


def _or(left: Search, right: Search) -> Search:
    def search(value: Any) -> Any:
        matched = left(value)
        return right(value) if is_false(matched) else matched

    return search


def _not(inner: Search) -> Search:
    def search(value: Any) -> Any:
        result = inner(value)
        if _is_actual_number(result) and result == 0:
            return False  # !0 is false: 0 is not special in JMESPath
        return not result

    return search


def _build(node: Mapping[str, Any]) -> Search | None:
    """A closure for ``node``, or None where this module does not know it."""
    kind = node["type"]
    children: list[Mapping[str, Any]] = node.get("children", [])
    if kind == "field":
        return _field(node["value"])
    if kind == "literal":
        constant = node["value"]
        return lambda _: constant
    if kind in ("current", "identity"):
        return lambda value: value
    built = [_build(child) for child in children]
    if any(step is None for step in built):
        return None
    steps: list[Search] = [step for step in built if step is not None]
    if kind == "subexpression":
        return _chain(steps)
    if kind == "comparator" and node["value"] in ("eq", "ne"):
        return _comparator(node["value"], *steps)
    if kind == "and_expression":
        return _and(*steps)
    if kind == "or_expression":
        return _or(*steps)
    if kind == "not_expression":
        return _not(*steps)
    if kind == "function_expression" and node["value"] == "type" and len(steps) == 1:
        (argument,) = steps
        return lambda value: _type_name(argument(value))
    return None


def compile_search(expression: str) -> Search:
    """A function searching data with ``expression``: a closure where the
    expression is of the kinds above, else jmespath.py's own search. Raises
    jmespath's errors for an invalid expression (and, from the fallback, for
    a search that fails)."""
    parsed: ParsedResult = jmespath.compile(expression)
    return _build(parsed.parsed) or parsed.search
