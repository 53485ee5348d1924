"""Signed tokens (JWT, RFC 7519, HS256) for the JSON API, DICOMweb and the WebSocket.

The access token (1 hour) carries the user's id, role, institution and permissions, so requests
are authorised without a lookup, except the check that it was not revoked at logout.  The
refresh token (7 days) is single use: refreshing revokes it and issues a new pair; reusing a
revoked refresh token revokes every session of that user (it was stolen or replayed).  The
signing key is 32 random bytes in ``<data_dir>/jwt.key`` (mode 0600), created at first use and
shared by all processes and nodes that share the data directory.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from server.auth.users import UserInfo, get
from server.catalog.db import session, write_transaction
from server.catalog.schema import RefreshToken, RevokedToken

ACCESS_SECONDS = 3600
REFRESH_SECONDS = 7 * 24 * 3600
ALGORITHM = "HS256"
ISSUER = "imaging-server"

_key_lock = threading.Lock()
_keys: dict[Path, bytes] = {}


class TokenError(Exception):
    """Missing, malformed, expired or revoked token (401)."""

    def __init__(self, message: str, code: str = "INVALID_TOKEN") -> None:
        self.code = code
        super().__init__(message)


def signing_key(data_dir: Path) -> bytes:
    path = data_dir.resolve() / "jwt.key"
    with _key_lock:
        if path in _keys:
            return _keys[path]
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
        else:
            key = secrets.token_bytes(32)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
                fh.flush()
                os.fsync(fh.fileno())
        if len(key) < 32:
            raise RuntimeError(f"{path} holds a key shorter than 32 bytes")
        _keys[path] = key
        return key


@dataclass(frozen=True)
class Claims:
    user_id: int
    username: str
    role: str
    institution: str
    permissions: tuple[str, ...]
    jti: str
    expires_at: int


def _encode(payload: dict[str, Any], key: bytes) -> str:
    return jwt.encode(payload, key, algorithm=ALGORITHM)


def issue(user: UserInfo, key: bytes) -> dict[str, Any]:
    """A new access/refresh pair for ``user`` (the login and refresh response data)."""
    now = int(time.time())
    access = {
        "iss": ISSUER,
        "sub": str(user.id),
        "typ": "access",
        "username": user.username,
        "role": user.role,
        "institution": user.institution,
        "permissions": list(user.permissions),
        "iat": now,
        "exp": now + ACCESS_SECONDS,
        "jti": secrets.token_hex(16),
    }
    refresh_jti = secrets.token_hex(16)
    refresh = {
        "iss": ISSUER,
        "sub": str(user.id),
        "typ": "refresh",
        "iat": now,
        "exp": now + REFRESH_SECONDS,
        "jti": refresh_jti,
    }
    with session(), write_transaction():
        RefreshToken.create(jti=refresh_jti, user=user.id, expires_at=now + REFRESH_SECONDS)
    return {
        "access_token": _encode(access, key),
        "refresh_token": _encode(refresh, key),
        "token_type": "Bearer",
        "expires_in": ACCESS_SECONDS,
        "user_info": user.as_json(),
    }


def _decode(token: str, key: bytes, kind: str) -> dict[str, Any]:
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "jti", "typ"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("the token has expired", "TOKEN_EXPIRED") from None
    except jwt.InvalidTokenError as exc:
        raise TokenError(f"invalid token: {exc}") from None
    if payload.get("typ") != kind:
        raise TokenError(f"a {kind} token is needed here")
    return payload


def verify_access(token: str, key: bytes) -> Claims:
    payload = _decode(token, key, "access")
    with session():
        if RevokedToken.get_or_none(RevokedToken.jti == payload["jti"]) is not None:
            raise TokenError("the token was revoked (logged out)", "TOKEN_REVOKED")
    return Claims(
        int(payload["sub"]),
        str(payload.get("username", "")),
        str(payload.get("role", "")),
        str(payload.get("institution", "")),
        tuple(payload.get("permissions", ())),
        str(payload["jti"]),
        int(payload["exp"]),
    )


def refresh(token: str, key: bytes) -> dict[str, Any]:
    """Exchange a refresh token for a new pair (the old one is spent)."""
    payload = _decode(token, key, "refresh")
    now = int(time.time())
    with session():
        with write_transaction():
            row = RefreshToken.get_or_none(RefreshToken.jti == payload["jti"])
            if row is None:
                raise TokenError("unknown refresh token")
            if row.revoked_at is not None:
                replayed = True
            else:
                replayed = False
                row.revoked_at = now
                row.save()
        if replayed:
            revoke_all_refresh(int(payload["sub"]))
            raise TokenError("the refresh token was already used or revoked", "TOKEN_REVOKED")
    user = get(int(payload["sub"]))
    if user is None or not user.active:
        raise TokenError("the account no longer exists or is disabled", "ACCOUNT_DISABLED")
    return issue(user, key)


def logout(claims: Claims, refresh_token: str | None, key: bytes) -> None:
    """Revoke the access token presented, and the refresh token if given."""
    now = int(time.time())
    with session(), write_transaction():
        RevokedToken.insert(
            jti=claims.jti, expires_at=claims.expires_at
        ).on_conflict_ignore().execute()
        RevokedToken.delete().where(RevokedToken.expires_at < now).execute()
    if refresh_token:
        try:
            payload = _decode(refresh_token, key, "refresh")
        except TokenError:
            return
        if int(payload["sub"]) != claims.user_id:
            return
        with session(), write_transaction():
            RefreshToken.update(revoked_at=now).where(
                (RefreshToken.jti == payload["jti"]) & RefreshToken.revoked_at.is_null(True)
            ).execute()


def revoke_all_refresh(user_id: int) -> None:
    now = int(time.time())
    with session(), write_transaction():
        RefreshToken.update(revoked_at=now).where(
            (RefreshToken.user == user_id) & RefreshToken.revoked_at.is_null(True)
        ).execute()
