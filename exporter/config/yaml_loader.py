"""The YAML loader of every file the exporter reads (its config, its web
config): PyYAML's safe loader, faster on large plain documents, and its
errors as one line with their place."""

from __future__ import annotations

from typing import Any

import yaml

_LIBYAML_OR_PURE: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)
"""libyaml's loader where PyYAML was built with it: about 3x faster than the
pure-Python one (14 s -> 4 s for a config of 100,000 imports); the same
documents, the same errors."""

_STR_TAG = "tag:yaml.org,2002:str"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "binary", "timestamp")
)
"""The tags whose value PyYAML's safe constructor builds from a scalar at once."""
SHOWN_REASON = 160
"""Characters of why a scalar cannot be read that an error shows."""


class _NotPlain(Exception):
    """A node :class:`SafeLoader` builds otherwise than as a fresh str, list or dict."""


class SafeLoader(_LIBYAML_OR_PURE):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader, building a document of plain mappings,
    sequences and string keys (every config) in one pass over its nodes:
    PyYAML's constructor, for each node, looks up its constructor, keeps it
    for aliases and builds mappings through generators, 1.7-2.4 s of a
    100,000-import config (1.2 s in all this way). A scalar of another
    tag (a number, a boolean, a date) is PyYAML's own constructor's. A
    document with anything else (an alias, a merge key ``<<``, a key that is
    not a string, a tag such as ``!!set``) or that fails is built again by
    PyYAML's constructor alone: the same data, the same errors, but one: a
    scalar its tag cannot read (``!!int nope``) is a YAML error with its
    place (not its value), not PyYAML's bare ValueError, KeyError or
    AttributeError."""

    def construct_document(self, node: yaml.Node) -> Any:
        try:
            return self._plain(node, set())
        except Exception:
            self.constructed_objects.clear()
            self.recursive_objects.clear()
            self.state_generators.clear()
            self.deep_construct = False
            return super().construct_document(node)
        finally:
            self.constructed_objects.clear()

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            if not isinstance(node, yaml.ScalarNode):
                raise
            # Not the value: its place says which, and it may be a secret.
            problem = f"not a valid {node.tag.replace('tag:yaml.org,2002:', '!!')}"
            # Why, unless that repeats the value ("invalid literal ... 'nope'").
            if isinstance(exc, ValueError) and node.value not in str(exc):
                problem += f" ({str(exc)[:SHOWN_REASON]})"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from exc

    def _plain(self, node: yaml.Node, seen: set[int]) -> Any:
        # A node met twice is an alias: PyYAML's gives one shared object.
        if id(node) in seen:
            raise _NotPlain
        seen.add(id(node))
        kind, tag = type(node), node.tag
        if kind is yaml.ScalarNode:
            if tag == _STR_TAG:
                return node.value
            # A collection's tag on a scalar fails only in a step PyYAML's
            # construct_document takes after the build (its generators).
            if tag not in _SCALAR_TAGS:
                raise _NotPlain
            return self.construct_object(node)
        if kind is yaml.SequenceNode and tag == _SEQ_TAG:
            return [self._plain(item, seen) for item in node.value]
        if kind is yaml.MappingNode and tag == _MAP_TAG:
            mapping = {}
            for key, value in node.value:
                if type(key) is not yaml.ScalarNode or key.tag != _STR_TAG or id(key) in seen:
                    raise _NotPlain
                seen.add(id(key))
                mapping[key.value] = self._plain(value, seen)
            return mapping
        raise _NotPlain


def yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: invalid YAML: problem`` on one line (its place
    where PyYAML knows it; what it was reading when it matters, as in
    ``found duplicate anchor; first occurrence; second occurrence``)."""
    mark = getattr(exc, "problem_mark", None)
    where = "" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: "
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and not context.startswith("while "):
        problem = f"{context}; {problem}"
    # A reader's error (a NUL byte) has no mark but a second line with its position.
    return f"{where}invalid YAML: {' '.join(problem.split())}"
