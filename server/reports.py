"""PI-RADS structured reports of a study, in four forms, signed by the server for the
radiologist who generated them.

The content comes from the study's segmentations (server/segmentations.py): each lesion with
its PI-RADS category, location, volume and size, the gland volume when the prostate is
segmented, the overall assessment from the highest category (PI-RADS v2.1 assessment
categories) and a recommendation.  Forms:

* JSON: the content, the signature and what it covers;
* HTML and PDF (Pillow draws the pages): the content with key images, the slice where each
  lesion is largest with its segmentation outlined in red;
* DICOM SR, Comprehensive 3D SR with the TID 1500 Measurement Report (highdicom): one
  volumetric ROI group per lesion referencing its SEG segment, with the volume (SCT Volume,
  UCUM mL) and the PI-RADS category as a qualitative evaluation.  PI-RADS categories have no
  code in DCM/SCT, so they use this server's local coding scheme ``99IMGSRV`` (PS3.16 8.2:
  "99" schemes are local).  The SR is stored through the ingest path.

Signature: Ed25519 (RFC 8032) with the server's key (``<data_dir>/report_signing.pem``, created
at first use), over ``signed_payload``: the canonical JSON (sorted keys) of the content, the
signer, the time and the SHA-256 of the PDF, HTML and SR bytes.  Anyone can verify it with the
public key from ``GET /api/v1/reports/signing-key`` (see the README for the openssl commands).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from server.catalog.db import session
from server.catalog.schema import Instance, Patient, Segmentation, Study
from server.dicom.pixels import open_frames
from server.dicom.render import RenderOptions, render
from server.ingest import Ingestor
from server.segmentations import series_geometry
from server.storage import Storage

TEMPLATE = "pi_rads_structured_report"
LOCAL_SCHEME = "99IMGSRV"
_ASSESSMENT = {
    1: "Very low: clinically significant cancer is highly unlikely to be present",
    2: "Low: clinically significant cancer is unlikely to be present",
    3: "Intermediate: the presence of clinically significant cancer is equivocal",
    4: "High: clinically significant cancer is likely to be present",
    5: "Very high: clinically significant cancer is highly likely to be present",
}
_RECOMMENDATION = {
    1: "Routine follow-up",
    2: "Routine follow-up",
    3: "Consider targeted biopsy in the clinical context (PSA density, history)",
    4: "MRI-targeted biopsy recommended",
    5: "MRI-targeted biopsy recommended",
}


class ReportError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        super().__init__(message)


# --- signing key -------------------------------------------------------------------------------


def signing_key(root: Path) -> Ed25519PrivateKey:
    path = root / "report_signing.pem"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise RuntimeError(f"{path} is not an Ed25519 key") from None
        return key
    key = Ed25519PrivateKey.generate()
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        fh.flush()
        os.fsync(fh.fileno())
    return key


def public_key_pem(root: Path) -> bytes:
    return (
        signing_key(root)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def key_id(root: Path) -> str:
    raw = (
        signing_key(root)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


# --- content ------------------------------------------------------------------------------------


def _iso_date(text: str | None) -> str | None:
    if not text or len(text) < 8:
        return None
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}"


@dataclass
class Finding:
    row: Any
    size_mm: list[float] | None


def gather(study_uid: str, institution: str | None) -> tuple[dict[str, Any], list[Finding]]:
    with session():
        study = Study.get_or_none(Study.study_instance_uid == study_uid)
        if study is None or (institution is not None and study.institution != institution):
            raise ReportError(404, "STUDY_NOT_FOUND", f"study {study_uid} not found")
        patient = Patient.get_by_id(study.patient_id)
        rows = list(
            Segmentation.select()
            .where(Segmentation.study_uid == study_uid)
            .order_by(Segmentation.created_at)
        )
    if institution is not None:
        rows = [r for r in rows if r.institution == institution]
    lesions: list[Finding] = []
    gland = None
    for row in rows:
        if row.region_type == "prostate":
            gland = row
            continue
        if row.region_type in ("peripheral_zone", "transition_zone"):
            continue  # anatomy (from the AI analysis), not a finding
        size = None
        if row.bounding_box:
            box = orjson.loads(row.bounding_box)
            spacing = series_geometry(row.image_uid, None).spacing
            extent = [b - a + 1 for a, b in zip(box["min"], box["max"], strict=True)]
            size = [
                round(extent[2] * spacing.x, 1),
                round(extent[1] * spacing.y, 1),
                round(extent[0] * spacing.z, 1),
            ]
        lesions.append(Finding(row, size))
    scores = [f.row.pi_rads_score for f in lesions if f.row.pi_rads_score]
    highest = max(scores) if scores else None
    content = {
        "template": TEMPLATE,
        "study_uid": study_uid,
        "patient_info": {
            "patient_id": patient.patient_id,
            "patient_name": patient.patient_name,
            "date_of_birth": _iso_date(patient.patient_birth_date),
            "study_date": _iso_date(study.study_date),
            "accession_number": study.accession_number,
        },
        "prostate_volume_ml": round(gland.volume_ml, 2) if gland is not None else None,
        "findings": [
            {
                "segmentation_id": f.row.id,
                "region": f.row.region_type,
                "location": f.row.anatomical_location,
                "pi_rads_score": f.row.pi_rads_score,
                "volume_ml": round(f.row.volume_ml, 3),
                "size_mm": f.size_mm,
                "description": f.row.notes,
                "validated": bool(f.row.validated),
            }
            for f in lesions
        ],
        "highest_pi_rads": highest,
        "overall_assessment": _ASSESSMENT[highest] if highest else "No lesion was reported",
        "recommendations": _RECOMMENDATION[highest] if highest else "Routine follow-up",
    }
    return content, lesions


def _mask_slices(storage: Storage, row: Any) -> tuple[list[str], np.ndarray[Any, Any]]:
    """Source SOP Instance UIDs in slice order and the lesion's mask per slice."""
    geometry = series_geometry(row.image_uid, None)
    uids = [str(d.SOPInstanceUID) for d in geometry.datasets]
    with session():
        item = Instance.get_or_none(Instance.sop_instance_uid == row.seg_sop_instance_uid)
    if item is None:
        raise ReportError(409, "SEGMENTATION_MISSING", f"the SEG of {row.id} is not stored")
    seg = hd.seg.segread(storage.local_path(item.file_path))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=[row.segment_number or 1],
        assert_missing_frames_are_empty=True,
    )
    return uids, pixels[..., 0] != 0


