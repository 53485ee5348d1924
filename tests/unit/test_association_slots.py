"""The association limit shared by worker processes (server/dimse/slots.py)."""

from __future__ import annotations

import os
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
