"""The WebSocket API (``/ws/v1``, workstation-api.md) against a running server with two worker
processes: authentication, the subscribe protocol and its errors, tenant isolation, and events
reaching sockets held by another process than the one that published them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.helpers import (
    ROOT,
    ServerProcess,
    api_key,
    catalog,
    user_token,
    write_config,
)

WORKERS = 2
ITEM = {
    "patient_id": "PWS1",
    "surname": "GONZALEZ",
    "forename": "JUAN",
    "modality": "CT",
    "exam_date_and_time": "2025-07-23 09:00:00",
    "scheduled_aet": "CT_SCANNER_1",
}


@dataclass
class Served:
    server: ServerProcess

    @property
    def ws_url(self) -> str:
        return self.server.base_url.replace("http://", "ws://") + "/ws/v1"

    def token(self, institution: str, role: str = "viewer") -> str:
        """A new user's access token."""
        return user_token(self.server, f"{role}-{uuid.uuid4().hex[:6]}", institution, role)

    def api_key(self, institution: str) -> str:
        return api_key(self.server, institution)

    def connect(self, token: str | None = None, **headers: str) -> ClientConnection:
        url = self.ws_url if token is None else f"{self.ws_url}?token={token}"
        return connect(url, additional_headers=headers, proxy=None, open_timeout=30)

    @contextmanager
    def subscribed(self, token: str, *events: str) -> Iterator[ClientConnection]:
        with self.connect(token) as ws:
            ws.send(orjson.dumps({"action": "subscribe", "events": list(events)}).decode())
            ack = receive(ws)
            assert ack["event"] == "subscribed", ack
            yield ws

    @contextmanager
    def publisher(self) -> Iterator[Callable[..., None]]:
        """A separate process that publishes on request, as the AI worker or an ``import``
        would: ``publish(kind, data, institution, count=1, padding=0)`` returns once the
        events are recorded; with ``count`` > 1 they are numbered by ``data["seq"]`` and
        carry ``padding`` random characters."""
        cmd = [sys.executable, "-c", _PUBLISHER, str(self.server.data_dir)]
        cmd += [self.server.database_url, str(self.server.config_dir)]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert proc.stdin is not None and proc.stdout is not None

        def publish(
            kind: str,
            data: dict[str, Any],
            institution: str | None,
            count: int = 1,
            padding: int = 0,
        ) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            request = [kind, data, institution, count, padding]
            proc.stdin.write(orjson.dumps(request).decode() + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "published"

        try:
            yield publish
        finally:
            proc.stdin.close()
            proc.wait(30)

    def publish_elsewhere(self, kind: str, data: dict[str, Any], institution: str | None) -> None:
        with self.publisher() as publish:
            publish(kind, data, institution)


_PUBLISHER = """
import secrets, sys, orjson
from server.archive import open_archive
from server.config import load_settings
from server import events
overrides = {"data_dir": sys.argv[1], "database_url": sys.argv[2] or None}
open_archive(load_settings(sys.argv[3], overrides))
for line in sys.stdin:
    kind, data, institution, count, padding = orjson.loads(line)
    for seq in range(count):
        extra = {"seq": seq, "padding": secrets.token_hex(padding // 2)} if count > 1 else {}
        events.publish(events.Event(kind, {**data, **extra}, institution))
    print("published", flush=True)
"""


def receive(ws: ClientConnection, timeout: float = 15) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(ws.recv(timeout=timeout))
    return message


def receive_until(
    ws: ClientConnection, match: Callable[[dict[str, Any]], bool], timeout: float = 15
) -> dict[str, Any]:
    """The first message that matches (others are skipped), within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        message = receive(ws, max(0.01, deadline - time.monotonic()))
        if match(message):
            return message


def nothing_matching(
    ws: ClientConnection, match: Callable[[dict[str, Any]], bool], within: float
) -> bool:
    """True when no message matching arrives within ``within`` seconds."""
    try:
        receive_until(ws, match, within)
    except TimeoutError:
        return True
    return False


def closed_with(ws: ClientConnection) -> tuple[int | None, str | None, list[dict[str, Any]]]:
    """Read until the server closes: (close code, reason, messages received before)."""
    messages = []
    with ws:
        try:
            while True:
                messages.append(receive(ws))
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else None), messages


def _worker_of(server: ServerProcess, ws: ClientConnection) -> int:
    """The pid of the worker process holding the server side of ``ws`` (Linux /proc)."""
    client_port = ws.socket.getsockname()[1]
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if local_port == server.http_port and remote_port == client_port:
            inode = fields[9]
    assert inode, "the server side of the connection is not in /proc/net/tcp"
    assert server.proc is not None
    for pid in _children(server.proc.pid):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if f"socket:[{inode}]" in links:
            return pid
    raise AssertionError(f"no worker of {server.proc.pid} holds socket {inode}")


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(f"ws-{request.param}")
    with ExitStack() as stack:
        url = stack.enter_context(catalog(request.param))
        config = write_config(
            tmp / "config",
            server=(
                f'[ae]\ntitle = "IMAGING"\nworkers = {WORKERS}\n'
                "[http]\nauth_off_for_loopback = false\n"
            ),
        )
        server = ServerProcess(tmp / "data", config, url).start()
        stack.callback(server.stop)
        yield Served(server)


def test_refused_without_a_token(served: Served) -> None:
    code, reason, messages = closed_with(served.connect())
    assert code == 4401
    assert reason is not None and reason.startswith("AUTHENTICATION_REQUIRED")
    assert [m["data"]["code"] for m in messages] == ["AUTHENTICATION_REQUIRED"]
    assert messages[0]["event"] == "error"


@pytest.mark.parametrize("kind", ["garbage", "forged", "expired", "refresh", "revoked"])
def test_refused_with_a_bad_token(served: Served, kind: str) -> None:
    good = served.token("HOSP-A")
    key = (served.server.data_dir / "jwt.key").read_bytes()
    claims = jwt.decode(good, key, algorithms=["HS256"], issuer="imaging-server")
    if kind == "garbage":
        token, expected = "not.a.token", "INVALID_TOKEN"
    elif kind == "forged":
        token, expected = jwt.encode(claims, b"x" * 32, algorithm="HS256"), "INVALID_TOKEN"
    elif kind == "expired":
        old = {**claims, "iat": claims["iat"] - 7200, "exp": claims["iat"] - 3600}
        token, expected = jwt.encode(old, key, algorithm="HS256"), "TOKEN_EXPIRED"
    elif kind == "refresh":
        token, expected = jwt.encode({**claims, "typ": "refresh"}, key), "INVALID_TOKEN"
    else:
        logout = httpx.post(
            f"{served.server.base_url}/api/v1/auth/logout",
            headers={"Authorization": f"Bearer {good}"},
            json={},
            timeout=30,
        )
        assert logout.status_code == 200
        token, expected = good, "TOKEN_REVOKED"
    code, reason, messages = closed_with(served.connect(token))
    assert code == 4401
    assert reason is not None and reason.startswith(expected), reason
    assert messages[0]["data"]["code"] == expected


def test_socket_is_closed_when_its_token_expires(served: Served) -> None:
    key = (served.server.data_dir / "jwt.key").read_bytes()
    claims = jwt.decode(served.token("HOSP-A"), key, algorithms=["HS256"], issuer="imaging-server")
    short = jwt.encode({**claims, "exp": int(time.time()) + 3}, key, algorithm="HS256")
    with served.subscribed(short, "system_alerts") as ws:
        code, reason, _ = closed_with(ws)
    assert code == 4401
    assert reason is not None and reason.startswith("TOKEN_EXPIRED")


def test_bearer_header_is_accepted(served: Served) -> None:
    token = served.token("HOSP-A")
    with served.connect(None, Authorization=f"Bearer {token}") as ws:
        ws.send('{"action": "ping"}')
        assert receive(ws)["event"] == "pong"


def test_subscribe_unsubscribe_and_ping(served: Served) -> None:
    token = served.token("HOSP-A")
    with served.connect(token) as ws:
        ws.send(
            orjson.dumps(
                {
                    "action": "subscribe",
                    "events": ["ai_analysis_progress", "image_uploads", "system_alerts"],
                }
            ).decode()
        )
        ack = receive(ws)
        assert ack["event"] == "subscribed"
        assert ack["timestamp"].endswith("Z") and "T" in ack["timestamp"]
        assert ack["data"]["events"] == ["ai_analysis_progress", "image_uploads", "system_alerts"]
        ws.send('{"action": "subscribe", "events": ["worklist_update"]}')  # singular alias
        assert receive(ws)["data"]["subscriptions"] == [
            "ai_analysis_progress",
            "image_uploads",
            "system_alerts",
            "worklist_updates",
        ]
        ws.send('{"action": "unsubscribe", "events": ["image_uploads"]}')
        gone = receive(ws)
        assert gone["event"] == "unsubscribed" and gone["data"]["events"] == ["image_uploads"]
        assert "image_uploads" not in gone["data"]["subscriptions"]
        ws.send('{"action": "ping"}')
        assert receive(ws)["event"] == "pong"


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        ("{not json", "INVALID_JSON"),
        ("[1, 2]", "INVALID_MESSAGE"),
        ('{"action": "dance"}', "UNKNOWN_ACTION"),
        ('{"events": ["image_uploads"]}', "UNKNOWN_ACTION"),
        ('{"action": "subscribe", "events": ["image_uploads", "cat_videos"]}', "UNKNOWN_EVENT"),
        ('{"action": "subscribe", "events": []}', "INVALID_MESSAGE"),
        ('{"action": "subscribe", "events": [5]}', "INVALID_MESSAGE"),
        ('{"action": "subscribe"}', "INVALID_MESSAGE"),
        (b"\x00binary", "INVALID_MESSAGE"),
        ("x" * 70000, "MESSAGE_TOO_LARGE"),
    ],
)
def test_protocol_errors_keep_the_connection_open(
    served: Served, sent: str | bytes, code: str
) -> None:
    with served.connect(served.token("HOSP-A")) as ws:
        ws.send(sent)
        error = receive(ws)
        assert error["event"] == "error"
        assert error["data"]["code"] == code and error["data"]["message"]
        ws.send('{"action": "ping"}')
        assert receive(ws)["event"] == "pong"
        if code == "UNKNOWN_EVENT":
            assert error["data"]["details"]["unknown"] == ["cat_videos"]
            ws.send('{"action": "subscribe", "events": ["system_alerts"]}')
            # The failed subscribe changed nothing.
            assert receive(ws)["data"]["subscriptions"] == ["system_alerts"]


def test_worklist_updates_reach_their_institution_across_processes(served: Served) -> None:
    """Sockets on both worker processes; one REST create reaches every socket of the item's
    institution (so also those on the process that did not handle the request), and none of
    another institution."""
    institution, stranger = f"HOSP-{uuid.uuid4().hex[:6]}", f"HOSP-{uuid.uuid4().hex[:6]}"
    key = served.api_key(institution)
    ours = served.token(institution)
    theirs = served.token(stranger)
    sockets: list[ClientConnection] = []
    with ExitStack() as stack:
        workers: set[int] = set()
        for _ in range(40):  # the kernel picks the worker that accepts each connection
            ws = stack.enter_context(served.subscribed(ours, "worklist_updates"))
            sockets.append(ws)
            workers.add(_worker_of(served.server, ws))
            if len(workers) == WORKERS and len(sockets) >= 4:
                break
        assert len(workers) == WORKERS, "every connection landed on one worker"
        other = stack.enter_context(served.subscribed(theirs, "worklist_updates"))
        with httpx.Client(base_url=served.server.base_url, timeout=30) as client:
            created = client.post("/v1/worklists", json=ITEM, headers={"X-API-KEY": key})
            assert created.status_code == 201, created.text
            item_id = created.json()["data"]["id"]

            def is_ours(m: dict[str, Any]) -> bool:
                return bool(m["event"] == "worklist_updates" and m["data"].get("id") == item_id)

            for ws in sockets:
                message = receive_until(ws, is_ours)
                assert message["data"]["change"] == "created"
                assert message["data"]["status"] == "SCHEDULED"
                assert message["timestamp"].endswith("Z")
            # A status change: "status_changed" and "updated", each once per socket.
            changed = client.put(
                f"/v1/worklists/{item_id}",
                json={"status": "IN_PROGRESS"},
                headers={"X-API-KEY": key},
            )
            assert changed.status_code == 200, changed.text
        for ws in sockets:
            changes: list[str] = []
            while len(changes) < 2:
                changes.append(receive_until(ws, is_ours)["data"]["change"])
            assert sorted(changes) == ["status_changed", "updated"]
        # Nothing for the other institution, and no duplicate on our sockets.
        assert nothing_matching(other, lambda m: m["event"] == "worklist_updates", 1.5)
        assert nothing_matching(sockets[0], is_ours, 0.5)


def test_events_published_by_another_process(served: Served) -> None:
    """A process outside the server (the AI worker, an import) publishes: upload events reach
    the institution's users only, system alerts every subscriber."""
    institution = f"HOSP-{uuid.uuid4().hex[:6]}"
    with (
        served.subscribed(served.token(institution), "image_uploads", "system_alerts") as ours,
        served.subscribed(
            served.token("HOSP-OTHER"), "image_uploads", "system_alerts", "ai_analysis_progress"
        ) as theirs,
    ):
        upload_id = f"upload_{uuid.uuid4().hex[:8]}"
        served.publish_elsewhere(
            "image_upload", {"upload_id": upload_id, "processing_status": "completed"}, institution
        )
        message = receive_until(ours, lambda m: m["event"] == "image_uploads")
        assert message["data"] == {"upload_id": upload_id, "processing_status": "completed"}
        alert = {
            "alert_id": "alert_test1",
            "severity": "warning",
            "category": "disk",
            "message": "Disk usage of the image storage above 85%",
            "details": {"current_usage_percent": 86.0, "available_gb": 1.5},
            "auto_dismiss_seconds": 30,
        }
        served.publish_elsewhere("system_alert", alert, None)
        for ws in (ours, theirs):
            # (matched by id: on a busy machine the server may raise real alerts as well)
            got = receive_until(
                ws,
                lambda m: m["event"] == "system_alert" and m["data"]["alert_id"] == "alert_test1",
            )
            assert got["data"] == alert
        assert nothing_matching(theirs, lambda m: m["event"] == "image_uploads", 1.0)
        progress = {"analysis_id": "analysis_1", "progress": 65, "status": "processing"}
        served.publish_elsewhere("ai_analysis_progress", progress, "HOSP-OTHER")
        got = receive_until(theirs, lambda m: m["event"] == "ai_analysis_progress")
        assert got["data"] == progress


def test_a_client_that_stops_reading_is_cut_off_without_slowing_others(served: Served) -> None:
    """Events in rounds, each read by one client before the next: the client that reads
    nothing fills the socket buffers, then its 256-message queue, and is disconnected; the
    reader gets every event."""
    institution = f"HOSP-{uuid.uuid4().hex[:6]}"
    token = served.token(institution)
    # 30 rounds of 50 events of 40 kB (incompressible): about three times what the loopback
    # socket buffers, the client library's queue and the server's queue hold together.
    rounds, per_round, padding = 30, 50, 40_000
    with (
        served.subscribed(token, "ai_analysis_progress") as reader,
        served.subscribed(token, "ai_analysis_progress") as stalled,
        served.publisher() as publish,
    ):
        for n in range(rounds):
            publish("ai_analysis_progress", {"round": n}, institution, per_round, padding)
            seen: list[int] = []
            while len(seen) < per_round:
                message = receive_until(reader, lambda m: m["event"] == "ai_analysis_progress")
                assert message["data"]["round"] == n
                seen.append(message["data"]["seq"])
            assert seen == list(range(per_round))
        # The stalled client now reads what reached it before it was dropped: fewer than
        # all, then the close (1013, "try again later").
        got = 0
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                if receive(stalled, 30)["event"] == "ai_analysis_progress":
                    got += 1
        assert got < rounds * per_round, "the stalled client was not cut off"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
