"""The AI job queue: rows of :class:`~server.catalog.schema.AnalysisJob` in the catalog.

Any number of workers, on any node sharing the catalog, take jobs from it:

* :func:`claim` hands a queued job (or one whose worker stopped renewing its lease) to exactly
  one worker: on SQLite inside the single-writer transaction (``BEGIN IMMEDIATE``, a
  conditional UPDATE), on PostgreSQL with ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent
  workers never wait on each other's rows.
* The claiming worker renews the lease with each progress report (:func:`report`) and
  finishes the job with :func:`complete` or :func:`fail`; both only succeed while the job is
  still its own, so a worker that lost its lease cannot overwrite the one that took over.
* A job whose worker died is taken again; after ``max_attempts`` claims it fails with the
  last reason.  A worker on the same host notices a dead claimant at once (its process is
  gone) instead of waiting for the lease to run out.

Progress and outcome are also published on the event bus (``ai_analysis_progress``), which
carries them to WebSocket subscribers in every process.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from peewee import fn

from server import events
from server.catalog.db import database, is_postgres, session, write_transaction
from server.catalog.schema import AnalysisJob

QUEUED, PROCESSING, COMPLETED, FAILED = "queued", "processing", "completed", "failed"
EVENT = "ai_analysis_progress"
_HOST = socket.gethostname()
STEPS = {  # stage -> the document's "current_step" text
    "queued": "Waiting for a worker",
    "claimed": "Starting",
    "loading": "Loading the series",
    "inference": "Segmenting prostate gland, zones and lesions",
    "measuring": "Measuring structures",
    "storing": "Storing DICOM SEG and SR",
    "completed": "Completed",
    "failed": "Failed",
}


def _pid_space() -> str:
    """What makes a pid meaningful: this boot of this kernel and this pid namespace.
    Containers may share a host name (``--network host``) but not these."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append(secrets.token_hex(4))  # unknown: never treat another pid as ours
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


_PID_SPACE = _pid_space()


def worker_id() -> str:
    """This process's identity in ``AnalysisJob.worker``: host, pid, a nonce (pids repeat) and
    the pid space the pid belongs to."""
    return f"{_HOST}:{os.getpid()}:{secrets.token_hex(3)}:{_PID_SPACE}"


def new_id() -> str:
    return f"analysis_{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Claimed:
    id: str
    series_uid: str
    study_uid: str
    institution: str | None
    attempt: int
    config: dict[str, Any]


