"""Configuration: the strict schema, and a loader that reports every problem.

Errors name the file, the field and what is wrong, e.g.
``config.yaml: sources[1].interval: must be a duration like 30s``.
Secrets are resolved (inline value, environment variable or file) while
loading, so a missing secret file is a config error, not a runtime surprise.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from exporter.redact import register_secret

SOURCE_TYPES = ("elevate", "zilliant", "rocketchat")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ConfigError(Exception):
    """Every problem found in a configuration, one line each."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


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


ID_RULE = "must be 1-200 characters of letters, digits and . _ : @ -, not only dots"


def _id_to_str(value: Any) -> Any:
    # Import ids are opaque strings; YAML reads a bare 5537431447739019570 as an int.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


ImportId = Annotated[
    str,
    BeforeValidator(_id_to_str),
    # At least one character that is not a dot: "." and ".." cannot be
    # addressed in a URL path (clients collapse them).
    Field(
        min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]*[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*$"
    ),
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


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImportEntry(StrictModel):
    id: ImportId
    name: DisplayName | None = None


class SourceConfig(StrictModel):
    """Settings every source type has."""

    # Secrets of this source type: field name -> required. Each may be given
    # as ``<field>``, ``<field>_env`` or ``<field>_file``.
    SECRETS: ClassVar[dict[str, bool]] = {}

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    interval: Duration = 30.0
    timeout: Duration = 10.0
    concurrency: int = Field(default=4, ge=1, le=256)
    max_backoff: Duration = 300.0
    max_response_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)

    _secrets: dict[str, str] = PrivateAttr(default_factory=dict)

    def secret(self, field: str) -> str | None:
        """The resolved value of a secret field (None if optional and absent)."""
        return self._secrets.get(field)

    def import_entries(self) -> list[ImportEntry]:
        return []

    def deprecations(self) -> list[str]:
        """Settings that work today but will not for long; logged at (re)load."""
        return []


class ElevateConfig(SourceConfig):
    SECRETS: ClassVar[dict[str, bool]] = {"api_key": True}

    type: Literal["elevate"]
    url: str | None = None
    cluster_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$")
    api_version: Literal["v3", "v4"] = "v4"
    """v3 reaches its end of life on 2026-12-31 (Voyado): v4 by default."""
    api_key: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    imports: list[ImportEntry] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return _check_http_url(value)

    @model_validator(mode="after")
    def _url_or_cluster(self) -> ElevateConfig:
        if (self.url is None) == (self.cluster_id is None):
            raise PydanticCustomError("url", "give exactly one of url and cluster_id")
        return self

    def deprecations(self) -> list[str]:
        if self.api_version == "v3":
            return [
                "api_version v3: Voyado's admin import API v3 reaches its end of life on "
                "2026-12-31; set api_version: v4 (the default)"
            ]
        return []

    @property
    def base_url(self) -> str:
        if self.url is not None:
            return self.url.rstrip("/")
        return f"https://{self.cluster_id}.elevate-api.cloud"

    def import_entries(self) -> list[ImportEntry]:
        return list(self.imports)


class SalesforceConfig(StrictModel):
    SECRETS: ClassVar[dict[str, bool]] = {"client_secret": False, "password": False}

    token_url: str = "https://login.salesforce.com/services/oauth2/token"
    grant_type: Literal["password", "client_credentials"] = "password"
    client_id: str = Field(min_length=1)
    client_secret: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    username: str | None = None
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None

    _secrets: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        checked = _check_http_url(value)
        assert checked is not None
        return checked

    def secret(self, field: str) -> str | None:
        return self._secrets.get(field)


class ZilliantConfig(SourceConfig):
    SECRETS: ClassVar[dict[str, bool]] = {"token_json": False}

    type: Literal["zilliant"]
    url: str
    forwarded_host: str = Field(min_length=1)
    token_json: str | None = None
    token_json_env: str | None = None
    token_json_file: str | None = None
    salesforce: SalesforceConfig | None = None
    imports: list[ImportEntry] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        checked = _check_http_url(value)
        assert checked is not None
        return checked.rstrip("/")

    def import_entries(self) -> list[ImportEntry]:
        return list(self.imports)


