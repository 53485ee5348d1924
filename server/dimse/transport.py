"""Socket reads for received PDUs in as few system calls as the kernel allows.

pynetdicom's ``AssociationSocket.recv`` reads at most 4,096 bytes per ``recv`` call and appends
each piece to a ``bytearray``: a 512 KiB CT slice costs 128 system calls, as many temporary
``bytes`` objects and a GIL hand-off for every one, which was a third of the C-STORE receive
path.  Here the PDU's bytes land in one preallocated buffer through ``recv_into``, taking
whatever the socket holds at each call (PS3.8 9.3.1: the PDU length is known from its header,
so the size of the read is too).
"""

from __future__ import annotations

import socket
from typing import cast

from pynetdicom.transport import AssociationSocket

# The most a PDU's length field alone makes us allocate. The field comes from the peer before
# anything is known about it: preallocating what it claims (up to 4 GiB with max_pdu = 0) let a
# 6-byte PDU header pin gigabytes per connection (found by tools/fuzz.py). Beyond this, the
# buffer grows with what actually arrives, at most doubling each time.
FIRST_ALLOCATION = 4 << 20


def recv_exactly(sock: socket.socket, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from ``sock``, or fewer if the peer closed the connection first (the
    caller tells a short read from a complete one by its length, as pynetdicom does).

    Raises what ``socket.recv_into`` raises (``TimeoutError``, ``OSError``)."""
    buffer = bytearray(min(nr_bytes, FIRST_ALLOCATION))
    received = 0
    while received < nr_bytes:
        if received == len(buffer):
            buffer.extend(bytes(min(nr_bytes, 2 * received) - received))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[received:])
        if not count:
            break
        received += count
    if received < nr_bytes:
        del buffer[received:]
    return buffer


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    return recv_exactly(cast(socket.socket, self.socket), nr_bytes)


def install() -> None:
    AssociationSocket.recv = _recv  # type: ignore[method-assign]
