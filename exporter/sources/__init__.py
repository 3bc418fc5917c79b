"""One module per upstream API; nothing outside them knows a wire format."""

from __future__ import annotations

import aiohttp

from exporter.config import ElevateConfig, RocketChatConfig, SourceConfig, ZilliantConfig
from exporter.sources.base import RequestObserver, Source
from exporter.sources.elevate import ElevateSource
from exporter.sources.rocketchat import RocketChatSource
from exporter.sources.zilliant import TokenObserver, ZilliantSource

SOURCE_CLASSES: dict[str, type[Source]] = {
    "elevate": ElevateSource,
    "zilliant": ZilliantSource,
    "rocketchat": RocketChatSource,
}


def build_source(
    config: SourceConfig,
    session: aiohttp.ClientSession,
    observe: RequestObserver | None = None,
    token_observer: TokenObserver | None = None,
) -> Source:
    """The adapter for one configured source."""
    if isinstance(config, ElevateConfig):
        return ElevateSource(config, session, observe)
    if isinstance(config, ZilliantConfig):
        return ZilliantSource(config, session, observe, token_observer)
    if isinstance(config, RocketChatConfig):
        return RocketChatSource(config, session, observe)
    raise TypeError(f"no source for {type(config).__name__}")
