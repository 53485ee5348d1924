"""A ten-second run of tools/load.py (storescu loops and DICOMweb readers at once): no store
failure, no HTTP error, and the catalog holds every instance storescu was told was stored.
The figures themselves are not asserted (docs/reliability.md, "Load", has the real runs)."""

from __future__ import annotations

from pathlib import Path

from tools.load import KINDS, Settings, run


def test_load_smoke(tmp_path: Path, dcmtk: None) -> None:
    settings = Settings(minutes=10 / 60, stores=2, http_concurrency=4, slices=5, size=64)
    result = run(settings, tmp_path)
    assert result["errors"] == 0, result["error_samples"]
    store = result["store"]
    assert store["instances"] > 0
    assert store["in_catalog"] == store["instances"]
    assert all(result["http"]["kinds"][kind]["requests"] > 0 for kind in KINDS)
    assert result["rss"]["peak_mb"] > 0
