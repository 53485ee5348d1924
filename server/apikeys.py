"""API keys of the worklist API: created, listed and revoked with ``python -m server apikey``.

A key is 32 random bytes (URL-safe text) shown once at creation; the catalog keeps only its
SHA-256 (a key has too much entropy for a slow hash to add anything) and its first characters,
so listings can tell keys apart.  A key belongs to one institution.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from server.catalog.db import session, write_transaction
from server.catalog.schema import ApiKey

PREFIX_LENGTH = 10


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: int
    institution: str
    name: str
    prefix: str
    created_at: int
    revoked_at: int | None


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.institution, row.name, row.prefix, row.created_at, row.revoked_at)


def create(institution: str, name: str = "") -> tuple[str, KeyInfo]:
    """A new key for ``institution``: returns the key itself (shown once) and its record."""
    institution = institution.strip()
    if not institution:
        raise ValueError("an API key needs an institution")
    key = "wl_" + secrets.token_urlsafe(32)
    with session(), write_transaction():
        row = ApiKey.create(
            institution=institution,
            name=name,
            key_hash=_hash(key),
            prefix=key[:PREFIX_LENGTH],
            created_at=int(time.time()),
        )
    return key, _info(row)


def list_keys(institution: str | None = None) -> list[KeyInfo]:
    with session():
        select = ApiKey.select().order_by(ApiKey.id)
        if institution:
            select = select.where(ApiKey.institution == institution)
        return [_info(r) for r in select]


def revoke(ident: str) -> KeyInfo | None:
    """Revoke by id or by the key's prefix; None when nothing matched."""
    with session(), write_transaction():
        if ident.isdigit():
            row = ApiKey.get_or_none(ApiKey.id == int(ident))
        else:
            row = ApiKey.get_or_none(ApiKey.prefix == ident[:PREFIX_LENGTH])
        if row is None:
            return None
        if row.revoked_at is None:
            row.revoked_at = int(time.time())
            row.save()
        return _info(row)


def institution_for(key: str | None) -> KeyInfo | None:
    """The (unrevoked) key's record, or None for a missing, unknown or revoked key."""
    if not key:
        return None
    with session():
        row = ApiKey.get_or_none(ApiKey.key_hash == _hash(key.strip()))
    if row is None or row.revoked_at is not None:
        return None
    return _info(row)
