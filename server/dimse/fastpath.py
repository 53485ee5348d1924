"""Hand-encoded DIMSE messages for the hot paths: C-FIND pending responses written straight to
the association's socket, C-STORE responses, and Part 10 files from received C-STOREs.

pynetdicom encodes every response's command set and identifier with pydicom and hands each PDU
to its reactor thread; that costs more per match than the catalog query for all of them, which
makes large result sets slow.  Here the command set (identical for every pending response) is
encoded once, identifiers are encoded directly (:func:`server.dicom.response.encode_identifier`)
and many responses leave in one ``send``.  The final response still goes through pynetdicom, so
its state machine sees an ordinary exchange.

PS3.7 9.1.2 (C-FIND-RSP command set), PS3.8 9.3.5 (P-DATA-TF PDU, PDV items).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from typing import Any, cast

from pydicom.uid import UID
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from server.catalog.search import Match
from server.dicom.query import Query
from server.dicom.response import IdentifierEncoder

_FLUSH_BYTES = 64 * 1024  # also how often a C-CANCEL is noticed
COMMAND_LAST = 0x03  # message control header: command, last fragment
COMMAND_MORE = 0x01
DATA_LAST = 0x02
DATA_MORE = 0x00


def implicit_element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def find_rsp_command(sop_class_uid: str, message_id: int, status: int = 0xFF00) -> bytes:
    """An encoded C-FIND-RSP command set with a data set (implicit VR little endian)."""
    uid = sop_class_uid.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    body = b"".join(
        (
            implicit_element(0x00000002, uid),
            implicit_element(0x00000100, struct.pack("<H", 0x8020)),
            implicit_element(0x00000120, struct.pack("<H", message_id)),
            implicit_element(0x00000800, struct.pack("<H", 0x0000)),
            implicit_element(0x00000900, struct.pack("<H", status)),
        )
    )
    return implicit_element(0x00000000, struct.pack("<I", len(body))) + body


def pdv(context_id: int, header: int, fragment: bytes) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment


def pdu(items: bytes) -> bytes:
    return struct.pack(">BBI", 0x04, 0, len(items)) + items


def pdata_message(context_id: int, command: bytes, data: bytes | None, max_length: int) -> bytes:
    """One DIMSE message (``data`` None: a command set alone) as P-DATA-TF PDUs no larger than
    the peer's maximum length."""
    command_item = pdv(context_id, COMMAND_LAST, command)
    data_item = pdv(context_id, DATA_LAST, data) if data is not None else b""
    if not max_length or len(command_item) + len(data_item) <= max_length:
        return pdu(command_item + data_item)
    # The command set is fragmented too: a peer may take PDUs smaller than it (PS3.8 D.1 allows
    # any maximum length; found by tools/fuzz.py, which offers 7 bytes).
    room = max(1, max_length - 6)
    out = []
    for start in range(0, len(command), room):
        last = start + room >= len(command)
        fragment = command[start : start + room]
        out.append(pdu(pdv(context_id, COMMAND_LAST if last else COMMAND_MORE, fragment)))
    for start in range(0, len(data or b""), room):
        chunk = (data or b"")[start : start + room]
        last = start + room >= len(data or b"")
        out.append(pdu(pdv(context_id, DATA_LAST if last else DATA_MORE, chunk)))
    return b"".join(out)


