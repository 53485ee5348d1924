"""``/health`` and ``/ready`` for load balancers and orchestrators (no authentication, no patient
data).

* ``/health`` (liveness): this process answers HTTP. 200 always; a failing liveness probe
  means "restart me".
* ``/ready`` (readiness): this node can take work now: the catalog answers a query and the
  storage accepts a durable write. 200 with each check's time, or 503 naming what failed, so
  a load balancer sends requests elsewhere until it recovers. It also reports the AI queue
  depth (queued and running analyses), which is information, not a condition.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.ai import jobs
from server.archive import Archive
from server.catalog.db import database, session


def _timed(check: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:  # any failure makes the node not ready; the reason is reported
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


def readiness(archive: Archive) -> tuple[bool, dict[str, Any]]:
    def catalog() -> None:
        with session():
            database.execute_sql("SELECT 1").fetchone()

    checks = {"catalog": _timed(catalog), "storage": _timed(archive.storage.probe)}
    ready = all(c["ok"] for c in checks.values())
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": checks}
    if checks["catalog"]["ok"]:
        body["ai_queue_depth"] = jobs.queue_depth()
    return ready, body


def health_routes(archive: Archive) -> list[BaseRoute]:
    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def ready(request: Request) -> Response:
        ok, body = await run_in_threadpool(readiness, archive)
        return Response(
            orjson.dumps(body),
            status_code=200 if ok else 503,
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    return [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"])]
