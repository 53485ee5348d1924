"""``GET /api/v1/audit/patients/{patient_id}``: who accessed a patient's data, when, from where
and through which interface (permission ``read_audit_log``); ``python -m server audit
history`` is the same on the command line.

A patient's entries are found by PatientID and by the UIDs of the patient's studies and series
(current and deleted ones).  A user bound to an institution sees the history of that
institution's studies only, matched by UID, so another tenant's activity never shows.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.archive import Archive
from server.audit import history
from server.auth.roles import READ_AUDIT
from server.catalog.db import session
from server.catalog.schema import DeletedSeries, Patient, Series, Study
from server.web.api.auth import API_PREFIX, authorize, tenant_of
from server.web.api.envelope import ApiError, ok

MAX_ENTRIES = 5000


def patient_subjects(patient_id: str, institution: str | None) -> tuple[list[str], list[str]]:
    """(study UIDs, series UIDs) of a patient, within ``institution`` when given."""
    with session():
        studies = (
            Study.select(Study.id, Study.study_instance_uid)
            .join(Patient, on=(Study.patient == Patient.id))
            .where(Patient.patient_id == patient_id)
        )
        if institution is not None:
            studies = studies.where(Study.institution == institution)
        study_rows = list(studies.tuples())
        series = (
            [
                uid
                for (uid,) in Series.select(Series.series_instance_uid)
                .where(Series.study.in_([sid for sid, _ in study_rows]))
                .tuples()
            ]
            if study_rows
            else []
        )
        study_uids = [uid for _, uid in study_rows]
        deleted = DeletedSeries.select(
            DeletedSeries.series_instance_uid, DeletedSeries.study_instance_uid
        )
        if institution is not None:
            deleted = deleted.where(DeletedSeries.institution == institution)
        for series_uid, study_uid in deleted.tuples():
            if study_uid in study_uids:
                series.append(series_uid)
    return study_uids, series


def patient_history(
    archive: Archive, patient_id: str, institution: str | None, since: str = ""
) -> list[dict[str, Any]]:
    studies, series = patient_subjects(patient_id, institution)
    # Tenant-bound callers match by their own UIDs only: a bare PatientID may be another
    # institution's patient.
    key = patient_id if institution is None else "\0no-patient-id-match"
    entries = history(archive.storage.root / "audit.log", key, studies, series, since)
    out = []
    for entry in entries:
        out.append(entry)
        if len(out) >= MAX_ENTRIES:
            break
    return out


def audit_routes(archive: Archive) -> list[BaseRoute]:
    def patient(request: Request) -> Response:
        claims = authorize(request, archive, READ_AUDIT)
        patient_id = request.path_params["patient_id"]
        tenant = tenant_of(claims)
        since = request.query_params.get("since", "")
        studies, _ = patient_subjects(patient_id, tenant)
        if tenant is not None and not studies:
            raise ApiError(
                404, "PATIENT_NOT_FOUND", f"no patient {patient_id}", {"patient_id": patient_id}
            )
        entries = patient_history(archive, patient_id, tenant, since)
        archive.audit.record(
            "api.audit.patient_history",
            f"user_{claims.user_id}",
            address=request.client.host if request.client else "?",
            patient_id=patient_id,
            results=len(entries),
        )
        return ok({"patient_id": patient_id, "entries": entries, "count": len(entries)})

    async def endpoint(request: Request) -> Response:
        return await run_in_threadpool(patient, request)

    return [Route(f"{API_PREFIX}/audit/patients/{{patient_id}}", endpoint, methods=["GET"])]
