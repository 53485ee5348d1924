"""The audit trail: one JSON line per access to patient data.

Who (calling AE title or user, and network address), what (action, level, keys, UIDs, counts)
and the outcome.  It is an append-only file, ``audit.log`` in the data directory, written by
every process (appends of one line are atomic, so workers can share it); ship it to a SIEM or
rotate it with the usual tools.  DIMSE stores are summarised once per association rather than
per instance.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._lock = threading.Lock()

    def record(self, action: str, actor: str, outcome: str = "ok", **details: Any) -> None:
        entry = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "action": action,
            "actor": actor,
            "outcome": outcome,
            **details,
        }
        line = orjson.dumps(entry, default=str) + b"\n"
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
SUBJECTS_CAP = 100


def subjects(rows: Iterable[Mapping[int, Any]]) -> dict[str, Any]:
    """The patients and studies a query's results touched (by tag values), for the trail;
    at most ``SUBJECTS_CAP`` of each, with a flag when there were more."""
    patients: dict[str, None] = {}
    studies: dict[str, None] = {}
    for values in rows:
        if values.get(_PATIENT_ID):
            patients[str(values[_PATIENT_ID])] = None
        if values.get(_STUDY_UID):
            studies[str(values[_STUDY_UID])] = None
    out: dict[str, Any] = {
        "patients": list(patients)[:SUBJECTS_CAP],
        "studies": list(studies)[:SUBJECTS_CAP],
    }
    if len(patients) > SUBJECTS_CAP or len(studies) > SUBJECTS_CAP:
        out["subjects_truncated"] = True
    return out


def history(
    path: Path,
    patient_id: str,
    study_uids: Iterable[str] = (),
    series_uids: Iterable[str] = (),
    since: str = "",
) -> Iterator[dict[str, Any]]:
    """Every entry of the trail that touched a patient: by PatientID, or by one of the
    patient's studies or series (the caller resolves those from the catalog), oldest first."""
    studies, series = set(study_uids), set(series_uids)
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for line in fh:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(entry, dict) or (since and str(entry.get("time", "")) < since):
                continue
            raw_keys = entry.get("keys")
            keys: dict[str, Any] = raw_keys if isinstance(raw_keys, dict) else {}
            hit = (
                entry.get("patient_id") == patient_id
                or patient_id in (entry.get("patients") or ())
                or keys.get("PatientID") == patient_id
                or str(entry.get("study")) in studies
                or str(entry.get("series")) in series
                or bool(studies.intersection(entry.get("studies") or ()))
                or str(keys.get("StudyInstanceUID")) in studies
                or str(keys.get("SeriesInstanceUID")) in series
            )
            if hit:
                yield entry
