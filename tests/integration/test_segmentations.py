"""``/api/v1/segmentations``: a mask becomes a DICOM SEG in the archive (valid per dciodvfy,
readable back with highdicom), with measurements, validation and tenant isolation."""

from __future__ import annotations

import base64
import io
import shutil
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pytest
from pydicom import dcmread

from tests.helpers import ServerProcess, run, store_as, tenant_config, tenant_tokens
from tools.generate import StudySpec, ct_series

SLICES, SIZE = 12, 32


@dataclass
class World:
    server: ServerProcess
    series_uid: str
    study_uid: str
    tokens: dict[str, str]

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.base_url,
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            timeout=60,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("segmentations")
    config = tenant_config(tmp / "config")
    with ExitStack() as stack:
        server = ServerProcess(tmp / "data", config).start()
        stack.callback(server.stop)
        tokens = tenant_tokens(server)
        spec = StudySpec(patient_id="SEG-P1", patient_name="SEG^PATIENT")
        datasets = list(ct_series(spec, SLICES, SIZE))
        # sent in reverse order: the API orders slices by position, not by arrival
        store_as(server.port, "MOD_A", list(reversed(datasets)))
        yield World(server, str(datasets[0].SeriesInstanceUID), spec.study_uid, tokens)


def _ball() -> np.ndarray:
    z, y, x = np.mgrid[0:SLICES, 0:SIZE, 0:SIZE].astype(float)
    # spacing: 1.0 mm between slices, 0.7 mm in-plane; a 4 mm ball around the centre
    inside = ((z - 6) * 1.0) ** 2 + ((y - 16) * 0.7) ** 2 + ((x - 16) * 0.7) ** 2 < 16
    return inside.astype(np.uint8)


def _encoded(mask: np.ndarray, compress: bool = True) -> str:
    raw = mask.astype(np.uint8).tobytes()
    return base64.b64encode(zlib.compress(raw) if compress else raw).decode()


def test_create_stores_a_valid_seg_with_measurements(world: World, tmp_path: Path) -> None:
    mask = _ball()
    body = {
        "image_uid": world.series_uid,
        "region_type": "lesion",
        "creation_method": "manual",
        "mask_data": _encoded(mask),
        "metadata": {
            "anatomical_location": "peripheral_zone_right_apex",
            "pi_rads_assessment": 3,
            "radiologist_notes": "Hyperintense focus on T2W",
        },
    }
    with world.http("rad-a") as client:
        response = client.post("/api/v1/segmentations", json=body)
        assert response.status_code == 201, response.text
        seg = response.json()["data"]
        voxels = int(mask.sum())
        assert seg["voxel_count"] == voxels
        assert seg["volume_ml"] == pytest.approx(voxels * 0.7 * 0.7 * 1.0 / 1000, rel=1e-3)
        assert 0.8 < seg["sphericity"] <= 1.05
        assert seg["surface_area_mm2"] > 0
        assert seg["pi_rads_score"] == 3 and seg["validated"] is False
        assert seg["anatomical_location"] == "peripheral_zone_right_apex"
        # The SEG is in the archive, found like any other object.
        series = client.get(
            f"/dicom-web/studies/{world.study_uid}/series", params={"Modality": "SEG"}
        ).json()
        assert len(series) == 1
        seg_series = series[0]["0020000E"]["Value"][0]
        retrieved = client.get(
            f"/dicom-web/studies/{world.study_uid}/series/{seg_series}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
    boundary = retrieved.headers["content-type"].split("boundary=")[1]
    part = retrieved.content.split(f"--{boundary}".encode())[1].split(b"\r\n\r\n", 1)[1]
    data = part.removesuffix(b"\r\n")
    assert dcmread(io.BytesIO(data)).SOPInstanceUID == seg["seg_sop_instance_uid"]
    read_back = hd.seg.segread(io.BytesIO(data))
    volume = read_back.get_volume(combine_segments=True)
    assert int(np.count_nonzero(volume.array)) == int(mask.sum())
    if shutil.which("dciodvfy"):
        path = tmp_path / "seg.dcm"
        path.write_bytes(data)
        out = run(["dciodvfy", "-new", str(path)])
        errors = [
            line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")
        ]
        assert errors == [], errors


def test_refusals(world: World) -> None:
    good = {"image_uid": world.series_uid, "region_type": "lesion", "mask_data": _encoded(_ball())}
    with world.http("viewer-a") as client:
        assert client.post("/api/v1/segmentations", json=good).status_code == 403
    with world.http("rad-b") as client:
        other = client.post("/api/v1/segmentations", json=good)
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "MEDICAL_IMAGE_NOT_FOUND"
    with world.http("rad-a") as client:
        wrong = client.post(
            "/api/v1/segmentations",
            json={**good, "mask_data": _encoded(np.ones((SLICES, SIZE, SIZE - 1)))},
        )
        assert wrong.status_code == 422
        assert wrong.json()["error"]["code"] == "MASK_GEOMETRY_MISMATCH"
        assert wrong.json()["error"]["details"]["expected_shape"] == [SLICES, SIZE, SIZE]
        empty = client.post(
            "/api/v1/segmentations",
            json={**good, "mask_data": _encoded(np.zeros((SLICES, SIZE, SIZE)), compress=False)},
        )
        assert empty.json()["error"]["code"] == "EMPTY_MASK"
        for change in (
            {"region_type": "heart"},
            {"mask_data": "***"},
            {"creation_method": "magic"},
            {"metadata": {"pi_rads_assessment": 9}},
        ):
            response = client.post("/api/v1/segmentations", json={**good, **change})
            assert response.status_code == 422, change


def test_list_update_and_isolation(world: World) -> None:
    with world.http("rad-a") as client:
        created = client.post(
            "/api/v1/segmentations",
            json={
                "image_uid": world.series_uid,
                "region_type": "prostate",
                "creation_method": "ai_automatic",
                "confidence": 0.89,
                "mask_data": _encoded(_ball()),
            },
        ).json()["data"]
        listed = client.get("/api/v1/segmentations", params={"image_uid": world.series_uid})
        ids = [s["segmentation_id"] for s in listed.json()["data"]["segmentations"]]
        assert created["segmentation_id"] in ids
        updated = client.put(
            f"/api/v1/segmentations/{created['segmentation_id']}",
            json={"pi_rads_score": 4, "validated": True, "radiologist_notes": "after DCE"},
        )
        assert updated.status_code == 200
        data = updated.json()["data"]
        assert data["pi_rads_score"] == 4 and data["validated"] is True
        assert data["validated_by"].startswith("user_") and data["validation_date"]
        assert data["radiologist_notes"] == "after DCE"
        bad = client.put(
            f"/api/v1/segmentations/{created['segmentation_id']}", json={"pi_rads_score": 6}
        )
        assert bad.status_code == 422
    with world.http("rad-b") as client:
        assert client.get(f"/api/v1/segmentations/{created['segmentation_id']}").status_code == 404
        assert client.get("/api/v1/segmentations").json()["data"]["segmentations"] == []
    with world.http("viewer-a") as client:
        assert client.get(f"/api/v1/segmentations/{created['segmentation_id']}").status_code == 200
        denied = client.put(
            f"/api/v1/segmentations/{created['segmentation_id']}", json={"validated": False}
        )
        assert denied.status_code == 403
