"""The one list of source types. Everything else is derived from it: the type
names, the config model each ``sources:`` entry is validated with, and which
adapter a configured source gets. Adding a source type is one line here (see
docs/adding-a-source.md)."""

from __future__ import annotations

from typing import Annotated, Any, Union

import aiohttp
from pydantic import Field, TypeAdapter

from exporter.config import SourceConfig
from exporter.sources.base import Source, SourceHooks
from exporter.sources.elevate import ElevateSource
from exporter.sources.http_json import HttpJsonSource
from exporter.sources.rocketchat import RocketChatSource
from exporter.sources.zilliant import ZilliantSource

SOURCES: tuple[type[Source[Any]], ...] = (
    ElevateSource,
    ZilliantSource,
    RocketChatSource,
    HttpJsonSource,
)

SOURCE_TYPES = tuple(source.system for source in SOURCES)
"""The values of ``type`` in the config, in the order they are documented."""

_BY_MODEL: dict[type[SourceConfig], type[Source[Any]]] = {
    source.config_model: source for source in SOURCES
}

# The union of the types' models, told apart by ``type``; built from the list,
# so a type cannot be registered for one purpose and forgotten for another.
_ANY_SOURCE_CONFIG: Any = Annotated[
    Union[tuple(source.config_model for source in SOURCES)],  # noqa: UP007
    Field(discriminator="type"),
]
SOURCE_CONFIG: TypeAdapter[SourceConfig] = TypeAdapter(_ANY_SOURCE_CONFIG)


def build_source(
    config: SourceConfig, session: aiohttp.ClientSession, hooks: SourceHooks | None = None
) -> Source[Any]:
    """The adapter for one configured source."""
    return _BY_MODEL[type(config)](config, session, hooks)
