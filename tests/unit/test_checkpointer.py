"""The SQLite checkpointer thread (server/catalog/db.py): it copies the WAL back while writers
go on, and its last step lets the next writer start the WAL again from the beginning, so the
WAL stays short under a steady stream of commits instead of growing until SQLite's own
checkpoint runs inside a commit."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.archive import Archive, close_archive, open_archive
from server.catalog import db
from server.config import load_settings
from tools.generate import StudySpec, small_instance, write


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Archive]:
    settings = load_settings(
        None, {"data_dir": str(tmp_path / "data"), "durability": "process"}, environ={}
    )
    archive = open_archive(settings)
    try:
        yield archive
    finally:
        close_archive()


def _store(archive: Archive, where: Path, count: int) -> None:
    for n in range(count):
        ds = small_instance(StudySpec(patient_id=f"CKPT{time.monotonic_ns()}-{n}"))
        assert archive.ingestor.ingest(write(ds, where).read_bytes(), source="t").outcome
        # each instance opens its own patient, study and series: ~45 WAL pages


def _wal_restarts(archive: Archive) -> int:
    """The WAL header's checkpoint sequence number: +1 each time a writer starts the WAL
    again from its first frame (sqlite.org/walformat.html, "WAL header")."""
    header = (archive.storage.root / "catalog.sqlite-wal").read_bytes()[:16]
    return int(struct.unpack(">I", header[12:16])[0])


def test_a_pass_lets_the_next_writer_restart_the_wal(
    opened: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db._checkpointer, "enabled", False)  # passes run when the test says
    wal = opened.storage.root / "catalog.sqlite-wal"
    path = str(opened.storage.root / "catalog.sqlite")
    _store(opened, tmp_path / "in", 20)
    restarts, size = _wal_restarts(opened), wal.stat().st_size
    _store(opened, tmp_path / "in", 1)
    assert _wal_restarts(opened) == restarts  # nothing copied back: the WAL only grows
    assert wal.stat().st_size > size

    db._Checkpointer.checkpoint(path, "NORMAL")
    size = wal.stat().st_size
    _store(opened, tmp_path / "in", 1)
    assert _wal_restarts(opened) == restarts + 1  # written again from its start
    assert wal.stat().st_size == size


def test_the_thread_keeps_the_wal_short(opened: Archive, tmp_path: Path) -> None:
    """With the thread running, a steady stream of commits sees the WAL restarted well before
    SQLite's own checkpoint (10,000 pages) would have run."""
    assert db._checkpointer.enabled
    restarts = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _store(opened, tmp_path / "in", 5)
        if restarts is None:
            restarts = _wal_restarts(opened)
        elif _wal_restarts(opened) > restarts:
            break
    else:
        pytest.fail("the WAL was never restarted")
    pages = (opened.storage.root / "catalog.sqlite-wal").stat().st_size // 4096
    assert pages < db._Checkpointer.BACKSTOP_PAGES


def test_a_database_gone_is_not_made_again(tmp_path: Path) -> None:
    gone = tmp_path / "gone.sqlite"
    db._Checkpointer.checkpoint(str(gone), "NORMAL")
    assert not gone.exists()
    assert list(tmp_path.iterdir()) == []
