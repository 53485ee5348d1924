"""The worklist over DIMSE (issue #4): Modality Worklist C-FIND with DCMTK ``findscu -W`` and
pynetdicom, MPPS N-CREATE/N-SET with pynetdicom, tenant isolation by calling AE; against the
real server process, on SQLite and PostgreSQL.

Items are created in this process through ``server.worklist.service`` on the server's catalog
(SQLite in WAL mode, or the same PostgreSQL database), as the REST API would.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import association as association_module
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind

from server.catalog.db import database, make_database, session
from server.catalog.schema import MppsInstance, WorklistItem
from server.config import Settings
from server.worklist import service
from tests.helpers import (
    ServerProcess,
    have,
    postgres_available,
    postgres_database,
    run,
    write_config,
)

SERVER_TOML = """[ae]
title = "IMAGING"
workers = 1

[worklist]
unknown_aes_institution = "HOSP_C"
"""

# CT_A/MR_A: hospital A; CT_B: hospital B; NOINST is known but belongs to no institution;
# NOQUERY may not query; MOD_M is the modality of the MPPS tests (its own tenant, so the items
# those tests create and move never show up in the C-FIND tests). Unknown AEs: HOSP_C.
PEERS = [
    ("CT_A", 'institution = "HOSP_A"'),
    ("MR_A", 'institution = "HOSP_A"'),
    ("CT_B", 'institution = "HOSP_B"'),
    ("NOINST", ""),
    ("NOQUERY", 'institution = "HOSP_A"\nquery = false'),
    ("MOD_M", 'institution = "HOSP_M"'),
]


def _peers_toml() -> str:
    blocks = []
    for index, (title, extra) in enumerate(PEERS):
        block = f'[[peer]]\nae_title = "{title}"\nhost = "127.0.0.1"\nport = {20000 + index}\n'
        blocks.append(block + (extra + "\n" if extra else ""))
    return "\n".join(blocks)


def _item(**fields: str) -> dict[str, str]:
    body = {
        "patient_id": "PID",
        "surname": "DOE",
        "forename": "JOHN",
        "modality": "CT",
        "exam_date_and_time": "2031-03-10 09:00:00",
        "scheduled_aet": "CT_A",
    }
    body.update(fields)
    return body


# The C-FIND fixtures: institution, name, fields.
ITEMS: list[tuple[str, str, dict[str, str]]] = [
    (
        "HOSP_A",
        "a_ct_morning",
        _item(
            patient_id="A1",
            surname="SMITH",
            forename="ANNA",
            title="MRS",
            sex="F",
            date_of_birth="1970-02-03",
            exam_date_and_time="2031-03-10 08:30:00",
            exam_description="CT CHEST",
            referring_physician="DR. WHO",
            performing_physician="DR. HOUSE",
            exam_room="ROOM 1",
            hospital_name="Hospital A",
            procedure_id="RP1",
            procedure_step_id="SPS1",
        ),
    ),
    (
        "HOSP_A",
        "a_ct_noon",
        _item(patient_id="A2", surname="SMITHSON", exam_date_and_time="2031-03-10 12:00:00"),
    ),
    (
        "HOSP_A",
        "a_mr_next_day",
        _item(
            patient_id="A3",
            surname="JONES",
            modality="MR",
            scheduled_aet="MR_A",
            exam_date_and_time="2031-03-11 10:00:00",
        ),
    ),
    (
        "HOSP_A",
        "a_accented",
        _item(
            patient_id="A4",
            surname="Muñoz",
            forename="Jérôme",
            exam_date_and_time="2031-03-12 07:00:00",
            performing_physician="Dr. Ødegård",
        ),
    ),
    (
        "HOSP_A",
        "a_completed",
        _item(patient_id="A5", surname="DONE", status="COMPLETED"),
    ),
    # Another institution's items, on the same AE title, date and names as A's.
    ("HOSP_B", "b_ct", _item(patient_id="B1", surname="SMITH", forename="BOB")),
    ("HOSP_C", "c_ct", _item(patient_id="C1", surname="SMITH", forename="CAROL")),
]


@dataclass
class Worklist:
    server: ServerProcess
    url: str
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def audit_log(self) -> Path:
        return self.server.data_dir / "audit.log"


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def wl(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worklist]:
    base = tmp_path_factory.mktemp(f"worklist-{request.param}")
    config = write_config(base / "config", server=SERVER_TOML)
    (config / "peers.toml").write_text(_peers_toml())

    def start(url: str) -> Iterator[Worklist]:
        server = ServerProcess(base / "data", config, url).start()
        database.initialize(
            make_database(Settings(data_dir=base / "data", database_url=url).catalog_url)
        )
        try:
            made = Worklist(server, url)
            for institution, name, body in ITEMS:
                made.items[name] = service.create(institution, body)
            yield made
        finally:
            database.close_all()
            server.stop()

    if request.param == "sqlite":
        yield from start("")
        return
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    with postgres_database() as url:
        yield from start(url)


# -- helpers ------------------------------------------------------------------------------------


def findscu_w(
    wl: Worklist, calling: str, keys: list[str], query_file: Path | None = None
) -> tuple[list[Dataset], str]:
    """DCMTK ``findscu -W``: the response identifiers as datasets, and the tool's output."""
    with tempfile.TemporaryDirectory() as out:
        cmd = ["findscu", "-W", "-aet", calling, "-aec", "IMAGING", "-X", "-od", out]
        for key in keys:
            cmd += ["-k", key]
        cmd += ["127.0.0.1", str(wl.server.port)]
        if query_file is not None:
            cmd.append(str(query_file))
        result = run(cmd, timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        return [dcmread(f) for f in sorted(Path(out).glob("rsp*.dcm"))], output


def patient_ids(responses: list[Dataset]) -> set[str]:
    return {str(r.PatientID) for r in responses}


@pytest.fixture
def dcmtk_tools() -> None:
    if not (have("findscu") and have("dump2dcm")):
        pytest.skip("DCMTK is not installed (tools/test installs it when run as root)")


def associate(wl: Worklist, calling: str) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", wl.server.port, ae_title="IMAGING")
    assert assoc.is_established
    return assoc


def c_find(assoc: Association, identifier: Dataset) -> tuple[list[Dataset], int]:
    """A worklist C-FIND: the pending identifiers and the final status."""
    found: list[Dataset] = []
    final = -1
    for status, response in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
        assert status is not None and "Status" in status, "no response"
        if status.Status in (0xFF00, 0xFF01):
            assert response is not None
            found.append(response)
        else:
            final = int(status.Status)
    return found, final


def mwl_identifier(**sps: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.PatientID = ""
    item = Dataset()
    for keyword, value in sps.items():
        setattr(item, keyword, value)
    ds.ScheduledProcedureStepSequence = Sequence([item])
    return ds


def item_row(item_id: int) -> Any:
    with session():
        return WorklistItem.get_by_id(item_id)


def mpps_row(uid: str) -> Any:
    with session():
        return MppsInstance.get_or_none(MppsInstance.sop_instance_uid == uid)


def audit_entries(wl: Worklist, action: str) -> list[dict[str, Any]]:
    lines = wl.audit_log.read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["action"] == action]


# -- MWL C-FIND with DCMTK ----------------------------------------------------------------------

RETURN_KEYS = [
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "ScheduledProcedureStepSequence[0].Modality",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
]


@pytest.mark.dcmtk
def test_query_file_by_station_ae_title(wl: Worklist, dcmtk_tools: None, tmp_path: Path) -> None:
    """A worklist query file (dump2dcm, as DCMTK's wlistqry examples) asking for CT_A's items."""
    dump = tmp_path / "query.dump"
    dump.write_text(
        "(0010,0010) PN []\n"
        "(0010,0020) LO []\n"
        "(0040,0100) SQ (Sequence with explicit length #=1)\n"
        "  (fffe,e000) na (Item with explicit length #=3)\n"
        "    (0008,0060) CS []\n"
        "    (0040,0001) AE [CT_A]\n"
        "    (0040,0002) DA []\n"
        "  (fffe,e00d) na (ItemDelimitationItem for re-encoding)\n"
        "(fffe,e0dd) na (SequenceDelimitationItem for re-encoding)\n"
    )
    query = tmp_path / "query.wl"
    result = run(["dump2dcm", str(dump), str(query)])
    assert result.returncode == 0, result.stderr
    responses, log = findscu_w(wl, "CT_A", [], query)
    # A's active CT_A items only: not the completed one, not B's or C's on the same AE title.
    assert patient_ids(responses) == {"A1", "A2", "A4"}, log[-2000:]
    for r in responses:
        assert r.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT_A"


@pytest.mark.dcmtk
def test_by_start_date_range(wl: Worklist, dcmtk_tools: None) -> None:
    keys = [
        *RETURN_KEYS[:3],
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20310311-20310312",
    ]
    responses, log = findscu_w(wl, "CT_A", keys)
    assert patient_ids(responses) == {"A3", "A4"}, log[-2000:]
    open_end = [
        *RETURN_KEYS[:3],
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20310312-",
    ]
    assert patient_ids(findscu_w(wl, "CT_A", open_end)[0]) == {"A4"}


@pytest.mark.dcmtk
def test_by_start_time_range_includes_its_upper_bound(wl: Worklist, dcmtk_tools: None) -> None:
    keys = [
        *RETURN_KEYS[:3],
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20310310",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime=0800-1200",
    ]
    responses, log = findscu_w(wl, "CT_A", keys)
    assert patient_ids(responses) == {"A1", "A2"}, log[-2000:]  # 08:30 and 12:00:00


@pytest.mark.dcmtk
def test_by_modality(wl: Worklist, dcmtk_tools: None) -> None:
    responses, log = findscu_w(
        wl, "MR_A", [*RETURN_KEYS[:3], "ScheduledProcedureStepSequence[0].Modality=MR"]
    )
    assert patient_ids(responses) == {"A3"}, log[-2000:]
    assert responses[0].ScheduledProcedureStepSequence[0].Modality == "MR"


@pytest.mark.dcmtk
def test_by_patient_name_wildcard(wl: Worklist, dcmtk_tools: None) -> None:
    responses, log = findscu_w(wl, "CT_A", ["PatientName=smith*", "PatientID"])
    assert patient_ids(responses) == {"A1", "A2"}, log[-2000:]  # case-insensitive PN
    responses, _ = findscu_w(wl, "CT_A", ["PatientName=SMITH^ANN?^^MRS", "PatientID"])
    assert patient_ids(responses) == {"A1"}


@pytest.mark.dcmtk
def test_by_accession_number(wl: Worklist, dcmtk_tools: None) -> None:
    accession = wl.items["a_mr_next_day"]["accession_number"]
    responses, log = findscu_w(wl, "CT_A", [f"AccessionNumber={accession}", "PatientID"])
    assert patient_ids(responses) == {"A3"}, log[-2000:]
    assert responses[0].AccessionNumber == accession


@pytest.mark.dcmtk
def test_only_requested_keys_are_returned(wl: Worklist, dcmtk_tools: None) -> None:
    keys = [
        "PatientID=A1",
        "PatientName",
        "PatientWeight",  # not a worklist attribute we have: answered empty
        "ScheduledProcedureStepSequence[0].Modality",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepLocation",
    ]
    responses, log = findscu_w(wl, "CT_A", keys)
    assert len(responses) == 1, log[-2000:]
    r = responses[0]
    assert {e.keyword for e in r} == {
        "PatientID",
        "PatientName",
        "PatientWeight",
        "ScheduledProcedureStepSequence",
    }
    assert str(r.PatientName) == "SMITH^ANNA^^MRS"
    assert r.PatientWeight in (None, "")
    (sps,) = r.ScheduledProcedureStepSequence
    assert {e.keyword for e in sps} == {"Modality", "ScheduledProcedureStepLocation"}
    assert sps.Modality == "CT"
    assert sps.ScheduledProcedureStepLocation == "ROOM 1"


@pytest.mark.dcmtk
def test_all_attributes_of_an_item(wl: Worklist, dcmtk_tools: None) -> None:
    """Every Table K.6-1 attribute we keep, with an empty SPS sequence key (all of its items)."""
    keys = [
        "PatientID=A1",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyInstanceUID",
        "ReferringPhysicianName",
        "RequestedProcedureDescription",
        "RequestedProcedureID",
        "InstitutionName",
        "ScheduledProcedureStepSequence",
    ]
    (r,), _ = findscu_w(wl, "CT_A", keys)
    item = wl.items["a_ct_morning"]
    assert r.PatientBirthDate == "19700203"
    assert r.PatientSex == "F"
    assert r.AccessionNumber == item["accession_number"]
    assert r.StudyInstanceUID == item["study_instance_uid"]
    assert str(r.ReferringPhysicianName) == "DR. WHO"
    assert r.RequestedProcedureDescription == "CT CHEST"
    assert r.RequestedProcedureID == "RP1"
    assert r.InstitutionName == "Hospital A"
    (sps,) = r.ScheduledProcedureStepSequence
    assert sps.ScheduledStationAETitle == "CT_A"
    assert sps.ScheduledProcedureStepStartDate == "20310310"
    assert sps.ScheduledProcedureStepStartTime == "083000"
    assert str(sps.ScheduledPerformingPhysicianName) == "DR. HOUSE"
    assert sps.ScheduledProcedureStepDescription == "CT CHEST"
    assert sps.ScheduledProcedureStepID == "SPS1"
    assert sps.ScheduledProcedureStepStatus == "SCHEDULED"


@pytest.mark.dcmtk
def test_accented_names_round_trip(wl: Worklist, dcmtk_tools: None) -> None:
    keys = [
        "SpecificCharacterSet=ISO_IR 192",
        "PatientName=MUÑ*",
        "PatientID",
        "ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName",
    ]
    responses, log = findscu_w(wl, "CT_A", keys)
    assert patient_ids(responses) == {"A4"}, log[-2000:]
    r = responses[0]
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert str(r.PatientName) == "Muñoz^Jérôme"
    assert str(r.ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName) == (
        "Dr. Ødegård"
    )


@pytest.mark.dcmtk
def test_completed_items_only_when_asked_for(wl: Worklist, dcmtk_tools: None) -> None:
    base = ["PatientID=A5", "PatientName"]
    assert findscu_w(wl, "CT_A", base)[0] == []
    responses, log = findscu_w(
        wl,
        "CT_A",
        [*base, "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus=COMPLETED"],
    )
    assert patient_ids(responses) == {"A5"}, log[-2000:]


# -- MWL C-FIND: character sets, tenants, bad identifiers (pynetdicom) --------------------------


def test_latin1_query_answered_in_utf8(wl: Worklist) -> None:
    ds = mwl_identifier()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "muñoz*"
    assoc = associate(wl, "CT_A")
    try:
        found, final = c_find(assoc, ds)
    finally:
        assoc.release()
    assert final == 0x0000
    assert [str(r.PatientName) for r in found] == ["Muñoz^Jérôme"]


def test_tenant_isolation(wl: Worklist) -> None:
    def visible(calling: str) -> set[str]:
        assoc = associate(wl, calling)
        try:
            found, final = c_find(assoc, mwl_identifier())
        finally:
            assoc.release()
        assert final == 0x0000
        return {str(r.PatientID) for r in found}

    assert visible("CT_A") == {"A1", "A2", "A3", "A4"}  # A's active items, whatever AE title
    assert visible("CT_B") == {"B1"}
    assert visible("NOINST") == set()  # a known AE without an institution sees nothing
    assert visible("STRANGER") == {"C1"}  # unknown AEs: [worklist] unknown_aes_institution
    entry = audit_entries(wl, "dimse.mwl_find")[-1]
    assert entry["actor"] == "STRANGER"
    assert entry["institution"] == "HOSP_C"
    assert entry["results"] == 1


def test_query_permission(wl: Worklist) -> None:
    assoc = associate(wl, "NOQUERY")
    try:
        found, final = c_find(assoc, mwl_identifier())
    finally:
        assoc.release()
    assert (found, final) == ([], 0xC001)
    assert audit_entries(wl, "dimse.mwl_find")[-1]["outcome"] == "denied"


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom, building the bad keys
@pytest.mark.parametrize(
    "sps",
    [
        {"ScheduledProcedureStepStartDate": "2031XX10"},
        {"ScheduledProcedureStepStartDate": "-"},
        {"ScheduledProcedureStepStartTime": "25h"},
    ],
    ids=["bad date", "range without bounds", "bad time"],
)
def test_bad_identifier_fails_and_association_survives(wl: Worklist, sps: dict[str, str]) -> None:
    assoc = associate(wl, "CT_A")
    try:
        found, final = c_find(assoc, mwl_identifier(**sps))
        assert (found, final) == ([], 0xA900)
        found, final = c_find(assoc, mwl_identifier(ScheduledStationAETitle="MR_A"))
        assert final == 0x0000
        assert {str(r.PatientID) for r in found} == {"A3"}
    finally:
        assoc.release()


def test_unsupported_matching_key_is_ignored_with_ff01(wl: Worklist) -> None:
    ds = mwl_identifier(ScheduledStationAETitle="MR_A")
    ds.AdmissionID = "ADM1"  # an optional matching key we do not match on (K.2.2.1.1.2)
    assoc = associate(wl, "CT_A")
    try:
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_find(ds, ModalityWorklistInformationFind)
            if s is not None
        ]
    finally:
        assoc.release()
    assert statuses == [0xFF01, 0x0000]


