"""A process and its descendants from /proc: their pids and summed resident memory, sampled
in the background (the server's parent process, its DIMSE/HTTP workers and anything they
start). Shared by tools/fuzz.py and tools/load.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            out.append(int(entry.name))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children(current))
    return tree


def rss_mb(pids: Iterable[int]) -> float:
    """Summed VmRSS of ``pids`` in MiB (processes that are gone count 0)."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


class RssSampler:
    """The summed RSS of a process tree, sampled every ``interval`` seconds: the peak, the
    mean and the samples (seconds since start, MiB)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_mb = 0.0
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            mb = rss_mb(process_tree(self.pid))
            self.samples.append((time.monotonic() - started, mb))
            self.peak_mb = max(self.peak_mb, mb)
            self._stop.wait(self.interval)

    @property
    def mean_mb(self) -> float:
        return sum(mb for _, mb in self.samples) / len(self.samples) if self.samples else 0.0

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
