"""Wire-level clients for tools/fuzz.py: DICOM Upper Layer PDUs and DIMSE command sets built
by hand (PS3.8 9.3, PS3.7 9.3/E), and HTTP/1.1 requests written byte for byte, so that the
server sees exactly the malformed bytes a broken peer would send, which pynetdicom and httpx
refuse to produce.

Each ``run_*`` function sends one case and classifies what came back as an outcome *kind*:

* DIMSE: ``A-ASSOCIATE-AC``, ``A-ASSOCIATE-RJ``, ``A-ABORT``, ``A-RELEASE-RP``, ``closed`` (the
  server closed the connection without a PDU), ``reset`` (it reset it), ``status:0xNNNN`` (a
  DIMSE response status), ``alive`` (the association still answered the C-ECHO sent after the
  case), ``no-reply`` (nothing within the time limit), joined with ``>`` in order;
* HTTP: ``http-NNN``, for STOW-RS 202/409 with the first failed instance's status
  (``http-409:0xC000``), or ``no-reply``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

HOST = "127.0.0.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
MWL_FIND = "1.2.840.10008.5.1.4.31"

# The presentation contexts of the fuzzer's own associations: (id, abstract syntax, syntax).
CONTEXTS: tuple[tuple[int, str, str], ...] = (
    (1, VERIFICATION, IMPLICIT),
    (3, CT_STORAGE, EXPLICIT),
    (5, CT_STORAGE, IMPLICIT),
    (7, SC_STORAGE, EXPLICIT),
    (9, MR_STORAGE, EXPLICIT),
    (11, STUDY_FIND, IMPLICIT),
    (13, STUDY_FIND, EXPLICIT),
    (15, PATIENT_FIND, IMPLICIT),
    (17, MWL_FIND, IMPLICIT),
)
CONTEXT_ID = {(abstract, syntax): cid for cid, abstract, syntax in CONTEXTS}
SENTINEL_MESSAGE_ID = 0xFFF1  # the C-ECHO that follows each case on an association
DROPS = ("A-ABORT", "closed", "reset")
REPLY_TIMEOUT = 15.0  # seconds a reply may take before the case counts as "no-reply"
PDATA_WAIT = 5.0  # the same after a malformed P-DATA (see run_pdata)
NEXT_WAIT = 2.0  # for an answer to a PDU after the first on a raw connection (see run_raw)

PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}


# --- encoding ------------------------------------------------------------------------------


def _uid(value: str) -> bytes:
    data = value.encode("latin-1")
    return data + b"\0" if len(data) % 2 else data


def item(item_type: int, body: bytes) -> bytes:
    """A variable item of an A-ASSOCIATE PDU (2-byte length)."""
    return struct.pack(">BBH", item_type, 0, len(body) & 0xFFFF) + body


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def presentation_context(cid: int, abstract: str, syntaxes: Sequence[str]) -> bytes:
    body = struct.pack(">BBBB", cid, 0, 0, 0) + item(0x30, abstract.encode("latin-1"))
    body += b"".join(item(0x40, s.encode("latin-1")) for s in syntaxes)
    return item(0x20, body)


def user_information(
    max_length: int = 0, implementation: str = "1.2.826.0.1.3680043.10.1439.9"
) -> bytes:
    body = item(0x51, struct.pack(">I", max_length)) + item(0x52, implementation.encode())
    return item(0x50, body + item(0x55, b"FUZZ"))


def associate_rq(
    called: str = "IMAGING",
    calling: str = "FUZZSCU",
    contexts: Sequence[tuple[int, str, str]] = CONTEXTS,
    *,
    version: int = 1,
    application_context: str = APPLICATION_CONTEXT,
    user_info: bytes | None = None,
    extra_items: bytes = b"",
) -> bytes:
    body = struct.pack(">HH", version, 0)
    body += called.encode("latin-1")[:16].ljust(16) + calling.encode("latin-1")[:16].ljust(16)
    body += bytes(32) + item(0x10, application_context.encode("latin-1"))
    body += b"".join(presentation_context(c, a, [s]) for c, a, s in contexts) + extra_items
    body += user_information() if user_info is None else user_info
    return pdu(0x01, body)


def release_rq() -> bytes:
    return pdu(0x05, bytes(4))


def abort_rq(source: int = 0, reason: int = 0) -> bytes:
    return pdu(0x07, struct.pack(">BBBB", 0, 0, source, reason))


def pdv(context_id: int, header: int, fragment: bytes) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment


def p_data(*items: bytes) -> bytes:
    return pdu(0x04, b"".join(items))


def element(group: int, elem: int, value: bytes) -> bytes:
    """An implicit VR little endian element (command sets are always encoded so)."""
    return struct.pack("<HHI", group, elem, len(value)) + value


def command_set(fields: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set from (element number in group 0000, value) with its group length."""
    body = b"".join(element(0, number, value) for number, value in fields)
    return element(0, 0x0000, struct.pack("<I", len(body))) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value & 0xFFFF)


