"""Recoverable deletion of series (``DELETE /api/v1/images/{series_uid}``).

A deleted series leaves the catalog at once, but its files wait in
``<data_dir>/deleted/<date>/<sha256(series UID)>/`` with a ``manifest.json`` until
``retention_until`` (``[storage] deleted_retention_days``, 180 by default).  Order of work, so a
crash at any point loses nothing: the files are hard-linked into the deleted area and the
manifest fsynced; then, in one transaction, the catalog rows go and a ``DeletedSeries`` row
records where the files are; only then are the original links removed.

``python -m server deleted list|restore|purge`` lists them, restores one (its files go back
through the ingest path, with the study's owner kept) or purges those past retention.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

from server.catalog.db import session, write_transaction
from server.catalog.schema import DeletedSeries, Instance, Series, Study
from server.catalog.writer import delete_instance_row
from server.ingest import Ingestor
from server.storage import Storage


class NotFound(Exception):
    pass


@dataclass(frozen=True)
class Deleted:
    series_uid: str
    study_uid: str
    backup_location: str
    retention_until: int
    instances: int

    def as_json(self) -> dict[str, Any]:
        return {
            "deleted": True,
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "instances": self.instances,
            "backup_location": self.backup_location,
            "retention_until": dt.datetime.fromtimestamp(self.retention_until, dt.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        }


def delete_series(
    storage: Storage, series_uid: str, institution: str | None, actor: str, retention_days: int
) -> Deleted:
    """Move a series to the deleted area; ``institution`` None means any owner."""
    with session():
        query = (
            Series.select(Series, Study.study_instance_uid, Study.institution)
            .join(Study, on=(Series.study == Study.id))
            .where(Series.series_instance_uid == series_uid)
        )
        if institution is not None:
            query = query.where(Study.institution == institution)
        series = query.objects().first()
        if series is None:
            raise NotFound(series_uid)
        instances = list(Instance.select().where(Instance.series == series.id))
        now = int(time.time())
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        key = hashlib.sha256(series_uid.encode()).hexdigest()
        relative = f"deleted/{day}/{key}-{now}"
        manifest = []
        for n, inst in enumerate(instances):
            name = f"{n:06d}.dcm"
            storage.keep_copy(inst.file_path, f"{relative}/{name}")
            manifest.append(
                {
                    "file": name,
                    "sop_instance_uid": inst.sop_instance_uid,
                    "sop_class_uid": inst.sop_class_uid,
                }
            )
        storage.write_kept(
            f"{relative}/manifest.json",
            orjson.dumps(
                {
                    "series_uid": series_uid,
                    "study_uid": series.study_instance_uid,
                    "institution": series.institution,
                    "deleted_by": actor,
                    "deleted_at": now,
                    "instances": manifest,
                },
                option=orjson.OPT_INDENT_2,
            ),
        )
        retention_until = now + retention_days * 86400
        with write_transaction():
            for inst in instances:
                delete_instance_row(inst)
            DeletedSeries.create(
                series_instance_uid=series_uid,
                study_instance_uid=series.study_instance_uid,
                institution=series.institution,
                backup_location=relative,
                instances=len(instances),
                deleted_by=actor,
                deleted_at=now,
                retention_until=retention_until,
            )
    for inst in instances:
        storage.delete(inst.file_path)
    return Deleted(series_uid, series.study_instance_uid, relative, retention_until, len(instances))


def list_deleted(include_done: bool = False) -> list[dict[str, Any]]:
    with session():
        select = DeletedSeries.select().order_by(DeletedSeries.deleted_at)
        if not include_done:
            select = select.where(
                DeletedSeries.restored_at.is_null(True) & DeletedSeries.purged_at.is_null(True)
            )
        return [
            {
                "series_uid": r.series_instance_uid,
                "study_uid": r.study_instance_uid,
                "institution": r.institution,
                "instances": r.instances,
                "backup_location": r.backup_location,
                "deleted_by": r.deleted_by,
                "deleted_at": r.deleted_at,
                "retention_until": r.retention_until,
            }
            for r in select
        ]


def restore(storage: Storage, ingestor: Ingestor, series_uid: str) -> int:
    """Put a deleted series back through the ingest path; returns the instances restored."""
    with session():
        row = (
            DeletedSeries.select()
            .where(
                (DeletedSeries.series_instance_uid == series_uid)
                & DeletedSeries.restored_at.is_null(True)
                & DeletedSeries.purged_at.is_null(True)
            )
            .order_by(DeletedSeries.deleted_at.desc())
            .first()
        )
    if row is None:
        raise NotFound(series_uid)
    restored = 0
    for name in storage.list_kept(row.backup_location):
        if not name.endswith(".dcm"):
            continue
        ingestor.ingest(storage.read_kept(name), source="restore", institution=row.institution)
        restored += 1
    with session(), write_transaction():
        DeletedSeries.update(restored_at=int(time.time())).where(
            DeletedSeries.id == row.id
        ).execute()
    storage.remove_kept(row.backup_location)
    return restored


def purge(storage: Storage, now: int | None = None) -> int:
    """Remove the files of deleted series past their retention; returns how many series."""
    now = int(time.time()) if now is None else now
    with session():
        expired = list(
            DeletedSeries.select().where(
                (DeletedSeries.retention_until <= now)
                & DeletedSeries.restored_at.is_null(True)
                & DeletedSeries.purged_at.is_null(True)
            )
        )
    for row in expired:
        storage.remove_kept(row.backup_location)
        with session(), write_transaction():
            DeletedSeries.update(purged_at=now).where(DeletedSeries.id == row.id).execute()
    return len(expired)
