"""The stability trigger: a series that has received nothing for ``stable_age`` seconds and
matches an AI rule (``ae_config/ai_rules.toml``) gets one job per version.

It reads the catalog, not the ingest events, so it sees every way images arrive (C-STORE,
STOW-RS, uploads, ``import``, on any node) and survives restarts: the catalog's
``series.updated_at`` moves with each stored instance, and a watermark in ``ai_state`` records
how far the trigger has looked.  A series is a new *version* whenever its instance count or
last update changed; the job queue's unique (series, version) index makes "once per version"
hold when several workers look at the same moment.

On the first look ever (a new catalog or AI just enabled), series updated in the previous
:data:`FIRST_LOOK_BACK` seconds are considered: images that arrived while the worker was still
starting are analysed, an archive's back catalogue is not (use ``POST /api/v1/ai/analyze``).

Orthanc's equivalent is its ``StableAge`` and ``OnStableSeries`` Lua callback (60 s default).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from typing import Any

import orjson

from server.ai import jobs
from server.catalog.db import database, is_postgres, session, write_transaction
from server.catalog.schema import AiState
from server.config import AiRule, Settings
from server.dicom import json as dicom_json

log = logging.getLogger(__name__)

WATERMARK = "stable_series_watermark"
FIRST_LOOK_BACK = 24 * 3600.0
# Each look also re-reads this many seconds before the watermark: a series whose last instance
# committed late (a slow transaction) or came from a node whose clock lags ours is still seen.
# Looking twice is harmless: the job's unique (series, version) index keeps one.
OVERLAP = 120.0
ADVANCE_EVERY = 10.0  # seconds: the watermark is written at most this often (a write lock)
_decided: dict[tuple[str, str], bool] = {}  # (series, version) already looked at, this process
_DECIDED_MAX = 50_000
_last_advance: list[dt.datetime] = []
# Single-frame images the volume loader reads (PS3.4 B.5): MR Image Storage.
ANALYSABLE_CLASSES = ("1.2.840.10008.5.1.4.1.1.4",)


@dataclass(frozen=True)
class StableSeries:
    series_uid: str
    study_uid: str
    institution: str | None
    modality: str
    description: str
    body_part: str
    instances: int
    updated_at: dt.datetime

    @property
    def version(self) -> str:
        return f"{self.instances}@{self.updated_at.isoformat()}"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


def _watermark(cutoff: dt.datetime) -> dt.datetime:
    row = AiState.get_or_none(AiState.key == WATERMARK)
    if row is None:
        return cutoff - dt.timedelta(seconds=FIRST_LOOK_BACK)
    return dt.datetime.fromisoformat(row.value)


def _advance(to: dt.datetime) -> None:
    """Move the watermark forward (never back: another node may have looked further)."""
    with write_transaction():
        row = AiState.get_or_none(AiState.key == WATERMARK)
        if row is None:
            AiState.create(key=WATERMARK, value=to.isoformat())
        elif dt.datetime.fromisoformat(row.value) < to:
            AiState.update(value=to.isoformat()).where(AiState.key == WATERMARK).execute()


def stable_series(since: dt.datetime, cutoff: dt.datetime) -> list[StableSeries]:
    """Series last updated in (since, cutoff], oldest first."""
    param = "%s" if is_postgres() else "?"
    rows = database.execute_sql(
        'SELECT se."series_instance_uid", st."study_instance_uid", st."institution", '
        'se."modality", se."series_description", se."body_part_examined", '
        'se."number_of_series_related_instances", se."updated_at" '
        'FROM "series" AS se JOIN "study" AS st ON se."study_id" = st."id" '
        f'WHERE se."updated_at" > {param} AND se."updated_at" <= {param} '
        'ORDER BY se."updated_at"',
        [since, cutoff],
    ).fetchall()
    return [
        StableSeries(
            str(r[0]),
            str(r[1]),
            r[2],
            str(r[3] or ""),
            str(r[4] or ""),
            str(r[5] or ""),
            int(r[6] or 0),
            _as_datetime(r[7]),
        )
        for r in rows
    ]


def series_facts(series_uid: str) -> tuple[set[str], str]:
    """The SOP classes in the series and the first instance's Scanning Sequence (0018,0020)."""
    param = "%s" if is_postgres() else "?"
    classes = {
        str(r[0])
        for r in database.execute_sql(
            'SELECT DISTINCT i."sop_class_uid" FROM "instance" AS i JOIN "series" AS se '
            f'ON i."series_id" = se."id" WHERE se."series_instance_uid" = {param}',
            [series_uid],
        ).fetchall()
    }
    first = database.execute_sql(
        'SELECT i."metadata" FROM "instance" AS i JOIN "series" AS se ON i."series_id" = se."id" '
        f'WHERE se."series_instance_uid" = {param} ORDER BY i."id" LIMIT 1',
        [series_uid],
    ).fetchone()
    sequence = ""
    if first is not None:
        header = orjson.loads(first[0])
        sequence = "\\".join(dicom_json.text_values(header.get("00180020")))
    return classes, sequence


def matching_rule(series: StableSeries, rules: tuple[AiRule, ...]) -> AiRule | None:
    """The first rule the series satisfies (every given field), or None."""
    facts: tuple[set[str], str] | None = None
    for rule in rules:
        if rule.modality and series.modality.upper() != rule.modality.upper():
            continue
        if series.instances < rule.min_instances:
            continue
        if not _search(rule.series_description, series.description):
            continue
        if not _search(rule.body_part, series.body_part):
            continue
        if facts is None:
            facts = series_facts(series.series_uid)
        classes, sequence = facts
        if not classes or not classes <= set(ANALYSABLE_CLASSES):
            continue  # derived objects, secondary captures, multi-frame: not a volume we read
        if not _search(rule.scanning_sequence, sequence):
            continue
        return rule
    return None


def _search(pattern: str, value: str) -> bool:
    return not pattern or re.search(pattern, value, re.IGNORECASE) is not None


def scan(settings: Settings, now: dt.datetime | None = None) -> list[str]:
    """Queue a job for each series that became stable since the last look; the new job ids."""
    cutoff = (now or _utcnow()) - dt.timedelta(seconds=settings.ai_stable_age)
    queued: list[str] = []
    with session():
        since = _watermark(cutoff)
        if cutoff <= since:
            return queued
        looked_from = since - dt.timedelta(seconds=OVERLAP)
        for series in stable_series(looked_from, cutoff):
            key = (series.series_uid, series.version)
            if key in _decided:
                continue  # looked at in an earlier pass (the overlap brings it back)
            if len(_decided) >= _DECIDED_MAX:
                _decided.clear()
            rule = matching_rule(series, settings.ai_rules)
            _decided[key] = rule is not None
            if rule is None or jobs.exists(series.series_uid, series.version):
                continue
            job_id = jobs.enqueue(
                series.series_uid,
                series.study_uid,
                series.institution,
                version=series.version,
                trigger="stable_series",
                max_attempts=settings.ai_max_attempts,
                requested_by=f"rule:{rule.name}",
                config={"analysis_type": "prostate_comprehensive", "rule": rule.name},
            )
            if job_id is not None:
                log.info("stable series %s (%s): %s", series.series_uid, rule.name, job_id)
                queued.append(job_id)
        if not _last_advance or (cutoff - _last_advance[0]).total_seconds() >= ADVANCE_EVERY:
            _advance(cutoff)
            _last_advance[:] = [cutoff]
    return queued
