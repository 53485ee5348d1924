"""The association limit shared by worker processes (server/dimse/slots.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from server.dimse.slots import ENV, Slots, slots_directory
from tests.helpers import ROOT


def test_slots_run_out_and_come_back() -> None:
    with slots_directory(3) as directory:
        assert os.environ[ENV] == str(directory)
        slots = Slots(directory)
        held = [slots.acquire() for _ in range(3)]
        assert None not in held
        assert slots.acquire() is None, "a fourth association finds no slot"
        os.close(held.pop())
        again = slots.acquire()
        assert again is not None
        for fd in [*held, again]:
            os.close(fd)
    assert ENV not in os.environ and not directory.exists()


def test_a_dead_process_gives_its_slot_back() -> None:
    with slots_directory(1) as directory:
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, pathlib; from server.dimse.slots import Slots\n"
                f"fd = Slots(pathlib.Path({str(directory)!r})).acquire()\n"
                "print(fd is not None, flush=True)\n"
                "sys.stdin.read()\n",
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        assert Slots(directory).acquire() is None, "held by the other process"
        holder.kill()
        holder.wait()
        fd = Slots(directory).acquire()
        assert fd is not None, "the kernel dropped the dead process's lock"
        os.close(fd)


def test_directories_of_killed_servers_are_swept() -> None:
    """A server killed with SIGKILL leaves its slot directory behind; the next one removes
    it (and leaves a live server's alone)."""
    import shutil
    import tempfile

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    base = pathlib.Path(tempfile.gettempdir())
    stale = base / f"imaging-slots-{int(dead.stdout)}-leftover"
    stale.mkdir()
    live = base / f"imaging-slots-{os.getpid()}-other"
    live.mkdir()
    try:
        with slots_directory(2) as path:
            assert sorted(p.name for p in path.iterdir()) == ["slot-0000", "slot-0001"]
            assert not stale.exists()
            assert live.exists()
        assert not path.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
