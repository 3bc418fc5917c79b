"""The config's YAML loader builds what PyYAML's safe loader builds, the same
data and the same errors, whatever the document holds (its one-pass build
of plain documents is a start-up speed-up, never a second YAML dialect)."""

from __future__ import annotations

import datetime
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import ConfigError
from exporter.config.loader import parse_config_text
from exporter.config.yaml_loader import SafeLoader

REFERENCE: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""PyYAML's own safe loader (libyaml's where PyYAML has it, as the config's
loader is built on it): what every document must load as."""


def typed(value: Any, inside: tuple[int, ...] = ()) -> Any:
    """``value`` with each scalar's type beside it: 1, 1.0 and True are equal
    in Python, not in a config. A collection inside itself is shown as how
    many levels up it is."""
    if isinstance(value, dict | list) and id(value) in inside:
        return ("itself", inside[::-1].index(id(value)))
    inside += (id(value),)
    if isinstance(value, dict):
        return ("dict", [(typed(k, inside), typed(v, inside)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(item, inside) for item in value])
    if isinstance(value, set):
        return ("set", sorted(map(repr, value)))
    if isinstance(value, float) and value != value:
        return ("float", "nan")
    return (type(value).__name__, value)


def outcome(text: str, loader: type[Any]) -> Any:
    try:
        return typed(yaml.load(text, Loader=loader))
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))


scalars = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.dates(),
    st.sampled_from(
        ["yes", "no", "on", "off", "~", "null", "0x1F", "0o17", "1_000", "1:30", "-.inf"]
    ),
)
keys = st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none())
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from([None, False, True]))
def test_any_document_loads_as_pyyaml_loads_it(data: Any, flow: bool | None) -> None:
    text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    assert outcome(text, SafeLoader) == outcome(text, REFERENCE)


@pytest.mark.parametrize(
    "text",
    [
        # Plain strings where YAML 1.1 reads other types.
        "a: yes\nb: 'yes'\nc: 010\nd: 0x10\ne: 1_0\nf: 1:30\ng: .nan\nh: ~\ni: 2026-11-26",
        "when: 2026-11-26T10:00:00Z\nblob: !!binary aGVsbG8=\nforced: !!str 123\nnum: !!int '7'",
        # Keys that are not strings.
        "1: one\ntrue: t\n~: nothing\n2026-01-01: day",
        # Aliases, shared and recursive; merge keys.
        "base: &b {x: 1}\nuse: *b\nlist: [*b, *b]",
        "&r [1, *r]",
        "defaults: &d {interval: 30s}\nsource:\n  <<: *d\n  name: e",
        "source:\n  <<: [{a: 1}, {b: 2}]\n  a: 3",
        # Tags of other collections.
        "s: !!set {a, b}\no: !!omap [{a: 1}, {b: 2}]\np: !!pairs [{a: 1}, {a: 2}]",
        # A collection's tag on a scalar: PyYAML's error, not an empty one.
        "!!seq foo",
        "a: !!map foo",
        "a: !!set foo",
        "- !!omap foo\n- !!pairs x",
        "- !!seq foo\n- &a x\n- *a",
        # Duplicate keys: the last wins, as in PyYAML.
        "a: 1\na: 2",
        # Errors: the same, word for word.
        "a: !custom 1",
        "? [1, 2]\n: unhashable",
        "a: 1\n---\nb: 2",
        "a: [1, 2",
        "",
        "# only a comment",
    ],
)
def test_unusual_documents_load_as_pyyaml_loads_them(text: str) -> None:
    assert outcome(text, SafeLoader) == outcome(text, REFERENCE)


def test_each_document_of_a_stream_loads_as_pyyaml_loads_it() -> None:
    text = "--- !!seq foo\n--- [a]\n"
    with pytest.raises(yaml.constructor.ConstructorError) as theirs:
        list(yaml.load_all(text, Loader=REFERENCE))
    with pytest.raises(yaml.constructor.ConstructorError) as ours:
        list(yaml.load_all(text, Loader=SafeLoader))
    assert str(ours.value) == str(theirs.value)


def test_an_alias_stays_one_shared_object() -> None:
    data = yaml.load("base: &b {x: 1}\nuse: *b", Loader=SafeLoader)
    assert data["base"] is data["use"]
    recursive = yaml.load("&r [1, *r]", Loader=SafeLoader)
    assert recursive[1] is recursive


def test_a_plain_config_is_built_without_pyyamls_constructor_per_node() -> None:
    """The speed-up itself: only the scalars that are not strings (here the
    concurrency) go through PyYAML's per-node constructor."""
    imports = "".join(f"      - id: i-{n}\n        name: import {n}\n" for n in range(50))
    text = (
        "sources:\n  - name: e\n    type: elevate\n    cluster_id: c1\n"
        f"    api_key: k-123456\n    concurrency: 4\n    imports:\n{imports}"
    )
    with mock.patch.object(
        SafeLoader, "construct_object", autospec=True, side_effect=SafeLoader.construct_object
    ) as per_node:
        data = yaml.load(text, Loader=SafeLoader)
    assert data == yaml.load(text, Loader=REFERENCE)
    assert per_node.call_count == 1
    config = parse_config_text(text, "config.yaml")
    assert len(config.sources[0].import_entries()) == 50


