"""The worklist REST API (shared/spec/worklist-api.md) against a running server: API keys from
the CLI, every documented validation rule and status code, tenant isolation, filters,
pagination and concurrent creates."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    ServerProcess,
    api_key,
    catalog,
    server_cli,
    write_config,
)

BASE_ITEM = {
    "patient_id": "PID12345",
    "surname": "GONZALEZ",
    "forename": "JUAN",
    "sex": "M",
    "date_of_birth": "1980-01-15",
    "modality": "CT",
    "exam_date_and_time": "2025-07-23 09:00:00",
    "exam_description": "CT ABDOMEN CON CONTRASTE",
    "referring_physician": "DR. SMITH",
    "scheduled_aet": "CT_SCANNER_1",
}


@dataclass
class Api:
    server: ServerProcess
    key_a: str
    key_b: str

    def client(self, key: str | None) -> httpx.Client:
        headers = {"X-API-KEY": key} if key is not None else {}
        return httpx.Client(base_url=self.server.base_url, headers=headers, timeout=30)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per catalog backend for the whole module; tests that count items use
    institutions of their own, so they do not see each other's."""
    tmp = tmp_path_factory.mktemp(f"worklist-{request.param}")
    with ExitStack() as stack:
        url = stack.enter_context(catalog(request.param))
        server = ServerProcess(tmp / "data", write_config(tmp / "config"), url).start()
        stack.callback(server.stop)
        yield server


@pytest.fixture(scope="module")
def api(running: ServerProcess) -> Api:
    """Keys shared by the tests that only look at the items they create themselves."""
    return Api(running, api_key(running, "SHARED-A"), api_key(running, "SHARED-B"))


@pytest.fixture
def isolated_api(running: ServerProcess) -> Api:
    """Keys of two institutions of this test's own (for counting, and for revoking)."""
    tag = uuid.uuid4().hex[:8]
    return Api(running, api_key(running, f"A-{tag}"), api_key(running, f"B-{tag}"))


def test_keys_are_required_and_scope_everything(isolated_api: Api) -> None:
    with isolated_api.client(None) as anonymous:
        assert anonymous.get("/v1/worklists").status_code == 401
        assert anonymous.post("/v1/worklists", json=BASE_ITEM).status_code == 401
    with isolated_api.client("wl_not-a-real-key") as wrong:
        response = wrong.get("/v1/worklists")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "UNAUTHORIZED"
    with isolated_api.client(isolated_api.key_a) as a, isolated_api.client(isolated_api.key_b) as b:
        created = a.post("/v1/worklists", json=BASE_ITEM)
        assert created.status_code == 201
        item_id = created.json()["data"]["id"]
        # Institution B can neither see nor touch A's item: 404, as for a missing one.
        assert b.get(f"/v1/worklists/{item_id}").status_code == 404
        assert b.put(f"/v1/worklists/{item_id}", json={"status": "CANCELED"}).status_code == 404
        assert b.delete(f"/v1/worklists/{item_id}").status_code == 404
        assert b.get("/v1/worklists").json()["data"] == []
        assert a.get(f"/v1/worklists/{item_id}").json()["data"]["status"] == "SCHEDULED"
    # A revoked key stops working at once.
    listed = server_cli(
        "apikey",
        isolated_api.server.config_dir,
        isolated_api.server.data_dir,
        "list",
        database_url=isolated_api.server.database_url,
    )
    assert isolated_api.key_a not in listed.stdout  # only prefixes are ever shown
    revoked = server_cli(
        "apikey",
        isolated_api.server.config_dir,
        isolated_api.server.data_dir,
        "revoke",
        isolated_api.key_b[:10],
        database_url=isolated_api.server.database_url,
    )
    assert revoked.returncode == 0, revoked.stderr
    with isolated_api.client(isolated_api.key_b) as b:
        assert b.get("/v1/worklists").status_code == 401


