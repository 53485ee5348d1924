"""Instance files under the data directory.

Paths come from a SHA-256 of the SOP Instance UID, never from the UID itself, so no received
value can steer a write outside the store.  A file is written under ``tmp/``, fsynced, then
hard-linked into place; the ``tmp/`` name is the journal entry that lets :func:`recover` undo a
write whose catalog commit never happened (process killed in between):

1. ``tmp/<key>.<nonce>.part``  written and fsynced (an empty file made ahead of need, renamed:
   see :class:`_Spares`)
2. ``instances/ab/cd/<key>.<nonce>.dcm``  hard link to it, directory fsynced
3. catalog row committed (points at the ``.dcm``)
4. older versions of ``<key>`` removed, then the ``.part`` unlinked

Any ``.part`` left at start-up marks a file whose fate is decided by the catalog.

``durable=False`` (``[storage] durability = "process"``) leaves out the two fsyncs: the order of
work is the same, so a killed process still loses nothing it acknowledged (the kernel holds the
written pages), but a power cut or kernel crash may lose the last seconds of instances.

Everything else reads instance files through the methods below (``open``, ``read``,
``local_path``, ``files``, ...), never through paths of its own, so the S3 backend
(:mod:`server.objectstore`) can take the local folder's place.  The data directory itself
(``root``) stays local either way: the catalog journal, audit trail, keys and reports live there.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.errors import StorageError


def storage_key(sop_instance_uid: str) -> str:
    return hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()


def _unlink(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _subdirectory(key: str) -> str:
    """Where a storage key's files go, below ``instances/``: two levels of its hash."""
    return f"{key[:2]}/{key[2:4]}"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new links, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Raw descriptors, not Python file objects: the receive path writes each instance in one
# write() and closes it, so a buffered writer only added work.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# Spare names carry the host (a data directory may be shared) and the process that made them.
_HOST = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:64] or "host"


