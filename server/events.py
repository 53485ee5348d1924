"""Event bus: what happened, announced after it committed (ARCHITECTURE.md 4), to every process.

Publishers call :func:`publish` only after their transaction committed.  Subscribers of this
process (the WebSocket hub of the JSON API, the AI trigger) get each event on the publishing
thread and must not block.  A failing subscriber is logged and never undoes or fails the
publisher's work.

``serve`` runs several worker processes, and the one that publishes an event is rarely the one
holding the WebSocket that wants it.  So :func:`publish` also writes each event to the catalog's
``event_log`` table (:class:`~server.catalog.schema.EventLog`), and a process that wants the
events of the others runs a :class:`Relay`: a thread that reads the rows written since it last
looked, every 250 ms, and hands on those other processes wrote (its own were already delivered
on the bus).  This works the same on SQLite and PostgreSQL, and across machines sharing one
PostgreSQL catalog.  Publishers delete rows older than an hour every few minutes.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger(__name__)

RETENTION_SECONDS = 3600  # event_log rows older than this are deleted
PRUNE_EVERY = 300.0  # seconds between two prunes by one process
POLL_INTERVAL = 0.25
GAP_WAIT = 10.0  # how long a relay waits for a row whose id it skipped (PostgreSQL commit order)
_BATCH = 200  # rows per read: less than a socket's queue (server/web/ws.py)
_MAX_GAP = 1000  # a jump of more ids than this is not tracked as gaps


@dataclass(frozen=True)
class Event:
    kind: str  # e.g. "worklist.status_changed", "worklist.created", "image_upload"
    data: dict[str, Any]
    institution: str | None = None  # tenant the event belongs to, if any
    time: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]
_subscribers: list[Subscriber] = []
_lock = threading.Lock()


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Register a subscriber of this process; returns the function that unregisters it."""
    with _lock:
        _subscribers.append(subscriber)

    def unsubscribe() -> None:
        with _lock:
            if subscriber in _subscribers:
                _subscribers.remove(subscriber)

    return unsubscribe


def publish(event: Event) -> None:
    """Deliver ``event`` to this process's subscribers, then record it for the others."""
    with _lock:
        targets = list(_subscribers)
    for subscriber in targets:
        try:
            subscriber(event)
        except Exception:
            log.exception("event subscriber failed on %s", event.kind)
    _record(event)


# --- the shared log ------------------------------------------------------------------------

_origin = ("", -1)
_last_prune = 0.0


def origin() -> str:
    """This process's name in ``event_log.origin`` (host, pid and a nonce: pids are reused)."""
    global _origin
    pid = os.getpid()
    if _origin[1] != pid:
        _origin = (f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}", pid)
    return _origin[0]


def _record(event: Event) -> None:
    """Write ``event`` to the catalog; never raises (other processes miss it, and it is logged)."""
    from server.catalog.db import database

    if database.obj is None:  # no catalog in this process (unit tests of pure code)
        return
    try:
        payload = orjson.dumps(event.data, default=str).decode()
        _insert(event, payload)
    except Exception as exc:
        log.warning("event %s not recorded for other processes: %s", event.kind, exc)


def _insert(event: Event, payload: str) -> None:
    global _last_prune
    from server.catalog.db import database, session, write_transaction
    from server.catalog.schema import EventLog

    row = {
        "kind": event.kind,
        "institution": event.institution,
        "data": payload,
        "origin": origin(),
        "created_ms": int(event.time * 1000),
    }
    with session():
        if database.in_transaction():
            # Published inside a caller's transaction: the row commits (or not) with it.
            EventLog.insert(**row).execute()
            return
        now = time.monotonic()
        prune = now - _last_prune > PRUNE_EVERY
        with write_transaction():
            EventLog.insert(**row).execute()
            if prune:
                _last_prune = now
                prune_log()


