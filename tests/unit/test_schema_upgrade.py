"""A version-1 catalog (before study ownership) is upgraded in place at start-up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from peewee import OperationalError

from server.archive import close_archive, open_archive
from server.catalog.db import database, session
from server.catalog.schema import SCHEMA_VERSION, SchemaInfo
from server.config import Settings, load_settings


@contextmanager
def _reopened(tmp_path: Path, *changes: str, database_url: str = "") -> Iterator[Settings]:
    """A catalog made, then changed by ``changes`` (SQL) into what an older or damaged one
    looks like, closed and opened again as a starting server opens it."""
    overrides = {"data_dir": str(tmp_path / "data"), "database_url": database_url or None}
    settings = load_settings(None, overrides)
    open_archive(settings)
    with session():
        for sql in changes:
            database.execute_sql(sql)
    close_archive()
    open_archive(settings)
    try:
        yield settings
    finally:
        close_archive()


def test_old_catalog_gains_the_new_columns(tmp_path: Path) -> None:
    with (
        _reopened(
            tmp_path,
            'DROP INDEX IF EXISTS "study_institution"',
            'ALTER TABLE "study" DROP COLUMN "institution"',
            'ALTER TABLE "series" DROP COLUMN "last_accessed"',
            'DROP INDEX IF EXISTS "series_source_series"',
            'ALTER TABLE "series" DROP COLUMN "source_series"',
            'DROP TABLE "analysis_job"',
            'UPDATE "schema_info" SET "version" = 1',
        ),
        session(),
    ):
        study = {c.name for c in database.get_columns("study")}
        series = {c.name for c in database.get_columns("series")}
        assert "institution" in study and "last_accessed" in series
        assert "source_series" in series
        assert "analysis_job" in database.get_tables()
        assert SchemaInfo.select().first().version == SCHEMA_VERSION == 3


def test_a_dropped_index_of_an_existing_table_is_made_again(tmp_path: Path) -> None:
    with _reopened(tmp_path, 'DROP INDEX "study_accession_number"'), session():
        names = {i.name for i in database.get_indexes("study")}
        assert "study_accession_number" in names


def test_opening_a_current_catalog_waits_for_no_ingest(tmp_path: Path, pg_url: str) -> None:
    """Every process runs create_schema when it starts.  On a current PostgreSQL catalog it
    must not lock the tables an ingest is writing: CREATE INDEX IF NOT EXISTS takes a SHARE
    lock even for an index that exists, which deadlocked with C-STORE (0xA700 to storescu)."""
    import psycopg2

    from server.catalog.schema import create_schema

    settings = load_settings(None, {"data_dir": str(tmp_path / "data"), "database_url": pg_url})
    open_archive(settings)
    other = psycopg2.connect(pg_url)
    try:
        with other.cursor() as cursor:  # an ingest in flight: row locks on every level
            for table in ("patient", "study", "series", "instance"):
                cursor.execute(f'LOCK TABLE "{table}" IN ROW EXCLUSIVE MODE')
        with session():
            database.execute_sql("SET lock_timeout = '2s'")
            try:
                create_schema()
            finally:
                database.execute_sql("RESET lock_timeout")
    finally:
        other.rollback()
        other.close()
        close_archive()


def test_a_deadlock_victim_is_recorded_on_the_next_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL rolls back one of two deadlocked transactions (SQLSTATE 40P01); the
    instance is recorded by running the transaction again, not refused.  Other failures, and
    a deadlock on every attempt, still reach the caller (ingest answers 0xA700)."""
    from server.catalog import writer

    class Deadlock(Exception):
        pgcode = "40P01"

    failures: list[Exception] = []
    calls: list[int] = []

    def record(record: object, *, replace: bool, _retry: bool) -> str | None:
        calls.append(1)
        if failures:
            raise OperationalError(failures.pop(0))
        return None

    monkeypatch.setattr(writer, "_record_instance", record)
    some = cast(writer.InstanceRecord, object())
    failures[:] = [Deadlock("deadlock detected")] * (writer.TRANSIENT_ATTEMPTS - 1)
    assert writer.record_instance(some, replace=False) is None
    assert len(calls) == writer.TRANSIENT_ATTEMPTS
    calls.clear()
    failures[:] = [Deadlock("deadlock detected")] * writer.TRANSIENT_ATTEMPTS
    with pytest.raises(OperationalError):
        writer.record_instance(some, replace=False)
    assert len(calls) == writer.TRANSIENT_ATTEMPTS
    calls.clear()
    failures[:] = [ValueError("connection lost")]
    with pytest.raises(OperationalError):
        writer.record_instance(some, replace=False)
    assert len(calls) == 1


