"""Event-driven waits for pynetdicom's reactor threads.

pynetdicom's DUL thread (socket I/O) and association thread (DIMSE dispatch) poll their queues
and sleep 1 ms between checks, so every DIMSE message waits up to a millisecond at each of
several hand-offs: one association cannot pass a few hundred C-STOREs per second however fast
the handler is, and C-MOVE sub-operations crawl.  Their ``time.sleep`` is replaced here by waits
that end as soon as there is something to do:

* the DUL thread waits in ``select`` on its socket and on a wake-up socket pair that
  ``send_pdu`` (something to send) writes to;
* the association thread waits on an Event set after every DUL state-machine action (a message
  arrived, a release or abort came in, the connection closed); :func:`park` holds it there while
  our own code exchanges messages on the association (the C-MOVE/C-GET fast path).

Both waits time out after 20 ms so timers and kill flags are still noticed; an idle association
now wakes 50 times a second instead of 1,000.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger(__name__)
_POLL = 0.001  # pynetdicom's poll interval: the sleeps we take over
_TIMEOUT = 0.02  # how long a wait may last when nothing wakes it (timers, kill flags)


def _wakeup_pair(dul: Any) -> tuple[socket.socket, socket.socket]:
    pair: tuple[socket.socket, socket.socket] | None = dul.__dict__.get("_wakeup")
    if pair is None:
        pair = socket.socketpair()
        for end in pair:
            end.setblocking(False)
        pair = dul.__dict__.setdefault("_wakeup", pair)
    return pair


def _dul_wait(dul: Any, timeout: float) -> None:
    hold = dul.__dict__.get("_park")
    if hold is not None and hold.want.is_set():
        if dul.to_provider_queue.empty() and dul.event_queue.empty():
            _hold_parked(hold, lambda: bool(dul._kill_thread))
        # else: send what is queued first (a pending response), then park
        return
    reader = _wakeup_pair(dul)[0]
    fds: list[Any] = [reader]
    transport = getattr(dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is not None and sock.fileno() >= 0:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes wait inside OpenSSL, where select cannot see them
        fds.append(sock)
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except (OSError, ValueError):  # the socket was closed under us
        time.sleep(timeout)
        return
    if reader in ready:
        with contextlib.suppress(BlockingIOError, OSError):
            reader.recv(4096)


class _Park:
    """Lets another thread hold an association's reactor inside its wait (see park())."""

    def __init__(self) -> None:
        self.wake = threading.Event()  # something to do: stop waiting
        self.want = threading.Event()  # a sender wants the reactor parked
        self.parked = threading.Event()  # the reactor is parked
        self.released = threading.Event()


def _park_of(assoc: Any) -> _Park:
    park: _Park | None = assoc.__dict__.get("_park")
    if park is None:
        park = assoc.__dict__.setdefault("_park", _Park())
    return park


def _hold_parked(park: _Park, killed: Callable[[], bool]) -> None:
    while park.want.is_set() and not killed():
        park.parked.set()
        park.released.wait(0.01)
    park.parked.clear()


def _assoc_wait(assoc: Any, timeout: float) -> None:
    park = _park_of(assoc)
    park.wake.wait(timeout)
    park.wake.clear()
    _hold_parked(park, lambda: bool(assoc._kill))


@contextlib.contextmanager
def park(assoc: Any, timeout: float = 2.0) -> Iterator[bool]:
    """Hold the association's reactor thread inside its wait, so that the caller can exchange
    messages on it without the reactor taking the response off the queue.

    Yields False (and holds nothing) if the reactor did not park in time. Unlike pynetdicom's
    own pause flag, this cannot be fooled by a reactor that is between two checks.
    """
    if threading.current_thread() is assoc:
        yield True  # called from the reactor thread itself: it is not polling, nothing to hold
        return
    state = _park_of(assoc)
    with _holding(state, state.wake.set, timeout) as parked:
        yield parked


