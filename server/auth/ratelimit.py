"""Login rate limiting: failures are counted in the catalog per username and per address over a
window, so every worker process and node sees the same count."""

from __future__ import annotations

import time

from server.catalog.db import session, write_transaction
from server.catalog.schema import LoginFailure

WINDOW_SECONDS = 300
MAX_PER_USERNAME = 5
MAX_PER_ADDRESS = 20


def retry_after(username: str, address: str) -> int:
    """Seconds to wait before another attempt is allowed; 0 when one is allowed now."""
    since = int(time.time()) - WINDOW_SECONDS
    with session():
        by_user = list(
            LoginFailure.select(LoginFailure.at)
            .where((LoginFailure.username == username) & (LoginFailure.at > since))
            .order_by(LoginFailure.at)
        )
        by_address = list(
            LoginFailure.select(LoginFailure.at)
            .where((LoginFailure.address == address) & (LoginFailure.at > since))
            .order_by(LoginFailure.at)
        )
    waits = []
    for rows, limit in ((by_user, MAX_PER_USERNAME), (by_address, MAX_PER_ADDRESS)):
        if len(rows) >= limit:
            waits.append(rows[len(rows) - limit].at + WINDOW_SECONDS - int(time.time()))
    return int(max([0, *waits]))


def record_failure(username: str, address: str) -> None:
    now = int(time.time())
    with session(), write_transaction():
        LoginFailure.create(username=username, address=address, at=now)
        LoginFailure.delete().where(LoginFailure.at < now - WINDOW_SECONDS).execute()


def clear(username: str) -> None:
    with session(), write_transaction():
        LoginFailure.delete().where(LoginFailure.username == username).execute()
