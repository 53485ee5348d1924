"""``GET /metrics`` (Prometheus text exposition) and the HTTP request latency middleware.

Access follows the rest of the server: open from this machine when ``[http]
auth_off_for_loopback`` is on; otherwise an admin user's access token, or the ``[metrics]
token`` a Prometheus server is given (so it needs no user account that expires).
"""

from __future__ import annotations

import hmac
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import metrics
from server.ai import jobs
from server.archive import Archive
from server.web.api.auth import authorize, bearer_token
from server.web.api.envelope import ApiError

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """The matched route's path template ("/dicom-web/studies/{study}"), never the request's
    path: that would hold UIDs (one series per study, and patient data in a label)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    # Inside a Mount, root_path has grown by the mount's path (all our mounts are literal).
    mount: str = scope.get("root_path", "")[len(scope.get("app_root_path", "")) :]
    if isinstance(route, Mount):
        return f"{mount or path}/{{path}}"
    return mount + path


class HttpMetricsMiddleware:
    """Pure ASGI (streamed bodies pass through): times each HTTP request until its handler
    returned, i.e. the whole body was sent, labelled by route template, method and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before responding

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope.get("method", "")
            metrics.HTTP_SECONDS.labels(
                method if method in _METHODS else "other", route_template(scope), str(status)
            ).observe(time.perf_counter() - started)


def _check_access(request: Request, archive: Archive) -> None:
    """Raises 401/403 unless the caller may read the metrics (runs in a worker thread)."""
    expected = archive.settings.metrics_token
    given = bearer_token(request)
    if expected and given is not None and hmac.compare_digest(given.encode(), expected.encode()):
        return
    claims = authorize(request, archive, None)
    if claims.role != "admin":
        raise ApiError(
            403, "PERMISSION_DENIED", "metrics are for administrators or the [metrics] token"
        )


def metrics_routes(archive: Archive) -> list[BaseRoute]:
    extra = (metrics.AiQueueCollector(jobs.counts_by_status), metrics.BuildInfoCollector())

    def scrape(request: Request) -> Response:
        _check_access(request, archive)
        return Response(
            metrics.exposition(extra),
            media_type=metrics.CONTENT_TYPE,
            headers={"Cache-Control": "no-store"},
        )

    async def endpoint(request: Request) -> Response:
        return await run_in_threadpool(scrape, request)

    return [Route("/metrics", endpoint, methods=["GET"])]
