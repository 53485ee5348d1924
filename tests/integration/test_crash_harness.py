"""The crash harness (tools/crash.py) itself: random SIGKILLs during C-STORE x4 + STOW lose
nothing acknowledged and leave nothing behind, on both catalogs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import have
from tools import crash


@pytest.mark.slow
@pytest.mark.dcmtk
def test_random_kills_lose_nothing(database_url: str, tmp_path: Path) -> None:
    if not have("storescu"):
        pytest.skip("DCMTK is not installed")
    args = ["--rounds", "2", "--seed", "11", "--slices", "40", "--out", str(tmp_path / "out")]
    if database_url:
        args += ["--database-url", database_url]
    assert crash.main([*args, "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    summary = report["summary"]
    assert summary["kills"] == 2 and summary["lost"] == 0 and summary["check_problems"] == {}
    assert summary["acknowledged_dimse"] > 0 and summary["acknowledged_stow"] >= 0
    # the kills landed mid-ingest: something was still unacknowledged in every round
    assert all(r["unacked"] > 0 for r in report["rounds"])


@pytest.mark.slow
@pytest.mark.dcmtk
def test_process_durability_survives_kills(tmp_path: Path) -> None:
    """Without fsyncs (``durability = "process"``) a killed server still loses nothing it
    acknowledged: the kernel keeps the written pages and SQLite's WAL (synchronous=NORMAL)."""
    if not have("storescu"):
        pytest.skip("DCMTK is not installed")
    out = tmp_path / "out"
    args = ["--rounds", "2", "--seed", "5", "--slices", "40", "--durability", "process"]
    assert crash.main([*args, "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["lost"] == 0 and summary["check_problems"] == {}
    assert summary["acknowledged_dimse"] > 0