def test_instance_keys_searched_across_the_archive_are_indexed(tmp_path: Path) -> None:
    """SOP Class UID and Instance Number are indexed (an older catalog gains the indexes when
    opened), so a query for every instance of a class does not scan the instance table."""
    dropped = ('DROP INDEX "instance_sop_class_uid"', 'DROP INDEX "instance_instance_number"')
    with _reopened(tmp_path, *dropped), session():
        names = {i.name for i in database.get_indexes("instance")}
        assert {"instance_sop_class_uid", "instance_instance_number"} <= names
        plan = database.execute_sql(
            'EXPLAIN QUERY PLAN SELECT "id" FROM "instance" WHERE "sop_class_uid" = ?',
            ["1.2.840.10008.5.1.4.1.1.88.22"],
        ).fetchall()
        assert any("instance_sop_class_uid" in str(row) for row in plan), plan


def test_a_missing_index_is_built_while_writes_go_on(tmp_path: Path, pg_url: str) -> None:
    """A node starting against an older PostgreSQL catalog builds the index it lacks
    CONCURRENTLY: while the build waits for an ingest transaction in flight, other writes to
    the table go on. A plain CREATE INDEX queues a SHARE lock behind the open transaction and
    every later write queues behind that: the whole cluster's ingest stalls."""
    import threading

    import psycopg2

    settings = load_settings(None, {"data_dir": str(tmp_path / "data"), "database_url": pg_url})
    open_archive(settings)
    with session():
        database.execute_sql('DROP INDEX "study_accession_number"')
    close_archive()
    in_flight, other = psycopg2.connect(pg_url), psycopg2.connect(pg_url)
    errors: list[BaseException] = []
    starting = threading.Thread(target=lambda: _open(settings, errors))
    try:
        with in_flight.cursor() as cursor:  # an ingest's transaction, not yet committed
            cursor.execute("UPDATE study SET study_description = 'x' WHERE id = -1")
        starting.start()
        deadline = time.monotonic() + 10
        while not _building(other) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _building(other), "the index build never started"
        with other.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")
            cursor.execute("UPDATE study SET study_description = 'y' WHERE id = -2")
        other.commit()
    finally:
        in_flight.commit()
        starting.join(30)
        in_flight.close()
        other.close()
    try:
        assert not starting.is_alive() and not errors, errors
        with session():
            assert "study_accession_number" in _names()
    finally:
        close_archive()


def _open(settings: Any, errors: list[BaseException]) -> None:
    try:
        open_archive(settings)
    except BaseException as exc:  # the test reports it
        errors.append(exc)


def _building(conn: Any) -> bool:
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE query LIKE 'CREATE INDEX%%' AND state = 'active'"
        )
        found = bool(cursor.fetchone()[0])
    conn.commit()
    return found


def _names() -> set[str]:
    sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    return {str(row[0]) for row in database.execute_sql(sql).fetchall()}


def test_an_index_left_invalid_is_built_again(tmp_path: Path, pg_url: str) -> None:
    killed_build = (  # what a build killed half-way leaves behind
        "UPDATE pg_index SET indisvalid = false "
        "WHERE indexrelid = 'study_accession_number'::regclass"
    )
    with _reopened(tmp_path, killed_build, database_url=pg_url), session():
        valid = database.execute_sql(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'study_accession_number'::regclass"
        ).fetchone()[0]
        assert valid is True
