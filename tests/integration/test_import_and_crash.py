"""`import` and C-STORE build the same catalog; SIGKILL mid-ingest loses nothing acknowledged."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.catalog_dump import dump, files_on_disk
from tests.dcmtk import findscu, getscu, storescu
from tests.helpers import ServerProcess, have, server_cli, write_config
from tools.crash import acknowledged
from tools.generate import StudySpec, ct_series, small_instance, write
from tools.procs import dcmtk


def _import(
    config: Path, data_dir: Path, url: str, *paths: Path
) -> subprocess.CompletedProcess[str]:
    return server_cli("import", config, data_dir, *map(str, paths), database_url=url)


def test_import_equals_cstore(
    database_url: str, ct_study: Path, server_factory, tmp_path: Path, pg_url_factory
) -> None:
    if not have("storescu"):
        pytest.skip("DCMTK is not installed")
    files = tmp_path / "files"
    for src in sorted(ct_study.iterdir())[:12]:
        (files / "ct").mkdir(parents=True, exist_ok=True)
        (files / "ct" / src.name).write_bytes(src.read_bytes())
    for n in range(3):
        write(
            small_instance(StudySpec(patient_id=f"S{n}", patient_name=f"SMALL^{n}")),
            files / "small",
        )

    server = server_factory(database_url)
    storescu(server.port, [files], "+sd", "+r")
    server.stop()
    via_dimse = dump(server.data_dir, database_url)

    other_url = pg_url_factory() if database_url else ""
    config = write_config(tmp_path / "import-config")
    data = tmp_path / "imported"
    result = _import(config, data, other_url, files)
    assert result.returncode == 0, result.stderr
    assert "15 files: 15 stored, 0 replaced, 0 duplicate, 0 rejected" in result.stdout
    via_import = dump(data, other_url)
    audit = (data / "audit.log").read_text()
    assert '"action":"import"' in audit and '"stored":15' in audit

    assert via_import.pop("paths") == files_on_disk(data)
    assert via_dimse.pop("paths") == files_on_disk(server.data_dir)
    assert via_import == via_dimse
    assert len(via_import["Instance"]) == 15
    # the stored files carry the same dataset either way
    for path in (data / "instances").rglob("*.dcm"):
        twin = next((server.data_dir / "instances").rglob(path.name.split(".")[0] + ".*.dcm"))
        a, b = dcmread(path), dcmread(twin)
        del a.file_meta, b.file_meta
        assert a == b

    again = _import(config, data, other_url, files, tmp_path / "missing-is-reported")
    assert again.returncode == 2 and "not found" in again.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not dicom")
    again = _import(config, data, other_url, files, junk)
    assert "16 files: 0 stored, 0 replaced, 15 duplicate, 1 rejected" in again.stdout
    assert "notes.txt" in again.stderr


@pytest.fixture
def pg_url_factory():  # type: ignore[no-untyped-def]
    """Extra PostgreSQL databases on demand (for a second catalog in one test)."""
    from contextlib import ExitStack

    from tests.helpers import postgres_database

    with ExitStack() as stack:
        yield lambda: stack.enter_context(postgres_database())


@pytest.mark.slow
def test_sigkill_during_four_association_ingest(database_url: str, tmp_path: Path) -> None:
    if not have("storescu"):
        pytest.skip("DCMTK is not installed")
    folders = []
    for n in range(4):
        folder = tmp_path / f"series{n}"
        for ds in ct_series(StudySpec(patient_id=f"CRASH{n}"), 60, 256):
            write(ds, folder)
        folders.append(folder)
    server = ServerProcess(tmp_path / "data", write_config(tmp_path / "cfg"), database_url).start()
    logs = [tmp_path / f"storescu{n}.log" for n in range(4)]
    senders = [
        subprocess.Popen(
            [
                dcmtk("storescu"),
                "-v",
                "-aec",
                "IMAGING",
                "127.0.0.1",
                str(server.port),
                "+sd",
                str(f),
            ],
            stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for f, log in zip(folders, logs, strict=True)
    ]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        total = sum(len(acknowledged(log.read_text())) for log in logs)
        if total >= 60:
            break
        time.sleep(0.02)
    server.kill()  # SIGKILL, mid-ingest
    for proc in senders:
        proc.wait(60)
    acked = [p for log in logs for p in acknowledged(log.read_text())]
    assert 60 <= len(acked) < 240, "the kill should land in the middle of the ingest"
    refused = [
        line
        for log in logs
        for line in log.read_text().splitlines()
        if "Received Store Response" in line and "(Success)" not in line
    ]
    assert refused == [], "concurrent associations must not be refused (e.g. database locked)"

    server.start()  # restart on the same data: recovery runs
    try:
        for folder in folders:
            uid = str(dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)
            rsps, _ = findscu(server.port, "IMAGE", {"StudyInstanceUID": uid, "SOPInstanceUID": ""})
            stored = {str(r.SOPInstanceUID) for r in rsps}
            for path in acked:
                if Path(path).parent == folder:
                    ds = dcmread(path, stop_before_pixels=True)
                    assert str(ds.SOPInstanceUID) in stored, f"acknowledged {path} was lost"
        # everything acknowledged is retrievable, byte for byte the same pixels
        got = tmp_path / "got"
        for folder in folders:
            uid = str(dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)
            getscu(server.port, uid, got)
        retrieved = {str(dcmread(p).SOPInstanceUID): p for p in got.iterdir()}
        for path in acked:
            original = dcmread(path)
            assert original.PixelData == dcmread(retrieved[str(original.SOPInstanceUID)]).PixelData
    finally:
        server.stop()
    # no orphan files, no rows without files, nothing left in tmp/
    catalog = dump(server.data_dir, database_url)
    assert catalog["paths"] == files_on_disk(server.data_dir)
    assert list((server.data_dir / "tmp").iterdir()) == []
    assert len(catalog["Instance"]) >= len(acked)
