"""Worklist service rules in process (SQLite): events after commit, MPPS transitions, linking."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server import events
from server.worklist import service

ITEM = {
    "patient_id": "P1",
    "surname": "NÚÑEZ",
    "forename": "ÁNGELA",
    "modality": "MR",
    "exam_date_and_time": "2025-07-23 09:00:00",
    "scheduled_aet": "MR_1",
}


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[None]:
    from server.archive import close_archive, open_archive
    from server.config import load_settings

    open_archive(load_settings(None, {"data_dir": str(tmp_path / "data")}))
    try:
        yield
    finally:
        close_archive()


def test_status_changes_are_announced_after_commit(archive: None) -> None:
    seen: list[events.Event] = []

    def record(event: events.Event) -> None:
        # The change is visible to a new read when the event arrives (committed first).
        if event.kind == "worklist.status_changed":
            assert service.get("H1", event.data["id"])["status"] == event.data["status"]
        seen.append(event)

    unsubscribe = events.subscribe(record)
    try:
        item = service.create("H1", ITEM)
        service.update("H1", item["id"], {"exam_room": "SALA 3"})
        service.update("H1", item["id"], {"status": "IN_PROGRESS"})
    finally:
        unsubscribe()
    kinds = [e.kind for e in seen]
    assert kinds == [
        "worklist.created",
        "worklist.updated",
        "worklist.status_changed",
        "worklist.updated",
    ]
    change = seen[2]
    assert change.institution == "H1"
    assert change.data["previous"] == "SCHEDULED" and change.data["status"] == "IN_PROGRESS"


def test_mpps_transitions_refuse_and_change_nothing(archive: None) -> None:
    from server.catalog.db import session
    from server.catalog.schema import WorklistItem

    item = service.create("H1", ITEM)
    with session():
        row = WorklistItem.get_by_id(item["id"])
        with pytest.raises(service.InvalidTransition):
            service.apply_mpps_status(row, "COMPLETED", "1.2.3.4")  # not started yet
        assert WorklistItem.get_by_id(item["id"]).status == "SCHEDULED"
        service.apply_mpps_status(row, "IN PROGRESS", "1.2.3.4")
        service.apply_mpps_status(row, "COMPLETED", "1.2.3.4")
        done = WorklistItem.get_by_id(item["id"])
        assert (done.status, done.mpps_instance_uid) == ("COMPLETED", "1.2.3.4")
        with pytest.raises(service.InvalidTransition):
            service.apply_mpps_status(done, "DISCONTINUED", "1.2.3.4")
        assert WorklistItem.get_by_id(item["id"]).status == "COMPLETED"


def test_tenants_and_accents(archive: None) -> None:
    item = service.create("H1", ITEM)
    assert service.get("H1", item["id"])["surname"] == "NÚÑEZ"
    with pytest.raises(service.NotFound):
        service.get("H2", item["id"])
    assert service.search("H1", {"surname": "núñez"}, 1).total == 1
    assert service.search("H2", {}, 1).total == 0
