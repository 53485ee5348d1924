"""Test helpers. The process plumbing (our server, DCMTK peers, ports) lives in tools/procs.py,
shared with the benchmarks; this adds what only tests need."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tools.procs import (
    DCMTK_TOOLS,
    ROOT,
    answers,
    dcmtk,
    echo,
    free_port,
    scratch_postgres,
    storescp,
    write_config,
)
from tools.procs import OurServer as ServerProcess

__all__ = [
    "ROOT",
    "ServerProcess",
    "answers",
    "echo",
    "free_port",
    "have",
    "postgres_available",
    "postgres_database",
    "run",
    "server_cli",
    "storescp",
    "wait_for",
    "write_config",
]

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_DCMTK_EXTRA = ("dcmcjpls", "dcmcjpeg", "dcmdjpeg")


def wait_for(check: Callable[[], Any], what: str, timeout: float = 180.0) -> Any:
    """Poll ``check`` every 0.05 s until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def have(tool: str) -> bool:
    try:
        dcmtk(tool)
        return True
    except FileNotFoundError:
        return False


def postgres_available() -> str | None:
    """None when PostgreSQL answers on 127.0.0.1:5432, otherwise the reason it doesn't."""
    try:
        import psycopg2

        psycopg2.connect(PG_ADMIN_URL, connect_timeout=3).close()
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at 127.0.0.1:5432 ({exc.__class__.__name__})"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    with scratch_postgres(PG_ADMIN_URL) as url:
        yield url


@contextmanager
def catalog(backend: str) -> Iterator[str]:
    """The catalog URL of a test parametrised by backend: "" (the embedded SQLite) for
    ``sqlite``, a fresh PostgreSQL database for ``postgres`` (the test is skipped, with the
    reason, when PostgreSQL does not answer)."""
    if backend != "postgres":
        yield ""
        return
    reason = postgres_available()
    if reason:
        import pytest

        pytest.skip(reason)
    with postgres_database() as url:
        yield url


def server_cli(
    command: str,
    config: Path,
    data_dir: Path,
    *args: str,
    database_url: str = "",
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m server COMMAND`` against a configuration and data directory."""
    cmd = [sys.executable, "-m", "server", "--config", str(config), command]
    cmd += ["--data-dir", str(data_dir)]
    if database_url:
        cmd += ["--database-url", database_url]
    return subprocess.run(
        [*cmd, *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
    )


# --- the JSON API's users and keys, made with the CLI as an operator would -------------------

PASSWORD = "correct-horse-battery"


def cli(server: ServerProcess, command: str, *args: str, stdin: str | None = None) -> str:
    """``python -m server COMMAND`` against a running test server's data; its stdout."""
    result = server_cli(
        command,
        server.config_dir,
        server.data_dir,
        *args,
        database_url=server.database_url,
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def create_user(server: ServerProcess, username: str, institution: str, role: str) -> None:
    cli(
        server,
        "user",
        "create",
        "--username",
        username,
        "--institution",
        institution,
        "--role",
        role,
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )


def login(server: ServerProcess, username: str, institution: str) -> dict[str, Any]:
    """The login answer's data: tokens and user_info."""
    import httpx

    response = httpx.post(
        f"{server.base_url}/api/v1/auth/login",
        json={"username": username, "password": PASSWORD, "institution": institution},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def user_token(server: ServerProcess, username: str, institution: str, role: str) -> str:
    """Create a user and log in: its access token."""
    create_user(server, username, institution, role)
    return str(login(server, username, institution)["access_token"])


# The users of a two-tenant test: a radiologist and a viewer of HOSP-A, a radiologist of HOSP-B.
TENANT_USERS = (
    ("rad-a", "HOSP-A", "radiologist"),
    ("viewer-a", "HOSP-A", "viewer"),
    ("rad-b", "HOSP-B", "radiologist"),
)


def tenant_tokens(server: ServerProcess) -> dict[str, str]:
    """Create :data:`TENANT_USERS` and log them in: their access tokens by user name."""
    return {name: user_token(server, name, inst, role) for name, inst, role in TENANT_USERS}


def api_key(server: ServerProcess, institution: str) -> str:
    return cli(server, "apikey", "create", "--institution", institution).strip()


def run(
    cmd: Sequence[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; DCMTK tools resolve to the real binaries (pynetdicom installs Python apps
    with the same names into the virtual environment)."""
    argv = list(cmd)
    if argv[0] in DCMTK_TOOLS or argv[0] in _DCMTK_EXTRA:
        argv[0] = dcmtk(argv[0])
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def store_as(port: int, calling: str, datasets: Sequence[Any]) -> None:
    """C-STORE ``datasets`` (CT or secondary capture) to our server as AE ``calling``."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage

    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.add_requested_context(SecondaryCaptureImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def tenant_config(directory: Path, server_toml: str = "") -> Path:
    """A configuration with tokens required on loopback and modality MOD_A of HOSP-A."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.toml").write_text("[http]\nauth_off_for_loopback = false\n" + server_toml)
    (directory / "peers.toml").write_text(
        '[[peer]]\nae_title = "MOD_A"\nhost = "127.0.0.1"\nport = 1\ninstitution = "HOSP-A"\n'
    )
    return directory


def study_find(port: int, patient_id: str, calling: str = "FINDSCU") -> tuple[int, str, int]:
    """A Study Root C-FIND by PatientID with pynetdicom: (final status, its Error Comment,
    number of pending responses)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find

    ae = AE(ae_title=calling)
    ae.add_requested_context(Find)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = patient_id
    identifier.StudyInstanceUID = ""
    pending, final, comment = 0, -1, ""
    try:
        for status, _ in assoc.send_c_find(identifier, Find):
            if status and status.Status in (0xFF00, 0xFF01):
                pending += 1
            elif status:
                final, comment = int(status.Status), str(status.get("ErrorComment", ""))
    finally:
        assoc.release()
    return final, comment, pending


def part10(ds: Any, syntax: str | None = None) -> bytes:
    """``ds`` as DICOM file bytes (PS3.10), in ``syntax`` when given."""
    import io

    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
