"""STOW-RS: store instances sent as multipart/related (PS3.18 10.5).

The body is read as it streams in and each part goes through the one ingest path as soon as it
is complete, so a large upload never sits in memory whole.  A part that fails (not DICOM, a
StudyInstanceUID other than the URL's, a full disk) fails alone; the rest are stored.  The
response lists what was stored and what failed with the PS3.18 Table 10.5.3-2 reasons, and the
status is 200 (all stored), 202 (some failed) or 409 (none stored).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
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

log = logging.getLogger(__name__)
INGEST_CONCURRENCY = 8  # parts of one request being ingested at once
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


@dataclass(frozen=True)
class Failure:
    sop_class_uid: str
    sop_instance_uid: str
    status: int
    reason: str


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

    async def store(
        self, request: Request, study: str | None, institution: str | None = None
    ) -> Response:
        boundary = self._check_content_type(request)
        root = self.root_of(request)
        actor = client_address(request)
        # Parts are ingested while the next ones arrive, a few at a time: each instance waits
        # for its file and catalog fsyncs, and overlapping them is what makes STOW fast.
        slots: list[asyncio.Task[IngestResult | Failure] | Failure] = []
        gate = asyncio.Semaphore(INGEST_CONCURRENCY)

        async def ingest(body: bytes) -> IngestResult | Failure:
            try:
                return await run_in_threadpool(
                    self.archive.ingestor.ingest,
                    body,
                    source=f"STOW {actor}",
                    expect_study=study,
                    institution=institution,
                )
            except IngestError as exc:
                log.warning("STOW-RS part from %s refused (0x%04X): %s", actor, exc.status, exc)
                return Failure(*_uid_values(body), exc.status, str(exc))
            except Exception as exc:  # never lose the request's other parts to one bad one
                return Failure(*_uid_values(body), _PROCESSING_FAILURE, str(exc))
            finally:
                gate.release()

        try:
            async for part in read_parts(request.stream(), boundary, MAX_PART):
                part_type = parse_media_type(part.content_type or _DICOM).type
                if part_type != _DICOM:
                    slots.append(Failure("", "", 0xC000, f"part of type {part_type} is not DICOM"))
                    continue
                await gate.acquire()
                slots.append(asyncio.create_task(ingest(part.body)))
        finally:
            # Whatever happens to the request, the parts already handed to ingest finish.
            pending = [s for s in slots if isinstance(s, asyncio.Task)]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        outcomes = [s.result() if isinstance(s, asyncio.Task) else s for s in slots]
        stored = [o for o in outcomes if isinstance(o, IngestResult)]
        failed = [o for o in outcomes if isinstance(o, Failure)]
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
                        "00081150": _ui(f.sop_class_uid),
                        "00081155": _ui(f.sop_instance_uid),
                        "00081197": {"vr": "US", "Value": [f.status]},
                    }
                    for f in failed
                ],
            }
        if stored:
            body["00081199"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": _ui(r.sop_class_uid),
                        "00081155": _ui(r.sop_instance_uid),
                        # PS3.18 Table 10.5.3-3: stored, but does not match its SOP Class
                        **({"00081196": {"vr": "US", "Value": [0xB007]}} if r.warnings else {}),
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
        warned = [r for r in stored if r.warnings]
        status = 200 if not failed and not warned else 202 if stored else 409
        self.archive.audit.record(
            "stow",
            actor,
            "ok" if not failed else "partial" if stored else "failed",
            study=study,
            stored=len(stored),
            failed=len(failed),
            reasons=[f.reason[:200] for f in failed[:20]],
        )
        headers = {}
        if warned and not failed:
            headers["Warning"] = (
                f'299 imaging-server "{len(warned)} instances were stored with conformance '
                f'problems: {"; ".join(warned[0].warnings)[:150]}"'
            )
        if failed:
            headers["Warning"] = (
                f'299 imaging-server "{len(failed)} of {len(failed) + len(stored)} instances '
                f'were not stored: {failed[0].reason[:150]}"'.replace("\n", " ")
            )
        if "Warning" in headers:
            # The reasons quote the request and the data (a UID from the URL, a value from a
            # data set); a header holds visible ASCII only (a 500 found by tools/fuzz.py).
            headers["Warning"] = "".join(c if " " <= c <= "~" else "?" for c in headers["Warning"])
        return json_response(request, orjson.dumps(body), status, headers)
