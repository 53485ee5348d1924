"""The AI loop end to end, with the shipped model: a phantom prostate MR series sent with
storescu becomes stable, a worker analyses it, and its SEG and SR come back through QIDO, C-FIND
and the JSON API, valid (dciodvfy) and measuring what the phantom holds.  Also: a worker killed
mid-job (the job completes once on restart), a series the rules don't select (no job), and the
on-demand API with its report and WebSocket progress."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import orjson
import pytest
from pydicom import dcmread
from websockets.sync.client import connect

from tests.dcmtk import findscu, storescu
from tests.helpers import (
    ROOT,
    ServerProcess,
    have,
    tenant_config,
    tenant_tokens,
    wait_for,
    write_config,
)
from tools.generate import StudySpec, ct_series, write
from tools.phantom import Phantom, make_phantom, write_series

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]
# stable_age 3: storescu sends a series in well under that, even on a busy machine, so a
# series is never analysed half-sent.
AI_TOML = '[ae]\ntitle = "IMAGING"\n[ai]\nstable_age = 3\npoll_interval = 0.2\nlease = 20\n'
SEED = 424242  # far from the training seeds (tools/train_prostate.py)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(SEED, n_lesions=1)


@pytest.fixture
def series_files(phantom: Phantom, tmp_path: Path) -> list[Path]:
    return write_series(phantom, tmp_path / "mr", patient_id="AI-PAT-1", shuffle=True)


def _start(tmp: Path, database_url: str = "", **env: str) -> ServerProcess:
    if not have("storescu"):
        pytest.skip("DCMTK is not installed (tools/test installs it when run as root)")
    config = write_config(tmp / "config", server=AI_TOML)
    server = ServerProcess(
        tmp / "data", config, database_url, env={"IMAGING_AI_ENABLED": "true", **env}
    )
    return server.start()


@pytest.fixture
def server(tmp_path: Path, database_url: str) -> Iterator[ServerProcess]:
    proc = _start(tmp_path, database_url)
    yield proc
    proc.stop()


def _derived(http: httpx.Client, series_uid: str) -> list[dict[str, Any]]:
    response = http.get(
        "/dicom-web/series",
        params={"ReferencedSeriesSequence.SeriesInstanceUID": series_uid},
    )
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else []


def _analyses(http: httpx.Client, series_uid: str) -> list[dict[str, Any]]:
    response = http.get("/api/v1/ai/analyze", params={"series_uid": series_uid})
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()["data"]["analyses"]
    return result


def _instance(http: httpx.Client, study: str, series: str) -> bytes:
    listing = http.get(f"/dicom-web/studies/{study}/series/{series}/instances").json()
    sop = listing[0]["00080018"]["Value"][0]
    response = http.get(
        f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert response.status_code == 200
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    part = response.content.split(b"--" + boundary.encode())[1]
    body = part.split(b"\r\n\r\n", 1)[1]
    return body[:-2] if body.endswith(b"\r\n") else body


def _dciodvfy_errors(data: bytes, tmp: Path) -> list[str]:
    path = tmp / "check.dcm"
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_stable_series_is_analysed_and_results_are_archived(
    server: ServerProcess, series_files: list[Path], phantom: Phantom, tmp_path: Path
) -> None:
    header = dcmread(series_files[0], stop_before_pixels=True)
    study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    ct_dir = tmp_path / "ct"
    for ds in ct_series(StudySpec(patient_id="AI-CT-1"), 12, 64):
        write(ds, ct_dir)
    storescu(server.port, [*series_files, *sorted(ct_dir.iterdir())])
    sent = time.monotonic()
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        # The SEG and SR are stored before the job is marked completed: wait for the job.
        job = wait_for(
            lambda: (j := _analyses(http, series)) and j[-1]["status"] == "completed" and j[-1],
            "the analysis to complete",
        )
        derived = _derived(http, series)
        latency = time.monotonic() - sent
        modalities = sorted(d["00080060"]["Value"][0] for d in derived)
        assert modalities == ["SEG", "SR"]
        # C-FIND finds them like any other series.
        found, _ = findscu(server.port, "SERIES", {"StudyInstanceUID": study, "Modality": "SEG"})
        assert len(found) == 1
        by_modality = {d["00080060"]["Value"][0]: d["0020000E"]["Value"][0] for d in derived}
        seg_bytes = _instance(http, study, by_modality["SEG"])
        sr_bytes = _instance(http, study, by_modality["SR"])
        if shutil.which("dciodvfy"):
            assert _dciodvfy_errors(seg_bytes, tmp_path) == []
            assert _dciodvfy_errors(sr_bytes, tmp_path) == []
        # The SEG over the source slices, in position order, matches the phantom.
        seg = hd.seg.Segmentation.from_dataset(dcmread(io.BytesIO(seg_bytes)))
        order = sorted(
            (dcmread(p, stop_before_pixels=True) for p in series_files),
            key=lambda d: float(d.ImagePositionPatient[2]),
        )
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(d.SOPInstanceUID) for d in order],
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )
        assert _dice(pixels[..., 0] != 0, phantom.labels > 0) >= 0.9
        # The job, found from the series; measurements within 10% of the phantom's truth.
        assert len(_analyses(http, series)) == 1
        assert job["trigger"] == "stable_series" and job["attempts"] == 1
        metrics = job["results"]["metrics"]
        truth_ml = float((phantom.labels > 0).sum() * np.prod(phantom.spacing) / 1000)
        assert metrics["prostate_volume_ml"] == pytest.approx(truth_ml, rel=0.1)
        lesions = [s for s in job["results"]["segmentations"] if s["region_type"] == "lesion"]
        assert len(lesions) >= 1
        assert lesions[0]["anatomical_location"].startswith(phantom.lesions[0].zone)
        # The image detail names its derived objects; the CT series got no job.
        detail = http.get(f"/api/v1/images/{series}").json()["data"]
        assert sorted(d["modality"] for d in detail["derived_objects"]) == ["SEG", "SR"]
        ct_series_uid = dcmread(next(ct_dir.iterdir()), stop_before_pixels=True).SeriesInstanceUID
        assert _analyses(http, str(ct_series_uid)) == []
    print(
        f"\nAI loop: last C-STORE -> SEG queryable {latency:.1f} s, "
        f"inference {job['inference_seconds']:.2f} s on {job['device']}"
    )


@pytest.mark.parametrize("pause_at", ["inferred", "seg_stored"])
def test_worker_killed_mid_job_completes_once_on_restart(
    tmp_path: Path, series_files: list[Path], pause_at: str
) -> None:
    """Killed after inference (nothing stored yet) or between storing the SEG and the SR."""
    pause = tmp_path / "paused"
    server = _start(tmp_path, IMAGING_AI_WORKERS="0")
    env = {**os.environ, "IMAGING_AI_ENABLED": "true", "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "server",
        "--config",
        str(server.config_dir),
        "worker",
        "--data-dir",
        str(server.data_dir),
    ]
    try:
        first = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**env, "IMAGING_AI_PAUSE_FILE": str(pause), "IMAGING_AI_PAUSE_AT": pause_at},
        )
        storescu(server.port, series_files)
        series = str(dcmread(series_files[0], stop_before_pixels=True).SeriesInstanceUID)
        wait_for(pause.exists, "the worker to reach its pause point")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = subprocess.Popen(argv, cwd=ROOT, env=env)
        try:
            with httpx.Client(base_url=server.base_url, timeout=60) as http:
                job = wait_for(
                    lambda: (
                        (j := _analyses(http, series)) and j[0]["status"] == "completed" and j[0]
                    ),
                    "the job to complete on the second worker",
                )
                assert job["attempts"] == 2
                derived = _derived(http, series)
                assert sorted(d["00080060"]["Value"][0] for d in derived) == ["SEG", "SR"]
                assert all(d["00201209"]["Value"][0] == 1 for d in derived)  # one instance each
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        server.stop()


def test_on_demand_analysis_with_report_and_progress_events(
    tmp_path: Path, series_files: list[Path]
) -> None:
    server = _start(tmp_path, IMAGING_AI_STABLE_AGE="3600")  # nothing automatic here
    try:
        _on_demand(server, series_files)
    finally:
        server.stop()


def _on_demand(server: ServerProcess, series_files: list[Path]) -> None:
    storescu(server.port, series_files)
    series = str(dcmread(series_files[0], stop_before_pixels=True).SeriesInstanceUID)
    ws_url = server.base_url.replace("http://", "ws://") + "/ws/v1"
    with httpx.Client(base_url=server.base_url, timeout=60) as http, connect(ws_url) as ws:
        ws.send(orjson.dumps({"action": "subscribe", "events": ["ai_analysis_progress"]}).decode())
        assert orjson.loads(ws.recv(10))["event"] == "subscribed"
        bad = http.post(
            "/api/v1/ai/analyze", json={"series_uid": series, "config": {"confidence_threshold": 3}}
        )
        assert bad.status_code == 422
        assert "config.confidence_threshold" in bad.json()["error"]["details"]["fields"]
        missing = http.post("/api/v1/ai/analyze", json={"series_uid": "1.2.3.999"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "MEDICAL_IMAGE_NOT_FOUND"
        assert http.get("/api/v1/ai/analyze/analysis_000000").status_code == 404
        ct_dir = series_files[0].parent.parent / "ct-demand"
        for ds in ct_series(StudySpec(patient_id="AI-CT-2"), 4, 32):
            write(ds, ct_dir)
        storescu(server.port, sorted(ct_dir.iterdir()))
        ct = dcmread(next(ct_dir.iterdir()), stop_before_pixels=True).SeriesInstanceUID
        refused = http.post("/api/v1/ai/analyze", json={"series_uid": str(ct)})
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "SERIES_NOT_ANALYSABLE"
        started = http.post(
            "/api/v1/ai/analyze",
            json={
                "series_uid": series,
                "analysis_type": "prostate_comprehensive",
                "config": {
                    "confidence_threshold": 0.5,
                    "target_regions": ["prostate", "lesions"],
                    "include_pi_rads": True,
                    "generate_report": True,
                    "psa_ng_ml": 6.4,
                },
            },
        )
        assert started.status_code == 202, started.text
        data = started.json()["data"]
        analysis = data["analysis_id"]
        assert data["progress_url"] == f"/api/v1/ai/analyze/{analysis}/progress"
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            message = orjson.loads(ws.recv(180))
            if message["data"].get("analysis_id") == analysis:
                seen.append(message["data"])
                if message["data"]["status"] in ("completed", "failed"):
                    break
        assert seen and seen[-1]["status"] == "completed", seen
        steps = {m.get("current_step") for m in seen}
        assert "Segmenting prostate gland, zones and lesions" in steps
        progress = [m["progress"] for m in seen]
        assert progress == sorted(progress) and progress[-1] == 100
        result = http.get(f"/api/v1/ai/analyze/{analysis}").json()["data"]
        assert result["status"] == "completed" and result["completed_at"]
        regions = {s["region_type"] for s in result["results"]["segmentations"]}
        assert regions == {"prostate", "lesion"}  # the requested regions only
        for item in result["results"]["segmentations"]:
            assert item["volume_ml"] > 0 and 0 <= item["confidence"] <= 1
            assert len(item["bounding_box"]["min"]) == 3
        metrics = result["results"]["metrics"]
        assert metrics["prostate_psa_density"] == pytest.approx(
            6.4 / metrics["prostate_volume_ml"], rel=0.01
        )
        report = result["results"]["report"]
        assert report is not None
        pdf = http.get(report["pdf_url"])
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")


def test_analyses_are_confined_to_the_institution_and_need_the_permission(
    tmp_path: Path, series_files: list[Path]
) -> None:
    """Tokens required on loopback; the series belongs to HOSP-A (sent by its modality MOD_A).
    No worker runs here: queued analyses are enough to see who may see them."""
    if not have("storescu"):
        pytest.skip("DCMTK is not installed (tools/test installs it when run as root)")
    config = tenant_config(tmp_path / "config", "[ai]\nworkers = 0\n")
    server = ServerProcess(tmp_path / "data", config, env={"IMAGING_AI_ENABLED": "true"}).start()
    try:
        storescu(server.port, series_files, "-aet", "MOD_A")
        series = str(dcmread(series_files[0], stop_before_pixels=True).SeriesInstanceUID)
        tokens = tenant_tokens(server)
        own, other, viewer = tokens["rad-a"], tokens["rad-b"], tokens["viewer-a"]
        with httpx.Client(base_url=server.base_url, timeout=60) as http:

            def call(method: str, path: str, token: str | None, **kw: Any) -> httpx.Response:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                return http.request(method, path, headers=headers, **kw)

            body = {"series_uid": series}
            assert call("POST", "/api/v1/ai/analyze", None, json=body).status_code == 401
            denied = call("POST", "/api/v1/ai/analyze", viewer, json=body)
            assert denied.status_code == 403
            assert denied.json()["error"]["code"] == "PERMISSION_DENIED"
            assert call("POST", "/api/v1/ai/analyze", other, json=body).status_code == 404
            started = call("POST", "/api/v1/ai/analyze", own, json=body)
            assert started.status_code == 202, started.text
            analysis = started.json()["data"]["analysis_id"]
            assert (
                call("GET", f"/api/v1/ai/analyze/{analysis}", own).json()["data"]["status"]
                == "queued"
            )
            assert call("GET", f"/api/v1/ai/analyze/{analysis}", other).status_code == 404
            listed = call("GET", "/api/v1/ai/analyze", other, params={"series_uid": series})
            assert listed.json()["data"]["analyses"] == []
    finally:
        server.stop()
