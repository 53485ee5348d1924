"""Shared HTTP pieces: media-type negotiation, DICOM JSON responses, the error body.

Errors from the DICOMweb services are short JSON bodies ``{"error": {"code", "message"}}``, the
same envelope shape as the JSON APIs (``shared/spec/workstation-api.md``) without their
``success``/``request_id`` fields, which DICOMweb clients do not read.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson
from starlette.requests import Request
from starlette.responses import Response

DICOM_JSON = "application/dicom+json"
_GZIP_MIN = 1400  # below one TCP segment compression saves nothing


class HTTPError(Exception):
    """Raised by a service; becomes a JSON error body with ``status``."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "ERROR")
        super().__init__(message)


_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    406: "NOT_ACCEPTABLE",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    500: "INTERNAL_ERROR",
    503: "UNAVAILABLE",
}


def error_response(
    status: int, message: str, code: str = "", headers: Mapping[str, str] | None = None
) -> Response:
    body = orjson.dumps(
        {"error": {"code": code or _CODES.get(status, "ERROR"), "message": message}}
    )
    return Response(body, status_code=status, media_type="application/json", headers=headers)


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header (RFC 9110 12.5.1) with its parameters."""

    type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        if self.type in ("*/*", media_type):
            return True
        major = media_type.split("/")[0]
        return self.type == f"{major}/*"


def _split_unquoted(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_media_type(text: str) -> MediaRange:
    """``multipart/related; type="application/dicom"; transfer-syntax=*`` and the like."""
    pieces = _split_unquoted(text, ";")
    media = pieces[0].strip().lower()
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        name = name.strip().lower()
        value = value.strip().strip('"')
        if not name:
            continue
        if name == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
            continue
        params[name] = value
    return MediaRange(media, params, q)


def parse_accept(request: Request) -> list[MediaRange]:
    """The acceptable media ranges, best first. The ``accept`` query parameter (PS3.18 8.3.3.1)
    takes precedence over the header; no Accept at all means anything."""
    raw = request.query_params.get("accept") or request.headers.get("accept") or "*/*"
    ranges = [parse_media_type(p) for p in _split_unquoted(raw, ",") if p.strip()]
    ranges = [r for r in ranges if r.q > 0]
    ranges.sort(key=lambda r: -r.q)
    return ranges


def accepts_json(request: Request) -> bool:
    ranges = parse_accept(request)
    return any(r.matches(DICOM_JSON) or r.matches("application/json") for r in ranges)


def json_response(
    request: Request, body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A DICOM JSON body, gzip-compressed when the client accepts it and it is worth it."""
    out_headers = dict(headers or {})
    if len(body) >= _GZIP_MIN and "gzip" in request.headers.get("accept-encoding", ""):
        body = gzip.compress(body, compresslevel=1)
        out_headers["Content-Encoding"] = "gzip"
        out_headers["Vary"] = "Accept-Encoding"
    return Response(body, status_code=status, media_type=DICOM_JSON, headers=out_headers)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"
