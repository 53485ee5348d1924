"""A version-1 catalog (before study ownership) is upgraded in place at start-up."""

from __future__ import annotations

from pathlib import Path

from server.archive import close_archive, open_archive
from server.catalog.db import database, session
from server.catalog.schema import SCHEMA_VERSION, SchemaInfo
from server.config import load_settings


def test_old_catalog_gains_the_new_columns(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": str(tmp_path / "data")})
    open_archive(settings)
    with session():
        database.execute_sql('DROP INDEX IF EXISTS "study_institution"')
        database.execute_sql('ALTER TABLE "study" DROP COLUMN "institution"')
        database.execute_sql('ALTER TABLE "series" DROP COLUMN "last_accessed"')
        database.execute_sql('DROP INDEX IF EXISTS "series_source_series"')
        database.execute_sql('ALTER TABLE "series" DROP COLUMN "source_series"')
        database.execute_sql('DROP TABLE "analysis_job"')
        SchemaInfo.update(version=1).execute()
    close_archive()
    open_archive(settings)
    try:
        with session():
            study = {c.name for c in database.get_columns("study")}
            series = {c.name for c in database.get_columns("series")}
            assert "institution" in study and "last_accessed" in series
            assert "source_series" in series
            assert "analysis_job" in database.get_tables()
            assert SchemaInfo.select().first().version == SCHEMA_VERSION == 3
    finally:
        close_archive()
