"""Open the catalog from one URL: SQLite (embedded default) or PostgreSQL (scale-out).

SQLite runs in WAL mode with a busy timeout so the AE's association threads and the import
command can write concurrently; PostgreSQL is used through a connection pool.  Both are pooled so
a handler can borrow a connection for one unit of work (:func:`session`) and give it back.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

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
        _checkpointer.bind(str(path), sqlite_synchronous.upper())
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
                # The checkpointer thread below keeps the WAL short; SQLite's own checkpoint,
                # run inside a commit, stays as the backstop should that thread fall behind.
                "wal_autocheckpoint": _Checkpointer.BACKSTOP_PAGES,
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


class _Checkpointer:
    """Copies the WAL back into the database file on a thread of its own.

    SQLite runs its automatic checkpoint inside the commit that crosses 1,000 WAL pages: one
    small instance in ~22 waited ~4 ms for the pages to be copied and two fsyncs, ~120 µs per
    instance on average, a quarter of the catalog's cost.  Here a thread does the copying while
    writers go on (PASSIVE), then finishes with the writers' gate held: only the pages
    committed meanwhile are left, and a checkpoint that reaches the end of the WAL lets the
    next writer start it again from the beginning.  Without that last step the WAL never
    restarts under a steady stream of commits and grows without bound (every commit then
    extends the file).

    Each pass opens its own connection with the configured ``synchronous`` level, so the
    checkpoint syncs the WAL and the database file exactly as SQLite's own would.
    """

    BACKSTOP_PAGES = 10000
    CATCH_UP = 4  # passes while writers go on, each copying what the last left
    REST_PAGES = 100  # few enough to copy with the writers held
    COMMITS = 8  # commits between passes at least
    PAUSE = 0.05  # seconds between passes at least

    def __init__(self) -> None:
        self._path = ""
        self._synchronous = "FULL"
        self._commits = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.enabled = True

    def bind(self, path: str, synchronous: str) -> None:
        self._path, self._synchronous, self._commits = path, synchronous, 0

    def committed(self) -> None:
        """A write transaction committed: start a pass every :attr:`COMMITS` of them."""
        self._commits += 1
        if self._commits < self.COMMITS or not self.enabled:
            return
        self._commits = 0
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
                    try:
                        thread.start()
                    except RuntimeError:  # the interpreter is exiting: SQLite's own will do
                        return
                    self._thread = thread
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._path:
                self.checkpoint(self._path, self._synchronous)
            time.sleep(self.PAUSE)

    @staticmethod
    def checkpoint(path: str, synchronous: str) -> None:
        try:
            # mode=rw: a database deleted meanwhile is not created again, empty. One leading
            # slash: "file://x" would name a host.
            con = sqlite3.connect(
                f"file:/{quote(path.lstrip('/'))}?mode=rw",
                uri=True,
                isolation_level=None,
                timeout=0,
            )
        except sqlite3.Error:
            return
        try:
            con.execute(f"PRAGMA synchronous={synchronous}")
            copied_to = 0
            for _ in range(_Checkpointer.CATCH_UP):
                # (busy, pages in the WAL, pages copied) as of this pass's start
                busy, pages, _ = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy:
                    return  # another process's checkpointer is at it
                if pages - copied_to <= _Checkpointer.REST_PAGES:
                    break  # little came in during the last pass: as little comes now
                copied_to = pages
            with _gate.held():
                con.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except (sqlite3.Error, OSError):
            pass  # busy or gone: the next pass, or SQLite's own checkpoint, does it
        finally:
            con.close()


_checkpointer = _Checkpointer()


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
        _checkpointer.committed()
    else:
        with database.atomic():
            yield


def is_postgres() -> bool:
    return isinstance(database.obj, PooledPostgresqlDatabase)


@contextmanager
def association_session() -> Iterator[None]:
    """A connection for a whole association's work on SQLite, where it is a file handle and
    borrowing one from the pool for each instance cost ~25 µs of a small instance's ~600; on
    PostgreSQL, where each is a server process and several nodes share the server's limit,
    nothing: every unit of work borrows its own (:func:`session`) as before."""
    if is_postgres():
        yield
        return
    with session():
        yield


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
