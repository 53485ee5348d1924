from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from server.storage import Storage, storage_key


def test_paths_never_contain_the_uid(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    staged = storage.stage(storage_key("../../etc/passwd"), [b"data"])
    assert ".." not in staged.relative and "passwd" not in staged.relative
    assert staged.final.resolve().is_relative_to(storage.instances)
    assert staged.final.read_bytes() == b"data"


def test_recover_keeps_committed_and_removes_orphans(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    committed = storage.stage(storage_key("1.2.1"), [b"a"])  # row committed, killed before cleanup
    orphan = storage.stage(storage_key("1.2.2"), [b"b"])  # killed before the catalog commit
    old = storage.stage(storage_key("1.2.3"), [b"old"])  # replaced: old committed, then new
    storage.finish(old, keep=True)
    new = storage.stage(storage_key("1.2.3"), [b"new"])
    catalog = {committed.key: committed.relative, new.key: new.relative}
    kept, removed = storage.recover(catalog.get)
    assert (kept, removed) == (2, 2)
    assert committed.final.exists() and new.final.exists()
    assert not orphan.final.exists() and not old.final.exists()
    assert list(storage.tmp.iterdir()) == []


def test_finish_without_keep_removes_everything(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    staged = storage.stage(storage_key("1.2.4"), [b"x", b"y"])
    assert staged.size == 2
    storage.finish(staged, keep=False)
    assert not staged.final.exists() and not staged.part.exists()


def test_durable_storage_fsyncs_and_process_level_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    durable = Storage(tmp_path / "a")
    durable.finish(durable.stage(storage_key("1.2.5"), [b"x"]), keep=True)
    assert len(calls) == 2  # the file, then its directory entry
    calls.clear()
    fast = Storage(tmp_path / "b", durable=False)
    staged = fast.stage(storage_key("1.2.5"), [b"x"])
    fast.finish(staged, keep=True)
    assert calls == [] and staged.final.read_bytes() == b"x"


def _spares(storage: Storage) -> set[int]:
    """Inode numbers of the spare files waiting in tmp/."""
    return {p.stat().st_ino for p in storage.tmp.glob("spare.*")}


def _wait_for_spares(storage: Storage, count: int) -> set[int]:
    deadline = time.monotonic() + 30
    while len(spares := _spares(storage)) < count:
        assert time.monotonic() < deadline, "the spare files were never created"
        time.sleep(0.01)
    return spares


def test_writes_take_spare_files_made_ahead(tmp_path: Path) -> None:
    """The receive path renames a file the spare thread created instead of creating one."""
    storage = Storage(tmp_path, durable=False)
    storage.finish(storage.stage(storage_key("1.2.6"), [b"first"]), keep=True)
    ready = _wait_for_spares(storage, 4)
    inodes = []
    for n in range(3):
        staged = storage.stage(storage_key(f"1.2.7.{n}"), [b"data", bytes([n])])
        inodes.append(staged.part.stat().st_ino)
        assert staged.final.read_bytes() == b"data" + bytes([n])
        storage.finish(staged, keep=True)
    assert set(inodes) <= ready
    assert len(set(inodes)) == 3  # never handed out twice


def test_spares_removed_under_the_writer_are_replaced_by_new_files(tmp_path: Path) -> None:
    storage = Storage(tmp_path, durable=False)
    storage.finish(storage.stage(storage_key("1.2.8"), [b"x"]), keep=True)
    _wait_for_spares(storage, 4)
    for spare in storage.tmp.glob("spare.*"):
        spare.unlink()
    staged = storage.stage(storage_key("1.2.9"), [b"still stored"])
    storage.finish(staged, keep=True)
    assert staged.final.read_bytes() == b"still stored"


def test_recovery_removes_spares_and_writes_go_on(tmp_path: Path) -> None:
    storage = Storage(tmp_path, durable=False)
    storage.finish(storage.stage(storage_key("1.3.1"), [b"x"]), keep=True)
    _wait_for_spares(storage, 4)
    storage.recover(lambda key: None)
    assert list(storage.tmp.iterdir()) == []
    staged = storage.stage(storage_key("1.3.2"), [b"after"])  # the spare thread starts again
    storage.finish(staged, keep=True)
    assert staged.final.read_bytes() == b"after"
    _wait_for_spares(storage, 1)


def test_spares_of_a_process_gone_are_removed(tmp_path: Path) -> None:
    """A DIMSE worker killed with spares ready leaves them; the next process's spare thread
    removes those of this host's processes that no longer exist, and no one else's."""
    import subprocess
    import sys

    from server.storage import _HOST

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    storage = Storage(tmp_path, durable=False)
    left = storage.tmp / f"spare.{_HOST}.{int(gone.stdout)}.0123456789abcdef"
    alive = storage.tmp / f"spare.{_HOST}.{os.getppid()}.0123456789abcdef"
    elsewhere = storage.tmp / f"spare.other-host.{int(gone.stdout)}.0123456789abcdef"
    for path in (left, alive, elsewhere):
        path.write_bytes(b"")
    storage.finish(storage.stage(storage_key("1.3.3"), [b"x"]), keep=True)  # starts the thread
    deadline = time.monotonic() + 30
    while left.exists():
        assert time.monotonic() < deadline, "the dead process's spare was never removed"
        time.sleep(0.01)
    assert alive.exists() and elsewhere.exists()
