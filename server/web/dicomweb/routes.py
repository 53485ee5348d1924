"""URL table of the DICOMweb services (PS3.18 10.4-10.6), mounted at ``/dicom-web``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.archive import Archive
from server.auth.roles import READ_IMAGES, UPLOAD_IMAGES
from server.dicom.attributes import BY_KEYWORD, Level
from server.web.api.auth import authorize, tenant_of
from server.web.dicomweb.qido import Qido
from server.web.dicomweb.stow import Stow
from server.web.dicomweb.wado import Scope, Wado

PREFIX = "/dicom-web"
Endpoint = Callable[[Request], Awaitable[Response]]

_STUDY = BY_KEYWORD["StudyInstanceUID"].tag
_SERIES = BY_KEYWORD["SeriesInstanceUID"].tag


def root_of(request: Request) -> str:
    """The DICOMweb root URL as the client reached it (for RetrieveURL and BulkDataURI).

    Some clients (dicomweb-client among them) send a Host header without the port; then the
    port the request arrived on is the right one, unless a proxy forwarded the request.
    """
    public = request.app.state.public_url
    if public:
        return f"{public}{PREFIX}"
    url = request.url
    netloc = url.netloc
    server = request.scope.get("server")
    if (
        url.port is None
        and server
        and server[1] not in (80, 443)
        and "x-forwarded-host" not in request.headers
        and "x-forwarded-proto" not in request.headers
        and "forwarded" not in request.headers
    ):
        netloc = f"{netloc}:{server[1]}"
    return f"{url.scheme}://{netloc}{PREFIX}"


def _guarded(archive: Archive, permission: str, fn: Callable[..., Response]) -> Endpoint:
    """Check the caller may ``permission``, then run the handler in the thread pool (the
    catalog and the codecs are synchronous)."""

    def run(request: Request, **params: str) -> Response:
        request.state.claims = authorize(request, archive, permission)
        return fn(request, **params)

    async def endpoint(request: Request) -> Response:
        return await run_in_threadpool(run, request, **request.path_params)

    return endpoint


def _scope(study: str, series: str | None = None, sop: str | None = None) -> Scope:
    return Scope(study, series, sop)


def dicomweb_routes(archive: Archive) -> list[BaseRoute]:
    qido = Qido(archive, root_of)
    wado = Wado(archive, root_of)
    stow = Stow(archive, root_of)

    def _threaded(fn: Callable[..., Response]) -> Endpoint:
        return _guarded(archive, READ_IMAGES, fn)

    def search(level: Level) -> Endpoint:
        def run(request: Request, **uids: str) -> Response:
            scope: list[tuple[int, str]] = []
            if "study" in uids:
                scope.append((_STUDY, uids["study"]))
            if "series" in uids:
                scope.append((_SERIES, uids["series"]))
            return qido.run(request, level, scope)

        return _threaded(run)

    def at_scope(method: Callable[..., Response], **fixed: Any) -> Endpoint:
        def run(
            request: Request,
            study: str,
            series: str | None = None,
            sop: str | None = None,
            **rest: str,
        ) -> Response:
            return method(request, _scope(study, series, sop), **rest, **fixed)

        return _threaded(run)

    def frame_thumbnail(
        request: Request, study: str, series: str, sop: str, frame: str
    ) -> Response:
        try:
            number = int(frame)
        except ValueError:
            number = 0
        from server.web.http import HTTPError

        if number < 1:
            raise HTTPError(400, f"frame number {frame!r} must be a positive integer")
        return wado.thumbnail(request, _scope(study, series, sop), number)

    async def stow_all(request: Request) -> Response:
        claims = await run_in_threadpool(authorize, request, archive, UPLOAD_IMAGES)
        return await stow.store(request, None, tenant_of(claims))

    async def stow_study(request: Request) -> Response:
        claims = await run_in_threadpool(authorize, request, archive, UPLOAD_IMAGES)
        return await stow.store(request, request.path_params["study"], tenant_of(claims))

    study = "/studies/{study}"
    series = f"{study}/series/{{series}}"
    instance = f"{series}/instances/{{sop}}"
    return [
        Route("/studies", search(Level.STUDY), methods=["GET"]),
        Route("/studies", stow_all, methods=["POST"]),
        Route("/series", search(Level.SERIES), methods=["GET"]),
        Route("/instances", search(Level.IMAGE), methods=["GET"]),
        Route(f"{study}/series", search(Level.SERIES), methods=["GET"]),
        Route(f"{study}/instances", search(Level.IMAGE), methods=["GET"]),
        Route(f"{series}/instances", search(Level.IMAGE), methods=["GET"]),
        Route(study, at_scope(wado.retrieve), methods=["GET"]),
        Route(study, stow_study, methods=["POST"]),
        Route(f"{study}/metadata", at_scope(wado.metadata), methods=["GET"]),
        Route(f"{study}/rendered", at_scope(wado.rendered), methods=["GET"]),
        Route(f"{study}/thumbnail", at_scope(wado.thumbnail), methods=["GET"]),
        Route(series, at_scope(wado.retrieve), methods=["GET"]),
        Route(f"{series}/metadata", at_scope(wado.metadata), methods=["GET"]),
        Route(f"{series}/rendered", at_scope(wado.rendered), methods=["GET"]),
        Route(f"{series}/thumbnail", at_scope(wado.thumbnail), methods=["GET"]),
        Route(instance, at_scope(wado.retrieve), methods=["GET"]),
        Route(f"{instance}/metadata", at_scope(wado.metadata), methods=["GET"]),
        Route(f"{instance}/rendered", at_scope(wado.rendered), methods=["GET"]),
        Route(f"{instance}/thumbnail", at_scope(wado.thumbnail), methods=["GET"]),
        Route(f"{instance}/frames/{{frame_list}}", at_scope(wado.frames), methods=["GET"]),
        Route(
            f"{instance}/frames/{{frame_list}}/rendered", at_scope(wado.rendered), methods=["GET"]
        ),
        Route(
            f"{instance}/frames/{{frame}}/thumbnail", _threaded(frame_thumbnail), methods=["GET"]
        ),
        Route(f"{instance}/bulkdata/{{tag_text}}", at_scope(wado.bulkdata), methods=["GET"]),
    ]
