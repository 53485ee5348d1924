"""The shared event log (server/events.py) and the WebSocket hub's fan-out, in process: events
are recorded for other processes, a relay delivers each foreign row once (also one that commits
after a larger id), skips this process's own, prunes, and a slow socket is cut off alone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from server import events
from server.auth.roles import ROLES
from server.auth.tokens import Claims
from server.catalog.db import database, session, write_transaction
from server.catalog.schema import EventLog
from server.web.ws import Client, Hub, channel_of, render


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[None]:
    from server.archive import close_archive, open_archive
    from server.config import load_settings

    open_archive(load_settings(None, {"data_dir": str(tmp_path / "data")}))
    try:
        yield
    finally:
        close_archive()


def rows() -> list[dict[str, Any]]:
    with session():
        return list(EventLog.select().order_by(EventLog.id).dicts())


def foreign(
    kind: str, institution: str | None = "H1", ident: int | None = None, **data: Any
) -> int:
    """A row as another process would write it."""
    values = {
        "kind": kind,
        "institution": institution,
        "data": orjson.dumps(data).decode(),
        "origin": "elsewhere:1:abcd",
        "created_ms": int(time.time() * 1000),
    }
    if ident is not None:
        values["id"] = ident
    with session(), write_transaction():
        return int(EventLog.insert(**values).execute())


def test_publish_records_after_local_delivery(archive: None) -> None:
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        events.publish(events.Event("worklist.created", {"id": 7}, institution="H1"))
    finally:
        unsubscribe()
    assert [e.kind for e in seen] == ["worklist.created"]
    (row,) = rows()
    assert row["kind"] == "worklist.created" and row["institution"] == "H1"
    assert orjson.loads(row["data"]) == {"id": 7}
    assert row["origin"] == events.origin()
    assert abs(row["created_ms"] / 1000 - seen[0].time) < 0.002


def test_publish_inside_a_transaction_joins_it(archive: None) -> None:
    # No deadlock on the writers' gate, and a rollback takes the event with it.
    with session():
        with write_transaction():
            events.publish(events.Event("worklist.updated", {"id": 1}, institution="H1"))
        assert len(rows()) == 1
        with pytest.raises(RuntimeError), write_transaction():
            events.publish(events.Event("worklist.updated", {"id": 2}, institution="H1"))
            raise RuntimeError("rolled back")
    assert [orjson.loads(r["data"])["id"] for r in rows()] == [1]


def test_relay_delivers_foreign_rows_once_and_skips_its_own(archive: None) -> None:
    got: list[events.Event] = []
    foreign("worklist.created", id=1)  # before activation: not replayed
    relay = events.Relay(got.append)
    relay._cursor = events._newest_id()  # as activate() does, without the thread
    events.publish(events.Event("worklist.created", {"id": 2}, institution="H1"))  # our own
    foreign("image_upload", "H2", upload_id="upload_1")
    foreign("system_alert", None, severity="warning")
    relay.poll()
    relay.poll()
    assert [(e.kind, e.institution) for e in got] == [
        ("image_upload", "H2"),
        ("system_alert", None),
    ]
    assert got[0].data == {"upload_id": "upload_1"}


def test_relay_picks_up_a_row_committed_after_a_larger_id(archive: None) -> None:
    got: list[events.Event] = []
    relay = events.Relay(got.append)
    base = foreign("worklist.created", n=0)
    relay._cursor = base
    foreign("worklist.created", ident=base + 2, n=2)  # id base+1 still "in flight"
    relay.poll()
    foreign("worklist.created", ident=base + 1, n=1)  # commits late
    relay.poll()
    relay.poll()
    assert [e.data["n"] for e in got] == [2, 1]


def test_relay_thread_follows_activation(archive: None) -> None:
    got: list[events.Event] = []
    arrived = threading.Event()

    def deliver(event: events.Event) -> None:
        got.append(event)
        arrived.set()

    relay = events.Relay(deliver, interval=0.02)
    relay.activate()
    try:
        foreign("worklist.deleted", id=3)
        assert arrived.wait(10)
        relay.deactivate()
        foreign("worklist.deleted", id=4)  # nobody listening: dropped, not queued
        relay.activate()
        arrived.clear()
        foreign("worklist.deleted", id=5)
        assert arrived.wait(10)
    finally:
        relay.stop()
    assert [e.data["id"] for e in got] == [3, 5]


def test_prune_keeps_recent_rows_and_the_newest(archive: None) -> None:
    for n in range(3):
        foreign("worklist.created", n=n)
    with session(), write_transaction():
        EventLog.update(created_ms=0).execute()  # all of them ancient
        assert events.prune_log() == 2
    assert [orjson.loads(r["data"])["n"] for r in rows()] == [2]
    foreign("worklist.created", n=3)
    with session(), write_transaction():
        assert events.prune_log() == 1  # the ancient row is no longer the newest
        assert events.prune_log(retention=-10) == 0  # the newest row stays, however old
    assert [orjson.loads(r["data"])["n"] for r in rows()] == [3]


def test_publish_without_a_catalog_or_table_does_not_fail(
    archive: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with session():
        database.execute_sql('DROP TABLE "event_log"')
    events.publish(events.Event("worklist.created", {"id": 1}))  # logged, not raised
    monkeypatch.setattr(database, "obj", None)
    events.publish(events.Event("worklist.created", {"id": 2}))


def test_channels_and_rendering() -> None:
    assert channel_of("worklist.status_changed") == "worklist_updates"
    assert channel_of("image_upload") == "image_uploads"
    assert channel_of("ai_analysis_progress") == "ai_analysis_progress"
    assert channel_of("system_alert") == "system_alerts"
    assert channel_of("study.stored") is None
    event = events.Event("worklist.status_changed", {"id": 1}, "H1", time=0)
    body = orjson.loads(render("worklist_updates", event))
    assert body == {
        "event": "worklist_updates",
        "timestamp": "1970-01-01T00:00:00Z",
        "data": {"id": 1, "change": "status_changed"},
    }
    alert = events.Event("system_alert", {"severity": "warning"}, None, time=0)
    assert orjson.loads(render("system_alerts", alert))["event"] == "system_alert"


def _claims(institution: str, user_id: int = 5) -> Claims:
    return Claims(user_id, "u", "viewer", institution, ROLES["viewer"], "j", 2**40)


def test_hub_fans_out_by_tenant_and_cuts_off_only_the_slow_client() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        hub = Hub(lambda: None)
        hub._relay = events.Relay(lambda e: None)  # no catalog here
        hub._relay.activate = lambda: None  # type: ignore[method-assign]
        slow = Client(_claims("H1"), loop, queue_size=2)
        fast = Client(_claims("H1"), loop, queue_size=100)
        other = Client(_claims("H2"), loop, queue_size=100)
        local = Client(_claims("", user_id=0), loop, queue_size=100)
        for client in (slow, fast, other, local):
            client.channels = frozenset({"worklist_updates", "system_alerts"})
            hub.attach(client)
        try:
            for n in range(5):
                hub.dispatch(events.Event("worklist.updated", {"n": n}, "H1"))
            hub.dispatch(events.Event("system_alert", {"severity": "critical"}, None))
            hub.dispatch(events.Event("unrelated.kind", {}, "H1"))
            await asyncio.sleep(0)  # run the call_soon_threadsafe callbacks
            await asyncio.sleep(0)
        finally:
            assert hub._unsubscribe is not None
            hub._unsubscribe()
        assert slow.kicked.is_set() and not fast.kicked.is_set()
        assert fast.queue.qsize() == 6
        assert other.queue.qsize() == 1  # only the system alert
        assert local.queue.qsize() == 6  # the local operator sees every institution
        assert orjson.loads(other.queue.get_nowait())["event"] == "system_alert"

    asyncio.run(scenario())
