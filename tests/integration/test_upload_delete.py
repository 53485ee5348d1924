"""``POST /api/v1/images/upload`` (files and zips through the ingest path, followed to the end)
and recoverable ``DELETE /api/v1/images/{series_uid}`` with the ``deleted`` CLI."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from tests.helpers import (
    ServerProcess,
    catalog,
    cli,
    user_token,
)
from tools.generate import StudySpec, ct_series, small_instance, uid


@dataclass
class World:
    server: ServerProcess
    tokens: dict[str, str]

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.base_url,
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            timeout=60,
        )

    def cli(self, command: str, *args: str) -> str:
        return cli(self.server, command, *args)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"upload-{request.param}")
    with ExitStack() as stack:
        url = stack.enter_context(catalog(request.param))
        config = tmp / "config"
        config.mkdir()
        (config / "server.toml").write_text(
            "[http]\nauth_off_for_loopback = false\n[storage]\ndeleted_retention_days = 0\n"
        )
        (config / "peers.toml").write_text("")
        server = ServerProcess(tmp / "data", config, url).start()
        stack.callback(server.stop)
        world = World(
            server,
            {
                name: user_token(server, name, institution, role)
                for name, institution, role in (
                    ("tech-a", "HOSP-A", "technician"),
                    ("rad-a", "HOSP-A", "radiologist"),
                    ("admin-a", "HOSP-A", "admin"),
                    ("tech-b", "HOSP-B", "technician"),
                )
            },
        )
        yield world


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _wait(world: World, who: str, upload_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    with world.http(who) as client:
        while time.monotonic() < deadline:
            data = client.get(f"/api/v1/images/upload/{upload_id}").json()["data"]
            if data["processing_status"] not in ("receiving", "processing"):
                return dict(data)
            time.sleep(0.1)  # polling interval, not a wait for readiness
    raise AssertionError(f"upload {upload_id} still processing")


def test_upload_files_and_zip_with_overrides(world: World) -> None:
    spec = StudySpec(patient_id="ORIGINAL", patient_name="UP^LOAD")
    series = list(ct_series(spec, 5, 32))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for n, ds in enumerate(series[2:]):
            zf.writestr(f"study/series/IM{n}", _bytes(ds))
        zf.writestr("study/README.txt", b"not dicom")
        zf.writestr("DICOMDIR", b"skipped by name")
    files = [
        ("file", ("one.dcm", _bytes(series[0]), "application/dicom")),
        ("file", ("two.dcm", _bytes(series[1]), "application/dicom")),
        ("file", ("study.zip", archive.getvalue(), "application/zip")),
    ]
    metadata = (
        '{"patient_id": "OVERRIDDEN", "study_description": "MRI PROSTATE", '
        '"override_patient_info": true}'
    )
    with world.http("tech-a") as client:
        response = client.post("/api/v1/images/upload", files=files, data={"metadata": metadata})
    assert response.status_code == 202, response.text
    data = response.json()["data"]
    assert data["series_uid"] == series[0].SeriesInstanceUID
    assert data["processing_status"] == "processing" and data["upload_id"].startswith("upload_")
    assert data["estimated_completion"].endswith("Z")
    final = _wait(world, "tech-a", data["upload_id"])
    assert final["processing_status"] == "completed_with_errors"
    assert (final["stored"], final["failed"], final["files_found"]) == (5, 1, 6)
    assert final["errors"][0]["file"] == "study.zip:study/README.txt"
    assert final["series_uids"] == [series[0].SeriesInstanceUID]
    with world.http("rad-a") as client:
        images = client.get("/api/v1/images", params={"patient_id": "OVERRIDDEN"}).json()["data"]
        assert images["total_count"] == 1
        assert images["images"][0]["institution"] == "HOSP-A"
        detail = client.get(f"/api/v1/images/{series[0].SeriesInstanceUID}").json()["data"]
        assert detail["dicom_metadata"]["StudyDescription"] == "MRI PROSTATE"
    # Another institution cannot follow this upload.
    with world.http("tech-b") as client:
        assert client.get(f"/api/v1/images/upload/{data['upload_id']}").status_code == 404


def test_upload_refusals(world: World) -> None:
    one = ("file", ("x.dcm", _bytes(small_instance(StudySpec())), "application/dicom"))
    with world.http("rad-a") as client:
        denied = client.post("/api/v1/images/upload", files=[one])
        assert denied.status_code == 403
    with world.http("tech-a") as client:
        no_file = client.post("/api/v1/images/upload", files={"other": ("a.txt", b"x")})
        assert no_file.status_code == 422
        assert client.post("/api/v1/images/upload", data={"x": "1"}).status_code == 415
        assert (
            client.post(
                "/api/v1/images/upload", files=[one], data={"metadata": "{oops"}
            ).status_code
            == 422
        )
        assert client.post("/api/v1/images/upload", json={"file": "x"}).status_code == 415
        nothing = client.post(
            "/api/v1/images/upload", files=[("file", ("a.txt", b"hello", "text/plain"))]
        )
        assert nothing.status_code == 202
        assert (
            _wait(world, "tech-a", nothing.json()["data"]["upload_id"])["processing_status"]
            == "failed"
        )


def test_delete_restore_and_purge(world: World) -> None:
    spec = StudySpec(patient_id="DEL-1", patient_name="DELETE^ME")
    series_uid = uid()
    datasets = [small_instance(spec, series_uid, n) for n in (1, 2, 3)]
    with world.http("tech-a") as client:
        upload = client.post(
            "/api/v1/images/upload",
            files=[
                ("file", (f"{n}.dcm", _bytes(d), "application/dicom"))
                for n, d in enumerate(datasets)
            ],
        ).json()["data"]
    assert _wait(world, "tech-a", upload["upload_id"])["stored"] == 3
    with world.http("rad-a") as client:
        assert client.delete(f"/api/v1/images/{series_uid}").status_code == 403
    with world.http("admin-a") as client:
        response = client.delete(f"/api/v1/images/{series_uid}")
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert data["deleted"] is True and data["series_uid"] == series_uid
        assert data["backup_location"].startswith("deleted/")
        assert data["retention_until"].endswith("Z")
        backup = world.server.data_dir / data["backup_location"]
        assert len(list(backup.glob("*.dcm"))) == 3 and (backup / "manifest.json").is_file()
        assert client.get(f"/api/v1/images/{series_uid}").status_code == 404
        assert client.get(f"/dicom-web/studies/{spec.study_uid}/metadata").status_code == 404
        assert client.delete(f"/api/v1/images/{series_uid}").status_code == 404
    assert series_uid in world.cli("deleted", "list")
    assert "restored 3 instances" in world.cli("deleted", "restore", series_uid)
    with world.http("admin-a") as client:
        restored = client.get(f"/api/v1/images/{series_uid}").json()["data"]
        assert restored["institution"] == "HOSP-A" and restored["number_of_instances"] == 3
        again = client.delete(f"/api/v1/images/{series_uid}").json()["data"]
    # Retention is 0 days in this configuration: purge removes the files at once.
    assert "purged 1 series" in world.cli("deleted", "purge")
    assert not (world.server.data_dir / again["backup_location"]).exists()
    assert series_uid not in world.cli("deleted", "list")
