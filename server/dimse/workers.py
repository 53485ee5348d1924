"""Several DIMSE worker processes accepting on one listening socket.

pynetdicom runs each association on a thread, and the GIL serialises them: one process uses one
core however many modalities send at once.  ``serve`` therefore binds the port itself (so a port
already in use is a clear error, and no second server can silently share it as SO_REUSEPORT
would allow) and starts worker processes that inherit the socket and accept from it; the kernel
hands each new association to one of them.  Workers die with the parent (PR_SET_PDEATHSIG), so
killing the server kills all of it, and the parent restarts a worker that dies on its own.
The DICOM TLS port (``[tls] dicom_port``), when there is one, is bound and shared the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from server import metrics
from server.config import Settings

log = logging.getLogger(__name__)


def worker_count(settings: Settings) -> int:
    if settings.dimse_workers > 0:
        return settings.dimse_workers
    return max(1, min(os.cpu_count() or 1, 4))


def listen(settings: Settings, port: int | None = None) -> socket.socket:
    """The shared listening socket on ``port`` (default: the DICOM port); raises OSError when
    the port is taken."""
    family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.bind_address, settings.dimse_port if port is None else port))
    sock.listen(128)
    # Non-blocking: when two workers wake for one connection, the loser's accept() fails at
    # once (socketserver ignores that) instead of hanging its acceptor thread.
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the parent dies (a SIGKILLed server leaves nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class Supervisor:
    """Starts the workers, restarts any that die, and stops them all on request."""

    def __init__(
        self,
        argv: Sequence[str],
        sockets: Mapping[str, socket.socket],
        count: int,
        database_url: str = "",
    ) -> None:
        self.argv = list(argv)
        self.database_url = database_url
        self.sockets = dict(sockets)  # the worker's option (--listen-fd, ...) -> the socket
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopping = threading.Event()

    def _spawn(self) -> subprocess.Popen[bytes]:
        cmd = list(self.argv)
        for option, sock in self.sockets.items():
            cmd += [option, str(sock.fileno())]
        cmd += ["--parent-pid", str(os.getpid())]
        env = dict(os.environ)
        if self.database_url:
            # Not on the command line: the URL may hold a password, and /proc shows argv to all.
            env["IMAGING_DATABASE_URL"] = self.database_url
        fds = tuple(s.fileno() for s in self.sockets.values())
        return subprocess.Popen(cmd, pass_fds=fds, env=env)

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]

    def run(self) -> int:
        """Block until stopped; returns 2 if the workers cannot start."""
        started = time.monotonic()
        while not self.stopping.wait(0.5):
            for n, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None:
                    continue
                if time.monotonic() - started < 10 and code == 2:
                    log.error("DIMSE worker failed to start (exit %d)", code)
                    self.stop()
                    return 2
                log.error("DIMSE worker %d exited with %s; restarting it", proc.pid, code)
                metrics.process_dead(proc.pid)  # its live gauges go; counters stay
                self.procs[n] = self._spawn()
        return 0

    def stop(self) -> None:
        self.stopping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def worker_argv(args_config: str | None, settings: Settings) -> list[str]:
    """The command line of one worker: the same settings, passed explicitly."""
    argv = [sys.executable, "-m", "server"]
    if args_config:
        argv += ["--config", args_config]
    argv += [
        "dimse-worker",
        "--data-dir",
        str(settings.data_dir),
        "--ae-title",
        settings.ae_title,
        "--dimse-port",
        str(settings.dimse_port),
        "--http-port",
        str(settings.http_port),
    ]
    return argv  # the database URL travels in the environment (Supervisor._spawn)
