"""Uploads through the JSON API (``POST /api/v1/images/upload``): DICOM files and zip archives
of them, ingested in the background through the one ingest path, with progress in the catalog
(``Upload`` rows, readable by every worker) and on the event bus (``image_upload`` events, which
the WebSocket delivers as ``image_uploads``).

The request's files are copied to ``<data_dir>/uploads/<upload id>/`` before the response, so
the work does not depend on the request's temporary files.  An upload still ``processing`` when
its process dies is marked ``interrupted`` at the next start-up (its instances stored so far
stay stored; sending the same files again stores the rest, duplicates being ignored).

Zip members are read one at a time into memory, never extracted to paths; archives are limited
in member count and total uncompressed size, and nested archives are not opened.
"""

from __future__ import annotations

import io
import logging
import secrets
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydicom import dcmread

from server.catalog.db import session, write_transaction
from server.catalog.schema import Upload
from server.errors import IngestError
from server.events import Event, publish
from server.ingest import Ingestor

log = logging.getLogger(__name__)

MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_BYTES = 50 << 30  # total uncompressed
MAX_MEMBER_BYTES = 4 << 30
PROGRESS_EVERY = 1.0  # seconds between progress events
_SKIPPED_NAMES = {"DICOMDIR"}


@dataclass(frozen=True)
class Overrides:
    """Patient information to write into every instance (``override_patient_info``)."""

    patient_id: str | None = None
    study_description: str | None = None

    def apply(self, data: bytes) -> bytes:
        if not self.patient_id and not self.study_description:
            return data
        ds = dcmread(io.BytesIO(data))
        if self.patient_id:
            ds.PatientID = self.patient_id
        if self.study_description:
            ds.StudyDescription = self.study_description
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()


def upload_dir(root: Path, upload_id: str) -> Path:
    return root / "uploads" / upload_id


def new_upload(root: Path, user_id: int, institution: str | None) -> tuple[str, Path]:
    upload_id = f"upload_{secrets.token_hex(8)}"
    directory = upload_dir(root, upload_id)
    directory.mkdir(parents=True)
    now = int(time.time())
    with session(), write_transaction():
        Upload.create(
            id=upload_id,
            user_id=user_id,
            institution=institution,
            status="receiving",
            created_at=now,
            updated_at=now,
        )
    return upload_id, directory


def _objects(path: Path, name: str) -> Iterator[tuple[str, bytes | Exception]]:
    """(name, bytes) of each object in an uploaded file: the file itself, or a zip's members."""
    if zipfile.is_zipfile(path):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            yield name, exc
            return
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                yield name, ValueError(f"zip has more than {MAX_ZIP_MEMBERS} members")
                return
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                yield name, ValueError("zip expands to more than the allowed size")
                return
            for member in members:
                base = member.filename.rsplit("/", 1)[-1]
                if base.upper() in _SKIPPED_NAMES or base.startswith("."):
                    continue
                label = f"{name}:{member.filename}"
                if member.file_size > MAX_MEMBER_BYTES:
                    yield label, ValueError("member too large")
                    continue
                try:
                    yield label, archive.read(member)
                except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
                    yield label, exc
        return
    if name.rsplit("/", 1)[-1].upper() in _SKIPPED_NAMES:
        return
    yield name, path.read_bytes()


