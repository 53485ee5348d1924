"""Build and run the Application Entity from the settings.

Storage accepts every SOP class (pynetdicom's unrestricted storage service: newer classes such
as Label Map SEG are not in its tables) in whatever transfer syntax the modality proposes first,
and stores it as received.  Every socket gets TCP_NODELAY: DIMSE exchanges many small PDUs and
Nagle's algorithm costs an order of magnitude in throughput.

The DICOM TLS port (PS3.15 Annex B, ``[tls] dicom_port``) is a second server on the same AE
settings whose accepted connections are wrapped in TLS (server/tls.py); the handshake runs on
the association's thread, not the acceptor's, so a client that never finishes it cannot stop
others from connecting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from server import tls
from server.archive import Archive
from server.audit import AuditLog
from server.catalog.db import association_session
from server.config import Settings
from server.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from server.dimse import (
    fastpath,
    polling,
    retrieve,
    slots,
    storage_scp,
    strict,
    tracking,
    transport,
)
from server.dimse.handlers import Handlers, StoreTally
from server.dimse.worklist import MWL_FIND, WorklistHandlers
from server.errors import ConfigError
from server.ingest import Later

log = logging.getLogger(__name__)

_QUERY_RETRIEVE = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)

_config.UNRESTRICTED_STORAGE_SERVICE = True
polling.install()
retrieve.install()
fastpath.install()
transport.install()
slots.install()
strict.install()
# Identifiers can hold patient data; they go to the audit trail, not to the debug log.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # e.g. a non-TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_original_create_socket = AssociationSocket._create_socket


def _create_socket_nodelay(self: AssociationSocket, address: Any) -> socket.socket:
    sock: socket.socket = _original_create_socket(self, address)
    _nodelay(sock)
    return sock


# Outgoing associations (C-MOVE sub-operations, `send`, `echo`) are created inside pynetdicom;
# this is the one place their sockets can be reached.
AssociationSocket._create_socket = _create_socket_nodelay  # type: ignore[method-assign]


class NoDelayServer(ThreadedAssociationServer):
    """The AE's listening server: TCP_NODELAY on every accepted connection, and TLS on them
    when ``tls_context`` is set (the DICOM TLS port)."""

    tls_context: ssl.SSLContext | None = None
    audit: AuditLog | None = None  # where refused TLS handshakes are recorded
    storage: StorageService | None = None  # storage-only associations without pynetdicom

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        _nodelay(client)
        if self.tls_context is not None:
            # No I/O here: the handshake runs in process_request_thread.
            client = self.tls_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    active = 0  # associations this process is serving
    _active_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:  # counted before the next accept(), not when the thread runs
            self.active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._active_lock:
                self.active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self._serve_connection(request, client_address)
        finally:
            with self._active_lock:
                self.active -= 1

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        plain = not isinstance(request, ssl.SSLSocket)
        if plain and self.storage is not None and self.storage.serve(request, client_address):
            return
        if isinstance(request, ssl.SSLSocket):
            failure = tls.accept(request, self.ae.acse_timeout or 30.0)
            if failure is not None:
                peer = f"{client_address[0]}:{client_address[1]}"
                log.warning("TLS handshake with %s refused: %s", peer, failure)
                if self.audit is not None:
                    self.audit.record("dimse.tls", "-", "denied", peer=peer, reason=failure)
                with contextlib.suppress(OSError):
                    request.close()
                return
        super().process_request_thread(request, client_address)


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    # The same identity in every A-ASSOCIATE-AC, whichever path negotiates it (PS3.7 D.3.3.2).
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.connection_timeout = settings.acse_timeout
    if not settings.accept_unknown_calling_aes:
        titles = [p.ae_title for p in settings.peers]
        if not titles:
            raise ConfigError(
                "accept_unknown_calling_aes = false but peers.toml lists no peers: "
                "nobody could connect",
                str(settings.config_dir / "server.toml"),
            )
        ae.require_calling_aet = titles
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for sop_class in _QUERY_RETRIEVE:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES[:4])
    # Modality Worklist C-FIND (PS3.4 K.6.1) and MPPS N-CREATE/N-SET (PS3.4 F.7).
    ae.add_supported_context(ModalityWorklistInformationFind, ALL_TRANSFER_SYNTAXES[:4])
    ae.add_supported_context(ModalityPerformedProcedureStep, ALL_TRANSFER_SYNTAXES[:4])
    return ae


_OTHER_SERVICES = frozenset(
    str(uid)
    for uid in (
        *_QUERY_RETRIEVE,
        ModalityWorklistInformationFind,
        ModalityPerformedProcedureStep,
    )
)


class StorageService:
    """Decides which connections :mod:`server.dimse.storage_scp` serves, and serves them:
    those whose A-ASSOCIATE-RQ proposes storage (and Verification) only, from a calling AE
    the configuration accepts, while the association limit allows.  Everything else goes to
    pynetdicom, which negotiates, rejects or aborts it as before."""

    def __init__(self, ae: AE, settings: Settings, handlers: Handlers) -> None:
        self.ae = ae
        self.settings = settings
        self.handlers = handlers
        self._lock = threading.Lock()
        self._active = 0

    def _acceptable(self, request: storage_scp.AssociateRequest) -> bool:
        if request.extended or request.application_context != storage_scp.APPLICATION_CONTEXT:
            return False
        if not request.contexts or any(a in _OTHER_SERVICES for _, a, _ in request.contexts):
            return False
        if self.settings.accept_unknown_calling_aes:
            return True
        return self.settings.peer(request.calling_ae) is not None

    def serve(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Serve the connection and return True, or return False for pynetdicom to take it."""
        try:
            request = storage_scp.peek_storage_request(sock, self.settings.acse_timeout or 30.0)
        except storage_scp.Silent:
            # As pynetdicom's ARTIM timer would (PS3.8 9.1.5), without a second wait.
            with contextlib.suppress(OSError):
                sock.close()
            return True
        except (storage_scp.NotEligible, OSError, ValueError):
            return False
        if not self._acceptable(request):
            return False
        allowed, slot = slots.claim()
        if not allowed:
            return False  # pynetdicom answers with the A-ASSOCIATE-RJ
        with self._lock:
            local = len(self.ae.active_associations) + self._active
            if slot is None and local >= self.settings.max_associations:
                return False
            self._active += 1
        tally = StoreTally()
        peer = f"{address[0]}:{address[1]}"

        def store(
            context_class: str,
            syntax: str,
            command: storage_scp.Command,
            data: bytes,
            later: Later,
        ) -> tuple[int, str | None]:
            return self.handlers.store_received(
                tally,
                request.calling_ae,
                context_class,
                syntax,
                command.sop_class,
                command.sop_instance,
                data,
                later,
            )

        def ended(outcome: str) -> None:
            with self._lock:
                self._active -= 1
            if slot is not None:
                os.close(slot)
            if tally.stored or tally.duplicates or tally.refused:
                self.handlers.audit_stores(request.calling_ae, peer, tally)

        association = storage_scp.StorageAssociation(
            sock, request, peer, store, self.settings.max_pdu, self.settings.network_timeout
        )
        with association_session():
            storage_scp.serve(association, ended)
        return True


