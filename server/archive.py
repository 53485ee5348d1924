"""Open the archive: catalog, storage and the ingest path, ready for any entry point."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server.catalog import writer
from server.catalog.db import database, make_database, session
from server.catalog.schema import create_schema
from server.config import Settings
from server.ingest import Ingestor
from server.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Archive:
    settings: Settings
    storage: Storage
    ingestor: Ingestor


def open_archive(settings: Settings) -> Archive:
    """Connect the catalog, create its schema and finish writes a crash interrupted."""
    database.initialize(
        make_database(settings.catalog_url, sqlite_synchronous=settings.sqlite_synchronous)
    )
    with session():
        create_schema()
    storage = Storage(settings.data_dir)
    with session():
        kept, removed = storage.recover(writer.committed_path)
    if kept or removed:
        log.warning("recovered interrupted writes: %d kept, %d orphan files removed", kept, removed)
    return Archive(settings, storage, Ingestor(storage, duplicates=settings.duplicates))


def close_archive() -> None:
    if database.obj is not None:
        database.close_all() if hasattr(database.obj, "close_all") else database.close()
