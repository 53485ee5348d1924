"""The study and series counters the writer keeps (NumberOfStudyRelatedSeries/Instances,
NumberOfSeriesRelatedInstances, ModalitiesInStudy) match a recount after every kind of
arrival, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from server.archive import Archive, close_archive, open_archive
from server.catalog import writer
from server.catalog.db import database, is_postgres, session
from server.config import load_settings
from tools.generate import StudySpec, small_instance, uid, write


@pytest.fixture
def opened(tmp_path: Path, database_url: str) -> Iterator[Archive]:
    overrides = {"data_dir": str(tmp_path / "data"), "database_url": database_url or None}
    archive = open_archive(load_settings(None, overrides, environ={}))
    try:
        yield archive
    finally:
        close_archive()


def _store(archive: Archive, ds: Dataset, where: Path) -> None:
    result = archive.ingestor.ingest(write(ds, where).read_bytes(), source="test")
    assert result.outcome == "stored"


def _param() -> str:
    return "%s" if is_postgres() else "?"


def _study(uid: str) -> tuple[int, int, str | None]:
    with session():
        row = database.execute_sql(
            'SELECT "number_of_study_related_series", "number_of_study_related_instances", '
            f'"modalities_in_study" FROM "study" WHERE "study_instance_uid" = {_param()}',
            [uid],
        ).fetchone()
    return int(row[0]), int(row[1]), row[2]


def _recount(uid: str) -> tuple[int, int, str | None]:
    with session():
        param = _param()
        series = database.execute_sql(
            'SELECT s."modality", COUNT(i."id") FROM "series" s JOIN "study" t ON '
            f's."study_id" = t."id" LEFT JOIN "instance" i ON i."series_id" = s."id" '
            f'WHERE t."study_instance_uid" = {param} GROUP BY s."id", s."modality"',
            [uid],
        ).fetchall()
    modalities = "\\".join(sorted({m for m, _ in series if m})) or None
    return len(series), sum(int(n) for _, n in series), modalities


def test_counters_follow_every_kind_of_arrival(opened: Archive, tmp_path: Path) -> None:
    spec = StudySpec(patient_id="COUNT1")
    series_uid = uid()
    _store(opened, small_instance(spec, series_uid, 1), tmp_path / "in")  # new study
    assert _study(spec.study_uid) == (1, 1, "OT") == _recount(spec.study_uid)

    _store(opened, small_instance(spec, series_uid, 2), tmp_path / "in")  # existing series
    assert _study(spec.study_uid) == (1, 2, "OT") == _recount(spec.study_uid)

    other = small_instance(spec, uid(), 1)  # a new series of the study, another modality
    other.Modality = "CT"
    _store(opened, other, tmp_path / "in")
    assert _study(spec.study_uid) == (2, 3, "CT\\OT") == _recount(spec.study_uid)


def test_a_new_study_reusing_another_studys_series_uid(opened: Archive, tmp_path: Path) -> None:
    """A sender that reuses a series UID across studies, seen by a process that has not
    written that series itself: the instance joins the existing series (of the first study),
    and the new study counts it as an instance of a series it does not own, as it did before
    new studies were inserted with their counts."""
    first, second = StudySpec(patient_id="COUNT2"), StudySpec(patient_id="COUNT3")
    series_uid = uid()
    _store(opened, small_instance(first, series_uid, 1), tmp_path / "in")
    writer.parents.clear()
    _store(opened, small_instance(second, series_uid, 1), tmp_path / "in")
    assert _study(first.study_uid) == (1, 1, "OT")
    assert _study(second.study_uid) == (0, 1, None)
    with session():
        count = database.execute_sql(
            'SELECT "number_of_series_related_instances" FROM "series" WHERE '
            '"series_instance_uid" = '
            + ("%s" if "Postgres" in type(database.obj).__name__ else "?"),
            [series_uid],
        ).fetchone()[0]
    assert count == 2


def test_a_duplicate_leaves_one_row_and_one_file(opened: Archive, tmp_path: Path) -> None:
    """On PostgreSQL the instance table's unique index alone finds the duplicate (no question
    asked before the file is written): its file goes again, and the counters stay."""
    spec = StudySpec(patient_id="COUNT4")
    data = write(small_instance(spec, uid(), 1), tmp_path / "in").read_bytes()
    assert opened.ingestor.ingest(data, source="test").outcome == "stored"
    later: list[Callable[[], None]] = []
    again = opened.ingestor.ingest(data, source="test", later=later)
    assert again.outcome == "duplicate" and later == []
    assert _study(spec.study_uid) == (1, 1, "OT") == _recount(spec.study_uid)
    files = [p for p in (opened.storage.root / "instances").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert [p.name for p in opened.storage.tmp.iterdir() if p.name.endswith(".part")] == []
