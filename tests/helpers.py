"""Test helpers: free ports, a real server process, DCMTK runners, PostgreSQL databases."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

ROOT = Path(__file__).resolve().parent.parent
PG_DSN = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def postgres_available() -> str | None:
    """None when PostgreSQL answers on 127.0.0.1:5432, otherwise the reason it doesn't."""
    try:
        import psycopg2

        conn = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG_DSN)
        conn.close()
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at 127.0.0.1:5432 ({exc.__class__.__name__})"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import psycopg2

    name = f"imaging_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(dbname="postgres", **PG_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def echo(port: int, ae_title: str = "IMAGING", calling: str = "ECHOSCU") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 3
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


def answers(port: int) -> bool:
    """The AE is up: it accepted or explicitly rejected an association (readiness probe)."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 3
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    if assoc.is_established:
        assoc.release()
        return True
    return bool(assoc.is_rejected)


def write_config(
    directory: Path,
    *,
    peers: Sequence[tuple[str, int]] = (),
    server: str = "",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.toml").write_text(server or '[ae]\ntitle = "IMAGING"\n')
    blocks = [
        f'[[peer]]\nae_title = "{title}"\nhost = "127.0.0.1"\nport = {port}\n'
        for title, port in peers
    ]
    (directory / "peers.toml").write_text("\n".join(blocks))
    return directory


@dataclass
class ServerProcess:
    data_dir: Path
    config_dir: Path
    database_url: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        cmd = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--config",
            str(self.config_dir),
            "--data-dir",
            str(self.data_dir),
            "--dimse-port",
            str(self.port),
        ]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if answers(self.port):
                    return self
            except Exception:
                pass
            time.sleep(0.1)  # poll interval, not a wait for readiness
        raise TimeoutError(f"server did not answer C-ECHO within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace")
            if self.log_path and self.log_path.exists()
            else ""
        )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def run(
    cmd: Sequence[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@contextmanager
def storescp(directory: Path, ae_title: str = "STORESCP", port: int | None = None) -> Iterator[int]:
    """DCMTK's storescp as a C-MOVE destination. TCP_NODELAY=1: without it DCMTK keeps Nagle on
    and every sub-operation waits ~40 ms for a delayed ACK."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", "-aet", ae_title, "-od", str(directory), "-pdu", "131072", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if echo(port, ae_title):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
