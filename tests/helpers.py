"""Test helpers. The process plumbing (our server, DCMTK peers, ports) lives in tools/procs.py,
shared with the benchmarks; this adds what only tests need."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
    "write_config",
]

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_DCMTK_EXTRA = ("dcmcjpls", "dcmcjpeg", "dcmdjpeg")


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


def server_cli(
    command: str, config: Path, data_dir: Path, *args: str, database_url: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m server COMMAND`` against a configuration and data directory."""
    cmd = [sys.executable, "-m", "server", "--config", str(config), command]
    cmd += ["--data-dir", str(data_dir)]
    if database_url:
        cmd += ["--database-url", database_url]
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=600
    )


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
