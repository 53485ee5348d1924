"""Segmentations of series: a mask becomes a DICOM Segmentation instance (highdicom, PS3.3
A.51) stored through the ingest path, and a catalog row with its measurements.

The mask of ``POST /api/v1/segmentations`` is base64 of ``slices x rows x columns`` bytes
(non-zero = inside), optionally zlib-compressed, slices in the order of the series along its
slice normal (the order ``/api/v1/images/{uid}`` reports ``dimensions`` in).  Geometry comes
from the series' stored headers (no file is read): the mask must match it, and volume, surface
area and sphericity use its pixel spacing and slice spacing (server/domain/entities.py).
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import time
import zlib
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import orjson
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from server.catalog.db import session, write_transaction
from server.catalog.schema import Instance, Segmentation, Series, Study
from server.domain.entities import AnatomicalRegion, ImageSpacing, MedicalSegmentation
from server.ingest import Ingestor

MAX_MASK_BYTES = 512 << 20
CREATION_METHODS = ("manual", "semi_automatic", "ai_automatic")
# Segmented Property Category / Type per region (SNOMED CT, PS3.16 CID 7150/7151).
_ANATOMY = codes.SCT.AnatomicalStructure
SEGMENT_PROPERTIES: dict[str, tuple[Code, Code]] = {
    "prostate": (_ANATOMY, codes.SCT.Prostate),
    "peripheral_zone": (_ANATOMY, codes.SCT.PeripheralZoneOfTheProstate),
    "transition_zone": (_ANATOMY, Code("399384005", "SCT", "Transition zone of the prostate")),
    "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
    "other": (_ANATOMY, codes.SCT.Tissue),
}
_ALGORITHM = {
    "manual": hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    "semi_automatic": hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
    "ai_automatic": hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
}


class SegmentationError(Exception):
    """A request that cannot be honoured: ``status``/``code`` for the API's error envelope."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        self.status = status
        self.code = code
        self.details = details
        super().__init__(message)


@dataclass(frozen=True)
class SeriesGeometry:
    datasets: list[Dataset]  # headers in slice order
    spacing: ImageSpacing
    study_uid: str

    @property
    def shape(self) -> tuple[int, int, int]:
        first = self.datasets[0]
        frames = int(first.get("NumberOfFrames") or 1)
        slices = frames if len(self.datasets) == 1 else len(self.datasets)
        return (slices, int(first.Rows), int(first.Columns))


def _no_bulk(tag: str, vr: str, uri: str) -> bytes:
    return b""


