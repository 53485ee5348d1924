"""Ingest-time conformance checks (server/dicom/validate.py)."""

from __future__ import annotations

from server.dicom.json import to_json
from server.dicom.validate import problems
from tools.generate import StudySpec, ct_series, small_instance


def test_generated_objects_are_conformant() -> None:
    assert problems(to_json(next(ct_series(StudySpec(), 1, 16))), True) == []
    assert problems(to_json(small_instance(StudySpec())), True) == []


def test_each_rule_reports_what_is_wrong() -> None:
    ds = small_instance(StudySpec())
    del ds.PatientSex
    del ds.Modality
    ds.HighBit = 3
    ds.BitsStored = 9  # more than allocated
    ds.SamplesPerPixel = 3
    ds.SOPClassUID = "1.2.3.4"
    ds.StudyTime = "25:61"
    found = problems(to_json(ds), True)
    text = "\n".join(found)
    assert "Type 2 PatientSex is missing" in text
    assert "Type 1 Modality is missing" in text
    assert "BitsStored 9 exceeds BitsAllocated 8" in text
    assert "HighBit 3 is not BitsStored - 1" in text
    assert "MONOCHROME2 with SamplesPerPixel 3" in text
    assert "not a standard SOP Class" in text
    assert "StudyTime" in text
    del ds.Rows
    assert any("lacks Rows" in p for p in problems(to_json(ds), True))
