"""``/api/v1/reports``: generate a signed PI-RADS report of a study (``generate_reports``) and
fetch it as PDF, HTML, JSON or DICOM SR (``read_images``); ``/reports/signing-key`` is the
public key that verifies the signatures (server/reports.py)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server import reports
from server.archive import Archive
from server.auth.roles import GENERATE_REPORTS, READ_IMAGES
from server.web.api.auth import API_PREFIX, authorize, tenant_of
from server.web.api.envelope import ApiError, json_body, ok

_MEDIA = {
    "pdf": "application/pdf",
    "html": "text/html; charset=utf-8",
    "json": "application/json",
    "dcm": "application/dicom",
}


def report_routes(archive: Archive) -> list[BaseRoute]:
    storage = archive.storage

    def generate(request: Request, body: Any) -> Response:
        claims = authorize(request, archive, GENERATE_REPORTS)
        if not isinstance(body, dict) or not isinstance(body.get("study_uid"), str):
            raise ApiError(
                422,
                "VALIDATION_ERROR",
                "study_uid is required",
                {"fields": {"study_uid": "is required"}},
            )
        template = body.get("template", reports.TEMPLATE)
        if template != reports.TEMPLATE:
            raise ApiError(
                422,
                "VALIDATION_ERROR",
                f"template must be {reports.TEMPLATE}",
                {"fields": {"template": f"only {reports.TEMPLATE} exists"}},
            )
        include_images = body.get("include_images", True)
        if not isinstance(include_images, bool):
            raise ApiError(
                422,
                "VALIDATION_ERROR",
                "include_images must be true or false",
                {"fields": {"include_images": "must be a boolean"}},
            )
        signer = claims.username or f"user_{claims.user_id}"
        try:
            document = reports.generate(
                storage,
                archive.ingestor,
                body["study_uid"],
                tenant_of(claims),
                signer,
                include_images,
            )
        except reports.ReportError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
        report_id = document["report_id"]
        archive.audit.record(
            "api.reports.generate",
            f"user_{claims.user_id}",
            study=body["study_uid"],
            report=report_id,
        )
        base = f"{API_PREFIX}/reports/{report_id}"
        return ok(
            {
                "report_id": report_id,
                "study_uid": body["study_uid"],
                "template_used": reports.TEMPLATE,
                "generated_at": document["signed_at"],
                "formats": {
                    "pdf_url": f"{base}.pdf",
                    "html_url": f"{base}.html",
                    "json_url": f"{base}.json",
                    "dicom_sr_url": f"{base}.dcm",
                },
                "status": document["status"],
                "digital_signature": {
                    "signed": True,
                    "signature_timestamp": document["signed_at"],
                    "certificate_serial": document["signature"]["key_id"],
                    "algorithm": "Ed25519",
                    "signed_by": document["signed_by"],
                },
            },
            "Report generated and signed",
            status=201,
        )

    def fetch(request: Request) -> Response:
        claims = authorize(request, archive, READ_IMAGES)
        name = request.path_params["name"]
        report_id, _, extension = name.rpartition(".")
        if extension not in _MEDIA:
            raise ApiError(404, "REPORT_NOT_FOUND", f"no report form {name}")
        try:
            reports.load(storage, report_id, tenant_of(claims))
        except reports.ReportError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
        archive.audit.record("api.reports.get", f"user_{claims.user_id}", report=name)
        data = reports.artifact(storage, report_id, extension).read_bytes()
        return Response(data, media_type=_MEDIA[extension])

    async def generate_endpoint(request: Request) -> Response:
        return await run_in_threadpool(generate, request, await json_body(request))

    async def fetch_endpoint(request: Request) -> Response:
        return await run_in_threadpool(fetch, request)

    async def key_endpoint(request: Request) -> Response:
        pem = await run_in_threadpool(reports.public_key_pem, storage.root)
        return Response(pem, media_type="application/x-pem-file")

    return [
        Route(f"{API_PREFIX}/reports/generate", generate_endpoint, methods=["POST"]),
        Route(f"{API_PREFIX}/reports/signing-key", key_endpoint, methods=["GET"]),
        Route(f"{API_PREFIX}/reports/{{name}}", fetch_endpoint, methods=["GET"]),
    ]
