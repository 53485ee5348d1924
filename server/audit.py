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
