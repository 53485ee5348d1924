"""``serve`` starts the AI workers as child processes and restarts any that die.

They are separate processes so the AE and the web app never import torch (ARCHITECTURE.md 5)
and a crash in inference cannot take the archive down.  A worker that exits with
:data:`~server.ai.worker.EXIT_NOT_INSTALLED` (no AI extra, no model) is not restarted: the
archive keeps serving without the AI loop and says so once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from server import metrics
from server.config import Settings

log = logging.getLogger(__name__)
EXIT_NOT_INSTALLED = 3  # the AI extra or the model is missing: restarting will not help


def worker_argv(config_dir: Path | None, settings: Settings) -> list[str]:
    argv = [sys.executable, "-m", "server"]
    if config_dir:
        argv += ["--config", str(config_dir)]
    argv += ["worker", "--data-dir", str(settings.data_dir), "--parent-pid", str(os.getpid())]
    return argv


def worker_env(settings: Settings) -> dict[str, str]:
    """The worker's environment: ours, plus the catalog URL, which may hold a password and so
    does not go on a command line (any local user can read those in /proc)."""
    env = dict(os.environ)
    if settings.database_url:
        env["IMAGING_DATABASE_URL"] = settings.database_url
    return env


class WorkerLauncher:
    def __init__(self, argv: list[str], count: int, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = env
        self.count = count
        self.procs: list[subprocess.Popen[bytes] | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ai-launcher", daemon=True)

    def start(self) -> None:
        self.procs = [subprocess.Popen(self.argv, env=self.env) for _ in range(self.count)]
        self._thread.start()

    def _watch(self) -> None:
        backoff = [1.0] * self.count
        while not self._stop.wait(1.0):
            for n, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                if proc.returncode == EXIT_NOT_INSTALLED:
                    log.error("AI worker cannot run (see above); the AI loop is off")
                    self.procs[n] = None
                    continue
                log.error("AI worker %d exited with %s; restarting it", proc.pid, proc.returncode)
                metrics.process_dead(proc.pid)
                if self._stop.wait(backoff[n]):
                    return
                backoff[n] = min(backoff[n] * 2, 60.0)
                self.procs[n] = subprocess.Popen(self.argv, env=self.env)

    def stop(self) -> None:
        self._stop.set()
        running = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def start_workers(config_dir: Path | None, settings: Settings) -> WorkerLauncher | None:
    if not settings.ai_enabled or settings.ai_workers == 0:
        return None
    launcher = WorkerLauncher(
        worker_argv(config_dir, settings), settings.ai_workers, worker_env(settings)
    )
    launcher.start()
    return launcher