@contextlib.contextmanager
def park_socket_reader(dul: Any, timeout: float = 2.0) -> Iterator[bool]:
    """Hold an association's DUL thread inside its wait, off the socket, so that the caller
    may read the peer's PDUs itself (the C-MOVE and C-GET fast paths, server/dimse/retrieve.py);
    yields False if it did not park in time.  While held, the thread neither reads nor sends:
    the caller owns the socket."""

    def wake() -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            _wakeup_pair(dul)[1].send(b"\0")

    with _holding(_park_of(dul), wake, timeout) as parked:
        yield parked


@contextlib.contextmanager
def _holding(state: _Park, wake: Callable[[], None], timeout: float) -> Iterator[bool]:
    """Ask a thread to park, wake it so it sees the request, wait for it; release it after."""
    state.released.clear()
    state.want.set()
    wake()
    parked = state.parked.wait(timeout)
    try:
        yield parked
    finally:
        state.want.clear()
        state.released.set()


class _ReactorTime(ModuleType):
    """Stands in for ``time`` inside pynetdicom.dul and pynetdicom.association."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if seconds == _POLL and isinstance(thread, DULServiceProvider):
            _dul_wait(thread, _TIMEOUT)
        elif seconds == _POLL and isinstance(thread, Association):
            _assoc_wait(thread, _TIMEOUT)
        else:  # deliberate waits and spin-waits stay as they are
            time.sleep(seconds)


_original_send_pdu = DULServiceProvider.send_pdu
_original_do_action = StateMachine.do_action


def _send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    with contextlib.suppress(BlockingIOError, OSError):
        _wakeup_pair(self)[1].send(b"\0")


def _do_action(self: StateMachine, event: str) -> None:
    """Every DUL event (a PDU in, a release or abort, the connection closing) may give the
    association thread something to do: wake it.

    Two cases pynetdicom leaves to its timeouts are ended here (found by tools/fuzz.py):

    * an action that raises (an A-ASSOCIATE-RQ with an even presentation context id, a P-DATA
      command set it cannot decode) killed the DUL thread, which pynetdicom only guards
      against for socket reads; it is now handled as pynetdicom handles those: an A-ABORT to
      the peer and the association ends;
    * a connection that closed or was aborted before its A-ASSOCIATE-RQ arrived left the
      association thread waiting for one for the whole ACSE timeout, holding one of the
      ``max_associations`` slots: 64 bare TCP connects (a port scan, a load balancer's health
      check) made the AE refuse every association for 30 seconds.
    """
    dul = self.dul
    try:
        _original_do_action(self, event)
    except Exception as exc:  # pynetdicom has logged it with its traceback
        log.warning(
            "DUL action for %s in %s failed, association aborted: %r",
            event,
            self.current_state,
            exc,
        )
        with contextlib.suppress(Exception):
            abort = A_ABORT_RQ()
            abort.source = 0x02
            abort.reason_diagnostic = 0x00
            if dul.socket is not None:
                dul.socket.send(abort.encode())
        assoc = dul.assoc
        assoc.is_aborted, assoc.is_established, assoc._kill = True, False, True
        dul._kill_thread = True
        _release_acceptor(dul)
    if self.current_state in ("Sta1", "Sta13"):
        _release_acceptor(dul)
    state = dul._assoc.__dict__.get("_park")
    if state is not None:
        state.wake.set()


def _release_acceptor(dul: Any) -> None:
    """Wake an acceptor's association thread that still waits for the A-ASSOCIATE-RQ (it
    takes ``None`` for its timeout, closes the connection and ends)."""
    assoc = dul.assoc
    if (
        assoc.is_acceptor
        and assoc.requestor.primitive is None
        and dul.to_user_queue.empty()
        and not dul.__dict__.get("_acceptor_released")
    ):
        dul.__dict__["_acceptor_released"] = True
        dul.to_user_queue.put(None)


def install() -> None:
    import pynetdicom.association
    import pynetdicom.dul

    for module in (pynetdicom.association, pynetdicom.dul):
        if not isinstance(module.time, _ReactorTime):
            module.time = _ReactorTime()  # type: ignore[attr-defined]
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    StateMachine.do_action = _do_action  # type: ignore[method-assign]
