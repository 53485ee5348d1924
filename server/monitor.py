"""System alerts from real measurements: memory use (``/proc/meminfo``) and the disk use of the
data directory, published as ``system_alert`` events (workstation-api.md, "System Alerts").

An alert is published when usage crosses a threshold upwards (85 % warning, 95 % critical by
default), once per crossing: a level is kept until usage falls ``hysteresis`` points below its
threshold, so usage wavering around a threshold does not repeat the alert.  Of the processes
sharing a data directory only one samples (the holder of ``monitor.lock``), so each alert is
published once; another takes over when that process ends.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server import events

log = logging.getLogger(__name__)

GIB = 1024**3
_RANK = {None: 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class Reading:
    used_percent: float
    available_bytes: int


Reader = Callable[[], Reading | None]


def read_memory(meminfo: Path = Path("/proc/meminfo")) -> Reading | None:
    """Memory in use as the kernel counts it: 1 - MemAvailable / MemTotal."""
    values: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                values[name] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    total, available = values.get("MemTotal", 0), values.get("MemAvailable")
    if total <= 0 or available is None:
        return None
    return Reading(100.0 * (total - available) / total, available)


def disk_reader(root: Path) -> Reader:
    """Disk use of the file system holding ``root`` (space free to this user counts as free)."""

    def read() -> Reading | None:
        try:
            usage = shutil.disk_usage(root)
        except OSError:
            return None
        if usage.total <= 0:
            return None
        return Reading(100.0 * (usage.total - usage.free) / usage.total, usage.free)

    return read


_TEXT = {
    ("memory", "warning"): (
        "System memory usage above {t:g}%",
        "Consider closing unused images or increasing system memory",
    ),
    ("memory", "critical"): (
        "System memory usage above {t:g}%",
        "Memory is nearly exhausted: close unused images, stop large jobs or add memory now",
    ),
    ("disk", "warning"): (
        "Disk usage of the image storage above {t:g}%",
        "Free space: purge expired deleted series, move old studies elsewhere or add storage",
    ),
    ("disk", "critical"): (
        "Disk usage of the image storage above {t:g}%",
        "The image storage is nearly full and new images will be refused: free space now",
    ),
}


class SystemMonitor:
    """Samples ``readers`` every ``interval`` seconds and publishes an alert per crossing.

    :meth:`check` is one sample (what the tests call with injected readers); :meth:`start`
    runs it on a daemon thread in the process that holds ``lock_path``.
    """

    def __init__(
        self,
        root: Path,
        *,
        interval: float = 15.0,
        warning: float = 85.0,
        critical: float = 95.0,
        hysteresis: float = 2.0,
        readers: dict[str, Reader] | None = None,
        publish: Callable[[events.Event], None] = events.publish,
        warning_dismiss_seconds: int = 30,
        lock_path: Path | None = None,
    ) -> None:
        if not 0 < warning < critical <= 100:
            raise ValueError("thresholds must satisfy 0 < warning < critical <= 100")
        self.interval = interval
        self.thresholds = {"warning": warning, "critical": critical}
        self.hysteresis = hysteresis
        self.readers = readers or {"memory": read_memory, "disk": disk_reader(root)}
        self.publish = publish
        self.warning_dismiss_seconds = warning_dismiss_seconds
        self.lock_path = lock_path or root / "monitor.lock"
        self.levels: dict[str, str | None] = dict.fromkeys(self.readers)
        self._lock_fd = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def level(self, percent: float, previous: str | None) -> str | None:
        """The level ``percent`` is at, given the one before (kept within the hysteresis)."""
        for name in ("critical", "warning"):
            threshold = self.thresholds[name]
            held = _RANK[previous] >= _RANK[name]
            if percent >= threshold or (held and percent >= threshold - self.hysteresis):
                return name
        return None

    def check(self) -> list[events.Event]:
        """Sample every reader once; the alerts to publish (the crossings since last time)."""
        alerts = []
        for category, read in self.readers.items():
            try:
                reading = read()
            except Exception:
                log.exception("reading %s usage failed", category)
                continue
            if reading is None:
                continue
            previous = self.levels.get(category)
            now = self.level(reading.used_percent, previous)
            self.levels[category] = now
            if now is not None and _RANK[now] > _RANK[previous]:
                alerts.append(self._alert(category, now, reading))
        return alerts

    def _alert(self, category: str, severity: str, reading: Reading) -> events.Event:
        message, recommendation = _TEXT.get((category, severity), ("{t:g}%", ""))
        threshold = self.thresholds[severity]
        data: dict[str, Any] = {
            "alert_id": f"alert_{secrets.token_hex(6)}",
            "severity": severity,
            "category": category,
            "message": message.format(t=threshold),
            "details": {
                "current_usage_percent": round(reading.used_percent, 1),
                "available_gb": round(reading.available_bytes / GIB, 1),
                "threshold_percent": threshold,
                "recommendation": recommendation,
            },
            # A critical alert stays until the user dismisses it.
            "auto_dismiss_seconds": self.warning_dismiss_seconds if severity == "warning" else None,
        }
        return events.Event("system_alert", data, institution=None)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="system-monitor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _leader(self) -> bool:
        """Whether this process samples (holds the data directory's monitor lock)."""
        if self._lock_fd >= 0:
            return True
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _run(self) -> None:
        while True:
            try:
                if self._leader():
                    for alert in self.check():
                        log.warning("system alert: %s", alert.data["message"])
                        self.publish(alert)
            except Exception:
                log.exception("system monitor failed")
            if self._stop.wait(self.interval):
                return
