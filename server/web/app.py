"""The Starlette application: DICOMweb at ``/dicom-web`` and the viewer at ``/viewer``."""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from server.archive import Archive
from server.dicom.pixels import PixelError
from server.errors import QueryError
from server.web.api.ai import ai_routes
from server.web.api.audit import audit_routes
from server.web.api.auth import auth_routes
from server.web.api.deidentify import deidentify_routes
from server.web.api.envelope import ApiError, RequestIdMiddleware, api_error_handler
from server.web.api.images import image_routes
from server.web.api.openapi import openapi_routes
from server.web.api.reports import report_routes
from server.web.api.segmentations import segmentation_routes
from server.web.api.uploads import upload_routes
from server.web.api.worklists import worklist_routes
from server.web.dicomweb.routes import PREFIX, dicomweb_routes
from server.web.health import health_routes
from server.web.http import HTTPError, error_response
from server.web.limits import RequestSizeLimit
from server.web.prometheus import HttpMetricsMiddleware, metrics_routes
from server.web.ws import websocket_routes

log = logging.getLogger(__name__)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return error_response(exc.status, exc.message, exc.code)


async def _pixel_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PixelError)
    return error_response(exc.status, str(exc))


async def _query_error(request: Request, exc: Exception) -> Response:
    return error_response(400, str(exc))


async def _starlette_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(404, f"no resource at {request.url.path}")
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}")


def _cors(origins: str) -> list[Middleware]:
    allowed = [o.strip() for o in origins.split(",") if o.strip()]
    if not allowed:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=allowed,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Warning", "Content-Location", "Content-Type"],
            max_age=600,
        )
    ]


def build_app(archive: Archive) -> Starlette:
    settings = archive.settings
    routes: list[BaseRoute] = [
        Mount(PREFIX, routes=dicomweb_routes(archive)),
        *worklist_routes(archive),
        *auth_routes(archive),
        *upload_routes(archive),
        *image_routes(archive),
        *audit_routes(archive),
        *deidentify_routes(archive),
        *segmentation_routes(archive),
        *report_routes(archive),
        *ai_routes(archive),
        *openapi_routes(),
        *health_routes(archive),
        *websocket_routes(archive),
    ]
    middleware = [
        Middleware(RequestIdMiddleware),
        Middleware(RequestSizeLimit, max_bytes=settings.max_request_mb * 1024 * 1024),
    ]
    if settings.metrics_enabled:
        routes += metrics_routes(archive)
        middleware.append(Middleware(HttpMetricsMiddleware))
    if (settings.viewer_dir / "index.html").is_file():
        from server.web.viewer import viewer_routes

        routes += viewer_routes(settings.viewer_dir)

        async def home(request: Request) -> Response:
            return RedirectResponse("/viewer/")

        routes.append(Route("/", home))
    app = Starlette(
        routes=routes,
        middleware=[*middleware, *_cors(settings.cors_origins)],
        exception_handlers={
            HTTPError: _http_error,
            ApiError: api_error_handler,
            StarletteHTTPException: _starlette_http,
            PixelError: _pixel_error,
            QueryError: _query_error,
            Exception: _unexpected,
        },
    )
    app.state.public_url = settings.public_url.rstrip("/")
    return app
