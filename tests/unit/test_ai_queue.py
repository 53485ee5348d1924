"""The AI job queue and the stability trigger, on SQLite and PostgreSQL, in process."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.ai import jobs, trigger
from server.archive import Archive, close_archive, open_archive
from server.catalog.db import session
from server.catalog.schema import AiState, AnalysisJob, Series
from server.config import AiRule, load_settings
from tools.generate import StudySpec, ct_series
from tools.phantom import make_phantom, write_series


@pytest.fixture
def archive(tmp_path: Path, database_url: str) -> Iterator[Archive]:
    settings = load_settings(
        None, {"data_dir": str(tmp_path / "data"), "database_url": database_url or None}
    )
    opened = open_archive(dataclasses.replace(settings, ai_stable_age=30.0))
    try:
        yield opened
    finally:
        close_archive()


def _store(archive: Archive, files: list[Path]) -> None:
    for path in files:
        archive.ingestor.ingest(path.read_bytes(), source="test")


def _phantom_series(archive: Archive, tmp: Path, **kwargs: object) -> str:
    phantom = make_phantom(3, shape=(12, 64, 64), spacing=(3.0, 2.0, 2.0))
    files = write_series(phantom, tmp, **kwargs)  # type: ignore[arg-type]
    _store(archive, files)
    with session():
        return str(Series.select(Series.series_instance_uid).order_by(Series.id.desc()).scalar())


def _later(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=seconds)


def test_claims_are_exclusive_under_concurrency(archive: Archive) -> None:
    ids = [
        jobs.enqueue(f"1.2.3.{n}", "1.2.3", None, version="v1", trigger="api", max_attempts=3)
        for n in range(40)
    ]
    assert all(ids)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer() -> None:
        me = jobs.worker_id()
        while True:
            job = jobs.claim(me, 60)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    with session():
        assert AnalysisJob.select().where(AnalysisJob.status == jobs.PROCESSING).count() == 40


def test_one_job_per_series_version(archive: Archive) -> None:
    first = jobs.enqueue("1.2.3.4", "1.2.3", None, version="5@t", trigger="x", max_attempts=3)
    again = jobs.enqueue("1.2.3.4", "1.2.3", None, version="5@t", trigger="x", max_attempts=3)
    newer = jobs.enqueue("1.2.3.4", "1.2.3", None, version="6@u", trigger="x", max_attempts=3)
    assert first and newer and again is None


def test_a_dead_workers_job_is_taken_again_and_gives_up_after_max_attempts(
    archive: Archive,
) -> None:
    job_id = jobs.enqueue("1.2.3.9", "1.2.3", None, version="v", trigger="api", max_attempts=2)
    # A worker process on this host that has exited: its lease is still running, but its
    # process is gone, so the job is free at once.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host, _, _, pid_space = jobs.worker_id().split(":")
    dead_worker = f"{host}:{gone.stdout.strip()}:abc:{pid_space}"
    first = jobs.claim(dead_worker, 3600)
    assert first is not None and first.id == job_id and first.attempt == 1
    second = jobs.claim(jobs.worker_id(), 60)
    assert second is not None and second.id == job_id and second.attempt == 2
    # The second claimant (this process, alive) holds it now.
    assert jobs.claim(jobs.worker_id(), 60) is None
    with session():
        AnalysisJob.update(lease_until=time.time() - 1, worker=dead_worker).where(
            AnalysisJob.id == job_id
        ).execute()
    assert jobs.claim(jobs.worker_id(), 60) is None  # two attempts used up
    job = jobs.get(job_id)
    assert job.status == jobs.FAILED
    assert "gave up after 2 attempts" in job.error


def test_a_worker_that_lost_its_job_cannot_finish_it(archive: Archive) -> None:
    jobs.enqueue("1.2.3.7", "1.2.3", None, version="v", trigger="api", max_attempts=3)
    me = jobs.worker_id()
    job = jobs.claim(me, 60)
    assert job is not None
    with session():
        AnalysisJob.update(worker="elsewhere:1:x").where(AnalysisJob.id == job.id).execute()
    assert not jobs.report(job.id, me, 60, "inference", 0.5)
    assert not jobs.complete(job.id, me, {}, inference_seconds=1.0, device="cpu")
    assert jobs.get(job.id).status == jobs.PROCESSING


def test_transient_failures_retry_and_permanent_ones_do_not(archive: Archive) -> None:
    me = jobs.worker_id()
    a = jobs.enqueue("1.2.3.21", "1.2.3", None, version="v", trigger="api", max_attempts=3)
    b = jobs.enqueue("1.2.3.22", "1.2.3", None, version="v", trigger="api", max_attempts=3)
    first = jobs.claim(me, 60)
    assert first is not None and first.id == a
    jobs.fail(a, me, "catalog unavailable", retry=True)
    assert jobs.get(a).status == jobs.QUEUED and jobs.get(a).error == "catalog unavailable"
    second = jobs.claim(me, 60)
    assert second is not None and second.id == a and second.attempt == 2
    jobs.fail(a, me, "slices are missing", retry=False)
    failed = jobs.get(a)
    assert failed.status == jobs.FAILED and failed.error == "slices are missing"
    third = jobs.claim(me, 60)
    assert third is not None and third.id == b


def test_trigger_queues_stable_matching_series_once(archive: Archive, tmp_path: Path) -> None:
    settings = archive.settings
    rules = (AiRule("t2", series_description="t2", min_instances=8),)
    settings = dataclasses.replace(settings, ai_rules=rules)
    mr = _phantom_series(archive, tmp_path / "mr", series_description="t2_tse_tra")
    spec = StudySpec(patient_id="CT1")
    for ds in ct_series(spec, 10, 64):
        archive.ingestor.ingest(_encode(ds), source="test")
    _phantom_series(archive, tmp_path / "dwi", series_description="ep2d_diff_b800")
    # Not stable yet: nothing queued.
    assert trigger.scan(settings) == []
    queued = trigger.scan(settings, now=_later(60))
    assert len(queued) == 1
    assert jobs.get(queued[0]).series_uid == mr
    # The same version is never queued twice, even from a fresh look (another node, a restart:
    # no watermark, nothing remembered in the process).
    with session():
        AiState.delete().execute()
    trigger._decided.clear()
    assert trigger.scan(settings, now=_later(70)) == []


def test_trigger_ignores_short_series(archive: Archive, tmp_path: Path) -> None:
    settings = dataclasses.replace(archive.settings, ai_rules=(AiRule("any mr", min_instances=20),))
    _phantom_series(archive, tmp_path / "short")  # 12 slices < 20
    assert trigger.scan(settings, now=_later(60)) == []


def _encode(ds: object) -> bytes:
    import io

    from pydicom.dataset import Dataset

    assert isinstance(ds, Dataset)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_late_commit_behind_the_watermark_is_still_seen(archive: Archive, tmp_path: Path) -> None:
    """A series whose last update is older than the watermark (a slow commit, a node whose
    clock lags) is found by the next look's overlap."""
    settings = dataclasses.replace(archive.settings, ai_rules=(AiRule("t2", "MR", "t2"),))
    assert trigger.scan(settings, now=_later(60)) == []  # sets the watermark
    mr = _phantom_series(archive, tmp_path / "late", series_description="t2_tse_tra")
    with session():
        backdated = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=20)
        Series.update(updated_at=backdated).where(Series.series_instance_uid == mr).execute()
    queued = trigger.scan(settings, now=_later(90))
    assert [jobs.get(j).series_uid for j in queued] == [mr]
