"""``POST /api/v1/images/upload`` and ``GET /api/v1/images/upload/{upload_id}``.

The form (multipart/form-data) carries one or more ``file`` fields (DICOM files or zip archives
of them) and an optional ``metadata`` JSON field (``patient_id``, ``study_description``,
``override_patient_info``).  The files are staged, the answer (202) gives the ``upload_id``,
``processing_status`` and an ``estimated_completion``; the instances go through the ingest path
in the background.  Progress: the ``progress_url``, or ``image_uploads`` WebSocket events.
"""

from __future__ import annotations

import datetime as dt
import shutil
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server import uploads
from server.archive import Archive
from server.auth.roles import UPLOAD_IMAGES
from server.web.api.auth import API_PREFIX, authorize, tenant_of
from server.web.api.envelope import ApiError, ok

MAX_FILES = 10_000
THROUGHPUT = 40e6  # bytes/s assumed for estimated_completion (measured ingest on 2 cores)


def _metadata(raw: Any) -> uploads.Overrides:
    if raw is None or raw == "":
        return uploads.Overrides()
    if not isinstance(raw, str):
        raise ApiError(422, "VALIDATION_ERROR", "metadata must be a JSON text field")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(422, "VALIDATION_ERROR", "metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "VALIDATION_ERROR", "metadata must be a JSON object")
    bad = {
        k: "must be a string"
        for k in ("patient_id", "study_description")
        if k in data and not isinstance(data[k], str)
    }
    if "override_patient_info" in data and not isinstance(data["override_patient_info"], bool):
        bad["override_patient_info"] = "must be true or false"
    if isinstance(data.get("patient_id"), str) and len(data["patient_id"]) > 64:
        bad["patient_id"] = "must be at most 64 characters"
    if isinstance(data.get("study_description"), str) and len(data["study_description"]) > 64:
        bad["study_description"] = "must be at most 64 characters"
    if bad:
        raise ApiError(422, "VALIDATION_ERROR", "metadata has invalid fields", {"fields": bad})
    if not data.get("override_patient_info"):
        return uploads.Overrides()
    return uploads.Overrides(data.get("patient_id") or None, data.get("study_description") or None)


def upload_routes(archive: Archive) -> list[BaseRoute]:
    root = archive.storage.root

    async def upload(request: Request) -> Response:
        claims = await run_in_threadpool(authorize, request, archive, UPLOAD_IMAGES)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                415, "UNSUPPORTED_MEDIA_TYPE", "send multipart/form-data with file fields"
            )
        form = await request.form(max_files=MAX_FILES, max_fields=100)
        try:
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not files:
                raise ApiError(
                    422, "VALIDATION_ERROR", "no file field in the form", {"fields": ["file"]}
                )
            overrides = _metadata(form.get("metadata"))
            tenant = tenant_of(claims)
            upload_id, directory = await run_in_threadpool(
                uploads.new_upload, root, claims.user_id, tenant
            )

            def stage() -> tuple[list[str], int]:
                names, total = [], 0
                for index, item in enumerate(files):
                    item.file.seek(0)
                    with open(directory / str(index), "wb") as out:
                        shutil.copyfileobj(item.file, out, 1 << 20)
                        total += out.tell()
                    names.append(item.filename or f"file{index}")
                return names, total

            names, total = await run_in_threadpool(stage)
        finally:
            await form.close()
        series_uid = await run_in_threadpool(uploads.first_series_uid, directory / "0")
        uploads.start(archive.ingestor, upload_id, directory, names, tenant, overrides)
        archive.audit.record(
            "api.images.upload",
            f"user_{claims.user_id}",
            address=request.client.host if request.client else "?",
            upload_id=upload_id,
            files=len(names),
            bytes=total,
        )
        eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1 + total / THROUGHPUT)
        return ok(
            {
                "series_uid": series_uid,
                "upload_id": upload_id,
                "processing_status": "processing",
                "estimated_completion": eta.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "progress_url": f"{API_PREFIX}/images/upload/{upload_id}",
                "files_received": len(names),
                "bytes_received": total,
            },
            "Upload accepted; processing",
            status=202,
        )

    def status_sync(request: Request) -> Response:
        claims = authorize(request, archive, UPLOAD_IMAGES)
        upload_id = request.path_params["upload_id"]
        data = uploads.get(upload_id, tenant_of(claims))
        if data is None:
            raise ApiError(
                404, "UPLOAD_NOT_FOUND", f"upload {upload_id} not found", {"upload_id": upload_id}
            )
        return ok(data)

    async def status(request: Request) -> Response:
        return await run_in_threadpool(status_sync, request)

    return [
        Route(f"{API_PREFIX}/images/upload", upload, methods=["POST"]),
        Route(f"{API_PREFIX}/images/upload/{{upload_id}}", status, methods=["GET"]),
    ]
