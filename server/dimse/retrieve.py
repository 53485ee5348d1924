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
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA

from server.dimse import polling
from server.dimse.fastpath import COMMAND_LAST, DATA_LAST, DATA_MORE, implicit_element, pdu, pdv


class StoredFile(Dataset):
    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, syntax: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self._stored_path = path
        self._stored_syntax = syntax


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
    """The C-STORE-RQ as P-DATA-TF PDUs: the command, then the data set (``span`` = offset and
    length in the file) straight from the file: sendfile lets the kernel copy it."""
    sock.sendall(pdu(pdv(context_id, COMMAND_LAST, command)))
    offset, length = span
    room = (max_length or 1 << 24) - 6
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


def _send_raw(assoc: Association, item: StoredFile, context: Any, **kwargs: Any) -> Dataset | None:
    """Send one stored file as a C-STORE sub-operation; None when it must go the slow way."""
    command = store_rq_command(
        str(item.SOPClassUID),
        str(item.SOPInstanceUID),
        kwargs.get("msg_id", 1),
        kwargs.get("priority", 2),
        kwargs.get("originator_aet"),
        kwargs.get("originator_id"),
    )
    with open(item._stored_path, "rb") as fh:
        offset = dataset_offset(fh.read(144))
        if offset is None:
            return None
        if threading.current_thread() is assoc:
            # C-GET, on the requesting association's own thread: its DUL thread may still be
            # sending the previous pending C-GET response, so our PDUs queue behind it.
            _queue(assoc, fh, context.context_id, command)
            _, rsp = assoc.dimse.get_msg(block=True)
        else:
            # C-MOVE: our own association to the destination; nothing else writes on it, so
            # the file goes straight to the socket.
            span = (offset, os.fstat(fh.fileno()).st_size - offset)
            with polling.park(assoc) as parked:  # the reactor must not take the response
                transport = assoc.dul.socket
                if not parked or transport is None or transport.socket is None:
                    return None
                max_length = assoc.dimse.maximum_pdu_size
                _stream(transport.socket, fh, context.context_id, command, span, max_length)
                _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    status: Dataset = assoc._check_received_status(rsp)
    return status


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
        dataset = dcmread(dataset._stored_path)
    return _original_send_c_store(self, dataset, *args, **kwargs)


def install() -> None:
    Association.send_c_store = _send_c_store  # type: ignore[method-assign]