class RocketChatConfig(SourceConfig):
    SECRETS: ClassVar[dict[str, bool]] = {"auth_token": True}

    type: Literal["rocketchat"]
    url: str
    user_id: str = Field(min_length=1)
    auth_token: str | None = None
    auth_token_env: str | None = None
    auth_token_file: str | None = None
    check_operation: bool = True
    """Also ask getCurrentImportOperation, whose ``valid: false`` marks a dead import."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        checked = _check_http_url(value)
        assert checked is not None
        return checked.rstrip("/")

    @property
    def server(self) -> str:
        """The import label of a Rocket.Chat source: the server it watches."""
        return re.sub(r"^https?://", "", self.url)


AnySourceConfig = Annotated[
    ElevateConfig | ZilliantConfig | RocketChatConfig, Field(discriminator="type")
]


class StorageConfig(StrictModel):
    path: str | None = None
    """SQLite file keeping registrations and what was learnt about every import
    across restarts; relative to the config file. ``--storage.path`` wins."""


API_TOKEN_MIN_LENGTH = 16


class ApiConfig(StrictModel):
    tokens_file: str | None = None
    """File of bearer tokens (one per line) that may call the write API; without
    it the write API is off. Read at every (re)load, so tokens rotate on reload."""
    max_imports_per_source: int = Field(default=10_000, ge=1, le=1_000_000)

    _tokens: tuple[str, ...] = PrivateAttr(default=())

    @property
    def tokens(self) -> tuple[str, ...]:
        return self._tokens


class Config(StrictModel):
    retention: Duration = 86400.0
    """How long a registered import stays after it finished (or was not found)."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    sources: list[AnySourceConfig] = Field(default_factory=list)

    _base_dir: Path | None = PrivateAttr(default=None)

    def storage_path(self) -> str | None:
        """The configured database path, resolved against the config file's folder."""
        if self.storage.path is None:
            return None
        path = Path(self.storage.path)
        if self._base_dir is not None and not path.is_absolute():
            path = self._base_dir / path
        return str(path)


def _check_http_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"^https?://[^\s/]+", value):
        raise PydanticCustomError("url", "must be an http:// or https:// URL")
    return no_control_characters(value)


# --- loading -----------------------------------------------------------------


SAFE_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)
"""libyaml's loader where PyYAML was built with it: about 3x faster than the
pure-Python one (14 s -> 4 s for a config of 100,000 imports); the same
documents, the same errors."""


def load_config(path: str | Path) -> Config:
    """Read, validate and resolve a config file; raise :class:`ConfigError`."""
    origin = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{origin}: cannot read: {exc.strerror or exc}"]) from exc
    return parse_config_text(text, origin, base_dir=Path(path).parent)


def parse_config_text(text: str, origin: str, base_dir: Path | None = None) -> Config:
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{origin}: {where}invalid YAML: {problem}"]) from exc
    return parse_config_data(data, origin, base_dir=base_dir)


