"""Two ``serve`` nodes on one PostgreSQL catalog and one shared storage folder behave as one
archive: what one stores the other finds, retrieves and moves; the same instance sent to both
at once is stored once, with no file left over."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.catalog_dump import dump, files_on_disk
from tests.dcmtk import findscu, getscu, movescu, storescu
from tests.helpers import ServerProcess, free_port, have, server_cli, storescp, write_config
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
