"""OHIF end to end: our server serves the OHIF viewer at /viewer and DICOMweb at /dicom-web on
one origin; headless Chromium opens the study list, finds the study (also through the patient
name filter), opens it from its row and passes only if the viewport canvas, read back pixel by
pixel, shows the image (more than 2 % non-black pixels and at least 8 grey levels).

Needs what ``tools/install_viewer --test`` installs (``tools/test`` runs it): the OHIF bundle in
``viewer/``, Debian's ``/usr/bin/chromium`` and playwright-core in ``tools/browser``. Without them
the test is skipped, except under ``CI=true``, where it fails. The probe it runs,
``tools/browser/ohif-probe.mjs``, also works by hand against a running server (see its header);
its screenshots, request list and browser console land in the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, ServerProcess, write_config
from tools.generate import StudySpec, ct_series, write

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = Path("/usr/bin/chromium")
VIEWER_DIR = ROOT / "viewer"
PROBE = ROOT / "tools" / "browser" / "ohif-probe.mjs"
PLAYWRIGHT = ROOT / "tools" / "browser" / "node_modules" / "playwright-core" / "package.json"
SLICES, SIZE = 24, 256


def _missing() -> list[str]:
    missing = []
    if not (VIEWER_DIR / "index.html").is_file():
        missing.append(f"the OHIF bundle in {VIEWER_DIR}")
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    if shutil.which("node") is None:
        missing.append("node")
    if not PLAYWRIGHT.is_file():
        missing.append("playwright-core in tools/browser/node_modules")
    return missing


def _require_browser_tools() -> None:
    missing = _missing()
    if not missing:
        return
    message = (
        f"OHIF browser test: missing {', '.join(missing)}; "
        "`tools/install_viewer --test` installs them (tools/test runs it)"
    )
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class Served:
    server: ServerProcess
    study_uid: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    _require_browser_tools()
    root = tmp_path_factory.mktemp("ohif")
    spec = StudySpec(
        patient_id="OHIF-E2E-1",
        patient_name="VIEWER^OHIF",
        accession="OHIFE2E1",
        description="CT OHIF E2E",
    )
    for ds in ct_series(spec, SLICES, SIZE):
        write(ds, root / "ct")
    server = ServerProcess(root / "data", write_config(root / "config"))
    server.start()
    try:
        server.import_paths([root / "ct"])
        config = _get(f"{server.base_url}/viewer/app-config.js")
        assert config is not None, (
            f"{server.base_url}/viewer/app-config.js did not answer 200: the server does not "
            f"serve the viewer from {VIEWER_DIR}{_server_log(server)}"
        )
        assert f'"{server.base_url}/dicom-web"' in config, config
        yield Served(server, spec.study_uid)
    finally:
        server.stop()


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _server_log(server: ServerProcess, chars: int = 3000) -> str:
    return f"\n--- server log (tail) ---\n{server.log()[-chars:]}"


def _probe(
    served: Served, out: Path, *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    base = served.server.base_url
    cmd = [
        "node",
        str(PROBE),
        "--viewer",
        f"{base}/viewer",
        "--dicomweb",
        f"{base}/dicom-web",
        "--study",
        served.study_uid,
        "--out",
        str(out),
        "--chromium",
        str(CHROMIUM),
        *args,
    ]
    # the probe gives up by itself after --timeout; this only guards against a hung browser
    return subprocess.run(
        cmd, cwd=PROBE.parent, capture_output=True, text=True, errors="replace", timeout=timeout
    )


def _report(served: Served, out: Path, proc: subprocess.CompletedProcess[str]) -> str:
    """What a person needs to see why the viewer failed."""
    parts = [f"probe exit {proc.returncode}; screenshots, requests and console in {out}"]
    parts.append("--- probe output ---\n" + (proc.stdout + proc.stderr)[-4000:])
    requests = out / "requests.txt"
    if requests.exists():
        lines = requests.read_text().splitlines()
        bad = [line for line in lines if " 200 " not in line[:20]]
        parts.append(
            f"--- DICOMweb requests: {len(lines)}, not 200: {len(bad)} ---\n" + "\n".join(bad[:20])
        )
    console = out / "console.log"
    if console.exists():
        errors = [
            line
            for line in console.read_text(errors="replace").splitlines()
            if "error" in line.lower() or "PAGEERROR" in line
        ]
        parts.append("--- browser console errors ---\n" + "\n".join(errors[:20]))
    return "\n".join(parts) + _server_log(served.server)


def _result(out: Path) -> dict[str, Any]:
    path = out / "result.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def test_ohif_shows_the_study(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    proc = _probe(served, out, "--via-list", "--search", "OHIF", "--timeout", "45", timeout=120)
    result = _result(out)
    report = _report(served, out, proc)
    assert proc.returncode == 0, report
    studylist = result["studyList"]
    assert studylist["qidoStatus"] == 200 and studylist["studyInList"], report
    assert studylist["search"]["status"] == 200 and studylist["search"]["rows"] > 0, report
    canvas = result["canvas"]
    assert result["rendered"] and canvas["inViewport"], report
    assert canvas["cssW"] >= 200 and canvas["cssH"] >= 200, report
    assert canvas["nonBlackFrac"] > 0.02 and canvas["greyLevels"] >= 8, report
    assert result["metaOk"] and result["pixelOk"], report


def test_probe_fails_when_no_pixels_arrive(served: Served, tmp_path: Path) -> None:
    """The pixel check is not vacuous: with every frame request aborted in the browser the
    viewport stays black and the probe fails."""
    out = tmp_path / "probe-blocked"
    proc = _probe(
        served, out, "--no-studylist", "--block", "/frames/", "--timeout", "5", timeout=60
    )
    result = _result(out)
    assert proc.returncode == 1, _report(served, out, proc)
    assert result["rendered"] is False and result["pixelOk"] is False, result


SEG_PROBE = ROOT / "tools" / "browser" / "ohif-seg-probe.mjs"


def test_ohif_draws_the_ai_segmentation_over_its_series(tmp_path: Path) -> None:
    """The AI loop's SEG (tests/integration/test_ai_loop.py) opens in OHIF over the MR series
    it was made from: coloured segment pixels appear in a viewport that had none."""
    _require_browser_tools()
    from pydicom import dcmread

    from tests.dcmtk import storescu
    from tools.phantom import make_phantom, write_series

    toml = '[ae]\ntitle = "IMAGING"\n[ai]\nstable_age = 1\npoll_interval = 0.2\n'
    server = ServerProcess(
        tmp_path / "data",
        write_config(tmp_path / "config", server=toml),
        env={"IMAGING_AI_ENABLED": "true"},
    ).start()
    try:
        files = write_series(make_phantom(515151, n_lesions=1), tmp_path / "mr")
        storescu(server.port, files)
        header = dcmread(files[0], stop_before_pixels=True)
        url = (
            f"{server.dicomweb}/series?ReferencedSeriesSequence.SeriesInstanceUID="
            f"{header.SeriesInstanceUID}"
        )
        deadline = time.monotonic() + 120
        while "SEG" not in (_get(url) or "") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "SEG" in (_get(url) or ""), _server_log(server)
        out = tmp_path / "seg-probe"
        cmd = ["node", str(SEG_PROBE), "--viewer", f"{server.base_url}/viewer"]
        cmd += ["--study", str(header.StudyInstanceUID), "--out", str(out), "--timeout", "60"]
        cmd += ["--chromium", str(CHROMIUM)]
        proc = subprocess.run(
            cmd, cwd=SEG_PROBE.parent, capture_output=True, text=True, errors="replace", timeout=150
        )
        result = _result(out)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + _server_log(server)
        assert result["before"] == 0 and result["after"] > 500 and result["segParsed"], result
    finally:
        server.stop()