def send_find_pending(event: Any, query: Query, matches: Iterable[Match]) -> bool:
    """Write one pending response per match; False if the peer cancelled (C-CANCEL-FIND)."""
    context = event.context
    explicit = not UID(context.transfer_syntax).is_implicit_VR
    max_length = int(event.assoc.requestor.maximum_length or 0)
    command = find_rsp_command(str(event.request.AffectedSOPClassUID), event.request.MessageID)
    send = event.assoc.dul.socket.send
    buffer: list[bytes] = []
    size = 0
    encoder = IdentifierEncoder(query, explicit)
    context_id = context.context_id
    command_item = pdv(context_id, COMMAND_LAST, command)
    fits = (max_length or 1 << 32) - len(command_item) - 6  # the most data one PDU takes
    data_header = struct.Struct(">IBB")
    pdu_header = struct.Struct(">BBI")
    for match in matches:
        data = encoder.encode(match)
        if len(data) <= fits:  # command and data set in one PDU: the usual case
            items = len(command_item) + 6 + len(data)
            message = b"".join(
                (
                    pdu_header.pack(0x04, 0, items),
                    command_item,
                    data_header.pack(len(data) + 2, context_id, DATA_LAST),
                    data,
                )
            )
        else:
            message = pdata_message(context_id, command, data, max_length)
        buffer.append(message)
        size += len(message)
        if size >= _FLUSH_BYTES:
            send(b"".join(buffer))
            buffer, size = [], 0
            if event.is_cancelled:
                return False
    if buffer:
        send(b"".join(buffer))
    return not event.is_cancelled


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    group_element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if vr == b"OB":
        return group_element + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return group_element + vr + struct.pack("<H", len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii", "replace")
    return data + pad if len(data) % 2 else data


def part10(sop_class: str, sop_instance: str, syntax: str, source_ae: str, dataset: bytes) -> bytes:
    """A DICOM file (PS3.10 7.1): preamble, file meta information and the data set as received.

    What pynetdicom's ``encoded_dataset()`` builds through pydicom, without the pydicom."""
    from server.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    body = b"".join(
        (
            _explicit(0x00020001, b"OB", b"\x00\x01"),
            _explicit(0x00020002, b"UI", _text(sop_class, b"\0")),
            _explicit(0x00020003, b"UI", _text(sop_instance, b"\0")),
            _explicit(0x00020010, b"UI", _text(syntax, b"\0")),
            _explicit(0x00020012, b"UI", _text(IMPLEMENTATION_CLASS_UID, b"\0")),
            _explicit(0x00020013, b"SH", _text(IMPLEMENTATION_VERSION_NAME, b" ")),
            _explicit(0x00020016, b"AE", _text(source_ae.strip()[:16] or "UNKNOWN", b" ")),
        )
    )
    group_length = _explicit(0x00020000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body + dataset


def response_command(
    command_field: int,
    sop_class: str,
    message_id: int,
    status: int,
    sop_instance: str = "",
    comment: str | None = None,
) -> bytes:
    """An encoded response command set without data set: C-STORE-RSP (PS3.7 9.3.1.2, with
    ``sop_instance``) or C-ECHO-RSP (9.3.5.2); ``comment`` is the Error Comment (LO, 64)."""
    elements = [
        implicit_element(0x00000002, _text(sop_class, b"\0")),
        implicit_element(0x00000100, struct.pack("<H", command_field)),
        implicit_element(0x00000120, struct.pack("<H", message_id)),
        implicit_element(0x00000800, struct.pack("<H", 0x0101)),
        implicit_element(0x00000900, struct.pack("<H", status)),
    ]
    if comment:
        elements.append(implicit_element(0x00000902, _text(comment[:64], b" ")))
    if sop_instance:
        elements.append(implicit_element(0x00001000, _text(sop_instance, b"\0")))
    body = b"".join(elements)
    return implicit_element(0x00000000, struct.pack("<I", len(body))) + body


def store_rsp_command(sop_class: str, sop_instance: str, message_id: int, status: int) -> bytes:
    """An encoded C-STORE-RSP command set without data set (PS3.7 9.3.1.2)."""
    return response_command(0x8001, sop_class, message_id, status, sop_instance)


def retrieve_pending_command(
    command_field: int, sop_class: str, message_id: int, counts: tuple[int, int, int, int]
) -> bytes:
    """A pending C-MOVE-RSP (0x8021) or C-GET-RSP (0x8010) without identifier (PS3.7 9.3.4.2,
    9.3.3.2); ``counts`` = remaining, completed, failed, warning sub-operations."""
    remaining, completed, failed, warning = counts
    body = b"".join(
        (
            implicit_element(0x00000002, _text(sop_class, b"\0")),
            implicit_element(0x00000100, struct.pack("<H", command_field)),
            implicit_element(0x00000120, struct.pack("<H", message_id)),
            implicit_element(0x00000800, struct.pack("<H", 0x0101)),
            implicit_element(0x00000900, struct.pack("<H", 0xFF00)),
            implicit_element(0x00001020, struct.pack("<H", remaining)),
            implicit_element(0x00001021, struct.pack("<H", completed)),
            implicit_element(0x00001022, struct.pack("<H", failed)),
            implicit_element(0x00001023, struct.pack("<H", warning)),
        )
    )
    return implicit_element(0x00000000, struct.pack("<I", len(body))) + body


def _fast_command(primitive: Any) -> bytes | None:
    """The encoded command set of a response we encode by hand, or None for pynetdicom's way."""
    # (a C-CANCEL primitive has no Affected SOP Class UID attribute at all)
    if primitive.MessageIDBeingRespondedTo is None or not getattr(
        primitive, "AffectedSOPClassUID", None
    ):
        return None
    if isinstance(primitive, C_STORE):
        if (
            primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and primitive.AffectedSOPInstanceUID
            and primitive.Status is not None
        ):
            return store_rsp_command(
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                int(primitive.MessageIDBeingRespondedTo),
                int(primitive.Status),
            )
        return None
    if isinstance(primitive, C_MOVE | C_GET) and primitive.Status == 0xFF00:
        counts = (
            primitive.NumberOfRemainingSuboperations,
            primitive.NumberOfCompletedSuboperations,
            primitive.NumberOfFailedSuboperations,
            primitive.NumberOfWarningSuboperations,
        )
        if primitive.Identifier is None and None not in counts and primitive.ErrorComment is None:
            return retrieve_pending_command(
                0x8021 if isinstance(primitive, C_MOVE) else 0x8010,
                str(primitive.AffectedSOPClassUID),
                int(primitive.MessageIDBeingRespondedTo),
                cast(tuple[int, int, int, int], counts),
            )
    return None


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """C-STORE responses and pending C-MOVE/C-GET responses are encoded by hand (they are sent
    once per instance); everything else as pynetdicom does."""
    command = _fast_command(primitive)
    if command is None:
        _original_send_msg(self, primitive, context_id)
        return
    if isinstance(primitive, C_MOVE | C_GET) and _send_direct(self, primitive, context_id, command):
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, bytes([COMMAND_LAST]) + command))
    self.dul.send_pdu(pdata)


