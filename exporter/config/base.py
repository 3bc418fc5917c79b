"""The building blocks of every config model: strict models, durations, import
ids and names, the one URL type, and secrets given inline, by environment
variable or by file."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, ClassVar, final

import pydantic.dataclasses
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr
from pydantic_core import PydanticCustomError

from exporter.config.errors import ID_RULE

__all__ = ["ID_RULE"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """Prometheus-style duration (``30s``, ``5m``, ``1h30m``, ``500ms``) to seconds."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", "must be a duration like 30s")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value and _DURATION_PART.sub("", value) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
    else:
        raise PydanticCustomError("duration", "must be a duration like 30s")
    if seconds <= 0:
        raise PydanticCustomError("duration", "must be a duration greater than 0, like 30s")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _id_to_str(value: Any) -> Any:
    # Import ids are opaque strings; YAML reads a bare 5537431447739019570 as an int.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


SOURCE_NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"
"""A source's name: what the ``source`` label, the API's paths and cursors carry."""
IMPORT_ID_PATTERN = r"^[A-Za-z0-9._:@-]*[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*$"
"""At least one character that is not a dot: "." and ".." cannot be addressed
in a URL path (clients collapse them)."""

ImportId = Annotated[
    str,
    BeforeValidator(_id_to_str),
    Field(min_length=1, max_length=200, pattern=IMPORT_ID_PATTERN),
]


CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 controls, DEL and the Unicode line and paragraph separators: in a
label value or on the page they would reach a terminal or a log as they are."""


def no_control_characters(value: str | None) -> str | None:
    """Refuse text with control characters, naming the first one."""
    if value is not None and (found := CONTROL_CHARACTERS.search(value)):
        raise PydanticCustomError(
            "control_characters",
            "must not contain control characters (found U+{code})",
            {"code": f"{ord(found.group()):04X}"},
        )
    return value


DisplayName = Annotated[str, Field(max_length=200), AfterValidator(no_control_characters)]
"""An import's human name: shown as the ``name`` label and on the page."""


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise PydanticCustomError("url", "must be an http:// or https:// URL")
    checked = no_control_characters(value)
    assert checked is not None
    return checked.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""An http:// or https:// URL without control characters, its trailing slash
dropped (paths are appended to it)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A slotted dataclass, not a model: a model also keeps a ``__dict__`` and a
# set of the fields given, about 450 bytes more for each of 100,000 imports.
@final  # pickled as an ImportEntry (__reduce__): a subclass would come back as one
@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class ImportEntry:
    """One import listed in the file."""

    id: ImportId
    name: DisplayName | None = None

    def __reduce__(self) -> tuple[Any, tuple[str, str | None]]:
        # Pickled (a config parsed in a child process, ConfigApart) by value:
        # the dataclass's own state methods took 0.4 s to pickle and 0.17 s
        # to unpickle 100,000 imports, on the start-up's path.
        return _import_entry, (self.id, self.name)


def _import_entry(id: str, name: str | None) -> ImportEntry:
    """An :class:`ImportEntry` unpickled: its values were validated when it was made."""
    entry = object.__new__(ImportEntry)
    object.__setattr__(entry, "id", id)
    object.__setattr__(entry, "name", name)
    return entry


class SecretHolder(StrictModel):
    """A model with secret fields. Each secret ``X`` may be given as ``X``
    (inline), ``X_env`` (an environment variable's name) or ``X_file`` (a
    file); the loader resolves it to its value, read with :meth:`secret`."""

    SECRETS: ClassVar[dict[str, bool]] = {}
    """Secret field name -> required."""

    _secrets: dict[str, str] = PrivateAttr(default_factory=dict)

    def secret(self, field: str) -> str | None:
        """The resolved value of a secret field (None if optional and absent)."""
        return self._secrets.get(field)

    def remember_secret(self, field: str, value: str) -> None:
        """Keep a secret's resolved value (the loader calls this once)."""
        self._secrets[field] = value

    def given_field(self, field: str) -> str | None:
        """Which of ``X``, ``X_env`` and ``X_file`` the file gave (None: none)."""
        for name in (field, f"{field}_env", f"{field}_file"):
            if getattr(self, name, None) is not None:
                return name
        return None

    def secret_values(self) -> Iterator[str]:
        yield from self._secrets.values()


class SourceConfig(SecretHolder):
    """Settings every source type has. Each type subclasses it in its own
    module, with ``type: Literal["<its type>"]``."""

    name: str = Field(min_length=1, max_length=100, pattern=SOURCE_NAME_PATTERN)
    interval: Duration = 30.0
    timeout: Duration = 10.0
    concurrency: int = Field(default=4, ge=1, le=256)
    max_backoff: Duration = 300.0
    max_response_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)

    def import_entries(self) -> list[ImportEntry]:
        """The imports listed in the file (none for a source without ids)."""
        return []

    def secret_holders(self) -> Iterator[tuple[str, SecretHolder]]:
        """(field path, model) of every part with secrets: itself, and nested
        models (a Salesforce login) where a type has them."""
        yield "", self

    def check(self) -> Iterable[tuple[str, str]]:
        """Cross-field problems as (field, message), once secrets are resolved."""
        return ()

    def deprecations(self) -> list[str]:
        """Settings that work today but will not for long; logged at (re)load."""
        return []


class WithImports(SourceConfig):
    """A source type whose targets are import ids listed under ``imports``."""

    imports: list[ImportEntry] = Field(default_factory=list)

    def import_entries(self) -> list[ImportEntry]:
        return list(self.imports)
