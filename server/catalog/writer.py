"""Catalog writes: record an instance (and its patient/study/series) in one transaction.

Counters (series/instances per study, instances per series) and ModalitiesInStudy are kept up to
date here so C-FIND and QIDO read them from the row instead of counting on every query.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from dataclasses import dataclass
from typing import Any

from peewee import IntegrityError, OperationalError

from server.catalog.db import database, is_postgres, write_transaction
from server.catalog.schema import Instance, Patient, Series, Study

Columns = dict[str, Any]


@dataclass(frozen=True)
class InstanceRecord:
    """Everything ingest hands the catalog for one instance."""

    patient: Columns
    study: Columns
    series: Columns
    instance: Columns  # includes file_path, storage_key, file_size, metadata, ...


class DuplicateInstance(Exception):
    """The SOP Instance UID is already catalogued (possibly by a concurrent writer)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def patient_key(patient_id: str | None, issuer: str | None) -> str:
    return f"{patient_id or ''}\\{issuer or ''}"


def _refresh_modalities(study_id: int) -> str | None:
    """ModalitiesInStudy: the distinct modalities of the study's series, sorted."""
    sql = f'SELECT DISTINCT "modality" FROM "series" WHERE "study_id" = {_param()}'
    rows = database.execute_sql(sql, [study_id]).fetchall()
    return "\\".join(sorted({row[0] for row in rows if row[0]})) or None


class _ParentCache:
    """Series UID -> (series id, study id) for series this process has written to.

    Most instances belong to a series that already exists; skipping three SELECTs per instance
    is most of the catalog's cost on the C-STORE path.  A stale entry (a series deleted by
    another process) shows up as a foreign-key failure and is retried on the slow path.
    """

    def __init__(self, limit: int = 20000) -> None:
        self._ids: dict[str, tuple[int, int]] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, series_uid: str) -> tuple[int, int] | None:
        return self._ids.get(series_uid)

    def put(self, series_uid: str, ids: tuple[int, int]) -> None:
        with self._lock:
            if len(self._ids) >= self._limit:
                self._ids.clear()
            self._ids[series_uid] = ids

    def clear(self) -> None:
        with self._lock:
            self._ids.clear()


parents = _ParentCache()
_SQL: dict[tuple[str, ...], str] = {}


def _q(name: str) -> str:
    return '"' + name + '"'


def _param() -> str:
    return "%s" if is_postgres() else "?"


@functools.cache
def _insert_sql(names: tuple[str, ...], param: str) -> str:
    """The instance INSERT for a column set, built once: Peewee's query builder costs more
    than the statement itself on this path."""
    return (
        f"INSERT INTO {_q(Instance._meta.table_name)} ({', '.join(map(_q, names))}) "
        f"VALUES ({', '.join([param] * len(names))})"
    )


@functools.cache
def _counter_updates(param: str) -> tuple[str, str]:
    """The series' then the study's instance counter +1 (parameters: time, row id)."""
    series, study = (
        f"UPDATE {_q(model._meta.table_name)} SET {_q(counter)} = {_q(counter)} + 1, "
        f'"updated_at" = {param} WHERE "id" = {param}'
        for model, counter in (
            (Series, "number_of_series_related_instances"),
            (Study, "number_of_study_related_instances"),
        )
    )
    return series, study


def _insert_instance(columns: Columns, series_id: int, now: dt.datetime) -> None:
    values = {**columns, "series_id": series_id, "received_at": now}
    names = tuple(values)
    database.execute_sql(_insert_sql(names, _param()), [values[n] for n in names])


def _bump_counters(series_id: int, study_id: int, now: dt.datetime) -> None:
    for sql, row_id in zip(_counter_updates(_param()), (series_id, study_id), strict=True):
        database.execute_sql(sql, [now, row_id])


def _insert_counted(columns: Columns, series_id: int, study_id: int, now: dt.datetime) -> None:
    """The instance of an existing series and its two counters, in one round trip to
    PostgreSQL (three statements in one simple query; the first failure ends it and the
    transaction is rolled back as for any other): each statement cost a round trip, about as
    much as its work."""
    values = {**columns, "series_id": series_id, "received_at": now}
    names = tuple(values)
    sql = "; ".join([_insert_sql(names, "%s"), *_counter_updates("%s")])
    database.execute_sql(sql, [*(values[n] for n in names), now, series_id, now, study_id])


