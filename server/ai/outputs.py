"""The AI results as DICOM objects (highdicom): one Segmentation with a segment per structure
and one TID 1500 Measurement Report, both marked as AI-generated.

* SEG (PS3.3 A.51): BINARY, one segment per structure (gland, zones, each lesion) with SNOMED CT
  category/type codes, Segment Algorithm Type AUTOMATIC and an Algorithm Identification whose
  family is CID 7162 "Artificial Intelligence".  Frames follow the source slices as ordered by
  position (server/ai/volume.py).
* SR, Comprehensive 3D with TID 1500: the observer is a device (the model), not a person; one
  volumetric group per structure referencing its SEG segment, with its volume (SCT Volume, UCUM
  mL), the lesion's finding site (zone and laterality) and its AI-suggested PI-RADS category;
  the gland's group also carries the PSA density when a PSA value was given.

UIDs are derived from the job id (PS3.5 B.2, UUID-derived ``2.25`` UIDs from a hash), so a job
that is run again after its worker died produces the same SOP Instance UIDs and the ingest path
keeps one copy: a job's outputs are stored once, however many attempts it took.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from server.ai.analysis import Findings, Structure
from server.ai.volume import Volume
from server.reports import LOCAL_SCHEME, pirads_code
from server.segmentations import SEGMENT_PROPERTIES

AI_NOTICE = "AI-generated (imaging-server); not for clinical use"
_ML = Code("ml", "UCUM", "milliliter")
_PSA_DENSITY = Code("PSAD", LOCAL_SCHEME, "PSA density")
_PSA_DENSITY_UNIT = Code("ng/mL/mL", "UCUM", "ng/mL/mL")
_FINDING: dict[str, Code] = {
    "prostate": codes.SCT.Prostate,
    "peripheral_zone": codes.SCT.PeripheralZoneOfTheProstate,
    "transition_zone": SEGMENT_PROPERTIES["transition_zone"][1],
    "lesion": codes.SCT.Lesion,
}


def derived_uid(job_id: str, what: str) -> str:
    """A UID fixed by (job, what): ``2.25.`` + the decimal of 128 bits of SHA-256."""
    digest = hashlib.sha256(f"imaging-server:{job_id}:{what}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@dataclass(frozen=True)
class ModelInfo:
    name: str  # e.g. "prostate-phantom"
    version: str  # e.g. the weights' SHA-256 prefix


def _algorithm(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name, version=model.version, family=codes.cid7162.ArtificialIntelligence
    )


def segmentation(
    volume: Volume, found: Findings, model: ModelInfo, job_id: str
) -> tuple[hd.seg.Segmentation, list[int]]:
    """The SEG and each structure's segment number (in ``found.structures`` order)."""
    structures = found.structures
    descriptions = []
    for number, structure in enumerate(structures, start=1):
        category, kind = SEGMENT_PROPERTIES[structure.region]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=structure.label,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=_algorithm(model),
                tracking_uid=derived_uid(job_id, f"segment-{number}"),
                tracking_id=structure.location or structure.label,
            )
        )
    masks = np.stack([s.mask for s in structures], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=volume.datasets,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(job_id, "seg-series"),
        series_number=980,
        sop_instance_uid=derived_uid(job_id, "seg"),
        instance_number=1,
        manufacturer="imaging-server",
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number="0",
        series_description="AI prostate segmentation",
        content_label="AI_PROSTATE",
        content_description=AI_NOTICE,
        content_creator_name="imaging-server^AI",
    )
    return seg, list(range(1, len(structures) + 1))


def _group(
    structure: Structure,
    number: int,
    seg: Dataset,
    volume: Volume,
    model: ModelInfo,
    job_id: str,
    extra: list[hd.sr.Measurement],
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    sites = None
    qualitative = None
    if structure.region == "lesion":
        laterality = codes.SCT.Left if "_left_" in (structure.location or "") else codes.SCT.Right
        sites = [
            hd.sr.FindingSite(
                anatomic_location=_FINDING[structure.zone or "peripheral_zone"],
                laterality=laterality,
            )
        ]
        if structure.pi_rads:
            qualitative = [
                hd.sr.QualitativeEvaluation(
                    name=Code("PIRADS", LOCAL_SCHEME, "PI-RADS v2.1 assessment category"),
                    value=pirads_code(structure.pi_rads),
                )
            ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(job_id, f"segment-{number}"),
            identifier=structure.location or structure.label,
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_uid),
        ),
        finding_type=_FINDING[structure.region],
        algorithm_id=algorithm,
        finding_sites=sites,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=round(structure.volume_ml, 3),
                unit=_ML,
                algorithm_id=algorithm,
            ),
            *extra,
        ],
        qualitative_evaluations=qualitative,
    )


def measurement_report(
    volume: Volume,
    found: Findings,
    seg: Dataset,
    numbers: list[int],
    model: ModelInfo,
    job_id: str,
) -> hd.sr.Comprehensive3DSR:
    groups = []
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    for structure, number in zip(found.structures, numbers, strict=True):
        extra: list[hd.sr.Measurement] = []
        if structure is found.gland and found.psa_density is not None:
            extra.append(
                hd.sr.Measurement(
                    name=_PSA_DENSITY,
                    value=round(found.psa_density, 4),
                    unit=_PSA_DENSITY_UNIT,
                    algorithm_id=algorithm,
                )
            )
        groups.append(_group(structure, number, seg, volume, model, job_id, extra))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=derived_uid(model.name, model.version),
                    name=f"imaging-server AI ({model.name})",
                    manufacturer_name="imaging-server",
                    model_name=model.name,
                ),
            )
        ),
        procedure_reported=Code(
            "PROSTATE-MRI", LOCAL_SCHEME, "Multiparametric MRI of the prostate"
        ),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.datasets],
        content=report,
        series_instance_uid=derived_uid(job_id, "sr-series"),
        series_number=981,
        sop_instance_uid=derived_uid(job_id, "sr"),
        instance_number=1,
        manufacturer="imaging-server",
        is_complete=True,
        is_final=False,  # a suggestion awaiting a radiologist, not a verified report
        series_description="AI prostate measurements",
    )


def encode(dataset: Dataset) -> bytes:
    buf = io.BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def summary(found: Findings) -> dict[str, Any]:
    return {
        "prostate_volume_ml": round(found.gland.volume_ml, 2),
        "zone_volumes_ml": {z.region: round(z.volume_ml, 2) for z in found.zones},
        "prostate_psa_density": round(found.psa_density, 4)
        if found.psa_density is not None
        else None,
        "total_lesions": len(found.lesions),
        "highest_pi_rads": found.highest_pi_rads,
        "overall_assessment": found.overall_assessment,
    }