def event_handlers(archive: Archive, handlers: Handlers | None = None) -> Any:
    h = handlers or Handlers(archive)
    w = WorklistHandlers(archive)

    def find(event: evt.Event) -> Iterator[Any]:
        """C-FIND: the worklist model to the worklist, the others to the archive's handler."""
        if event.request.AffectedSOPClassUID == MWL_FIND:
            return tracking.timed_find(w.find(event), "worklist")
        return tracking.timed_find(h.find(event), "query_retrieve")

    return [
        (evt.EVT_C_STORE, h.store),
        (evt.EVT_C_FIND, find),
        (evt.EVT_C_MOVE, h.move),
        (evt.EVT_C_GET, h.get),
        (evt.EVT_N_CREATE, w.n_create),
        (evt.EVT_N_SET, w.n_set),
        (evt.EVT_CONN_CLOSE, h.closed),
        *tracking.HANDLERS,
    ]


ACCEPT_YIELD_S = 0.002  # per association in progress; far below an association's set-up


class InheritedSocketServer(NoDelayServer):
    """Accepts on a listening socket created by the parent process (see dimse/workers.py)."""

    listen_fd = -1

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = socket.socket(fileno=self.listen_fd)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # the parent already called listen()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Every worker wakes for a new connection and the first to accept() gets it, so four
        modalities connecting at once often landed three or four on one worker, whose GIL then
        paced them all while the other core idled. A worker that is already serving waits a
        moment per association before it accepts: an idle worker wins the race, a busy one
        still takes the connection when nobody else does (the others are as busy)."""
        if self.active:
            time.sleep(ACCEPT_YIELD_S * min(self.active, 8))
        return super().get_request()


def start_dimse(
    archive: Archive,
    listen_fd: int | None = None,
    tls_context: ssl.SSLContext | None = None,
    ae: AE | None = None,
) -> NoDelayServer:
    """Start serving in a background thread; the caller shuts the returned server down.

    With ``listen_fd`` the AE accepts on that inherited socket instead of binding its own; with
    ``tls_context`` it is the DICOM TLS port (PS3.15 Annex B) and every connection speaks TLS.
    Pass the first server's ``ae`` to the second so that both ports share one association
    limit.
    """
    settings = archive.settings
    ae = ae or build_ae(settings)
    server_class: type[NoDelayServer] = NoDelayServer
    if listen_fd is not None:
        server_class = type("Inherited", (InheritedSocketServer,), {"listen_fd": listen_fd})
    port = settings.dimse_port if tls_context is None else settings.tls_dicom_port
    handlers = Handlers(archive)
    server = cast(
        NoDelayServer,
        ae.make_server(
            (settings.bind_address, port),
            evt_handlers=event_handlers(archive, handlers),
            server_class=server_class,
        ),
    )
    server.tls_context = tls_context
    if settings.direct_storage and tls_context is None:
        server.storage = StorageService(ae, settings, handlers)
    server.audit = archive.audit
    # make_server() does not register the server with the AE (start_server() does), and
    # AssociationServer.shutdown() expects to find itself there.
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True).start()
    return server
