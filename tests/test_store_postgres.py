"""PostgreSQL, several instances on one database (a real server the suite starts):
migrations under an advisory lock, outbox claims and leases across instances, one hash
chain with N writers, one row per message id, retried deadlocks, and moving in from SQLite.

The behaviour both backends share is tested on both in test_store.py, test_store_batch.py
and test_audit.py; this file is about what only several writers on one database can show.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from gateway.audit import make_checkpoint, verify_store
from gateway.cli import main
from gateway.errors import StoreError
from gateway.store import MessageRecord, NewCallback, NewMessage, ResourceChange
from gateway.store.pgcommit import Tx
from gateway.store.postgres import PostgresStore, SchemaTooNew, migrations
from gateway.store.sqlite import SQLiteStore
from tests.conftest import GATEWAY_ID, NATIONAL_ID, PORTAL_ID, Keys, config_document

Opened = Callable[[str], Awaitable[PostgresStore]]


def _new(message_id: str | None = None, **changes: Any) -> NewMessage:
    body = b'{"applicant": "\xe5\xbc\xa0\xe4\xb8\x89"}\x00\xff'
    fields: dict[str, Any] = {
        "message_id": message_id or str(uuid.uuid4()),
        "client": PORTAL_ID,
        "service": "crossregion.apply",
        "mode": "async",
        "state": "accepted",
        "request_headers": {"Gw-Client": PORTAL_ID, "Content-Type": "application/json"},
        "request_body": body,
        "request_digest": hashlib.sha256(body).hexdigest(),
        "next_attempt_at": time.time() - 1,
    }
    fields.update(changes)
    return NewMessage(**fields)


def _jwks(keys: Keys) -> dict[str, Any]:
    return {"keys": [dict(keys.pairs["gateway"].jwk)]}


@pytest.fixture
async def instances(pg_url: str) -> AsyncIterator[Opened]:
    """Open any number of stores on one database, each its own instance id."""
    opened: list[PostgresStore] = []

    async def open_one(name: str) -> PostgresStore:
        store = PostgresStore(pg_url, instance=name)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


async def _sql(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


# Migrations ---------------------------------------------------------------------------


async def test_three_instances_starting_at_once_migrate_once_and_start_one_chain(
    pg_url: str, instances: Opened
) -> None:
    """The advisory lock lets one instance migrate; the others find it done: one genesis."""
    await asyncio.gather(*(instances(f"i{n}") for n in range(3)))
    applied = await _sql(pg_url, "SELECT version, name, checksum FROM schema_migrations")
    assert [(r["version"], r["checksum"]) for r in applied] == [
        (m.version, m.checksum) for m in migrations()
    ]
    kinds = await _sql(pg_url, "SELECT kind FROM log_chain ORDER BY seq")
    assert [r["kind"] for r in kinds] == ["genesis"]


async def test_a_database_migrated_by_newer_code_is_refused(pg_url: str, instances: Opened) -> None:
    """A version this code does not know means newer code migrated it: refuse to start."""
    await instances("first")
    await _sql(
        pg_url,
        "INSERT INTO schema_migrations VALUES (999, 'future', 'x', 0)",
    )
    newer = PostgresStore(pg_url, instance="old-code")
    with pytest.raises(SchemaTooNew, match="newer than this gateway knows"):
        await newer.open()
    await newer.close()


async def test_a_changed_migration_file_is_refused(pg_url: str, instances: Opened) -> None:
    """An applied migration whose checksum differs from the shipped file is not run over."""
    await instances("first")
    await _sql(pg_url, "UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1")
    again = PostgresStore(pg_url, instance="second")
    with pytest.raises(StoreError, match="differs from the one this gateway ships"):
        await again.open()
    await again.close()


def test_gateway_store_migrate_applies_then_finds_nothing_to_do(
    pg_url: str, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gateway store migrate`` on an empty database, twice."""
    config = _config_file(keys, tmp_path, pg_url)
    assert main(["store", "migrate", "--config", str(config)]) == 0
    assert main(["store", "migrate", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"applied migrations {[m.version for m in migrations()]}",
        "the schema is up to date",
    ]


def _config_file(keys: Keys, tmp_path: Path, url: str) -> Path:
    doc = config_document(keys, store=tmp_path / "unused.db", national_url="http://127.0.0.1:1")
    doc["store"]["url"] = url
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


# Exact values -------------------------------------------------------------------------


async def test_bodies_headers_and_times_come_back_exactly(instances: Opened) -> None:
    """Bytes (NUL, invalid UTF-8), header text and float times round-trip unchanged."""
    store = await instances("a")
    sent = _new(next_attempt_at=1_700_000_000.123456789)
    record = await store.insert_message(sent)
    again = await store.get_message(PORTAL_ID, sent.message_id)
    assert again == record
    assert again.request_body == sent.request_body
    assert again.next_attempt_at == 1_700_000_000.123456789
    assert again.created_at == record.created_at  # the float the chain recorded


# The outbox across instances ----------------------------------------------------------


async def test_concurrent_claims_from_two_instances_never_share_a_message(
    instances: Opened,
) -> None:
    """Claims racing on both instances (SKIP LOCKED): every message once, none twice."""
    a, b = await instances("a"), await instances("b")
    sent = [await a.insert_message(_new()) for _ in range(40)]
    now = time.time()
    rounds = await asyncio.gather(
        *(store.claim_due_messages(now, 3, 30) for _ in range(10) for store in (a, b))
    )
    claimed = [m.seq for batch in rounds for m in batch]
    assert len(claimed) == len(set(claimed))
    assert sorted(claimed) == sorted(m.seq for m in sent)


async def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(
    instances: Opened,
) -> None:
    """A dead instance's lease runs out; another takes the message; a late update from
    the first changes nothing."""
    a, b = await instances("a"), await instances("b")
    record = await a.insert_message(_new())
    now = time.time()
    assert [m.seq for m in await a.claim_due_messages(now, 10, 30)] == [record.seq]
    assert await b.claim_due_messages(now + 29, 10, 30) == []
    assert [m.seq for m in await b.claim_due_messages(now + 31, 10, 30)] == [record.seq]
    await a.set_message_state(record.seq, "dead", error="a lost its lease", attempts=9)
    await a.reschedule_message(record.seq, attempts=9, next_attempt_at=now, error="a again")
    kept = await b.get_message_by_seq(record.seq)
    assert kept is not None
    assert (kept.state, kept.attempts, kept.error) == ("delivering", 0, None)
    await b.set_message_state(record.seq, "delivered", attempts=1)
    done = await a.get_message_by_seq(record.seq)
    assert done is not None
    assert done.state == "delivered"


async def test_a_renewed_lease_is_not_taken_over(instances: Opened) -> None:
    """While a delivery runs its lease is renewed; only its owner can renew it."""
    a, b = await instances("a"), await instances("b")
    record = await a.insert_message(_new())
    now = time.time()
    await a.claim_due_messages(now, 10, 30)
    assert await b.renew_leases([record.seq], [], now + 600) == 0  # not b's to renew
    assert await a.renew_leases([record.seq], [], now + 60) == 1
    assert await b.claim_due_messages(now + 31, 10, 30) == []
    assert len(await b.claim_due_messages(now + 61, 10, 30)) == 1


async def test_an_instance_starting_never_voids_another_instance_s_leases(
    instances: Opened,
) -> None:
    """``release_leases`` at start voids only the starting instance's own leases."""
    a = await instances("a")
    record = await a.insert_message(_new())
    await a.claim_due_messages(time.time(), 10, 30)
    b = await instances("b")
    assert await b.release_leases() == 0
    assert await b.claim_due_messages(time.time(), 10, 30) == []
    assert await b.release_leases("a") == 1  # a supervisor voiding its dead worker "a"
    assert [m.seq for m in await b.claim_due_messages(time.time(), 10, 30)] == [record.seq]


async def test_callback_claims_are_fenced_too(instances: Opened) -> None:
    """A callback taken over after its lease expired is finished only by its new owner."""
    a, b = await instances("a"), await instances("b")
    original = await a.insert_message(_new())
    assert [m.seq for m in await a.claim_due_messages(time.time(), 10, 30)] == [original.seq]
    assert await a.set_message_state(original.seq, "delivered", receiver=NATIONAL_ID)
    cb = await a.insert_callback(
        NewCallback(
            message_id="cb-1",
            client=NATIONAL_ID,
            correlation_id=original.message_id,
            original_seq=original.seq,
            service=original.service,
            headers={"Gw-Client": NATIONAL_ID},
            body=b'{"decision": "approved"}',
            digest="cafe",
        )
    )
    assert cb is not None
    now = time.time() + 1
    assert [c.seq for c in await a.claim_due_callbacks(now, 10, 30)] == [cb.seq]
    assert [c.seq for c in await b.claim_due_callbacks(now + 31, 10, 30)] == [cb.seq]
    await a.finish_callback(cb.seq, state="dead", attempts=5, error="late")
    await b.finish_callback(cb.seq, state="delivered", attempts=1, error=None)
    final = await a.get_callback(NATIONAL_ID, "cb-1")
    assert final is not None
    assert (final.state, final.error) == ("delivered", None)
    message = await a.get_message_by_seq(original.seq)
    assert message is not None
    assert message.state == "callback_delivered"


async def test_new_outbox_work_wakes_the_other_instances(instances: Opened) -> None:
    """A committed batch with outbox work NOTIFYs; another instance's listener hears it."""
    a, b = await instances("a"), await instances("b")
    heard = asyncio.Event()
    await b.watch_outbox(heard.set)
    await a.insert_message(_new(mode="sync", state="received", next_attempt_at=None))
    await asyncio.sleep(0.2)
    assert not heard.is_set()  # a synchronous exchange is no outbox work
    await asyncio.gather(*(a.insert_message(_new()) for _ in range(5)))
    await asyncio.wait_for(heard.wait(), 5)


# One chain, N writers -----------------------------------------------------------------


async def test_three_instances_writing_at_once_append_one_chain_that_verifies(
    instances: Opened, keys: Keys
) -> None:
    """Concurrent batches on three instances, checkpoints signed by all three, and a
    verify running meanwhile: one chain, checkpoint ids 1..n, every record verifies."""
    stores = [await instances(f"i{n}") for n in range(3)]
    pair = keys.pairs["gateway"]

    async def work(store: PostgresStore) -> int:
        moved = 0
        for _ in range(8):
            await asyncio.gather(*(store.insert_message(_new()) for _ in range(6)))
            claimed = await store.claim_due_messages(time.time(), 6, 30)
            moves = await asyncio.gather(
                *(store.set_message_state(r.seq, "delivered", attempts=1) for r in claimed)
            )
            moved += sum(moves)
            await make_checkpoint(store, pair, GATEWAY_ID)
        return moved

    during = asyncio.gather(*(work(s) for s in stores))
    midway = await verify_store(stores[0], _jwks(keys), gateway=GATEWAY_ID)
    moved = sum(await during)
    assert moved > 0
    assert midway.ok, midway.findings
    report = await verify_store(stores[1], _jwks(keys), gateway=GATEWAY_ID)
    assert report.ok, report.findings
    assert report.records == 1 + 3 * 8 * 6 + moved
    async with stores[2].snapshot() as snap:
        ids = [cp.id for cp in await snap.checkpoints()]
        seqs = [cp.seq for cp in await snap.checkpoints()]
    assert ids == list(range(1, len(ids) + 1))
    assert len(set(seqs)) == len(seqs)  # no head signed twice


# One row per message id ---------------------------------------------------------------


async def test_one_message_id_sent_to_two_instances_at_once_is_one_row(
    pg_url: str, instances: Opened
) -> None:
    """Twenty ids, each inserted by both instances at once: one row and one duplicate each."""
    a, b = await instances("a"), await instances("b")
    ids = [str(uuid.uuid4()) for _ in range(20)]
    outcomes = await asyncio.gather(
        *(store.insert_message(_new(mid)) for mid in ids for store in (a, b)),
        return_exceptions=True,
    )
    for first, second in zip(outcomes[::2], outcomes[1::2], strict=True):
        kinds = sorted(type(o).__name__ for o in (first, second))
        assert kinds == ["DuplicateMessage", "MessageRecord"], (first, second)
    rows = await _sql(pg_url, "SELECT message_id, count(*) AS n FROM messages GROUP BY 1")
    assert sorted(r["message_id"] for r in rows) == sorted(ids)
    assert {r["n"] for r in rows} == {1}
    twin = next(o for o in outcomes if isinstance(o, MessageRecord))
    assert await b.get_message(PORTAL_ID, twin.message_id) == twin


async def test_a_deadlock_reruns_the_batch_and_its_mates_commit_once(
    pg_url: str, instances: Opened
) -> None:
    """A batch that fails with SQLSTATE 40P01 runs again; nobody sees an error."""
    store = await instances("a")
    failures: list[int] = []

    async def deadlocked_once(tx: Tx) -> str:
        if not failures:
            failures.append(1)
            await tx.conn.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$"
            )
        return "done"

    retries = store.batch.retries
    mate = _new()
    result, _ = await asyncio.gather(store.write(deadlocked_once), store.insert_message(mate))
    assert result == "done"
    assert store.batch.retries == retries + 1
    rows = await _sql(
        pg_url, "SELECT count(*) AS n FROM messages WHERE message_id = $1", mate.message_id
    )
    assert rows[0]["n"] == 1
    assert (await store.chain_head()).seq == 2  # genesis and this message, chained once


