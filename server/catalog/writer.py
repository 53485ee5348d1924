"""Catalog writes: record an instance (and its patient/study/series) in one transaction.

Counters (series/instances per study, instances per series) and ModalitiesInStudy are kept up to
date here so C-FIND and QIDO read them from the row instead of counting on every query.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from peewee import IntegrityError

from server.catalog.db import write_transaction
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


def _get_or_insert(model: Any, key_field: Any, key: str, values: Columns) -> tuple[Any, bool]:
    row = model.get_or_none(key_field == key)
    if row is not None:
        return row, False
    # ON CONFLICT DO NOTHING: a concurrent writer may insert the same parent in between.
    inserted = model.insert(**values).on_conflict_ignore().execute()
    return model.get(key_field == key), bool(inserted)


def _refresh_modalities(study_id: int) -> str | None:
    rows = (
        Series.select(Series.modality)
        .where((Series.study == study_id) & Series.modality.is_null(False))
        .distinct()
    )
    modalities = sorted({r.modality for r in rows if r.modality})
    return "\\".join(modalities) or None


def record_instance(record: InstanceRecord, *, replace: bool) -> str | None:
    """Insert the instance; return the file path of the version it replaced, if any.

    Raises :class:`DuplicateInstance` when the UID is known and ``replace`` is false.
    """
    uid = record.instance["sop_instance_uid"]
    try:
        with write_transaction():
            obsolete: str | None = None
            existing = Instance.get_or_none(Instance.sop_instance_uid == uid)
            if existing is not None:
                if not replace:
                    raise DuplicateInstance(uid)
                obsolete = existing.file_path
                delete_instance_row(existing)
            now = _now()
            key = patient_key(
                record.patient.get("patient_id"), record.patient.get("issuer_of_patient_id")
            )
            patient, _ = _get_or_insert(
                Patient, Patient.patient_key, key, {**record.patient, "patient_key": key}
            )
            study_uid = record.study["study_instance_uid"]
            study, _ = _get_or_insert(
                Study, Study.study_instance_uid, study_uid, {**record.study, "patient": patient.id}
            )
            series_uid = record.series["series_instance_uid"]
            series, new_series = _get_or_insert(
                Series, Series.series_instance_uid, series_uid, {**record.series, "study": study.id}
            )
            Instance.insert(**record.instance, series=series.id).execute()
            Series.update(
                number_of_series_related_instances=Series.number_of_series_related_instances + 1,
                updated_at=now,
            ).where(Series.id == series.id).execute()
            study_changes: dict[Any, Any] = {
                Study.number_of_study_related_instances: Study.number_of_study_related_instances
                + 1,
                Study.updated_at: now,
            }
            if new_series:
                study_changes[Study.number_of_study_related_series] = (
                    Study.number_of_study_related_series + 1
                )
                study_changes[Study.modalities_in_study] = _refresh_modalities(study.id)
            Study.update(study_changes).where(Study.id == study.id).execute()
            return obsolete
    except IntegrityError as exc:
        # Another association committed the same SOP Instance UID first.
        if Instance.get_or_none(Instance.sop_instance_uid == uid) is not None:
            raise DuplicateInstance(uid) from exc
        raise


def delete_instance_row(instance: Any) -> None:
    """Remove one instance row, fix the counters and drop parents left empty."""
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


def committed_path(storage_key: str) -> str | None:
    """The file the catalog references for a storage key (used by storage recovery)."""
    row = Instance.select(Instance.file_path).where(Instance.storage_key == storage_key).first()
    return row.file_path if row else None
