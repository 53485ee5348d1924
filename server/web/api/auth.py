"""Authentication endpoints (``/api/v1/auth/...``) and the checks every other endpoint makes.

``POST /auth/login`` answers the documented token pair with ``user_info``; ``/auth/refresh``
exchanges a refresh token (single use) for a new pair; ``/auth/logout`` revokes the access token
presented and the refresh token given; ``GET /auth/me`` returns ``user_info``.  Failed logins
are rate-limited per username and per address (429 with ``Retry-After``).

:func:`authorize` is what endpoints call: a Bearer token with the permission they need, or,
for requests from this machine when ``[http] auth_off_for_loopback`` is on, a local operator
with every permission.  A request relayed by a proxy (``Forwarded``/``X-Forwarded-*``) never
counts as local.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.archive import Archive
from server.auth import ratelimit, tokens, users
from server.auth.roles import ROLES
from server.auth.tokens import Claims, TokenError
from server.web.api.envelope import ApiError, json_body, ok

API_PREFIX = "/api/v1"
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


def _is_local(connection: HTTPConnection) -> bool:
    if any(h in connection.headers for h in _PROXY_HEADERS):
        return False
    host = connection.client.host if connection.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_operator() -> Claims:
    return Claims(0, "local", "admin", "", ROLES["admin"], "local", 0)


def tenant_of(claims: Claims | None) -> str | None:
    """The institution a request is confined to; None for the local operator (everything)."""
    if claims is None or claims.user_id == 0:
        return None
    return claims.institution


def request_tenant(connection: HTTPConnection) -> str | None:
    return tenant_of(getattr(connection.state, "claims", None))


def bearer_token(connection: HTTPConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return connection.query_params.get("token")  # the WebSocket's ?token= form


def authorize(connection: HTTPConnection, archive: Archive, permission: str | None) -> Claims:
    """The caller's claims, having checked they hold ``permission``; raises 401/403 otherwise.
    Runs in a worker thread (the revocation check reads the catalog)."""
    token = bearer_token(connection)
    if token is None:
        if archive.settings.auth_off_for_loopback and _is_local(connection):
            return local_operator()
        raise ApiError(
            401,
            "AUTHENTICATION_REQUIRED",
            "this endpoint needs a Bearer token (POST /api/v1/auth/login)",
            headers={"WWW-Authenticate": 'Bearer realm="imaging-server"'},
        )
    try:
        claims = tokens.verify_access(token, tokens.signing_key(archive.storage.root))
    except TokenError as exc:
        raise ApiError(
            401,
            exc.code,
            str(exc),
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    if permission is not None and permission not in claims.permissions:
        raise ApiError(
            403,
            "PERMISSION_DENIED",
            f"the {claims.role} role does not grant {permission}",
            {"required_permission": permission},
        )
    return claims


async def _json_body(request: Request) -> dict[str, Any]:
    body = await json_body(request)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ApiError(422, "VALIDATION_ERROR", "the body must be a JSON object")
    return body


def _strings(body: dict[str, Any], *names: str) -> list[str]:
    bad = {n: "is required (a string)" for n in names if not isinstance(body.get(n), str)}
    bad.update({n: "is required" for n in names if n not in bad and not body[n].strip()})
    if bad:
        raise ApiError(422, "VALIDATION_ERROR", "the request has invalid fields", {"fields": bad})
    return [str(body[n]) for n in names]


def auth_routes(archive: Archive) -> list[BaseRoute]:
    def key_of() -> bytes:
        return tokens.signing_key(archive.storage.root)  # created at first use

    audit = archive.audit

    def address(request: Request) -> str:
        return request.client.host if request.client else "?"

    def login_sync(request: Request, body: dict[str, Any]) -> Response:
        username, password, institution = _strings(body, "username", "password", "institution")
        wait = ratelimit.retry_after(username, address(request))
        if wait > 0:
            audit.record("auth.login", username, "rate_limited", address=address(request))
            raise ApiError(
                429,
                "TOO_MANY_LOGIN_ATTEMPTS",
                f"too many failed logins; try again in {wait} s",
                {"retry_after_seconds": wait},
                headers={"Retry-After": str(wait)},
            )
        user = users.authenticate(username, institution, password)
        if user is None:
            ratelimit.record_failure(username, address(request))
            audit.record(
                "auth.login", username, "denied", address=address(request), institution=institution
            )
            raise ApiError(401, "INVALID_CREDENTIALS", "wrong username, password or institution")
        ratelimit.clear(username)
        audit.record(
            "auth.login", user.public_id, address=address(request), institution=institution
        )
        return ok(tokens.issue(user, key_of()), "Login successful")

    def refresh_sync(request: Request, body: dict[str, Any]) -> Response:
        (token,) = _strings(body, "refresh_token")
        try:
            pair = tokens.refresh(token, key_of())
        except TokenError as exc:
            raise ApiError(401, exc.code, str(exc)) from None
        return ok(pair, "Token refreshed")

    def logout_sync(request: Request, body: dict[str, Any]) -> Response:
        claims = authorize(request, archive, None)
        if claims.user_id == 0:
            raise ApiError(400, "NOT_LOGGED_IN", "a local request without a token has no session")
        refresh = body.get("refresh_token")
        tokens.logout(claims, refresh if isinstance(refresh, str) else None, key_of())
        audit.record("auth.logout", f"user_{claims.user_id}", address=address(request))
        return ok({"logged_out": True}, "Logged out")

    def me_sync(request: Request) -> Response:
        claims = authorize(request, archive, None)
        return ok(
            {
                "id": f"user_{claims.user_id}",
                "username": claims.username,
                "role": claims.role,
                "institution": claims.institution,
                "permissions": list(claims.permissions),
            }
        )

    def with_body(
        fn: Callable[[Request, dict[str, Any]], Response],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            body = await _json_body(request)
            return await run_in_threadpool(fn, request, body)

        return endpoint

    async def me(request: Request) -> Response:
        return await run_in_threadpool(me_sync, request)

    return [
        Route(f"{API_PREFIX}/auth/login", with_body(login_sync), methods=["POST"]),
        Route(f"{API_PREFIX}/auth/refresh", with_body(refresh_sync), methods=["POST"]),
        Route(f"{API_PREFIX}/auth/logout", with_body(logout_sync), methods=["POST"]),
        Route(f"{API_PREFIX}/auth/me", me, methods=["GET"]),
    ]
