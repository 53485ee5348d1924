"""Open the catalog from one URL: SQLite (embedded default) or PostgreSQL (scale-out).

SQLite runs in WAL mode with a busy timeout so the AE's association threads and the import
command can write concurrently; PostgreSQL is used through a connection pool.  Both are pooled so
a handler can borrow a connection for one unit of work (:func:`session`) and give it back.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from peewee import Database, DatabaseProxy
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from server.errors import ConfigError

database: Any = DatabaseProxy()


def make_database(
    url: str, *, sqlite_synchronous: str = "FULL", max_connections: int = 64
) -> Database:
    """A pooled Peewee database for ``sqlite:///path`` or ``postgresql://user@host:port/db``."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = Path(unquote(parsed.path)) if parsed.path else None
        if path is None or str(path) in ("", "/"):
            raise ConfigError(f"SQLite URL {url!r} names no file")
        path.parent.mkdir(parents=True, exist_ok=True)
        _gate.bind(str(path))
        return PooledSqliteDatabase(
            str(path),
            max_connections=max_connections,
            stale_timeout=600,
            check_same_thread=False,
            pragmas={
                "journal_mode": "wal",
                "busy_timeout": 60000,
                "synchronous": sqlite_synchronous.upper(),
                "foreign_keys": 1,
                # PS3.4 C.2.2.2.4 wildcard matching is case-sensitive; SQLite's LIKE is not by
                # default. Case-sensitive LIKE also lets prefix patterns use the column index.
                "case_sensitive_like": 1,
                "cache_size": -32000,
            },
        )
    if parsed.scheme in ("postgresql", "postgres"):
        name = parsed.path.lstrip("/")
        if not name:
            raise ConfigError(f"PostgreSQL URL {url!r} names no database")
        return PooledPostgresqlDatabase(
            unquote(name),
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname or None,
            port=parsed.port or 5432,
            max_connections=max_connections,
            stale_timeout=600,
        )
    raise ConfigError(f"unsupported database URL {url!r}: use sqlite:///path or postgresql://...")


class _WriterGate:
    """Serialises SQLite writers of this process (a lock) and of all processes (flock).

    SQLite's own busy handler waits for a locked database by sleeping 1, 2, 5, 10 ms...; with
    several DIMSE workers committing an instance each millisecond that backoff, not the work,
    sets the pace. A blocked flock() returns the moment the holder lets go.
    """

    def __init__(self) -> None:
        self._thread_lock = threading.Lock()
        self._fd = -1
        self._path = ""

    def bind(self, sqlite_path: str) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._path = sqlite_path + ".writelock"
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)


_gate = _WriterGate()


@contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction that will write.

    On SQLite the writers' gate is taken first, then the write lock up front (BEGIN IMMEDIATE):
    a deferred transaction that reads first and writes later gets SQLITE_BUSY at once, without
    waiting out busy_timeout, when another connection committed in between.
    """
    if isinstance(database.obj, PooledSqliteDatabase):
        with _gate.held(), database.atomic(lock_type="IMMEDIATE"):
            yield
    else:
        with database.atomic():
            yield


def is_postgres() -> bool:
    return isinstance(database.obj, PooledPostgresqlDatabase)


@contextmanager
def session() -> Iterator[None]:
    """Borrow a pooled connection for one unit of work (re-entrant)."""
    if not database.is_closed():
        yield
        return
    database.connect()
    try:
        yield
    finally:
        database.close()
