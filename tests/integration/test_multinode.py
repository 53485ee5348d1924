"""Two ``serve`` nodes on one PostgreSQL catalog and one shared storage folder behave as one
archive: what one stores the other finds, retrieves and moves; the same instance sent to both
at once is stored once, with no file left over."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.catalog_dump import dump, files_on_disk
from tests.dcmtk import findscu, getscu, movescu, storescu
from tests.helpers import (
    ServerProcess,
    free_port,
    have,
    server_cli,
    storescp,
    wait_for,
    write_config,
)
from tools.generate import StudySpec, ct_series, write
from tools.procs import stow_body

pytestmark = [pytest.mark.postgres, pytest.mark.dcmtk, pytest.mark.slow]


def _stow(base_url: str, files: list[Path]) -> httpx.Response:
    body, content_type = stow_body(p.read_bytes() for p in files)
    return httpx.post(
        f"{base_url}/dicom-web/studies",
        content=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
        timeout=60,
    )


def test_two_nodes_one_archive(pg_url: str, tmp_path: Path) -> None:
    if not have("storescu"):
        pytest.skip("DCMTK is not installed")
    move_port = free_port()
    config = write_config(tmp_path / "cfg", peers=[("STORESCP", move_port)])
    shared = tmp_path / "shared"  # the folder both nodes store into (NFS in a deployment)
    a = ServerProcess(shared, config, database_url=pg_url).start()
    b = ServerProcess(shared, config, database_url=pg_url).start()
    try:
        # stored through A ...
        series_a = tmp_path / "a"
        for ds in ct_series(StudySpec(patient_id="NODEA"), 12, 64):
            write(ds, series_a)
        storescu(a.port, sorted(series_a.iterdir()))
        study_a = str(dcmread(next(series_a.iterdir())).StudyInstanceUID)
        # ... is found through B (C-FIND and QIDO) ...
        rsps, _ = findscu(b.port, "STUDY", {"StudyInstanceUID": study_a, "PatientID": ""})
        assert [r.PatientID for r in rsps] == ["NODEA"]
        qido = httpx.get(f"{b.base_url}/dicom-web/studies", params={"PatientID": "NODEA"})
        assert qido.status_code == 200 and len(qido.json()) == 1
        # ... retrieved through B (C-GET and WADO-RS metadata) ...
        got = tmp_path / "got"
        getscu(b.port, study_a, got)
        assert len(list(got.iterdir())) == 12
        meta = httpx.get(f"{b.base_url}/dicom-web/studies/{study_a}/metadata")
        assert meta.status_code == 200 and len(meta.json()) == 12
        # ... and moved through B
        received = tmp_path / "moved"
        with storescp(received, port=move_port):
            movescu(
                b.port, "STORESCP", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_a}
            )
        assert len(list(received.iterdir())) == 12

        # STOW through B is found by C-FIND through A
        series_b = tmp_path / "b"
        for ds in ct_series(StudySpec(patient_id="NODEB"), 5, 64):
            write(ds, series_b)
        assert _stow(b.base_url, sorted(series_b.iterdir())).status_code == 200
        rsps, _ = findscu(
            a.port, "STUDY", {"PatientID": "NODEB", "NumberOfStudyRelatedInstances": ""}
        )
        assert [int(r.NumberOfStudyRelatedInstances) for r in rsps] == [5]

        # the same instances sent to both nodes at the same moment: stored once each
        same = tmp_path / "same"
        for ds in ct_series(StudySpec(patient_id="BOTH"), 40, 64):
            write(ds, same)
        files = sorted(same.iterdir())
        errors: list[BaseException] = []

        def send(port: int) -> None:
            try:
                storescu(port, files)
            except BaseException as exc:  # reported below
                errors.append(exc)

        senders = [threading.Thread(target=send, args=(node.port,)) for node in (a, b)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(300)
        assert errors == []
        rsps, _ = findscu(
            a.port, "STUDY", {"PatientID": "BOTH", "NumberOfStudyRelatedInstances": ""}
        )
        assert [int(r.NumberOfStudyRelatedInstances) for r in rsps] == [40]
    finally:
        a.stop()
        b.stop()

    catalog = dump(shared, pg_url)
    assert len(catalog["Instance"]) == 12 + 5 + 40
    assert catalog["paths"] == files_on_disk(shared), "no orphan file, no row without a file"
    check = server_cli("check", config, shared, "--json", "--deep", database_url=pg_url)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["problems"] == {}


def test_second_node_does_not_recover_under_a_live_one(pg_url: str, tmp_path: Path) -> None:
    """Start-up recovery deletes unreferenced journal entries; a node starting beside a running
    one must leave the other's in-flight writes alone (the writers lock decides)."""
    config = write_config(tmp_path / "cfg")
    shared = tmp_path / "shared"
    a = ServerProcess(shared, config, database_url=pg_url).start()
    try:
        in_flight = shared / "tmp" / ("ab" * 32 + ".cafe.part")
        in_flight.write_bytes(b"a write node A has not committed yet")
        b = ServerProcess(shared, config, database_url=pg_url).start()
        b.stop()
        assert in_flight.exists()
        in_flight.unlink()
    finally:
        a.stop()


