"""C-MOVE/C-GET sub-operations that send stored files without decoding them.

pynetdicom's retrieve service wants a Dataset per sub-operation and re-encodes it, and builds
every C-STORE request's command set through pydicom: several milliseconds of CPU per instance.
Handlers yield a :class:`StoredFile` instead, a Dataset carrying only the two UIDs pynetdicom
looks at and the file's path, and the wrapped ``Association.send_c_store`` sends it itself when
the peer accepted the stored transfer syntax: a hand-encoded C-STORE-RQ command set (PS3.7
9.3.1.1) and the file's data set bytes as stored, written as P-DATA-TF PDUs (PS3.8 9.3.5) on the
association's socket; the response is read through pynetdicom as usual.  When the peer did not
accept the stored syntax, the file is decoded and pynetdicom converts it (uncompressed syntaxes
only), as before.

A C-MOVE's sub-association is ours alone for the whole retrieve, so its two reactor threads stay
parked from the first sub-operation until it is released, and each C-STORE-RSP is read straight
from the socket too (:func:`read_store_response`): pynetdicom's socket thread would otherwise
decode every response through pydicom and hand it over through two queues, about a fifth of
each sub-operation.  A C-GET runs on the requesting association's own reactor thread, so only
its socket thread is parked, for the whole C-GET; the one other message its peer may send then,
a C-CANCEL-RQ (PS3.4 C.4.3.3), is recorded where pynetdicom keeps it.  Anything on the wire
other than a P-DATA-TF (an A-ABORT, a release request, the connection closing) is left unread
for pynetdicom, which handles it as it always has.  Over TLS the responses still go through
pynetdicom (decrypted bytes wait inside OpenSSL, out of reach of ``select`` and ``MSG_PEEK``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_CANCEL
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import QueryRetrieveServiceClass

from server.dimse import polling
from server.dimse.fastpath import (
    COMMAND_LAST,
    COMMAND_MORE,
    DATA_LAST,
    DATA_MORE,
    implicit_element,
    pdu,
    pdv,
)
from server.dimse.transport import recv_exactly

log = logging.getLogger(__name__)
_P_DATA_TF = 0x04
_C_STORE_RSP = 0x8001
_C_CANCEL_RQ = 0x0FFF


class StoredFile(Dataset):
    """One sub-operation's instance: pynetdicom reads its two UIDs, we read the file.

    The UIDs are properties rather than data elements: setting them through pydicom validated
    each UID and cost more than the rest of the sub-operation's bookkeeping (they come from
    the catalog, which ingest validated)."""

    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, syntax: str) -> None:
        super().__init__()
        object.__setattr__(self, "_stored_path", path)
        object.__setattr__(self, "_stored_syntax", syntax)
        object.__setattr__(self, "_stored_uids", (sop_class_uid, sop_instance_uid))

    def __bool__(self) -> bool:
        return True  # pynetdicom sends a pending result's dataset only if it is truthy

    @property
    def SOPClassUID(self) -> str:
        return str(self._stored_uids[0])

    @property
    def SOPInstanceUID(self) -> str:
        return str(self._stored_uids[1])


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def store_rq_command(
    sop_class: str,
    sop_instance: str,
    msg_id: int,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> bytes:
    """An encoded C-STORE-RQ command set (implicit VR little endian, tags ascending)."""
    elements = [
        implicit_element(0x00000002, _uid(sop_class)),
        implicit_element(0x00000100, struct.pack("<H", 0x0001)),
        implicit_element(0x00000110, struct.pack("<H", msg_id)),
        implicit_element(0x00000700, struct.pack("<H", priority)),  # 0 medium, 1 high, 2 low
        implicit_element(0x00000800, struct.pack("<H", 0x0001)),  # a data set follows
        implicit_element(0x00001000, _uid(sop_instance)),
    ]
    if originator_aet:
        title = originator_aet.strip()[:16].encode("ascii", "replace")
        elements.append(implicit_element(0x00001030, title + b" " * (len(title) % 2)))
    if originator_id is not None:
        elements.append(implicit_element(0x00001031, struct.pack("<H", originator_id)))
    body = b"".join(elements)
    return implicit_element(0x00000000, struct.pack("<I", len(body))) + body


def dataset_offset(head: bytes) -> int | None:
    """Where the data set of a Part 10 file starts (after preamble and file meta), from its
    first 144 bytes; None if the file meta does not start with its group length."""
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00" or head[136:138] != b"UL":
        return None
    (meta_length,) = struct.unpack("<I", head[140:144])
    return 144 + int(meta_length)


def _stream(
    sock: socket.socket,
    fh: BinaryIO,
    context_id: int,
    command: bytes,
    span: tuple[int, int],
    max_length: int,
) -> None:
    """The C-STORE-RQ as P-DATA-TF PDUs no larger than the peer's Maximum Length (PS3.8 D.1
    allows any; the command set is fragmented too): the command, then the data set (``span``
    = offset and length in the file) straight from the file: sendfile lets the kernel copy
    it."""
    room = max(1, (max_length or 1 << 24) - 6)
    for start in range(0, len(command), room):
        last = start + room >= len(command)
        fragment = command[start : start + room]
        sock.sendall(pdu(pdv(context_id, COMMAND_LAST if last else COMMAND_MORE, fragment)))
    offset, length = span
    end = offset + length
    while True:
        size = min(room, end - offset)
        last = offset + size >= end
        flags = DATA_LAST if last else DATA_MORE
        sock.sendall(struct.pack(">BBIIBB", 0x04, 0, size + 6, size + 2, context_id, flags))
        if size:
            sock.sendfile(fh, offset, size)
        offset += size
        if last:
            return


def _queue(assoc: Association, fh: BinaryIO, context_id: int, command: bytes) -> None:
    """The C-STORE-RQ as P-DATA primitives through the association's DUL queue."""
    data = fh.read()
    room = (assoc.dimse.maximum_pdu_size or len(data) + 6) - 6
    fragments = [(COMMAND_LAST, command)]
    for start in range(0, len(data), room):
        last = start + room >= len(data)
        fragments.append((DATA_LAST if last else DATA_MORE, data[start : start + room]))
    for flags, fragment in fragments:
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, bytes([flags]) + fragment))
        assoc.dul.send_pdu(pdata)


