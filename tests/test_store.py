"""The SQLite store on real files: migrations, outbox leases, callbacks, dead letters."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StoreError
from gateway.store import DuplicateMessage, MessageRecord, NewCallback, NewMessage, Rejection
from gateway.store.sqlite import MIGRATIONS, SQLiteStore

PORTAL = "330000:one-stop-portal"
NATIONAL = "100000:national-platform"


def _new(message_id: str | None = None, **changes: Any) -> NewMessage:
    fields: dict[str, Any] = {
        "message_id": message_id or str(uuid.uuid4()),
        "client": PORTAL,
        "service": "credit.query",
        "mode": "sync",
        "state": "received",
        "request_headers": {"Gw-Client": PORTAL, "Gw-User": "zhang.san"},
        "request_body": b'{"uscc": "x"}',
        "request_digest": "abc123",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    fields.update(changes)
    return NewMessage(**fields)


def _callback(original: MessageRecord, message_id: str = "cb-1") -> NewCallback:
    return NewCallback(
        message_id=message_id,
        client=NATIONAL,
        correlation_id=original.message_id,
        original_seq=original.seq,
        service=original.service,
        headers={"Gw-Client": NATIONAL},
        body=b'{"decision": "approved"}',
        digest="cafe",
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "db" / "gateway.db")
    await s.open()
    yield s
    await s.close()


async def _queued(store: SQLiteStore, at: float, **changes: Any) -> MessageRecord:
    return await store.insert_message(
        _new(mode="async", state="accepted", next_attempt_at=at, **changes)
    )


async def _dead_message(store: SQLiteStore) -> MessageRecord:
    record = await _queued(store, time.time())
    await store.set_message_state(record.seq, "dead", error="gave up", attempts=10)
    return record


def test_migrations_set_user_version(tmp_path: Path) -> None:
    """Opening a new file runs every migration and records the version (checked with sqlite3)."""
    import asyncio

    path = tmp_path / "v.db"

    async def open_and_close() -> None:
        s = SQLiteStore(path)
        await s.open()
        await s.close()

    asyncio.run(open_and_close())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "callbacks", "rejections"} <= tables


async def test_reopening_does_not_migrate_again_and_keeps_data(tmp_path: Path) -> None:
    """Data written, closed and reopened from the same file is still there."""
    path = tmp_path / "durable.db"
    first = SQLiteStore(path, synchronous="full")
    await first.open()
    record = await first.insert_message(_new("11111111-1111-4111-8111-111111111111"))
    await first.record_rejection(
        Rejection(
            client=None,
            message_id=None,
            service=None,
            status=401,
            code="signature_missing",
            detail="unsigned",
            digest=None,
            size=0,
            headers={},
        )
    )
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        again = await second.get_message(PORTAL, record.message_id)
        assert again == record
        assert len(await second.rejections()) == 1
        assert await second.count_messages() == 1
    finally:
        await second.close()


async def test_insert_then_get_round_trips_every_field(store: SQLiteStore) -> None:
    """A recorded message reads back with its headers, body, digest and trace id."""
    new = _new(target="440000:gateway", adapter="peer")
    record = await store.insert_message(new)
    assert record.seq >= 1
    assert record.state == "received"
    assert record.request_headers == new.request_headers
    assert record.request_body == new.request_body
    assert record.target == "440000:gateway"
    assert record.adapter == "peer"
    assert record.trace_id == new.trace_id
    assert record.status is None
    assert not record.finished
    assert record.attempts == 0
    assert await store.get_message(PORTAL, new.message_id) == record
    assert await store.get_message_by_seq(record.seq) == record
    assert await store.get_message("330000:other", new.message_id) is None
    assert await store.get_message_by_seq(record.seq + 1000) is None


async def test_same_client_and_message_id_is_a_duplicate(store: SQLiteStore) -> None:
    """A second insert of the same (client, message id) raises DuplicateMessage."""
    new = _new()
    await store.insert_message(new)
    with pytest.raises(DuplicateMessage):
        await store.insert_message(new)
    assert await store.count_messages() == 1


async def test_same_message_id_from_another_client_is_separate(store: SQLiteStore) -> None:
    """Message ids are per client: another client may reuse one; find_by_message_id sees both."""
    new = _new()
    await store.insert_message(new)
    await store.insert_message(_new(new.message_id, client="330000:tax-system"))
    found = await store.find_by_message_id(new.message_id)
    assert sorted(r.client for r in found) == [PORTAL, "330000:tax-system"]


async def test_finish_message_records_the_answer(store: SQLiteStore) -> None:
    """finish_message stores status, code, adapter, answer and timings; it is then finished."""
    record = await store.insert_message(_new())
    await store.finish_message(
        record.seq,
        state="answered",
        status=200,
        code=None,
        adapter="national",
        response_headers={"Content-Type": "application/json"},
        response_body=b'{"ok": true}',
        timings={"upstream": 12.5, "total": 20.0},
    )
    done = await store.get_message_by_seq(record.seq)
    assert done is not None
    assert done.finished
    assert (done.state, done.status, done.adapter) == ("answered", 200, "national")
    assert done.response_headers == {"Content-Type": "application/json"}
    assert done.response_body == b'{"ok": true}'
    assert done.timings == {"upstream": 12.5, "total": 20.0}
    assert done.updated_at >= record.updated_at


async def test_finish_message_keeps_the_adapter_when_none_is_given(store: SQLiteStore) -> None:
    """A failure finished without an adapter name keeps the one recorded before."""
    record = await store.insert_message(_new(adapter="national"))
    await store.finish_message(
        record.seq,
        state="failed",
        status=502,
        code="upstream_error",
        adapter=None,
        response_headers={},
        response_body=None,
        error="boom",
    )
    done = await store.get_message_by_seq(record.seq)
    assert done is not None
    assert (done.adapter, done.code, done.error) == ("national", "upstream_error", "boom")


async def test_claim_leases_due_messages_until_the_lease_expires(store: SQLiteStore) -> None:
    """A claimed message is not claimed again until its lease has run out."""
    now = time.time()
    due = await _queued(store, now - 1)
    await _queued(store, now + 3600)  # not due yet
    claimed = await store.claim_due_messages(now, limit=10, lease_s=30)
    assert [m.seq for m in claimed] == [due.seq]
    assert claimed[0].state == "delivering"
    assert await store.claim_due_messages(now + 29, limit=10, lease_s=30) == []
    again = await store.claim_due_messages(now + 30, limit=10, lease_s=30)
    assert [m.seq for m in again] == [due.seq]


async def test_claim_respects_the_limit_and_due_order(store: SQLiteStore) -> None:
    """At most `limit` messages are claimed, the longest-due first."""
    now = time.time()
    late = await _queued(store, now - 1)
    early = await _queued(store, now - 100)
    await _queued(store, now - 50)
    claimed = await store.claim_due_messages(now, limit=1, lease_s=30)
    assert [m.seq for m in claimed] == [early.seq]
    rest = await store.claim_due_messages(now, limit=10, lease_s=30)
    assert len(rest) == 2
    assert late.seq in {m.seq for m in rest}
    assert await store.outbox_depth() == 3


async def test_release_leases_makes_claimed_work_claimable(store: SQLiteStore) -> None:
    """After a restart release_leases voids every lease, so the work is claimed again."""
    now = time.time()
    record = await _queued(store, now)
    assert len(await store.claim_due_messages(now, limit=10, lease_s=300)) == 1
    assert await store.release_leases() == 1
    assert [m.seq for m in await store.claim_due_messages(now, 10, 300)] == [record.seq]
    assert await store.release_leases() == 1
    assert await store.release_leases() == 0


async def test_reschedule_moves_the_next_attempt(store: SQLiteStore) -> None:
    """A rescheduled message keeps its error and attempts and is due only at the new time."""
    now = time.time()
    record = await _queued(store, now)
    await store.claim_due_messages(now, limit=10, lease_s=300)
    await store.reschedule_message(record.seq, attempts=1, next_attempt_at=now + 60, error="503")
    assert await store.claim_due_messages(now + 59, limit=10, lease_s=300) == []
    (again,) = await store.claim_due_messages(now + 60, limit=10, lease_s=300)
    assert (again.attempts, again.error, again.next_attempt_at) == (1, "503", now + 60)


async def test_set_message_state_takes_it_out_of_the_outbox(store: SQLiteStore) -> None:
    """set_message_state moves a message on and it is no longer due."""
    now = time.time()
    record = await _queued(store, now)
    await store.set_message_state(record.seq, "delivered", adapter="national", attempts=1)
    assert await store.claim_due_messages(now + 10, limit=10, lease_s=30) == []
    assert await store.outbox_depth() == 0
    moved = await store.get_message_by_seq(record.seq)
    assert moved is not None
    assert (moved.state, moved.adapter, moved.attempts) == ("delivered", "national", 1)


async def test_late_acknowledgement_does_not_demote_an_answer(store: SQLiteStore) -> None:
    """A message already answered by its callback stays answered when a late ack arrives."""
    original = await _queued(store, time.time())
    await store.insert_callback(_callback(original))
    await store.set_message_state(original.seq, "delivered", adapter="national")
    after = await store.get_message_by_seq(original.seq)
    assert after is not None
    assert after.state == "answered"
    assert after.result == b'{"decision": "approved"}'


async def test_callback_marks_its_message_answered(store: SQLiteStore) -> None:
    """insert_callback stores the callback pending and the message answered with its result."""
    original = await _queued(store, time.time())
    cb = await store.insert_callback(_callback(original))
    assert cb.state == "pending"
    assert cb.original_client == PORTAL
    assert cb.correlation_id == original.message_id
    assert cb.trace_id == original.trace_id
    message = await store.get_message_by_seq(original.seq)
    assert message is not None
    assert message.state == "answered"
    assert message.result == b'{"decision": "approved"}'
    assert message.next_attempt_at is None
    assert await store.get_callback(NATIONAL, "cb-1") == cb
    assert await store.get_callback(PORTAL, "cb-1") is None


async def test_duplicate_callback_raises_and_changes_nothing(store: SQLiteStore) -> None:
    """The same callback id from the same client twice raises DuplicateMessage."""
    original = await _queued(store, time.time())
    first = await store.insert_callback(_callback(original))
    with pytest.raises(DuplicateMessage):
        await store.insert_callback(_callback(original))
    assert await store.get_callback(NATIONAL, "cb-1") == first
    assert len(await store.claim_due_callbacks(time.time() + 1, limit=10, lease_s=30)) == 1


async def test_callback_for_a_missing_message_is_not_a_duplicate(store: SQLiteStore) -> None:
    """A callback referring to no recorded message is a store error, not a duplicate."""
    original = await store.insert_message(_new())
    orphan = NewCallback(
        message_id="orphan",
        client=NATIONAL,
        correlation_id=original.message_id,
        original_seq=original.seq + 999,
        service="credit.query",
        headers={},
        body=b"{}",
        digest="d",
    )
    with pytest.raises(StoreError):
        await store.insert_callback(orphan)


async def test_callback_claim_lease_and_delivery(store: SQLiteStore) -> None:
    """A claimed callback is leased; delivered moves its message to callback_delivered."""
    original = await _queued(store, time.time())
    cb = await store.insert_callback(_callback(original))
    now = time.time() + 1
    (claimed,) = await store.claim_due_callbacks(now, limit=10, lease_s=30)
    assert claimed.seq == cb.seq
    assert await store.claim_due_callbacks(now, limit=10, lease_s=30) == []
    await store.finish_callback(cb.seq, state="delivered", attempts=1, error=None)
    delivered = await store.get_callback(NATIONAL, "cb-1")
    assert delivered is not None
    assert (delivered.state, delivered.attempts) == ("delivered", 1)
    message = await store.get_message_by_seq(original.seq)
    assert message is not None
    assert message.state == "callback_delivered"
    assert await store.claim_due_callbacks(now + 100, limit=10, lease_s=30) == []


async def test_reschedule_callback_delays_it(store: SQLiteStore) -> None:
    """A rescheduled callback is due only at its new time, with the error kept."""
    original = await _queued(store, time.time())
    cb = await store.insert_callback(_callback(original))
    now = time.time() + 1
    await store.claim_due_callbacks(now, limit=10, lease_s=30)
    await store.reschedule_callback(cb.seq, attempts=1, next_attempt_at=now + 50, error="refused")
    assert await store.claim_due_callbacks(now + 49, limit=10, lease_s=30) == []
    (again,) = await store.claim_due_callbacks(now + 50, limit=10, lease_s=30)
    assert (again.attempts, again.error) == (1, "refused")


async def test_dead_callback_does_not_mark_the_message_delivered(store: SQLiteStore) -> None:
    """A callback finished dead leaves its message answered and is listed as a dead letter."""
    original = await _queued(store, time.time())
    cb = await store.insert_callback(_callback(original))
    await store.finish_callback(cb.seq, state="dead", attempts=7, error="portal down")
    message = await store.get_message_by_seq(original.seq)
    assert message is not None
    assert message.state == "answered"
    (letter,) = await store.dead_letters()
    assert letter["kind"] == "callback"
    assert letter["seq"] == cb.seq
    assert letter["client"] == PORTAL
    assert (letter["attempts"], letter["error"]) == (7, "portal down")


async def test_dead_letters_and_redeliver_a_message(store: SQLiteStore) -> None:
    """A dead message is listed; redeliver requeues it once with a fresh attempt budget."""
    dead = await _dead_message(store)
    await _queued(store, time.time())  # alive, not a dead letter
    letters = await store.dead_letters()
    assert [(x["kind"], x["seq"], x["message_id"]) for x in letters] == [
        ("message", dead.seq, dead.message_id)
    ]
    now = time.time() + 5
    assert await store.redeliver("message", dead.seq, now)
    assert await store.redeliver("message", dead.seq, now) is False
    assert await store.dead_letters() == []
    requeued = await store.get_message_by_seq(dead.seq)
    assert requeued is not None
    assert (requeued.state, requeued.attempts, requeued.next_attempt_at) == ("accepted", 0, now)
    claimed = await store.claim_due_messages(now, limit=10, lease_s=30)
    assert dead.seq in {m.seq for m in claimed}


async def test_redeliver_a_dead_callback(store: SQLiteStore) -> None:
    """A dead callback goes back to pending and is due again."""
    original = await _queued(store, time.time())
    cb = await store.insert_callback(_callback(original))
    await store.finish_callback(cb.seq, state="dead", attempts=7, error="down")
    now = time.time() + 5
    assert await store.redeliver("callback", cb.seq, now)
    again = await store.get_callback(NATIONAL, "cb-1")
    assert again is not None
    assert (again.state, again.attempts) == ("pending", 0)
    assert [c.seq for c in await store.claim_due_callbacks(now, 10, 30)] == [cb.seq]


async def test_redeliver_refuses_what_is_not_dead(store: SQLiteStore) -> None:
    """Redelivering a live message or an unknown seq changes nothing and returns False."""
    live = await _queued(store, time.time())
    assert await store.redeliver("message", live.seq, time.time()) is False
    assert await store.redeliver("callback", 12345, time.time()) is False
    again = await store.get_message_by_seq(live.seq)
    assert again is not None
    assert again.state == "accepted"


async def test_search_messages_filters_and_orders_newest_first(store: SQLiteStore) -> None:
    """search_messages filters by client, service, state and since, newest first, limited."""
    a = await store.insert_message(_new())
    b = await store.insert_message(_new(service="crossregion.apply", state="accepted"))
    c = await store.insert_message(_new(client="330000:tax-system"))
    assert [r.seq for r in await store.search_messages()] == [c.seq, b.seq, a.seq]
    assert [r.seq for r in await store.search_messages(client=PORTAL)] == [b.seq, a.seq]
    assert [r.seq for r in await store.search_messages(service="crossregion.apply")] == [b.seq]
    assert [r.seq for r in await store.search_messages(state="received", client=PORTAL)] == [a.seq]
    assert [r.seq for r in await store.search_messages(limit=1)] == [c.seq]
    assert await store.search_messages(since=time.time() + 60) == []
    assert len(await store.search_messages(since=a.created_at)) == 3
    assert await store.count_messages("received") == 2


async def test_rejections_are_recorded_newest_first(store: SQLiteStore) -> None:
    """record_rejection keeps what was refused, with its headers, newest first."""
    for status, code in ((401, "signature_invalid"), (413, "payload_too_large")):
        await store.record_rejection(
            Rejection(
                client=PORTAL,
                message_id="m-1",
                service="credit.query",
                status=status,
                code=code,
                detail="refused",
                digest="ff",
                size=10,
                headers={"Gw-Client": PORTAL},
            )
        )
    rows = await store.rejections()
    assert [(r["status"], r["code"]) for r in rows] == [
        (413, "payload_too_large"),
        (401, "signature_invalid"),
    ]
    assert rows[0]["headers"] == '{"Gw-Client": "330000:one-stop-portal"}'
    assert len(await store.rejections(limit=1)) == 1


async def test_ping_succeeds_on_an_open_store(store: SQLiteStore) -> None:
    """ping proves the store writable and leaves no transaction open."""

    def another_writer_can_begin() -> None:
        # A second connection takes the write lock at once (timeout 0): none is held.
        other = sqlite3.connect(store.path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        finally:
            other.close()

    await store.ping()
    another_writer_can_begin()
    await store.insert_message(_new())
    await store.ping()
    another_writer_can_begin()


async def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    """Using a store that is not open is a StoreError, not an AttributeError."""
    s = SQLiteStore(tmp_path / "never.db")
    with pytest.raises(StoreError):
        await s.get_message(PORTAL, "x")
    await s.open()
    await s.close()
    with pytest.raises(StoreError):
        await s.insert_message(_new())


async def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    """Opening a file that is not SQLite raises StoreError naming the file and the cause."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database, just bytes " * 64)
    store = SQLiteStore(junk)
    with pytest.raises(StoreError) as caught:
        await store.open()
    await store.close()
    assert caught.value.detail == f"cannot open the store at {junk}: file is not a database"
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


async def test_message_events_are_one_messages_chained_timeline(store: SQLiteStore) -> None:
    """Acceptance, state changes and its callbacks, oldest first; no other message's."""
    record = await _queued(store, time.time())
    other = await _queued(store, time.time())
    await store.set_message_state(record.seq, "delivered", adapter="national", attempts=1)
    await store.set_message_state(other.seq, "dead", error="x", attempts=3)
    await store.insert_callback(_callback(record))
    events = await store.message_events(record.seq)
    assert [(e.kind, e.state) for e in events] == [
        ("message.accepted", "accepted"),
        ("message.state", "delivered"),
        ("callback.accepted", "pending"),
    ]
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert [e.kind for e in await store.message_events(other.seq)] == [
        "message.accepted",
        "message.state",
    ]
    assert await store.message_events(10_000) == []