def series_geometry(series_uid: str, institution: str | None) -> SeriesGeometry:
    """The series' image headers (from the catalog) sorted along the slice normal."""
    with session():
        rows = list(
            Instance.select(Instance.metadata, Study.study_instance_uid, Study.institution)
            .join(Series, on=(Instance.series == Series.id))
            .join(Study, on=(Series.study == Study.id))
            .where(Series.series_instance_uid == series_uid)
            .tuples()
        )
    rows = [r for r in rows if institution is None or r[2] == institution]
    if not rows:
        raise SegmentationError(
            404,
            "MEDICAL_IMAGE_NOT_FOUND",
            f"Medical image with UID {series_uid} not found",
            series_uid=series_uid,
            search_attempted=True,
        )
    datasets = [Dataset.from_json(orjson.loads(r[0]), bulk_data_uri_handler=_no_bulk) for r in rows]
    datasets = [d for d in datasets if "Rows" in d and "Columns" in d]
    if not datasets:
        raise SegmentationError(422, "NOT_AN_IMAGE", f"series {series_uid} holds no images")
    orientation = [float(v) for v in datasets[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    normal = np.cross(orientation[:3], orientation[3:])

    def position(ds: Dataset) -> float:
        ipp = ds.get("ImagePositionPatient")
        if ipp is None:
            return float(ds.get("InstanceNumber") or 0)
        return float(np.dot(normal, [float(v) for v in ipp]))

    datasets.sort(key=position)
    pixel = [float(v) for v in datasets[0].get("PixelSpacing", [1.0, 1.0])]
    if len(datasets) > 1:
        gaps = np.diff([position(d) for d in datasets])
        between = float(np.median(np.abs(gaps))) or float(datasets[0].get("SliceThickness") or 1)
    else:
        between = float(
            datasets[0].get("SpacingBetweenSlices") or datasets[0].get("SliceThickness") or 1.0
        )
    return SeriesGeometry(datasets, ImageSpacing(pixel[1], pixel[0], between), str(rows[0][1]))


def decode_mask(text: Any, shape: tuple[int, int, int]) -> np.ndarray[Any, Any]:
    if not isinstance(text, str) or not text:
        raise SegmentationError(
            422,
            "VALIDATION_ERROR",
            "mask_data must be base64 text",
            fields={"mask_data": "is required"},
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SegmentationError(
            422,
            "VALIDATION_ERROR",
            "mask_data is not valid base64",
            fields={"mask_data": "is not base64"},
        ) from None
    if raw[:1] == b"\x78":
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(raw, MAX_MASK_BYTES + 1)
        except zlib.error:
            pass  # not zlib after all: a raw mask that happens to start with 0x78
    expected = shape[0] * shape[1] * shape[2]
    if len(raw) != expected:
        raise SegmentationError(
            422,
            "MASK_GEOMETRY_MISMATCH",
            f"the mask has {len(raw)} voxels; the image is {shape[0]}x{shape[1]}x{shape[2]} "
            f"({expected})",
            expected_shape=list(shape),
            received_voxels=len(raw),
        )
    return np.asarray(np.frombuffer(raw, dtype=np.uint8).reshape(shape) != 0)


def to_json(row: Any) -> dict[str, Any]:
    def iso(t: int | None) -> str | None:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None

    return {
        "segmentation_id": row.id,
        "image_uid": row.image_uid,
        "study_uid": row.study_uid,
        "region_type": row.region_type,
        "creation_method": row.creation_method,
        "confidence": row.confidence,
        "created_by": row.created_by,
        "created_at": iso(row.created_at),
        "last_modified": iso(row.last_modified),
        "volume_ml": round(row.volume_ml, 4),
        "surface_area_mm2": round(row.surface_area_mm2, 2),
        "sphericity": round(row.sphericity, 4),
        "voxel_count": row.voxel_count,
        "bounding_box": orjson.loads(row.bounding_box) if row.bounding_box else None,
        "pi_rads_score": row.pi_rads_score,
        "anatomical_location": row.anatomical_location,
        "radiologist_notes": row.notes,
        "validated": bool(row.validated),
        "validated_by": row.validated_by,
        "validation_date": iso(row.validation_date),
        "seg_sop_instance_uid": row.seg_sop_instance_uid,
    }


def _pi_rads(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        raise SegmentationError(
            422,
            "VALIDATION_ERROR",
            f"{field} must be 1 to 5",
            fields={field: "must be an integer from 1 to 5"},
        )
    return value


def create(ingestor: Ingestor, body: Any, user: str, institution: str | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SegmentationError(422, "VALIDATION_ERROR", "the body must be a JSON object")
    bad: dict[str, str] = {}
    image_uid = body.get("image_uid")
    if not isinstance(image_uid, str) or not image_uid:
        bad["image_uid"] = "is required"
    region = body.get("region_type", "")
    if not isinstance(region, str) or region not in SEGMENT_PROPERTIES:
        bad["region_type"] = f"must be one of {', '.join(SEGMENT_PROPERTIES)}"
    method = body.get("creation_method", "manual")
    if not isinstance(method, str) or method not in CREATION_METHODS:
        bad["creation_method"] = f"must be one of {', '.join(CREATION_METHODS)}"
    confidence = body.get("confidence")
    if confidence is not None and (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not 0 <= confidence <= 1
    ):
        bad["confidence"] = "must be a number from 0 to 1"
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        bad["metadata"] = "must be an object"
        metadata = {}
    for name in ("anatomical_location", "radiologist_notes"):
        value = metadata.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 2000):
            bad[f"metadata.{name}"] = "must be a string of at most 2000 characters"
    if bad:
        raise SegmentationError(
            422, "VALIDATION_ERROR", "the request has invalid fields", fields=bad
        )
    pi_rads = _pi_rads(metadata.get("pi_rads_assessment"), "metadata.pi_rads_assessment")
    geometry = series_geometry(str(image_uid), institution)
    mask = decode_mask(body.get("mask_data"), geometry.shape)
    if not mask.any():
        raise SegmentationError(422, "EMPTY_MASK", "the mask selects no voxel")
    measured = MedicalSegmentation(
        "", str(image_uid), AnatomicalRegion(region), mask, str(method), spacing=geometry.spacing
    )
    category, kind = SEGMENT_PROPERTIES[str(region)]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=str(region),
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=_ALGORITHM[str(method)],
        algorithm_identification=(
            hd.AlgorithmIdentificationSequence(
                name="imaging-server",
                version="1",
                family=codes.cid7162.ArtificialIntelligence,
            )
            if method != "manual"
            else None
        ),
    )
    frames = mask if len(geometry.datasets) > 1 else mask.reshape((-1, *mask.shape[1:]))
    seg = hd.seg.Segmentation(
        source_images=geometry.datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="imaging-server",
        manufacturer_model_name="workstation API",
        software_versions="1",
        device_serial_number="0",
        series_description=f"SEG {region}",
    )
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    stored = ingestor.ingest(buf.getvalue(), source=f"segmentation:{user}", institution=institution)
    now = int(time.time())
    box = measured.bounding_box()
    with session(), write_transaction():
        row = Segmentation.create(
            id=f"seg_{secrets.token_hex(8)}",
            image_uid=image_uid,
            study_uid=geometry.study_uid,
            institution=institution,
            seg_series_uid=str(seg.SeriesInstanceUID),
            seg_sop_instance_uid=stored.sop_instance_uid,
            region_type=region,
            creation_method=method,
            confidence=confidence,
            created_by=user,
            created_at=now,
            last_modified=now,
            volume_ml=measured.calculate_volume(),
            surface_area_mm2=measured.calculate_surface_area(),
            sphericity=measured.calculate_sphericity(),
            voxel_count=measured.voxel_count,
            bounding_box=orjson.dumps(box).decode() if box else None,
            pi_rads_score=pi_rads,
            anatomical_location=metadata.get("anatomical_location"),
            notes=metadata.get("radiologist_notes"),
        )
    return to_json(row)


def _get(segmentation_id: str, institution: str | None) -> Any:
    row = Segmentation.get_or_none(Segmentation.id == segmentation_id)
    if row is None or (institution is not None and row.institution != institution):
        raise SegmentationError(
            404,
            "SEGMENTATION_NOT_FOUND",
            f"segmentation {segmentation_id} not found",
            segmentation_id=segmentation_id,
        )
    return row


def list_for(image_uid: str | None, institution: str | None) -> list[dict[str, Any]]:
    with session():
        select = Segmentation.select().order_by(Segmentation.created_at)
        if image_uid:
            select = select.where(Segmentation.image_uid == image_uid)
        if institution is not None:
            select = select.where(Segmentation.institution == institution)
        return [to_json(r) for r in select]


def update(segmentation_id: str, body: Any, user: str, institution: str | None) -> dict[str, Any]:
    if not isinstance(body, dict) or not body:
        raise SegmentationError(422, "VALIDATION_ERROR", "the body must name fields to change")
    allowed = {"pi_rads_score", "validated", "radiologist_notes", "anatomical_location"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise SegmentationError(
            422,
            "VALIDATION_ERROR",
            "unknown fields",
            fields={k: "cannot be changed here" for k in unknown},
        )
    for name in ("radiologist_notes", "anatomical_location"):
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 2000):
            raise SegmentationError(
                422,
                "VALIDATION_ERROR",
                f"{name} must be text",
                fields={name: "must be a string of at most 2000 characters"},
            )
    if "validated" in body and not isinstance(body["validated"], bool):
        raise SegmentationError(
            422,
            "VALIDATION_ERROR",
            "validated must be true or false",
            fields={"validated": "must be true or false"},
        )
    score = _pi_rads(body.get("pi_rads_score"), "pi_rads_score")
    with session(), write_transaction():
        row = _get(segmentation_id, institution)
        if "pi_rads_score" in body:
            row.pi_rads_score = score
        if "radiologist_notes" in body:
            row.notes = body["radiologist_notes"]
        if "anatomical_location" in body:
            row.anatomical_location = body["anatomical_location"]
        if "validated" in body:
            row.validated = int(body["validated"])
            row.validated_by = user if body["validated"] else None
            row.validation_date = int(time.time()) if body["validated"] else None
        row.last_modified = int(time.time())
        row.save()
    return to_json(row)


def get(segmentation_id: str, institution: str | None) -> dict[str, Any]:
    with session():
        return to_json(_get(segmentation_id, institution))