def echo_rq(message_id: int = SENTINEL_MESSAGE_ID) -> bytes:
    return command_set(
        [
            (0x0002, _uid(VERIFICATION)),
            (0x0100, us(0x0030)),
            (0x0110, us(message_id)),
            (0x0800, us(0x0101)),
        ]
    )


def store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x0002, _uid(sop_class)),
            (0x0100, us(0x0001)),
            (0x0110, us(message_id)),
            (0x0700, us(0)),
            (0x0800, us(0x0000)),
            (0x1000, _uid(sop_instance)),
        ]
    )


def find_rq(sop_class: str, message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x0002, _uid(sop_class)),
            (0x0100, us(0x0020)),
            (0x0110, us(message_id)),
            (0x0700, us(0)),
            (0x0800, us(0x0000)),
        ]
    )


def message(context_id: int, command: bytes, data: bytes | None, max_length: int = 0) -> bytes:
    """One DIMSE message as P-DATA-TF PDUs (the data set fragmented to the peer's maximum)."""
    out = p_data(pdv(context_id, 0x03, command))
    if data is None:
        return out
    room = (max_length - 6) if max_length > 6 else 1 << 20
    if not data:
        return out + p_data(pdv(context_id, 0x02, b""))
    for start in range(0, len(data), room):
        last = start + room >= len(data)
        out += p_data(pdv(context_id, 0x02 if last else 0x00, data[start : start + room]))
    return out


# --- decoding ------------------------------------------------------------------------------


def split_pdus(stream: bytes) -> list[bytes]:
    """Cut a byte stream into PDUs by their length fields; a short tail stays one piece."""
    pieces: list[bytes] = []
    at = 0
    while at < len(stream):
        if len(stream) - at < 6:
            pieces.append(stream[at:])
            break
        (length,) = struct.unpack(">I", stream[at + 2 : at + 6])
        end = at + 6 + length
        pieces.append(stream[at:end])
        at = end
    return pieces


def parse_command(data: bytes) -> dict[int, bytes]:
    """Group 0000 elements of an implicit VR little endian command set."""
    fields: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(data):
        group, number, length = struct.unpack("<HHI", data[at : at + 8])
        if group != 0:
            break
        fields[number] = data[at + 8 : at + 8 + length]
        at += 8 + length
    return fields


def accepted_contexts(ac: bytes) -> tuple[dict[int, str], int]:
    """An A-ASSOCIATE-AC's accepted context ids with their transfer syntax, and the peer's
    maximum PDU length (0 = unlimited)."""
    accepted: dict[int, str] = {}
    max_length = 0
    at = 6 + 68
    while at + 4 <= len(ac):
        item_type, _, length = struct.unpack(">BBH", ac[at : at + 4])
        body = ac[at + 4 : at + 4 + length]
        if item_type == 0x21 and len(body) >= 4 and body[2] == 0:
            sub = body[4:]
            if len(sub) >= 4 and sub[0] == 0x40:
                (sub_length,) = struct.unpack(">H", sub[2:4])
                accepted[body[0]] = sub[4 : 4 + sub_length].decode("latin-1").rstrip("\0 ")
        elif item_type == 0x50:
            sub_at = 0
            while sub_at + 4 <= len(body):
                sub_type, _, sub_length = struct.unpack(">BBH", body[sub_at : sub_at + 4])
                if sub_type == 0x51 and sub_length == 4:
                    (max_length,) = struct.unpack(">I", body[sub_at + 4 : sub_at + 8])
                sub_at += 4 + sub_length
        at += 4 + length
    return accepted, max_length


