from __future__ import annotations

import os
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