def key_image(storage: Storage, row: Any, size: int = 320) -> bytes:
    """PNG of the slice where the lesion is largest, its outline drawn in red."""
    uids, mask = _mask_slices(storage, row)
    index = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    with session():
        item = Instance.get(Instance.sop_instance_uid == uids[index])
    frames = open_frames(storage.local_path(item.file_path))
    image = Image.open(
        io.BytesIO(render(frames, 1, RenderOptions(media_type="image/png")))
    ).convert("RGB")
    inside = mask[index]
    edge = inside & ~(
        np.roll(inside, 1, 0)
        & np.roll(inside, -1, 0)
        & np.roll(inside, 1, 1)
        & np.roll(inside, -1, 1)
    )
    pixels = np.asarray(image).copy()
    pixels[edge] = (255, 0, 0)
    out = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    out.save(buf, "PNG")
    return buf.getvalue()


# --- forms ------------------------------------------------------------------------------------


def _lines(content: dict[str, Any], signer: str, signed_at: str) -> list[str]:
    p = content["patient_info"]
    lines = [
        "PI-RADS v2.1 STRUCTURED REPORT",
        f"Patient: {p['patient_name'] or '-'}   ID: {p['patient_id'] or '-'}   "
        f"Born: {p['date_of_birth'] or '-'}",
        f"Study date: {p['study_date'] or '-'}   Accession: {p['accession_number'] or '-'}",
        f"Prostate volume: {content['prostate_volume_ml'] or '-'} mL",
        "",
        "Findings:",
    ]
    for n, f in enumerate(content["findings"], start=1):
        size = " x ".join(str(s) for s in f["size_mm"]) + " mm" if f["size_mm"] else "-"
        lines.append(
            f"  {n}. {f['region']} {f['location'] or ''}: PI-RADS {f['pi_rads_score'] or '-'}, "
            f"{f['volume_ml']} mL, {size}"
        )
        if f["description"]:
            lines.append(f"     {f['description']}")
    if not content["findings"]:
        lines.append("  none")
    lines += [
        "",
        f"Assessment: {content['overall_assessment']}",
        f"Recommendation: {content['recommendations']}",
        "",
        f"Electronically signed by {signer} at {signed_at} (Ed25519, see the JSON form).",
    ]
    return lines


def pdf(content: dict[str, Any], images: list[bytes], signer: str, signed_at: str) -> bytes:
    page = Image.new("RGB", (827, 1169), "white")  # A4 at 100 dpi
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=15)
    y = 40
    for line in _lines(content, signer, signed_at):
        draw.text((40, y), line, fill="black", font=font)
        y += 22
    x, y = 40, max(y + 20, 560)
    for png in images[:4]:
        key = Image.open(io.BytesIO(png)).convert("RGB")
        page.paste(key, (x, y))
        x += key.width + 20
        if x + key.width > 800:
            x, y = 40, y + key.height + 20
    buf = io.BytesIO()
    page.save(buf, "PDF", resolution=100.0)
    return buf.getvalue()