def test_a_scalar_too_long_to_read_says_why() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text("sources: []\nport: " + "9" * 5000 + "\n", "config.yaml")
    (line,) = caught.value.errors
    assert line.startswith(
        "config.yaml: line 2, column 7: invalid YAML: not a valid !!int (Exceeds the limit"
    )
    assert "99999" not in line
    assert len(line) < 300


def test_a_value_that_cannot_be_read_is_not_shown() -> None:
    """It may be a secret: its place says which value it is."""
    with pytest.raises(ConfigError) as caught:
        parse_config_text("sources: []\napi: {token: !!int s3cr3t-t0ken}\n", "config.yaml")
    assert caught.value.errors == [
        "config.yaml: line 2, column 14: invalid YAML: not a valid !!int"
    ]


def test_dates_and_numbers_keep_their_types() -> None:
    data = yaml.load("d: 2026-11-26\nn: 3\nf: 1.5\nb: false", Loader=SafeLoader)
    assert data == {"d": datetime.date(2026, 11, 26), "n": 3, "f": 1.5, "b": False}
    assert [type(v) for v in data.values()] == [datetime.date, int, float, bool]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("!!int nope", "not a valid !!int"),
        ("!!int 1e999", "not a valid !!int"),
        ("!!float abc", "not a valid !!float"),
        ("!!bool maybe", "not a valid !!bool"),
        ("!!timestamp nope", "not a valid !!timestamp"),
        ("2020-02-30", "not a valid !!timestamp (day is out of range for month)"),
    ],
)
def test_a_scalar_its_tag_cannot_read_is_a_config_error_with_its_place(
    value: str, problem: str
) -> None:
    """PyYAML raises these as a ValueError, KeyError or AttributeError, which
    the loader let through as a traceback."""
    text = f"sources: []\nlisten:\n  port: {value}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, "config.yaml")
    assert caught.value.errors == [f"config.yaml: line 3, column 9: invalid YAML: {problem}"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "a: &x 1\nb: &x 2\n",
            "config.yaml: line 2, column 4: invalid YAML: "
            "found duplicate anchor; first occurrence; second occurrence",
        ),
        (
            "a: \x00\n",
            "config.yaml: invalid YAML: unacceptable character #x0000: control characters "
            'are not allowed in "<unicode string>", position 3',
        ),
        (
            "a: [1, 2",
            "config.yaml: line 2, column 1: invalid YAML: did not find expected ',' or ']'",
        ),
    ],
)
def test_a_yaml_error_is_one_line_with_what_and_where(text: str, error: str) -> None:
    """(libyaml's wording, which CI has.)"""
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, "config.yaml")
    assert caught.value.errors == [error]
