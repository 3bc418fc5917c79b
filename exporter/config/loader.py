"""The loader: reads a config file, validates it strictly and resolves its
secrets, reporting every problem at once with the file, field and problem,
e.g. ``config.yaml: sources[1].interval: must be a duration like 30s``.

Each entry of ``sources`` is validated by the model of its ``type``, taken
from the source registry (:mod:`exporter.sources.registry`): the loader sits
above the sources in the import graph, the config's building blocks below.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from exporter.config.base import SourceConfig, StrictModel
from exporter.config.errors import ConfigError, describe_errors, format_loc
from exporter.config.model import API_TOKEN_MIN_LENGTH, ApiConfig, Config
from exporter.config.secrets import resolve_secrets
from exporter.config.yaml_loader import SafeLoader, yaml_problem
from exporter.sources.registry import SOURCE_CONFIG, SOURCE_TYPES

log = logging.getLogger(__name__)

# --- loading -----------------------------------------------------------------


def load_config(path: str | Path, *, expand_env: bool = False) -> Config:
    """Read, validate and resolve a config file; raise :class:`ConfigError`.

    ``expand_env`` (``--config.expand-env``): ``${VAR}`` and ``${VAR:-default}``
    are replaced anywhere in the file before it is parsed."""
    origin = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{origin}: cannot read: {exc.strerror or exc}"]) from exc
    return parse_config_text(text, origin, base_dir=Path(path).parent, expand_env=expand_env)


def load_config_apart(path: str | Path, *, expand_env: bool = False) -> Config:
    """:func:`load_config` in a forked child process (:class:`ConfigApart`)."""
    return ConfigApart(path, expand_env=expand_env).result()


class ConfigApart:
    """:func:`load_config` in a forked child process, which starts at once:
    this one goes on meanwhile (start-up restores the store on the other
    core), and :meth:`result` only unpickles the config (or the
    :class:`ConfigError`).

    Parsing 100,000 imports makes and frees a YAML tree and the validator's
    intermediates around the objects kept: the freed blocks stay in this
    heap's arenas among the kept ones, never returned (160 MB at 100,000
    imports, 1.6 KB per import of RSS). Unpickled here, the config alone
    takes fresh arenas. Where there is no ``fork`` or already a second
    thread (forking one is unsafe), it loads here; where the fork or the
    child fails, it says so and loads here, which also raises what the
    child hit."""

    def __init__(self, path: str | Path, *, expand_env: bool = False) -> None:
        self.path, self.expand_env = path, expand_env
        self._child: tuple[int, int] | None = None
        """The child's pid and the reading end of its pipe."""
        if not hasattr(os, "fork") or threading.active_count() > 1:
            return
        try:
            self._child = _start_child(path, expand_env)
        except OSError as exc:
            log.warning("cannot parse the config in a child process (%s); parsing it here", exc)

    def result(self) -> Config:
        """The config; raises :class:`ConfigError`. Once only."""
        if self._child is None:
            return load_config(self.path, expand_env=self.expand_env)
        data = _answer_of(*self._child)
        self._child = None
        if not data:
            log.warning("parsing the config in a child process failed; parsing it here")
            return load_config(self.path, expand_env=self.expand_env)
        outcome = pickle.loads(data)  # our own child's answer, through our own pipe
        if isinstance(outcome, list):
            raise ConfigError(outcome)
        assert isinstance(outcome, Config)
        return outcome


def _start_child(path: str | Path, expand_env: bool) -> tuple[int, int]:
    """A forked child that writes the pickled config (or the ConfigError's
    lines) to a pipe: its pid and the pipe's reading end. Raises OSError if
    it cannot be forked."""
    reading, writing = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(reading)
        os.close(writing)
        raise
    if pid == 0:  # the child: no cleanup of what the parent owns, whatever happens
        code = 1
        try:
            # Signals sent to the child are the child's: not the event loop's
            # no-op handlers, nor its wakeup fd (shared with the parent on 3.11).
            signal.set_wakeup_fd(-1)
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(number, signal.SIG_DFL)
            os.close(reading)
            outcome: Config | list[str]
            try:
                outcome = load_config(path, expand_env=expand_env)
            except ConfigError as exc:
                outcome = exc.errors
            # Pickled whole before writing: a pipe holds 64 KB, and a dump
            # into it would wait for the parent (restoring the store
            # meanwhile) at every frame.
            data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(writing, "wb") as out:
                out.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(writing)
    return pid, reading


