"""Metrics and structured logs in-process: ingest counters, route templates as labels, access to
/metrics, the [metrics]/[logging] settings and the JSON log format."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from server import metrics
from server.archive import Archive
from server.config import load_settings
from server.errors import ConfigError, IngestError
from server.telemetry import JsonFormatter, LogContextFilter, association_var
from server.web.api.envelope import request_id_var
from server.web.app import build_app
from tools.generate import StudySpec, small_instance

LOCAL = ("127.0.0.1", 5000)
REMOTE = ("203.0.113.9", 5000)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _encoded(spec: StudySpec) -> bytes:
    buf = io.BytesIO()
    small_instance(spec).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("dimse:CT_SCANNER", "dimse"),
        ("STOW 127.0.0.1", "stow"),
        ("upload:up_123", "upload"),
        ("import:file.dcm", "import"),
        ("ai:analysis_1", "ai"),
        ("report:imaging-server AI", "report"),
        ("something else", "other"),
    ],
)
def test_source_kinds(source: str, kind: str) -> None:
    assert metrics.source_kind(source) == kind


def test_ingest_counts_each_outcome_and_the_bytes(archive: Archive) -> None:
    name = "imaging_instances_received_total"
    before = {o: _value(name, source="import", outcome=o) for o in metrics.INGEST_OUTCOMES}
    bytes_before = _value("imaging_received_bytes_total", source="import")
    data = _encoded(StudySpec(patient_id="UNIT-METRICS"))
    archive.ingestor.ingest(data, source="import:a.dcm")
    archive.ingestor.ingest(data, source="import:a.dcm")
    with pytest.raises(IngestError):
        archive.ingestor.ingest(b"not dicom at all", source="import:b.dcm")
    after = {o: _value(name, source="import", outcome=o) for o in metrics.INGEST_OUTCOMES}
    assert {o: after[o] - before[o] for o in after} == {
        "stored": 1,
        "duplicate": 1,
        "replaced": 0,
        "failed": 1,
    }
    assert _value("imaging_received_bytes_total", source="import") - bytes_before == 2 * len(
        data
    ) + len(b"not dicom at all")


def test_http_latency_is_labelled_by_route_template(archive: Archive) -> None:
    client = TestClient(build_app(archive), client=LOCAL)
    name = "imaging_http_request_duration_seconds_count"
    template = {"method": "GET", "route": "/dicom-web/studies/{study}/series", "status": "200"}
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    before = _value(name, **template), _value(name, **unmatched)
    response = client.get("/dicom-web/studies/1.2.3.4/series")
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")  # DICOMweb too
    assert client.get("/no/such/1.2.3.4").status_code == 404
    assert (_value(name, **template), _value(name, **unmatched)) == (before[0] + 1, before[1] + 1)
    labels = {
        s.labels.get("route", "")
        for family in REGISTRY.collect()
        if family.name == "imaging_http_request_duration_seconds"
        for s in family.samples
    }
    assert not [route for route in labels if "1.2.3.4" in route]


def test_metrics_endpoint_access(archive: Archive) -> None:
    app = build_app(archive)
    local = TestClient(app, client=LOCAL).get("/metrics")
    assert local.status_code == 200
    assert "imaging_build_info{" in local.text
    assert 'imaging_ai_jobs{status="queued"} 0.0' in local.text
    assert TestClient(app, client=REMOTE).get("/metrics").status_code == 401

    archive.settings = dataclasses.replace(archive.settings, metrics_token="unit-secret")
    remote = TestClient(build_app(archive), client=REMOTE)
    assert (
        remote.get("/metrics", headers={"Authorization": "Bearer unit-secret"}).status_code == 200
    )
    assert remote.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401

    archive.settings = dataclasses.replace(archive.settings, metrics_enabled=False)
    assert TestClient(build_app(archive), client=LOCAL).get("/metrics").status_code == 404


def test_metrics_and_logging_settings(tmp_path: Path) -> None:
    (tmp_path / "server.toml").write_text(
        '[metrics]\nenabled = false\ntoken = "t0k"\n[logging]\nformat = "json"\n'
    )
    settings = load_settings(tmp_path, environ={})
    assert (settings.metrics_enabled, settings.metrics_token, settings.log_format) == (
        False,
        "t0k",
        "json",
    )
    assert load_settings(tmp_path, environ={"IMAGING_LOG_FORMAT": "text"}).log_format == "text"
    with pytest.raises(ConfigError, match="IMAGING_LOG_FORMAT"):
        load_settings(tmp_path, environ={"IMAGING_LOG_FORMAT": "xml"})
    (tmp_path / "server.toml").write_text('[logging]\nformat = "yaml"\n')
    with pytest.raises(ConfigError, match=r"server\.toml:2"):
        load_settings(tmp_path, environ={})


def test_json_log_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(LogContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.unit.json_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside %s", "anything")
        token = request_id_var.set("req_0123456789abcdef")
        try:
            logger.warning("in a request")
        finally:
            request_id_var.reset(token)
        token2 = association_var.set("CT1#abcdef")
        try:
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("on an association")
        finally:
            association_var.reset(token2)
    finally:
        logger.removeHandler(handler)
    outside, request, association = (json.loads(line) for line in stream.getvalue().splitlines())
    assert outside["message"] == "outside anything" and outside["level"] == "WARNING"
    assert outside["logger"] == "tests.unit.json_logs" and isinstance(outside["process"], int)
    assert "request_id" not in outside and "association" not in outside
    assert request["request_id"] == "req_0123456789abcdef"
    assert association["association"] == "CT1#abcdef"
    assert "ValueError: boom" in association["exc"]


class _Beat:
    def __init__(self, *args: object) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.mark.parametrize(
    ("analysis", "outcome"),
    [("ok", "completed"), ("crash", "error"), ("lost", "lost")],
)
def test_ai_worker_records_job_cpu_and_outcome(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, analysis: str, outcome: str
) -> None:
    from types import SimpleNamespace

    from server.ai import jobs, worker

    def analyse(job: jobs.Claimed, beat: object) -> tuple[dict[str, object], float, str]:
        sum(i * i for i in range(200_000))  # some CPU time
        if analysis == "crash":
            raise RuntimeError("model exploded")
        if analysis == "lost":
            raise worker.LostJob(job.id)
        return {}, 0.1, "cpu"

    monkeypatch.setattr(worker, "_Heartbeat", _Beat)
    monkeypatch.setattr(jobs, "complete", lambda *args, **kwargs: True)
    monkeypatch.setattr(jobs, "fail", lambda *args, **kwargs: None)
    ai = worker.Worker(archive, SimpleNamespace(name="fake", version="1", device="cpu"))
    monkeypatch.setattr(ai, "_analyse", analyse)
    count = _value("imaging_ai_job_cpu_seconds_count")
    cpu = _value("imaging_ai_job_cpu_seconds_sum")
    done = _value("imaging_ai_jobs_processed_total", outcome=outcome)
    gpu = _value("imaging_ai_job_gpu_seconds_count")
    ai.process(jobs.Claimed("analysis_x", "1.2.3", "1.2", None, 1, {}))
    assert _value("imaging_ai_job_cpu_seconds_count") == count + 1
    assert _value("imaging_ai_job_cpu_seconds_sum") > cpu
    assert _value("imaging_ai_jobs_processed_total", outcome=outcome) == done + 1
    assert _value("imaging_ai_job_gpu_seconds_count") == gpu  # no CUDA here


def test_inference_on_a_cuda_device_counts_gpu_seconds() -> None:
    """The worker reports its device as torch names it; only CUDA time is GPU time."""
    from server import metrics

    count = _value("imaging_ai_job_gpu_seconds_count")
    total = _value("imaging_ai_job_gpu_seconds_sum")
    metrics.inference_done(1.5, "cuda:0")
    metrics.inference_done(2.0, "cuda")
    metrics.inference_done(9.0, "cpu")
    assert _value("imaging_ai_job_gpu_seconds_count") == count + 2
    assert _value("imaging_ai_job_gpu_seconds_sum") == pytest.approx(total + 3.5)
