"""``GET /metrics`` and JSON logs against a running ``serve`` with two worker processes.

A scrape reaches one worker; the counters it shows must be those of every process (the
multiprocess directory ``serve`` shares with its children), which the per-process files in that
directory let us check directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
)

from tests.helpers import ServerProcess, part10, store_as, study_find, user_token, write_config
from tools.generate import StudySpec, ct_series, small_instance
from tools.procs import stow_body

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(base_url: str, token: str | None = None) -> Samples:
    """One scrape on a fresh connection (so any worker may answer it)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def poll(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)  # poll interval


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def metrics_dir(server: ServerProcess) -> Path:
    assert server.proc is not None
    found = list(Path(tempfile.gettempdir()).glob(f"imaging-metrics-{server.proc.pid}-*"))
    assert len(found) == 1, found
    return found[0]


def per_process(directory: Path) -> dict[int, Samples]:
    """Each process's own values, read from its files alone."""
    pids = {
        int(m.group(1)) for f in directory.glob("*.db") if (m := re.search(r"_(\d+)\.db$", f.name))
    }
    out: dict[int, Samples] = {}
    for pid in pids:
        with tempfile.TemporaryDirectory() as tmp:
            for f in directory.glob(f"*_{pid}.db"):
                shutil.copy(f, tmp)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, tmp)
            out[pid] = _parse(generate_latest(registry).decode())
    return out


_multipart = stow_body


def _find(port: int, patient_id: str) -> int:
    return study_find(port, patient_id, "METRICSFIND")[2]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("metrics")
    config = write_config(root / "config", server='[ae]\ntitle = "IMAGING"\nworkers = 2\n')
    server = ServerProcess(root / "data", config, env={"IMAGING_LOG_FORMAT": "json"})
    server.start()
    try:
        # start() returns when one worker answers; the other may still be starting.
        poll(
            lambda: value(scrape(server.base_url), "imaging_processes", kind="server") == 2,
            "both worker processes up",
            60,
        )
        yield server
    finally:
        server.stop()


def test_counters_and_histograms_move_and_add_up_over_workers(served: ServerProcess) -> None:
    base = served.base_url
    before = scrape(base)
    assert value(before, "imaging_processes", kind="server") == 2
    assert value(before, "imaging_dimse_associations_active") == 0
    version = [k for k in before if k[0] == "imaging_build_info"]
    assert version and dict(version[0][1])["version"]
    assert ("imaging_ai_jobs", (("status", "queued"),)) in before

    # 3 instances by C-STORE on one association, 2 by STOW-RS and one of them again.
    spec = StudySpec(patient_id="METRICS-P1", patient_name="METRIC^ONE")
    cts = list(ct_series(spec, 3, 32))
    store_as(served.port, "METRICS1", cts)
    parts = [part10(small_instance(spec, number=n)) for n in (1, 2)]
    for sent in (parts, parts[:1]):
        body, content_type = _multipart(sent)
        stow = httpx.post(
            f"{served.dicomweb}/studies",
            content=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            timeout=60,
        )
        assert stow.status_code == 200, stow.text
    for _ in range(4):
        qido = httpx.get(f"{served.dicomweb}/studies", params={"PatientID": "METRICS-P1"})
        assert qido.status_code == 200 and len(qido.json()) == 1
    assert _find(served.port, "METRICS-P1") == 1

    # The server counts an association when its thread has seen the release.
    poll(
        lambda: (
            value(scrape(base), "imaging_dimse_associations_total", outcome="released")
            >= value(before, "imaging_dimse_associations_total", outcome="released") + 2
        ),
        "two associations released",
    )
    after = scrape(base)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    received = "imaging_instances_received_total"
    assert delta(received, source="dimse", outcome="stored") == 3
    assert delta(received, source="stow", outcome="stored") == 2
    assert delta(received, source="stow", outcome="duplicate") == 1
    assert delta(received, source="stow", outcome="failed") == 0
    # C-STORE: what ingest received is what was stored (Part 10 as received).
    stored_sizes = 0
    for ds in cts:
        key = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()
        files = list((served.data_dir / "instances").rglob(f"{key}.*"))
        assert len(files) == 1
        stored_sizes += files[0].stat().st_size
    assert delta("imaging_received_bytes_total", source="dimse") == stored_sizes
    assert delta("imaging_received_bytes_total", source="stow") == 2 * len(parts[0]) + len(parts[1])
    assert delta("imaging_qido_duration_seconds_count", level="study") == 4
    assert delta("imaging_qido_duration_seconds_sum", level="study") > 0
    http = "imaging_http_request_duration_seconds_count"
    assert delta(http, method="GET", route="/dicom-web/studies", status="200") == 4
    assert delta(http, method="POST", route="/dicom-web/studies", status="200") == 2
    assert delta("imaging_dimse_find_duration_seconds_count", model="query_retrieve") == 1
    assert delta("imaging_dimse_associations_total", outcome="released") == 2
    assert value(after, "imaging_dimse_associations_active") == 0
    # Never a raw path (UIDs, patient data) as a label.
    routes = {v for _, labels in after for k, v in labels if k == "route"}
    assert not [r for r in routes if re.search(r"\d+\.\d+\.\d+", r)], routes

    # Each scrape, whichever worker answers it, counts every earlier scrape of every worker.
    route = {"method": "GET", "route": "/metrics", "status": "200"}
    counts = [value(scrape(base), http, **route) for _ in range(6)]
    assert counts == [counts[0] + n for n in range(6)]

    # Both workers served requests, and /metrics shows the sum of their own files.
    directory = metrics_dir(served)
    health = {"method": "GET", "route": "/health", "status": "200"}

    def workers_with_requests() -> int:
        httpx.get(f"{base}/health")
        return sum(1 for s in per_process(directory).values() if value(s, http, **health) > 0)

    poll(lambda: workers_with_requests() >= 2, "both workers answered /health", 60)
    total = value(scrape(base), http, **health)
    assert total == sum(value(s, http, **health) for s in per_process(directory).values())
    instances = sum(
        value(s, received, source="dimse", outcome="stored")
        for s in per_process(directory).values()
    )
    assert instances == value(after, received, source="dimse", outcome="stored")