def html_page(content: dict[str, Any], images: list[bytes], signer: str, signed_at: str) -> str:
    lines = _lines(content, signer, signed_at)
    body = "".join(f"<p>{html.escape(line)}</p>" for line in lines[1:] if line)
    pictures = "".join(
        f'<img alt="key image {n}" src="data:image/png;base64,{base64.b64encode(p).decode()}">'
        for n, p in enumerate(images, start=1)
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>PI-RADS report</title>'
        f"</head><body><h1>{html.escape(lines[0])}</h1>{body}<div>{pictures}</div></body></html>"
    )


def pirads_code(score: int) -> Code:
    return Code(f"PIRADS-{score}", LOCAL_SCHEME, f"PI-RADS {score}")


def structured_report(
    storage: Storage, content: dict[str, Any], findings: list[Finding], signer: str
) -> bytes:
    """TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom)."""
    groups = []
    evidence = []
    for f in findings:
        row = f.row
        with session():
            seg_item = Instance.get(Instance.sop_instance_uid == row.seg_sop_instance_uid)
        seg_ds = dcmread(storage.local_path(seg_item.file_path), stop_before_pixels=True)
        evidence.append(seg_ds)
        qualitative = []
        if row.pi_rads_score:
            qualitative.append(
                hd.sr.QualitativeEvaluation(
                    name=Code("PIRADS", LOCAL_SCHEME, "PI-RADS v2.1 assessment category"),
                    value=pirads_code(int(row.pi_rads_score)),
                )
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=row.id),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg_ds.SOPClassUID),
                    sop_instance_uid=str(seg_ds.SOPInstanceUID),
                    segment_number=row.segment_number or 1,
                    source_series=hd.sr.SourceSeriesForSegmentation(row.image_uid),
                ),
                finding_type=codes.SCT.Lesion,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Prostate)],
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=float(row.volume_ml),
                        unit=Code("ml", "UCUM", "milliliter"),
                    )
                ],
                qualitative_evaluations=qualitative or None,
            )
        )
    if not evidence:
        raise ReportError(422, "NO_FINDINGS", "the study has no lesion segmentation to report")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name=signer
                ),
            )
        ),
        procedure_reported=Code(
            "PROSTATE-MRI", LOCAL_SCHEME, "Multiparametric MRI of the prostate"
        ),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=950,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="imaging-server",
        is_complete=True,
        is_final=True,
        series_description="PI-RADS report",
    )
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(
    storage: Storage,
    ingestor: Ingestor,
    study_uid: str,
    institution: str | None,
    signer: str,
    include_images: bool = True,
) -> dict[str, Any]:
    content, findings = gather(study_uid, institution)
    images = [key_image(storage, f.row) for f in findings] if include_images else []
    signed_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pdf_bytes = pdf(content, images, signer, signed_at)
    html_text = html_page(content, images, signer, signed_at)
    sr_bytes = structured_report(storage, content, findings, signer)
    stored = ingestor.ingest(sr_bytes, source=f"report:{signer}", institution=institution)
    report_id = f"report_{secrets.token_hex(8)}"
    payload = {
        "report_id": report_id,
        "content": content,
        "signed_by": signer,
        "signed_at": signed_at,
        "artifacts": {
            "pdf_sha256": hashlib.sha256(pdf_bytes).hexdigest(),
            "html_sha256": hashlib.sha256(html_text.encode()).hexdigest(),
            "sr_sop_instance_uid": stored.sop_instance_uid,
            "sr_sha256": hashlib.sha256(sr_bytes).hexdigest(),
        },
    }
    canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    signature = signing_key(storage.root).sign(canonical)
    directory = storage.root / "reports"
    directory.mkdir(exist_ok=True)
    (directory / f"{report_id}.pdf").write_bytes(pdf_bytes)
    (directory / f"{report_id}.html").write_text(html_text, encoding="utf-8")
    (directory / f"{report_id}.dcm").write_bytes(sr_bytes)
    document = {
        **payload,
        "status": "finalized",
        "institution": institution,
        "signature": {
            "algorithm": "Ed25519",
            "key_id": key_id(storage.root),
            "signed_payload_b64": base64.b64encode(canonical).decode(),
            "value_b64": base64.b64encode(signature).decode(),
        },
    }
    (directory / f"{report_id}.json").write_bytes(orjson.dumps(document))
    return document


def load(storage: Storage, report_id: str, institution: str | None) -> dict[str, Any]:
    if not report_id.startswith("report_") or not report_id[7:].isalnum():
        raise ReportError(404, "REPORT_NOT_FOUND", f"report {report_id} not found")
    path = storage.root / "reports" / f"{report_id}.json"
    if not path.is_file():
        raise ReportError(404, "REPORT_NOT_FOUND", f"report {report_id} not found")
    document: dict[str, Any] = orjson.loads(path.read_bytes())
    if institution is not None and document.get("institution") != institution:
        raise ReportError(404, "REPORT_NOT_FOUND", f"report {report_id} not found")
    return document


def artifact(storage: Storage, report_id: str, extension: str) -> Path:
    return storage.root / "reports" / f"{report_id}.{extension}"
