"""The store on both backends (a real SQLite file, a real PostgreSQL database): records,
outbox leases, callbacks, dead letters; SQLite's migrations and files at the end."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.errors import StoreError, StoreReadOnly
from gateway.store import (
    CallbackRecord,
    ConfigConflict,
    DuplicateMessage,
    MessageRecord,
    NewCallback,
    NewMessage,
    Rejection,
    ResourceChange,
    Store,
)
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import MIGRATIONS, SQLiteStore
from tests.conftest import store_at

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
async def store(store_url: str) -> AsyncIterator[Store]:
    s = store_at(store_url)
    await s.open()
    yield s
    await s.close()


async def _queued(store: Store, at: float, **changes: Any) -> MessageRecord:
    return await store.insert_message(
        _new(mode="async", state="accepted", next_attempt_at=at, **changes)
    )


async def _claimed(store: Store, **changes: Any) -> MessageRecord:
    """A queued message whose lease this store holds (claimed, as delivery does first)."""
    now = time.time()
    record = await _queued(store, now - 1, **changes)
    claimed = await store.claim_due_messages(now, limit=100, lease_s=30)
    assert record.seq in {m.seq for m in claimed}
    return record


async def _delivered(store: Store, receiver: str = NATIONAL) -> MessageRecord:
    """A message the upstream acknowledged: it awaits ``receiver``'s callback."""
    record = await _claimed(store)
    assert await store.set_message_state(
        record.seq, "delivered", adapter="national", attempts=1, receiver=receiver
    )
    return record


async def _answered(store: Store) -> tuple[MessageRecord, CallbackRecord]:
    """A delivered message and the receiver's callback that answered it."""
    original = await _delivered(store)
    cb = await store.insert_callback(_callback(original))
    assert cb is not None
    return original, cb


async def _claimed_callback(store: Store) -> tuple[MessageRecord, CallbackRecord]:
    """An answered message whose callback this store has claimed for delivery."""
    original, cb = await _answered(store)
    claimed = await store.claim_due_callbacks(time.time() + 1, limit=10, lease_s=30)
    assert cb.seq in {c.seq for c in claimed}
    return original, cb


async def _dead_message(store: Store) -> MessageRecord:
    record = await _claimed(store)
    assert await store.set_message_state(record.seq, "dead", error="gave up", attempts=10)
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


async def test_reopening_does_not_migrate_again_and_keeps_data(store_url: str) -> None:
    """Data written, closed and reopened from the same file or database is still there."""
    first = store_at(store_url)
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
    second = store_at(store_url)
    await second.open()
    try:
        again = await second.get_message(PORTAL, record.message_id)
        assert again == record
        assert len(await second.rejections()) == 1
        assert await second.count_messages() == 1
    finally:
        await second.close()


async def test_insert_then_get_round_trips_every_field(store: Store) -> None:
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


async def test_same_client_and_message_id_is_a_duplicate(store: Store) -> None:
    """A second insert of the same (client, message id) raises DuplicateMessage."""
    new = _new()
    await store.insert_message(new)
    with pytest.raises(DuplicateMessage):
        await store.insert_message(new)
    assert await store.count_messages() == 1


async def test_same_message_id_from_another_client_is_separate(store: Store) -> None:
    """Message ids are per client: another client may reuse one; find_by_message_id sees both."""
    new = _new()
    await store.insert_message(new)
    await store.insert_message(_new(new.message_id, client="330000:tax-system"))
    found = await store.find_by_message_id(new.message_id)
    assert sorted(r.client for r in found) == [PORTAL, "330000:tax-system"]


