"""The top-level config model: retention, storage, the registration API and
the sources (each validated by its own type's model, see the loader)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr

from exporter.config.base import Duration, SecretHolder, SourceConfig, StrictModel

API_TOKEN_MIN_LENGTH = 16


class StorageConfig(SecretHolder):
    SECRETS: ClassVar[dict[str, bool]] = {"url": False}

    path: str | None = None
    """SQLite file keeping registrations and what was learnt about every import
    across restarts; relative to the config file. ``--storage.path`` wins."""
    url: str | None = None
    """``postgresql://user:password@host/db``: a PostgreSQL database instead of
    the file, shared by replicas. A secret (it holds the password): give it as
    ``url``, ``url_env`` or ``url_file``. ``--storage.url`` wins."""
    url_env: str | None = None
    url_file: str | None = None


class ApiConfig(StrictModel):
    tokens_file: str | None = None
    """File of bearer tokens (one per line) that may call the write API; without
    it the write API is off. Read at every (re)load, so tokens rotate on reload."""
    max_imports_per_source: int = Field(default=10_000, ge=1, le=1_000_000)

    _tokens: tuple[str, ...] = PrivateAttr(default=())

    @property
    def tokens(self) -> tuple[str, ...]:
        return self._tokens

    def allow_tokens(self, tokens: tuple[str, ...]) -> None:
        """Set the bearer tokens (from ``tokens_file``, or the demo's)."""
        self._tokens = tokens


class Config(StrictModel):
    retention: Duration = 86400.0
    """How long a registered import stays after it finished (or was not found)."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    """Each of its type's model (the loader validates them one by one)."""

    _base_dir: Path | None = PrivateAttr(default=None)

    def relative_to(self, base_dir: Path | None) -> None:
        """Resolve relative paths (storage) against the config file's folder."""
        self._base_dir = base_dir

    def storage_path(self) -> str | None:
        """The configured database path, resolved against the config file's folder."""
        if self.storage.path is None:
            return None
        path = Path(self.storage.path)
        if self._base_dir is not None and not path.is_absolute():
            path = self._base_dir / path
        return str(path)

    def storage_url(self) -> str | None:
        """The PostgreSQL URL (resolved from ``url``, ``url_env`` or ``url_file``)."""
        return self.storage.secret("url")

    def secret_values(self) -> Iterator[str]:
        """Every secret this config holds: registered for redaction when it is
        applied (not when a file is merely checked)."""
        url = self.storage_url()
        if url is not None:
            yield url
            password = urlsplit(url).password
            if password:
                yield password
        for source in self.sources:
            for _, holder in source.secret_holders():
                yield from holder.secret_values()
        yield from self.api.tokens
