"""Lower pynetdicom's polling latency without burning idle CPU.

pynetdicom's association and DUL threads poll their queues and sleep 1 ms between checks, so
every DIMSE message waits up to a millisecond at each of several hand-offs: one association
cannot exceed a few hundred C-STOREs per second however fast the handler is.  Here their
``time.sleep`` becomes adaptive: right after a loop iteration that did real work the thread
polls again within 50 µs, and the delay doubles back to pynetdicom's 1 ms while it stays idle,
so an idle association costs what it did before.
"""

from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any

_MIN_DELAY = 0.00005
_MAX_DELAY = 0.001
_WORK = 0.0002  # an iteration longer than this did something (decoded a PDU, ran a handler)


class _AdaptiveSleep:
    def __init__(self) -> None:
        self._state = threading.local()

    def __call__(self, seconds: float) -> None:
        if seconds > _MAX_DELAY:  # deliberate waits (release grace periods) stay as they are
            time.sleep(seconds)
            return
        state = self._state
        now = time.perf_counter()
        delay: float = getattr(state, "delay", _MIN_DELAY)
        if now - getattr(state, "woke", 0.0) > _WORK:
            delay = _MIN_DELAY
        else:
            delay = min(delay * 2, _MAX_DELAY)
        state.delay = delay
        time.sleep(delay)
        state.woke = time.perf_counter()


class _Time(ModuleType):
    """Stands in for the ``time`` module inside pynetdicom's reactor modules."""

    def __init__(self) -> None:
        super().__init__("time")
        self.sleep = _AdaptiveSleep()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install() -> None:
    import pynetdicom.association
    import pynetdicom.dul

    for module in (pynetdicom.association, pynetdicom.dul):
        if not isinstance(module.time, _Time):
            module.time = _Time()  # type: ignore[attr-defined]