def first_series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID of the first DICOM object of an uploaded file (for the response)."""
    for _, data in _objects(path, path.name):
        if isinstance(data, bytes):
            try:
                ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
                return str(ds.SeriesInstanceUID) if "SeriesInstanceUID" in ds else None
            except Exception:
                return None
        return None
    return None


def _save(upload_id: str, **values: Any) -> None:
    values["updated_at"] = int(time.time())
    with session(), write_transaction():
        Upload.update(**values).where(Upload.id == upload_id).execute()


def status_json(row: Any) -> dict[str, Any]:
    done = row.stored + row.duplicates + row.failed
    return {
        "upload_id": row.id,
        "processing_status": row.status,
        "files_found": row.files,
        "stored": row.stored,
        "duplicates": row.duplicates,
        "failed": row.failed,
        "progress": 100 if row.status != "processing" else int(100 * done / max(row.files, 1)),
        "series_uids": orjson.loads(row.series_uids),
        "errors": orjson.loads(row.errors)[:100],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.created_at)),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.updated_at)),
    }


def get(upload_id: str, institution: str | None) -> dict[str, Any] | None:
    with session():
        row = Upload.get_or_none(Upload.id == upload_id)
    if row is None or (institution is not None and row.institution != institution):
        return None
    return status_json(row)


def _announce(upload_id: str, institution: str | None) -> None:
    data = get(upload_id, None)
    if data is not None:
        publish(Event("image_upload", data, institution=institution))


def process(
    ingestor: Ingestor,
    upload_id: str,
    directory: Path,
    names: list[str],
    institution: str | None,
    overrides: Overrides,
) -> None:
    """Ingest every object of the staged files (runs on a background thread)."""
    counts = {"files": 0, "stored": 0, "duplicates": 0, "failed": 0}
    errors: list[dict[str, Any]] = []
    series: dict[str, None] = {}
    last_event = 0.0

    def checkpoint(**extra: Any) -> None:
        _save(
            upload_id,
            **counts,
            **extra,
            series_uids=orjson.dumps(list(series)).decode(),
            errors=orjson.dumps(errors[:1000]).decode(),
        )

    try:
        _save(upload_id, status="processing")
        _announce(upload_id, institution)
        for index, name in enumerate(names):
            for label, data in _objects(directory / str(index), name):
                counts["files"] += 1
                if isinstance(data, Exception):
                    counts["failed"] += 1
                    errors.append({"file": label, "reason": str(data), "status": 0xC000})
                    continue
                try:
                    result = ingestor.ingest(
                        overrides.apply(data), source=f"upload:{upload_id}", institution=institution
                    )
                except IngestError as exc:
                    counts["failed"] += 1
                    errors.append({"file": label, "reason": str(exc), "status": exc.status})
                    continue
                except Exception as exc:  # one unreadable object must not end the upload
                    counts["failed"] += 1
                    errors.append({"file": label, "reason": str(exc), "status": 0x0110})
                    continue
                counts["duplicates" if result.outcome == "duplicate" else "stored"] += 1
                if result.warnings and len(errors) < 1000:
                    errors.append(
                        {"file": label, "reason": "; ".join(result.warnings), "status": 0xB007}
                    )
                series[result.series_instance_uid] = None
                if time.monotonic() - last_event > PROGRESS_EVERY:
                    last_event = time.monotonic()
                    checkpoint()
                    _announce(upload_id, institution)
        if counts["files"] == 0:
            status = "failed"
            errors.append({"file": "", "reason": "no DICOM object in the upload", "status": 0xC000})
        elif counts["failed"] == 0:
            status = "completed"
        elif counts["stored"] + counts["duplicates"] > 0:
            status = "completed_with_errors"
        else:
            status = "failed"
    except Exception as exc:
        log.exception("upload %s failed", upload_id)
        status = "failed"
        errors.append({"file": "", "reason": f"processing stopped: {exc}", "status": 0x0110})
    checkpoint(status=status)
    shutil.rmtree(directory, ignore_errors=True)
    _announce(upload_id, institution)


def start(
    ingestor: Ingestor,
    upload_id: str,
    directory: Path,
    names: list[str],
    institution: str | None,
    overrides: Overrides,
) -> None:
    threading.Thread(
        target=process,
        args=(ingestor, upload_id, directory, names, institution, overrides),
        name=f"upload-{upload_id}",
        daemon=True,
    ).start()


def mark_interrupted(root: Path) -> int:
    """At start-up (no other process running): uploads whose process died are interrupted."""
    with session(), write_transaction():
        stale = [
            r.id
            for r in Upload.select(Upload.id).where(Upload.status.in_(("receiving", "processing")))
        ]
        if stale:
            Upload.update(status="interrupted", updated_at=int(time.time())).where(
                Upload.id.in_(stale)
            ).execute()
    for upload_id in stale:
        shutil.rmtree(upload_dir(root, upload_id), ignore_errors=True)
    return len(stale)
