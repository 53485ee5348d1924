from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from server.dicom.attributes import Level
from server.dicom.query import MatchKind, Model, parse_identifier
from server.errors import QueryError


def _ident(**keys: object) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_kinds() -> None:
    q = parse_identifier(
        _ident(
            QueryRetrieveLevel="STUDY",
            PatientName="LEW*",
            StudyDate="2020-",
            PatientID="",
            StudyInstanceUID="1.2\\1.3",
            AccessionNumber="A1",
            StudyDescription="*",
        ),
        Model.STUDY_ROOT,
    )
    by = {c.keyword: c for c in q.constraints}
    assert q.level is Level.STUDY
    assert by["PatientName"].terms[0].kind is MatchKind.WILDCARD
    assert (by["StudyDate"].terms[0].kind, by["StudyDate"].terms[0].value) == (
        MatchKind.RANGE,
        "2020",
    )
    assert by["PatientID"].universal and by["StudyDescription"].universal
    assert [t.value for t in by["StudyInstanceUID"].terms] == ["1.2", "1.3"]
    assert by["AccessionNumber"].terms[0].kind is MatchKind.SINGLE


def test_wildcards_not_for_dates_or_uids() -> None:
    q = parse_identifier(
        _ident(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2*"), Model.STUDY_ROOT
    )
    assert q.constraints[0].terms[0].kind is MatchKind.SINGLE


def test_sequence_keys() -> None:
    item = Dataset()
    item.CodeValue = "T-*"
    ident = _ident(QueryRetrieveLevel="IMAGE")
    ident.AnatomicRegionSequence = [item]
    q = parse_identifier(ident, Model.STUDY_ROOT)
    (c,) = q.constraints
    assert c.terms[0].kind is MatchKind.SEQUENCE
    assert c.terms[0].items[0].terms[0].kind is MatchKind.WILDCARD


@pytest.mark.parametrize("level", ["", "SERIESX", "PATIENT"])
def test_invalid_levels(level: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_identifier(_ident(QueryRetrieveLevel=level), Model.STUDY_ROOT)
    assert info.value.status == 0xA900


def test_patient_level_in_patient_root() -> None:
    q = parse_identifier(_ident(QueryRetrieveLevel="PATIENT"), Model.PATIENT_ROOT)
    assert q.level is Level.PATIENT
