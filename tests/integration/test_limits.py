"""Limits with clear errors: query result size (C-FIND 0xA700, QIDO capped with Warning 299),
request body size (413) and concurrent associations (A-ASSOCIATE-RJ); the server keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.helpers import server_cli, study_find
from tools.generate import StudySpec, small_instance, write

LIMITS = (
    '[ae]\ntitle = "IMAGING"\nmax_associations = 2\n'
    "[limits]\nmax_query_results = 5\nmax_request_mb = 1\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.helpers import ServerProcess, write_config

    tmp = tmp_path_factory.mktemp("limits")
    config = write_config(tmp / "cfg", server=LIMITS)
    source = tmp / "in"
    for n in range(8):
        write(small_instance(StudySpec(patient_id=f"LIM{n}", study_uid="")), source)
    imported = server_cli("import", config, tmp / "data", str(source))
    assert imported.returncode == 0, imported.stderr
    proc = ServerProcess(tmp / "data", config).start()
    yield proc
    proc.stop()


def _find(port: int, patient_id: str) -> tuple[int, str, int]:
    return study_find(port, patient_id, "LIMITS")


def test_cfind_refuses_a_query_matching_too_much(server: Any) -> None:
    final, comment, pending = _find(server.port, "LIM*")
    assert (final, pending) == (0xA700, 0)
    assert "more than 5 matches" in comment
    assert _find(server.port, "LIM1")[::2] == (0x0000, 1)  # narrower keys work


def test_qido_caps_results_and_says_so(server: Any) -> None:
    response = httpx.get(f"{server.dicomweb}/studies", params={"PatientID": "LIM*"})
    assert response.status_code == 200 and len(response.json()) == 5
    assert "299" in response.headers["warning"]
    page = httpx.get(
        f"{server.dicomweb}/studies", params={"PatientID": "LIM*", "limit": 5, "offset": 5}
    )
    assert len(page.json()) == 3 and "warning" not in page.headers
    small = httpx.get(f"{server.dicomweb}/studies", params={"PatientID": "LIM*", "limit": 2})
    assert len(small.json()) == 2


def test_request_body_limit(server: Any) -> None:
    boundary = "limits"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    big = b"\0" * (2 * 1024 * 1024)
    declared = httpx.post(f"{server.dicomweb}/studies", content=big, headers=headers)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

    def chunks() -> Any:  # no Content-Length: counted while it streams
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        for _ in range(40):
            yield b"\0" * 65536

    streamed = httpx.post(f"{server.dicomweb}/studies", content=chunks(), headers=headers)
    assert streamed.status_code == 413
    api = httpx.post(
        f"{server.base_url}/api/v1/auth/login",
        content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert api.status_code == 413
    assert api.json()["success"] is False
    assert api.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_association_limit(server: Any) -> None:
    ae = AE(ae_title="LIMITS")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    second = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    assert first.is_established and second.is_established
    third = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    assert third.is_rejected, "a third concurrent association is refused (local limit)"
    first.release()
    second.release()
    again = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    assert again.is_established and again.send_c_echo().Status == 0
    again.release()
