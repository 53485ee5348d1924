"""The process model: worker processes on one socket, the single-process mode, and recovery
that never runs while another process may be writing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.dcmtk import findscu, storescu
from tests.helpers import ServerProcess, echo, have, server_cli, wait_for, write_config
from tools.generate import StudySpec, small_instance, write


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _files(tmp_path: Path, n: int) -> Path:
    for k in range(n):
        write(small_instance(StudySpec(patient_id=f"PROC{k}")), tmp_path / "files")
    return tmp_path / "files"


def test_single_process_mode(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg", server="[ae]\nworkers = 1\n")
    server = ServerProcess(tmp_path / "data", config).start()
    try:
        assert server.proc is not None and _children(server.proc.pid) == []
        if have("storescu"):
            storescu(server.port, [_files(tmp_path, 3)], "+sd")
            rsps, _ = findscu(server.port, "STUDY", {"PatientID": "PROC*"})
            assert len(rsps) == 3
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_workers_restart_and_die_with_parent(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg", server="[ae]\nworkers = 2\n")
    server = ServerProcess(tmp_path / "data", config).start()
    assert server.proc is not None
    deadline = time.monotonic() + 30
    while len(_children(server.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(server.proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # a worker crashes: the parent starts another
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _children(server.proc.pid)
        if len(now) == 2 and workers[0] not in now and all(echo(server.port) for _ in range(4)):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker not replaced: {now}\n{server.log()}")
    workers = _children(server.proc.pid)
    server.kill()  # SIGKILL the parent: no worker may survive it
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)
    assert not echo(server.port)


def test_import_beside_a_running_server_skips_recovery(tmp_path: Path) -> None:
    """Recovery deletes uncommitted files; with a server writing, that would eat its writes."""
    config = write_config(tmp_path / "cfg")
    server = ServerProcess(tmp_path / "data", config).start()
    in_flight = tmp_path / "data" / "tmp" / f"{'ab' * 32}.123456789abc.part"
    in_flight.write_bytes(b"a write the server has not committed yet")
    try:
        result = server_cli("import", config, tmp_path / "data", str(_files(tmp_path, 1)))
        assert result.returncode == 0, result.stderr
        assert "1 stored" in result.stdout
        assert in_flight.exists()
    finally:
        server.stop()
    server.start()  # alone now: recovery resolves the leftover
    server.stop()
    assert not in_flight.exists()


def _established(pid: int, port: int) -> int:
    """TCP connections to ``port`` that process ``pid`` holds open (from /proc)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def test_associations_are_spread_over_the_workers(tmp_path: Path) -> None:
    """Every worker wakes for a new connection; before, the first to accept() took it, and four
    modalities often landed three or four on one worker (one core, one GIL) while the other
    idled. A worker already serving now lets an idle one go first."""
    config = write_config(tmp_path / "cfg", server="[ae]\nworkers = 2\n")
    server = ServerProcess(tmp_path / "data", config).start()
    try:
        assert server.proc is not None
        wait_for(lambda: len(_children(server.proc.pid)) == 2, "two workers")
        workers = _children(server.proc.pid)
        ae = AE(ae_title="SPREAD")
        ae.add_requested_context(CTImageStorage)
        spreads = []
        for _ in range(5):
            held = []
            for n in range(1, 5):
                assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
                assert assoc.is_established
                held.append(assoc)
                wait_for(
                    lambda n=n: sum(_established(w, server.port) for w in workers) == n,
                    "the association on a worker",
                    10,
                )
            spreads.append(sorted(_established(w, server.port) for w in workers))
            for assoc in held:
                assoc.release()
            wait_for(
                lambda: sum(_established(w, server.port) for w in workers) == 0, "releases", 10
            )
        assert spreads.count([2, 2]) >= 4, spreads
    finally:
        server.stop()