async def test_finish_message_records_the_answer(store: Store) -> None:
    """finish_message stores status, code, adapter, answer and timings; it is then finished."""
    record = await store.insert_message(_new(state="delivering"))
    assert await store.finish_message(
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


async def test_finish_message_keeps_the_adapter_when_none_is_given(store: Store) -> None:
    """A failure finished without an adapter name keeps the one recorded before."""
    record = await store.insert_message(_new(adapter="national", state="delivering"))
    assert await store.finish_message(
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


async def test_claim_leases_due_messages_until_the_lease_expires(store: Store) -> None:
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


async def test_claim_respects_the_limit_and_due_order(store: Store) -> None:
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


async def test_release_leases_makes_claimed_work_claimable(store: Store) -> None:
    """After a restart release_leases voids every lease, so the work is claimed again."""
    now = time.time()
    record = await _queued(store, now)
    assert len(await store.claim_due_messages(now, limit=10, lease_s=300)) == 1
    assert await store.release_leases() == 1
    assert [m.seq for m in await store.claim_due_messages(now, 10, 300)] == [record.seq]
    assert await store.release_leases() == 1
    assert await store.release_leases() == 0


async def test_reschedule_moves_the_next_attempt(store: Store) -> None:
    """A rescheduled message keeps its error and attempts and is due only at the new time."""
    now = time.time()
    record = await _queued(store, now)
    await store.claim_due_messages(now, limit=10, lease_s=300)
    await store.reschedule_message(record.seq, attempts=1, next_attempt_at=now + 60, error="503")
    assert await store.claim_due_messages(now + 59, limit=10, lease_s=300) == []
    (again,) = await store.claim_due_messages(now + 60, limit=10, lease_s=300)
    assert (again.attempts, again.error, again.next_attempt_at) == (1, "503", now + 60)


async def test_set_message_state_takes_it_out_of_the_outbox(store: Store) -> None:
    """set_message_state moves a message on and it is no longer due."""
    now = time.time()
    record = await _claimed(store)
    assert await store.set_message_state(record.seq, "delivered", adapter="national", attempts=1)
    assert await store.claim_due_messages(now + 100, limit=10, lease_s=30) == []
    assert await store.outbox_depth() == 0
    moved = await store.get_message_by_seq(record.seq)
    assert moved is not None
    assert (moved.state, moved.adapter, moved.attempts) == ("delivered", "national", 1)


async def test_late_acknowledgement_does_not_demote_an_answer(store: Store) -> None:
    """A message already answered by its callback stays answered when a late ack arrives."""
    original, _ = await _answered(store)
    assert not await store.set_message_state(original.seq, "delivered", adapter="national")
    after = await store.get_message_by_seq(original.seq)
    assert after is not None
    assert after.state == "answered"
    assert after.result == b'{"decision": "approved"}'


async def test_callback_marks_its_message_answered(store: Store) -> None:
    """insert_callback stores the callback pending and the message answered with its result."""
    original, cb = await _answered(store)
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


async def test_duplicate_callback_raises_and_changes_nothing(store: Store) -> None:
    """The same callback id from the same client twice raises DuplicateMessage."""
    original, first = await _answered(store)
    with pytest.raises(DuplicateMessage):
        await store.insert_callback(_callback(original))
    assert await store.get_callback(NATIONAL, "cb-1") == first
    assert len(await store.claim_due_callbacks(time.time() + 1, limit=10, lease_s=30)) == 1


async def test_callback_for_a_missing_message_changes_nothing(store: Store) -> None:
    """A callback referring to no recorded message is refused by the guard, not a duplicate."""
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
    assert await store.insert_callback(orphan) is None
    assert await store.get_callback(NATIONAL, "orphan") is None


async def test_callback_claim_lease_and_delivery(store: Store) -> None:
    """A claimed callback is leased; delivered moves its message to callback_delivered."""
    original, cb = await _answered(store)
    now = time.time() + 1
    (claimed,) = await store.claim_due_callbacks(now, limit=10, lease_s=30)
    assert claimed.seq == cb.seq
    assert await store.claim_due_callbacks(now, limit=10, lease_s=30) == []
    assert await store.finish_callback(cb.seq, state="delivered", attempts=1, error=None)
    delivered = await store.get_callback(NATIONAL, "cb-1")
    assert delivered is not None
    assert (delivered.state, delivered.attempts) == ("delivered", 1)
    message = await store.get_message_by_seq(original.seq)
    assert message is not None
    assert message.state == "callback_delivered"
    assert await store.claim_due_callbacks(now + 100, limit=10, lease_s=30) == []


async def test_reschedule_callback_delays_it(store: Store) -> None:
    """A rescheduled callback is due only at its new time, with the error kept."""
    _, cb = await _claimed_callback(store)
    now = time.time() + 1
    assert await store.reschedule_callback(
        cb.seq, attempts=1, next_attempt_at=now + 50, error="refused"
    )
    assert await store.claim_due_callbacks(now + 49, limit=10, lease_s=30) == []
    (again,) = await store.claim_due_callbacks(now + 50, limit=10, lease_s=30)
    assert (again.attempts, again.error) == (1, "refused")


async def test_dead_callback_does_not_mark_the_message_delivered(store: Store) -> None:
    """A callback finished dead leaves its message answered and is listed as a dead letter."""
    original, cb = await _claimed_callback(store)
    assert await store.finish_callback(cb.seq, state="dead", attempts=7, error="portal down")
    message = await store.get_message_by_seq(original.seq)
    assert message is not None
    assert message.state == "answered"
    (letter,) = await store.dead_letters()
    assert letter.kind == "callback"
    assert letter.seq == cb.seq
    assert letter.client == PORTAL
    assert (letter.attempts, letter.error) == (7, "portal down")


async def test_dead_letters_and_redeliver_a_message(store: Store) -> None:
    """A dead message is listed; redeliver requeues it once with a fresh attempt budget."""
    dead = await _dead_message(store)
    await _queued(store, time.time() + 3600)  # alive, not a dead letter
    letters = await store.dead_letters()
    assert [(x.kind, x.seq, x.message_id) for x in letters] == [
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


async def test_redeliver_a_dead_callback(store: Store) -> None:
    """A dead callback goes back to pending and is due again."""
    _, cb = await _claimed_callback(store)
    assert await store.finish_callback(cb.seq, state="dead", attempts=7, error="down")
    now = time.time() + 5
    assert await store.redeliver("callback", cb.seq, now)
    again = await store.get_callback(NATIONAL, "cb-1")
    assert again is not None
    assert (again.state, again.attempts) == ("pending", 0)
    assert [c.seq for c in await store.claim_due_callbacks(now, 10, 30)] == [cb.seq]


async def test_redeliver_refuses_what_is_not_dead(store: Store) -> None:
    """Redelivering a live message or an unknown seq changes nothing and returns False."""
    live = await _queued(store, time.time())
    assert await store.redeliver("message", live.seq, time.time()) is False
    assert await store.redeliver("callback", 12345, time.time()) is False
    again = await store.get_message_by_seq(live.seq)
    assert again is not None
    assert again.state == "accepted"


async def test_search_messages_filters_and_orders_newest_first(store: Store) -> None:
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


async def test_rejections_are_recorded_newest_first(store: Store) -> None:
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
    assert [(r.status, r.code) for r in rows] == [
        (413, "payload_too_large"),
        (401, "signature_invalid"),
    ]
    assert rows[0].headers == {"Gw-Client": "330000:one-stop-portal"}
    assert len(await store.rejections(limit=1)) == 1


async def test_ping_succeeds_on_an_open_store(store: Store, store_url: str) -> None:
    """ping proves the store writable and leaves no transaction open."""

    async def no_transaction_is_left_open() -> None:
        if isinstance(store, SQLiteStore):
            # A second connection takes the write lock at once (timeout 0): none is held.
            other = sqlite3.connect(store.path, timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
            finally:
                other.close()
            return
        conn = await asyncpg.connect(store_url)
        try:
            idle = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            )
        finally:
            await conn.close()
        assert idle == 0

    await store.ping()
    await no_transaction_is_left_open()
    await store.insert_message(_new())
    await store.ping()
    await no_transaction_is_left_open()


async def test_closed_store_raises_store_error(store_url: str) -> None:
    """Using a store that is not open is a StoreError, not an AttributeError."""
    s = store_at(store_url)
    with pytest.raises(StoreError):
        await s.get_message(PORTAL, "x")
    await s.open()
    await s.close()
    with pytest.raises(StoreError):
        await s.insert_message(_new())


@contextlib.asynccontextmanager
async def _refusing_writes(store_url: str) -> AsyncIterator[Store]:
    """The store at ``store_url``, with one message, opened where the database itself
    refuses writes: SQLite ``query_only`` on the write connection (the suite runs as root,
    for whom a read-only file mode is no refusal), PostgreSQL with
    ``default_transaction_read_only`` (a replica, a database in recovery)."""
    first = store_at(store_url)
    await first.open()
    await first.insert_message(_new("kept"))
    if isinstance(first, SQLiteStore):
        first.writer.execute("PRAGMA query_only = ON")
        try:
            yield first
        finally:
            first.writer.execute("PRAGMA query_only = OFF")
            await first.close()
        return
    await first.close()
    conn = await asyncpg.connect(store_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        store = PostgresStore(store_url, instance="replica", migrate=False)
        await store.open()
        try:
            yield store
        finally:
            await store.close()
            await conn.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    finally:
        await conn.close()


async def test_a_database_refusing_writes_raises_store_read_only(store_url: str) -> None:
    """A read-only database is the store's own StoreReadOnly (readiness names it), from ping
    and from a write, never a driver's exception; reads go on."""
    async with _refusing_writes(store_url) as store:
        with pytest.raises(StoreReadOnly) as caught:
            await store.ping()
        assert caught.value.detail.startswith("store write failed: the store is read-only (")
        with pytest.raises(StoreReadOnly):
            await store.insert_message(_new())
        with pytest.raises(StoreReadOnly):
            await store.record_rejection(
                Rejection(
                    client=None,
                    message_id=None,
                    service=None,
                    status=400,
                    code="malformed_request",
                    detail="x",
                    digest=None,
                    size=0,
                    headers={},
                )
            )
        kept = await store.get_message(PORTAL, "kept")
        assert kept is not None
        assert kept.message_id == "kept"
        assert await store.count_messages() == 1


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


def _change(rid: str, body: Any) -> ResourceChange:
    return ResourceChange(
        kind="routes", id=rid, action="create", actor="a", role="admin", after=body
    )


async def test_each_admin_write_bumps_the_configuration_version(store: Store) -> None:
    """Versions count up from 0, one per write, and the write returns the new one."""
    assert await store.config_version() == 0
    assert await store.put_resource(_change("a|*", {"x": 1})) == 1
    assert await store.put_resource(_change("b|*", {"x": 2}), expected_version=1) == 2
    assert await store.config_version() == 2


async def test_a_write_based_on_an_old_version_writes_nothing(store: Store) -> None:
    """Compare-and-set: a write expecting version 0 after another write is a conflict and
    leaves neither resource, change record nor version behind."""
    await store.put_resource(_change("a|*", {"x": 1}))
    with pytest.raises(ConfigConflict):
        await store.put_resource(_change("b|*", {"x": 2}), expected_version=0)
    assert await store.config_version() == 1
    assert [rid for _, rid, _ in await store.load_overlay()] == ["a|*"]
    assert len(await store.changes()) == 1


async def test_the_overlay_is_ordered_by_version_not_by_clock(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers' clocks may disagree: the order is the order the writes committed in."""
    real = time.time
    with monkeypatch.context() as m:  # the first writer's clock runs an hour ahead
        m.setattr(time, "time", lambda: real() + 3600)
        await store.put_resource(_change("c|*", {"id": "c|*"}))
    for rid in ("a|*", "b|*"):
        await store.put_resource(_change(rid, {"id": rid}))
    assert [(rid, body) for _, rid, body in await store.load_overlay()] == [
        ("c|*", {"id": "c|*"}),
        ("a|*", {"id": "a|*"}),
        ("b|*", {"id": "b|*"}),
    ]


def test_the_version_migration_numbers_existing_writes_in_time_order(tmp_path: Path) -> None:
    """A store from before versions gets them in the order of its old timestamps."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for number, script in enumerate(MIGRATIONS[:6], start=1):
            db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        db.executemany(
            "INSERT INTO resources (kind, id, body, updated_at, updated_by) VALUES (?,?,?,?,?)",
            [("routes", "late", "{}", 20.0, "a"), ("routes", "early", "{}", 10.0, "a")],
        )
        db.executescript(f"BEGIN;\n{MIGRATIONS[6]}\nPRAGMA user_version=7;\nCOMMIT;")
        rows = db.execute("SELECT id, version FROM resources ORDER BY version").fetchall()
        assert rows == [("early", 1), ("late", 2)]
        assert db.execute("SELECT version FROM config_version").fetchall() == [(2,)]


async def test_a_file_migrated_by_newer_code_is_refused(tmp_path: Path) -> None:
    """A schema version this code does not know: newer code wrote it; refuse to open."""
    path = tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer than this gateway knows"):
        await store.open()
    await store.close()


async def test_message_events_are_one_messages_chained_timeline(store: Store) -> None:
    """Acceptance, state changes and its callbacks, oldest first; no other message's."""
    record = await _queued(store, time.time() - 1)
    other = await _queued(store, time.time() - 1)
    assert len(await store.claim_due_messages(time.time(), limit=10, lease_s=30)) == 2
    await store.set_message_state(
        record.seq, "delivered", adapter="national", attempts=1, receiver=NATIONAL
    )
    await store.set_message_state(other.seq, "dead", error="x", attempts=3)
    assert await store.insert_callback(_callback(record)) is not None
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


async def test_the_kept_directory_never_goes_back_a_version(store: Store) -> None:
    """The last accepted federation directory: replaced by higher versions only."""
    assert await store.load_directory() is None
    assert await store.save_directory(3, "jws-3")
    assert await store.save_directory(3, "jws-3")  # the same again (another worker)
    assert not await store.save_directory(2, "jws-2")
    assert await store.load_directory() == "jws-3"
    assert await store.save_directory(4, "jws-4")
    assert await store.load_directory() == "jws-4"


# The state machine's guards (PROTOCOL.md «Trust rules»): every transition names the state
# it leaves, and delivery-side ones the lease they need; a refused one changes nothing.


def _decision(original: MessageRecord, message_id: str, decision: str) -> NewCallback:
    body = f'{{"decision": "{decision}"}}'.encode()
    return NewCallback(
        message_id=message_id,
        client=NATIONAL,
        correlation_id=original.message_id,
        original_seq=original.seq,
        service=original.service,
        headers={"Gw-Client": NATIONAL},
        body=body,
        digest=decision,
    )


async def test_a_callback_from_anyone_but_the_receiver_changes_nothing(store: Store) -> None:
    """A message delivered to the platform takes no callback from another member."""
    original = await _delivered(store, receiver="440000:gateway")
    assert await store.insert_callback(_callback(original)) is None
    after = await store.get_message_by_seq(original.seq)
    assert after is not None
    assert (after.state, after.result, after.receiver) == ("delivered", None, "440000:gateway")
    assert await store.get_callback(NATIONAL, "cb-1") is None


async def test_a_callback_before_delivery_does_not_stop_the_delivery(store: Store) -> None:
    """A message still in the outbox is not answered by a callback: it is still delivered."""
    now = time.time()
    queued = await _queued(store, now)
    assert await store.insert_callback(_callback(queued)) is None
    (claimed,) = await store.claim_due_messages(now, limit=10, lease_s=30)
    assert claimed.seq == queued.seq
    assert await store.insert_callback(_callback(claimed)) is None  # delivering: still not
    after = await store.get_message_by_seq(queued.seq)
    assert after is not None
    assert (after.state, after.result) == ("delivering", None)


async def test_a_second_decision_is_refused_unless_it_supersedes(store: Store) -> None:
    """After the final decision another is refused; with supersede both are kept in order."""
    original, first = await _answered(store)
    assert await store.insert_callback(_decision(original, "cb-2", "rejected")) is None
    kept = await store.get_message_by_seq(original.seq)
    assert kept is not None
    assert kept.result == b'{"decision": "approved"}'
    later = await store.insert_callback(_decision(original, "cb-2", "rejected"), supersede=True)
    assert later is not None
    history = await store.callbacks_of(original.seq)
    assert [c.message_id for c in history] == ["cb-1", "cb-2"]
    assert [c.body for c in history] == [first.body, b'{"decision": "rejected"}']
    now = await store.get_message_by_seq(original.seq)
    assert now is not None
    assert (now.state, now.result) == ("answered", b'{"decision": "rejected"}')


async def test_later_decisions_go_out_one_after_another(store: Store) -> None:
    """A message's decisions are delivered in order; it is callback_delivered after the last."""
    original, first = await _answered(store)
    second = await store.insert_callback(_decision(original, "cb-2", "rejected"), supersede=True)
    assert second is not None
    now = time.time() + 1
    assert [c.seq for c in await store.claim_due_callbacks(now, 10, 30)] == [first.seq]
    assert await store.claim_due_callbacks(now, 10, 30) == []  # the second waits its turn
    assert await store.finish_callback(first.seq, state="delivered", attempts=1, error=None)
    middle = await store.get_message_by_seq(original.seq)
    assert middle is not None
    assert middle.state == "answered"  # a later decision is still on its way
    assert [c.seq for c in await store.claim_due_callbacks(now, 10, 30)] == [second.seq]
    assert await store.finish_callback(second.seq, state="delivered", attempts=1, error=None)
    done = await store.get_message_by_seq(original.seq)
    assert done is not None
    assert done.state == "callback_delivered"


async def test_a_decision_after_callback_delivered_reopens_only_with_supersede(
    store: Store,
) -> None:
    """A delivered result is final; a superseding decision makes the message answered again."""
    original, cb = await _claimed_callback(store)
    assert await store.finish_callback(cb.seq, state="delivered", attempts=1, error=None)
    assert await store.insert_callback(_decision(original, "cb-2", "rejected")) is None
    assert await store.insert_callback(_decision(original, "cb-2", "rejected"), supersede=True)
    again = await store.get_message_by_seq(original.seq)
    assert again is not None
    assert again.state == "answered"


async def test_finish_callback_is_guarded_by_its_state(store: Store) -> None:
    """A callback closed once is not closed again: a late 'delivered' cannot revive a dead one."""
    original, cb = await _claimed_callback(store)
    assert await store.finish_callback(cb.seq, state="dead", attempts=9, error="gone")
    assert not await store.finish_callback(cb.seq, state="delivered", attempts=1, error=None)
    assert not await store.reschedule_callback(
        cb.seq, attempts=1, next_attempt_at=time.time(), error="again"
    )
    again = await store.get_callback(NATIONAL, "cb-1")
    assert again is not None
    assert (again.state, again.attempts, again.next_attempt_at) == ("dead", 9, None)
    message = await store.get_message_by_seq(original.seq)
    assert message is not None
    assert message.state == "answered"


async def test_outbox_transitions_are_guarded_by_state(store: Store) -> None:
    """A message out of the outbox is not rescheduled, counted or moved again."""
    record = await _dead_message(store)
    assert not await store.reschedule_message(
        record.seq, attempts=1, next_attempt_at=time.time(), error="late"
    )
    assert not await store.note_attempt(record.seq, attempts=99, adapter="national")
    assert not await store.set_message_state(record.seq, "delivered", attempts=1)
    dead = await store.get_message_by_seq(record.seq)
    assert dead is not None
    assert (dead.state, dead.attempts, dead.next_attempt_at) == ("dead", 10, None)


async def test_finish_message_closes_a_synchronous_exchange_once(store: Store) -> None:
    """The second finish_message of one exchange changes nothing; the first answer is kept."""
    record = await store.insert_message(_new(state="delivering"))
    answer: dict[str, Any] = {"code": None, "adapter": "national", "response_headers": {}}
    assert await store.finish_message(
        record.seq, state="answered", status=200, response_body=b"{}", **answer
    )
    assert not await store.finish_message(
        record.seq, state="failed", status=502, response_body=b"late", **answer
    )
    done = await store.get_message_by_seq(record.seq)
    assert done is not None
    assert (done.state, done.status, done.response_body) == ("answered", 200, b"{}")


async def test_the_fence_needs_the_lease_never_a_voided_one(store: Store) -> None:
    """A message never claimed, or whose lease was voided, is not moved by delivery."""
    now = time.time()
    record = await _queued(store, now)
    assert not await store.set_message_state(record.seq, "dead", error="unclaimed", attempts=1)
    await store.claim_due_messages(now, limit=10, lease_s=30)
    assert await store.release_leases(store.instance_id) == 1  # voided: no owner left
    assert not await store.set_message_state(record.seq, "dead", error="voided", attempts=1)
    assert not await store.reschedule_message(
        record.seq, attempts=1, next_attempt_at=now, error="voided"
    )
    kept = await store.get_message_by_seq(record.seq)
    assert kept is not None
    assert (kept.state, kept.error) == ("delivering", None)
    (again,) = await store.claim_due_messages(now, limit=10, lease_s=30)
    assert await store.set_message_state(again.seq, "dead", error="claimed", attempts=1)


async def test_answer_message_records_the_answer_and_its_callback_once(store: Store) -> None:
    """An immediate answer: answered with its receiver and one pending callback, only once."""
    record = await _claimed(store)
    answer = _decision(record, "answer-1", "approved")
    assert await store.answer_message(
        record.seq, answer, attempts=1, adapter="national", receiver=NATIONAL
    )
    assert not await store.answer_message(
        record.seq, answer, attempts=2, adapter="national", receiver=NATIONAL
    )
    done = await store.get_message_by_seq(record.seq)
    assert done is not None
    assert (done.state, done.receiver, done.attempts) == ("answered", NATIONAL, 1)
    assert [c.message_id for c in await store.callbacks_of(record.seq)] == ["answer-1"]


async def test_two_concurrent_decisions_exactly_one_wins(store_url: str) -> None:
    """Two processes record different decisions for one message at once: one wins, the
    other is refused, and the message holds the winner's decision."""
    setup = store_at(store_url)
    await setup.open()
    a, b = store_at(store_url, instance="a"), store_at(store_url, instance="b")
    await a.open()
    await b.open()
    try:
        original = await _delivered(setup)
        results = await asyncio.gather(
            a.insert_callback(_decision(original, "cb-a", "approved")),
            b.insert_callback(_decision(original, "cb-b", "rejected")),
        )
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        kept = await setup.get_message_by_seq(original.seq)
        assert kept is not None
        assert kept.result == winners[0].body
        assert [c.seq for c in await setup.callbacks_of(original.seq)] == [winners[0].seq]
    finally:
        for s in (a, b, setup):
            await s.close()


async def test_two_concurrent_outcomes_of_one_delivery_exactly_one_wins(store_url: str) -> None:
    """The acknowledgement and a dead-letter for one claimed message race: exactly one lands."""
    a, b = store_at(store_url, instance="one"), store_at(store_url, instance="one")
    await a.open()
    await b.open()
    try:
        record = await _claimed(a)
        results = await asyncio.gather(
            a.set_message_state(record.seq, "delivered", attempts=1, receiver=NATIONAL),
            b.set_message_state(record.seq, "dead", attempts=1, error="gave up"),
        )
        assert sorted(results) == [False, True]
        final = await a.get_message_by_seq(record.seq)
        assert final is not None
        assert final.state == ("delivered" if results[0] else "dead")
    finally:
        await a.close()
        await b.close()
