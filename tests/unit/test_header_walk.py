"""The one-pass header reader must agree with pydicom on every file it accepts.

``read_header`` either returns what ingest got from ``dcmread`` + ``to_json`` (the JSON, the
transfer syntax and where Pixel Data starts) or None, in which case ingest uses pydicom. So the
tests check two things: common files take the fast path, and no file, however damaged, gets a
different answer from it than from pydicom.
"""

from __future__ import annotations

import io
import random
import warnings
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from server.dicom.header import read_header
from server.dicom.json import to_json
from tests.helpers import part10
from tools.generate import StudySpec, ct_series, small_instance


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _nested(defined_lengths: bool) -> Dataset:
    """A data set with the structures SEG and SR objects carry: sequences three deep, empty
    sequences and items, numbers, binary values, private elements."""
    ds = small_instance(StudySpec(patient_name="Müller^Jörg", patient_id="N1"))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.add_new(0x00091010, "LO", "ACME 1.0")
    ds.add_new(0x00091011, "OB", b"\x01\x02" * 100)
    ds.add_new(0x00091012, "OB", b"\x03" * 2000)  # a BulkDataURI
    content = Dataset()
    content.RelationshipType = "CONTAINS"
    content.ValueType = "NUM"
    content.ConceptNameCodeSequence = [_code("121206", "Distance")]
    measured = Dataset()
    measured.NumericValue = "12.5"
    measured.FloatingPointValue = 12.5
    measured.MeasurementUnitsCodeSequence = [_code("mm", "millimeter")]
    content.MeasuredValueSequence = [measured]
    content.ReferencedSOPSequence = []
    ds.ContentSequence = [content, Dataset(), _code("T-1", "Text ÄÖ")]
    segment = Dataset()
    segment.SegmentNumber = 1
    segment.SegmentLabel = "Lesion"
    segment.SegmentedPropertyCategoryCodeSequence = [_code("49755003", "Morphologic")]
    segment.RecommendedDisplayCIELabValue = [43802, 26566, 37721]
    ds.SegmentSequence = [segment, segment]
    referenced = Dataset()
    referenced.SeriesInstanceUID = ds.SeriesInstanceUID
    instance = Dataset()
    instance.ReferencedSOPClassUID = ds.SOPClassUID
    instance.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    instance.ReferencedFrameNumber = [1, 2]
    referenced.ReferencedInstanceSequence = [instance]
    ds.ReferencedSeriesSequence = [referenced]
    ds.AnatomicRegionSequence = []
    if defined_lengths:
        for element in ds.iterall():
            if element.VR == "SQ":
                element.is_undefined_length = False
                for item in element.value:
                    item.is_undefined_length_sequence_item = False
    return ds


def _latin1_items() -> Dataset:
    ds = small_instance(StudySpec(patient_name="ANDRÉ^PIERRE"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    item = Dataset()
    item.PatientName = "FRANÇOIS^JOSÉ"
    ds.OtherPatientIDsSequence = Sequence([item])
    return ds


def _pydicom(data: bytes) -> tuple[dict[str, Any], str, int] | str:
    """What ingest got before: dcmread up to Pixel Data, then to_json; or the failure."""
    stream = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(stream, stop_before_pixels=True)
            syntax = str(ds.file_meta.TransferSyntaxUID)
            return to_json(ds), syntax, stream.tell()
    except Exception as exc:  # any failure counts: the fast path must then say None
        return f"{type(exc).__name__}: {exc}"


def _corpus() -> list[bytes]:
    ct = next(ct_series(StudySpec(), 1, 16))
    files = []
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        for make in (
            lambda: _nested(False),
            lambda: _nested(True),
            lambda: small_instance(StudySpec()),
        ):
            files.append(part10(make(), syntax))
        files.append(part10(ct, syntax))
    compressed = next(ct_series(StudySpec(), 1, 16))
    compressed.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    files.append(part10(compressed, JPEGBaseline8Bit))
    return files


CORPUS = _corpus()


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_common_files_take_the_fast_path_and_agree(index: int) -> None:
    data = CORPUS[index]
    fast = read_header(data)
    assert fast is not None, "a common file fell back to pydicom"
    expected = _pydicom(data)
    assert not isinstance(expected, str), expected
    assert (fast.json, fast.transfer_syntax, fast.pixel_at) == expected
    assert len(fast.json) > 15


def test_sequences_reach_the_json() -> None:
    fast = read_header(CORPUS[0])
    assert fast is not None
    content = fast.json["0040A730"]["Value"]
    assert len(content) == 3 and content[1] == {}
    measured = content[0]["0040A300"]["Value"][0]
    assert measured["0040A30A"] == {"vr": "DS", "Value": [12.5]}
    assert measured["004008EA"]["Value"][0]["00080100"]["Value"] == ["mm"]
    assert fast.json["00082218"] == {"vr": "SQ", "Value": []}
    assert fast.json["00091012"] == {"vr": "OB", "BulkDataURI": "bulkdata/00091012"}


LATIN1 = [part10(_latin1_items(), s) for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]


@pytest.mark.parametrize("data", LATIN1)
def test_items_inherit_the_character_set(data: bytes) -> None:
    """PS3.5 6.1.2.5.3: an item without (0008,0005) is read in its parent's character set.
    Text in single-byte character sets other than ASCII is left to pydicom."""
    assert read_header(data) is None
    expected = _pydicom(data)
    assert not isinstance(expected, str)
    item = expected[0]["00101002"]["Value"][0]
    assert item["00100010"]["Value"] == [{"Alphabetic": "FRANÇOIS^JOSÉ"}]


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, "1.2.840.10008.1.2.1.99"])
def test_other_byte_orders_and_deflate_are_left_to_pydicom(syntax: str) -> None:
    assert read_header(part10(small_instance(StudySpec()), syntax)) is None


def _mutations(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(132, len(raw))] = rng.randrange(256)
    elif kind == 1:  # cut short
        del raw[rng.randrange(132, len(raw)) :]
    elif kind == 2:  # insert garbage
        at = rng.randrange(132, len(raw))
        raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    elif kind == 3:  # a length field made larger or smaller, or undefined
        at = rng.randrange(132, len(raw) - 4)
        raw[at : at + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x10\x00"])
    else:  # a VR replaced
        at = rng.randrange(132, len(raw) - 2)
        raw[at : at + 2] = rng.choice([b"UN", b"SQ", b"OB", b"UT", b"xx", b"CS"])
    return bytes(raw)


def test_damaged_files_get_pydicoms_answer_or_none() -> None:
    rng = random.Random(20261125)
    sources = [data[: 132 + 3000] if len(data) > 40000 else data for data in CORPUS + LATIN1]
    accepted = 0
    for case in range(3000):
        data = _mutations(rng, rng.choice(sources))
        fast = read_header(data)
        if fast is None:
            continue
        accepted += 1
        expected = _pydicom(data)
        assert (fast.json, fast.transfer_syntax, fast.pixel_at) == expected, f"case {case}"
    assert accepted > 500  # most damage is to values, which both read alike


def test_deep_nesting_is_left_to_pydicom() -> None:
    """Found by tools/fuzz.py: a sequence nested thousands deep overflowed the stack."""
    ds = small_instance(StudySpec())
    item = ds
    for _ in range(40):
        inner = Dataset()
        item.ContentSequence = [inner]
        item = inner
    assert read_header(part10(ds, ExplicitVRLittleEndian)) is None
