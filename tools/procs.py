"""Process helpers shared by the tests and the benchmarks: our server as a child process,
DCMTK peers, free ports, readiness polling and scratch PostgreSQL databases."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from pynetdicom import AE
from pynetdicom.sop_class import Verification

ROOT = Path(__file__).resolve().parent.parent

# DCMTK keeps Nagle's algorithm on unless this is set: every C-STORE then waits ~40 ms for a
# delayed ACK. Every DCMTK process (and Orthanc, which links DCMTK) gets it.
NODELAY_ENV = {"TCP_NODELAY": "1"}
DCMTK_TOOLS = ("storescu", "storescp", "findscu", "movescu", "getscu", "echoscu")


def log(message: str) -> None:
    """Progress on stderr, so that stdout keeps only the results."""
    print(message, file=sys.stderr, flush=True)


def stow_body(parts: Iterable[bytes], boundary: str = "stow-boundary-1") -> tuple[bytes, str]:
    """A STOW-RS request body (PS3.18 10.5: multipart/related, type application/dicom) and
    its Content-Type."""
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo(
    port: int,
    ae_title: str = "IMAGING",
    calling: str = "ECHOSCU",
    host: str = "127.0.0.1",
    tls_args: tuple[Any, str] | None = None,
    timeout: float = 3,
) -> bool:
    """True when the AE at ``host:port`` answers C-ECHO with success (over TLS with
    ``tls_args`` = (ssl context, server host name))."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


def answers(port: int, ae_title: str = "IMAGING") -> bool:
    """The AE is up: it accepted or explicitly rejected an association (readiness probe that
    also works when unknown calling AEs are refused)."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 3
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if assoc.is_established:
        assoc.release()
        return True
    return bool(assoc.is_rejected)


def http_answers(base_url: str) -> bool:
    """The HTTP side is up: any HTTP answer to a QIDO request counts."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url}/dicom-web/studies?limit=1", timeout=3):
            return True
    except urllib.error.HTTPError:
        return True


def wait_until(
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll ``ready`` until it is true; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited early (status {proc.returncode}){_tail(log_path)}")
        try:
            if ready():
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.1)  # poll interval, not a wait for readiness
    raise TimeoutError(f"{what} not ready within {timeout:.0f}s{_tail(log_path)}")


def _tail(path: Path | None, chars: int = 3000) -> str:
    if path is None or not path.exists():
        return ""
    return f"; log {path}:\n{path.read_text(errors='replace')[-chars:]}"


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not gone within ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- DCMTK and Orthanc binaries -------------------------------------------------------------


