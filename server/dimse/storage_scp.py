"""Storage-only associations, served without pynetdicom's reactor threads.

A modality sending images proposes storage SOP classes (and often Verification) and nothing
else.  For those associations the whole exchange is a loop of C-STORE-RQ in, C-STORE-RSP out,
which pynetdicom runs through two threads, a state machine, queues, pydicom-decoded command
sets and events: about a third of the CPU a CT slice costs.  Here the request is decoded
where it arrives and answered from the same thread.

:func:`peek_storage_request` looks at the A-ASSOCIATE-RQ with ``MSG_PEEK``, so when anything
makes the association ineligible (other services, extended negotiation, user identity, a
calling AE the configuration may refuse, the association limit reached, TLS) the connection
goes to pynetdicom untouched, which negotiates, rejects or aborts as before.

PS3.8 9.3 (PDU structure), 9.3.2/9.3.3 (A-ASSOCIATE-RQ/AC), 9.3.5 (P-DATA-TF), 9.3.6/9.3.7
(A-RELEASE), 9.3.8 (A-ABORT), Annex E (message control header); PS3.7 9.1.1/9.3.1 (C-STORE),
9.1.5/9.3.5 (C-ECHO).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from server import metrics
from server.dicom.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_valid_uid,
)
from server.dimse.fastpath import pdata_message, response_command
from server.dimse.transport import recv_exactly
from server.ingest import Later, run_later
from server.telemetry import association_var

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
# Transfer syntaxes a Verification context may use (no data set ever travels on it).
_VERIFICATION_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
)
_LARGEST_REQUEST = 64 * 1024  # an A-ASSOCIATE-RQ beyond this goes to pynetdicom
_PEEK_WAIT = 0.001

# PS3.8 9.3.8: A-ABORT source 2 (service provider) with a reason.
ABORT_UNRECOGNISED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_INVALID_PARAMETER = 6


@dataclass
class AssociateRequest:
    """What an A-ASSOCIATE-RQ proposes (PS3.8 9.3.2)."""

    raw_called: bytes
    raw_calling: bytes
    raw_reserved: bytes
    calling_ae: str
    application_context: str = ""
    # (context id, abstract syntax, transfer syntaxes) in the order proposed
    contexts: list[tuple[int, str, list[str]]] = field(default_factory=list)
    max_length: int = 0  # the peer's Maximum Length Received (0: no limit)
    extended: bool = False  # role selection, async operations, user identity, ...


class NotEligible(Exception):
    """The association goes to pynetdicom."""


class Silent(NotEligible):
    """The peer sent no A-ASSOCIATE-RQ in time, or closed: nothing for anyone to answer."""


def _uid(data: bytes) -> str:
    value = data.decode("ascii", "replace").rstrip("\0 ")
    if not is_valid_uid(value):
        raise NotEligible("not a UID")
    return value


def _items(data: bytes) -> list[tuple[int, bytes]]:
    """Items and sub-items: type (1), reserved (1), length (2, big endian), value."""
    out = []
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            raise NotEligible("truncated item")
        kind, length = data[at], struct.unpack(">H", data[at + 2 : at + 4])[0]
        if at + 4 + length > len(data):
            raise NotEligible("item longer than the PDU")
        out.append((kind, data[at + 4 : at + 4 + length]))
        at += 4 + length
    return out


def parse_request(pdu: bytes) -> AssociateRequest:
    """Decode an A-ASSOCIATE-RQ PDU; :class:`NotEligible` for anything unusual."""
    if len(pdu) < 74 or pdu[0] != 0x01:
        raise NotEligible("not an A-ASSOCIATE-RQ")
    if not struct.unpack(">H", pdu[6:8])[0] & 1:
        raise NotEligible("protocol version 1 not offered")
    for title in (pdu[10:26], pdu[26:42]):
        # PS3.5 AE: printable ISO 646 without backslash, not all spaces; anything else is
        # pynetdicom's to refuse, as before.
        if not title.strip(b" ") or any(c < 0x20 or c > 0x7E or c == 0x5C for c in title):
            raise NotEligible("AE title outside the AE value representation")
    request = AssociateRequest(
        raw_called=pdu[10:26],
        raw_calling=pdu[26:42],
        raw_reserved=pdu[42:74],
        calling_ae=pdu[26:42].decode("ascii").strip(" "),
    )
    for kind, value in _items(pdu[74:]):
        if kind == 0x10:
            request.application_context = _uid(value)
        elif kind == 0x20:
            if len(value) < 4:
                raise NotEligible("short presentation context")
            abstract, syntaxes = "", []
            for sub, sub_value in _items(value[4:]):
                if sub == 0x30:
                    abstract = _uid(sub_value)
                elif sub == 0x40:
                    syntaxes.append(_uid(sub_value))
                else:
                    raise NotEligible("unknown presentation context sub-item")
            if not abstract or not syntaxes:
                raise NotEligible("presentation context without its syntaxes")
            if value[0] % 2 == 0:
                raise NotEligible("even presentation context ID")  # PS3.8 9.3.2.2: odd
            request.contexts.append((value[0], abstract, syntaxes))
        elif kind == 0x50:
            for sub, sub_value in _items(value):
                if sub == 0x51 and len(sub_value) == 4:
                    request.max_length = struct.unpack(">I", sub_value)[0]
                elif sub not in (0x51, 0x52, 0x55):
                    request.extended = True
        else:
            raise NotEligible(f"item type 0x{kind:02X}")  # pynetdicom decides about those
    return request


def peek_storage_request(sock: socket.socket, timeout: float) -> AssociateRequest:
    """The A-ASSOCIATE-RQ waiting on ``sock``, read without taking it off the socket.

    An RQ cut short by the peer closing its side (POLLRDHUP) goes to pynetdicom, which reads
    and drops it as it always did; one that stays incomplete until ``timeout`` is
    :class:`Silent`."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    closing = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    poller.register(sock, select.POLLIN | closing)
    need = 6
    pause = _PEEK_WAIT
    while True:
        events = poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
        if not events:
            raise Silent("no A-ASSOCIATE-RQ in time")
        data = sock.recv(need, socket.MSG_PEEK)
        if not data:
            raise Silent("closed")
        if len(data) >= 6:
            if data[0] != 0x01:
                raise NotEligible("first PDU is not an A-ASSOCIATE-RQ")
            need = 6 + struct.unpack(">I", data[2:6])[0]
            if need > _LARGEST_REQUEST:
                raise NotEligible("A-ASSOCIATE-RQ too large")
        if len(data) >= need:
            return parse_request(data[:need])
        if any(mask & closing for _, mask in events):
            raise NotEligible("A-ASSOCIATE-RQ cut short")
        if time.monotonic() >= deadline:
            raise Silent("A-ASSOCIATE-RQ incomplete")
        # The rest is on its way: poll() reports the bytes already here, so wait a little.
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def associate_ac(
    request: AssociateRequest, results: list[tuple[int, int, str]], max_pdu: int
) -> bytes:
    """The A-ASSOCIATE-AC (PS3.8 9.3.3): ``results`` are (context id, result, syntax)."""
    contexts = b"".join(
        _item(0x21, bytes((cid, 0, result, 0)) + _item(0x40, syntax.encode("ascii")))
        for cid, result, syntax in results
    )
    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")[:16]
    user = _item(
        0x50,
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + _item(0x55, version),
    )
    body = (
        struct.pack(">HH", 1, 0)
        + request.raw_called
        + request.raw_calling
        + request.raw_reserved
        + _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
        + contexts
        + user
    )
    return _pdu(0x02, body)


