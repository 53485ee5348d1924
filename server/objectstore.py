"""Instance files in an S3-compatible object store (AWS S3, MinIO, SeaweedFS, Ceph RGW).

``[storage] backend = "s3"`` puts every instance file in a bucket under
``<prefix>instances/ab/cd/<sha256(SOP Instance UID)>.<nonce>.dcm``, the same relative names the
local backend uses, so the catalog does not change with the backend.  Order of work, so that a
kill at any point loses nothing acknowledged and leaves no object behind:

1. ``tmp/<key>.<nonce>.part`` created in the local data directory: the journal entry;
2. the object PUT (with its MD5, so the store rejects a corrupted body); S3 makes the object
   visible whole or not at all, and durable before the PUT returns;
3. catalog row committed; success answered;
4. an older version's object deleted, then the journal entry removed.

Start-up recovery deletes the object of every journal entry the catalog does not reference.  A
failed PUT raises :class:`~server.errors.StorageError` (0xA700 / 409): no catalog row is written.

Reads stream the object's body (WADO-RS retrieval never holds a whole study); readers that seek
(frames, rendering, transcoding, the AI worker) get a local copy from a cache under
``<data_dir>/cache/`` bounded by ``[storage] cache_mb``.  Object names carry a nonce and objects
are never rewritten, so a cached copy cannot go stale.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from server.errors import StorageError
from server.storage import StagedFile, Storage, StoredObject

_CACHE_EVICT_AGE = 600.0  # seconds a cached copy is left alone after its last use


class S3Storage(Storage):
    backend = "s3"

    def __init__(
        self,
        root: Path,
        *,
        bucket: str,
        endpoint: str = "",
        region: str = "",
        access_key: str = "",
        secret_key: str = "",
        prefix: str = "",
        cache_mb: int = 1024,
        client: Any = None,
    ) -> None:
        super().__init__(root)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache = self.root / "cache"
        self.cache_bytes = cache_mb * 1024 * 1024
        self._cache_lock = threading.Lock()
        self._cache_used: int | None = None
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=endpoint or None,
                region_name=region or "us-east-1",
                aws_access_key_id=access_key or None,
                aws_secret_access_key=secret_key or None,
                config=Config(
                    retries={"max_attempts": 4, "mode": "standard"},
                    max_pool_connections=32,
                    s3={"addressing_style": "path"},
                ),
            )
        self.s3 = client

    # --- names -------------------------------------------------------------------------------
    def _object(self, relative: str) -> str:
        return f"{self.prefix}instances/{relative}"

    def _kept(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _errors(self) -> tuple[type[BaseException], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError, OSError)

    def ensure_bucket(self, patience: float = 15.0) -> None:
        """Create the bucket when it does not exist.  Start-up waits up to ``patience`` seconds
        for a store that is still coming up (started beside us), then gives a clear error."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.s3.head_bucket(Bucket=self.bucket)
                return
            except self._errors():
                pass
            try:
                self.s3.create_bucket(Bucket=self.bucket)
                return
            except self._errors() as exc:
                if time.monotonic() >= deadline:
                    raise StorageError(
                        f"S3 bucket {self.bucket!r} is not reachable: {exc}"
                    ) from exc
            time.sleep(0.5)  # the store is not answering yet

    # --- writing -----------------------------------------------------------------------------
    def stage(self, key: str, chunks: Iterable[bytes]) -> StagedFile:
        nonce = secrets.token_hex(6)
        part = self.tmp / f"{key}.{nonce}.part"
        relative = f"{key[:2]}/{key[2:4]}/{key}.{nonce}.dcm"
        data = b"".join(chunks)
        try:
            part.touch(exist_ok=False)  # the journal entry comes first
        except OSError as exc:
            raise StorageError(f"cannot write the journal entry: {exc.strerror or exc}") from exc
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=self._object(relative),
                Body=data,
                ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
                ContentType="application/dicom",
            )
        except self._errors() as exc:
            self._delete_object(self._object(relative))
            part.unlink(missing_ok=True)
            raise StorageError(f"object store write failed: {exc}") from exc
        return StagedFile(key, part, self.cache / relative, relative, len(data))

    def finish(self, staged: StagedFile, keep: bool, obsolete: str | None = None) -> None:
        if keep:
            if obsolete and obsolete != staged.relative:
                self.delete(obsolete)
        else:
            self.delete(staged.relative)
        staged.part.unlink(missing_ok=True)

    def recover(self, committed_path: Callable[[str], str | None]) -> tuple[int, int]:
        kept = removed = 0
        for part in sorted(self.tmp.glob("*.part")):
            key, nonce = part.name.split(".")[:2]
            relative = f"{key[:2]}/{key[2:4]}/{key}.{nonce}.dcm"
            if committed_path(key) == relative:
                kept += 1
            else:
                self._delete_object(self._object(relative))
                removed += 1
            part.unlink(missing_ok=True)
        for stray in self.tmp.iterdir():
            if stray.is_file():
                stray.unlink(missing_ok=True)
        return kept, removed

    def _delete_object(self, name: str) -> None:
        with contextlib.suppress(*self._errors()):
            self.s3.delete_object(Bucket=self.bucket, Key=name)

    def delete(self, relative: str) -> None:
        self._delete_object(self._object(relative))
        (self.cache / relative).unlink(missing_ok=True)

    # --- reading -----------------------------------------------------------------------------
    def open(self, relative: str) -> BinaryIO:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._object(relative))["Body"]
        except self._errors() as exc:
            raise FileNotFoundError(f"object {relative}: {exc}") from exc
        return cast(BinaryIO, _Body(body))

    def read(self, relative: str) -> bytes:
        with self.open(relative) as fh:
            return fh.read()

    def local_path(self, relative: str) -> Path:
        path = self.cache / relative
        try:
            os.utime(path)  # marks it used, so eviction leaves it alone
            return path
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{secrets.token_hex(4)}.download")
        try:
            with self.open(relative) as body, open(temporary, "wb") as fh:
                while chunk := body.read(1 << 20):
                    fh.write(chunk)
            os.replace(temporary, path)  # readers never see a half-written copy
        finally:
            temporary.unlink(missing_ok=True)
        self._account(path.stat().st_size)
        return path

    def _account(self, added: int) -> None:
        with self._cache_lock:
            if self._cache_used is None:
                self._cache_used = sum(
                    p.stat().st_size for p in self.cache.rglob("*.dcm") if p.is_file()
                )
            else:
                self._cache_used += added
            if self._cache_used <= self.cache_bytes:
                return
            self._cache_used = self._evict()

    def _evict(self) -> int:
        """Oldest-used copies go first, down to 3/4 of the limit; recently used ones stay
        (a reader may still be about to open them)."""
        files = sorted(
            ((p.stat().st_mtime, p.stat().st_size, p) for p in self.cache.rglob("*.dcm")),
            key=lambda t: t[0],
        )
        used = sum(size for _, size, _ in files)
        recent = time.time() - _CACHE_EVICT_AGE
        for mtime, size, path in files:
            if used <= self.cache_bytes * 3 // 4 or mtime > recent:
                break
            path.unlink(missing_ok=True)
            used -= size
        return used

    def size(self, relative: str) -> int | None:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=self._object(relative))
        except self._errors():
            return None
        return int(head["ContentLength"])

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def files(self) -> Iterator[StoredObject]:
        base = self._object("")
        for item in self._list(base):
            yield StoredObject(
                item["Key"][len(base) :],
                int(item["Size"]),
                item["LastModified"].timestamp(),
                False,
            )

    def quarantine(self, relative: str) -> str:
        name = f"orphans/{relative}"
        self.s3.copy_object(
            Bucket=self.bucket,
            Key=self._kept(name),
            CopySource={"Bucket": self.bucket, "Key": self._object(relative)},
        )
        self.delete(relative)
        return name

    def probe(self) -> None:
        super().probe()  # the journal directory must take writes too
        name = self._kept(f"tmp/ready-{secrets.token_hex(4)}.probe")
        self.s3.put_object(Bucket=self.bucket, Key=name, Body=b"ok")
        self._delete_object(name)

    # --- kept copies ---------------------------------------------------------------------------
    def keep_copy(self, relative: str, name: str) -> None:
        self.s3.copy_object(
            Bucket=self.bucket,
            Key=self._kept(name),
            CopySource={"Bucket": self.bucket, "Key": self._object(relative)},
        )

    def write_kept(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._kept(name), Body=data)

    def read_kept(self, name: str) -> bytes:
        body = self.s3.get_object(Bucket=self.bucket, Key=self._kept(name))["Body"]
        return cast(bytes, body.read())

    def list_kept(self, prefix: str) -> list[str]:
        base = self._kept(f"{prefix}/")
        return sorted(item["Key"][len(self.prefix) :] for item in self._list(base))

    def remove_kept(self, prefix: str) -> None:
        for item in list(self._list(self._kept(f"{prefix}/"))):
            self._delete_object(item["Key"])


class _Body:
    """An S3 response body as a closable binary reader."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int = -1) -> bytes:
        return cast(bytes, self._body.read(None if size < 0 else size))

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
