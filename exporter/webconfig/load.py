"""Reading ``--web.config.file``: every problem at once, naming the file and field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from exporter.config import ConfigError, describe_errors
from exporter.config.yaml_loader import SafeLoader, yaml_problem
from exporter.webconfig.model import ALLOWED_HEADERS, WebConfig
from exporter.webconfig.tls import tls_problems


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web config file; raise ConfigError listing every problem
    (each line starts with the file's name)."""
    origin = str(path)
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=SafeLoader) or {}
    except OSError as exc:
        raise ConfigError([f"{origin}: cannot read: {exc.strerror or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{origin}: {yaml_problem(exc)}"]) from exc
    try:
        config = WebConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{origin}: {loc}: {msg}" for loc, msg in describe_errors(exc)]) from exc
    errors = [f"{origin}: {problem}" for problem in web_config_problems(config, Path(path).parent)]
    if errors:
        raise ConfigError(errors)
    return config


def web_config_problems(config: WebConfig, base_dir: Path | None = None) -> list[str]:
    """What is wrong with a parsed web config, as ``field: problem`` lines."""
    errors = []
    for user, hashed in config.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            errors.append(f"basic_auth_users.{user}: must be a bcrypt hash")
    if config.http_server_config is not None:
        for name, value in config.http_server_config.headers.items():
            if name not in ALLOWED_HEADERS:
                errors.append(
                    f"http_server_config.headers.{name}: not allowed "
                    f"(allowed: {', '.join(sorted(ALLOWED_HEADERS))})"
                )
                continue
            values = ALLOWED_HEADERS[name]
            if values is not None and value not in values:
                errors.append(
                    f"http_server_config.headers.{name}: must be one of "
                    f"{', '.join(values)}, not {value[:100]!r}"
                )
    limit = config.rate_limit
    if limit is not None and limit.interval > 0 and limit.burst < 1:
        errors.append("rate_limit.burst: must be at least 1 when an interval is set")
    tls = config.tls
    if tls is not None:
        errors += tls_problems(tls, base_dir)
    return errors