def abort_pdu(reason: int) -> bytes:
    return _pdu(0x07, bytes((0, 0, 2, reason)))


@dataclass(frozen=True)
class Command:
    """The fields of a request's command set this service reads (PS3.7 E.1)."""

    field: int
    message_id: int
    sop_class: str
    sop_instance: str
    has_data: bool


def _ui(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\0 ")


def parse_command(data: bytes) -> Command:
    """A command set, always implicit VR little endian (PS3.7 6.3.1)."""
    values: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(data):
        group, element, length = struct.unpack("<HHI", data[at : at + 8])
        if group != 0 or at + 8 + length > len(data):
            raise ValueError("malformed command set")
        values[element] = data[at + 8 : at + 8 + length]
        at += 8 + length

    def us(element: int) -> int:
        value = values.get(element, b"")
        if len(value) != 2:
            raise ValueError(f"command element (0000,{element:04X}) missing or malformed")
        return int(struct.unpack("<H", value)[0])

    return Command(
        field=us(0x0100),
        message_id=us(0x0110),
        sop_class=_ui(values.get(0x0002, b"")),
        sop_instance=_ui(values.get(0x1000, b"")),
        has_data=us(0x0800) != 0x0101,
    )


def pdv_items(body: bytearray) -> Iterator[tuple[int, int, memoryview]]:
    """The PDV items of a P-DATA-TF PDU (PS3.8 9.3.5.1): context ID, message control header
    and fragment (a view into ``body``)."""
    view = memoryview(body)
    at = 0
    while at < len(body):
        if at + 6 > len(body):
            raise ValueError("truncated PDV item")
        item_length = int.from_bytes(view[at : at + 4], "big")
        if item_length < 2 or at + 4 + item_length > len(body):
            raise ValueError("PDV item length out of range")
        yield view[at + 4], view[at + 5], view[at + 6 : at + 4 + item_length]
        at += 4 + item_length


# (context's abstract syntax, its transfer syntax, command, data set, work for after the
# response: see Ingestor.ingest) -> (status, Error Comment)
StoreFunction = Callable[[str, str, Command, bytes, Later], tuple[int, str | None]]


class StorageAssociation:
    """One accepted storage-only association on ``sock``; :meth:`run` serves it to the end."""

    def __init__(
        self,
        sock: socket.socket,
        request: AssociateRequest,
        peer: str,
        store: StoreFunction,
        max_pdu: int,
        timeout: float | None,
    ) -> None:
        self.sock = sock
        self.request = request
        self.peer = peer
        self.store = store
        self.max_pdu = max_pdu
        self.timeout = timeout
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract, transfer syntax)
        # the message being received: its context, command set fragments or command, data set
        self._context = -1
        self._command_parts: list[bytes] = []
        self._command: Command | None = None
        self._data_parts: list[memoryview] = []
        self._later: Later = []  # what the last stored instance left for after its response

    def accept(self) -> None:
        """Take the A-ASSOCIATE-RQ off the socket and answer it (PS3.8 9.3.3)."""
        header = recv_exactly(self.sock, 6)
        recv_exactly(self.sock, struct.unpack(">I", bytes(header[2:6]))[0])
        results = []
        for cid, abstract, syntaxes in self.request.contexts:
            if abstract == VERIFICATION:
                usable = [s for s in syntaxes if s in _VERIFICATION_SYNTAXES]
                if usable:
                    self.contexts[cid] = (abstract, usable[0])
                    results.append((cid, 0, usable[0]))
                else:
                    results.append((cid, 4, syntaxes[0]))  # transfer syntaxes not supported
            else:
                # Every storage SOP class, stored in the syntax the modality proposes first
                # (as the pynetdicom path does with unrestricted storage).
                self.contexts[cid] = (abstract, syntaxes[0])
                results.append((cid, 0, syntaxes[0]))
        self.sock.sendall(associate_ac(self.request, results, self.max_pdu))

    def run(self) -> str:
        """Serve until release or abort; returns "released" or "aborted"."""
        self.sock.settimeout(self.timeout)
        try:
            while True:
                header = recv_exactly(self.sock, 6)
                if len(header) < 6:
                    return "aborted"  # the peer went away
                kind = header[0]
                length = struct.unpack(">I", bytes(header[2:6]))[0]
                body = recv_exactly(self.sock, length)
                if len(body) < length:
                    return "aborted"
                if kind == 0x05:  # A-RELEASE-RQ: A-RELEASE-RP, then the peer closes
                    self.sock.sendall(_pdu(0x06, b"\0\0\0\0"))
                    return "released"
                if kind == 0x07:
                    return "aborted"
                if kind != 0x04:
                    log.warning("PDU type 0x%02X from %s; aborting", kind, self.peer)
                    unexpected = kind in (0x01, 0x02, 0x03, 0x06)
                    self._abort(ABORT_UNEXPECTED_PDU if unexpected else ABORT_UNRECOGNISED_PDU)
                    return "aborted"
                for context_id, control, fragment in pdv_items(body):
                    self._take(context_id, control, fragment)
        except TimeoutError:
            log.warning("association from %s idle too long; aborting", self.peer)
            self._abort(0)
            return "aborted"
        except ValueError as exc:
            log.warning("malformed DIMSE message from %s (%s); aborting", self.peer, exc)
            self._abort(ABORT_INVALID_PARAMETER)
            return "aborted"
        except OSError:
            return "aborted"

    def _take(self, context_id: int, control: int, fragment: memoryview) -> None:
        """One PDV: a fragment of the message being received (PS3.8 E.2); a complete message is
        answered."""
        if context_id not in self.contexts or self._context not in (-1, context_id):
            raise ValueError(f"PDV on presentation context {context_id}")
        self._context = context_id
        if control & 0x01:  # command fragment
            if self._command is not None:
                raise ValueError("command fragment after the command set")
            self._command_parts.append(bytes(fragment))
            if not control & 0x02:
                return
            self._command = parse_command(b"".join(self._command_parts))
            self._command_parts = []
            if self._command.has_data:
                return
        else:
            if self._command is None or not self._command.has_data:
                raise ValueError("data set fragment without its command")
            self._data_parts.append(fragment)  # a view into the PDU: copied once, by the join
            if not control & 0x02:
                return
        command, data = self._command, b"".join(self._data_parts)
        self._command, self._data_parts, self._context = None, [], -1
        self._respond(context_id, command, data)

    def _respond(self, context_id: int, command: Command, data: bytes) -> None:
        abstract, syntax = self.contexts[context_id]
        if command.field == 0x0030:  # C-ECHO-RQ
            reply = response_command(0x8030, command.sop_class, command.message_id, 0x0000)
        elif command.field == 0x0001:  # C-STORE-RQ
            if not command.sop_class or not command.sop_instance or not command.has_data:
                raise ValueError("C-STORE-RQ lacks a mandatory field")
            try:
                status, comment = self.store(abstract, syntax, command, data, self._later)
            except Exception as exc:  # a bug must cost one instance, not the association
                log.exception("C-STORE from %s failed", self.peer)
                status, comment = 0x0110, f"processing failure: {type(exc).__name__}"
            reply = response_command(
                0x8001, command.sop_class, command.message_id, status, command.sop_instance, comment
            )
        elif command.field == 0x0FFF:  # C-CANCEL-RQ: nothing of ours can be cancelled
            return
        else:
            raise ValueError(f"command 0x{command.field:04X} on a storage association")
        try:
            self.sock.sendall(pdata_message(context_id, reply, None, self.request.max_length))
        finally:
            # The sender reads the response and prepares its next instance meanwhile.
            run_later(self._later)

    def _abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(abort_pdu(reason))


def serve(association: StorageAssociation, on_end: Callable[[str], None]) -> None:
    """Accept and serve one storage association, with its log id and metrics; ``on_end``
    gets "released" or "aborted" once the connection is closed."""
    request, peer = association.request, association.peer
    association_var.set(f"{request.calling_ae or '?'}#{secrets.token_hex(3)}")
    outcome = "aborted"
    try:
        association.accept()
        log.info("storage association from %s (%s) accepted", request.calling_ae, peer)
        metrics.ASSOCIATIONS_ACTIVE.inc()
        try:
            outcome = association.run()
        finally:
            metrics.ASSOCIATIONS_ACTIVE.dec()
            metrics.ASSOCIATIONS.labels(outcome).inc()
    except OSError:
        pass
    finally:
        try:
            association.sock.close()
        finally:
            on_end(outcome)
