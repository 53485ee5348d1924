"""The AI worker: ``python -m server worker`` (``serve`` starts ``[ai] workers`` of them).

Each pass it lets the stability trigger queue new jobs, then claims one job and runs it:

1. load the series as a volume (server/ai/volume.py; a broken series fails the job for good);
2. inference (server/ai/models.py), CUDA when available; if the GPU runs out of memory it
   retries once with half-size sliding windows (a quarter of the memory) rather than failing;
3. structures and measurements (server/ai/analysis.py);
4. the SEG and the SR (server/ai/outputs.py) through the shared ingest path, then the
   segmentation rows the JSON API lists, then, if asked, the PI-RADS report (server/reports.py);
5. the job's result; progress is written to the job row and published to WebSocket
   subscribers at each stage.

This is the only process that imports torch.  Nothing is written before step 4, and step 4's
UIDs are fixed by the job, so a job retried after its worker died stores its outputs once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from server import metrics
from server.ai import jobs, trigger
from server.ai.analysis import Findings, NothingFound, findings
from server.ai.launcher import EXIT_NOT_INSTALLED
from server.ai.volume import BrokenSeries, Volume, load_series
from server.archive import Archive
from server.catalog.db import session, write_transaction
from server.catalog.schema import Segmentation
from server.config import Settings

log = logging.getLogger(__name__)
# Fault injection for tests: at the stage named by PAUSE_AT_ENV ("inferred", the default, or
# "seg_stored") the worker creates this file and waits while it exists, so a test can kill it
# mid-job at a known point.
PAUSE_ENV = "IMAGING_AI_PAUSE_FILE"
PAUSE_AT_ENV = "IMAGING_AI_PAUSE_AT"


class LostJob(Exception):
    """Another worker holds the job now (this one's lease ran out): stop, write nothing."""


class _Heartbeat:
    """Renews the job's lease while a long step runs (inference can outlast the lease).

    Only the job's own thread reports stage and progress, so they never go backwards; this
    thread only extends the lease, and notes when the job stopped being ours."""

    def __init__(self, job_id: str, worker: str, lease: float) -> None:
        self.job_id, self.worker, self.lease = job_id, worker, lease
        self.lost = False
        self._last_report = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ai-heartbeat", daemon=True)
        self._thread.start()

    def set(self, stage: str, progress: float, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= 0.5:  # progress events at most twice a second
            self._last_report = now
            if not jobs.report(self.job_id, self.worker, self.lease, stage, progress):
                self.lost = True
        if self.lost:
            raise LostJob(self.job_id)

    def _run(self) -> None:
        while not self._stop.wait(max(1.0, self.lease / 4)):
            try:
                if not jobs.renew(self.job_id, self.worker, self.lease):
                    self.lost = True
                    return
            except Exception:  # the catalog may be briefly away; the lease has slack
                log.warning("could not renew the lease of %s", self.job_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()


class Worker:
    def __init__(self, archive: Archive, segmenter: Any) -> None:
        self.archive = archive
        self.settings: Settings = archive.settings
        self.segmenter = segmenter
        self.id = jobs.worker_id()
        self.stopping = threading.Event()

    def run_forever(self) -> None:
        log.info(
            "AI worker %s ready: model %s (%s) on %s",
            self.id,
            self.segmenter.name,
            self.segmenter.version,
            self.segmenter.device,
        )
        while not self.stopping.is_set():
            if not self.run_once():
                self.stopping.wait(self.settings.ai_poll_interval)

    def run_once(self) -> bool:
        """One pass: trigger, then at most one job; True if a job ran."""
        try:
            trigger.scan(self.settings)
            claimed = jobs.claim(self.id, self.settings.ai_lease)
        except Exception:
            log.exception("cannot reach the job queue")
            return False
        if claimed is None:
            return False
        self.process(claimed)
        return True

    def process(self, job: jobs.Claimed) -> None:
        log.info("job %s: series %s (attempt %d)", job.id, job.series_uid, job.attempt)
        beat = _Heartbeat(job.id, self.id, self.settings.ai_lease)
        # Process CPU time, not the thread's: torch runs inference on threads of its own, and a
        # worker runs one job at a time.
        cpu_started = time.process_time()
        outcome = "failed"
        try:
            result = self._analyse(job, beat)
        except BrokenSeries as exc:
            jobs.fail(job.id, self.id, f"the series cannot be analysed: {exc}", retry=False)
        except NothingFound as exc:
            jobs.fail(job.id, self.id, str(exc), retry=False)
        except LostJob:
            outcome = "lost"
            log.warning("job %s was taken over by another worker; this attempt stops", job.id)
        except Exception as exc:
            outcome = "error"
            log.exception("job %s failed", job.id)
            jobs.fail(job.id, self.id, f"{type(exc).__name__}: {exc}", retry=True)
        else:
            outcome = "completed"
            if not jobs.complete(
                job.id, self.id, result[0], inference_seconds=result[1], device=result[2]
            ):
                outcome = "lost"
                log.warning("job %s was taken over by another worker before it finished", job.id)
        finally:
            beat.stop()
            metrics.AI_JOB_CPU_SECONDS.observe(time.process_time() - cpu_started)
            metrics.AI_JOBS_PROCESSED.labels(outcome).inc()

    def _infer(self, volume: Volume, beat: _Heartbeat) -> tuple[Any, str]:
        def progress(fraction: float) -> None:
            beat.set("inference", 0.15 + 0.6 * fraction)

        scale = 1.0
        while True:
            try:
                return self.segmenter(
                    volume.pixels, volume.spacing, scale=scale, progress=progress
                ), self.segmenter.device
            except Exception as exc:
                # Once only: quarter-size windows lose too much context
                # (models/prostate-phantom/MODEL_CARD.md: gland Dice 0.75).
                if "out of memory" not in str(exc).lower() or scale <= 0.5:
                    raise
                import torch

                torch.cuda.empty_cache()
                scale /= 2
                log.warning("GPU out of memory: retrying with windows at %.2f of their size", scale)

    def _analyse(self, job: jobs.Claimed, beat: _Heartbeat) -> tuple[dict[str, Any], float, str]:
        from server.ai import outputs

        started = time.monotonic()
        beat.set("loading", 0.05, force=True)
        volume = load_series(self.archive.storage, job.study_uid, job.series_uid)
        patient_id = str(volume.datasets[0].get("PatientID") or "")
        # The worker reads patient data like any client: the trail says so (ARCHITECTURE.md).
        self.archive.audit.record(
            "ai.read_series",
            f"ai-worker:{self.id}",
            analysis=job.id,
            study=job.study_uid,
            series=job.series_uid,
            patient_id=patient_id,
            instances=len(volume.datasets),
        )
        beat.set("inference", 0.15, force=True)
        t0 = time.monotonic()
        probabilities, device = self._infer(volume, beat)
        inference_seconds = time.monotonic() - t0
        metrics.inference_done(inference_seconds, str(device))
        _maybe_pause("inferred")
        beat.set("measuring", 0.8, force=True)
        config = job.config.get("config") or {}
        threshold = float(config.get("confidence_threshold", 0.5))
        psa = config.get("psa")
        found = findings(
            probabilities,
            volume.spacing,
            [float(v) for v in volume.datasets[0].ImageOrientationPatient],
            confidence_threshold=threshold,
            psa=float(psa) if psa is not None else None,
        )
        beat.set("storing", 0.9, force=True)
        model = outputs.ModelInfo(self.segmenter.name, self.segmenter.version)
        seg, numbers = outputs.segmentation(volume, found, model, job.id)
        sr = outputs.measurement_report(volume, found, seg, numbers, model, job.id)
        source = f"ai:{job.id}"
        ingest = self.archive.ingestor.ingest
        seg_stored = ingest(outputs.encode(seg), source=source, institution=job.institution)
        _maybe_pause("seg_stored")
        beat.set("storing", 0.93, force=True)  # still ours? (raises LostJob if not)
        sr_stored = ingest(outputs.encode(sr), source=source, institution=job.institution)
        rows = _record_segmentations(
            job, found, numbers, str(seg.SeriesInstanceUID), seg_stored.sop_instance_uid
        )
        self.archive.audit.record(
            "ai.store_results",
            f"ai-worker:{self.id}",
            analysis=job.id,
            study=job.study_uid,
            series=job.series_uid,
            patient_id=patient_id,
            seg=seg_stored.sop_instance_uid,
            sr=sr_stored.sop_instance_uid,
        )
        report = None
        if config.get("generate_report") and found.lesions:
            report = self._report(job)
        result = {
            "segmentations": rows,
            "metrics": outputs.summary(found),
            "report": report,
            "outputs": {
                "seg_series_uid": seg_stored.series_instance_uid,
                "seg_sop_instance_uid": seg_stored.sop_instance_uid,
                "sr_series_uid": sr_stored.series_instance_uid,
                "sr_sop_instance_uid": sr_stored.sop_instance_uid,
            },
            "model": {"name": model.name, "version": model.version, "device": device},
            "processing_time_seconds": round(time.monotonic() - started, 2),
            "inference_seconds": round(inference_seconds, 3),
        }
        return result, inference_seconds, device

    def _report(self, job: jobs.Claimed) -> dict[str, Any] | None:
        from server import reports

        try:
            document = reports.generate(
                self.archive.storage,
                self.archive.ingestor,
                job.study_uid,
                job.institution,
                signer="imaging-server AI",
            )
        except reports.ReportError as exc:
            log.warning("job %s: no report: %s", job.id, exc)
            return None
        report_id = document["report_id"]
        return {
            "report_id": report_id,
            "structured_report_url": f"/api/v1/reports/{report_id}",
            "pdf_url": f"/api/v1/reports/{report_id}.pdf",
        }


def _maybe_pause(stage: str) -> None:
    marker = os.environ.get(PAUSE_ENV)
    if not marker or os.environ.get(PAUSE_AT_ENV, "inferred") != stage:
        return
    path = Path(marker)
    path.write_text(str(os.getpid()))
    while path.exists():
        time.sleep(0.05)


def _record_segmentations(
    job: jobs.Claimed, found: Findings, numbers: list[int], seg_series: str, seg_sop: str
) -> list[dict[str, Any]]:
    """Rows for ``/api/v1/segmentations``: one per segment of the SEG.  A newer analysis of the
    same series replaces the older one's rows unless a radiologist validated them."""
    now = int(time.time())
    rows: list[dict[str, Any]] = []
    with session(), write_transaction():
        Segmentation.delete().where(
            (Segmentation.image_uid == job.series_uid)
            & (Segmentation.creation_method == "ai_automatic")
            & (Segmentation.validated == 0)
            & ((Segmentation.analysis_id != job.id) | Segmentation.analysis_id.is_null())
        ).execute()
        for structure, number in zip(found.structures, numbers, strict=True):
            row_id = f"seg_{job.id[len('analysis_') :]}_{number}"
            values = {
                "image_uid": job.series_uid,
                "study_uid": job.study_uid,
                "institution": job.institution,
                "seg_series_uid": seg_series,
                "seg_sop_instance_uid": seg_sop,
                "segment_number": number,
                "analysis_id": job.id,
                "region_type": structure.region,
                "creation_method": "ai_automatic",
                "confidence": structure.confidence,
                "created_by": "ai",
                "created_at": now,
                "last_modified": now,
                "volume_ml": structure.volume_ml,
                "surface_area_mm2": structure.surface_area_mm2,
                "sphericity": structure.sphericity,
                "voxel_count": structure.voxel_count,
                "bounding_box": orjson.dumps(structure.bounding_box).decode()
                if structure.bounding_box
                else None,
                "pi_rads_score": structure.pi_rads,
                "anatomical_location": structure.location,
            }
            if Segmentation.get_or_none(Segmentation.id == row_id) is None:
                Segmentation.create(id=row_id, **values)
            rows.append(
                {
                    "segmentation_id": row_id,
                    "region_type": structure.region,
                    "confidence": structure.confidence,
                    "volume_ml": round(structure.volume_ml, 3),
                    "surface_area_mm2": round(structure.surface_area_mm2, 1),
                    "sphericity": round(structure.sphericity, 3),
                    "pi_rads_score": structure.pi_rads,
                    "anatomical_location": structure.location,
                    "diameter_mm": structure.diameter_mm or None,
                    "bounding_box": structure.bounding_box,
                    "segment_number": number,
                }
            )
    return rows


def main(settings: Settings, parent_pid: int | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT."""
    from server.archive import close_archive, open_archive

    if parent_pid:
        from server.dimse.workers import die_with_parent

        die_with_parent(parent_pid)
    try:
        from server.ai.models import ModelError, load_segmenter
    except ImportError as exc:
        print(f"the AI worker needs the ai extra (pip install -e '.[ai]'): {exc}", flush=True)
        return EXIT_NOT_INSTALLED
    try:
        segmenter = load_segmenter(settings.ai_model, settings.ai_device, settings.ai_threads)
    except ModelError as exc:
        print(f"cannot load the AI model: {exc}", flush=True)
        return EXIT_NOT_INSTALLED
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every copied module
    archive = open_archive(settings)
    metrics.process_started("ai_worker")
    worker = Worker(archive, segmenter)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stopping.set())
    try:
        worker.run_forever()
    finally:
        close_archive()
    return 0
