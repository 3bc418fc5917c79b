"""Config errors: every problem at once, each naming the file, field and problem,
e.g. ``config.yaml: sources[1].interval: must be a duration like 30s``."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from pydantic import ValidationError

ID_RULE = "must be 1-200 characters of letters, digits and . _ : @ -, not only dots"


class ConfigError(Exception):
    """Every problem found in a configuration, one line each."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def describe_errors(
    exc: ValidationError, union_tags: Collection[str] = ()
) -> Iterable[tuple[str, str]]:
    """(location, message) of each pydantic error, in words a user knows.

    ``union_tags``: the values of a discriminated union's tag (the source
    types); pydantic puts the tag into the location, where it means nothing
    to the user, and names them when the tag is wrong."""
    for error in exc.errors():
        loc = list(error["loc"])
        loc = [
            part
            for i, part in enumerate(loc)
            if not (part in union_tags and (i == 0 or isinstance(loc[i - 1], int)))
        ]
        kind = error["type"]
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown field"  # the second: a key a dataclass (ImportEntry) lacks
        elif kind == "missing":
            message = "required"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("type")
            message = "must be one of " + ", ".join(union_tags)
        elif kind == "string_pattern_mismatch":
            message = _pattern_message(loc)
        else:
            message = error["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
        yield format_loc(loc), message


def _pattern_message(loc: list[Any]) -> str:
    field = loc[-1] if loc else ""
    if field == "id":
        return ID_RULE
    if field == "name":
        return "must be letters, digits and . _ : - only"
    return "has characters that are not allowed"


def format_loc(loc: Iterable[Any]) -> str:
    """``["sources", 1, "interval"]`` -> ``sources[1].interval``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"
