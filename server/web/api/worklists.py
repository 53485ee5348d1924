"""The worklist REST API, ``/v1/worklists`` (shared/spec/worklist-api.md).

Every request carries ``X-API-KEY``; the key's institution scopes everything, and another
institution's item is answered 404 exactly like a missing one, so ids reveal nothing.  Bodies
and errors are JSON: ``{"data": ...}`` on success, ``{"error": {"code", "message"[, "fields"]}}``
otherwise, 422 naming each bad field.  Lists are paged 20 at a time: ``?page=N`` (from 1), with
``meta.total``/``meta.total_pages`` and ``links.next`` (null on the last page).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server import apikeys
from server.archive import Archive
from server.web.http import client_address
from server.worklist import service
from server.worklist.service import PAGE_SIZE, NotFound, ValidationError

PREFIX = "/v1/worklists"


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error(status: int, code: str, message: str, **extra: Any) -> Response:
    return _json({"error": {"code": code, "message": message, **extra}}, status)


def _validation(exc: ValidationError) -> Response:
    return _error(422, "VALIDATION_ERROR", "the request has invalid fields", fields=exc.fields)


class WorklistApi:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def _key(self, request: Request) -> apikeys.KeyInfo | None:
        return apikeys.institution_for(request.headers.get("x-api-key"))

    def _audit(self, request: Request, key: apikeys.KeyInfo, action: str, **details: Any) -> None:
        self.archive.audit.record(
            action,
            f"apikey:{key.prefix}",
            address=client_address(request),
            institution=key.institution,
            **details,
        )

    def _run(self, request: Request, action: Callable[[apikeys.KeyInfo], Response]) -> Response:
        key = self._key(request)
        if key is None:
            self.archive.audit.record(
                "worklist.auth", client_address(request), "denied", path=request.url.path
            )
            return _error(401, "UNAUTHORIZED", "missing, unknown or revoked X-API-KEY")
        try:
            return action(key)
        except ValidationError as exc:
            return _validation(exc)
        except NotFound as exc:
            return _error(404, "NOT_FOUND", str(exc))

    @staticmethod
    def _item_id(request: Request) -> int:
        return int(request.path_params["item_id"])

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise ValidationError({"body": "is not valid JSON"}) from None

    # --- endpoints ---------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        def action(key: apikeys.KeyInfo) -> Response:
            params = dict(request.query_params)
            raw_page = params.pop("page", "1")
            if not raw_page.isdigit() or int(raw_page) < 1:
                raise ValidationError({"page": "must be a whole number from 1"})
            page = service.search(key.institution, params, int(raw_page))
            self._audit(request, key, "worklist.list", filters=params, results=len(page.items))
            base = f"{request.url.scheme}://{request.url.netloc}{PREFIX}"

            def link(number: int) -> str | None:
                if number < 1 or number > page.pages or (number > 1 and not page.total):
                    return None
                return f"{base}?{urlencode({**params, 'page': number})}"

            return _json(
                {
                    "data": page.items,
                    "meta": {
                        "page": page.page,
                        "per_page": PAGE_SIZE,
                        "total": page.total,
                        "total_pages": page.pages,
                    },
                    "links": {"next": link(page.page + 1), "prev": link(page.page - 1)},
                }
            )

        return self._run(request, action)

    def get(self, request: Request) -> Response:
        def action(key: apikeys.KeyInfo) -> Response:
            item = service.get(key.institution, self._item_id(request))
            self._audit(request, key, "worklist.get", id=item["id"])
            return _json({"data": item})

        return self._run(request, action)

    def create(self, request: Request, body: Any) -> Response:
        def action(key: apikeys.KeyInfo) -> Response:
            item = service.create(key.institution, body)
            self._audit(request, key, "worklist.create", id=item["id"])
            return _json({"data": item}, 201)

        return self._run(request, action)

    def update(self, request: Request, body: Any) -> Response:
        def action(key: apikeys.KeyInfo) -> Response:
            item = service.update(key.institution, self._item_id(request), body)
            self._audit(request, key, "worklist.update", id=item["id"], fields=sorted(body))
            return _json({"data": item})

        return self._run(request, action)

    def delete(self, request: Request) -> Response:
        def action(key: apikeys.KeyInfo) -> Response:
            item_id = self._item_id(request)
            service.delete(key.institution, item_id)
            self._audit(request, key, "worklist.delete", id=item_id)
            return Response(status_code=204)

        return self._run(request, action)

    def routes(self) -> list[BaseRoute]:
        async def collection(request: Request) -> Response:
            if request.method == "POST":
                try:
                    body = await self._body(request)
                except ValidationError as exc:
                    if self._key(request) is None:
                        return _error(401, "UNAUTHORIZED", "missing, unknown or revoked X-API-KEY")
                    return _validation(exc)
                return await run_in_threadpool(self.create, request, body)
            return await run_in_threadpool(self.index, request)

        async def member(request: Request) -> Response:
            if request.method == "PUT":
                try:
                    body = await self._body(request)
                except ValidationError as exc:
                    if self._key(request) is None:
                        return _error(401, "UNAUTHORIZED", "missing, unknown or revoked X-API-KEY")
                    return _validation(exc)
                return await run_in_threadpool(self.update, request, body)
            if request.method == "DELETE":
                return await run_in_threadpool(self.delete, request)
            return await run_in_threadpool(self.get, request)

        return [
            Route(PREFIX, collection, methods=["GET", "POST"]),
            Route(PREFIX + "/{item_id:int}", member, methods=["GET", "PUT", "DELETE"]),
        ]


def worklist_routes(archive: Archive) -> list[BaseRoute]:
    return WorklistApi(archive).routes()
