"""findscu against every PS3.4 C.2.2.2 matching kind, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dcmtk import findscu, storescu
from tests.helpers import ServerProcess, have, postgres_available, postgres_database, write_config
from tools.generate import StudySpec, small_instance, write

PATIENTS = {
    "M1": dict(
        patient_name="LEWIS^ANNA",
        study_date="20200115",
        study_time="101500",
        description="CT CHEST",
        accession="ACC_1",
    ),
    "M2": dict(
        patient_name="lewinsky^bob",
        study_date="20200620",
        study_time="143000",
        description="MR BRAIN",
        accession="ACC%2",
    ),
    "M3": dict(
        patient_name="O'NEIL^X",
        study_date="20191231",
        study_time="080000",
        description="100%_SURE",
        accession="ACC3",
    ),
    "M4": dict(
        patient_name="BROWN^TIM",
        study_date="20210101",
        study_time="235959",
        description="100XYSURE",
        accession="ACC4",
    ),
    "M5": dict(
        patient_name="Müller^Jörg",
        study_date="20200301",
        study_time="120000",
        description="US ABDOMEN",
        accession="ACC5",
    ),
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def matching(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    if not have("findscu"):
        pytest.skip("DCMTK is not installed")
    base = tmp_path_factory.mktemp(f"match-{request.param}")
    files = base / "files"
    uids: dict[str, str] = {}
    for pid, fields in PATIENTS.items():
        spec = StudySpec(patient_id=pid, **fields)  # type: ignore[arg-type]
        uids[pid] = spec.study_uid
        write(small_instance(spec), files)

    def start(url: str) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
        server = ServerProcess(base / "data", write_config(base / "config"), url).start()
        try:
            storescu(server.port, [files], "+sd")
            yield server, uids
        finally:
            server.stop()

    if request.param == "sqlite":
        yield from start("")
    else:
        reason = postgres_available()
        if reason:
            pytest.skip(reason)
        with postgres_database() as url:
            yield from start(url)


CASES = [
    ("single value", {"PatientID": "M1"}, {"M1"}),
    ("PN single, case-insensitive", {"PatientName": "lewis^anna"}, {"M1"}),
    ("wildcard *", {"PatientName": "LEW*"}, {"M1", "M2"}),
    ("wildcard ?", {"PatientName": "LEWIS^ANN?"}, {"M1"}),
    ("wildcard in the middle", {"StudyDescription": "100*SURE"}, {"M3", "M4"}),
    ("SQL % and _ are literal", {"StudyDescription": "100%_*"}, {"M3"}),
    ("SQL % literal, single", {"AccessionNumber": "ACC%2"}, {"M2"}),
    ("SQL _ literal, single", {"AccessionNumber": "ACC_1"}, {"M1"}),
    ("? matches one character", {"AccessionNumber": "ACC?1"}, {"M1"}),
    ("date range", {"StudyDate": "20200101-20201231"}, {"M1", "M2", "M5"}),
    ("date range open start", {"StudyDate": "-20191231"}, {"M3"}),
    ("date range open end", {"StudyDate": "20210101-"}, {"M4"}),
    ("time range", {"StudyTime": "100000-130000"}, {"M1", "M5"}),
    ("modalities in study", {"ModalitiesInStudy": "OT"}, {"M1", "M2", "M3", "M4", "M5"}),
    ("modalities list", {"ModalitiesInStudy": "CT\\OT"}, {"M1", "M2", "M3", "M4", "M5"}),
    ("modalities no match", {"ModalitiesInStudy": "MR"}, set()),
    ("no match", {"PatientID": "NOPE"}, set()),
    ("two constraints", {"PatientName": "LEW*", "StudyDate": "20200601-"}, {"M2"}),
]


@pytest.mark.parametrize(("name", "keys", "expected"), CASES, ids=[c[0] for c in CASES])
def test_matching(matching, name: str, keys: dict[str, str], expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    server, _ = matching
    rsps, log = findscu(server.port, "STUDY", {**keys, "PatientID": keys.get("PatientID", "")})
    assert {str(r.PatientID) for r in rsps} == expected, log[-1500:]


def test_uid_list(matching) -> None:  # type: ignore[no-untyped-def]
    server, uids = matching
    rsps, _ = findscu(
        server.port, "STUDY", {"StudyInstanceUID": f"{uids['M1']}\\{uids['M4']}", "PatientID": ""}
    )
    assert {str(r.PatientID) for r in rsps} == {"M1", "M4"}


def test_universal_returns_values(matching) -> None:  # type: ignore[no-untyped-def]
    server, _ = matching
    rsps, _ = findscu(server.port, "STUDY", {"PatientID": "M*", "PatientName": "", "StudyDate": ""})
    by_id = {str(r.PatientID): r for r in rsps}
    assert set(by_id) == set(PATIENTS)
    assert str(by_id["M3"].PatientName) == "O'NEIL^X"
    assert by_id["M4"].StudyDate == "20210101"
    assert str(by_id["M5"].PatientName) == "Müller^Jörg"  # UTF-8 answered as ISO_IR 192


def test_non_ascii_wildcard(matching) -> None:  # type: ignore[no-untyped-def]
    server, _ = matching
    rsps, _ = findscu(
        server.port,
        "STUDY",
        {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "müller*", "PatientID": ""},
    )
    assert {str(r.PatientID) for r in rsps} == {"M5"}


def test_levels_and_patient_root(matching) -> None:  # type: ignore[no-untyped-def]
    server, uids = matching
    rsps, _ = findscu(
        server.port, "PATIENT", {"PatientID": "M*", "NumberOfPatientRelatedStudies": ""}, model="-P"
    )
    assert len(rsps) == 5 and all(int(r.NumberOfPatientRelatedStudies) == 1 for r in rsps)
    rsps, _ = findscu(server.port, "STUDY", {"PatientID": "M2", "StudyInstanceUID": ""}, model="-P")
    assert [r.StudyInstanceUID for r in rsps] == [uids["M2"]]
    rsps, _ = findscu(
        server.port,
        "SERIES",
        {"StudyInstanceUID": uids["M2"], "Modality": "OT", "SeriesInstanceUID": ""},
    )
    assert len(rsps) == 1
    rsps, _ = findscu(
        server.port,
        "IMAGE",
        {"StudyInstanceUID": uids["M2"], "SOPInstanceUID": "", "SOPClassUID": ""},
    )
    assert len(rsps) == 1 and rsps[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def test_case_sensitive_pn_option(tmp_path: Path) -> None:
    if not have("findscu"):
        pytest.skip("DCMTK is not installed")
    files = tmp_path / "files"
    for pid in ("M1", "M2"):
        write(small_instance(StudySpec(patient_id=pid, **PATIENTS[pid])), files)  # type: ignore[arg-type]
    config = write_config(tmp_path / "cfg", server="[query]\ncase_insensitive_pn = false\n")
    server = ServerProcess(tmp_path / "data", config, "").start()
    try:
        storescu(server.port, [files], "+sd")
        rsps, _ = findscu(server.port, "STUDY", {"PatientName": "LEW*", "PatientID": ""})
        assert {str(r.PatientID) for r in rsps} == {"M1"}
        rsps, _ = findscu(server.port, "STUDY", {"PatientName": "lew*", "PatientID": ""})
        assert {str(r.PatientID) for r in rsps} == {"M2"}
    finally:
        server.stop()
