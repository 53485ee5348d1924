"""``/api/v1/segmentations`` (workstation-api.md, "Segmentations"): list by image, create from a
mask (stored as DICOM SEG through ingest), read and update scores, validation and notes.
Creating and updating need ``create_segmentations``; reading needs ``read_images``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server import segmentations
from server.archive import Archive
from server.auth.roles import CREATE_SEGMENTATIONS, READ_IMAGES
from server.web.api.auth import API_PREFIX, authorize, tenant_of
from server.web.api.envelope import ApiError, json_body, ok


def _guard(fn: Callable[[], Response]) -> Response:
    try:
        return fn()
    except segmentations.SegmentationError as exc:
        raise ApiError(exc.status, exc.code, str(exc), exc.details) from None


def segmentation_routes(archive: Archive) -> list[BaseRoute]:
    def listing(request: Request) -> Response:
        claims = authorize(request, archive, READ_IMAGES)
        image_uid = request.query_params.get("image_uid")
        items = segmentations.list_for(image_uid, tenant_of(claims))
        archive.audit.record(
            "api.segmentations.list",
            f"user_{claims.user_id}",
            series=image_uid,
            results=len(items),
        )
        return ok({"segmentations": items})

    def create(request: Request, body: Any) -> Response:
        claims = authorize(request, archive, CREATE_SEGMENTATIONS)
        user = f"user_{claims.user_id}"

        def run() -> Response:
            item = segmentations.create(archive.ingestor, body, user, tenant_of(claims))
            archive.audit.record(
                "api.segmentations.create",
                user,
                series=item["image_uid"],
                segmentation=item["segmentation_id"],
            )
            return ok(item, "Segmentation stored", status=201)

        return _guard(run)

    def detail(request: Request) -> Response:
        claims = authorize(request, archive, READ_IMAGES)
        ident = request.path_params["segmentation_id"]
        return _guard(lambda: ok(segmentations.get(ident, tenant_of(claims))))

    def update(request: Request, body: Any) -> Response:
        claims = authorize(request, archive, CREATE_SEGMENTATIONS)
        user = f"user_{claims.user_id}"
        ident = request.path_params["segmentation_id"]

        def run() -> Response:
            item = segmentations.update(ident, body, user, tenant_of(claims))
            archive.audit.record("api.segmentations.update", user, segmentation=ident)
            return ok(item, "Segmentation updated")

        return _guard(run)

    async def collection(request: Request) -> Response:
        if request.method == "POST":
            return await run_in_threadpool(create, request, await json_body(request))
        return await run_in_threadpool(listing, request)

    async def member(request: Request) -> Response:
        if request.method == "PUT":
            return await run_in_threadpool(update, request, await json_body(request))
        return await run_in_threadpool(detail, request)

    return [
        Route(f"{API_PREFIX}/segmentations", collection, methods=["GET", "POST"]),
        Route(f"{API_PREFIX}/segmentations/{{segmentation_id}}", member, methods=["GET", "PUT"]),
    ]
