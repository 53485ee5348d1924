"""PI-RADS reports: generated from a study's segmentations, signed (verified here with the
published key), the PDF rendered with pdftoppm to find the red outline of the lesion, the SR
stored in the archive and checked with dciodvfy."""

from __future__ import annotations

import base64
import hashlib
import shutil
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from PIL import Image

from tests.helpers import ServerProcess, run, store_as, tenant_config, tenant_tokens
from tools.generate import StudySpec, ct_series

SLICES, SIZE = 10, 64


@dataclass
class World:
    server: ServerProcess
    study_uid: str
    tokens: dict[str, str]

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.base_url,
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            timeout=120,
        )


def _mask(centre: tuple[int, int, int], radius: float) -> str:
    z, y, x = np.mgrid[0:SLICES, 0:SIZE, 0:SIZE].astype(float)
    inside = (z - centre[0]) ** 2 + ((y - centre[1]) * 0.7) ** 2 + ((x - centre[2]) * 0.7) ** 2
    data = (inside < radius**2).astype(np.uint8).tobytes()
    return base64.b64encode(zlib.compress(data)).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("reports")
    config = tenant_config(tmp / "config")
    with ExitStack() as stack:
        server = ServerProcess(tmp / "data", config).start()
        stack.callback(server.stop)
        tokens = tenant_tokens(server)
        spec = StudySpec(patient_id="RPT-1", patient_name="REPORT^PATIENT")
        datasets = list(ct_series(spec, SLICES, SIZE))
        store_as(server.port, "MOD_A", datasets)
        world = World(server, spec.study_uid, tokens)
        series_uid = str(datasets[0].SeriesInstanceUID)
        with world.http("rad-a") as client:
            for body in (
                {"region_type": "prostate", "mask_data": _mask((5, 32, 32), 9)},
                {
                    "region_type": "lesion",
                    "mask_data": _mask((5, 24, 40), 3),
                    "metadata": {
                        "anatomical_location": "peripheral_zone_left_base",
                        "pi_rads_assessment": 4,
                        "radiologist_notes": "Hypointense on T2W, marked restriction on DWI",
                    },
                },
            ):
                created = client.post(
                    "/api/v1/segmentations", json={"image_uid": series_uid, **body}
                )
                assert created.status_code == 201, created.text
        yield world


def test_report_is_generated_signed_and_verifiable(world: World, tmp_path: Path) -> None:
    with world.http("viewer-a") as client:
        denied = client.post("/api/v1/reports/generate", json={"study_uid": world.study_uid})
        assert denied.status_code == 403
    with world.http("rad-b") as client:
        other = client.post("/api/v1/reports/generate", json={"study_uid": world.study_uid})
        assert other.status_code == 404
    with world.http("rad-a") as client:
        response = client.post(
            "/api/v1/reports/generate",
            json={
                "study_uid": world.study_uid,
                "template": "pi_rads_structured_report",
                "include_images": True,
            },
        )
        assert response.status_code == 201, response.text
        data = response.json()["data"]
        assert data["status"] == "finalized" and data["digital_signature"]["signed"] is True
        formats = data["formats"]
        document = client.get(formats["json_url"]).json()
        pdf = client.get(formats["pdf_url"])
        page = client.get(formats["html_url"]).text
        sr = client.get(formats["dicom_sr_url"]).content
        pem = client.get("/api/v1/reports/signing-key").content
        srs = client.get(
            f"/dicom-web/studies/{world.study_uid}/series", params={"Modality": "SR"}
        ).json()
    content = document["content"]
    assert content["highest_pi_rads"] == 4
    assert content["overall_assessment"].startswith("High")
    assert content["prostate_volume_ml"] > content["findings"][0]["volume_ml"] > 0
    assert content["findings"][0]["location"] == "peripheral_zone_left_base"
    # The signature verifies with the published key, and only for the signed bytes.
    key = load_pem_public_key(pem)
    assert isinstance(key, Ed25519PublicKey)
    payload = base64.b64decode(document["signature"]["signed_payload_b64"])
    signature = base64.b64decode(document["signature"]["value_b64"])
    key.verify(signature, payload)
    with pytest.raises(InvalidSignature):
        key.verify(signature, payload.replace(b'"highest_pi_rads":4', b'"highest_pi_rads":2'))
    signed = orjson.loads(payload)
    assert signed["artifacts"]["pdf_sha256"] == hashlib.sha256(pdf.content).hexdigest()
    assert signed["artifacts"]["sr_sha256"] == hashlib.sha256(sr).hexdigest()
    assert signed["signed_by"] == "rad-a"
    # HTML carries the findings and the key image.
    assert "PI-RADS 4" in page and "data:image/png;base64," in page
    # The SR is in the archive.
    assert len(srs) == 1
    # The PDF, rendered: the lesion's outline is drawn in red over the key image.
    assert pdf.headers["content-type"] == "application/pdf"
    if shutil.which("pdftoppm"):
        (tmp_path / "report.pdf").write_bytes(pdf.content)
        out = run(
            ["pdftoppm", "-png", "-r", "100", str(tmp_path / "report.pdf"), str(tmp_path / "page")]
        )
        assert out.returncode == 0, out.stderr
        pages = sorted(tmp_path.glob("page*.png"))
        pixels = np.asarray(Image.open(pages[0]).convert("RGB")).astype(int)
        red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
        assert red.sum() > 20, "no red outline on the rendered page"
        grey = (
            (np.abs(pixels[..., 0] - pixels[..., 1]) < 8)
            & (pixels[..., 0] > 30)
            & (pixels[..., 0] < 220)
        )
        assert grey.sum() > 1000, "no image on the rendered page"
    if shutil.which("dciodvfy"):
        (tmp_path / "sr.dcm").write_bytes(sr)
        result = run(["dciodvfy", "-new", str(tmp_path / "sr.dcm")])
        errors = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")
        ]
        assert errors == [], errors


def test_report_refusals(world: World) -> None:
    with world.http("rad-a") as client:
        assert client.post("/api/v1/reports/generate", json={}).status_code == 422
        assert (
            client.post(
                "/api/v1/reports/generate", json={"study_uid": world.study_uid, "template": "x"}
            ).status_code
            == 422
        )
        assert (
            client.post("/api/v1/reports/generate", json={"study_uid": "1.2.3.4"}).status_code
            == 404
        )
        assert client.get("/api/v1/reports/report_deadbeef.pdf").status_code == 404
        assert client.get("/api/v1/reports/..%2F..%2Fjwt.key").status_code == 404
