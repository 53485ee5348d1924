"""Large PDU reads (server/dimse/transport.py) over a real socket pair."""

from __future__ import annotations

import socket
import threading

import pytest

from server.dimse.transport import recv_exactly


def _send_in_pieces(sock: socket.socket, data: bytes, piece: int, close: bool) -> None:
    for start in range(0, len(data), piece):
        sock.sendall(data[start : start + piece])
    if close:
        sock.close()


@pytest.mark.parametrize("piece", [1, 4095, 65536, 1 << 20])
def test_reads_exactly_the_pdu_however_it_arrives(piece: int) -> None:
    data = bytes(range(256)) * 2048 + b"tail"  # 524,292 bytes, like a CT slice's PDUs
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=_send_in_pieces, args=(left, data + b"NEXT", piece, False))
        sender.start()
        assert recv_exactly(right, len(data)) == data
        sender.join()
        assert recv_exactly(right, 4) == b"NEXT"  # nothing of the next PDU was consumed


def test_short_read_when_the_peer_closes() -> None:
    left, right = socket.socketpair()
    with right:
        _send_in_pieces(left, b"abcdef", 4, close=True)
        got = recv_exactly(right, 100)
    assert got == b"abcdef"  # pynetdicom turns the short length into Evt17 (connection closed)


def test_timeout_propagates() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(0.05)
        left.sendall(b"ab")
        with pytest.raises(TimeoutError):
            recv_exactly(right, 10)


def test_installed_on_pynetdicom() -> None:
    from pynetdicom.transport import AssociationSocket

    import server.dimse.ae  # noqa: F401 - installs the patches

    assert AssociationSocket.recv.__module__ == "server.dimse.transport"


def test_buffer_grows_with_what_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.dimse import transport

    monkeypatch.setattr(transport, "FIRST_ALLOCATION", 1000)
    data = bytes(range(256)) * 40  # 10,240 bytes: the buffer doubles several times
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=_send_in_pieces, args=(left, data + b"NEXT", 333, False))
        sender.start()
        assert recv_exactly(right, len(data)) == data
        sender.join()
        assert recv_exactly(right, 4) == b"NEXT"


def test_length_field_alone_allocates_little() -> None:
    """A PDU header claiming 4 GiB, then ten bytes and a close (tools/fuzz.py found that the
    whole claimed length used to be allocated and zeroed at once)."""
    import tracemalloc

    left, right = socket.socketpair()
    with right:
        _send_in_pieces(left, b"0123456789", 10, close=True)
        tracemalloc.start()
        try:
            got = recv_exactly(right, 0xFFFFFFFF)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert got == b"0123456789"
    assert peak < 64 << 20
