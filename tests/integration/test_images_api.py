"""``/api/v1/images`` and tenant ownership of studies: stored by a calling AE of an institution
(peers.toml) or by a user (STOW), visible to that institution only, over the JSON API and
DICOMweb alike."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from tests.helpers import (
    ServerProcess,
    catalog,
    cli,
    store_as,
    user_token,
)
from tools.generate import StudySpec, ct_series, small_instance


@dataclass
class World:
    server: ServerProcess
    ct: StudySpec
    other: StudySpec
    stowed: StudySpec
    tokens: dict[str, str]

    def http(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.server.base_url, headers=headers, timeout=30)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"images-{request.param}")
    with ExitStack() as stack:
        url = stack.enter_context(catalog(request.param))
        config = tmp / "config"
        config.mkdir()
        (config / "server.toml").write_text(
            '[ae]\ntitle = "IMAGING"\n[http]\nauth_off_for_loopback = false\n'
        )
        (config / "peers.toml").write_text(
            '[[peer]]\nae_title = "MOD_A"\nhost = "127.0.0.1"\nport = 1\ninstitution = "HOSP-A"\n'
            '[[peer]]\nae_title = "MOD_B"\nhost = "127.0.0.1"\nport = 2\ninstitution = "HOSP-B"\n'
        )
        server = ServerProcess(tmp / "data", config, url).start()
        stack.callback(server.stop)
        tokens = {
            name: user_token(server, name, institution, role)
            for name, institution, role in (
                ("rad-a", "HOSP-A", "radiologist"),
                ("rad-b", "HOSP-B", "radiologist"),
                ("tech-a", "HOSP-A", "technician"),
                ("admin-a", "HOSP-A", "admin"),
            )
        }
        ct = StudySpec(patient_id="IMG-A1", patient_name="ALPHA^ANN", study_date="20240301")
        store_as(server.port, "MOD_A", list(ct_series(ct, 6, 64)))
        other = StudySpec(patient_id="IMG-B1", patient_name="BETA^BEN", study_date="20230101")
        store_as(server.port, "MOD_B", [small_instance(other)])
        stowed = StudySpec(patient_id="IMG-A2", patient_name="GAMMA^GUS", study_date="20220615")
        buf = io.BytesIO()
        small_instance(stowed).save_as(buf, enforce_file_format=True)
        body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + buf.getvalue() + b"\r\n--b--\r\n"
        stow = httpx.post(
            f"{server.dicomweb}/studies",
            content=body,
            headers={
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
                "Authorization": f"Bearer {tokens['tech-a']}",
            },
        )
        assert stow.status_code == 200, stow.text
        yield World(server, ct, other, stowed, tokens)


def _series(world: World, who: str, **params: Any) -> dict[str, Any]:
    with world.http(who) as client:
        response = client.get("/api/v1/images", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    return dict(body["data"])


def test_list_is_confined_to_the_institution(world: World) -> None:
    mine = _series(world, "rad-a")
    assert {i["patient_id"] for i in mine["images"]} == {"IMG-A1", "IMG-A2"}
    assert mine["total_count"] == 2 and mine["page_count"] == 1 and mine["current_page"] == 1
    assert {i["institution"] for i in mine["images"]} == {"HOSP-A"}
    theirs = _series(world, "rad-b")
    assert [i["patient_id"] for i in theirs["images"]] == ["IMG-B1"]
    with world.http(None) as anonymous:
        assert anonymous.get("/api/v1/images").status_code == 401


def test_filters_and_paging(world: World) -> None:
    assert [i["patient_id"] for i in _series(world, "rad-a", patient_id="IMG-A1")["images"]] == [
        "IMG-A1"
    ]
    assert _series(world, "rad-a", modality="CT")["total_count"] == 1
    assert _series(world, "rad-a", study_uid=world.stowed.study_uid)["total_count"] == 1
    assert _series(world, "rad-a", date_from="2024-01-01")["total_count"] == 1
    assert _series(world, "rad-a", date_to="2023-01-01T00:00:00Z")["total_count"] == 1
    page = _series(world, "rad-a", limit=1, offset=1)
    assert (page["total_count"], page["page_count"], page["current_page"]) == (2, 2, 2)
    assert len(page["images"]) == 1
    with world.http("rad-a") as client:
        for bad in (
            {"limit": "0"},
            {"limit": "x"},
            {"offset": "-1"},
            {"date_from": "March"},
            {"colour": "red"},
        ):
            response = client.get("/api/v1/images", params=bad)
            assert response.status_code == 422, bad
            assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_detail_has_geometry_and_display_defaults(world: World) -> None:
    listed = _series(world, "rad-a", patient_id="IMG-A1")["images"][0]
    assert listed["dimensions"] == [6, 64, 64]
    with world.http("rad-a") as client:
        first = client.get(f"/api/v1/images/{listed['series_uid']}").json()["data"]
        second = client.get(f"/api/v1/images/{listed['series_uid']}").json()["data"]
    assert first["spacing"] == [1.0, 0.7, 0.7]
    assert first["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert first["window_level"] == {"default_window": 400.0, "default_level": 40.0}
    assert first["dicom_metadata"]["SeriesDescription"] == "AXIAL 1.0"
    assert first["file_path"].endswith(
        f"/dicom-web/studies/{world.ct.study_uid}/series/{listed['series_uid']}"
    )
    assert first["acquisition_date"] == "2024-03-01T10:15:00Z"
    assert first["file_size_mb"] > 0
    assert first["last_accessed"] is None and second["last_accessed"] is not None


def test_other_institutions_images_are_not_found_anywhere(world: World) -> None:
    theirs = _series(world, "rad-b")["images"][0]
    with world.http("rad-a") as client:
        response = client.get(f"/api/v1/images/{theirs['series_uid']}")
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "MEDICAL_IMAGE_NOT_FOUND"
        assert error["details"] == {"series_uid": theirs["series_uid"], "search_attempted": True}
        # DICOMweb applies the same confinement.
        studies = client.get("/dicom-web/studies").json()
        assert {s["00100020"]["Value"][0] for s in studies} == {"IMG-A1", "IMG-A2"}
        assert client.get(f"/dicom-web/studies/{world.other.study_uid}/metadata").status_code == 404
        assert client.get(f"/dicom-web/studies/{world.ct.study_uid}/metadata").status_code == 200


def test_patient_access_history(world: World) -> None:
    with world.http("rad-a") as client:
        client.get("/api/v1/images", params={"patient_id": "IMG-A1"})
        client.get(f"/dicom-web/studies/{world.ct.study_uid}/metadata")
        assert client.get("/api/v1/audit/patients/IMG-A1").status_code == 403
    with world.http("admin-a") as client:
        response = client.get("/api/v1/audit/patients/IMG-A1")
        assert response.status_code == 200, response.text
        entries = response.json()["data"]["entries"]
        actions = {e["action"] for e in entries}
        # DIMSE store, JSON API list and DICOMweb metadata all show, with who and where.
        assert {"dimse.store", "api.images.list", "wado-metadata"} <= actions, actions
        assert all(e.get("time") and e.get("actor") for e in entries)
        other = client.get("/api/v1/audit/patients/IMG-B1")
        assert other.status_code == 404  # another institution's patient
    history = cli(world.server, "audit", "history", "--patient-id", "IMG-B1")
    assert any('"dimse.store"' in line for line in history.splitlines())


def _cfind_patients(port: int, calling: str) -> set[str]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = ""
    found = set()
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
            found.add(str(identifier.PatientID))
    assoc.release()
    return found


def test_dimse_queries_are_confined_to_the_calling_aes_institution(world: World) -> None:
    assert _cfind_patients(world.server.port, "MOD_A") == {"IMG-A1", "IMG-A2"}
    assert _cfind_patients(world.server.port, "MOD_B") == {"IMG-B1"}
    # An AE bound to no institution sees the whole archive, as before tenants existed.
    assert {"IMG-A1", "IMG-A2", "IMG-B1"} <= _cfind_patients(world.server.port, "ANY_AE")
