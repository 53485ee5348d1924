"""``python -m server check``: every kind of damage is found, ``--repair`` fixes what it can
without losing an instance, and a live server's storage is never repaired underneath it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pydicom import dcmread

from server.catalog.db import database, make_database
from tests.catalog_dump import dump, files_on_disk
from tests.helpers import ServerProcess, server_cli, write_config
from tools.generate import StudySpec, ct_series, small_instance, write


def _sql(data_dir: Path, url: str, statement: str) -> None:
    database.initialize(make_database(url or f"sqlite:///{(data_dir / 'catalog.sqlite')}"))
    try:
        database.connect()
        with database.atomic():
            database.execute_sql(statement)
    finally:
        database.close_all() if hasattr(database.obj, "close_all") else database.close()


def _check(config: Path, data_dir: Path, url: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = server_cli("check", config, data_dir, "--json", *args, database_url=url)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_check_finds_and_repairs(database_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg")
    data_dir = tmp_path / "data"
    source = tmp_path / "in"
    for ds in ct_series(StudySpec(patient_id="CHECK1"), 6, 64):
        write(ds, source / "ct")
    for n in range(2):
        write(small_instance(StudySpec(patient_id=f"CHECK2{n}")), source / "sc")
    imported = server_cli("import", config, data_dir, str(source), database_url=database_url)
    assert imported.returncode == 0, imported.stderr

    code, clean = _check(config, data_dir, database_url, "--deep")
    assert (code, clean["problems"], clean["instances"], clean["files"]) == (0, {}, 8, 8)

    catalog = dump(data_dir, database_url)
    paths = catalog["paths"]
    instances = data_dir / "instances"
    # 1. a file vanishes; 2. one is truncated; 3. two files swap contents (deep check only)
    (instances / paths[0]).unlink()
    with open(instances / paths[1], "r+b") as fh:
        fh.truncate(100)
    by_size: dict[int, list[Path]] = {}
    for relative in paths[2:]:
        by_size.setdefault((instances / relative).stat().st_size, []).append(instances / relative)
    a, b = next(group for group in by_size.values() if len(group) >= 2)[:2]  # two CT slices
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    # 4. an orphan nobody references, 5. an orphan whose data is kept elsewhere (hard link)
    stray_source = tmp_path / "stray.dcm"
    write(small_instance(StudySpec(patient_id="STRAY")), tmp_path / "stray")
    shutil.copy(next((tmp_path / "stray").iterdir()), stray_source)
    orphan = instances / "ab" / "cd" / ("ab" + "c" * 62 + ".0000.dcm")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(stray_source, orphan)
    linked = instances / "ab" / "ce" / ("abce" + "0" * 60 + ".0001.dcm")
    linked.parent.mkdir(parents=True, exist_ok=True)
    os.link(stray_source, linked)
    for path in (orphan, linked):  # older than the grace period of a read-only check
        os.utime(path, (1_000_000_000, 1_000_000_000))
    # 6. an interrupted write, 7. a wrong counter
    (data_dir / "tmp" / ("ef" * 32 + ".abc.part")).write_bytes(b"partial")
    _sql(data_dir, database_url, 'UPDATE "series" SET "number_of_series_related_instances" = 99')

    code, report = _check(config, data_dir, database_url, "--deep")
    problems = report["problems"]
    assert code == 1
    assert problems.get("missing_file") == 1
    assert problems.get("wrong_size") == 1
    assert problems.get("wrong_instance") == 2
    assert problems.get("orphan_file") == 2
    assert problems.get("interrupted_write") == 1
    assert problems.get("series_count", 0) >= 2  # every series (the damaged ones count anyway)
    assert all(not f["repaired"] for f in report["findings"])
    assert orphan.exists() and linked.exists(), "a check without --repair changes nothing"

    code, repaired = _check(config, data_dir, database_url, "--repair")
    assert code == 1, "a truncated file cannot be repaired and stays reported"
    unresolved = {f["kind"] for f in repaired["findings"] if not f["repaired"]}
    assert unresolved == {"wrong_size"}
    assert not orphan.exists() and not linked.exists()
    assert (data_dir / "orphans" / "ab" / "cd" / orphan.name).read_bytes() == (
        stray_source.read_bytes()
    ), "an orphan with no other copy is kept for review, never deleted"
    assert stray_source.exists(), "the other link of a hard-linked orphan is untouched"
    assert list((data_dir / "tmp").iterdir()) == []

    code, after = _check(config, data_dir, database_url)
    assert after["problems"] == {"wrong_size": 1}
    assert after["instances"] == 7  # the row of the vanished file went
    after_dump = dump(data_dir, database_url)
    assert after_dump["paths"] == files_on_disk(data_dir)
    counts = {
        s["series_instance_uid"]: s["number_of_series_related_instances"]
        for s in after_dump["Series"]
    }
    assert sum(counts.values()) == 7
    moved = dcmread(data_dir / "orphans" / "ab" / "cd" / orphan.name, stop_before_pixels=True)
    assert moved.PatientID == "STRAY"


def test_repair_refused_while_a_server_runs(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg")
    server = ServerProcess(tmp_path / "data", config).start()
    try:
        result = server_cli("check", config, server.data_dir, "--repair")
        assert result.returncode == 2
        assert "server is running" in result.stderr
        readonly = server_cli("check", config, server.data_dir)
        assert readonly.returncode == 0, readonly.stdout + readonly.stderr
        assert "no problems" in readonly.stdout
    finally:
        server.stop()