def _is_native(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def dcmtk(tool: str) -> str:
    """The DCMTK binary ``tool``. pynetdicom installs Python apps with the same names
    (storescu, findscu, ...) into the virtual environment; those are skipped."""
    for directory in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        candidate = Path(directory or ".") / tool
        if candidate.is_file() and os.access(candidate, os.X_OK) and _is_native(candidate):
            return str(candidate)
    raise FileNotFoundError(f"DCMTK tool {tool!r} not found (Debian package dcmtk)")


def missing_tools(orthanc_binary: str) -> list[str]:
    """Debian packages the benchmarks need and which are not installed."""
    missing: list[str] = []
    try:
        for tool in DCMTK_TOOLS:
            dcmtk(tool)
    except FileNotFoundError:
        missing.append("dcmtk")
    if shutil.which(orthanc_binary) is None and not Path(orthanc_binary).is_file():
        missing.append("orthanc")
    return missing


def ensure_tools(orthanc_binary: str) -> None:
    """Install DCMTK and Orthanc from Debian when missing and we are root; else explain and exit."""
    missing = missing_tools(orthanc_binary)
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        still = missing_tools(orthanc_binary)
        if not still:
            return
        missing = still
    raise SystemExit(
        f"missing: {' '.join(missing)}; install with `apt-get install {' '.join(missing)}` "
        "(the benchmark does it itself when run as root)"
    )


# --- our server ----------------------------------------------------------------------------


def write_config(
    directory: Path, *, peers: Sequence[tuple[str, int]] = (), server: str = ""
) -> Path:
    """A configuration directory for ``python -m server``: server.toml and peers.toml."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.toml").write_text(server or '[ae]\ntitle = "IMAGING"\n')
    blocks = [
        f'[[peer]]\nae_title = "{title}"\nhost = "127.0.0.1"\nport = {port}\n'
        for title, port in peers
    ]
    (directory / "peers.toml").write_text("\n".join(blocks))
    return directory


# Log files of the servers started so far; the test suite shows the newest ones' tails when a
# test fails (tests/conftest.py), so a failure seen once in CI explains itself.
STARTED_LOGS: list[Path] = []


@dataclass
class OurServer:
    """``python -m server serve`` as a child process (AE title IMAGING)."""

    data_dir: Path
    config_dir: Path
    database_url: str = ""
    ae_title: str = "IMAGING"
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # Extra environment (IMAGING_* settings). The AI loop is off unless asked for here: its
    # worker process (torch) would cost every test and benchmark a core for nothing.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base_url}/dicom-web"

    def _cli(self, command: str) -> list[str]:
        cmd = [sys.executable, "-m", "server", "--config", str(self.config_dir), command]
        cmd += ["--data-dir", str(self.data_dir)]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        return cmd

    def start(self, timeout: float = 60.0) -> OurServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"ours-{self.port}.log"
        STARTED_LOGS.append(self.log_path)
        log_file: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                *self._cli("serve"),
                "--dimse-port",
                str(self.port),
                "--http-port",
                str(self.http_port),
            ],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "IMAGING_AI_ENABLED": "false", **self.env},
        )
        log_file.close()  # the child holds its own descriptor
        wait_until(self.ready, "our server", timeout, self.proc, self.log_path)
        return self

    def log_text(self) -> str:
        """What the server has logged so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        """Both ports answer (a subclass serving TLS probes its own way)."""
        return answers(self.port, self.ae_title) and http_answers(self.base_url)

    def import_paths(self, paths: Sequence[Path]) -> None:
        """Bulk import (``python -m server import``); the progress bar goes to our stderr."""
        proc = subprocess.Popen(
            [*self._cli("import"), *map(str, paths)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        started = time.monotonic()
        while True:
            try:
                stdout, _ = proc.communicate(timeout=15)
                break
            except subprocess.TimeoutExpired:
                if not sys.stderr.isatty():  # the import's own progress bar is tty-only
                    log(f"  import running ({time.monotonic() - started:.0f}s)")
        summary = stdout.strip().splitlines()
        log(f"  import: {summary[-1] if summary else '(no summary)'}")
        if proc.returncode != 0:
            raise RuntimeError(f"import failed with status {proc.returncode}")

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL: the crash tests' way of pulling the plug."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@contextmanager
def storescp(
    directory: Path, ae_title: str = "STORESCP", port: int | None = None, *extra: str
) -> Iterator[int]:
    """DCMTK's storescp as a C-MOVE destination (TCP_NODELAY=1, 128 KiB PDUs)."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [dcmtk("storescp"), "-aet", ae_title, "-od", str(directory), "-pdu", "131072", *extra]
    cmd.append(str(port))
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **NODELAY_ENV},
    )
    try:
        wait_until(lambda: echo(port, ae_title), "storescp", 20, proc)
        yield port
    finally:
        stop_process(proc, 10)


# --- PostgreSQL ----------------------------------------------------------------------------


def scratch_databases(stack: ExitStack, url: str, keep: bool = False) -> Callable[[], str]:
    """A maker of database URLs for the benchmarks' rounds: "" (SQLite in the data directory)
    without ``url``, else a new scratch PostgreSQL database on each call, dropped when
    ``stack`` closes. Each round's data directory is new, and a catalog kept from the round
    before would point at files that are gone."""

    def make() -> str:
        return stack.enter_context(scratch_postgres(url, keep)) if url else ""

    return make


@contextmanager
def scratch_postgres(url: str, keep: bool = False) -> Iterator[str]:
    """A fresh database on the PostgreSQL server of ``url`` (its database name is only used to
    connect for CREATE DATABASE); dropped afterwards unless ``keep``."""
    import psycopg2

    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise SystemExit(f"--database-url must be postgresql://..., got {url!r}")
    name = f"imaging_bench_{uuid.uuid4().hex[:10]}"
    admin_db = parts.path.lstrip("/") or "postgres"
    admin = psycopg2.connect(urlunsplit(parts._replace(path=f"/{admin_db}")))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        if keep:
            log(f"kept PostgreSQL database {name}")
        else:
            with admin.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()
