"""STOW-RS: store instances sent as multipart/related (PS3.18 10.5).

The body is read as it streams in and each part goes through the one ingest path as soon as it
is complete, so a large upload never sits in memory whole.  A part that fails (not DICOM, a
StudyInstanceUID other than the URL's, a full disk) fails alone; the rest are stored.  The
response lists what was stored and what failed with the PS3.18 Table 10.5.3-2 reasons, and the
status is 200 (all stored), 202 (some failed) or 409 (none stored).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import orjson
from pydicom import dcmread
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from server.archive import Archive
from server.errors import IngestError
from server.ingest import IngestResult
from server.web.http import HTTPError, client_address, json_response, parse_media_type
from server.web.multipart import read_parts

MAX_PART = 2 << 30  # bytes; one instance is held in memory while it is ingested
_DICOM = "application/dicom"
_PROCESSING_FAILURE = 0x0110


def _uid_values(body: bytes) -> tuple[str, str]:
    """SOP Class and Instance UID of a refused part, when it can be read at all."""
    try:
        ds = dcmread(io.BytesIO(body), force=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:
        return "", ""


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


class Stow:
    def __init__(self, archive: Archive, root_of: Callable[[Request], str]) -> None:
        self.archive = archive
        self.root_of = root_of

    def _check_content_type(self, request: Request) -> str:
        raw = request.headers.get("content-type", "")
        media = parse_media_type(raw)
        if media.type != "multipart/related":
            raise HTTPError(
                415, f'STOW-RS takes multipart/related; type="{_DICOM}", not {raw or "nothing"}'
            )
        part_type = media.params.get("type", _DICOM).lower()
        if part_type != _DICOM:
            raise HTTPError(
                415,
                f"only {_DICOM} parts are accepted (the DICOM JSON/XML + bulk data form of "
                "STOW-RS is not supported)",
            )
        boundary = media.params.get("boundary")
        if not boundary:
            raise HTTPError(400, "the multipart/related Content-Type lacks its boundary")
        return boundary

    async def store(self, request: Request, study: str | None) -> Response:
        boundary = self._check_content_type(request)
        root = self.root_of(request)
        actor = client_address(request)
        stored: list[IngestResult] = []
        failed: list[tuple[str, str, int, str]] = []
        async for part in read_parts(request.stream(), boundary, MAX_PART):
            part_type = parse_media_type(part.content_type or _DICOM).type
            if part_type != _DICOM:
                failed.append(("", "", 0xC000, f"part of type {part_type} is not {_DICOM}"))
                continue
            try:
                result = await run_in_threadpool(
                    self.archive.ingestor.ingest,
                    part.body,
                    source=f"STOW {actor}",
                    expect_study=study,
                )
            except IngestError as exc:
                sop_class, sop_uid = _uid_values(part.body)
                failed.append((sop_class, sop_uid, exc.status, str(exc)))
                continue
            except Exception as exc:  # never lose the request's other parts to one bad one
                sop_class, sop_uid = _uid_values(part.body)
                failed.append((sop_class, sop_uid, _PROCESSING_FAILURE, str(exc)))
                continue
            stored.append(result)
        if not stored and not failed:
            raise HTTPError(400, "the request contains no instance")
        body: dict[str, Any] = {}
        studies = {r.study_instance_uid for r in stored}
        if study or len(studies) == 1:
            body["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{study or studies.pop()}"]}
        if failed:
            body["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": _ui(sop_class),
                        "00081155": _ui(sop_uid),
                        "00081197": {"vr": "US", "Value": [status]},
                    }
                    for sop_class, sop_uid, status, _ in failed
                ],
            }
        if stored:
            body["00081199"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": _ui(r.sop_class_uid),
                        "00081155": _ui(r.sop_instance_uid),
                        "00081190": {
                            "vr": "UR",
                            "Value": [
                                f"{root}/studies/{r.study_instance_uid}/series/"
                                f"{r.series_instance_uid}/instances/{r.sop_instance_uid}"
                            ],
                        },
                    }
                    for r in stored
                ],
            }
        status = 200 if not failed else 202 if stored else 409
        self.archive.audit.record(
            "stow",
            actor,
            "ok" if not failed else "partial" if stored else "failed",
            study=study,
            stored=len(stored),
            failed=len(failed),
            reasons=[reason[:200] for *_, reason in failed[:20]],
        )
        headers = {}
        if failed:
            headers["Warning"] = (
                f'299 imaging-server "{len(failed)} of {len(failed) + len(stored)} instances '
                f'were not stored: {failed[0][3][:150]}"'.replace("\n", " ")
            )
        return json_response(request, orjson.dumps(body), status, headers)