# -- MPPS (pynetdicom as the SCU) ---------------------------------------------------------------


def new_item(**fields: str) -> dict[str, Any]:
    return service.create("HOSP_M", _item(scheduled_aet="MOD_M", **fields))


def mpps_attributes(
    status: str = "IN PROGRESS", accession: str = "", study_uid: str = ""
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    step = Dataset()
    step.AccessionNumber = accession
    step.StudyInstanceUID = study_uid
    step.RequestedProcedureID = ""
    step.ScheduledProcedureStepID = ""
    ds.ScheduledStepAttributesSequence = Sequence([step])
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "PID"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "MOD_M"
    ds.PerformedProcedureStepStartDate = "20310310"
    ds.PerformedProcedureStepStartTime = "090500"
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "CT"
    return ds


def n_create(assoc: Association, uid: str, attributes: Dataset) -> Dataset:
    status, _ = assoc.send_n_create(attributes, ModalityPerformedProcedureStep, uid)
    assert status is not None and "Status" in status
    return status


def n_set(assoc: Association, uid: str, **changes: str) -> Dataset:
    ds = Dataset()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
    assert status is not None and "Status" in status
    return status


@pytest.fixture
def modality(wl: Worklist) -> Iterator[Association]:
    assoc = associate(wl, "MOD_M")
    yield assoc
    if assoc.is_established:
        assoc.release()


def test_mpps_in_progress_then_completed(wl: Worklist, modality: Association) -> None:
    item = new_item()
    uid = generate_uid()
    status = n_create(modality, uid, mpps_attributes(accession=item["accession_number"]))
    assert status.Status == 0x0000
    row = item_row(item["id"])
    assert (row.status, row.mpps_instance_uid) == ("IN_PROGRESS", uid)
    # The worklist shows the step as started.
    identifier = mwl_identifier(ScheduledProcedureStepStatus="")
    identifier.AccessionNumber = item["accession_number"]
    (mine,), _ = c_find(modality, identifier)
    assert mine.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "STARTED"
    # Attribute updates while IN PROGRESS are kept; the item does not move.
    assert n_set(modality, uid, PerformedProcedureStepDescription="CT CHEST").Status == 0
    assert item_row(item["id"]).status == "IN_PROGRESS"
    assert n_set(modality, uid, PerformedProcedureStepStatus="COMPLETED").Status == 0
    assert item_row(item["id"]).status == "COMPLETED"
    stored = mpps_row(uid)
    assert stored.status == "COMPLETED"
    assert "CT CHEST" in stored.attributes
    entries = [e for e in audit_entries(wl, "dimse.mpps_set") if e["mpps"] == uid]
    assert [e["status"] for e in entries] == ["IN PROGRESS", "COMPLETED"]


def test_mpps_discontinued_cancels(wl: Worklist, modality: Association) -> None:
    item = new_item()
    uid = generate_uid()
    assert n_create(modality, uid, mpps_attributes(accession=item["accession_number"])).Status == 0
    assert n_set(modality, uid, PerformedProcedureStepStatus="DISCONTINUED").Status == 0
    assert item_row(item["id"]).status == "CANCELED"
    assert mpps_row(uid).status == "DISCONTINUED"


def test_n_set_after_completed_is_refused_and_changes_nothing(
    wl: Worklist, modality: Association
) -> None:
    item = new_item()
    uid = generate_uid()
    assert n_create(modality, uid, mpps_attributes(accession=item["accession_number"])).Status == 0
    assert n_set(modality, uid, PerformedProcedureStepStatus="COMPLETED").Status == 0
    before = mpps_row(uid).attributes
    for changes in (
        {"PerformedProcedureStepStatus": "DISCONTINUED"},
        {"PerformedProcedureStepDescription": "CHANGED"},
    ):
        status = n_set(modality, uid, **changes)
        # PS3.4 F.7.2.2.2, Table F.7.2-2
        assert status.Status == 0x0110
        assert status.ErrorID == 0xA710
        assert "may no longer be updated" in status.ErrorComment
    assert item_row(item["id"]).status == "COMPLETED"
    assert (mpps_row(uid).status, mpps_row(uid).attributes) == ("COMPLETED", before)
    assert modality.is_established


def test_n_create_for_completed_item_is_refused(wl: Worklist, modality: Association) -> None:
    item = new_item(status="COMPLETED")
    uid = generate_uid()
    status = n_create(modality, uid, mpps_attributes(accession=item["accession_number"]))
    assert status.Status == 0x0110
    assert "COMPLETED" in status.ErrorComment
    row = item_row(item["id"])
    assert (row.status, row.mpps_instance_uid) == ("COMPLETED", None)
    assert mpps_row(uid) is None
    assert n_set(modality, uid, PerformedProcedureStepStatus="COMPLETED").Status == 0x0112


def test_n_create_must_be_in_progress(wl: Worklist, modality: Association) -> None:
    item = new_item()
    uid = generate_uid()
    attributes = mpps_attributes("COMPLETED", accession=item["accession_number"])
    assert n_create(modality, uid, attributes).Status == 0x0106  # PS3.4 F.7.2.1.2
    assert item_row(item["id"]).status == "SCHEDULED"
    assert mpps_row(uid) is None


def test_duplicate_n_create(wl: Worklist, modality: Association) -> None:
    item = new_item()
    uid = generate_uid()
    attributes = mpps_attributes(accession=item["accession_number"])
    assert n_create(modality, uid, attributes).Status == 0
    assert n_create(modality, uid, attributes).Status == 0x0111
    assert item_row(item["id"]).status == "IN_PROGRESS"


def test_n_set_of_unknown_instance(wl: Worklist, modality: Association) -> None:
    status = n_set(modality, generate_uid(), PerformedProcedureStepStatus="COMPLETED")
    assert status.Status == 0x0112


def test_invalid_status_value_in_n_set(wl: Worklist, modality: Association) -> None:
    item = new_item()
    uid = generate_uid()
    assert n_create(modality, uid, mpps_attributes(accession=item["accession_number"])).Status == 0
    assert n_set(modality, uid, PerformedProcedureStepStatus="FINISHED").Status == 0x0106
    assert item_row(item["id"]).status == "IN_PROGRESS"
    assert mpps_row(uid).status == "IN PROGRESS"


def test_mpps_found_by_study_instance_uid(wl: Worklist, modality: Association) -> None:
    item = new_item()
    uid = generate_uid()
    attributes = mpps_attributes(study_uid=item["study_instance_uid"])
    assert n_create(modality, uid, attributes).Status == 0
    assert item_row(item["id"]).status == "IN_PROGRESS"


def test_unscheduled_mpps_is_accepted_and_kept(wl: Worklist, modality: Association) -> None:
    uid = generate_uid()
    assert n_create(modality, uid, mpps_attributes(accession="NO-SUCH-ACC")).Status == 0
    row = mpps_row(uid)
    assert (row.status, row.item_ids, row.institution) == ("IN PROGRESS", "", "HOSP_M")
    assert n_set(modality, uid, PerformedProcedureStepStatus="COMPLETED").Status == 0
    assert mpps_row(uid).status == "COMPLETED"
    entry = next(e for e in audit_entries(wl, "dimse.mpps_create") if e["mpps"] == uid)
    assert entry["scheduled"] is False


def test_mpps_tenant_isolation(wl: Worklist, modality: Association) -> None:
    item = new_item()
    attributes = mpps_attributes(accession=item["accession_number"])
    for calling in ("CT_B", "NOINST", "STRANGER"):  # other institution, none, unknown AE
        other = associate(wl, calling)
        uid = generate_uid()
        try:
            # Accepted as an unscheduled step: the item of HOSP_M is not theirs to move.
            assert n_create(other, uid, attributes).Status == 0
        finally:
            other.release()
        assert item_row(item["id"]).status == "SCHEDULED"
        # ... and their MPPS is not MOD_M's to update.
        assert n_set(modality, uid, PerformedProcedureStepStatus="COMPLETED").Status == 0x0112
    mine = generate_uid()
    assert n_create(modality, mine, attributes).Status == 0
    assert item_row(item["id"]).status == "IN_PROGRESS"
    other = associate(wl, "CT_B")
    try:
        status = n_set(other, mine, PerformedProcedureStepStatus="COMPLETED")
    finally:
        other.release()
    assert status.Status == 0x0112
    assert item_row(item["id"]).status == "IN_PROGRESS"


def test_undecodable_identifier_fails_0xc000(wl: Worklist, monkeypatch: pytest.MonkeyPatch) -> None:
    # Implicit VR: an empty PatientName, then a sequence whose value is not made of items.
    broken = struct.pack("<HHI", 0x0010, 0x0010, 0) + struct.pack("<HHI", 0x0040, 0x0100, 4)
    broken += b"\x01\x02\x03\x04"
    ae = AE(ae_title="CT_A")
    ae.add_requested_context(ModalityWorklistInformationFind, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", wl.server.port, ae_title="IMAGING")
    assert assoc.is_established
    try:
        with monkeypatch.context() as patch:  # pynetdicom would refuse to encode it
            patch.setattr(association_module, "encode", lambda *args, **kwargs: broken)
            found, final = c_find(assoc, mwl_identifier())
        assert (found, final) == ([], 0xC000)
        found, final = c_find(assoc, mwl_identifier(ScheduledStationAETitle="MR_A"))
        assert (final, {str(r.PatientID) for r in found}) == (0x0000, {"A3"})
    finally:
        assoc.release()


def test_n_create_without_instance_uid_gets_one(wl: Worklist, modality: Association) -> None:
    """PS3.7 10.1.5.1.4: the SCP assigns the SOP Instance UID when the request has none."""
    item = new_item()
    status, _ = modality.send_n_create(
        mpps_attributes(accession=item["accession_number"]), ModalityPerformedProcedureStep
    )
    assert status is not None and status.Status == 0x0000
    assigned = item_row(item["id"]).mpps_instance_uid
    assert assigned and mpps_row(assigned).status == "IN PROGRESS"
    assert n_set(modality, assigned, PerformedProcedureStepStatus="COMPLETED").Status == 0
    assert item_row(item["id"]).status == "COMPLETED"
