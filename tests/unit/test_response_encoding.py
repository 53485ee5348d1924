"""The C-FIND fast path encodes identifiers by hand; it must produce pydicom's bytes exactly."""

from __future__ import annotations

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from server.catalog.search import Match
from server.dicom.attributes import BY_KEYWORD, Level
from server.dicom.query import Model, Query, constraint
from server.dicom.response import (
    IdentifierEncoder,
    encode_identifier,
    find_identifier,
    identifier_elements,
)
from server.dimse.fastpath import find_rsp_command, pdata_message


def _query(*keywords: str, level: Level = Level.STUDY) -> Query:
    cs = [constraint(BY_KEYWORD[k].tag, BY_KEYWORD[k].vr, [""]) for k in keywords]
    cs.append(constraint(0x00080080, "LO", [""]))  # InstitutionName: not a catalog column
    return Query(level, Model.STUDY_ROOT, tuple(cs))


MATCHES = [
    {
        "PatientName": "DOE^JOHN",
        "PatientID": "P1",
        "StudyDate": "20200101",
        "ModalitiesInStudy": "CT\\SR",
        "NumberOfStudyRelatedInstances": 12,
    },
    {
        "PatientName": "Müller^Jörg",
        "PatientID": "P2",
        "StudyDate": None,
        "ModalitiesInStudy": "MR",
        "NumberOfStudyRelatedInstances": 7,
    },
    {
        "PatientName": "ODD",
        "PatientID": "P33",
        "StudyDate": "20200101",
        "ModalitiesInStudy": None,
        "NumberOfStudyRelatedInstances": 0,
    },
]


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("values", MATCHES)
def test_encoding_matches_pydicom(values: dict[str, object], explicit: bool) -> None:
    query = _query(*values)
    match = Match(
        Level.STUDY,
        {BY_KEYWORD[k].tag: v for k, v in {**values, "StudyInstanceUID": "1.2.3.45"}.items()},
        metadata={"00080080": {"vr": "LO", "Value": ["TEST HOSPITAL"]}},
    )
    ds = find_identifier(query, match)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, not explicit
    write_dataset(fp, ds)
    assert encode_identifier(identifier_elements(query, match), explicit) == fp.getvalue()
    assert ds.QueryRetrieveLevel == "STUDY" and ds.InstitutionName == "TEST HOSPITAL"


def test_pdata_fragments_respect_max_length() -> None:
    command = find_rsp_command("1.2.840.10008.5.1.4.1.2.2.1", 7)
    data = bytes(range(256)) * 10
    message = pdata_message(3, command, data, max_length=300)
    pdus, offset, payload = [], 0, b""
    while offset < len(message):
        kind, length = message[offset], int.from_bytes(message[offset + 2 : offset + 6], "big")
        assert kind == 0x04 and length <= 300
        item = message[offset + 6 : offset + 6 + length]
        pdus.append(item)
        if item[5] & 0x01 == 0:  # data fragment
            payload += item[6:]
        offset += 6 + length
    assert payload == data
    assert pdus[-1][5] == 0x02  # last data fragment flagged


def test_command_set_fragmented_for_tiny_max_length() -> None:
    """A peer taking 16-byte PDUs gets the command set in fragments too (tools/fuzz.py)."""
    command = find_rsp_command("1.2.840.10008.5.1.4.1.2.2.1", 7)
    data = b"0123456789" * 3
    message = pdata_message(3, command, data, max_length=16)
    offset, got_command, got_data, headers = 0, b"", b"", []
    while offset < len(message):
        length = int.from_bytes(message[offset + 2 : offset + 6], "big")
        assert length <= 16
        item = message[offset + 6 : offset + 6 + length]
        headers.append(item[5])
        if item[5] & 0x01:
            got_command += item[6:]
        else:
            got_data += item[6:]
        offset += 6 + length
    assert (got_command, got_data) == (command, data)
    assert headers.count(0x03) == 1 and headers.count(0x02) == 1  # one last fragment each


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("level", [Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE])
def test_the_per_query_encoder_gives_the_same_bytes(level: Level, explicit: bool) -> None:
    """IdentifierEncoder works out each query's element headers once; per match it must give
    exactly what the general path gives (with and without text that needs UTF-8, empty and
    integer values, odd lengths padded)."""
    keywords = ["PatientName", "PatientID", "StudyDate", "NumberOfStudyRelatedInstances"]
    if level >= Level.SERIES:
        keywords += ["Modality", "SeriesNumber", "SeriesInstanceUID"]
    if level >= Level.IMAGE:
        keywords += ["SOPInstanceUID", "InstanceNumber", "SOPClassUID"]
    cs = [constraint(BY_KEYWORD[k].tag, BY_KEYWORD[k].vr, [""]) for k in keywords]
    query = Query(level, Model.STUDY_ROOT, tuple(cs))
    encoder = IdentifierEncoder(query, explicit)
    assert not encoder.general
    rows = [
        {"PatientName": "DOE^JOHN", "PatientID": "P1", "NumberOfStudyRelatedInstances": 12},
        {"PatientName": "Müller^Jörg", "PatientID": "P22", "StudyDate": ""},
        {"PatientName": None, "SeriesNumber": 3, "InstanceNumber": 101, "Modality": "CT"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "SeriesInstanceUID": "1.2.3"},
    ]
    for row in rows:
        values = {BY_KEYWORD[k].tag: v for k, v in row.items()}
        values.update({BY_KEYWORD["StudyInstanceUID"].tag: "1.2.3.45"})
        match = Match(level, values)
        assert encoder.encode(match) == encode_identifier(
            identifier_elements(query, match), explicit
        )


def test_keys_outside_the_catalog_take_the_general_path() -> None:
    encoder = IdentifierEncoder(_query("PatientName"), True)  # InstitutionName: metadata
    assert encoder.general
