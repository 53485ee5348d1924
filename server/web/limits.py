"""The largest HTTP request body the server takes (``[limits] max_request_mb``).

A request that announces a larger ``Content-Length`` is answered 413 before a byte of its body
is read.  A chunked body is counted as it streams and stopped with 413 when it passes the limit;
STOW-RS parts that arrived complete before that are stored (and stay stored: a sender that
tries again gets them back as duplicates), nothing after.  JSON API paths answer with the
documented error envelope, DICOMweb with its short error body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.web.api.envelope import ApiError, failure
from server.web.http import HTTPError, error_response

_API_PREFIXES = ("/api/", "/v1/")


def too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit // (1024 * 1024)} MiB"


class RequestSizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        declared = next(
            (value for name, value in scope.get("headers") or () if name == b"content-length"),
            None,
        )
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            message = too_large(self.max_bytes)
            if str(scope.get("path", "")).startswith(_API_PREFIXES):
                response = failure(ApiError(413, "PAYLOAD_TOO_LARGE", message))
            else:
                response = error_response(413, message)
            response.headers["Connection"] = "close"  # the unread body is not drained
            await response(scope, receive, send)
            return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPError(413, too_large(self.max_bytes))
            return message

        await self.app(scope, counting, send)