def test_create_get_update_delete(api: Api) -> None:
    with api.client(api.key_a) as a:
        response = a.post("/v1/worklists", json=BASE_ITEM)
        assert response.status_code == 201
        item = response.json()["data"]
        year = dt.datetime.now(dt.UTC).year
        assert item["accession_number"].startswith(str(year))
        assert len(item["accession_number"]) == 13
        assert item["status"] == "SCHEDULED"
        assert item["study_instance_uid"].count(".") > 3
        assert isinstance(item["created_at"], int) and item["created_at"] == item["updated_at"]
        for name, value in BASE_ITEM.items():
            assert item[name] == value
        own_uid = {**BASE_ITEM, "study_instance_uid": "1.2.826.0.1.3680043.10.1439.77"}
        assert a.post("/v1/worklists", json=own_uid).json()["data"]["study_instance_uid"] == (
            "1.2.826.0.1.3680043.10.1439.77"
        )

        fetched = a.get(f"/v1/worklists/{item['id']}")
        assert fetched.status_code == 200 and fetched.json()["data"] == item

        change = {
            "status": "IN_PROGRESS",
            "performing_physician": "DR. RODRIGUEZ",
            "exam_room": "SALA 2",
        }
        updated = a.put(f"/v1/worklists/{item['id']}", json=change)
        assert updated.status_code == 200
        data = updated.json()["data"]
        assert {k: data[k] for k in change} == change
        assert data["updated_at"] >= item["updated_at"]
        assert data["accession_number"] == item["accession_number"]

        deleted = a.delete(f"/v1/worklists/{item['id']}")
        assert deleted.status_code == 204 and deleted.content == b""
        assert a.get(f"/v1/worklists/{item['id']}").status_code == 404
        assert a.delete(f"/v1/worklists/{item['id']}").status_code == 404
        assert a.get("/v1/worklists/999999").status_code == 404
        assert a.get("/v1/worklists/not-a-number").status_code == 404


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"patient_id": None}, "patient_id"),
        ({"surname": ""}, "surname"),
        ({"patient_id": "P" * 65}, "patient_id"),
        ({"surname": "S" * 65}, "surname"),
        ({"forename": "F" * 65}, "forename"),
        ({"referring_physician": "R" * 65}, "referring_physician"),
        ({"performing_physician": "R" * 65}, "performing_physician"),
        ({"exam_description": "D" * 129}, "exam_description"),
        ({"hospital_name": "H" * 129}, "hospital_name"),
        ({"exam_room": "R" * 33}, "exam_room"),
        ({"title": "T" * 17}, "title"),
        ({"sex": "MF"}, "sex"),
        ({"sex": "X"}, "sex"),
        ({"status": "DONE"}, "status"),
        ({"modality": "XX"}, "modality"),
        ({"modality": "ct"}, "modality"),
        ({"date_of_birth": "15/01/1980"}, "date_of_birth"),
        ({"date_of_birth": "1980-02-30"}, "date_of_birth"),
        ({"exam_date_and_time": "2025-07-23"}, "exam_date_and_time"),
        ({"exam_date_and_time": "2025-07-23 25:00:00"}, "exam_date_and_time"),
        ({"study_instance_uid": "1.2.abc"}, "study_instance_uid"),
        ({"surname": "GONZALEZ^JUAN"}, "surname"),
        ({"patient_id": 12345}, "patient_id"),
        ({"accession_number": "1"}, "accession_number"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_validation_names_the_bad_field(api: Api, change: dict[str, Any], field: str) -> None:
    body = {**BASE_ITEM, **change}
    with api.client(api.key_a) as a:
        response = a.post("/v1/worklists", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "VALIDATION_ERROR"
        assert set(error["fields"]) == {field}
        if field not in ("accession_number", "colour"):
            # The same rule holds on update.
            item = a.post("/v1/worklists", json=BASE_ITEM).json()["data"]
            update = a.put(f"/v1/worklists/{item['id']}", json=change)
            assert update.status_code == 422
            assert set(update.json()["error"]["fields"]) == {field}
            unchanged = a.get(f"/v1/worklists/{item['id']}").json()["data"]
            assert unchanged == item


def test_every_missing_required_field_is_named_and_bad_json_is_422(api: Api) -> None:
    with api.client(api.key_a) as a:
        response = a.post("/v1/worklists", json={"sex": "F"})
        assert response.status_code == 422
        assert set(response.json()["error"]["fields"]) == {
            "patient_id",
            "surname",
            "forename",
            "modality",
            "exam_date_and_time",
            "scheduled_aet",
        }
        broken = a.post(
            "/v1/worklists", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 422
        assert "body" in broken.json()["error"]["fields"]
        assert a.post("/v1/worklists", json=["a list"]).status_code == 422


def _make(a: httpx.Client, n: int, **overrides: str) -> dict[str, Any]:
    body = {**BASE_ITEM, "patient_id": f"P{n:03d}", **overrides}
    response = a.post("/v1/worklists", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json()["data"])


def test_filters_and_pagination(isolated_api: Api) -> None:
    with isolated_api.client(isolated_api.key_a) as a:
        for n in range(45):
            _make(
                a,
                n,
                modality="MR" if n % 3 == 0 else "CT",
                exam_date_and_time=f"2025-08-{1 + n % 2:02d} {8 + n % 10:02d}:00:00",
                surname="GARCIA" if n < 5 else "GONZALEZ",
                forename="ANA" if n % 2 else "JUAN",
            )
        pages = [a.get("/v1/worklists", params={"page": p}).json() for p in (1, 2, 3)]
        assert [len(p["data"]) for p in pages] == [20, 20, 5]
        assert pages[0]["meta"] == {"page": 1, "per_page": 20, "total": 45, "total_pages": 3}
        assert pages[0]["links"]["next"].endswith("page=2") and pages[2]["links"]["next"] is None
        ids = [item["id"] for p in pages for item in p["data"]]
        assert len(set(ids)) == 45
        followed = a.get(pages[0]["links"]["next"]).json()
        assert followed["data"] == pages[1]["data"]
        assert a.get("/v1/worklists", params={"page": 9}).json()["data"] == []
        assert a.get("/v1/worklists", params={"page": 0}).status_code == 422

        def count(**params: str) -> int:
            response = a.get("/v1/worklists", params=params)
            assert response.status_code == 200, response.text
            return int(response.json()["meta"]["total"])

        assert count(modality="MR") == 15
        assert count(patient_id="P007") == 1
        assert count(surname="garcia") == 5  # case-insensitive
        assert count(surname="G*Z") == 40  # wildcard, as in C-FIND
        assert count(forename="ANA", surname="GARCIA") == 2  # several filters at once
        assert count(exam_date_and_time="2025-08-01") == 23  # a whole day
        assert count(exam_date_and_time="2025-08-01 08:00:00") == 5
        assert count(status="SCHEDULED") == 45
        first = pages[0]["data"][0]
        a.put(f"/v1/worklists/{first['id']}", json={"status": "COMPLETED"})
        assert count(status="COMPLETED") == 1
        assert count(status="SCHEDULED", modality="MR") + count(status="COMPLETED") >= 15
        for bad in (
            {"status": "DONE"},
            {"modality": "ZZ"},
            {"exam_date_and_time": "Aug 1"},
            {"colour": "red"},
        ):
            response = a.get("/v1/worklists", params=bad)
            assert response.status_code == 422
            assert set(response.json()["error"]["fields"]) == set(bad)


def test_concurrent_creates_get_unique_accession_numbers(isolated_api: Api) -> None:
    numbers: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        with isolated_api.client(isolated_api.key_a) as a:
            for n in range(10):
                response = a.post(
                    "/v1/worklists", json={**BASE_ITEM, "patient_id": f"C{offset}{n}"}
                )
                with lock:
                    if response.status_code == 201:
                        numbers.append(response.json()["data"]["accession_number"])
                    else:
                        errors.append(response.text)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(numbers) == 80 and len(set(numbers)) == 80
    # Institution B counts on its own: its first number is not after A's eighty.
    with isolated_api.client(isolated_api.key_b) as b:
        other = b.post("/v1/worklists", json=BASE_ITEM).json()["data"]["accession_number"]
    assert other.endswith("000000001")


def test_images_that_arrive_link_the_study(api: Api, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from tools.generate import StudySpec, ct_series

    with api.client(api.key_a) as a:
        item = a.post("/v1/worklists", json=BASE_ITEM).json()["data"]
    ds = next(ct_series(StudySpec(study_uid=item["study_instance_uid"]), 1, 16))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", api.server.port, ae_title="IMAGING")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    from server.catalog.db import database, make_database, session
    from server.catalog.schema import WorklistItem

    url = api.server.database_url or f"sqlite:///{api.server.data_dir.resolve()}/catalog.sqlite"
    database.initialize(make_database(url))
    with session():
        row = WorklistItem.get_by_id(item["id"])
    assert row.linked_study_uid == item["study_instance_uid"]
