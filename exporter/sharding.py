"""Horizontal sharding, kube-state-metrics style: ``--shard=N
--total-shards=M``. Every import (source, id) belongs to exactly one shard by
a stable hash; a source without ids (a Rocket.Chat server) belongs to one as a
whole. Each shard polls and exports only what it owns, so the union of the
shards is every import and their intersection is empty, whatever the number."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_ORDINAL = re.compile(r"-(\d+)$")


@dataclass(frozen=True, slots=True)
class Shard:
    index: int = 0
    total: int = 1

    def __post_init__(self) -> None:
        if self.total < 1 or not 0 <= self.index < self.total:
            raise ValueError(
                f"--shard {self.index}: must be from 0 to --total-shards - 1 ({self.total - 1})"
            )

    @property
    def owns_all(self) -> bool:
        """One process for every import: callers skip the check per import."""
        return self.total == 1

    def owns(self, source: str, import_id: str | None = None) -> bool:
        """Whether this shard polls the import (or, without an id, the source)."""
        if self.owns_all:
            return True
        key = source if import_id is None else f"{source}\0{import_id}"
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.total == self.index

    def owner(self, source: str, import_id: str | None = None) -> int:
        """Which shard owns the import (for an error message)."""
        return next(n for n in range(self.total) if Shard(n, self.total).owns(source, import_id))


def ordinal_of(hostname: str) -> int:
    """A StatefulSet pod's ordinal from its name (``import-status-2`` -> 2)."""
    found = _ORDINAL.search(hostname)
    if found is None:
        raise ValueError(
            f"--shard.from-hostname: {hostname!r} does not end in -<ordinal> "
            "(a StatefulSet pod name, like import-status-2)"
        )
    return int(found.group(1))


WHOLE = Shard()
"""One process owning everything: the default."""
