"""Open the archive: catalog, storage and the ingest path, ready for any entry point."""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from server.audit import AuditLog
from server.catalog import writer
from server.catalog.db import database, make_database, session
from server.catalog.schema import create_schema
from server.config import Settings
from server.ingest import Ingestor
from server.storage import Storage
from server.uploads import mark_interrupted
from server.worklist.service import StudyLinker

log = logging.getLogger(__name__)


@dataclass
class Archive:
    settings: Settings
    storage: Storage
    ingestor: Ingestor
    audit: AuditLog
    lock_fd: int = -1


def _writers_lock(data_dir: Path) -> tuple[int, bool]:
    """Join the processes writing to this data directory; True if we are the only one.

    Every writer (server workers, ``import``) holds a shared lock on ``writers.lock``. Crash
    recovery deletes files whose catalog commit never happened, which would destroy another
    process's write in flight, so it runs only while the exclusive lock can be had.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "writers.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    return fd, alone


def make_storage(settings: Settings) -> Storage:
    """The configured instance-file backend (``[storage] backend``)."""
    if settings.storage_backend != "s3":
        return Storage(settings.data_dir, durable=settings.durability == "power-loss")
    from server.objectstore import S3Storage

    storage = S3Storage(
        settings.data_dir,
        bucket=settings.s3_bucket,
        endpoint=settings.s3_endpoint,
        region=settings.s3_region,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        prefix=settings.s3_prefix,
        cache_mb=settings.s3_cache_mb,
    )
    storage.ensure_bucket()
    return storage


def open_archive(settings: Settings) -> Archive:
    """Connect the catalog, create its schema and finish writes a crash interrupted."""
    database.initialize(
        make_database(settings.catalog_url, sqlite_synchronous=settings.sqlite_sync)
    )
    with session():
        create_schema()
    storage = make_storage(settings)
    fd, alone = _writers_lock(storage.root)
    if alone:
        with session():
            kept, removed = storage.recover(writer.committed_path)
            interrupted = mark_interrupted(storage.root)
        if kept or removed:
            log.warning("recovered interrupted writes: %d kept, %d orphans removed", kept, removed)
        if interrupted:
            log.warning("%d uploads were interrupted by a stop", interrupted)
    fcntl.flock(fd, fcntl.LOCK_SH)
    ingestor = Ingestor(storage, duplicates=settings.duplicates)
    ingestor.subscribe(StudyLinker())  # images arriving for a worklist item link its study
    return Archive(settings, storage, ingestor, AuditLog(storage.root / "audit.log"), fd)


def close_archive() -> None:
    if database.obj is not None:
        database.close_all() if hasattr(database.obj, "close_all") else database.close()
