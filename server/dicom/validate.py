"""Conformance checks made at ingest: objects that break their IOD's basic rules are stored (the
sender's data is not ours to refuse for that) but flagged, so the sender hears about it (STOW-RS
warning 0xB007, the upload's status, the audit trail).

Checked from the header ingest already parsed (pixel data are never read here): the Type 1 and
Type 2 attributes every composite image IOD has (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study,
C.7.3.1 General Series, C.12.1 SOP Common), the Image Pixel Module's internal consistency
(C.7.6.3), the SOP Class being one the standard defines, and the form of dates, times and
UIDs (PS3.5 6.2).
"""

from __future__ import annotations

import re
from typing import Any

from pydicom._uid_dict import UID_dictionary

_TYPE1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
)
_PIXEL = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "SamplesPerPixel",
    "PixelRepresentation",
    "PhotometricInterpretation",
)
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_UI = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TAGS: dict[str, str] = {}


def _tag(keyword: str) -> str:
    if keyword not in _TAGS:
        from pydicom.datadict import tag_for_keyword

        _TAGS[keyword] = f"{tag_for_keyword(keyword):08X}"
    return _TAGS[keyword]


def _values(header: dict[str, Any], keyword: str) -> list[Any] | None:
    element = header.get(_tag(keyword))
    if element is None:
        return None
    return list(element.get("Value") or [])


def problems(header: dict[str, Any], has_pixels: bool) -> list[str]:
    """What is wrong with an instance's header (its DICOM JSON); empty when nothing is."""
    found: list[str] = []
    for keyword in _TYPE1:
        values = _values(header, keyword)
        if not values:
            found.append(f"Type 1 {keyword} is {'empty' if values == [] else 'missing'}")
    for keyword in _TYPE2:
        if _values(header, keyword) is None:
            found.append(f"Type 2 {keyword} is missing")
    sop_class = str((_values(header, "SOPClassUID") or [""])[0])
    if sop_class and (len(sop_class) > 64 or not _UI.match(sop_class)):
        found.append(f"SOPClassUID {sop_class!r} is not a valid UID")
    elif sop_class and sop_class not in UID_dictionary:
        found.append(f"SOPClassUID {sop_class} is not a standard SOP Class")
    for keyword in ("StudyDate", "SeriesDate", "PatientBirthDate", "ContentDate"):
        for value in _values(header, keyword) or []:
            if value and not _DA.match(str(value)):
                found.append(f"{keyword} {value!r} is not a DA (YYYYMMDD)")
    for keyword in ("StudyTime", "SeriesTime", "ContentTime"):
        for value in _values(header, keyword) or []:
            if value and not _TM.match(str(value)):
                found.append(f"{keyword} {value!r} is not a TM (HHMMSS.FFFFFF)")
    for keyword in ("FrameOfReferenceUID",):
        for value in _values(header, keyword) or []:
            if value and (len(str(value)) > 64 or not _UI.match(str(value))):
                found.append(f"{keyword} {value!r} is not a valid UID")
    if has_pixels or _values(header, "Rows") is not None:
        pixel: dict[str, Any] = {k: (_values(header, k) or [None])[0] for k in _PIXEL}
        missing = [k for k, v in pixel.items() if v is None]
        if missing:
            found.append(f"Image Pixel Module lacks {', '.join(missing)}")
        else:
            allocated, stored, high = (
                int(pixel["BitsAllocated"]),
                int(pixel["BitsStored"]),
                int(pixel["HighBit"]),
            )
            if stored > allocated:
                found.append(f"BitsStored {stored} exceeds BitsAllocated {allocated}")
            if high != stored - 1:
                found.append(f"HighBit {high} is not BitsStored - 1 ({stored - 1})")
            samples = int(pixel["SamplesPerPixel"])
            photometric = str(pixel["PhotometricInterpretation"])
            if photometric.startswith("MONOCHROME") and samples != 1:
                found.append(f"{photometric} with SamplesPerPixel {samples}")
            if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and samples != 3:
                found.append(f"{photometric} with SamplesPerPixel {samples}")
    return found
