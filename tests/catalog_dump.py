"""Read a catalog directly (no start-up recovery) for comparisons in tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.catalog.db import database, make_database
from server.catalog.schema import Instance, Patient, Series, Study


def dump(data_dir: Path, database_url: str = "") -> dict[str, Any]:
    """Every catalog row without ids/timestamps/paths, and the instance files present on disk."""
    url = database_url or f"sqlite:///{(data_dir / 'catalog.sqlite').resolve()}"
    database.initialize(make_database(url))
    skip = {
        "id",
        "created_at",
        "updated_at",
        "received_at",
        "patient",
        "study",
        "series",
        "file_path",
        "source",
        "file_size",
    }
    try:
        database.connect()
        out: dict[str, Any] = {}
        for model in (Patient, Study, Series, Instance):
            rows = []
            for row in model.select().dicts():
                rows.append({k: v for k, v in row.items() if k not in skip})
            out[model.__name__] = sorted(rows, key=repr)
        out["paths"] = sorted(r.file_path for r in Instance.select(Instance.file_path))
    finally:
        database.close_all() if hasattr(database.obj, "close_all") else database.close()
    return out


def files_on_disk(data_dir: Path) -> list[str]:
    base = data_dir / "instances"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
