"""The one attribute table: which DICOM attributes the catalog holds, at which level.

Ingest reads it to know what to extract, the query engine to know which keys compile to SQL
(everything else is matched in memory against the stored DICOM JSON), and responses to know
which column answers a requested key.  Tags and VRs come from pydicom's data dictionary so they
are never typed by hand.

Levels and unique keys follow PS3.4 C.6 (Patient Root and Study Root information models).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword


class Level(enum.IntEnum):
    """Query/Retrieve levels, ordered from the top of the hierarchy (PS3.4 C.3)."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3

    @classmethod
    def parse(cls, text: str) -> Level:
        """The value of (0008,0052) QueryRetrieveLevel; ``INSTANCE`` is accepted for IMAGE."""
        name = text.strip().upper()
        if name == "INSTANCE":
            name = "IMAGE"
        return cls[name]


@dataclass(frozen=True)
class Attribute:
    keyword: str
    tag: int
    vr: str
    level: Level
    column: str
    unique: bool = False
    computed: bool = False  # maintained by the catalog, never read from a dataset

    @property
    def tag_hex(self) -> str:
        return f"{self.tag:08X}"


def _snake(keyword: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", keyword).lower()


def _attr(keyword: str, level: Level, *, unique: bool = False, computed: bool = False) -> Attribute:
    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - guards the table itself
        raise KeyError(keyword)
    return Attribute(
        keyword, int(tag), dictionary_VR(tag), level, _snake(keyword), unique, computed
    )


P, ST, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE

ATTRIBUTES: tuple[Attribute, ...] = (
    _attr("PatientID", P, unique=True),
    _attr("IssuerOfPatientID", P),
    _attr("PatientName", P),
    _attr("PatientBirthDate", P),
    _attr("PatientSex", P),
    _attr("NumberOfPatientRelatedStudies", P, computed=True),
    _attr("NumberOfPatientRelatedSeries", P, computed=True),
    _attr("NumberOfPatientRelatedInstances", P, computed=True),
    _attr("StudyInstanceUID", ST, unique=True),
    _attr("StudyDate", ST),
    _attr("StudyTime", ST),
    _attr("AccessionNumber", ST),
    _attr("StudyID", ST),
    _attr("StudyDescription", ST),
    _attr("ReferringPhysicianName", ST),
    _attr("ModalitiesInStudy", ST, computed=True),
    _attr("NumberOfStudyRelatedSeries", ST, computed=True),
    _attr("NumberOfStudyRelatedInstances", ST, computed=True),
    _attr("SeriesInstanceUID", SE, unique=True),
    _attr("Modality", SE),
    _attr("SeriesNumber", SE),
    _attr("SeriesDescription", SE),
    _attr("BodyPartExamined", SE),
    _attr("SeriesDate", SE),
    _attr("SeriesTime", SE),
    _attr("NumberOfSeriesRelatedInstances", SE, computed=True),
    _attr("SOPInstanceUID", IM, unique=True),
    _attr("SOPClassUID", IM),
    _attr("InstanceNumber", IM),
    _attr("NumberOfFrames", IM),
)

BY_KEYWORD: dict[str, Attribute] = {a.keyword: a for a in ATTRIBUTES}
BY_TAG: dict[int, Attribute] = {a.tag: a for a in ATTRIBUTES}
UNIQUE_KEY: dict[Level, Attribute] = {a.level: a for a in ATTRIBUTES if a.unique}
INTEGER_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "SV", "UV"})


def at_level(level: Level) -> tuple[Attribute, ...]:
    return tuple(a for a in ATTRIBUTES if a.level == level)


def extracted(level: Level) -> tuple[Attribute, ...]:
    """Attributes ingest copies from a dataset into the catalog row of ``level``."""
    return tuple(a for a in ATTRIBUTES if a.level == level and not a.computed)
