"""WADO-RS: retrieve instances, metadata, frames, bulk data and rendered images (PS3.18 10.4).

Instances stream from their stored files part by part (a study is never buffered whole);
transfer syntaxes are negotiated per PS3.18 8.7.3.5: ``transfer-syntax=*`` returns what is
stored, a named syntax the server can produce is transcoded to, and a request nothing
satisfies gets 406.  Without a ``transfer-syntax`` parameter, application/dicom means Explicit
VR Little Endian (PS3.18 Table 8.7.3-2).  Metadata comes from the catalog's stored DICOM JSON,
so it never reopens a file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from pydicom import dcmread
from pydicom import uid as uids
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.archive import Archive
from server.catalog.db import session
from server.catalog.search import StoredInstance, stored_instances
from server.dicom.pixels import (
    DEFAULT_FRAME_SYNTAX,
    ENCODABLE_FRAME_SYNTAXES,
    FRAME_MEDIA_TYPE,
    Frames,
    PixelError,
    can_transcode,
    open_frames,
    transcode,
)
from server.dicom.render import (
    RENDERED_TYPES,
    THUMBNAIL_SIZE,
    RenderOptions,
    parse_viewport,
    parse_window,
    render,
)
from server.web.api.auth import request_tenant
from server.web.http import HTTPError, MediaRange, client_address, json_response, parse_accept
from server.web.multipart import MultipartWriter

_CHUNK = 1 << 20
_DICOM = "application/dicom"
_OCTETS = "application/octet-stream"


@dataclass(frozen=True)
class Scope:
    study: str
    series: str | None = None
    sop: str | None = None

    def describe(self) -> str:
        if self.sop:
            return f"instance {self.sop}"
        if self.series:
            return f"series {self.series}"
        return f"study {self.study}"


def _requested(r: MediaRange) -> tuple[str, str | None]:
    """(media type of the parts, transfer syntax or None) of one Accept entry."""
    if r.type == "multipart/related":
        return r.params.get("type", "*/*").lower(), r.params.get("transfer-syntax")
    return r.type, r.params.get("transfer-syntax")


def choose_instance_syntax(ranges: list[MediaRange], stored: str) -> str | None:
    """The transfer syntax to send a stored instance in, or None if no Accept entry allows one."""
    for r in ranges:
        media, syntax = _requested(r)
        if media not in (_DICOM, "*/*", "application/*"):
            continue
        if syntax == "*" or (syntax is None and media != _DICOM):
            return stored
        wanted = syntax or uids.ExplicitVRLittleEndian
        if can_transcode(stored, wanted):
            return wanted
    return None


def choose_frame_encoding(ranges: list[MediaRange], frames: Frames) -> tuple[str, str] | None:
    """(media type, transfer syntax) for the frames of an instance, or None (406).

    PS3.18 8.7.3.5.3: ``transfer-syntax=*`` (or any media type) gets the frames as stored;
    application/octet-stream means uncompressed; image/jls, image/jp2 and image/dicom-rle are
    re-encoded losslessly when stored otherwise; other compressed types only as stored.
    """
    stored = frames.syntax
    stored_media = frames.stored_media_type
    for r in ranges:
        media, syntax = _requested(r)
        if syntax == "*" or (syntax is None and media in ("*/*", "image/*")):
            return stored_media, stored
        if media == _OCTETS:
            if syntax in (None, uids.ExplicitVRLittleEndian):
                return _OCTETS, uids.ExplicitVRLittleEndian
            continue
        if syntax is None:
            syntax = stored if stored_media == media else DEFAULT_FRAME_SYNTAX.get(media)
        if syntax is None or FRAME_MEDIA_TYPE.get(syntax) != media:
            continue
        if syntax == stored or syntax in ENCODABLE_FRAME_SYNTAXES:
            return media, syntax
    return None


def _parse_frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise HTTPError(400, f"frame list {text!r} must be comma-separated numbers") from None
    if not numbers or any(n < 1 for n in numbers):
        raise HTTPError(400, "frame numbers start at 1")
    return numbers


def pieces_response(pieces: list[bytes], media_type: str) -> Response:
    """A body sent as it is held, piece by piece, with its length known: joining the pieces
    would copy every frame once more."""

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    length = str(sum(len(p) for p in pieces))
    return StreamingResponse(body(), media_type=media_type, headers={"Content-Length": length})


class Wado:
    """The WADO-RS endpoints of one archive."""

    def __init__(self, archive: Archive, root_of: Callable[[Request], str]) -> None:
        self.archive = archive
        self.root_of = root_of

    def _instances(
        self, scope: Scope, metadata: bool = False, institution: str | None = None
    ) -> list[StoredInstance]:
        with session():
            found = stored_instances(
                scope.study, scope.series, scope.sop, metadata=metadata, institution=institution
            )
        if not found:
            raise HTTPError(404, f"{scope.describe()} not found")
        return found

    def _path(self, item: StoredInstance) -> Path:
        return self.archive.storage.local_path(item.file_path)

    def _frames(self, item: StoredInstance) -> Frames:
        metadata = orjson.loads(item.metadata) if item.metadata else None
        return open_frames(self._path(item), item.transfer_syntax_uid, metadata)

    def _audit(self, request: Request, action: str, scope: Scope, count: int) -> None:
        self.archive.audit.record(
            action,
            client_address(request),
            study=scope.study,
            series=scope.series,
            sop=scope.sop,
            instances=count,
        )

    # --- instances ------------------------------------------------------------------------

    def retrieve(self, request: Request, scope: Scope) -> Response:
        items = self._instances(scope, institution=request_tenant(request))
        ranges = parse_accept(request)
        chosen: list[tuple[StoredInstance, str]] = []
        for item in items:
            syntax = choose_instance_syntax(ranges, item.transfer_syntax_uid)
            if syntax is None:
                raise HTTPError(
                    406,
                    f"instance {item.sop_instance_uid} is stored as {item.transfer_syntax_uid} "
                    "and cannot be sent in any transfer syntax the Accept header allows",
                )
            chosen.append((item, syntax))
        self._audit(request, "wado-retrieve", scope, len(chosen))
        writer = MultipartWriter()
        root = self.root_of(request)

        def body() -> Iterator[bytes]:
            for item, syntax in chosen:
                header = writer.part_header(
                    f"{_DICOM}; transfer-syntax={syntax}",
                    f"{root}/studies/{item.study_instance_uid}/series/"
                    f"{item.series_instance_uid}/instances/{item.sop_instance_uid}",
                )
                if syntax == item.transfer_syntax_uid:
                    # Straight from the backend (a local file or an S3 object's body), one
                    # chunk at a time: a study is never held in memory.
                    with self.archive.storage.open(item.file_path) as fh:
                        yield header + fh.read(_CHUNK)
                        while chunk := fh.read(_CHUNK):
                            yield chunk
                else:
                    yield header + transcode(self._path(item), syntax)
            yield writer.close()

        return StreamingResponse(body(), media_type=writer.content_type(_DICOM))

    # --- metadata -------------------------------------------------------------------------

    def metadata(self, request: Request, scope: Scope) -> Response:
        items = self._instances(scope, metadata=True, institution=request_tenant(request))
        root = self.root_of(request)
        parts: list[str] = []
        for item in items:
            text = item.metadata or "{}"
            url = (
                f"{root}/studies/{item.study_instance_uid}/series/{item.series_instance_uid}"
                f"/instances/{item.sop_instance_uid}"
            )
            if '"BulkDataURI":"bulkdata/' in text:
                text = text.replace('"BulkDataURI":"bulkdata/', f'"BulkDataURI":"{url}/bulkdata/')
            if '"00280010"' in text and '"7FE00010"' not in text:
                # The stored header stops before the pixel data (PS3.18 F.2.7: bulk data by URI).
                vr = "OB" if '"00280100":{"vr":"US","Value":[8]}' in text else "OW"
                text = (
                    f'{text[:-1]},"7FE00010":{{"vr":"{vr}",'
                    f'"BulkDataURI":"{url}/bulkdata/7FE00010"}}}}'
                )
            parts.append(text)
        self._audit(request, "wado-metadata", scope, len(items))
        return json_response(request, ("[" + ",".join(parts) + "]").encode())

    # --- frames and bulk data ---------------------------------------------------------------

    def frames(self, request: Request, scope: Scope, frame_list: str) -> Response:
        numbers = _parse_frame_numbers(frame_list)
        item = self._instances(scope, metadata=True, institution=request_tenant(request))[0]
        frames = self._frames(item)
        encoding = choose_frame_encoding(parse_accept(request), frames)
        if encoding is None:
            raise HTTPError(
                406,
                f"frames are stored as {frames.syntax}; the Accept header allows none of the "
                "media types this server can produce from it (application/octet-stream, "
                "image/jls, image/jp2, image/dicom-rle, or the stored one)",
            )
        media, syntax = encoding
        for n in numbers:
            if n > frames.count:
                raise HTTPError(404, f"frame {n} does not exist (the instance has {frames.count})")
        payloads = [frames.encode(n, syntax) for n in numbers]
        self._audit(request, "wado-frames", scope, 1)
        writer = MultipartWriter()
        part_type = f"{media}; transfer-syntax={syntax}"
        pieces: list[bytes] = []
        for data in payloads:
            pieces += (writer.part_header(part_type), data)
        pieces.append(writer.close())
        return pieces_response(pieces, writer.content_type(media, **{"transfer-syntax": syntax}))

    def bulkdata(self, request: Request, scope: Scope, tag_text: str) -> Response:
        try:
            tag = int(tag_text, 16)
        except ValueError:
            raise HTTPError(400, f"{tag_text!r} is not a tag (eight hex digits)") from None
        item = self._instances(scope, metadata=True, institution=request_tenant(request))[0]
        if tag == 0x7FE00010:
            frames = self._frames(item)
            data = b"".join(frames.stored(n) for n in range(1, frames.count + 1))
            media = frames.stored_media_type
            syntax = frames.syntax
        else:
            ds = dcmread(self._path(item), stop_before_pixels=True)
            element = ds.get(tag)
            if element is None or not isinstance(element.value, bytes | bytearray):
                raise HTTPError(404, f"instance has no bulk data element {tag:08X}")
            data, media, syntax = bytes(element.value), _OCTETS, uids.ExplicitVRLittleEndian
        self._audit(request, "wado-bulkdata", scope, 1)
        writer = MultipartWriter()
        body = writer.part_header(f"{media}; transfer-syntax={syntax}") + data + writer.close()
        return Response(body, media_type=writer.content_type(media))

    # --- rendered and thumbnails ------------------------------------------------------------

    def _render_options(self, request: Request, thumbnail: bool) -> RenderOptions:
        ranges = parse_accept(request)
        media = None
        for r in ranges:
            wanted, _ = _requested(r)
            if wanted in RENDERED_TYPES:
                media = wanted
                break
            if wanted in ("*/*", "image/*"):
                media = "image/jpeg"
                break
            if thumbnail and wanted == _OCTETS:
                media = "image/jpeg"  # OHIF asks thumbnails with an octet-stream Accept
                break
        if media is None:
            raise HTTPError(406, f"rendered images are available as {', '.join(RENDERED_TYPES)}")
        params = request.query_params
        try:
            window = parse_window(params.get("window"))
            viewport = parse_viewport(params.get("viewport"))
            quality = int(params.get("quality", "90"))
        except PixelError as exc:
            raise HTTPError(400, str(exc)) from None
        except ValueError:
            raise HTTPError(400, "quality must be a number from 1 to 100") from None
        if not 1 <= quality <= 100:
            raise HTTPError(400, "quality must be a number from 1 to 100")
        if thumbnail and viewport is None:
            viewport = (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        return RenderOptions(window, viewport, quality, media)

    def _renderable(self, items: list[StoredInstance]) -> list[tuple[StoredInstance, Frames]]:
        out = []
        for item in items:
            try:
                out.append((item, self._frames(item)))
            except PixelError:
                continue  # SR, SEG without frames, ...: nothing to draw
        return out

    def rendered(self, request: Request, scope: Scope, frame_list: str | None = None) -> Response:
        options = self._render_options(request, thumbnail=False)
        items = self._instances(scope, metadata=True, institution=request_tenant(request))
        renderable = self._renderable(items)
        if not renderable:
            raise HTTPError(404, f"{scope.describe()} has no image to render")
        if frame_list is not None:
            frames = renderable[0][1]
            images = [render(frames, n, options) for n in _parse_frame_numbers(frame_list)]
        else:
            images = [render(frames, 1, options) for _, frames in renderable]
        self._audit(request, "wado-rendered", scope, len(renderable))
        if len(images) == 1:
            return Response(images[0], media_type=options.media_type)
        writer = MultipartWriter()
        body = b"".join(writer.part_header(options.media_type) + img for img in images)
        return Response(body + writer.close(), media_type=writer.content_type(options.media_type))

    def thumbnail(self, request: Request, scope: Scope, frame: int | None = None) -> Response:
        options = self._render_options(request, thumbnail=True)
        items = self._instances(scope, metadata=True, institution=request_tenant(request))
        if scope.sop is None:
            # A representative image: the middle instance of the (first) series.
            first_series = items[0].series_instance_uid
            series_items = [i for i in items if i.series_instance_uid == first_series]
            middle = len(series_items) // 2
            items = series_items[middle:] + series_items[:middle] + items[len(series_items) :]
        for item in items:
            try:
                frames = self._frames(item)
            except PixelError:
                continue
            number = frame or max(1, (frames.count + 1) // 2)
            self._audit(request, "wado-thumbnail", scope, 1)
            return Response(render(frames, number, options), media_type=options.media_type)
        raise HTTPError(404, f"{scope.describe()} has no image for a thumbnail")
