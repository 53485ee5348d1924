"""The C-MOVE fast path reads each destination's C-STORE-RSP from the socket itself
(server/dimse/retrieve.read_store_response): PS3.8 9.3.5 framing, PS3.7 9.3.1.2 fields, and
everything it does not own left in the socket for pynetdicom."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from server.dimse.fastpath import COMMAND_LAST, COMMAND_MORE, DATA_LAST, pdu, pdv, response_command
from server.dimse.retrieve import ResponseError, read_store_response

CT = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.826.0.1.3680043.10.1439.1"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def _rsp(message_id: int = 7, status: int = 0, comment: str | None = None) -> bytes:
    return response_command(0x8001, CT, message_id, status, INSTANCE, comment)


def test_one_pdu(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(pdu(pdv(1, COMMAND_LAST, _rsp(status=0xB000, comment="coerced"))))
    assert read_store_response(ours, 7, 5) == (0xB000, "coerced")


def test_fragments_over_items_and_pdus(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    command = _rsp(status=0xA700)
    first, second, third = command[:10], command[10:50], command[50:]
    theirs.sendall(pdu(pdv(1, COMMAND_MORE, first) + pdv(1, COMMAND_MORE, second)))
    theirs.sendall(pdu(pdv(1, COMMAND_LAST, third)))
    assert read_store_response(ours, 7, 5) == (0xA700, "")


def test_a_split_header_is_left_for_pynetdicom(pair: tuple[socket.socket, socket.socket]) -> None:
    """Half a PDU header, or half a header and then a close: nothing is consumed (pynetdicom
    reads it whole) and nothing spins."""
    ours, theirs = pair
    message = pdu(pdv(1, COMMAND_LAST, _rsp()))
    theirs.sendall(message[:3])
    assert read_store_response(ours, 7, 5) is None
    theirs.close()
    started = time.monotonic()
    assert read_store_response(ours, 7, 5) is None
    assert time.monotonic() - started < 1
    assert ours.recv(100) == message[:3]


def test_a_split_header_inside_a_message_is_read(pair: tuple[socket.socket, socket.socket]) -> None:
    """Once the command has begun the socket is ours: the next header is read even if it
    arrives in pieces."""
    ours, theirs = pair
    command = _rsp()
    second = pdu(pdv(1, COMMAND_LAST, command[20:]))

    def dribble() -> None:
        theirs.sendall(pdu(pdv(1, COMMAND_MORE, command[:20])) + second[:3])
        time.sleep(0.05)
        theirs.sendall(second[3:])

    writer = threading.Thread(target=dribble)
    writer.start()
    assert read_store_response(ours, 7, 5) == (0, "")
    writer.join()


def test_other_pdus_are_left_for_pynetdicom(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    abort = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0)
    theirs.sendall(abort)
    assert read_store_response(ours, 7, 5) is None
    assert ours.recv(100) == abort  # still there, whole


def test_closed_connection_is_left_for_pynetdicom(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.close()
    assert read_store_response(ours, 7, 5) is None


@pytest.mark.parametrize(
    "wire",
    [
        pdu(pdv(1, COMMAND_LAST, _rsp(message_id=8))),  # another request's response
        pdu(pdv(1, COMMAND_LAST, response_command(0x8030, CT, 7, 0))),  # a C-ECHO-RSP
        pdu(pdv(1, DATA_LAST, b"\0" * 8)),  # a data set where the command should be
        pdu(pdv(1, COMMAND_LAST, _rsp()) + pdv(1, DATA_LAST, b"\0" * 8)),  # and one after it
        pdu(pdv(1, COMMAND_LAST, _rsp()[:-3])),  # the last element cut short
        pdu(struct.pack(">IBB", 400, 1, COMMAND_LAST) + _rsp()),  # item longer than its PDU
        pdu(pdv(1, COMMAND_MORE, _rsp()[:20])) + struct.pack(">BBI", 0x07, 0, 4) + bytes(4),
    ],
    ids=[
        "other-message",
        "not-c-store-rsp",
        "data",
        "data-after",
        "cut",
        "overrun",
        "abort-inside",
    ],
)
def test_malformed_responses_raise(pair: tuple[socket.socket, socket.socket], wire: bytes) -> None:
    ours, theirs = pair
    theirs.sendall(wire)
    with pytest.raises(ResponseError):
        read_store_response(ours, 7, 5)


def test_pdu_cut_by_closing(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(pdu(pdv(1, COMMAND_LAST, _rsp()))[:-5])
    theirs.close()
    with pytest.raises(ResponseError):
        read_store_response(ours, 7, 5)


def test_silence_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read_store_response(ours, 7, 0.2)
    assert time.monotonic() - started < 5


def _cancel_rq(message_id: int) -> bytes:
    """A C-CANCEL-RQ command set (PS3.7 9.3.2.3) for the request ``message_id``."""
    from server.dimse.fastpath import implicit_element

    body = b"".join(
        (
            implicit_element(0x00000100, struct.pack("<H", 0x0FFF)),
            implicit_element(0x00000120, struct.pack("<H", message_id)),
            implicit_element(0x00000800, struct.pack("<H", 0x0101)),
        )
    )
    return implicit_element(0x00000000, struct.pack("<I", len(body))) + body


def test_a_cancel_before_the_response_is_passed_on(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(pdu(pdv(1, COMMAND_LAST, _cancel_rq(3))) + pdu(pdv(3, COMMAND_LAST, _rsp())))
    cancelled: list[int] = []
    assert read_store_response(ours, 7, 5, cancelled.append) == (0, "")
    assert cancelled == [3]


def test_a_cancel_is_refused_where_none_can_come(pair: tuple[socket.socket, socket.socket]) -> None:
    """On a C-MOVE's own sub-association the peer has nothing to cancel."""
    ours, theirs = pair
    theirs.sendall(pdu(pdv(1, COMMAND_LAST, _cancel_rq(3))))
    with pytest.raises(ResponseError):
        read_store_response(ours, 7, 5)


def test_a_cancel_then_an_abort_leaves_the_abort(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    abort = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0)
    theirs.sendall(pdu(pdv(1, COMMAND_LAST, _cancel_rq(3))) + abort)
    cancelled: list[int] = []
    assert read_store_response(ours, 7, 5, cancelled.append) is None
    assert cancelled == [3] and ours.recv(100) == abort
