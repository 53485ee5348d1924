"""Per-association bookkeeping: an id for log records and the association metrics.

pynetdicom runs each association on a thread of its own, and EVT_REQUESTED fires on it before
any service request, so the id set there (calling AE and 6 hex digits) stays in that thread's
context for every record the handlers log.  An established association ends with EVT_RELEASED
or EVT_ABORTED on that thread (pynetdicom raises EVT_ABORTED when the connection drops), which
is where it is counted; EVT_CONN_CLOSE comes from the socket thread, often before the release.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pynetdicom import evt

from server import metrics
from server.telemetry import association_var

_lock = threading.Lock()
_open: set[int] = set()  # id() of the associations established and not yet ended


def _requested(event: evt.Event) -> None:
    # requestor.ae_title is filled in later, by the negotiation; the request already names it.
    request = event.assoc.requestor.primitive
    calling = str(getattr(request, "calling_ae_title", "") or "").strip() or "?"
    association_var.set(f"{calling}#{secrets.token_hex(3)}")


def _accepted(event: evt.Event) -> None:
    with _lock:
        _open.add(id(event.assoc))
    metrics.ASSOCIATIONS_ACTIVE.inc()


def _end(event: evt.Event, outcome: str) -> None:
    with _lock:
        if id(event.assoc) not in _open:
            return  # ended already (an abort while releasing)
        _open.discard(id(event.assoc))
    metrics.ASSOCIATIONS_ACTIVE.dec()
    metrics.ASSOCIATIONS.labels(outcome).inc()


def _released(event: evt.Event) -> None:
    _end(event, "released")


def _aborted(event: evt.Event) -> None:
    _end(event, "aborted")


def _rejected(event: evt.Event) -> None:
    metrics.ASSOCIATIONS.labels("rejected").inc()


HANDLERS: list[tuple[Any, Callable[[evt.Event], None]]] = [
    (evt.EVT_REQUESTED, _requested),
    (evt.EVT_ACCEPTED, _accepted),
    (evt.EVT_REJECTED, _rejected),
    (evt.EVT_RELEASED, _released),
    (evt.EVT_ABORTED, _aborted),
]


def timed_find(responses: Iterator[Any], model: str) -> Iterator[Any]:
    """``responses`` of a C-FIND handler, timed until the last one is sent."""
    started = time.perf_counter()
    try:
        yield from responses
    finally:
        metrics.DIMSE_FIND_SECONDS.labels(model).observe(time.perf_counter() - started)
