"""Secrets given inline, by environment variable or by file, resolved while a
config loads, so a missing secret file is a config error and not a runtime
surprise. Nothing is registered for redaction here: that happens when a config
is applied (:meth:`exporter.config.Config.secret_values`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from exporter.config.base import SecretHolder


def resolve_secrets(
    holder: SecretHolder, where: str, base_dir: Path | None
) -> Iterable[tuple[str, str]]:
    """Resolve every secret of ``holder``; yield (field, problem) for each that
    cannot be. ``where`` is the holder's location (``sources[2].salesforce``)."""
    for field, required in holder.SECRETS.items():
        given = [
            name
            for name in (field, f"{field}_env", f"{field}_file")
            if getattr(holder, name) is not None
        ]
        if len(given) > 1:
            yield f"{where}.{given[1]}", f"give only one of {field}, {field}_env and {field}_file"
            continue
        if not given:
            if required:
                yield f"{where}.{field}", f"required (or {field}_env / {field}_file)"
            continue
        name = given[0]
        raw: str = getattr(holder, name)
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
        holder.remember_secret(field, value)