def prune_log(retention: float = RETENTION_SECONDS) -> int:
    """Delete rows older than ``retention`` seconds, keeping the newest row (on SQLite a new
    row's id is the largest id + 1: with the table emptied, ids would start over and relays
    that remember a larger id would miss the new rows).  Runs in the caller's session."""
    from server.catalog.schema import EventLog

    cutoff = int((time.time() - retention) * 1000)
    newest = EventLog.select(EventLog.id).order_by(EventLog.id.desc()).limit(1)
    deleted: int = (
        EventLog.delete()
        .where((EventLog.created_ms < cutoff) & (EventLog.id.not_in(newest)))
        .execute()
    )
    return deleted


class Relay:
    """Hands ``deliver`` the events other processes published, while active.

    A daemon thread reads ``event_log`` rows with an id above the largest one it saw, every
    ``interval`` seconds.  :meth:`activate` (first listener) starts from the newest row, so a
    listener gets what was published after it came, and never a backlog; :meth:`deactivate`
    (last listener gone) stops reading.  On PostgreSQL ids come from a sequence at insert time,
    so a row can commit after one with a larger id; ids skipped over are asked for again for
    ``gap_wait`` seconds.  Each row is delivered once: the relay is one thread per process.
    """

    def __init__(
        self, deliver: Subscriber, interval: float = POLL_INTERVAL, gap_wait: float = GAP_WAIT
    ) -> None:
        self.deliver = deliver
        self.interval = interval
        self.gap_wait = gap_wait
        self._lock = threading.Lock()
        self._active = threading.Event()
        self._stop = threading.Event()
        self._cursor: int | None = None
        self._gaps: dict[int, float] = {}  # skipped id -> when first skipped
        self._thread: threading.Thread | None = None

    def activate(self) -> None:
        """Start reading from the newest row (blocking: reads the catalog once)."""
        with self._lock:
            if self._cursor is None:
                self._cursor = _newest_id()
                self._gaps.clear()
            self._active.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="event-relay", daemon=True)
                self._thread.start()

    def deactivate(self) -> None:
        with self._lock:
            self._active.clear()
            self._cursor = None
            self._gaps.clear()

    def stop(self) -> None:
        self.deactivate()
        self._stop.set()
        self._active.set()  # wake the thread so it sees _stop
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._active.wait(1.0):
                continue
            try:
                more = self.poll()
            except Exception as exc:
                log.warning("event relay: reading event_log failed: %s", exc)
                more = False
            if not more:
                self._stop.wait(self.interval)

    def poll(self) -> bool:
        """Deliver what arrived since the last call; True when more rows are waiting."""
        from server.catalog.db import session
        from server.catalog.schema import EventLog

        with self._lock:
            if self._cursor is None:
                return False
            cursor = self._cursor
            now = time.monotonic()
            self._gaps = {i: t for i, t in self._gaps.items() if now - t < self.gap_wait}
            cond = EventLog.id > cursor
            if self._gaps:
                cond |= EventLog.id.in_(list(self._gaps))
            with session():
                rows = list(
                    EventLog.select().where(cond).order_by(EventLog.id).limit(_BATCH).dicts()
                )
            mine = origin()
            events: list[Event] = []
            for row in rows:
                ident = int(row["id"])
                if ident > cursor:
                    if ident - cursor <= _MAX_GAP:
                        for missing in range(cursor + 1, ident):
                            self._gaps[missing] = now
                    cursor = ident
                else:
                    self._gaps.pop(ident, None)
                if row["origin"] == mine:
                    continue  # delivered on this process's bus when published
                try:
                    data = orjson.loads(row["data"])
                except orjson.JSONDecodeError:
                    continue
                events.append(
                    Event(row["kind"], data, row["institution"], row["created_ms"] / 1000)
                )
            self._cursor = cursor
        for event in events:
            try:
                self.deliver(event)
            except Exception:
                log.exception("event relay: delivering %s failed", event.kind)
        return len(rows) == _BATCH


def _newest_id() -> int:
    from server.catalog.db import session
    from server.catalog.schema import EventLog

    with session():
        row = EventLog.select(EventLog.id).order_by(EventLog.id.desc()).first()
    return int(row.id) if row is not None else 0
