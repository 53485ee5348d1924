"""The OpenAPI document lists exactly the JSON API's routes and methods, and is served."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from server.web.api.openapi import document


@pytest.fixture
def app(tmp_path: Path) -> Iterator[object]:
    from server.archive import close_archive, open_archive
    from server.config import load_settings
    from server.web.app import build_app

    archive = open_archive(load_settings(None, {"data_dir": str(tmp_path / "data")}))
    try:
        yield build_app(archive)
    finally:
        close_archive()


def _routes(app: object) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for route in app.routes:  # type: ignore[attr-defined]
        if not isinstance(route, Route):
            continue
        if not (route.path.startswith("/api/v1") or route.path.startswith("/v1/")):
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        found.setdefault(path, set()).update(
            m.lower() for m in (route.methods or ()) if m != "HEAD"
        )
    return found


def test_document_and_routes_agree(app: object) -> None:
    documented = {path: set(ops) for path, ops in document()["paths"].items()}
    assert _routes(app) == documented


def test_document_is_served_and_valid_shape(app: object) -> None:
    client = TestClient(app)  # type: ignore[arg-type]
    body = client.get("/api/v1/openapi.json").json()
    assert body["openapi"].startswith("3.1")
    for path, operations in body["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], f"{method} {path} documents no response"
            for name in re.findall(r"\{(\w+)\}", path):
                params = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
                assert name in params, f"{method} {path} lacks path parameter {name}"