@functools.cache
def _defaults(model: Any) -> tuple[tuple[str, Any], ...]:
    """(column, default) of the model's fields that have a default, looked up once."""
    return tuple(
        (field.column_name, field.default)
        for field in model._meta.sorted_fields
        if field.default is not None
    )


def _upsert(model: Any, key_column: str, values: Columns) -> tuple[int, bool]:
    """Insert a parent row unless its key exists; returns (id, inserted).

    ON CONFLICT DO NOTHING makes concurrent writers of the same study/series safe on both
    SQLite and PostgreSQL; RETURNING tells us whether this call created the row.
    """
    table = model._meta.table_name
    for column, default in _defaults(model):  # Peewee applies defaults in Python, not in SQL
        if column not in values:
            values[column] = default() if callable(default) else default
    names = tuple(values)
    param = _param()
    key = (param, "upsert", table, *names)
    sql = _SQL.get(key)
    if sql is None:
        sql = (
            f"INSERT INTO {_q(table)} ({', '.join(map(_q, names))}) "
            f"VALUES ({', '.join([param] * len(names))}) "
            f'ON CONFLICT ({_q(key_column)}) DO NOTHING RETURNING "id"'
        )
        _SQL[key] = sql
    row = database.execute_sql(sql, [values[n] for n in names]).fetchone()
    if row is not None:
        return int(row[0]), True
    select = f'SELECT "id" FROM {_q(table)} WHERE {_q(key_column)} = {param}'
    return int(database.execute_sql(select, [values[key_column]]).fetchone()[0]), False


def _ensure_parents(record: InstanceRecord, now: dt.datetime) -> tuple[int, int, bool]:
    """Find or create the patient, study and series rows; True when the series is new, in
    which case its counter starts at 1 and the study's are already updated for this instance.

    A new study is inserted already counting this instance, its series and its modality: a
    modality sending one image per study creates all three rows every time, and updating the
    study row just inserted cost a statement and the index pages of four columns again."""
    key = patient_key(record.patient.get("patient_id"), record.patient.get("issuer_of_patient_id"))
    patient_id, _ = _upsert(Patient, "patient_key", {**record.patient, "patient_key": key})
    study_id, new_study = _upsert(
        Study,
        "study_instance_uid",
        {
            **record.study,
            "patient_id": patient_id,
            "number_of_study_related_series": 1,
            "number_of_study_related_instances": 1,
            "modalities_in_study": record.series.get("modality") or None,
            "updated_at": now,
        },
    )
    series_id, new_series = _upsert(
        Series,
        "series_instance_uid",
        {
            **record.series,
            "study_id": study_id,
            "number_of_series_related_instances": 1,
            "updated_at": now,
        },
    )
    param = _param()
    if new_series and not new_study:
        database.execute_sql(
            'UPDATE "study" SET "number_of_study_related_series" = '
            '"number_of_study_related_series" + 1, "number_of_study_related_instances" = '
            f'"number_of_study_related_instances" + 1, "modalities_in_study" = {param}, '
            f'"updated_at" = {param} WHERE "id" = {param}',
            [_refresh_modalities(study_id), now, study_id],
        )
    elif new_study and not new_series:
        # The series UID is already another study's (a sender reusing UIDs): the instance
        # joins that series and is counted as any instance of an existing series is, so the
        # new study holds none of it yet.
        database.execute_sql(
            'UPDATE "study" SET "number_of_study_related_series" = 0, '
            '"number_of_study_related_instances" = 0, "modalities_in_study" = NULL '
            f'WHERE "id" = {param}',
            [study_id],
        )
    return series_id, study_id, new_series


# PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back
# and may simply be run again.
_TRANSIENT = ("40P01", "40001")
TRANSIENT_ATTEMPTS = 3


def is_transient(exc: BaseException) -> bool:
    """True for a failure that rolled the transaction back and is worth one more attempt."""
    original = getattr(exc, "orig", None)  # Peewee keeps the driver's exception here
    return getattr(original, "pgcode", None) in _TRANSIENT


