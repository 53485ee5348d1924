"""Schemathesis drives every operation of the OpenAPI document against a running server with
generated inputs (valid and invalid); no request may end in a server error (5xx)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT

PASSWORD = "correct-horse-battery"


def _cli(server: Any, *args: str, stdin: str = "") -> str:
    cmd = [sys.executable, "-m", "server", "--config", str(server.config_dir), args[0]]
    cmd += ["--data-dir", str(server.data_dir), *args[1:]]
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_no_operation_answers_a_server_error(server_factory: Any, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "st"
    if not st.exists():
        pytest.skip("schemathesis is not installed (tools/setup --test installs it)")
    server = server_factory(server_toml="[http]\nauth_off_for_loopback = false\n")
    _cli(
        server,
        "user",
        "create",
        "--username",
        "fuzz",
        "--institution",
        "FUZZ",
        "--role",
        "admin",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    key = _cli(server, "apikey", "create", "--institution", "FUZZ").strip()
    token = httpx.post(
        f"{server.base_url}/api/v1/auth/login",
        json={"username": "fuzz", "password": PASSWORD, "institution": "FUZZ"},
    ).json()["data"]["access_token"]
    result = subprocess.run(
        [
            str(st),
            "run",
            f"{server.base_url}/api/v1/openapi.json",
            "--url",
            server.base_url,
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--request-timeout",
            "30",
            "--exclude-path",
            "/api/v1/auth/logout",  # would end the session the run uses
            "-H",
            f"Authorization: Bearer {token}",
            "-H",
            f"X-API-KEY: {key}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Server error" not in output