class _Spares:
    """Empty files for the next writes, created ahead of need by a thread of their own.

    Creating a file allocates its inode, which on this project's ext4 disks cost 0.1-0.6 ms of
    kernel time per instance whenever the file system was busy: more than the rest of a small
    instance's ingest.  Renaming an existing file costs a few microseconds.  So the thread
    creates ``tmp/spare.<host>.<pid>.<nonce>`` files on the other core, and the receive path
    renames one to its ``.part`` name and writes into it.  Spares are not journal entries:
    recovery removes any it finds with the rest of what is in ``tmp/``, and ``check`` does not
    report them.  A process killed with spares ready (a DIMSE worker, which its parent starts
    again while the others go on, so no recovery runs) leaves them behind: the thread of the
    next process to write removes those of this host's processes that are gone.
    """

    POOL = 16

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._ready: collections.deque[tuple[str, int]] = collections.deque()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._registered = False

    def take_as(self, name: str) -> int | None:
        """A descriptor of an empty file now called ``name``, open for writing; None when none
        is ready."""
        if len(self._ready) <= self.POOL // 2:
            self._refill()
        try:
            path, fd = self._ready.popleft()
        except IndexError:
            return None
        try:
            os.rename(path, name)
        except OSError:  # removed under us: the caller creates its own
            os.close(fd)
            return None
        return fd

    def drain(self) -> None:
        """Remove the ready spares and let the thread end (recovery empties ``tmp/``, with no
        write running); the next write starts it again."""
        with self._lock:
            self._stopped = True
            self._wanted.set()
            if self._thread is not None:
                self._thread.join()
            while self._ready:
                path, fd = self._ready.popleft()
                os.close(fd)
                _unlink(path)
            self._thread = None
            self._stopped = False

    def _refill(self) -> None:
        with self._lock:
            if self._thread is None:
                if not self._registered:  # a process that stops cleanly leaves no spare behind
                    atexit.register(self.drain)
                    self._registered = True
                thread = threading.Thread(target=self._run, name="spare-files", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no more threads (or the interpreter is exiting)
                    return
                self._thread = thread
        self._wanted.set()

    def _reap(self) -> None:
        """Remove the spares of this host's processes that no longer exist."""
        own = f"spare.{_HOST}."
        for entry in os.scandir(self.tmp):
            if not entry.name.startswith(own):
                continue  # another host's, or a name from before hosts and pids were in it
            pid_text = entry.name[len(own) :].split(".", 1)[0]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _unlink(entry.path)
            except PermissionError:
                pass  # alive, someone else's

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            self._reap()
        while not self._stopped:
            self._wanted.wait()
            self._wanted.clear()
            try:
                while len(self._ready) < self.POOL and not self._stopped:
                    path = f"{self.tmp}/spare.{_HOST}.{os.getpid()}.{secrets.token_hex(8)}"
                    self._ready.append((path, os.open(path, _NEW_FILE, 0o666)))
            except OSError:
                continue  # a full disk: the receive path creates its own files and says so


@dataclass(frozen=True)
class StagedFile:
    """A durable file linked into place but not yet committed to the catalog."""

    key: str
    part: Path
    final: Path
    relative: str
    size: int


@dataclass(frozen=True)
class StoredObject:
    """One instance file as the backend lists it."""

    relative: str
    size: int
    mtime: float
    elsewhere: bool  # the same data is kept under another name too (a hard link)


class Storage:
    """Instance files in the local folder ``<root>/instances``."""

    backend = "local"

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root.resolve()
        self.durable = durable
        self.instances = self.root / "instances"
        self.tmp = self.root / "tmp"
        self.instances.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # The 256 first-level directories exist from the start, so a new second-level one costs
        # one mkdir on the receive path instead of pathlib's failed try, parent and retry.
        for first in range(256):
            (self.instances / f"{first:02x}").mkdir(exist_ok=True)
        self._known_dirs: set[str] = set()
        self._tmp, self._instances = str(self.tmp), str(self.instances)
        self._spares = _Spares(self.tmp)

    def path_of(self, relative: str) -> Path:
        return self.instances / relative

    # --- reading (every backend) -----------------------------------------------------------
    def open(self, relative: str) -> BinaryIO:
        """The stored file for sequential reading (streamed, never loaded whole)."""
        return open(self.path_of(relative), "rb")

    def read(self, relative: str) -> bytes:
        return self.path_of(relative).read_bytes()

    def local_path(self, relative: str) -> Path:
        """A local file holding the instance, for readers that seek (pixel data, pydicom)."""
        return self.path_of(relative)

    def size(self, relative: str) -> int | None:
        """The stored size in bytes, None when the file is missing."""
        try:
            return self.path_of(relative).stat().st_size
        except FileNotFoundError:
            return None

    def files(self) -> Iterator[StoredObject]:
        for first in sorted(self.instances.iterdir()):
            if not first.is_dir():
                continue
            for second in sorted(first.iterdir()):
                if not second.is_dir():
                    continue
                for path in sorted(second.iterdir()):
                    info = path.stat()
                    relative = str(path.relative_to(self.instances))
                    yield StoredObject(relative, info.st_size, info.st_mtime, info.st_nlink > 1)

    def delete(self, relative: str) -> None:
        self.path_of(relative).unlink(missing_ok=True)

    def quarantine(self, relative: str) -> str:
        """Move an unreferenced file to ``orphans/`` (kept for review); returns its new name."""
        target = self.root / "orphans" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path_of(relative), target)
        return f"orphans/{relative}"

    def probe(self) -> None:
        """Raise OSError unless the storage takes a durable write (readiness)."""
        probe = self.tmp / f"ready-{secrets.token_hex(4)}.probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            probe.unlink(missing_ok=True)

    # --- kept copies (the deleted-series area), by name under the data directory ------------
    def keep_copy(self, relative: str, name: str) -> None:
        """Keep the instance file also as ``name`` (a hard link: no data is copied)."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(self.path_of(relative), target)

    def write_kept(self, name: str, data: bytes) -> None:
        """Write ``name`` durably, with the directory entries of everything kept beside it."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(target.parent)

    def read_kept(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def list_kept(self, prefix: str) -> list[str]:
        directory = self.root / prefix
        if not directory.is_dir():
            return []
        return sorted(f"{prefix}/{p.name}" for p in directory.iterdir() if p.is_file())

    def remove_kept(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)

    def _directory(self, key: str) -> Path:
        return self.instances / _subdirectory(key)

    def stage(self, key: str, chunks: Iterable[bytes]) -> StagedFile:
        """Write the data durably and link it into place (steps 1-2 above)."""
        # Paths as strings: pathlib's objects cost more than the system calls they name here.
        nonce = secrets.token_hex(6)
        part = f"{self._tmp}/{key}.{nonce}.part"
        directory = f"{self._instances}/{_subdirectory(key)}"
        relative = f"{_subdirectory(key)}/{key}.{nonce}.dcm"
        final = f"{self._instances}/{relative}"
        size = 0
        fd = -1
        try:
            spare = self._spares.take_as(part)  # (descriptor 0 is a descriptor too)
            fd = os.open(part, _NEW_FILE, 0o666) if spare is None else spare
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                size += len(chunk)
            if directory not in self._known_dirs:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory)
                self._known_dirs.add(directory)
            # Linked before the flush: on a journalling file system (ext4, XFS) the file's fsync
            # then commits the new directory entry with it and the directory's fsync finds
            # nothing left to do (0.2 ms less, 0.1 ms net, per instance here). Until the
            # catalog commit the .part names the write, so recovery removes a half-flushed file.
            os.link(part, final)
            if self.durable:
                os.fsync(fd)
                fsync_dir(Path(directory))
        except OSError as exc:
            for leftover in (final, part):
                _unlink(leftover)
            raise StorageError(f"cannot write instance file: {exc.strerror or exc}") from exc
        finally:
            if fd >= 0:
                os.close(fd)
        return StagedFile(key, Path(part), Path(final), relative, size)

    def finish(self, staged: StagedFile, keep: bool, obsolete: str | None = None) -> None:
        """After the catalog decided: keep the file (dropping an older version) or drop it."""
        if not keep:
            _unlink(staged.final)
        elif obsolete and obsolete != staged.relative:
            _unlink(self.path_of(obsolete))
        _unlink(staged.part)

    def recover(self, committed_path: Callable[[str], str | None]) -> tuple[int, int]:
        """Resolve interrupted writes: keep what the catalog references, delete the rest.

        ``committed_path(key)`` returns the relative path the catalog holds for a storage key.
        Returns (kept, removed) file counts.
        """
        kept = removed = 0
        self._spares.drain()
        for part in sorted(self.tmp.glob("*.part")):
            key = part.name.split(".", 1)[0]
            wanted = committed_path(key)
            for candidate in self._directory(key).glob(f"{key}.*.dcm"):
                relative = str(candidate.relative_to(self.instances))
                if relative == wanted:
                    kept += 1
                else:
                    candidate.unlink(missing_ok=True)
                    removed += 1
            part.unlink(missing_ok=True)
        for stray in self.tmp.iterdir():  # only called with no other writer running
            if stray.is_file():
                stray.unlink(missing_ok=True)
        return kept, removed
