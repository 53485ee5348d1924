"""Run a throw-away Orthanc next to our server, for side-by-side benchmarks.

    with OrthancProcess(Path("/tmp/o"), modalities={"STORESCP": ("127.0.0.1", 4243)}) as orthanc:
        orthanc.upload(files)                  # REST POST /instances, several connections
        ...                                    # DIMSE at 127.0.0.1:orthanc.dicom_port

Everything lives under the given work directory (config, SQLite index, storage, log). Orthanc
gets its own free DICOM and HTTP ports, remote HTTP access and authentication off, no plugins,
C-FIND/C-MOVE allowed from any calling AE, and Nagle off for DICOM: ``DicomTcpNoDelay`` in the
configuration (an option newer Orthanc versions read; 1.10 ignores it) and ``TCP_NODELAY=1`` in
the environment, read by the DCMTK library Orthanc links.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tools.procs import NODELAY_ENV, echo, free_port, stop_process, wait_until

ORTHANC_BINARY = "/usr/sbin/Orthanc"


@dataclass
class OrthancProcess:
    work_dir: Path
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)
    ae_title: str = "ORTHANC"
    binary: str = ORTHANC_BINARY
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        storage = str(self.work_dir / "storage")
        return {
            "Name": "bench-orthanc",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomTcpNoDelay": True,
            "MaximumPduLength": 131072,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalities": {
                title: [title, host, port] for title, (host, port) in self.modalities.items()
            },
            "SynchronousCMove": True,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "SaveJobs": False,
            "MetricsEnabled": False,
            "OverwriteInstances": False,
            **self.extra,
        }

    def start(self, timeout: float = 60.0) -> OrthancProcess:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.work_dir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        log_file: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [self.binary, "--no-jobs", str(config_path)],
            cwd=self.work_dir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **NODELAY_ENV},
        )
        log_file.close()  # the child holds its own descriptor
        wait_until(
            lambda: bool(self.get("/system")) and echo(self.dicom_port, self.ae_title),
            "Orthanc",
            timeout,
            self.proc,
            self.log_path,
        )
        return self

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self.proc = None

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- REST ------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=120)

    def get(self, path: str) -> Any:
        conn = self._connection()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def version(self) -> str:
        return str(self.get("/system").get("Version", "?"))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def upload(
        self,
        paths: Sequence[Path],
        connections: int = 4,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """POST every file to /instances over ``connections`` keep-alive HTTP connections;
        returns how many Orthanc accepted (stored or already there)."""
        local = threading.local()
        lock = threading.Lock()
        done = [0, 0]  # files sent, files accepted

        def send(path: Path) -> None:
            conn: http.client.HTTPConnection | None = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = self._connection()
            conn.request(
                "POST",
                "/instances",
                body=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            response = conn.getresponse()
            response.read()
            with lock:
                done[0] += 1
                done[1] += response.status == 200
                if progress is not None:
                    progress(done[0], len(paths))

        with ThreadPoolExecutor(max_workers=connections) as pool:
            for future in [pool.submit(send, p) for p in paths]:
                future.result()
        return done[1]
