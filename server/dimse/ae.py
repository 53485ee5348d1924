"""Build and run the Application Entity from the settings.

Storage accepts every SOP class (pynetdicom's unrestricted storage service: newer classes such
as Label Map SEG are not in its tables) in whatever transfer syntax the modality proposes first,
and stores it as received.  Every socket gets TCP_NODELAY: DIMSE exchanges many small PDUs and
Nagle's algorithm costs an order of magnitude in throughput.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
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

from server.archive import Archive
from server.config import Settings
from server.dimse import fastpath, polling, retrieve, transport
from server.dimse.handlers import Handlers
from server.dimse.worklist import MWL_FIND, WorklistHandlers
from server.errors import ConfigError

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
    """The AE's listening server: TCP_NODELAY on every accepted connection."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        _nodelay(client)
        return client, address


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
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


def event_handlers(archive: Archive) -> Any:
    h = Handlers(archive)
    w = WorklistHandlers(archive)

    def find(event: evt.Event) -> Iterator[Any]:
        """C-FIND: the worklist model to the worklist, the others to the archive's handler."""
        if event.request.AffectedSOPClassUID == MWL_FIND:
            return w.find(event)
        return h.find(event)

    return [
        (evt.EVT_C_STORE, h.store),
        (evt.EVT_C_FIND, find),
        (evt.EVT_C_MOVE, h.move),
        (evt.EVT_C_GET, h.get),
        (evt.EVT_N_CREATE, w.n_create),
        (evt.EVT_N_SET, w.n_set),
        (evt.EVT_CONN_CLOSE, h.closed),
    ]


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


def start_dimse(archive: Archive, listen_fd: int | None = None) -> NoDelayServer:
    """Start serving in a background thread; the caller shuts the returned server down.

    With ``listen_fd`` the AE accepts on that inherited socket instead of binding its own.
    """
    settings = archive.settings
    ae = build_ae(settings)
    server_class: type[NoDelayServer] = NoDelayServer
    if listen_fd is not None:
        server_class = type("Inherited", (InheritedSocketServer,), {"listen_fd": listen_fd})
    server = ae.make_server(
        (settings.bind_address, settings.dimse_port),
        evt_handlers=event_handlers(archive),
        server_class=server_class,
    )
    # make_server() does not register the server with the AE (start_server() does), and
    # AssociationServer.shutdown() expects to find itself there.
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True).start()
    return cast(NoDelayServer, server)
