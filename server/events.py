"""In-process event bus: what happened, announced after it committed (ARCHITECTURE.md 4).

Publishers call :func:`publish` only after their transaction committed; subscribers (the
WebSocket hub of the JSON API, the AI trigger) get each event on the publishing thread and must
not block.  A failing subscriber is logged and never undoes or fails the publisher's work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    kind: str  # e.g. "worklist.status_changed", "worklist.created"
    data: dict[str, Any]
    institution: str | None = None  # tenant the event belongs to, if any
    time: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]
_subscribers: list[Subscriber] = []
_lock = threading.Lock()


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Register a subscriber; returns the function that unregisters it."""
    with _lock:
        _subscribers.append(subscriber)

    def unsubscribe() -> None:
        with _lock:
            if subscriber in _subscribers:
                _subscribers.remove(subscriber)

    return unsubscribe


def publish(event: Event) -> None:
    with _lock:
        targets = list(_subscribers)
    for subscriber in targets:
        try:
            subscriber(event)
        except Exception:
            log.exception("event subscriber failed on %s", event.kind)