@dataclass
class Reply:
    """What one connection received, in order."""

    events: list[str] = field(default_factory=list)
    ac: bytes = b""
    # DIMSE responses: (message id responded to, command field, status)
    responses: list[tuple[int, int, int]] = field(default_factory=list)
    finished: bool = False  # the connection ended (closed, reset or aborted)

    def add(self, event: str) -> None:
        self.events.append(event)


class Connection:
    """A TCP connection that reads whole PDUs and reassembles DIMSE command sets."""

    def __init__(self, port: int, timeout: float = REPLY_TIMEOUT, max_length: int = 0) -> None:
        self.max_length = max_length  # what we told the server we take (0: anything)
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.reply = Reply()
        self.commands: dict[int, bytearray] = {}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> bool:
        """False if the server had already gone (its reaction is read afterwards)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def half_close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False when the connection ended or the deadline passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.reply.add("no-reply")
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            self.reply.add("no-reply")
            return False
        except OSError:
            self.reply.add("reset")
            self.reply.finished = True
            return False
        if not chunk:
            self.reply.add("closed")
            self.reply.finished = True
            return False
        self.buffer += chunk
        return True

    def next_pdu(self, timeout: float = REPLY_TIMEOUT) -> tuple[int, bytes] | None:
        """The next whole PDU (type, bytes), or None (the reason is in ``reply.events``)."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 6:
                (length,) = struct.unpack(">I", self.buffer[2:6])
                if len(self.buffer) >= 6 + length:
                    data = bytes(self.buffer[: 6 + length])
                    del self.buffer[: 6 + length]
                    return data[0], data
            if not self._fill(deadline):
                return None

    def handle(self, pdu_type: int, data: bytes) -> None:
        """Record a received PDU; a P-DATA's complete command sets become responses."""
        if pdu_type == 0x04 and self.max_length > 6 and len(data) - 6 > self.max_length:
            # PS3.8 9.3.5: more than we said we take (below 7 bytes nothing fits a PDV)
            self.reply.add("oversized-pdu")
        if pdu_type != 0x04:
            name = PDU_NAMES.get(pdu_type, f"pdu-0x{pdu_type:02X}")
            self.reply.add(name)
            if pdu_type == 0x02:
                self.reply.ac = data
            if pdu_type in (0x03, 0x07):
                self.reply.finished = True
            return
        at = 6
        while at + 6 <= len(data):
            (length,) = struct.unpack(">I", data[at : at + 4])
            cid, header = data[at + 4], data[at + 5]
            fragment = data[at + 6 : at + 4 + length]
            at += 4 + length
            if not header & 0x01:
                continue  # data set fragments (C-FIND identifiers) are not looked at
            self.commands.setdefault(cid, bytearray()).extend(fragment)
            if header & 0x02:
                fields = parse_command(bytes(self.commands.pop(cid)))
                responded = struct.unpack("<H", fields.get(0x0120, b"\0\0")[:2])[0]
                command = struct.unpack("<H", fields.get(0x0100, b"\0\0")[:2])[0]
                status = struct.unpack("<H", fields.get(0x0900, b"\xff\xff")[:2])[0]
                self.reply.responses.append((responded, command, status))

    def read_until(self, done: Callable[[Reply], bool], timeout: float = REPLY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.reply.finished and not done(self.reply):
            got = self.next_pdu(max(0.0, deadline - time.monotonic()))
            if got is None:
                return
            self.handle(*got)

    def drain(self, timeout: float = REPLY_TIMEOUT) -> None:
        """Read until the server ends the connection."""
        self.read_until(lambda reply: False, timeout)


def _more_events_than(count: int) -> Callable[[Reply], bool]:
    return lambda reply: len(reply.events) > count


def _sentinel_answered(reply: Reply) -> bool:
    return any(r[0] == SENTINEL_MESSAGE_ID for r in reply.responses)


@contextlib.contextmanager
def association(port: int, max_length: int = 0) -> Iterator[tuple[Connection, dict[int, str], int]]:
    """An association with :data:`CONTEXTS` proposed (and ``max_length`` as the largest PDU
    we take): the connection, the accepted contexts and the server's maximum PDU length.
    Raises RuntimeError when it is not accepted."""
    conn = Connection(port, max_length=max_length)
    try:
        conn.send(associate_rq(user_info=user_information(max_length)))
        got = conn.next_pdu()
        if got is None or got[0] != 0x02:
            raise RuntimeError(f"association not accepted: {conn.reply.events or got}")
        accepted, max_length = accepted_contexts(got[1])
        yield conn, accepted, max_length
    finally:
        conn.close()


def _summarise(events: Sequence[str], statuses: Sequence[str] = ()) -> str:
    out: list[str] = []
    for event in [*statuses, *events]:
        if not out or out[-1] != event:
            out.append(event)
    return ">".join(out) or "nothing"


def run_raw(port: int, stream: bytes) -> str:
    """Send ``stream`` from the start of a connection, the way an SCU would: PDU by PDU, each
    complete one answered (or given :data:`NEXT_WAIT` to be) before the next is sent, then,
    from the first piece that is not a complete PDU of a known type, everything left at once;
    then the write side is closed and everything read.  Waiting for each answer keeps the
    outcome independent of timing (a release sent before the A-ASSOCIATE-AC was read raced
    with it)."""
    conn = Connection(port)
    try:
        pieces = split_pdus(stream)
        for n, piece in enumerate(pieces):
            if conn.reply.finished:
                break
            complete = len(piece) >= 6 and len(piece) == 6 + struct.unpack(">I", piece[2:6])[0]
            # pynetdicom reads the body of known PDU types only; after an unknown type it takes
            # the next bytes for a new PDU, so there is no complete PDU to wait for an answer to.
            if not complete or piece[0] not in PDU_NAMES:
                conn.send(b"".join(pieces[n:]))
                break
            conn.send(piece)
            seen = len(conn.reply.events)
            wait = REPLY_TIMEOUT if n == 0 else NEXT_WAIT
            conn.read_until(_more_events_than(seen), wait)
            if n and conn.reply.events[-1:] == ["no-reply"]:
                conn.reply.events.pop()  # a PDU the server takes without answering: go on
        if not conn.reply.finished:
            conn.half_close()
            conn.drain()
        return _summarise(conn.reply.events)
    finally:
        conn.close()


def _after_association(
    port: int,
    payload: bytes | Callable[[int], bytes],
    half_close: bool,
    message_id: int | None = None,
    our_max_length: int = 0,
    wait: float = REPLY_TIMEOUT,
) -> str:
    """Send ``payload`` (or what it builds for the server's maximum PDU length) on a new
    association and describe what happened."""
    with association(port, our_max_length) as (conn, _accepted, max_length):
        conn.send(payload(max_length) if callable(payload) else payload)
        if half_close:
            conn.half_close()
            conn.drain()
        else:
            conn.send(message(CONTEXT_ID[(VERIFICATION, IMPLICIT)], echo_rq(), None))
            conn.read_until(_sentinel_answered, wait)
            if _sentinel_answered(conn.reply):
                conn.reply.add("alive")
                conn.send(release_rq())
                conn.read_until(lambda r: "A-RELEASE-RP" in r.events, 5)
        statuses = [
            f"status:0x{status:04X}"
            for responded, _command, status in conn.reply.responses
            if responded != SENTINEL_MESSAGE_ID and (message_id is None or responded == message_id)
            if status not in (0xFF00, 0xFF01)
        ]
        events = [e for e in conn.reply.events if e not in ("A-RELEASE-RP",)]
        if not half_close and "alive" in events:
            events = ["alive"]
        return _summarise(events, statuses)


def run_pdata(port: int, stream: bytes, half_close: bool) -> str:
    """Send ``stream`` (PDUs) on an established association, then a C-ECHO to see whether the
    association survived (or, with ``half_close``, close the write side and read).  A PDU
    whose length field was made larger swallows the C-ECHO (the server rightly waits for the
    rest), so the wait for it is shorter than for a C-STORE."""
    return _after_association(port, stream, half_close, wait=PDATA_WAIT)


def run_store(port: int, dataset: bytes, context_id: int, sop_class: str, sop_instance: str) -> str:
    """A C-STORE-RQ with ``dataset`` as its data set: the response status, or how the
    association ended."""
    command = store_rq(sop_class, sop_instance)
    return _dimse_kind(
        _after_association(port, lambda most: message(context_id, command, dataset, most), False, 1)
    )


def run_find(
    port: int, identifier: bytes, context_id: int, sop_class: str, max_length: int = 0
) -> str:
    """A C-FIND-RQ with ``identifier`` (on an association where we take PDUs of at most
    ``max_length`` bytes): the final response status, or how it ended."""
    command = find_rq(sop_class)
    return _dimse_kind(
        _after_association(
            port,
            lambda most: message(context_id, command, identifier, most),
            False,
            1,
            max_length,
        )
    )


def _dimse_kind(kind: str) -> str:
    """A C-STORE or C-FIND case is described by its response status alone when there is one."""
    parts = kind.split(">")
    statuses = [p for p in parts if p.startswith("status:")]
    if statuses:
        return ("oversized-pdu>" if "oversized-pdu" in parts else "") + statuses[-1]
    return kind


# --- HTTP ----------------------------------------------------------------------------------


def http_request(
    method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def run_http(port: int, request: bytes, wait: float = REPLY_TIMEOUT) -> tuple[str, bytes]:
    """Send a raw HTTP/1.1 request (which asks for ``Connection: close``) and read the
    response until the server closes: ``http-NNN`` (or ``no-reply``/``closed``) and the body."""
    sock = socket.create_connection((HOST, port), timeout=wait)
    try:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        data = bytearray()
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                break
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            if _complete_response(data):
                break
    finally:
        sock.close()
    if not data:
        return "no-reply", b""
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        return "garbled", bytes(data[:200])
    return f"http-{int(status_line[1])}", body


def _complete_response(data: bytearray) -> bool:
    """A response with Content-Length has been read whole (no need to wait for the close)."""
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def stow_kind(status: str, body: bytes) -> str:
    """``http-202``/``http-409`` carry the first failed instance's status."""
    if status not in ("http-202", "http-409"):
        return status
    try:
        failed = json.loads(body).get("00081198", {}).get("Value") or []
        reason = failed[0]["00081197"]["Value"][0]
        return f"{status}:0x{int(reason):04X}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return status


def outcome_class(kind: str) -> str:
    """What a replay must reproduce: the kind, with the ways a connection can end (an A-ABORT,
    a close, a reset, whichever wins a race on the wire) taken as one."""
    if not kind or kind.startswith("http-") or kind.startswith("status:"):
        return kind
    parts = [("dropped" if p in DROPS else p) for p in kind.split(">")]
    out: list[str] = []
    for p in parts:
        if not out or out[-1] != p:
            out.append(p)
    return ">".join(out)


def is_success(kind: str) -> bool:
    """The server accepted (some of) what it was sent: an association, a success status, an
    association that still answers afterwards, a 2xx answer."""
    parts = kind.split(">")
    accepted = {"A-ASSOCIATE-AC", "status:0x0000", "alive"}
    return bool(accepted.intersection(parts)) or kind.startswith("http-2")
