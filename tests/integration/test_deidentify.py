"""De-identified copies (PS3.15 basic profile) through the endpoint and the CLI: identity gone,
UIDs replaced consistently, private data removed, the object still valid (dciodvfy)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from tests.helpers import run, server_cli
from tools.generate import StudySpec, ct_series, write


def _study(tmp_path: Path) -> tuple[StudySpec, list[Path]]:
    spec = StudySpec(patient_id="REAL-ID-1", patient_name="REAL^PERSON", accession="ACC-REAL")
    files = []
    for ds in ct_series(spec, 3, 32):
        ds.InstitutionName = "SAINT EXAMPLE HOSPITAL"
        ds.OperatorsName = "TECH^TOM"
        ds.add_new(0x00091010, "LO", "private identifying note")
        ds.add_new(0x00090010, "LO", "ACME")
        files.append(write(ds, tmp_path / "src"))
    return spec, files


def test_endpoint_writes_a_deidentified_copy(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory()  # loopback: the local operator may do this without a token
    spec, files = _study(tmp_path)
    server.import_paths([tmp_path / "src"])
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        bad = client.post(f"/api/v1/studies/{spec.study_uid}/deidentify", json={"patient_id": ""})
        assert bad.status_code == 422
        missing = client.post(
            "/api/v1/studies/1.2.3.4/deidentify",
            json={"patient_id": "ANON-1", "patient_name": "ANON^ONE"},
        )
        assert missing.status_code == 404
        response = client.post(
            f"/api/v1/studies/{spec.study_uid}/deidentify",
            json={"patient_id": "ANON-1", "patient_name": "ANON^ONE"},
        )
        assert response.status_code == 201, response.text
        data = response.json()["data"]
        assert data["instances"] == 3 and data["study_uid"] != spec.study_uid
        copy = client.get(
            f"/dicom-web/studies/{data['study_uid']}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert copy.status_code == 200
    boundary = copy.headers["content-type"].split("boundary=")[1]
    parts = [
        p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
        for p in copy.content.split(f"--{boundary}".encode())[1:-1]
    ]
    datasets = [dcmread(io.BytesIO(p)) for p in parts]
    originals = {str(dcmread(f).InstanceNumber): dcmread(f) for f in files}
    frames = {str(d.FrameOfReferenceUID) for d in datasets}
    assert len(frames) == 1  # one original UID -> one replacement, across the copy
    for ds in datasets:
        original = originals[str(ds.InstanceNumber)]
        assert ds.PatientID == "ANON-1" and str(ds.PatientName) == "ANON^ONE"
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        for keyword in ("InstitutionName", "OperatorsName", "StudyDescription"):
            assert keyword not in ds, keyword
        assert ds.StudyDate == "" and ds.AccessionNumber == "" and ds.PatientBirthDate == ""
        assert 0x00091010 not in ds and 0x00090010 not in ds
        for uid in ("SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            assert ds[uid].value != original[uid].value
        assert ds.SOPClassUID == original.SOPClassUID
        assert ds.PixelData == original.PixelData
    if shutil.which("dciodvfy"):
        out_path = tmp_path / "copy.dcm"
        out_path.write_bytes(parts[0])

        def errors(path: Path) -> set[str]:
            result = run(["dciodvfy", "-new", str(path)])
            lines = (result.stdout + result.stderr).splitlines()
            return {line.split(" - ", 1)[-1] for line in lines if line.startswith("Error")}

        assert errors(out_path) <= errors(files[0])


def test_cli_deidentifies_too(tmp_path: Path, server_factory: Any) -> None:
    if not shutil.which("dcmdump"):
        pytest.skip("DCMTK is not installed")
    server = server_factory()
    spec, _ = _study(tmp_path)
    server.import_paths([tmp_path / "src"])
    result = server_cli(
        "deidentify",
        server.config_dir,
        server.data_dir,
        spec.study_uid,
        "--patient-id",
        "ANON-2",
        "--patient-name",
        "ANON^TWO",
    )
    assert result.returncode == 0, result.stderr
    assert "3 instances de-identified" in result.stdout
    found = httpx.get(f"{server.dicomweb}/studies", params={"PatientID": "ANON-2"}).json()
    assert len(found) == 1
