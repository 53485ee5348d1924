"""Run the Starlette app with uvicorn on a listening socket we were given.

``serve`` binds the HTTP port once, in the parent, and every worker process runs an event loop
accepting from that same socket (as the DIMSE side does), so HTTP requests are spread over the
cores the same way associations are.  With ``[tls] https = true`` the port speaks HTTPS only
(and WebSockets wss), with the certificate, CAs and cipher suites of the DICOM TLS port
(server/tls.py).
"""

from __future__ import annotations

import contextlib
import gc
import signal
import socket
from collections.abc import Generator
from typing import Any

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


def https_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS options for ``[tls] https = true`` (none otherwise).  uvicorn builds the
    context from them (Python's defaults: TLS 1.2 at least); the cipher suites are ours."""
    if not settings.tls_https:
        return {}
    from server import tls

    return {
        "ssl_certfile": settings.tls_certificate,
        "ssl_keyfile": settings.tls_private_key,
        "ssl_ca_certs": settings.tls_ca_certificates,
        "ssl_cert_reqs": tls.client_verify_mode(settings),
        "ssl_ciphers": tls.CIPHERS,
    }


def run_http(
    archive: Archive, sock: socket.socket, stop_signals: tuple[int, ...] = (signal.SIGTERM,)
) -> None:
    """Serve HTTP (HTTPS with ``[tls] https``) on ``sock`` in this thread until one of
    ``stop_signals`` arrives."""
    from server import metrics
    from server.web.app import build_app

    metrics.process_started("server")
    config = uvicorn.Config(
        build_app(archive),
        lifespan="off",
        access_log=False,
        log_config=None,  # uvicorn's records go to our root handler, in our format
        log_level="warning",
        proxy_headers=True,
        timeout_keep_alive=30,
        server_header=False,
        **https_options(archive.settings),
    )
    server = _Server(config)

    def stop(*_: object) -> None:
        server.should_exit = True

    for sig in stop_signals:
        signal.signal(sig, stop)
    # Everything built so far (modules, pydicom's dictionaries, the app) lives as long as the
    # process: moved out of the collector's generations, it is not rescanned by every full
    # collection that a large QIDO or C-FIND response triggers (1,932 studies: 87 -> 43 ms of
    # JSON building in one test process).
    gc.freeze()
    server.run(sockets=[sock])
