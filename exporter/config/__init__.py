"""Configuration: the strict schema's building blocks, the top-level model,
errors that name the file, field and problem, and (in :mod:`.loader`) the
loader. Each source type's own model lives in its module under
``exporter.sources``; the loader takes the list of them from the registry.
"""

from exporter.config.base import (
    CONTROL_CHARACTERS,
    ID_RULE,
    DisplayName,
    Duration,
    HttpUrl,
    ImportEntry,
    ImportId,
    SecretHolder,
    SourceConfig,
    StrictModel,
    WithImports,
    no_control_characters,
    parse_duration,
)
from exporter.config.errors import ConfigError, describe_errors, format_loc
from exporter.config.model import API_TOKEN_MIN_LENGTH, ApiConfig, Config, StorageConfig

__all__ = [
    "API_TOKEN_MIN_LENGTH",
    "CONTROL_CHARACTERS",
    "ID_RULE",
    "ApiConfig",
    "Config",
    "ConfigError",
    "DisplayName",
    "Duration",
    "HttpUrl",
    "ImportEntry",
    "ImportId",
    "SecretHolder",
    "SourceConfig",
    "StorageConfig",
    "StrictModel",
    "WithImports",
    "describe_errors",
    "format_loc",
    "no_control_characters",
    "parse_duration",
]
