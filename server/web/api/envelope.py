"""The JSON API's response envelope and request ids (workstation-api.md, "Standard Response
Format"): ``{"success", "data", "message", "timestamp", "request_id"}`` and, on errors,
``{"success": false, "error": {"code", "message", "details"}, ...}``.

Every request gets an id (``req_`` + 16 hex digits, or the caller's ``X-Request-ID`` when it is
sane); it is returned in the body and the ``X-Request-ID`` header, and the log formats of
:mod:`server.telemetry` put it in every record written while the request runs.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import re
import secrets
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}
        super().__init__(message)


def _timestamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def current_request_id() -> str:
    return request_id_var.get()


def ok(data: Any, message: str = "Operation completed successfully", status: int = 200) -> Response:
    body = {
        "success": True,
        "data": data,
        "message": message,
        "timestamp": _timestamp(),
        "request_id": current_request_id(),
    }
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


MAX_JSON_BODY = 16 * 1024 * 1024


async def json_body(request: Request) -> Any:
    """The request's JSON body (None when empty); 422 ``VALIDATION_ERROR`` when it is not JSON,
    413 ``PAYLOAD_TOO_LARGE`` past :data:`MAX_JSON_BODY` (JSON requests are small; the body is
    read whole)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BODY:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", "the JSON body is larger than 16 MiB")
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise ApiError(422, "VALIDATION_ERROR", "the body is not valid JSON") from None


def failure(error: ApiError) -> Response:
    body = {
        "success": False,
        "error": {"code": error.code, "message": error.message, "details": error.details},
        "timestamp": _timestamp(),
        "request_id": current_request_id(),
    }
    return Response(
        orjson.dumps(body),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers,
    )


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return failure(exc)


class RequestIdMiddleware:
    """Pure ASGI (no buffering of streamed bodies): sets the request id for the request's
    context and adds the ``X-Request-ID`` response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
        request_id = given if _SANE_ID.match(given) else f"req_{secrets.token_hex(8)}"
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
