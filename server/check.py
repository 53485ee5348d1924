"""``python -m server check``: storage against the catalog, and repairs.

What it looks for:

* **missing files**: an instance row whose file is gone (retrieval would fail);
* **wrong size**: the file's size differs from the size recorded at ingest (truncated or
  overwritten outside the server);
* **unreadable / wrong instance** (``--deep``): the file's header does not parse, or holds
  another SOP Instance UID than its row;
* **orphan files**: files under ``instances/`` that no row references;
* **interrupted writes**: ``tmp/*.part`` journal entries (see :mod:`server.storage`);
* **counters**: NumberOfSeriesRelatedInstances, NumberOfStudyRelatedSeries/Instances and
  ModalitiesInStudy stored on the rows (C-FIND and QIDO read them, PS3.4 C.6.1.1.3) that differ
  from the rows they count; series, studies and patients left empty.

``--repair`` fixes what it can without losing data: interrupted writes are resolved as at
start-up; counters are recomputed; empty parents removed; rows of missing files removed (the
instance cannot be served, and a sender's retry can then store it again); an orphan whose data
is also elsewhere (another hard link, e.g. the deleted-series area, or a newer version of the
same instance) is removed, any other orphan is moved to ``orphans/`` for review (``import``
takes it back).  Corrupt files are reported, never deleted.

A check that repairs needs the server stopped (it takes the writers lock exclusively); a
read-only check runs beside a live server and leaves out files younger than ``grace`` seconds,
which may be writes still waiting for their catalog commit.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peewee import fn
from pydicom import dcmread

from server.catalog import writer
from server.catalog.db import session, write_transaction
from server.catalog.schema import Instance, Patient, Series, Study
from server.storage import Storage

ProgressFn = Callable[[str, int], None]


@dataclass
class Finding:
    kind: str
    subject: str  # a relative file path or a UID
    detail: str = ""
    repaired: str = ""  # what --repair did about it, "" = nothing


@dataclass
class CheckReport:
    instances: int = 0
    files: int = 0
    findings: list[Finding] = field(default_factory=list)

    def add(self, kind: str, subject: str, detail: str = "") -> Finding:
        finding = Finding(kind, subject, detail)
        self.findings.append(finding)
        return finding

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    @property
    def unresolved(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]

    def as_dict(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "files": self.files,
            "problems": self.counts(),
            "unresolved": len(self.unresolved),
            "findings": [vars(f) for f in self.findings],
        }


class ServerRunning(Exception):
    """--repair was asked for while a server holds the storage."""


def _exclusive(storage: Storage) -> int:
    """The writers lock (see server.archive), exclusively: no server may be writing."""
    fd = os.open(storage.root / "writers.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServerRunning(
            "a server is running on this storage; stop it to repair, or check without --repair"
        ) from None
    return fd


def _check_rows(storage: Storage, report: CheckReport, deep: bool, repair: bool) -> set[str]:
    """Every row against its file; returns the referenced relative paths."""
    referenced: set[str] = set()
    missing: list[int] = []
    query = Instance.select(
        Instance.id, Instance.sop_instance_uid, Instance.file_path, Instance.file_size
    ).tuples()
    for row_id, uid, relative, size in query.iterator():
        report.instances += 1
        referenced.add(relative)
        actual = storage.size(relative)
        if actual is None:
            report.add("missing_file", uid, relative)
            missing.append(row_id)
            continue
        if actual != size:
            report.add("wrong_size", relative, f"{actual} bytes on disk, {size} catalogued")
            continue
        if deep:
            try:
                path = storage.local_path(relative)
                found = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            except Exception as exc:
                report.add("unreadable", relative, str(exc)[:200])
                continue
            if found != uid:
                report.add("wrong_instance", relative, f"holds {found}, catalogued as {uid}")
    if repair and missing:
        for row_id in missing:
            with write_transaction():
                row = Instance.get_or_none(Instance.id == row_id)
                if row is not None:
                    writer.delete_instance_row(row)
        for f in report.findings:
            if f.kind == "missing_file":
                f.repaired = "row removed"
    return referenced


def _check_orphans(
    storage: Storage, referenced: set[str], report: CheckReport, repair: bool, grace: float
) -> None:
    newest = time.time() - grace
    for stored in storage.files():
        report.files += 1
        if stored.relative in referenced:
            continue
        if not repair and stored.mtime > newest:
            continue  # perhaps a write whose catalog commit is still to come
        finding = report.add("orphan_file", stored.relative, f"{stored.size} bytes")
        if not repair:
            continue
        key = Path(stored.relative).name.split(".", 1)[0]
        if stored.elsewhere or writer.committed_path(key) is not None:
            # The data is kept elsewhere too: another link (deleted-series area) or a newer
            # version of the same instance.
            storage.delete(stored.relative)
            finding.repaired = "removed (a copy is kept elsewhere)"
            continue
        finding.repaired = f"moved to {storage.quarantine(stored.relative)}"


def _check_counters(report: CheckReport, repair: bool) -> None:
    series_counts = dict(
        Instance.select(Instance.series, fn.COUNT(Instance.id))
        .group_by(Instance.series)
        .tuples()
        .iterator()
    )
    columns = (Series.id, Series.series_instance_uid, Series.number_of_series_related_instances)
    for series in Series.select(*columns).iterator():
        count = series_counts.get(series.id, 0)
        stored = series.number_of_series_related_instances
        if count == 0:
            finding = report.add("empty_series", series.series_instance_uid)
            if repair:
                with write_transaction():
                    Series.delete().where(Series.id == series.id).execute()
                finding.repaired = "removed"
        elif stored != count:
            finding = report.add(
                "series_count", series.series_instance_uid, f"{stored} stored, {count} counted"
            )
            if repair:
                with write_transaction():
                    Series.update(number_of_series_related_instances=count).where(
                        Series.id == series.id
                    ).execute()
                finding.repaired = "recounted"
    # One pass over the series (after the repairs above) instead of a query per study.
    by_study: dict[int, list[tuple[str | None, int | None]]] = {}
    for study_id, modality, instances in (
        Series.select(Series.study, Series.modality, Series.number_of_series_related_instances)
        .tuples()
        .iterator()
    ):
        by_study.setdefault(study_id, []).append((modality, instances))
    for study in Study.select().iterator():
        rows = by_study.get(study.id, [])
        if not rows:
            finding = report.add("empty_study", study.study_instance_uid)
            if repair:
                with write_transaction():
                    Study.delete().where(Study.id == study.id).execute()
                finding.repaired = "removed"
            continue
        want = {
            "number_of_study_related_series": len(rows),
            "number_of_study_related_instances": sum(n or 0 for _, n in rows),
            "modalities_in_study": "\\".join(sorted({m for m, _ in rows if m})) or None,
        }
        have = {name: getattr(study, name) for name in want}
        if have != want:
            wrong = ", ".join(f"{k} {have[k]!r} != {want[k]!r}" for k in want if have[k] != want[k])
            finding = report.add("study_counts", study.study_instance_uid, wrong)
            if repair:
                with write_transaction():
                    Study.update(**want).where(Study.id == study.id).execute()
                finding.repaired = "recounted"
    with_studies = {row[0] for row in Study.select(Study.patient).distinct().tuples().iterator()}
    for patient in Patient.select(Patient.id, Patient.patient_key).iterator():
        if patient.id not in with_studies:
            finding = report.add("empty_patient", patient.patient_key)
            if repair:
                with write_transaction():
                    Patient.delete().where(Patient.id == patient.id).execute()
                finding.repaired = "removed"


def check(
    storage: Storage,
    *,
    repair: bool = False,
    deep: bool = False,
    grace: float = 60.0,
    progress: ProgressFn | None = None,
) -> CheckReport:
    """Compare storage and catalog (the catalog must be connected: ``database.initialize``)."""
    report = CheckReport()
    lock = _exclusive(storage) if repair else None
    try:
        with session():
            parts = sorted(storage.tmp.glob("*.part"))
            for part in parts:
                finding = report.add("interrupted_write", part.name)
                if repair:
                    finding.repaired = "resolved"
            if repair and parts:
                storage.recover(writer.committed_path)
            if progress:
                progress("rows", 0)
            referenced = _check_rows(storage, report, deep, repair)
            if progress:
                progress("files", report.instances)
            _check_orphans(storage, referenced, report, repair, grace)
            if progress:
                progress("counters", report.files)
            _check_counters(report, repair)
            writer.parents.clear()
    finally:
        if lock is not None:
            os.close(lock)
    return report
