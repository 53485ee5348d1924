"""The fast DICOM JSON converter must give exactly what pydicom's to_json_dict gives."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from server.dicom.json import BULK_DATA_THRESHOLD, _bulk_uri, to_json
from tests.helpers import part10
from tools.generate import StudySpec, ct_series, small_instance


def _reference(ds: Dataset) -> dict[str, object]:
    return ds.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=_bulk_uri,
        suppress_invalid_tags=True,
    )


def _rich() -> Dataset:
    ds = small_instance(StudySpec(patient_name="Müller^Jörg=ミュラー^ヨルグ=", patient_id="X1"))
    ds.OtherPatientNames = ["A^B", "=C"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = ["0.5", "1"]
    ds.SliceLocation = "-12.25"
    ds.SamplesPerPixel = 1
    ds.FrameIncrementPointer = 0x00181063
    ds.RealWorldValueLUTData = [1.5, 2.5]
    ds.ReferencedFrameNumber = ["1", "2", "3"]
    ds.StudyComments = "line one\\still one  "
    ds.add_new(0x00091010, "LO", "private")
    ds.add_new(0x00091011, "OB", b"\x01\x02" * 300)  # 600 bytes: inline
    ds.add_new(0x00091012, "OB", b"\x01\x02" * 400)  # 800 bytes: bulk (pydicom's 3/4 rule)
    ds.add_new(0x00091013, "UN", b"\x00" * 4)
    ds.AccessionNumber = ""
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = [item]
    ds.ReferencedStudySequence = []
    return ds


def _read(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data), stop_before_pixels=True)


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("make", [_rich, lambda: next(ct_series(StudySpec(), 1, 16))])
def test_same_as_pydicom(make, syntax: str) -> None:  # type: ignore[no-untyped-def]
    data = part10(make(), syntax)
    expected = _reference(_read(data))
    assert len(expected) > 20
    assert to_json(_read(data)) == expected


def test_latin1_text_uses_pydicom() -> None:
    ds = small_instance(StudySpec(patient_name="ANDRÉ^PIERRE"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    read = _read(part10(ds, ExplicitVRLittleEndian))
    assert to_json(read) == _reference(_read(part10(ds, ExplicitVRLittleEndian)))
    assert to_json(read)["00100010"]["Value"] == [{"Alphabetic": "ANDRÉ^PIERRE"}]


@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, "1.2.840.10008.1.2.1.99"],
)
def test_ingest_header_parse_equals_dcmread(syntax: str) -> None:
    """Ingest reads the header by hand where it can; what it gets must be pydicom's."""
    from server.ingest import _parse

    data = part10(_rich(), syntax)
    parsed = _parse(data)
    assert parsed.encoded is data
    assert parsed.header == to_json(_read(data))
    assert parsed.transfer_syntax == syntax
