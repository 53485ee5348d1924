"""JSON API authentication (workstation-api.md): login, refresh, logout, expiry, rate limiting,
permissions on DICOMweb, the envelope and request ids, against a running server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.helpers import (
    PASSWORD,
    ServerProcess,
    catalog,
    cli,
    create_user,
    login,
    write_config,
)


@dataclass
class Served:
    server: ServerProcess

    def http(self, token: str | None = None, **headers: str) -> httpx.Client:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.server.base_url, headers=headers, timeout=30)

    def user(self, role: str, institution: str = "HOSP-A") -> str:
        username = f"{role}-{uuid.uuid4().hex[:6]}"
        create_user(self.server, username, institution, role)
        return username

    def login(self, username: str, institution: str = "HOSP-A") -> dict[str, Any]:
        return login(self.server, username, institution)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(f"auth-{request.param}")
    with ExitStack() as stack:
        url = stack.enter_context(catalog(request.param))
        config = write_config(
            tmp / "config",
            server='[ae]\ntitle = "IMAGING"\n[http]\nauth_off_for_loopback = false\n',
        )
        server = ServerProcess(tmp / "data", config, url).start()
        stack.callback(server.stop)
        yield Served(server)


def test_login_answers_the_documented_envelope(served: Served) -> None:
    name = served.user("radiologist")
    with served.http() as client:
        response = client.post(
            "/api/v1/auth/login",
            json={"username": name, "password": PASSWORD, "institution": "HOSP-A"},
        )
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["request_id"].startswith("req_")
    assert response.headers["x-request-id"] == body["request_id"]
    assert body["timestamp"].endswith("Z")
    data = body["data"]
    assert data["expires_in"] == 3600
    assert data["access_token"].count(".") == 2 and data["refresh_token"].count(".") == 2
    info = data["user_info"]
    assert info["username"] == name and info["role"] == "radiologist"
    assert info["institution"] == "HOSP-A"
    assert set(info["permissions"]) >= {"read_images", "create_segmentations", "generate_reports"}
    with served.http(data["access_token"]) as client:
        me = client.get("/api/v1/auth/me", headers={"X-Request-ID": "trace-42"})
    assert me.json()["data"]["username"] == name
    assert me.json()["request_id"] == "trace-42" == me.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"password": "wrong-password-x", "institution": "HOSP-A"}, 401, "INVALID_CREDENTIALS"),
        ({"password": PASSWORD, "institution": "HOSP-B"}, 401, "INVALID_CREDENTIALS"),
        ({"password": PASSWORD}, 422, "VALIDATION_ERROR"),
        ({"password": 5, "institution": "HOSP-A"}, 422, "VALIDATION_ERROR"),
    ],
)
def test_login_failures(served: Served, body: dict[str, Any], status: int, code: str) -> None:
    name = served.user("viewer")
    with served.http() as client:
        response = client.post("/api/v1/auth/login", json={"username": name, **body})
    assert response.status_code == status
    payload = response.json()
    assert payload["success"] is False and payload["error"]["code"] == code
    assert payload["request_id"].startswith("req_")


def test_failed_logins_are_rate_limited(served: Served) -> None:
    name = served.user("viewer")
    wrong = {"username": name, "password": "not-the-password", "institution": "HOSP-A"}
    with served.http() as client:
        codes = [client.post("/api/v1/auth/login", json=wrong).status_code for _ in range(5)]
        assert codes == [401] * 5
        blocked = client.post("/api/v1/auth/login", json={**wrong, "password": PASSWORD})
    assert blocked.status_code == 429  # even the right password waits now
    assert int(blocked.headers["retry-after"]) > 0
    assert blocked.json()["error"]["code"] == "TOO_MANY_LOGIN_ATTEMPTS"


def test_tokens_refresh_once_and_logout_revokes(served: Served) -> None:
    pair = served.login(served.user("viewer"))
    with served.http() as client:
        renewed = client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert renewed.status_code == 200
        new = renewed.json()["data"]
        assert new["access_token"] != pair["access_token"]
        # A refresh token works once; replaying it ends every session of the user.
        replay = client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert replay.status_code == 401
        assert replay.json()["error"]["code"] == "TOKEN_REVOKED"
        again = client.post("/api/v1/auth/refresh", json={"refresh_token": new["refresh_token"]})
        assert again.status_code == 401
        # An access token is not a refresh token.
        wrong_kind = client.post(
            "/api/v1/auth/refresh", json={"refresh_token": new["access_token"]}
        )
        assert wrong_kind.status_code == 401

    fresh = served.login(pair["user_info"]["username"])
    with served.http(fresh["access_token"]) as client:
        assert client.get("/api/v1/auth/me").status_code == 200
        out = client.post("/api/v1/auth/logout", json={"refresh_token": fresh["refresh_token"]})
        assert out.status_code == 200
        revoked = client.get("/api/v1/auth/me")
        assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "TOKEN_REVOKED"
    with served.http() as client:
        dead = client.post("/api/v1/auth/refresh", json={"refresh_token": fresh["refresh_token"]})
        assert dead.status_code == 401


def test_expired_tampered_and_missing_tokens(served: Served) -> None:
    pair = served.login(served.user("viewer"))
    key = (Path(served.server.data_dir) / "jwt.key").read_bytes()
    claims = jwt.decode(pair["access_token"], key, algorithms=["HS256"], issuer="imaging-server")
    expired = jwt.encode({**claims, "exp": int(time.time()) - 5}, key, algorithm="HS256")
    forged = jwt.encode({**claims, "role": "admin"}, b"x" * 32, algorithm="HS256")
    with served.http() as client:
        missing = client.get("/api/v1/auth/me")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "AUTHENTICATION_REQUIRED"
        assert "bearer" in missing.headers["www-authenticate"].lower()
        for token, code in (
            (expired, "TOKEN_EXPIRED"),
            (forged, "INVALID_TOKEN"),
            ("garbage", "INVALID_TOKEN"),
        ):
            response = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401
            assert response.json()["error"]["code"] == code


def test_dicomweb_needs_a_token_with_the_right_permission(served: Served) -> None:
    viewer = served.login(served.user("viewer"))["access_token"]
    technician = served.login(served.user("technician"))["access_token"]
    with served.http() as anonymous:
        assert anonymous.get("/dicom-web/studies").status_code == 401
    with served.http(viewer) as client:
        assert client.get("/dicom-web/studies").status_code == 200
        stow = client.post(
            "/dicom-web/studies",
            content=b"--b\r\n\r\nx\r\n--b--\r\n",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
        assert stow.status_code == 403
        assert stow.json()["error"]["details"]["required_permission"] == "upload_images"
    with served.http(technician) as client:
        stow = client.post(
            "/dicom-web/studies",
            content=b"--b\r\n\r\nx\r\n--b--\r\n",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
        assert stow.status_code == 409  # allowed in; the one part is not DICOM


def test_disabled_users_cannot_log_in(served: Served) -> None:
    name = served.user("viewer")
    pair = served.login(name)
    cli(served.server, "user", "set", "--username", name, "--institution", "HOSP-A", "--disable")
    with served.http() as client:
        denied = client.post(
            "/api/v1/auth/login",
            json={"username": name, "password": PASSWORD, "institution": "HOSP-A"},
        )
        assert denied.status_code == 401
        refused = client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert refused.status_code == 401


def test_loopback_exemption_does_not_cover_proxied_requests(server_factory: Any) -> None:
    server = server_factory()  # default configuration: auth off for loopback
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert client.get("/dicom-web/studies").status_code == 200
        proxied = client.get("/dicom-web/studies", headers={"X-Forwarded-For": "203.0.113.9"})
        assert proxied.status_code == 401