def test_a_dead_worker_leaves_its_counters_but_not_its_gauges(served: ServerProcess) -> None:
    assert served.proc is not None
    parent = served.proc.pid
    before = scrape(served.base_url)
    workers = _children(parent)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    poll(
        lambda: len(_children(parent)) == 2 and workers[0] not in _children(parent),
        "the supervisor restarted the worker",
        60,
    )
    # The new worker counts itself once its HTTP side runs; the dead one is out of the sum.
    (new,) = set(_children(parent)) - set(workers)
    directory = metrics_dir(served)
    poll(
        lambda: value(per_process(directory).get(new, {}), "imaging_processes", kind="server") == 1,
        "the new worker counted itself",
        60,
    )
    assert not list(directory.glob(f"gauge_livesum_{workers[0]}.db"))
    assert value(scrape(served.base_url), "imaging_processes", kind="server") == 2
    after = scrape(served.base_url)
    name = "imaging_instances_received_total"
    for outcome in ("stored", "duplicate"):
        for source in ("dimse", "stow"):
            assert value(after, name, source=source, outcome=outcome) == value(
                before, name, source=source, outcome=outcome
            )


def _log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_json_logs_carry_request_and_association_ids(served: ServerProcess) -> None:
    # A STOW-RS part of another study is refused, with a warning in the log.
    spec = StudySpec(patient_id="METRICS-LOG")
    body, content_type = _multipart([part10(small_instance(spec))])
    response = httpx.post(
        f"{served.dicomweb}/studies/1.2.826.0.1.3680043.2.1125.1",
        content=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
        timeout=60,
    )
    assert response.status_code == 409
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("req_")

    # A caller's own id is kept (and DICOMweb answers carry it as the JSON API's do).
    traced = httpx.get(f"{served.dicomweb}/studies", headers={"X-Request-ID": "trace-metrics-7"})
    assert traced.headers["x-request-id"] == "trace-metrics-7"

    # A C-STORE without a Study Instance UID is refused on an association.
    broken = small_instance(spec)
    del broken.StudyInstanceUID
    ae = AE(ae_title="LOGGER1")
    ae.add_requested_context(broken.SOPClassUID, "1.2.840.10008.1.2.1")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", served.port, ae_title="IMAGING")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(broken).Status != 0
    finally:
        assoc.release()

    def found() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        lines = _log_lines(served)
        stow = next((e for e in lines if e.get("request_id") == request_id), None)
        store = next((e for e in lines if "C-STORE from LOGGER1" in e["message"]), None)
        return stow, store

    poll(lambda: all(found()), "both warnings logged")
    stow, store = found()
    assert stow is not None and store is not None
    assert stow["level"] == "WARNING"
    assert stow["logger"] == "server.web.dicomweb.stow"
    assert "refused" in stow["message"]
    assert "association" not in stow
    assert re.fullmatch(r"LOGGER1#[0-9a-f]{6}", store["association"])
    assert "request_id" not in store
    assert served.proc is not None
    for entry in (stow, store):
        assert entry["process"] != served.proc.pid  # logged by a worker process
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["ts"])
    # Every log record is JSON: no line in the text format from any process or library.
    text_record = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
    assert not [line for line in served.log().splitlines() if text_record.match(line)]
    for entry in _log_lines(served):
        assert {"ts", "level", "logger", "message", "process"} <= entry.keys()


def test_metrics_need_credentials_when_auth_is_on(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config",
        server=(
            '[ae]\ntitle = "IMAGING"\nworkers = 1\n[http]\nauth_off_for_loopback = false\n'
            '[metrics]\ntoken = "scrape-secret-42"\n'
        ),
    )
    server = ServerProcess(tmp_path / "data", config).start()
    try:
        url = f"{server.base_url}/metrics"
        anonymous = httpx.get(url)
        assert anonymous.status_code == 401
        assert "imaging_" not in anonymous.text
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        samples = scrape(server.base_url, "scrape-secret-42")
        assert value(samples, "imaging_processes", kind="server") == 1
        viewer = user_token(server, "watcher", "HOSP-A", "viewer")
        denied = httpx.get(url, headers={"Authorization": f"Bearer {viewer}"})
        assert denied.status_code == 403
        admin = user_token(server, "operator", "HOSP-A", "admin")
        assert scrape(server.base_url, admin)
    finally:
        server.stop()
