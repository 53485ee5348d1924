"""Run the Starlette app with uvicorn on a listening socket we were given.

``serve`` binds the HTTP port once, in the parent, and every worker process runs an event loop
accepting from that same socket (as the DIMSE side does), so HTTP requests are spread over the
cores the same way associations are.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Generator

import uvicorn

from server.archive import Archive
from server.config import Settings


def listen_http(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.http_bind_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.http_bind_address, settings.http_port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals are ours to route (SIGTERM stops a worker, the parent handles Ctrl-C).
        yield


def run_http(
    archive: Archive, sock: socket.socket, stop_signals: tuple[int, ...] = (signal.SIGTERM,)
) -> None:
    """Serve HTTP on ``sock`` in this thread until one of ``stop_signals`` arrives."""
    from server.web.app import build_app

    config = uvicorn.Config(
        build_app(archive),
        lifespan="off",
        access_log=False,
        log_level="warning",
        proxy_headers=True,
        timeout_keep_alive=30,
        server_header=False,
    )
    server = _Server(config)

    def stop(*_: object) -> None:
        server.should_exit = True

    for sig in stop_signals:
        signal.signal(sig, stop)
    server.run(sockets=[sock])
