"""User accounts: created and managed with ``python -m server user ...``.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106); a hash made with weaker
parameters is upgraded at the next successful login.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from server.auth.roles import ROLES, permissions_of
from server.catalog.db import session, write_transaction
from server.catalog.schema import User

_hasher = PasswordHasher()
MIN_PASSWORD = 10
# Verified against when the user does not exist, so a miss costs as much as a wrong password.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


class UserError(ValueError):
    """Refused account change (unknown role, duplicate username, weak password...)."""


@dataclass(frozen=True)
class UserInfo:
    id: int
    username: str
    institution: str
    role: str
    active: bool

    @property
    def public_id(self) -> str:
        return f"user_{self.id}"

    @property
    def permissions(self) -> tuple[str, ...]:
        return permissions_of(self.role)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.public_id,
            "username": self.username,
            "role": self.role,
            "institution": self.institution,
            "permissions": list(self.permissions),
        }


def _info(row: Any) -> UserInfo:
    return UserInfo(row.id, row.username, row.institution, row.role, bool(row.active))


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")


def create(username: str, institution: str, role: str, password: str) -> UserInfo:
    username, institution = username.strip(), institution.strip()
    if not username or not institution:
        raise UserError("a user needs a username and an institution")
    _check_role(role)
    _check_password(password)
    with session(), write_transaction():
        if User.get_or_none((User.username == username) & (User.institution == institution)):
            raise UserError(f"user {username!r} already exists in {institution!r}")
        row = User.create(
            username=username,
            institution=institution,
            password_hash=_hasher.hash(password),
            role=role,
            created_at=int(time.time()),
        )
    return _info(row)


def list_users(institution: str | None = None) -> list[UserInfo]:
    with session():
        select = User.select().order_by(User.institution, User.username)
        if institution:
            select = select.where(User.institution == institution)
        return [_info(r) for r in select]


def _find(username: str, institution: str) -> Any:
    row = User.get_or_none((User.username == username) & (User.institution == institution))
    if row is None:
        raise UserError(f"no user {username!r} in {institution!r}")
    return row


def update(
    username: str,
    institution: str,
    *,
    role: str | None = None,
    password: str | None = None,
    active: bool | None = None,
) -> UserInfo:
    with session(), write_transaction():
        row = _find(username, institution)
        if role is not None:
            _check_role(role)
            row.role = role
        if password is not None:
            _check_password(password)
            row.password_hash = _hasher.hash(password)
        if active is not None:
            row.active = int(active)
        row.save()
    if active is False or password is not None:
        from server.auth import tokens

        tokens.revoke_all_refresh(row.id)  # a disabled user or new password ends sessions
    return _info(row)


def get(user_id: int) -> UserInfo | None:
    with session():
        row = User.get_or_none(User.id == user_id)
    return _info(row) if row is not None else None


def authenticate(username: str, institution: str, password: str) -> UserInfo | None:
    """The active user with this password, or None (same cost whether or not the user exists)."""
    with session():
        row = User.get_or_none((User.username == username) & (User.institution == institution))
        stored = row.password_hash if row is not None else _DUMMY_HASH
        try:
            _hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None or not row.active:
            return None
        with write_transaction():
            if _hasher.check_needs_rehash(stored):
                row.password_hash = _hasher.hash(password)
            row.last_login = int(time.time())
            row.save()
    return _info(row)
