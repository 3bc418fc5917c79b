"""The storage contract, on the SQLite backend: what is written comes back,
deletes are kept, one process owns a file, and failures say why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.model import ErrorReason, Observation, Origin, State
from exporter.state import ImportRecord
from exporter.storage import Storage, StoreError, to_row
from exporter.storage.sqlite import SQLiteStorage


def record(import_id: str, **fields: object) -> ImportRecord:
    base = ImportRecord(source="shop", import_id=import_id, system="elevate", origin=Origin.API)
    for name, value in fields.items():
        setattr(base, name, value)
    return base


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    opened = SQLiteStorage(tmp_path / "state.db")
    yield opened
    opened.close()


def test_what_is_written_comes_back_whole(storage: Storage) -> None:
    written = record(
        "1001",
        name="catalogue",
        observation=Observation(State.FAILED, "FAILURE", reason="bad", items_completed=3),
        first_seen=1.0,
        state_since=2.0,
        last_success=3.0,
        last_error="HTTP 500",
        last_error_reason=ErrorReason.SERVER_ERROR,
        last_error_at=4.0,
        consecutive_failures=2,
        confirmed_final=True,
    )
    storage.write([to_row(written)])
    (loaded,) = storage.load()
    assert loaded == written


def test_upserts_and_deletes_in_one_write(storage: Storage) -> None:
    storage.write([to_row(record("1")), to_row(record("2"))])
    storage.write([to_row(record("2", name="renamed"))], deleted=[("shop", "1")])
    assert [(r.import_id, r.name) for r in storage.load()] == [("2", "renamed")]
    assert storage.health.last_write_ok


@pytest.mark.usefixtures("storage")
def test_one_process_owns_a_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="in use"):
        SQLiteStorage(tmp_path / "state.db")


def test_a_deleted_file_fails_the_next_write_and_says_why(tmp_path: Path, storage: Storage) -> None:
    (tmp_path / "state.db").unlink()
    with pytest.raises(StoreError) as caught:
        storage.write([to_row(record("1"))])
    assert caught.value.reason == "vanished"
    assert "deleted or replaced" in caught.value.public
    assert str(tmp_path) not in caught.value.public  # API clients never see the path
    assert storage.health.failing == "vanished"
