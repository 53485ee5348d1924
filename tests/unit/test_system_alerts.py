"""System alerts (workstation-api.md, "System Alerts") from injected readings: thresholds, one
alert per crossing, hysteresis, the documented shape, and the real readers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from server import events
from server.monitor import Reading, SystemMonitor, disk_reader, read_memory

GIB = 1024**3


class Feed:
    """Readings served one per sample."""

    def __init__(self, *percents: float | None) -> None:
        self.percents = list(percents)

    def __call__(self) -> Reading | None:
        percent = self.percents.pop(0)
        return None if percent is None else Reading(percent, int(3.25 * GIB))


def monitor(tmp_path: Path, **readers: Feed) -> SystemMonitor:
    return SystemMonitor(tmp_path, readers=dict(readers), publish=lambda e: None)


def severities(mon: SystemMonitor, samples: int) -> list[list[str]]:
    return [[str(e.data["severity"]) for e in mon.check()] for _ in range(samples)]


def test_one_alert_per_crossing_not_per_sample(tmp_path: Path) -> None:
    mon = monitor(tmp_path, memory=Feed(50, 86, 87, 90, 96, 97, 99, 50, 88, 88))
    assert severities(mon, 10) == [
        [],
        ["warning"],  # crossed 85 %
        [],
        [],
        ["critical"],  # crossed 95 %
        [],
        [],
        [],  # back to normal: nothing to announce
        ["warning"],  # a new crossing
        [],
    ]


def test_hysteresis_keeps_a_wavering_level_quiet(tmp_path: Path) -> None:
    mon = monitor(tmp_path, disk=Feed(85.5, 84.9, 85.2, 83.5, 85.1, 82.9, 85.0, 95.0, 93.5, 95.1))
    assert severities(mon, 10) == [
        ["warning"],
        [],  # 84.9 is within 2 points of 85: still the same warning
        [],
        [],
        [],
        [],  # 82.9: below 83, the warning is over ...
        ["warning"],  # ... so 85.0 is a new crossing
        ["critical"],
        [],  # 93.5 holds critical (within 2 points of 95)
        [],
    ]


def test_jump_straight_to_critical_is_one_alert(tmp_path: Path) -> None:
    mon = monitor(tmp_path, memory=Feed(10, 99, 94, 96, 90, 96))
    # 94 is within the hysteresis of critical; 90 is not, so 96 after it is a new crossing.
    assert severities(mon, 6) == [[], ["critical"], [], [], [], ["critical"]]


def test_categories_are_independent_and_missing_readings_change_nothing(tmp_path: Path) -> None:
    mon = monitor(tmp_path, memory=Feed(90, None, 91), disk=Feed(None, 96, 96))
    got = [[(e.data["category"], e.data["severity"]) for e in mon.check()] for _ in range(3)]
    assert got == [[("memory", "warning")], [("disk", "critical")], []]


def test_alert_has_the_documented_shape(tmp_path: Path) -> None:
    mon = monitor(tmp_path, memory=Feed(87.04))
    (alert,) = mon.check()
    assert alert.kind == "system_alert" and alert.institution is None
    data = alert.data
    assert data["alert_id"].startswith("alert_")
    assert data["severity"] == "warning" and data["category"] == "memory"
    assert data["message"] == "System memory usage above 85%"
    details = data["details"]
    assert details["current_usage_percent"] == 87.0
    assert details["available_gb"] == 3.2  # 3.25 GiB, one decimal
    assert details["recommendation"]
    assert data["auto_dismiss_seconds"] == 30
    critical = monitor(tmp_path, disk=Feed(97)).check()[0].data
    assert critical["severity"] == "critical" and critical["auto_dismiss_seconds"] is None
    assert critical["message"] == "Disk usage of the image storage above 95%"


def test_thresholds_are_configurable_and_checked(tmp_path: Path) -> None:
    mon = SystemMonitor(
        tmp_path, warning=50, critical=60, readers={"memory": Feed(55, 61)}, publish=print
    )
    assert severities(mon, 2) == [["warning"], ["critical"]]
    with pytest.raises(ValueError):
        SystemMonitor(tmp_path, warning=90, critical=80)


def test_monitor_thread_publishes_and_only_one_process_samples(tmp_path: Path) -> None:
    got: list[events.Event] = []
    arrived = threading.Event()

    def publish(event: events.Event) -> None:
        got.append(event)
        arrived.set()

    first = SystemMonitor(
        tmp_path, interval=0.05, readers={"disk": lambda: Reading(99, 0)}, publish=publish
    )
    first.start()
    try:
        assert arrived.wait(10)
        # A second monitor on the same data directory (another worker) does not sample.
        assert first._leader()
        other = SystemMonitor(tmp_path, readers={"disk": lambda: Reading(99, 0)})
        assert not other._leader()
    finally:
        first.stop()
    assert [e.data["severity"] for e in got] == ["critical"]
    # Once the leader stops, another can take over.
    assert other._leader()
    other.stop()


def test_real_readers(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree: 1 kB\nMemAvailable:    2400000 kB\n")
    reading = read_memory(meminfo)
    assert reading is not None
    assert reading.used_percent == pytest.approx(85.0)
    assert reading.available_bytes == 2400000 * 1024
    assert read_memory(tmp_path / "absent") is None
    live = read_memory()
    assert live is not None and 0 <= live.used_percent <= 100
    disk = disk_reader(tmp_path)()
    assert disk is not None and 0 <= disk.used_percent <= 100 and disk.available_bytes > 0
