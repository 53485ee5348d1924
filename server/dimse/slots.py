"""One limit on concurrent associations for all DIMSE worker processes.

pynetdicom counts the associations of its own AE, and ``serve`` runs one AE per worker process:
``[ae] max_associations = 32`` with four workers would let 128 in.  Here the limit is shared:
``serve`` makes a directory of ``max_associations`` slot files, and an association may go on
only while its worker holds an exclusive ``flock`` on one of them.  Otherwise it is rejected
as PS3.8 9.3.4 says for a full node (A-ASSOCIATE-RJ, rejected-transient, service-provider
presentation, local-limit-exceeded).  The kernel drops a lock when its holder closes the file
or dies, so a killed worker never leaks a slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association

from server.tempdirs import shared_directory

log = logging.getLogger(__name__)

ENV = "IMAGING_ASSOCIATION_SLOTS"  # the slot directory, inherited by the worker processes
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # PS3.8 Table 9-21: transient, presentation, limit


@contextlib.contextmanager
def slots_directory(count: int) -> Iterator[Path]:
    """``count`` slot files in a fresh directory named in our environment, removed at the end."""
    with shared_directory("imaging-slots-", ENV) as path:
        for n in range(count):
            (path / f"slot-{n:04d}").touch()
        yield path


class Slots:
    def __init__(self, directory: Path) -> None:
        self.files = sorted(directory.glob("slot-*"))

    def acquire(self) -> int | None:
        """The descriptor holding a free slot's lock (close it to give the slot back), or None
        when all are taken."""
        start = random.randrange(len(self.files)) if self.files else 0  # fewer collisions
        for path in self.files[start:] + self.files[:start]:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None


_slots: Slots | None = None


def claim() -> tuple[bool, int | None]:
    """For an association served outside pynetdicom: (may it start, the slot's descriptor to
    close when it ends).  Without a slot directory (one worker) there is nothing to claim."""
    if _slots is None:
        return True, None
    fd = _slots.acquire()
    return fd is not None, fd


def _negotiate_as_acceptor(self: ACSE) -> None:
    if _slots is not None:
        fd = _slots.acquire()
        if fd is None:
            log.warning(
                "association from %s rejected: %d associations already (max_associations)",
                getattr(self.assoc.requestor, "address", "?"),
                len(_slots.files),
            )
            self.send_reject(*LOCAL_LIMIT_EXCEEDED)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        self.assoc.__dict__["_slot_fd"] = fd
    _original_negotiate(self)


def _run(self: Association) -> None:
    try:
        _original_run(self)
    finally:
        fd = self.__dict__.pop("_slot_fd", None)
        if fd is not None:
            os.close(fd)  # gives the slot back


_original_negotiate: Any = ACSE._negotiate_as_acceptor
_original_run: Any = Association.run


def install() -> None:
    """Use the slot directory named in the environment, if ``serve`` made one."""
    global _slots
    directory = os.environ.get(ENV)
    if not directory or not Path(directory).is_dir():
        return
    _slots = Slots(Path(directory))
    ACSE._negotiate_as_acceptor = _negotiate_as_acceptor  # type: ignore[method-assign]
    Association.run = _run  # type: ignore[method-assign,assignment]