class ResponseError(Exception):
    """The peer's answer to a C-STORE-RQ is not a C-STORE-RSP we can read (PS3.7 9.3.1.2)."""


def _peek_pdu_header(sock: socket.socket, deadline: float | None) -> bytes:
    """What has arrived of the next PDU's 6-byte header, left in the socket (b"": the
    connection closed)."""
    poller = select.poll()  # not select(): descriptors past 1,024 are fine
    poller.register(sock, select.POLLIN)
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not poller.poll(None if wait is None else wait * 1000):
        raise TimeoutError("no C-STORE-RSP within the DIMSE timeout")
    return sock.recv(6, socket.MSG_PEEK)


def _command_fields(command: bytes) -> dict[int, bytes]:
    """The elements of an implicit VR little endian command set (PS3.7 6.3.1), by tag."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(command):
            raise ResponseError("command set element out of bounds or not in group 0000")
        fields[element] = command[offset : offset + length]
        offset += length
    if offset != len(command):
        raise ResponseError("command set ends inside an element header")
    return fields


def _us(fields: dict[int, bytes], element: int) -> int | None:
    value = fields.get(element)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def read_store_response(
    sock: socket.socket,
    message_id: int,
    timeout: float | None,
    on_cancel: Callable[[int], None] | None = None,
) -> tuple[int, str] | None:
    """Status and Error Comment of the C-STORE-RSP to ``message_id``, read from the socket's
    P-DATA-TF PDUs (PS3.8 9.3.5; the command may come in several fragments and PDUs).

    None, with nothing unhandled consumed, when the next PDU is something else or the
    connection closed: pynetdicom must see those.  A C-CANCEL-RQ met on the way (the peer of a
    C-GET cancelling it, PS3.7 9.3.2.3) goes to ``on_cancel`` with the Message ID it cancels,
    when given.  Raises :class:`ResponseError` (after consuming) for a P-DATA that is not a
    well-formed C-STORE-RSP to this request, ``TimeoutError`` past ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    command = bytearray()
    first = True
    while True:
        head = _peek_pdu_header(sock, deadline)
        if len(head) < 6 and not first:
            head = bytes(recv_exactly(sock, 6))  # the rest of a message we have begun: ours
            consumed = 6
        else:
            consumed = 0
        # Another PDU, a closed connection, or (rarely) a header split across segments: while
        # nothing is consumed pynetdicom reads it whole, as it reads everything else.
        if len(head) < 6 or head[0] != _P_DATA_TF:
            if first:
                return None
            raise ResponseError("the command set was cut short by another PDU")
        (length,) = struct.unpack_from(">I", head, 2)
        body = head[:consumed] + recv_exactly(sock, 6 + length - consumed)
        if len(body) < 6 + length:
            raise ResponseError("the connection closed inside a P-DATA-TF PDU")
        first = False
        offset, end = 6, 6 + length
        while offset < end:
            if offset + 6 > end:
                raise ResponseError("a PDV item overruns its PDU")
            (item_length,) = struct.unpack_from(">I", body, offset)
            control = body[offset + 5]
            if item_length < 2 or offset + 4 + item_length > end:
                raise ResponseError("a PDV item overruns its PDU")
            if not control & 0x01:
                raise ResponseError("a data set follows a C-STORE-RSP")
            command += body[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if control & 0x02:
                if offset != end:
                    raise ResponseError("more PDV items after the last command fragment")
                fields = _command_fields(bytes(command))
                if on_cancel is None or _us(fields, 0x0100) != _C_CANCEL_RQ:
                    return _store_status(fields, message_id)
                on_cancel(_us(fields, 0x0120) or 0)
                command.clear()
                first = True  # the cancel is dealt with: nothing unhandled was consumed


def _store_status(fields: dict[int, bytes], message_id: int) -> tuple[int, str]:
    if _us(fields, 0x0100) != _C_STORE_RSP:
        raise ResponseError(f"command field {_us(fields, 0x0100)!r}, not C-STORE-RSP")
    if _us(fields, 0x0120) != message_id:
        raise ResponseError(f"response to message {_us(fields, 0x0120)!r}, not {message_id}")
    status = _us(fields, 0x0900)
    if status is None:
        raise ResponseError("no Status")
    comment = fields.get(0x0902, b"").decode("ascii", "replace").strip(" \0")
    return status, comment


class _Hold:
    """An association's reactor threads, parked while our thread owns its socket: both of a
    C-MOVE's sub-association; for a C-GET, the socket thread of the requesting association
    (its reactor is the thread running the C-GET)."""

    def __init__(self, assoc: Association) -> None:
        self.stack = contextlib.ExitStack()  # closes the reader's park, then the reactor's
        self.reader = contextlib.ExitStack()
        self.sock: socket.socket | None = None
        transport = assoc.dul.socket
        sock = getattr(transport, "socket", None)
        # TLS keeps decrypted bytes where select and MSG_PEEK cannot see them.
        if type(sock) is not socket.socket:
            return
        if not self.stack.enter_context(polling.park(assoc)):
            return
        self.stack.enter_context(self.reader)
        if self.reader.enter_context(polling.park_socket_reader(assoc.dul)):
            self.sock = sock


_held = threading.local()  # the associations the current C-MOVE or C-GET holds


def _hold(assoc: Association) -> _Hold:
    hold: _Hold | None = assoc.__dict__.get("_retrieve_hold")
    if hold is None:
        hold = _Hold(assoc)
        assoc.__dict__["_retrieve_hold"] = hold
        if not hasattr(_held, "assocs"):
            _held.assocs = []
        _held.assocs.append(assoc)
    return hold


def _unhold(assoc: Association) -> None:
    hold: _Hold | None = assoc.__dict__.pop("_retrieve_hold", None)
    if hold is not None:
        hold.stack.close()


@functools.cache
def _status(value: int) -> Dataset:
    """The status pynetdicom's retrieve loop reads (``.Status`` only), one shared per value."""
    status = Dataset()
    status.Status = value
    return status


def _send_raw(assoc: Association, item: StoredFile, context: Any, **kwargs: Any) -> Dataset | None:
    """Send one stored file as a C-STORE sub-operation; None when it must go the slow way."""
    msg_id = kwargs.get("msg_id", 1)
    command = store_rq_command(
        str(item.SOPClassUID),
        str(item.SOPInstanceUID),
        msg_id,
        kwargs.get("priority", 2),
        kwargs.get("originator_aet"),
        kwargs.get("originator_id"),
    )
    with open(item._stored_path, "rb") as fh:
        offset = dataset_offset(fh.read(144))
        if offset is None:
            return None  # pynetdicom's way (the caller gives the threads back first)
        get = threading.current_thread() is assoc
        if not assoc.is_established or assoc.acse.is_aborted() or not assoc.dul.is_alive():
            # The peer aborted or went away during an earlier sub-operation (the reactor may
            # not have noticed yet): this one fails without waiting.
            return Dataset()
        hold = _hold(assoc)
        if hold.sock is None:  # TLS
            _unhold(assoc)
            if not get:
                return _send_parked(assoc, fh, context, command, offset)
            # C-GET, on the requesting association's own thread: its socket thread may still
            # be sending the previous pending C-GET response, so our PDUs queue behind it.
            _queue(assoc, fh, context.context_id, command)
            _, rsp = assoc.dimse.get_msg(block=True)
            return _received_status(assoc, rsp)
        # C-MOVE: our own association to the destination, nothing else uses it.  C-GET: the
        # requesting association, whose socket thread stays parked for the whole retrieve
        # (pending responses go out from this thread too, in order).  Either way the file
        # goes straight to the socket and the response comes straight from it.
        span = (offset, os.fstat(fh.fileno()).st_size - offset)
        max_length = assoc.dimse.maximum_pdu_size
        try:
            _stream(hold.sock, fh, context.context_id, command, span, max_length)
            answer = read_store_response(
                hold.sock, msg_id, assoc.dimse_timeout, _canceller(assoc) if get else None
            )
        except (ResponseError, OSError) as exc:  # TimeoutError is an OSError
            log.warning("C-STORE sub-operation to %s failed: %s", _peer_title(assoc), exc)
            _unhold(assoc)
            assoc.abort()
            return Dataset()  # no Status: pynetdicom counts the sub-operation as failed
        assoc.dul._idle_timer.restart()  # what the DUL thread does for every PDU it reads
        if answer is not None:
            code, comment = answer
            if comment:
                log.info("C-STORE-RSP 0x%04X from %s: %s", code, _peer_title(assoc), comment)
            return _status(code)
        # An A-ABORT, a release request or the connection closing: pynetdicom's socket
        # thread reads it and queues the outcome, which a parked reactor must not take.
        hold.reader.close()
        _, rsp = assoc.dimse.get_msg(block=True)
        _unhold(assoc)
    return _received_status(assoc, rsp)


def _peer_title(assoc: Association) -> str:
    return str(assoc.requestor.ae_title if assoc.is_acceptor else assoc.acceptor.ae_title)


def _canceller(assoc: Association) -> Callable[[int], None]:
    """Record a C-CANCEL-RQ as pynetdicom's socket thread would (at most 10 kept), so that
    ``event.is_cancelled`` sees it."""

    def cancel(message_id: int) -> None:
        if len(assoc.dimse.cancel_req) < 10:
            primitive = C_CANCEL()
            primitive.MessageIDBeingRespondedTo = message_id
            assoc.dimse.cancel_req[message_id] = primitive

    return cancel


def _received_status(assoc: Association, rsp: Any) -> Dataset:
    """What pynetdicom's send_c_store makes of the response it got (or did not get)."""
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    status: Dataset = assoc._check_received_status(rsp)
    return status


def _send_parked(
    assoc: Association, fh: BinaryIO, context: Any, command: bytes, offset: int
) -> Dataset | None:
    """C-MOVE over TLS: the data set still goes as raw PDUs, the response through pynetdicom."""
    span = (offset, os.fstat(fh.fileno()).st_size - offset)
    with polling.park(assoc) as parked:  # the reactor must not take the response
        transport = assoc.dul.socket
        if not parked or transport is None or transport.socket is None:
            return None
        max_length = assoc.dimse.maximum_pdu_size
        _stream(transport.socket, fh, context.context_id, command, span, max_length)
        _, rsp = assoc.dimse.get_msg(block=True)
    return _received_status(assoc, rsp)


_original_send_c_store = Association.send_c_store


def _send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(dataset, StoredFile):
        try:
            context = self._get_valid_context(
                dataset.SOPClassUID, dataset._stored_syntax, "scu", allow_conversion=False
            )
        except ValueError:
            context = None
        if context is not None and not args:
            status = _send_raw(self, dataset, context, **kwargs)
            if status is not None:
                return status
        # pynetdicom's own send needs its threads: an earlier sub-operation of this retrieve
        # may hold them parked (a later one takes them again)
        _unhold(self)
        dataset = dcmread(dataset._stored_path)
    return _original_send_c_store(self, dataset, *args, **kwargs)


_original_release = Association.release
_original_abort_blocking = Association._abort_blocking
_original_move_scp = QueryRetrieveServiceClass._move_scp
_original_get_scp = QueryRetrieveServiceClass._get_scp


def _release(self: Association) -> None:
    _unhold(self)  # the reactor threads run the release
    _original_release(self)


def _abort(self: Association, block: bool = True) -> None:
    _unhold(self)
    _original_abort_blocking(self, block)


def _release_held() -> None:
    for assoc in getattr(_held, "assocs", ()):
        _unhold(assoc)
    _held.assocs = []


def _move_scp(self: QueryRetrieveServiceClass, *args: Any, **kwargs: Any) -> None:
    """pynetdicom's C-MOVE SCP; whatever way it ends, no sub-association stays held."""
    try:
        _original_move_scp(self, *args, **kwargs)
    finally:
        _release_held()


def _get_scp(self: QueryRetrieveServiceClass, *args: Any, **kwargs: Any) -> None:
    """pynetdicom's C-GET SCP; at its end the socket thread takes over again (and sends the
    final response, which pynetdicom queued for it)."""
    try:
        _original_get_scp(self, *args, **kwargs)
    finally:
        _release_held()


def install() -> None:
    Association.send_c_store = _send_c_store  # type: ignore[method-assign]
    Association.release = _release  # type: ignore[method-assign]
    # pynetdicom sets each association's ``abort`` to its ``_abort_blocking`` during
    # negotiation, so that is the one to wrap (``abort`` itself for the rest)
    Association.abort = _abort  # type: ignore[method-assign]
    Association._abort_blocking = _abort  # type: ignore[method-assign]
    QueryRetrieveServiceClass._move_scp = _move_scp  # type: ignore[method-assign]
    QueryRetrieveServiceClass._get_scp = _get_scp  # type: ignore[method-assign]