def test_ai_trigger_across_two_nodes(pg_url: str, tmp_path: Path) -> None:
    """A series whose first half arrives through node A and second half through node B is
    analysed once: both nodes' workers watch the same catalog, both see the series become
    stable, one job is created for its complete version and one worker runs it; the SEG and SR
    it stores are found through either node."""
    if not have("storescu"):
        pytest.skip("DCMTK is not installed")
    from tests.integration.test_ai_loop import _analyses, _derived, _instance
    from tools.phantom import make_phantom, write_series

    phantom = make_phantom(515151, n_lesions=1)
    files = write_series(phantom, tmp_path / "mr", patient_id="AI-TWO-NODES", shuffle=True)
    # stable_age 4: the two halves are sent well within it, so no half series is analysed.
    toml = '[ae]\ntitle = "IMAGING"\n[ai]\nstable_age = 4\npoll_interval = 0.2\nlease = 30\n'
    config = write_config(tmp_path / "cfg", server=toml)
    shared = tmp_path / "shared"
    env = {"IMAGING_AI_ENABLED": "true"}
    a = ServerProcess(shared, config, database_url=pg_url, env=env).start()
    b = ServerProcess(shared, config, database_url=pg_url, env=env).start()
    try:
        # Both workers running before anything arrives, so both triggers look at the series.
        for node in (a, b):
            wait_for(lambda node=node: "AI worker" in node.log_text(), "an AI worker on each node")
        header = dcmread(files[0], stop_before_pixels=True)
        study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
        half = len(files) // 2
        storescu(a.port, files[:half])
        storescu(b.port, files[half:])
        with httpx.Client(base_url=b.base_url, timeout=60) as http_b:
            job = wait_for(
                lambda: (j := _analyses(http_b, series)) and j[-1]["status"] == "completed" and j,
                "the analysis to complete",
            )
            assert len(job) == 1 and job[0]["attempts"] == 1
            assert job[0]["trigger"] == "stable_series"
        with httpx.Client(base_url=a.base_url, timeout=60) as http_a:
            # Still one job after both workers have scanned many times since it completed.
            assert len(_analyses(http_a, series)) == 1
            derived = _derived(http_a, series)
            assert sorted(d["00080060"]["Value"][0] for d in derived) == ["SEG", "SR"]
            assert all(d["00201209"]["Value"][0] == 1 for d in derived)  # one instance each
            seg_series = next(
                d["0020000E"]["Value"][0] for d in derived if d["00080060"]["Value"][0] == "SEG"
            )
            seg = dcmread(io.BytesIO(_instance(http_a, study, seg_series)))
        # The job saw the complete series: the SEG refers to every slice, from both nodes.
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        }
        assert referenced == {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files
        }
    finally:
        a.stop()
        b.stop()