def parse_config_data(data: Any, origin: str, base_dir: Path | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{origin}: the top level must be a mapping with a 'sources' list"])
    errors: list[str] = []
    raw_sources = data.get("sources", [])
    if not isinstance(raw_sources, list):
        raise ConfigError([f"{origin}: sources: must be a list"])
    # Validate each source on its own so that one broken source does not hide
    # the problems (secrets, duplicates) of the others.
    top: Config | None = None
    try:
        top = Config.model_validate({**data, "sources": []})
    except ValidationError as exc:
        errors += [f"{origin}: {loc}: {msg}" for loc, msg in _describe_errors(exc)]
    valid: list[tuple[int, SourceConfig]] = []
    for index, raw in enumerate(raw_sources):
        try:
            valid.append((index, _SOURCE_ADAPTER.validate_python(raw)))
        except ValidationError as exc:
            errors += [
                f"{origin}: {_format_loc(['sources', index])}{_join(loc)}: {msg}"
                for loc, msg in _describe_errors(exc)
            ]
    errors += [f"{origin}: {loc}: {msg}" for loc, msg in _check_sources(valid, base_dir)]
    api = top.api if top is not None else _valid_or_none(ApiConfig, data.get("api", {}))
    if api is not None:  # its tokens' problems too, even when other top-level keys are wrong
        errors += [f"{origin}: {loc}: {msg}" for loc, msg in _read_api_tokens(api, base_dir)]
    if errors or top is None:
        raise ConfigError(errors)
    config = top.model_copy(update={"sources": [source for _, source in valid]})
    config._base_dir = base_dir
    return config


def _valid_or_none(model: type[StrictModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError:
        return None  # already reported by the top-level validation


def _read_api_tokens(api: ApiConfig, base_dir: Path | None) -> Iterable[tuple[str, str]]:
    if api.tokens_file is None:
        return
    file = Path(api.tokens_file)
    if base_dir is not None and not file.is_absolute():
        file = base_dir / file
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        yield "api.tokens_file", f"cannot read {api.tokens_file}: {exc.strerror or exc}"
        return
    tokens: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < API_TOKEN_MIN_LENGTH or any(c.isspace() for c in token):
            # The line number, never the token: it may be a real secret.
            yield (
                "api.tokens_file",
                f"line {number}: a token must be at least {API_TOKEN_MIN_LENGTH} characters "
                "without spaces",
            )
            continue
        register_secret(token)
        tokens.append(token)
    if not tokens:
        yield "api.tokens_file", f"{api.tokens_file} holds no token"
    api._tokens = tuple(tokens)


_SOURCE_ADAPTER: TypeAdapter[SourceConfig] = TypeAdapter(AnySourceConfig)


def _join(loc: str) -> str:
    return "" if loc == "(top level)" else ("" if loc.startswith("[") else ".") + loc


def _describe_errors(exc: ValidationError) -> Iterable[tuple[str, str]]:
    for error in exc.errors():
        loc = list(error["loc"])
        # A discriminated union puts the tag ("elevate") into the location.
        loc = [
            part
            for i, part in enumerate(loc)
            if not (part in SOURCE_TYPES and (i == 0 or isinstance(loc[i - 1], int)))
        ]
        kind = error["type"]
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "required"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("type")
            message = "must be one of " + ", ".join(SOURCE_TYPES)
        elif kind == "string_pattern_mismatch":
            message = _pattern_message(loc)
        else:
            message = error["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
        yield _format_loc(loc), message


def _pattern_message(loc: list[Any]) -> str:
    field = loc[-1] if loc else ""
    if field == "id":
        return ID_RULE
    if field == "name":
        return "must be letters, digits and . _ : - only"
    return "has characters that are not allowed"


def _format_loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _check_sources(
    sources: list[tuple[int, SourceConfig]], base_dir: Path | None
) -> Iterable[tuple[str, str]]:
    seen: dict[str, int] = {}
    for index, source in sources:
        where = f"sources[{index}]"
        if source.name in seen:
            yield (
                f"{where}.name",
                f"{source.name!r} is already used by sources[{seen[source.name]}]",
            )
        else:
            seen[source.name] = index
        if source.timeout > source.interval:
            yield f"{where}.timeout", "must not be longer than interval"
        ids: dict[str, int] = {}
        for i, entry in enumerate(source.import_entries()):
            if entry.id in ids:
                yield f"{where}.imports[{i}].id", f"{entry.id!r} is listed twice"
            ids.setdefault(entry.id, i)
        yield from _resolve_secrets(source, where, base_dir)
        if isinstance(source, ZilliantConfig):
            yield from _check_zilliant(source, where, base_dir)


def _check_zilliant(
    source: ZilliantConfig, where: str, base_dir: Path | None
) -> Iterable[tuple[str, str]]:
    static = source.secret("token_json")
    if _secret_given(source, "token_json") == (source.salesforce is not None):
        yield where, "give exactly one of token_json (or token_json_env/_file) and salesforce"
    if static is not None:
        try:
            parsed = json.loads(static)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or "access_token" not in parsed:
            field = _given_field(source, "token_json") or "token_json"
            yield (
                f"{where}.{field}",
                "must hold the Salesforce token response (a JSON object with access_token)",
            )
    sf = source.salesforce
    if sf is not None:
        yield from _resolve_secrets(sf, f"{where}.salesforce", base_dir)
        if sf.grant_type == "password":
            if not sf.username:
                yield f"{where}.salesforce.username", "required for grant_type password"
            if sf.secret("password") is None and not _secret_given(sf, "password"):
                yield (
                    f"{where}.salesforce.password",
                    "required for grant_type password (or password_env/password_file)",
                )
        if sf.secret("client_secret") is None and not _secret_given(sf, "client_secret"):
            yield (
                f"{where}.salesforce.client_secret",
                "required (or client_secret_env/client_secret_file)",
            )


def _secret_given(model: BaseModel, field: str) -> bool:
    return _given_field(model, field) is not None


def _given_field(model: BaseModel, field: str) -> str | None:
    for name in (field, f"{field}_env", f"{field}_file"):
        if getattr(model, name, None) is not None:
            return name
    return None


def _resolve_secrets(
    model: SourceConfig | SalesforceConfig, where: str, base_dir: Path | None
) -> Iterable[tuple[str, str]]:
    for field, required in model.SECRETS.items():
        given = [
            name
            for name in (field, f"{field}_env", f"{field}_file")
            if getattr(model, name) is not None
        ]
        if len(given) > 1:
            yield f"{where}.{given[1]}", f"give only one of {field}, {field}_env and {field}_file"
            continue
        if not given:
            if required:
                yield f"{where}.{field}", f"required (or {field}_env / {field}_file)"
            continue
        name = given[0]
        raw: str = getattr(model, name)
        value: str | None
        if name.endswith("_env"):
            value = os.environ.get(raw)
            if value is None:
                yield f"{where}.{name}", f"environment variable {raw} is not set"
                continue
        elif name.endswith("_file"):
            file = Path(raw)
            if base_dir is not None and not file.is_absolute():
                file = base_dir / file
            try:
                value = file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                yield f"{where}.{name}", f"cannot read {raw}: {exc.strerror or exc}"
                continue
        else:
            value = raw
        if not value:
            yield f"{where}.{name}", "is empty"
            continue
        register_secret(value)
        model._secrets[field] = value
