"""``POST /api/v1/studies/{study_uid}/deidentify``: a de-identified copy of a study, written into
the archive (server/deid.py).  Body: ``{"patient_id", "patient_name"}`` (the pseudonym).  Needs
``read_images`` and ``upload_images``; the copy belongs to the caller's institution."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.archive import Archive
from server.auth.roles import READ_IMAGES, UPLOAD_IMAGES
from server.catalog.db import session
from server.catalog.search import stored_instances
from server.deid import copy_study
from server.web.api.auth import API_PREFIX, authorize, tenant_of
from server.web.api.envelope import ApiError, json_body, ok


def _pseudonym(body: Any) -> tuple[str, str]:
    if not isinstance(body, dict):
        raise ApiError(422, "VALIDATION_ERROR", "the body must be a JSON object")
    bad: dict[str, str] = {}
    values = []
    for name, limit in (("patient_id", 64), ("patient_name", 64)):
        value = body.get(name)
        if not isinstance(value, str) or not value.strip():
            bad[name] = "is required (a string)"
        elif len(value) > limit or "\\" in value:
            bad[name] = f"must be at most {limit} characters, without backslashes"
        else:
            values.append(value.strip())
    if bad:
        raise ApiError(422, "VALIDATION_ERROR", "the request has invalid fields", {"fields": bad})
    return values[0], values[1]


def deidentify_routes(archive: Archive) -> list[BaseRoute]:
    def run(request: Request, body: Any) -> Response:
        claims = authorize(request, archive, READ_IMAGES)
        authorize(request, archive, UPLOAD_IMAGES)
        patient_id, patient_name = _pseudonym(body)
        study_uid = request.path_params["study_uid"]
        tenant = tenant_of(claims)
        with session():
            items = stored_instances(study_uid, institution=tenant)
        if not items:
            raise ApiError(
                404, "STUDY_NOT_FOUND", f"study {study_uid} not found", {"study_uid": study_uid}
            )
        paths = [archive.storage.local_path(i.file_path) for i in items]
        new_uid, count = copy_study(archive.ingestor, paths, patient_id, patient_name, tenant)
        archive.audit.record(
            "api.deidentify",
            f"user_{claims.user_id}",
            address=request.client.host if request.client else "?",
            study=study_uid,
            copy=new_uid,
            instances=count,
        )
        return ok(
            {"source_study_uid": study_uid, "study_uid": new_uid, "instances": count},
            "De-identified copy stored",
            status=201,
        )

    async def endpoint(request: Request) -> Response:
        return await run_in_threadpool(run, request, await json_body(request))

    return [Route(f"{API_PREFIX}/studies/{{study_uid}}/deidentify", endpoint, methods=["POST"])]
