"""Schemathesis drives every operation of the OpenAPI document against a running server with
generated inputs (valid and invalid); no request may end in a server error (5xx)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import api_key, user_token


@pytest.mark.slow
def test_no_operation_answers_a_server_error(server_factory: Any, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "st"
    if not st.exists():
        pytest.skip("schemathesis is not installed (tools/setup --test installs it)")
    server = server_factory(server_toml="[http]\nauth_off_for_loopback = false\n")
    token = user_token(server, "fuzz", "FUZZ", "admin")
    key = api_key(server, "FUZZ")
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
