"""Instance files under the data directory.

Paths come from a SHA-256 of the SOP Instance UID, never from the UID itself, so no received
value can steer a write outside the store.  A file is written under ``tmp/``, fsynced, then
hard-linked into place; the ``tmp/`` name is the journal entry that lets :func:`recover` undo a
write whose catalog commit never happened (process killed in between):

1. ``tmp/<key>.<nonce>.part``  written and fsynced
2. ``instances/ab/cd/<key>.<nonce>.dcm``  hard link to it, directory fsynced
3. catalog row committed (points at the ``.dcm``)
4. older versions of ``<key>`` removed, then the ``.part`` unlinked

Any ``.part`` left at start-up marks a file whose fate is decided by the catalog.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from server.errors import StorageError


def storage_key(sop_instance_uid: str) -> str:
    return hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new links, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StagedFile:
    """A durable file linked into place but not yet committed to the catalog."""

    key: str
    part: Path
    final: Path
    relative: str
    size: int


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.instances = self.root / "instances"
        self.tmp = self.root / "tmp"
        self.instances.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # The 256 first-level directories exist from the start, so a new second-level one costs
        # one mkdir on the receive path instead of pathlib's failed try, parent and retry.
        for first in range(256):
            (self.instances / f"{first:02x}").mkdir(exist_ok=True)
        self._known_dirs: set[Path] = set()

    def path_of(self, relative: str) -> Path:
        return self.instances / relative

    def _directory(self, key: str) -> Path:
        return self.instances / key[:2] / key[2:4]

    def stage(self, key: str, chunks: Iterable[bytes]) -> StagedFile:
        """Write the data durably and link it into place (steps 1-2 above)."""
        nonce = secrets.token_hex(6)
        part = self.tmp / f"{key}.{nonce}.part"
        directory = self._directory(key)
        final = directory / f"{key}.{nonce}.dcm"
        size = 0
        try:
            with open(part, "xb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if directory not in self._known_dirs:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory)
                self._known_dirs.add(directory)
            os.link(part, final)
            fsync_dir(directory)
        except OSError as exc:
            for leftover in (final, part):
                leftover.unlink(missing_ok=True)
            raise StorageError(f"cannot write instance file: {exc.strerror or exc}") from exc
        return StagedFile(key, part, final, str(final.relative_to(self.instances)), size)

    def finish(self, staged: StagedFile, keep: bool, obsolete: str | None = None) -> None:
        """After the catalog decided: keep the file (dropping an older version) or drop it."""
        if keep:
            if obsolete and obsolete != staged.relative:
                self.path_of(obsolete).unlink(missing_ok=True)
        else:
            staged.final.unlink(missing_ok=True)
        staged.part.unlink(missing_ok=True)

    def recover(self, committed_path: Callable[[str], str | None]) -> tuple[int, int]:
        """Resolve interrupted writes: keep what the catalog references, delete the rest.

        ``committed_path(key)`` returns the relative path the catalog holds for a storage key.
        Returns (kept, removed) file counts.
        """
        kept = removed = 0
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
