"""/health and /ready: liveness, and readiness that fails when the storage or catalog does."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from server.archive import Archive
from server.web.app import build_app


def test_health_and_ready_answer_without_a_token(archive: Archive) -> None:
    client = TestClient(build_app(archive), client=("203.0.113.9", 5000))  # not loopback
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["ai_queue_depth"] == 0
    assert body["checks"]["catalog"]["ok"] and body["checks"]["storage"]["ok"]
    assert not list(archive.storage.tmp.glob("*.probe"))  # the write probe cleans up


def test_not_ready_when_storage_cannot_be_written(archive: Archive, tmp_path: Path) -> None:
    archive.storage.tmp = tmp_path / "gone" / "tmp"  # as if the volume had been unmounted
    ready = TestClient(build_app(archive)).get("/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready" and not body["checks"]["storage"]["ok"]
    assert "FileNotFoundError" in body["checks"]["storage"]["error"]
    assert body["checks"]["catalog"]["ok"]
