"""One table of (key, query, stored value, expected) run through both matching paths:
the SQL compiler (catalog columns) and the in-memory matcher (keys without a column), on SQLite
and PostgreSQL, so the two cannot drift apart."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.archive import close_archive, open_archive
from server.catalog.db import session
from server.catalog.search import search
from server.config import Settings
from server.dicom.attributes import BY_KEYWORD, Level
from server.dicom.matching import values_match
from server.dicom.query import Model, Query, constraint
from tests.helpers import postgres_available, postgres_database
from tools.generate import StudySpec, small_instance

# (keyword, query value, stored value, expected match)
TABLE: list[tuple[str, str, str, bool]] = [
    ("PatientName", "DOE^JOHN", "DOE^JOHN", True),
    ("PatientName", "doe^john", "DOE^JOHN", True),  # case-insensitive PN (the default)
    ("PatientName", "DOE*", "DOE^JOHN", True),
    ("PatientName", "D?E^*", "DOE^JOHN", True),
    ("PatientName", "*JOHN", "DOE^JOHN", True),
    ("PatientName", "DOE", "DOE^JOHN", False),  # single value matches the whole value
    ("PatientName", "JOHN*", "DOE^JOHN", False),
    ("StudyDescription", "CT*", "CT CHEST", True),
    ("StudyDescription", "ct*", "CT CHEST", False),  # non-PN wildcards are case-sensitive
    ("StudyDescription", "100%*", "100%_SURE", True),
    ("StudyDescription", "100%*", "100X_SURE", False),  # % is a literal, not SQL's wildcard
    ("StudyDescription", "100?_*", "100X_SURE", True),
    ("StudyDescription", "100?_*", "100XYSURE", False),  # _ is a literal too
    ("StudyDescription", "A\\*", "ZZZ", True),  # an alternative "*" matches anything
    ("AccessionNumber", "A\\B", "A", True),  # backslash separates alternatives
    ("AccessionNumber", "A\\B", "B", True),
    ("AccessionNumber", "A\\B", "C", False),
    ("StudyDate", "20200101-20201231", "20200615", True),
    ("StudyDate", "20200101-20201231", "20210101", False),
    ("StudyDate", "-20200101", "20200101", True),
    ("StudyDate", "20200102-", "20200101", False),
    ("StudyDate", "20200101", "20200101", True),
    ("StudyTime", "100000-110000", "103000", True),
    ("StudyTime", "100000-110000", "113000", False),
    ("StudyInstanceUID", "1.2.3", "1.2.3", True),
    ("StudyInstanceUID", "1.2.3", "1.2.30", False),
    ("StudyInstanceUID", "1.2.4\\1.2.3", "1.2.3", True),
]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def catalog(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    def fill(url: str) -> None:
        data = tmp_path_factory.mktemp(f"parity-{request.param}")
        archive = open_archive(Settings(data_dir=Path(data), database_url=url))
        seen_uids: set[str] = set()
        for n, (keyword, _, stored, _) in enumerate(TABLE):
            if keyword == "StudyInstanceUID":
                if stored in seen_uids:
                    continue  # one study per UID
                seen_uids.add(stored)
            spec = StudySpec(patient_id=f"case{n}")
            if keyword != "StudyInstanceUID":
                spec.study_uid = f"1.2.99.{n}"
            ds = small_instance(spec)
            setattr(ds, keyword, stored)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            archive.ingestor.ingest(buf.getvalue(), source="test")

    if request.param == "sqlite":
        fill("")
        yield
    else:
        reason = postgres_available()
        if reason:
            pytest.skip(reason)
        with postgres_database() as url:
            fill(url)
            yield
    close_archive()


@pytest.mark.parametrize(("keyword", "query", "stored", "expected"), TABLE)
def test_in_memory(keyword: str, query: str, stored: str, expected: bool) -> None:
    attr = BY_KEYWORD[keyword]
    c = constraint(attr.tag, attr.vr, query.split("\\"))
    assert values_match(c, [stored], ignore_case=True) is expected


@pytest.mark.parametrize(("n", "row"), list(enumerate(TABLE)))
def test_sql(catalog: None, n: int, row: tuple[str, str, str, bool]) -> None:
    keyword, query, stored, expected = row
    if keyword == "StudyInstanceUID":
        # UID rows share studies: match on the UID alone against the stored set
        attr = BY_KEYWORD[keyword]
        q = Query(Level.STUDY, Model.STUDY_ROOT, (constraint(attr.tag, "UI", query.split("\\")),))
        with session():
            found = {m.values[attr.tag] for m in search(q).matches}
        assert (stored in found) is expected
        return
    attr = BY_KEYWORD[keyword]
    pid = BY_KEYWORD["PatientID"]
    q = Query(
        Level.STUDY,
        Model.STUDY_ROOT,
        (constraint(pid.tag, "LO", [f"case{n}"]), constraint(attr.tag, attr.vr, query.split("\\"))),
    )
    with session():
        assert (len(search(q).matches) == 1) is expected
