"""Synthetic DICOM studies for tests and benchmarks (pydicom only; no real patient data).

python -m tools.generate ct OUT_DIR --slices 120 --size 512
python -m tools.generate small OUT_DIR --studies 200
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

ROOT = "1.2.826.0.1.3680043.10.1439."  # a test-only UID root


def uid() -> str:
    return generate_uid(prefix=ROOT)


@dataclass
class StudySpec:
    patient_id: str = "PAT001"
    patient_name: str = "DOE^JANE"
    birth_date: str = "19700101"
    sex: str = "F"
    study_uid: str = ""
    study_date: str = "20240115"
    study_time: str = "101500"
    accession: str = "ACC001"
    description: str = "CT CHEST"
    referring: str = "SMITH^JOHN"

    def __post_init__(self) -> None:
        self.study_uid = self.study_uid or uid()


def _base(spec: StudySpec, series_uid: str, modality: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.StudyInstanceUID = spec.study_uid
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.StudyID = "1"
    ds.StudyDescription = spec.description
    ds.ReferringPhysicianName = spec.referring
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDate = spec.study_date
    ds.SeriesTime = spec.study_time
    ds.Manufacturer = "SYNTHETIC"
    ds.InstitutionName = "TEST HOSPITAL"
    return ds


def ct_series(
    spec: StudySpec,
    slices: int = 120,
    size: int = 512,
    series_uid: str | None = None,
    series_number: int = 1,
    description: str = "AXIAL 1.0",
) -> Iterator[Dataset]:
    """A CT series of ``slices`` 16-bit ``size``x``size`` images (a sphere in a body-like disc)."""
    series_uid = series_uid or uid()
    frame_of_reference = uid()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = (size - 1) / 2
    radius = np.hypot(yy - centre, xx - centre)
    body = (radius < size * 0.42).astype(np.int16)
    rng = np.random.default_rng(1234)
    for n in range(slices):
        ds = _base(spec, series_uid, "CT", CTImageStorage)
        ds.SOPInstanceUID = uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.BodyPartExamined = "CHEST"
        ds.InstanceNumber = n + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [-(size / 2.0), -(size / 2.0), float(n)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 1.0
        ds.PixelSpacing = [0.7, 0.7]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        z = (n - slices / 2) / max(slices, 1) * size
        sphere = np.sqrt((yy - centre) ** 2 + (xx - centre) ** 2 + z**2) < size * 0.15
        image = 1024 + body * 40 + sphere.astype(np.int16) * 300
        image = image + rng.integers(0, 20, size=(size, size), dtype=np.int16)
        ds.PixelData = image.astype(np.uint16).tobytes()
        yield ds


def small_instance(spec: StudySpec, series_uid: str | None = None, number: int = 1) -> Dataset:
    """A tiny 8-bit secondary capture (for small-instance ingest and big catalogs)."""
    ds = _base(spec, series_uid or uid(), "OT", SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256))
    return ds


def write(ds: Dataset, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def many_studies(count: int, start: dt.date = dt.date(2015, 1, 1)) -> Iterator[StudySpec]:
    """Varied patients/dates/names so queries have realistic selectivity."""
    surnames = [
        "LEWIS",
        "SMITH",
        "JONES",
        "BROWN",
        "TAYLOR",
        "WILSON",
        "DAVIES",
        "EVANS",
        "THOMAS",
        "JOHNSON",
        "ROBERTS",
        "WALKER",
        "WRIGHT",
        "ROBINSON",
        "THOMPSON",
        "WHITE",
        "HUGHES",
        "EDWARDS",
        "GREEN",
        "HALL",
        "WOOD",
        "HARRIS",
        "LEWINSKY",
        "MARTIN",
        "JACKSON",
        "CLARKE",
        "CLARK",
        "TURNER",
        "HILL",
        "SCOTT",
        "COOPER",
        "MORRIS",
        "WARD",
        "MOORE",
        "KING",
        "WATSON",
        "BAKER",
        "HARRISON",
        "MORGAN",
    ]
    for n in range(count):
        yield StudySpec(
            patient_id=f"P{n // 2:07d}",
            # two studies per patient, with the same demographics, as a real archive has
            patient_name=f"{surnames[(n // 2) % len(surnames)]}^GIVEN{(n // 2) % 97}",
            study_date=(start + dt.timedelta(days=n % 3650)).strftime("%Y%m%d"),
            accession=f"A{n:08d}",
            description=["CT CHEST", "MR BRAIN", "CR THORAX", "US ABDOMEN"][n % 4],
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    ct = sub.add_parser("ct", help="one CT study")
    ct.add_argument("out", type=Path)
    ct.add_argument("--slices", type=int, default=120)
    ct.add_argument("--size", type=int, default=512)
    small = sub.add_parser("small", help="many one-instance studies")
    small.add_argument("out", type=Path)
    small.add_argument("--studies", type=int, default=100)
    args = parser.parse_args()
    if args.kind == "ct":
        for ds in ct_series(StudySpec(), args.slices, args.size):
            write(ds, args.out)
    else:
        for spec in many_studies(args.studies):
            write(small_instance(spec), args.out)


if __name__ == "__main__":
    main()