def record_instance(record: InstanceRecord, *, replace: bool, _retry: bool = True) -> str | None:
    """Insert the instance in one transaction; return the file path of the version it replaced.

    Raises :class:`DuplicateInstance` when the UID is already catalogued and ``replace`` is false
    (the unique index decides, so concurrent writers of one UID cannot both succeed).  A
    transaction PostgreSQL aborted as a deadlock victim is run again: a lock conflict with
    another node's maintenance must not refuse an instance.
    """
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        try:
            return _record_instance(record, replace=replace, _retry=_retry)
        except OperationalError as exc:
            if attempt == TRANSIENT_ATTEMPTS or not is_transient(exc):
                raise
    raise AssertionError("unreachable")


def _record_instance(record: InstanceRecord, *, replace: bool, _retry: bool) -> str | None:
    uid = record.instance["sop_instance_uid"]
    series_uid = record.series["series_instance_uid"]
    cached = parents.get(series_uid)
    try:
        with write_transaction():
            obsolete: str | None = None
            if replace:
                existing = Instance.get_or_none(Instance.sop_instance_uid == uid)
                if existing is not None:
                    obsolete = existing.file_path
                    delete_instance_row(existing)
                    cached = None
            now = _now()
            counted = False  # a new series: its and its study's counters include this one
            if cached is not None:
                ids = cached
            else:
                series_id, study_id, counted = _ensure_parents(record, now)
                ids = (series_id, study_id)
            if counted:
                _insert_instance(record.instance, ids[0], now)
            elif is_postgres():
                _insert_counted(record.instance, ids[0], ids[1], now)
            else:
                _insert_instance(record.instance, ids[0], now)
                _bump_counters(ids[0], ids[1], now)
        parents.put(series_uid, ids)
        return obsolete
    except IntegrityError as exc:
        if Instance.get_or_none(Instance.sop_instance_uid == uid) is not None:
            raise DuplicateInstance(uid) from exc  # another writer committed it first
        if cached is not None and _retry:
            parents.clear()  # the cached series is gone
            return _record_instance(record, replace=replace, _retry=False)
        raise


def delete_instance_row(instance: Any) -> None:
    """Remove one instance row, fix the counters and drop parents left empty."""
    parents.clear()
    series = Series.get_by_id(instance.series_id)
    study = Study.get_by_id(series.study_id)
    Instance.delete().where(Instance.id == instance.id).execute()
    remaining = series.number_of_series_related_instances - 1
    if remaining <= 0:
        Series.delete().where(Series.id == series.id).execute()
        Study.update(
            number_of_study_related_series=Study.number_of_study_related_series - 1,
            number_of_study_related_instances=Study.number_of_study_related_instances - 1,
            modalities_in_study=_refresh_modalities(study.id),
        ).where(Study.id == study.id).execute()
    else:
        Series.update(number_of_series_related_instances=remaining).where(
            Series.id == series.id
        ).execute()
        Study.update(
            number_of_study_related_instances=Study.number_of_study_related_instances - 1
        ).where(Study.id == study.id).execute()
    study = Study.get_by_id(study.id)
    if study.number_of_study_related_series <= 0:
        Study.delete().where(Study.id == study.id).execute()
        if not Study.select().where(Study.patient == study.patient_id).exists():
            Patient.delete().where(Patient.id == study.patient_id).execute()


def is_catalogued(sop_instance_uid: str) -> bool:
    """Whether the UID is known already, asked before a file is written for it. On
    PostgreSQL the question is not asked (False): its round trip cost every instance ~0.1 ms,
    more than writing, and then removing, the file of the rare duplicate, which the instance
    table's unique index refuses all the same (:class:`DuplicateInstance`)."""
    if is_postgres():
        return False
    sql = 'SELECT 1 FROM "instance" WHERE "sop_instance_uid" = ?'
    return database.execute_sql(sql, [sop_instance_uid]).fetchone() is not None


def committed_path(storage_key: str) -> str | None:
    """The file the catalog references for a storage key (used by storage recovery)."""
    row = Instance.select(Instance.file_path).where(Instance.storage_key == storage_key).first()
    return row.file_path if row else None
