"""The WebSocket API (workstation-api.md, "WebSocket API"): ``ws://host/ws/v1?token=...``.

Connecting
    The access token comes as ``?token=`` (browsers cannot set headers on a WebSocket) or an
    ``Authorization: Bearer`` header, and is checked before anything else (the local operator
    needs none, as for the REST API).  A missing, invalid, expired or revoked token gets one
    ``error`` message and the close code 4401 with the error code in the reason; the socket is
    also closed with 4401 (``TOKEN_EXPIRED``) when the token expires while connected.

Client messages (JSON text)
    ``{"action": "subscribe", "events": [...]}``, ``{"action": "unsubscribe", "events": [...]}``
    and ``{"action": "ping"}``, answered with ``subscribed`` / ``unsubscribed`` (``data.events``
    those named, ``data.subscriptions`` all current) and ``pong``.  Anything else (bad JSON, an
    unknown action or event name) is answered with ``{"event": "error", "data": {"code",
    "message", "details"}}`` and the connection stays open; a subscribe naming an unknown event
    changes nothing.

Events
    ``ai_analysis_progress``, ``image_uploads``, ``system_alerts`` and ``worklist_updates``
    (the singular forms are accepted too).  Messages are ``{"event", "timestamp", "data"}``; the
    ``event`` is the subscription's name except for system alerts, which are ``system_alert`` as
    the document's example shows.  Worklist messages carry ``data.change`` (``created``,
    ``updated``, ``status_changed``, ``deleted``, ``study_linked``).  A user gets the events of
    their institution, and system alerts; the local operator gets everything.

Delivery
    Events come from this process's bus and, through :class:`server.events.Relay`, from the
    other worker processes.  Each socket has a bounded queue (256 messages); a client that
    falls that far behind is disconnected with 1013 rather than slowing anyone else down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from server import events
from server.archive import Archive
from server.auth.roles import READ_IMAGES
from server.auth.tokens import Claims
from server.monitor import SystemMonitor
from server.web.api.auth import authorize, tenant_of
from server.web.api.envelope import ApiError

log = logging.getLogger(__name__)

PATH = "/ws/v1"
CHANNELS = ("ai_analysis_progress", "image_uploads", "system_alerts", "worklist_updates")
_ALIASES = {
    **{c: c for c in CHANNELS},
    "ai_analysis": "ai_analysis_progress",
    "image_upload": "image_uploads",
    "system_alert": "system_alerts",
    "worklist_update": "worklist_updates",
}
_MESSAGE_NAME = {"system_alerts": "system_alert"}  # the document's example message
_BROADCAST = frozenset({"system_alerts"})  # not tenant data: every subscriber gets them
_PERMISSION = {c: READ_IMAGES for c in CHANNELS if c not in _BROADCAST}
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 1013  # Try Again Later
MAX_MESSAGE = 64 * 1024
CLOSE_WAIT = 30.0  # seconds a close frame may wait behind unread data before we give up


def channel_of(kind: str) -> str | None:
    """The subscription a bus event kind belongs to (None: not sent over the WebSocket)."""
    if kind.startswith("worklist."):
        return "worklist_updates"
    if kind.startswith("image_upload"):
        return "image_uploads"
    if kind.startswith("ai_analysis"):
        return "ai_analysis_progress"
    if kind == "system_alert":
        return "system_alerts"
    return None


def _timestamp(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def message(event: str, data: Any, seconds: float | None = None) -> str:
    body = {"event": event, "timestamp": _timestamp(seconds), "data": data}
    return orjson.dumps(body, default=str).decode()


def render(channel: str, event: events.Event) -> str:
    data = dict(event.data)
    if "." in event.kind:
        data.setdefault("change", event.kind.split(".", 1)[1])
    return message(_MESSAGE_NAME.get(channel, channel), data, event.time)


def _error(code: str, text: str, **details: Any) -> str:
    return message("error", {"code": code, "message": text, "details": details})


@dataclass(eq=False)
class Client:
    """One connected socket: what it subscribed to, and its outgoing queue."""

    claims: Claims
    loop: asyncio.AbstractEventLoop
    queue_size: int = 256
    channels: frozenset[str] = frozenset()
    queue: asyncio.Queue[str] = field(init=False)
    kicked: asyncio.Event = field(init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)
        self.kicked = asyncio.Event()

    @property
    def tenant(self) -> str | None:
        return tenant_of(self.claims)

    def wants(self, channel: str, institution: str | None) -> bool:
        if channel not in self.channels:
            return False
        return channel in _BROADCAST or self.tenant is None or institution == self.tenant

    def offer(self, text: str) -> None:
        """Queue a message (on the client's loop); a full queue disconnects the client."""
        if self.kicked.is_set():
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.kicked.set()

    async def pump(self, websocket: WebSocket) -> None:
        while True:
            await websocket.send_text(await self.queue.get())


class Hub:
    """The sockets of this process and what feeds them: the bus, the relay of the other
    processes' events and the system monitor, all started with the first socket."""

    def __init__(
        self,
        monitor: Callable[[], SystemMonitor | None],
        relay_interval: float = events.POLL_INTERVAL,
    ) -> None:
        self._make_monitor = monitor
        self._lock = threading.Lock()
        self._clients: set[Client] = set()
        self._relay = events.Relay(self.dispatch, relay_interval)
        self._unsubscribe: Callable[[], None] | None = None
        self._monitor: SystemMonitor | None = None

    def attach(self, client: Client) -> None:
        """Register a socket (blocking: the first one reads the catalog)."""
        with self._lock:
            self._clients.add(client)
            if self._unsubscribe is None:
                self._unsubscribe = events.subscribe(self.dispatch)
                self._monitor = self._make_monitor()
                if self._monitor is not None:
                    self._monitor.start()
            self._relay.activate()

    def detach(self, client: Client) -> None:
        with self._lock:
            self._clients.discard(client)
            if not self._clients:
                self._relay.deactivate()

    def dispatch(self, event: events.Event) -> None:
        """Hand ``event`` to the sockets that want it (any thread; never blocks)."""
        channel = channel_of(event.kind)
        if channel is None:
            return
        with self._lock:
            targets = [c for c in self._clients if c.wants(channel, event.institution)]
        if not targets:
            return
        text = render(channel, event)
        for client in targets:
            with contextlib.suppress(RuntimeError):  # its loop has closed
                client.loop.call_soon_threadsafe(client.offer, text)


def _parse(client: Client, raw: str) -> tuple[str, list[str]] | str:
    """The action and event names of a client message, or the error message to answer."""
    if len(raw) > MAX_MESSAGE:
        return _error("MESSAGE_TOO_LARGE", f"messages are limited to {MAX_MESSAGE} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error("INVALID_JSON", "the message is not valid JSON")
    if not isinstance(body, dict):
        return _error("INVALID_MESSAGE", "the message must be a JSON object with an action")
    action = body.get("action")
    if action == "ping":
        return "ping", []
    if action not in ("subscribe", "unsubscribe"):
        return _error(
            "UNKNOWN_ACTION",
            f"unknown action {action!r}",
            actions=["subscribe", "unsubscribe", "ping"],
        )
    names = body.get("events")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return _error("INVALID_MESSAGE", "events must be a non-empty list of event names")
    unknown = [n for n in names if n not in _ALIASES]
    if unknown:
        return _error(
            "UNKNOWN_EVENT",
            f"unknown event {unknown[0]!r}",
            unknown=unknown,
            available=list(CHANNELS),
        )
    channels = list(dict.fromkeys(_ALIASES[n] for n in names))
    if action == "subscribe":
        granted = client.claims.permissions
        denied = [c for c in channels if c in _PERMISSION and _PERMISSION[c] not in granted]
        if denied:
            return _error(
                "PERMISSION_DENIED",
                f"the {client.claims.role} role does not grant {_PERMISSION[denied[0]]}",
                events=denied,
            )
    return str(action), channels


def websocket_routes(
    archive: Archive,
    monitor: Callable[[], SystemMonitor | None] | None = None,
    queue_size: int = 256,
) -> list[BaseRoute]:
    """The ``/ws/v1`` route; ``monitor`` makes the system monitor started with the first
    socket (default: thresholds 85/95 %, every 15 s, on the data directory)."""

    def default_monitor() -> SystemMonitor:
        return SystemMonitor(archive.storage.root)

    hub = Hub(monitor or default_monitor)

    async def refuse(websocket: WebSocket, error: ApiError) -> None:
        await websocket.accept()
        await websocket.send_text(_error(error.code, error.message))
        reason = f"{error.code}: {error.message}".encode()[:123].decode(errors="ignore")
        await websocket.close(CLOSE_UNAUTHORIZED, reason)

    async def receive(websocket: WebSocket, client: Client) -> None:
        while True:
            incoming = await websocket.receive()
            if incoming["type"] == "websocket.disconnect":
                return
            raw = incoming.get("text")
            if raw is None:
                client.offer(_error("INVALID_MESSAGE", "send JSON text messages, not binary"))
                continue
            parsed = _parse(client, raw)
            if isinstance(parsed, str):
                client.offer(parsed)
                continue
            action, channels = parsed
            if action == "ping":
                client.offer(message("pong", {}))
                continue
            if action == "subscribe":
                client.channels = client.channels | set(channels)
            else:
                client.channels = client.channels - set(channels)
            current = [c for c in CHANNELS if c in client.channels]
            client.offer(message(f"{action}d", {"events": channels, "subscriptions": current}))

    async def endpoint(websocket: WebSocket) -> None:
        address = websocket.client.host if websocket.client else "?"
        try:
            claims = await run_in_threadpool(authorize, websocket, archive, None)
        except ApiError as error:
            archive.audit.record("ws.connect", "?", "denied", address=address, reason=error.code)
            await refuse(websocket, error)
            return
        actor = f"user_{claims.user_id}" if claims.user_id else "local"
        archive.audit.record(
            "ws.connect", actor, address=address, institution=tenant_of(claims) or "*"
        )
        client = Client(claims, asyncio.get_running_loop(), queue_size)
        tasks: list[asyncio.Task[Any]] = []
        try:
            await run_in_threadpool(hub.attach, client)  # before accepting: nothing is missed
            await websocket.accept()
            sender = asyncio.create_task(client.pump(websocket))
            receiver = asyncio.create_task(receive(websocket, client))
            kicked = asyncio.create_task(client.kicked.wait())
            tasks = [sender, receiver, kicked]
            if claims.user_id:  # the local operator's "token" never expires
                tasks.append(asyncio.create_task(asyncio.sleep(claims.expires_at - time.time())))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            if receiver in done or sender in done:
                return  # the client left (or the connection broke)
            if kicked in done:
                code, reason = CLOSE_TOO_SLOW, "too slow: messages were waiting unread"
            else:
                code, reason = CLOSE_UNAUTHORIZED, "TOKEN_EXPIRED: the token has expired"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.close(code, reason), CLOSE_WAIT)
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            hub.detach(client)

    return [WebSocketRoute(PATH, endpoint)]
