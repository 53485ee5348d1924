"""``/api/v1/ai/analyze`` (workstation-api.md, "AI Analysis"): queue an analysis of a series and
read its state and result.

``POST`` queues a job in the catalog (server/ai/jobs.py) and answers 202 with the documented
``analysis_id``, ``status``, ``estimated_completion`` and ``progress_url``; an AI worker (any
node) runs it.  ``GET /ai/analyze/{id}`` returns the documented result shape once completed;
``GET /ai/analyze/{id}/progress`` the stage and percentage (also pushed to WebSocket
subscribers of ``ai_analysis_progress``).  Both need ``run_ai_analysis`` and see only the
caller's institution; the web app never imports torch.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.ai import jobs, trigger
from server.archive import Archive
from server.auth.roles import RUN_AI
from server.catalog.db import session
from server.catalog.schema import AnalysisJob, Series, Study
from server.dicom.uids import is_valid_uid
from server.web.api.auth import API_PREFIX, authorize, tenant_of
from server.web.api.envelope import ApiError, json_body, ok

ANALYSIS_TYPES = ("prostate_comprehensive",)
REGIONS = ("prostate", "zones", "lesions")
EXPECTED_SECONDS = 30.0  # first estimate of a job's duration, before any has been measured


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate(body: Any) -> tuple[str, dict[str, Any]]:
    """The series UID and the normalised config; 422 with every bad field otherwise."""
    if not isinstance(body, dict):
        raise ApiError(422, "VALIDATION_ERROR", "the body must be a JSON object")
    bad: dict[str, str] = {}
    series_uid = body.get("series_uid")
    if not isinstance(series_uid, str) or not is_valid_uid(series_uid):
        bad["series_uid"] = "must be a Series Instance UID"
    analysis_type = body.get("analysis_type", ANALYSIS_TYPES[0])
    if analysis_type not in ANALYSIS_TYPES:
        bad["analysis_type"] = f"must be one of {', '.join(ANALYSIS_TYPES)}"
    raw = body.get("config") or {}
    if not isinstance(raw, dict):
        bad["config"] = "must be an object"
        raw = {}
    config: dict[str, Any] = {}
    threshold = raw.get("confidence_threshold", 0.5)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not (0 <= threshold <= 1)
    ):
        bad["config.confidence_threshold"] = "must be a number from 0 to 1"
    else:
        config["confidence_threshold"] = float(threshold)
    regions = raw.get("target_regions", ["prostate", "lesions"])
    if not isinstance(regions, list) or not all(r in REGIONS for r in regions) or not regions:
        bad["config.target_regions"] = f"must be a non-empty list of {', '.join(REGIONS)}"
    else:
        config["target_regions"] = regions
    for flag, default in (("include_pi_rads", True), ("generate_report", False)):
        value = raw.get(flag, default)
        if not isinstance(value, bool):
            bad[f"config.{flag}"] = "must be true or false"
        config[flag] = bool(value)
    psa = raw.get("psa_ng_ml", body.get("psa_ng_ml"))
    if psa is not None:
        if isinstance(psa, bool) or not isinstance(psa, int | float) or not 0 <= psa < 10000:
            bad["config.psa_ng_ml"] = "must be a PSA value in ng/mL"
        else:
            config["psa"] = float(psa)
    if bad:
        raise ApiError(422, "VALIDATION_ERROR", "the request has invalid fields", {"fields": bad})
    return str(series_uid), {"analysis_type": analysis_type, "config": config}


def _expected_duration() -> float:
    """The mean duration of the last completed jobs: the basis of ``estimated_completion``."""
    with session():
        recent = list(
            AnalysisJob.select(AnalysisJob.started_at, AnalysisJob.finished_at)
            .where(AnalysisJob.status == jobs.COMPLETED)
            .order_by(AnalysisJob.finished_at.desc())
            .limit(10)
            .tuples()
        )
    spans = [end - start for start, end in recent if start and end and end >= start]
    return sum(spans) / len(spans) if spans else EXPECTED_SECONDS


def _results(job: Any, config: dict[str, Any]) -> dict[str, Any] | None:
    if job.result is None:
        return None
    result: dict[str, Any] = orjson.loads(job.result)
    wanted = set(config.get("target_regions") or REGIONS)
    regions = {"prostate": {"prostate"}, "zones": {"peripheral_zone", "transition_zone"}}
    regions["lesions"] = {"lesion"}
    keep = set().union(*(regions[w] for w in wanted if w in regions))
    items = [s for s in result.get("segmentations", []) if s["region_type"] in keep]
    if not config.get("include_pi_rads", True):
        items = [{k: v for k, v in s.items() if k != "pi_rads_score"} for s in items]
    metrics = dict(result.get("metrics") or {})
    if not config.get("include_pi_rads", True):
        metrics.pop("highest_pi_rads", None)
    return {
        "segmentations": items,
        "metrics": metrics,
        "report": result.get("report"),
        "dicom_objects": result.get("outputs"),
        "model": result.get("model"),
    }


def describe(job: Any) -> dict[str, Any]:
    stored = orjson.loads(job.config or "{}")
    config = stored.get("config") or {}
    processing = (
        round(job.finished_at - job.started_at, 2)
        if job.finished_at and job.started_at and job.status == jobs.COMPLETED
        else None
    )
    return {
        "analysis_id": job.id,
        "series_uid": job.series_uid,
        "study_uid": job.study_uid,
        "analysis_type": job.analysis_type,
        "trigger": job.trigger,
        "status": job.status,
        "stage": job.stage,
        "progress": round(float(job.progress) * 100),
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.finished_at) if job.status == jobs.COMPLETED else None,
        "failed_at": _iso(job.finished_at) if job.status == jobs.FAILED else None,
        "processing_time_seconds": processing,
        "inference_seconds": job.inference_seconds,
        "device": job.device,
        "error": job.error,
        "results": _results(job, config),
    }


def _job_or_404(analysis_id: str, institution: str | None) -> Any:
    job = jobs.get(analysis_id) if analysis_id.startswith("analysis_") else None
    if job is None or (institution is not None and job.institution != institution):
        raise ApiError(
            404, "ANALYSIS_NOT_FOUND", f"Analysis {analysis_id} not found", {"id": analysis_id}
        )
    return job


def ai_routes(archive: Archive) -> list[BaseRoute]:
    settings = archive.settings

    def start(request: Request, body: Any) -> Response:
        claims = authorize(request, archive, RUN_AI)
        series_uid, config = validate(body)
        institution = tenant_of(claims)
        with session():
            found = (
                Series.select(Series.id, Study.study_instance_uid, Study.institution)
                .join(Study, on=(Series.study == Study.id))
                .where(Series.series_instance_uid == series_uid)
                .tuples()
                .first()
            )
        if found is None or (institution is not None and found[2] != institution):
            raise ApiError(
                404,
                "MEDICAL_IMAGE_NOT_FOUND",
                f"Medical image with UID {series_uid} not found",
                {"series_uid": series_uid},
            )
        with session():
            classes, _ = trigger.series_facts(series_uid)
        if not classes or not classes <= set(trigger.ANALYSABLE_CLASSES):
            raise ApiError(
                422,
                "SERIES_NOT_ANALYSABLE",
                "this analysis needs a series of single-frame MR images",
                {"series_uid": series_uid, "sop_classes": sorted(classes)},
            )
        if not settings.ai_enabled:
            raise ApiError(503, "AI_DISABLED", "the AI loop is switched off ([ai] enabled)")
        job_id = jobs.new_id()
        jobs.enqueue(
            series_uid,
            found[1],
            found[2],
            version=f"api:{job_id}",
            trigger="api",
            max_attempts=settings.ai_max_attempts,
            requested_by=f"user_{claims.user_id}",
            config=config,
            job_id=job_id,
        )
        archive.audit.record(
            "api.ai.analyze", f"user_{claims.user_id}", series=series_uid, analysis=job_id
        )
        with session():
            waiting = (
                AnalysisJob.select()
                .where(AnalysisJob.status.in_((jobs.QUEUED, jobs.PROCESSING)))
                .count()
            )
        expected = _expected_duration() * max(1, waiting) / max(1, settings.ai_workers)
        return ok(
            {
                "analysis_id": job_id,
                "status": "processing",
                "estimated_completion": _iso(time.time() + expected),
                "progress_url": f"{API_PREFIX}/ai/analyze/{job_id}/progress",
            },
            "Analysis queued",
            status=202,
        )

    def detail(request: Request) -> Response:
        claims = authorize(request, archive, RUN_AI)
        job = _job_or_404(request.path_params["analysis_id"], tenant_of(claims))
        archive.audit.record(
            "api.ai.result", f"user_{claims.user_id}", series=job.series_uid, analysis=job.id
        )
        return ok(describe(job))

    def progress(request: Request) -> Response:
        claims = authorize(request, archive, RUN_AI)
        job = _job_or_404(request.path_params["analysis_id"], tenant_of(claims))
        data = {
            "analysis_id": job.id,
            "status": job.status,
            "stage": job.stage,
            "current_step": jobs.STEPS.get(job.stage, job.stage),
            "progress": round(float(job.progress) * 100),
            "error": job.error,
        }
        if job.status == jobs.PROCESSING and job.started_at and job.progress > 0.05:
            elapsed = time.time() - job.started_at
            data["estimated_remaining_seconds"] = round(elapsed / job.progress * (1 - job.progress))
        return ok(data)

    def listing(request: Request) -> Response:
        claims = authorize(request, archive, RUN_AI)
        series_uid = request.query_params.get("series_uid")
        if not series_uid or not is_valid_uid(series_uid):
            raise ApiError(
                422,
                "VALIDATION_ERROR",
                "series_uid is required",
                {"fields": {"series_uid": "must be a Series Instance UID"}},
            )
        institution = tenant_of(claims)
        with session():
            rows = [
                job
                for job in AnalysisJob.select()
                .where(AnalysisJob.series_uid == series_uid)
                .order_by(AnalysisJob.created_at)
                if institution is None or job.institution == institution
            ]
        archive.audit.record(
            "api.ai.list", f"user_{claims.user_id}", series=series_uid, results=len(rows)
        )
        return ok({"analyses": [describe(job) for job in rows]})

    async def collection(request: Request) -> Response:
        if request.method == "GET":
            return await run_in_threadpool(listing, request)
        return await run_in_threadpool(start, request, await json_body(request))

    async def member(request: Request) -> Response:
        return await run_in_threadpool(detail, request)

    async def progress_endpoint(request: Request) -> Response:
        return await run_in_threadpool(progress, request)

    return [
        Route(f"{API_PREFIX}/ai/analyze", collection, methods=["GET", "POST"]),
        Route(f"{API_PREFIX}/ai/analyze/{{analysis_id}}", member, methods=["GET"]),
        Route(
            f"{API_PREFIX}/ai/analyze/{{analysis_id}}/progress", progress_endpoint, methods=["GET"]
        ),
    ]
