"""Temporary directories that ``serve`` shares with its worker processes through the
environment (the metrics files, the association slots).

Each is named after the pid of the ``serve`` that made it, so one that a killed server left
behind (SIGKILL runs no clean-up) is removed by the next server that starts on the machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def shared_directory(prefix: str, variable: str) -> Iterator[Path]:
    """A fresh directory named in environment ``variable`` (children inherit it) while the
    block runs, removed at the end; leftovers of dead servers with ``prefix`` go first."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(prefix + "*"):
        found = re.match(rf"{re.escape(prefix)}(\d+)-", old.name)
        if found and not alive(int(found.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    previous = os.environ.get(variable)
    os.environ[variable] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous
        shutil.rmtree(path, ignore_errors=True)