def _send_direct(
    dimse: DIMSEServiceProvider, primitive: Any, context_id: int, command: bytes
) -> bool:
    """A pending C-MOVE-RSP or C-GET-RSP written to the socket by the association's own
    thread, as the C-FIND responses are: the socket thread would otherwise wake for each
    sub-operation and take the GIL from the thread sending the next one.

    C-MOVE: only on a plain socket (the socket thread may be reading a TLS one, and OpenSSL's
    state is not shared safely) with nothing queued for the socket thread to send before it.
    C-GET: only while the retrieve holds the socket thread parked (server/dimse/retrieve.py),
    since the sub-operations' requests go out on the same socket from this thread."""
    dul = dimse.dul
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    if type(sock) is not socket.socket or dul.to_provider_queue.qsize():
        return False
    if isinstance(primitive, C_GET):
        hold = dimse.assoc.__dict__.get("_retrieve_hold")
        if getattr(hold, "sock", None) is None:
            return False
    max_length = int(dimse.maximum_pdu_size or 0)
    try:
        sock.sendall(pdata_message(context_id, command, None, max_length))
    except OSError:
        return False  # pynetdicom's socket thread finds out and ends the association
    return True


_original_send_msg = DIMSEServiceProvider.send_msg


def install() -> None:
    DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