def _answer_of(pid: int, reading: int) -> bytes:
    """What the child wrote, once it has exited; empty if it failed."""
    try:
        with os.fdopen(reading, "rb") as incoming:
            data = incoming.read()
    finally:
        _, status = os.waitpid(pid, 0)
    return data if status == 0 else b""


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
"""``${VAR}`` or ``${VAR:-default}`` (the default also stands in for an empty value,
as in the shell)."""


def expand_env_references(text: str, origin: str) -> str:
    """Replace every ``${VAR}`` and ``${VAR:-default}`` of a config file's text;
    an unset variable without a default is an error naming it and its line."""
    errors: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            line = text.count("\n", 0, match.start()) + 1
            errors.append(
                f"{origin}: line {line}: environment variable {name} is not set "
                f"(give it, or a default: ${{{name}:-default}})"
            )
            return ""
        return value

    expanded = ENV_REFERENCE.sub(replace, text)
    if errors:
        raise ConfigError(errors)
    return expanded


def parse_config_text(
    text: str, origin: str, base_dir: Path | None = None, *, expand_env: bool = False
) -> Config:
    if expand_env:
        text = expand_env_references(text, origin)
    try:
        data = yaml.load(text, Loader=SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{origin}: {yaml_problem(exc)}"]) from exc
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
        errors += [f"{origin}: {loc}: {msg}" for loc, msg in describe_errors(exc, SOURCE_TYPES)]
    valid: list[tuple[int, SourceConfig]] = []
    for index, raw in enumerate(raw_sources):
        try:
            valid.append((index, SOURCE_CONFIG.validate_python(raw)))
        except ValidationError as exc:
            errors += [
                f"{origin}: {format_loc(['sources', index])}{_join(loc)}: {msg}"
                for loc, msg in describe_errors(exc, SOURCE_TYPES)
            ]
    errors += [f"{origin}: {loc}: {msg}" for loc, msg in _check_sources(valid, base_dir)]
    if top is not None:
        errors += [f"{origin}: {loc}: {msg}" for loc, msg in _check_storage(top, base_dir)]
    api = top.api if top is not None else _valid_or_none(ApiConfig, data.get("api", {}))
    if api is not None:  # its tokens' problems too, even when other top-level keys are wrong
        errors += [f"{origin}: {loc}: {msg}" for loc, msg in _read_api_tokens(api, base_dir)]
    if errors or top is None:
        raise ConfigError(errors)
    config = top.model_copy(update={"sources": [source for _, source in valid]})
    config.relative_to(base_dir)
    return config


def _check_storage(config: Config, base_dir: Path | None) -> Iterable[tuple[str, str]]:
    storage = config.storage
    problems = list(resolve_secrets(storage, "storage", base_dir))
    yield from problems
    given = storage.given_field("url")
    if given is None or problems:
        return
    if storage.path is not None:
        yield f"storage.{given}", "give storage.path (SQLite) or storage.url (PostgreSQL), not both"
    url = config.storage_url() or ""
    if not url.startswith(("postgresql://", "postgres://")):
        # Never the value: it holds the password.
        yield f"storage.{given}", "must be a postgresql:// URL"


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
        tokens.append(token)
    if not tokens:
        yield "api.tokens_file", f"{api.tokens_file} holds no token"
    api.allow_tokens(tuple(tokens))


def _join(loc: str) -> str:
    return "" if loc == "(top level)" else ("" if loc.startswith("[") else ".") + loc


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
        for path, holder in source.secret_holders():
            yield from resolve_secrets(holder, f"{where}.{path}" if path else where, base_dir)
        for field, problem in source.check():
            yield (f"{where}.{field}" if field else where), problem