async def test_a_callback_for_no_message_is_refused_not_a_duplicate(instances: Opened) -> None:
    """A callback for a message that does not exist is refused by the state guard (None),
    neither a duplicate nor a store error."""
    store = await instances("a")
    refused = await store.insert_callback(
        NewCallback(
            message_id="orphan",
            client=NATIONAL_ID,
            correlation_id="none",
            original_seq=424242,
            service="credit.query",
            headers={},
            body=b"{}",
            digest="d",
        )
    )
    assert refused is None
    assert await store.get_callback(NATIONAL_ID, "orphan") is None


async def test_one_batch_commits_many_writes_and_a_failed_unit_undoes_only_itself(
    instances: Opened, keys: Keys
) -> None:
    """Group commit on PostgreSQL: writes of one turn share one transaction; a duplicate
    among them fails alone, after its mates committed; the chain still verifies."""
    store = await instances("a")
    existing = await store.insert_message(_new())
    batches = store.batch.batches
    twin = _new()
    outcomes = await asyncio.gather(
        *(store.insert_message(_new()) for _ in range(5)),
        store.insert_message(_new(existing.message_id)),
        store.insert_message(twin),
        store.insert_message(twin),  # twins within one batch: the first wins
        return_exceptions=True,
    )
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["MessageRecord"] * 5 + [
        "DuplicateMessage",
        "MessageRecord",
        "DuplicateMessage",
    ]
    assert store.batch.batches == batches + 1
    assert await store.count_messages() == 7
    seqs = [o.seq for o in outcomes if isinstance(o, MessageRecord)]
    assert len(set(seqs)) == 6
    assert (await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)).ok


