"""Thin wrappers around the DCMTK command-line tools used as real peers."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.helpers import run


def findscu(
    port: int, level: str, keys: dict[str, str], *, model: str = "-S", calling: str = "FINDSCU"
) -> tuple[list[Dataset], str]:
    """Run findscu; returns the response identifiers (as datasets) and its output."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            "findscu",
            model,
            "-aet",
            calling,
            "-aec",
            "IMAGING",
            "-X",
            "-od",
            out,
            "-k",
            f"QueryRetrieveLevel={level}",
        ]
        for key, value in keys.items():
            cmd += ["-k", f"{key}={value}" if value != "" else key]
        cmd += ["127.0.0.1", str(port)]
        result = run(cmd, timeout=120)
        files = sorted(Path(out).glob("rsp*.dcm"))
        return [dcmread(f) for f in files], result.stdout + result.stderr


def storescu(port: int, paths: list[Path], *extra: str) -> str:
    cmd = ["storescu", "-aec", "IMAGING", *extra, "127.0.0.1", str(port), *map(str, paths)]
    result = run(cmd, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def getscu(port: int, study_uid: str, out: Path) -> None:
    """C-GET a whole study into ``out`` (getscu proposes uncompressed syntaxes)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["getscu", "-S", "-aec", "IMAGING", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY"]
    cmd += ["-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)]
    result = run(cmd, env={"TCP_NODELAY": "1"})
    if result.returncode != 0:
        raise AssertionError(f"getscu failed ({result.returncode}):\n{result.stderr[-2000:]}")


def movescu(port: int, destination: str, keys: dict[str, str], *extra: str) -> str:
    """C-MOVE (Study Root) with movescu; returns its output, fails the test on a bad exit."""
    cmd = ["movescu", "-S", *extra, "-aec", "IMAGING", "-aem", destination]
    for key, value in keys.items():
        cmd += ["-k", f"{key}={value}"]
    result = run([*cmd, "127.0.0.1", str(port)])
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"movescu failed ({result.returncode}):\n{output[-2000:]}")
    return output