def enqueue(
    series_uid: str,
    study_uid: str,
    institution: str | None,
    *,
    version: str,
    trigger: str,
    max_attempts: int,
    requested_by: str = "",
    config: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> str | None:
    """Queue an analysis; None when this version of the series already has a job.

    The unique (series_uid, series_version) index makes the check and the insert one atomic
    step, whichever node or process tries.
    """
    job_id = job_id or new_id()
    now = time.time()
    param = "%s" if is_postgres() else "?"
    columns = (
        "id",
        "series_uid",
        "study_uid",
        "institution",
        "series_version",
        "analysis_type",
        "trigger",
        "requested_by",
        "config",
        "status",
        "stage",
        "progress",
        "attempts",
        "max_attempts",
        "created_at",
    )
    values = (
        job_id,
        series_uid,
        study_uid,
        institution,
        version,
        str((config or {}).get("analysis_type", "prostate_comprehensive")),
        trigger,
        requested_by,
        orjson.dumps(config or {}).decode(),
        QUEUED,
        "queued",
        0.0,
        0,
        max_attempts,
        now,
    )
    sql = (
        f'INSERT INTO "analysis_job" ({", ".join(columns)}) '
        f"VALUES ({', '.join([param] * len(columns))}) "
        'ON CONFLICT ("series_uid", "series_version") DO NOTHING RETURNING "id"'
    )
    with session(), write_transaction():
        row = database.execute_sql(sql, values).fetchone()
    if row is None:
        return None
    events.publish(
        events.Event(
            EVENT,
            {
                "analysis_id": job_id,
                "series_uid": series_uid,
                "status": QUEUED,
                "stage": "queued",
                "current_step": STEPS["queued"],
                "progress": 0,
            },
            institution,
        )
    )
    return job_id


def exists(series_uid: str, version: str) -> bool:
    """Whether this version of the series has a job (a read: no write lock taken)."""
    with session():
        query = AnalysisJob.select(AnalysisJob.id).where(
            (AnalysisJob.series_uid == series_uid) & (AnalysisJob.series_version == version)
        )
        return bool(query.exists())


def _alive_here(worker: str | None) -> bool:
    """False only when ``worker`` ran in this pid space (host, boot, namespace) and its process
    is gone."""
    if not worker:
        return False
    parts = worker.split(":")
    if len(parts) != 4 or parts[0] != _HOST or parts[3] != _PID_SPACE:
        return True  # another machine's or container's worker: only its lease tells
    try:
        pid = int(parts[1])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _candidates(lock: bool) -> list[Any]:
    """Jobs in progress (as many as there are workers: each may have been abandoned), then the
    oldest queued ones."""
    running = AnalysisJob.select().where(AnalysisJob.status == PROCESSING)
    queued = (
        AnalysisJob.select()
        .where(AnalysisJob.status == QUEUED)
        .order_by(AnalysisJob.created_at)
        .limit(1)  # with SKIP LOCKED: lock one row, leave the rest to concurrent claimers
    )
    if lock:
        running = running.for_update("FOR UPDATE SKIP LOCKED")
        queued = queued.for_update("FOR UPDATE SKIP LOCKED")
    return [*running, *queued]


def claim(worker: str, lease: float) -> Claimed | None:
    """Take the oldest job that is queued or abandoned; None when there is none."""
    now = time.time()
    given_up: list[str] = []
    result: Claimed | None = None
    with session(), write_transaction():
        for job in _candidates(is_postgres()):
            if job.status == PROCESSING and job.lease_until >= now and _alive_here(job.worker):
                continue  # its worker is alive and within its lease
            if job.attempts >= job.max_attempts:
                reason = job.error or "its worker stopped before finishing"
                AnalysisJob.update(
                    status=FAILED,
                    stage="failed",
                    finished_at=now,
                    error=f"gave up after {job.attempts} attempts: {reason}",
                    lease_until=None,
                ).where(AnalysisJob.id == job.id).execute()
                given_up.append(job.id)
                continue
            taken = (
                AnalysisJob.update(
                    status=PROCESSING,
                    stage="claimed",
                    progress=0.0,
                    worker=worker,
                    lease_until=now + lease,
                    attempts=AnalysisJob.attempts + 1,
                    started_at=now,
                )
                .where(
                    (AnalysisJob.id == job.id)
                    & (AnalysisJob.status == job.status)
                    & (AnalysisJob.attempts == job.attempts)
                )
                .execute()
            )
            if taken:
                result = Claimed(
                    job.id,
                    job.series_uid,
                    job.study_uid,
                    job.institution,
                    job.attempts + 1,
                    orjson.loads(job.config or "{}"),
                )
                break
    for job_id in given_up:
        _publish(get(job_id))
    if result is not None:
        _publish(get(result.id))
    return result


def _publish(job: Any) -> None:
    data: dict[str, Any] = {
        "analysis_id": job.id,
        "series_uid": job.series_uid,
        "status": job.status,
        "stage": job.stage,
        "current_step": STEPS.get(job.stage, job.stage),
        "progress": round(float(job.progress) * 100),
    }
    if job.status == PROCESSING and job.started_at and job.progress > 0.05:
        elapsed = time.time() - job.started_at
        data["estimated_remaining_seconds"] = round(elapsed / job.progress * (1 - job.progress))
    if job.error:
        data["error"] = job.error
    events.publish(events.Event(EVENT, data, job.institution))


def report(job_id: str, worker: str, lease: float, stage: str, progress: float) -> bool:
    """Record progress and renew the lease; False when the job is no longer this worker's."""
    with session(), write_transaction():
        mine = (
            AnalysisJob.update(
                stage=stage, progress=max(0.0, min(1.0, progress)), lease_until=time.time() + lease
            )
            .where(
                (AnalysisJob.id == job_id)
                & (AnalysisJob.worker == worker)
                & (AnalysisJob.status == PROCESSING)
            )
            .execute()
        )
    if mine:
        job = get(job_id)
        if job is not None:
            _publish(job)
    return bool(mine)


def complete(
    job_id: str, worker: str, result: dict[str, Any], *, inference_seconds: float, device: str
) -> bool:
    with session(), write_transaction():
        mine = (
            AnalysisJob.update(
                status=COMPLETED,
                stage="completed",
                progress=1.0,
                finished_at=time.time(),
                lease_until=None,
                result=orjson.dumps(result).decode(),
                inference_seconds=inference_seconds,
                device=device,
                error=None,
            )
            .where(
                (AnalysisJob.id == job_id)
                & (AnalysisJob.worker == worker)
                & (AnalysisJob.status == PROCESSING)
            )
            .execute()
        )
    job = get(job_id)
    if mine and job is not None:
        _publish(job)
    return bool(mine)


def fail(job_id: str, worker: str, reason: str, *, retry: bool) -> None:
    """A failed attempt: back to the queue while attempts remain and ``retry`` (a transient
    error), else failed for good (a broken series fails the same way every time)."""
    mine = (AnalysisJob.id == job_id) & (AnalysisJob.worker == worker)
    mine &= AnalysisJob.status == PROCESSING
    with session(), write_transaction():
        job = AnalysisJob.get_or_none(mine)
        if job is None:
            return  # no longer ours: whoever holds it now decides
        again = retry and job.attempts < job.max_attempts
        # The same condition again in the UPDATE: on PostgreSQL another worker may have taken
        # the job between the read and the write.
        changed = (
            AnalysisJob.update(
                status=QUEUED if again else FAILED,
                stage="queued" if again else "failed",
                finished_at=None if again else time.time(),
                lease_until=None,
                worker=None if again else worker,
                error=reason[:2000],
            )
            .where(mine)
            .execute()
        )
    job = get(job_id)
    if changed and job is not None:
        _publish(job)


def renew(job_id: str, worker: str, lease: float) -> bool:
    """Extend the lease only (the heartbeat); False when the job is no longer this worker's."""
    with session(), write_transaction():
        return bool(
            AnalysisJob.update(lease_until=time.time() + lease)
            .where(
                (AnalysisJob.id == job_id)
                & (AnalysisJob.worker == worker)
                & (AnalysisJob.status == PROCESSING)
            )
            .execute()
        )


def get(job_id: str) -> Any:
    with session():
        return AnalysisJob.get_or_none(AnalysisJob.id == job_id)


def queue_depth() -> int:
    with session():
        return int(AnalysisJob.select().where(AnalysisJob.status.in_((QUEUED, PROCESSING))).count())


def counts_by_status() -> dict[str, int]:
    """Jobs in the catalog by status (``/metrics`` reads it at each scrape)."""
    with session():
        rows = (
            AnalysisJob.select(AnalysisJob.status, fn.COUNT(AnalysisJob.id))
            .group_by(AnalysisJob.status)
            .tuples()
        )
        return {str(status): int(count) for status, count in rows}