async def test_a_cancelled_caller_s_write_still_commits(instances: Opened) -> None:
    store = await instances("a")
    new = _new()
    task = asyncio.create_task(store.insert_message(new))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):
        if await store.get_message(PORTAL_ID, new.message_id) is not None:
            break
        await asyncio.sleep(0.02)
    assert await store.get_message(PORTAL_ID, new.message_id) is not None


# Moving in ----------------------------------------------------------------------------


async def test_a_sqlite_store_imported_into_postgresql_verifies_and_goes_on(
    pg_url: str, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gateway store import --from``: every row and the chain copied; the chain verifies
    there, the next write continues it, and a second import into it is refused."""
    path = tmp_path / "old.db"
    old = SQLiteStore(path)
    await old.open()
    answered = await old.insert_message(_new())
    await old.claim_due_messages(time.time(), 10, 30)
    assert await old.set_message_state(answered.seq, "delivered", receiver=NATIONAL_ID)
    await old.insert_callback(
        NewCallback(
            message_id="cb-1",
            client=NATIONAL_ID,
            correlation_id=answered.message_id,
            original_seq=answered.seq,
            service=answered.service,
            headers={"Gw-Client": NATIONAL_ID},
            body=b'{"decision": "approved"}',
            digest="cafe",
        )
    )
    await old.insert_message(_new(mode="sync", state="received", next_attempt_at=None))
    await old.claim_due_messages(time.time() + 5, 10, 30)  # a lease with a text owner
    await old.put_resource(
        ResourceChange(kind="members", id="x", action="create", actor="t", role="admin", after={})
    )
    await make_checkpoint(old, keys.pairs["gateway"], GATEWAY_ID)
    await old.insert_message(_new())  # after the last checkpoint
    await old.close()

    config = _config_file(keys, tmp_path, pg_url)
    argv = ["store", "import", "--from", str(path), "--config", str(config)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        code = pool.submit(main, argv).result()
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.out + captured.err
    assert "messages 3, callbacks 1" in out
    assert "OK: the chain verifies in PostgreSQL (6 records)" in out

    store = PostgresStore(pg_url, instance="after")
    await store.open()
    try:
        head = await store.chain_head()
        fresh = await store.insert_message(_new())
        assert fresh.seq == 4
        assert (await store.chain_head()).seq == head.seq + 1
        assert await make_checkpoint(store, keys.pairs["gateway"], GATEWAY_ID) is not None
        report = await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)
        assert report.ok, report.findings
        assert (report.records, report.checkpoints) == (7, 2)
        assert len(await store.changes()) == 1
        assert await store.config_version() == 1  # the copied admin write's version
    finally:
        await store.close()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(main, argv).result() == 1
    assert "import into an empty database" in capsys.readouterr().err


async def test_a_released_connection_sends_no_reset_statements(
    instances: Opened, pg_url: str
) -> None:
    """Reads and writes through the pool leave no reset round trip per release behind
    (asyncpg's default: pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET ALL each)."""
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        store = await instances("lean")
        await admin.execute("SELECT pg_stat_statements_reset()")
        records = [await store.insert_message(_new()) for _ in range(5)]
        for record in records * 4:
            assert await store.get_message(PORTAL_ID, record.message_id) is not None
        rows = await admin.fetch(
            "SELECT s.query, s.calls FROM pg_stat_statements s JOIN pg_database d "
            "ON d.oid = s.dbid WHERE d.datname = current_database()"
        )
    finally:
        await admin.close()
    calls = {" ".join(str(r["query"]).split()): int(r["calls"]) for r in rows}
    reads = sum(n for q, n in calls.items() if q.startswith("SELECT") and "FROM messages" in q)
    assert reads >= 20, calls  # the statistics saw the reads
    resets = [q for q in calls if any(s in q for s in ("RESET ALL", "UNLISTEN", "unlock_all"))]
    assert resets == []
