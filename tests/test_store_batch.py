"""Group commit (gateway/store/batch.py) on real SQLite files.

One transaction per loop turn, a failed unit undoes only itself, a failed commit fails
every waiter and leaves nothing behind, and a lock held by another connection never
freezes the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StoreError
from gateway.store import DuplicateMessage, NewCallback, NewMessage
from gateway.store.batch import GroupCommit
from gateway.store.chain import MIGRATION as CHAIN_SCHEMA
from gateway.store.chain import HashChain
from gateway.store.sqlite import SQLiteStore
from tests.conftest import verify_file

PORTAL = "330000:one-stop-portal"
_BODY = b'{"uscc": "x"}'
_DIGEST = hashlib.sha256(_BODY).hexdigest()


def _new(message_id: str | None = None) -> NewMessage:
    return NewMessage(
        message_id=message_id or str(uuid.uuid4()),
        client=PORTAL,
        service="credit.query",
        mode="async",
        state="accepted",
        request_headers={"Gw-Client": PORTAL},
        request_body=_BODY,
        request_digest=_DIGEST,
        next_attempt_at=time.time() + 3600,
    )


@contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection to the same file, as another worker or the CLI would have."""
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        yield db
    finally:
        db.close()


_COUNTS = {
    "messages": "SELECT COUNT(*) FROM messages",
    "callbacks": "SELECT COUNT(*) FROM callbacks",
}


def _count(path: Path, table: str = "messages") -> int:
    with _connect(path) as db:
        return int(db.execute(_COUNTS[table]).fetchone()[0])


def _chain_ok(path: Path) -> bool:
    return verify_file(path, {"keys": []}).ok


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "gateway.db")
    await s.open()
    yield s
    await s.close()


async def test_writes_of_one_turn_share_one_commit_and_are_committed_when_awaited(
    store: SQLiteStore,
) -> None:
    """Twenty inserts started together: one transaction; each caller then sees its row
    from another connection (accepted means committed)."""
    batches = store.batch.batches
    records = await asyncio.gather(*(store.insert_message(_new()) for _ in range(20)))
    assert store.batch.batches == batches + 1
    assert _count(store.path) == 20
    assert sorted(r.seq for r in records) == list(range(1, 21))
    assert _chain_ok(store.path)


async def test_a_failed_unit_undoes_only_itself(store: SQLiteStore) -> None:
    """A duplicate in the middle of a batch fails alone; its neighbours, rolled back with
    it, run again in the next batch and commit; the chain has no record of the duplicate."""
    first = await store.insert_message(_new())
    head, batches = store.chain.head, store.batch.batches
    outcomes = await asyncio.gather(
        store.insert_message(_new()),
        store.insert_message(_new(first.message_id)),
        store.insert_message(_new()),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], DuplicateMessage)
    assert not any(isinstance(o, BaseException) for o in (outcomes[0], outcomes[2]))
    assert _count(store.path) == 3
    assert store.chain.head.seq == head.seq + 2
    assert store.batch.batches == batches + 1  # the rolled-back one is not counted
    assert _chain_ok(store.path)


async def test_a_failed_commit_fails_every_waiter_and_keeps_nothing(store: SQLiteStore) -> None:
    """A deferred foreign-key violation fails at COMMIT: the whole batch rolls back, every
    caller gets StoreError, the in-memory chain head returns to the stored one."""
    head = store.chain.head
    orphan = NewCallback(
        message_id="cb-orphan",
        client=PORTAL,
        correlation_id="nobody",
        original_seq=999_999,
        service="credit.query",
        headers={},
        body=b"{}",
        digest="cafe",
    )

    def defer(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA defer_foreign_keys=ON")

    def orphan_row(db: sqlite3.Connection) -> None:  # a callback row for no message
        db.execute(
            "INSERT INTO callbacks (message_id, client, correlation_id, original_seq, service, "
            "headers, body, digest, state, created_at, updated_at) "
            "VALUES (?,?,?,?,?,'{}',?,?,'pending',0,0)",
            (
                orphan.message_id,
                orphan.client,
                orphan.correlation_id,
                orphan.original_seq,
                orphan.service,
                orphan.body,
                orphan.digest,
            ),
        ).close()

    async def orphan_insert() -> Any:
        return await store.write(orphan_row)

    outcomes = await asyncio.gather(
        store.insert_message(_new()),
        store.write(defer),
        orphan_insert(),
        return_exceptions=True,
    )
    assert all(isinstance(o, StoreError) for o in outcomes), outcomes
    assert _count(store.path) == 0
    assert _count(store.path, "callbacks") == 0
    assert store.chain.head == head
    await store.insert_message(_new())  # and the store goes on
    assert _count(store.path) == 1
    assert _chain_ok(store.path)


async def test_a_lock_held_elsewhere_delays_the_write_but_never_the_loop(
    store: SQLiteStore,
) -> None:
    """Another connection holds the write lock for 300 ms: our insert waits for it, the
    loop keeps turning (no tick is late by more than 50 ms; SQLite's busy handler would
    have slept the whole time), and the writes queued meanwhile commit together."""
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    with _connect(store.path) as other:
        other.execute("BEGIN IMMEDIATE")
        stop = asyncio.Event()
        ticking = asyncio.create_task(ticker(stop))
        retries = store.batch.busy_retries
        writes = [asyncio.create_task(store.insert_message(_new())) for _ in range(3)]
        await asyncio.sleep(0.1)
        writes += [asyncio.create_task(store.insert_message(_new())) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert not any(w.done() for w in writes)
        batches = store.batch.batches
        other.execute("COMMIT")
        await asyncio.gather(*writes)
        stop.set()
        await ticking
    assert store.batch.batches == batches + 1
    assert store.batch.busy_retries > retries
    assert max(gaps) < 0.05, max(gaps)
    assert _count(store.path) == 6


async def test_a_lock_never_released_fails_the_batch_after_the_busy_timeout(
    tmp_path: Path,
) -> None:
    """GroupCommit gives up after ``busy_timeout_s`` with StoreError, then works again."""
    path = tmp_path / "busy.db"
    with _connect(path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.executescript(CHAIN_SCHEMA)
        setup.execute("CREATE TABLE t (x INTEGER)")
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    batch = GroupCommit(writer, HashChain(), busy_timeout_s=0.1)
    try:
        with _connect(path) as other:
            other.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            with pytest.raises(StoreError, match="locked"):
                await batch.run(lambda db: db.execute("INSERT INTO t VALUES (1)").close())
            assert 0.1 <= time.monotonic() - started < 1.0
            other.execute("ROLLBACK")
        await batch.run(lambda db: db.execute("INSERT INTO t VALUES (2)").close())
        assert [r[0] for r in writer.execute("SELECT x FROM t")] == [2]
    finally:
        batch.close()
        writer.close()


async def test_a_cancelled_caller_s_write_still_commits(store: SQLiteStore) -> None:
    """The write was asked for: cancelling the waiter does not take it back."""
    message = _new()
    waiter = asyncio.create_task(store.insert_message(message))
    await asyncio.sleep(0)  # queued, flush scheduled
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await store.ping()  # the next batch runs after the first one
    found = await store.get_message(PORTAL, message.message_id)
    assert found is not None
    assert found.state == "accepted"


async def test_two_stores_on_one_file_interleave_without_forking_the_chain(
    tmp_path: Path,
) -> None:
    """Two workers' stores write in the same turns: each batch reads the head under the
    lock, so the chain stays one line."""
    path = tmp_path / "two.db"
    a, b = SQLiteStore(path), SQLiteStore(path)
    await a.open()
    await b.open()
    try:
        for _ in range(5):
            await asyncio.gather(
                *(a.insert_message(_new()) for _ in range(4)),
                *(b.insert_message(_new()) for _ in range(4)),
            )
    finally:
        await a.close()
        await b.close()
    assert _count(path) == 40
    assert _chain_ok(path)


async def test_closing_fails_what_is_still_queued(tmp_path: Path) -> None:
    """A unit queued when the store closes gets StoreError, not a hang."""
    path = tmp_path / "closing.db"
    with _connect(path) as setup:
        setup.executescript(CHAIN_SCHEMA)
        setup.execute("CREATE TABLE t (x INTEGER)")
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    batch = GroupCommit(writer, HashChain())
    pending = asyncio.create_task(batch.run(lambda db: db.execute("INSERT INTO t VALUES (1)")))
    await asyncio.sleep(0)  # queued, its flush scheduled but not run
    batch.close()
    with pytest.raises(StoreError, match="closed"):
        await pending
    writer.close()


def _wal_frames(path: Path) -> int:
    with _connect(path) as db:
        return int(db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


async def test_a_grown_wal_is_started_again_by_the_checkpointer(store: SQLiteStore) -> None:
    """Past WAL_RESTART_PAGES the checkpoint restarts the WAL, so the next write begins it
    again. Under load a passive checkpoint alone never does: a reader's snapshot (here a
    report's open transaction) stops it short, and writes go on appending."""
    store.WAL_RESTART_PAGES = 32
    for _ in range(5):
        await asyncio.gather(*(store.insert_message(_new()) for _ in range(20)))
    reader = sqlite3.connect(store.path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchone()  # pins its snapshot
        await asyncio.gather(*(store.insert_message(_new()) for _ in range(20)))
        asyncio.get_running_loop().call_later(0.01, reader.execute, "COMMIT")
        await store.checkpoint()  # RESTART waits (up to 50 ms) for the report to end
    finally:
        reader.close()
    await store.insert_message(_new())
    assert _wal_frames(store.path) < 16  # started again from its first frame
    assert _count(store.path) == 121


async def test_a_duplicate_learns_so_only_once_its_twin_is_committed(store: SQLiteStore) -> None:
    """Two inserts of one message id in one batch: the loser's DuplicateMessage arrives
    when the winner's row is already readable (the pipeline answers it as a replay)."""
    message = _new()
    seen: list[object] = []

    async def insert() -> str:
        try:
            await store.insert_message(message)
        except DuplicateMessage:
            seen.append(await store.get_message(PORTAL, message.message_id))
            return "duplicate"
        return "inserted"

    assert sorted(await asyncio.gather(insert(), insert())) == ["duplicate", "inserted"]
    assert len(seen) == 1
    assert seen[0] is not None
    assert _chain_ok(store.path)


async def test_a_batch_sqlite_rolled_back_itself_fails_with_its_own_cause(tmp_path: Path) -> None:
    """Disk full makes SQLite roll the transaction back by itself: every waiter gets a
    StoreError naming the real cause, not "no transaction is active"; the store goes on."""
    store = SQLiteStore(tmp_path / "full.db")
    await store.open()
    try:
        pages = int(store.writer.execute("PRAGMA page_count").fetchone()[0])
        store.writer.execute(f"PRAGMA max_page_count={pages + 2}")
        big = [_new() for _ in range(40)]
        for m in big:
            object.__setattr__(m, "request_body", b"x" * 8000)
        outcomes = await asyncio.gather(
            *(store.insert_message(m) for m in big), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, StoreError)]
        assert failures
        assert all("full" in str(f) for f in failures), failures
        store.writer.execute("PRAGMA max_page_count=1073741823")
        await store.insert_message(_new())
    finally:
        await store.close()


async def test_a_reader_that_never_ends_holds_the_restart_up_50_ms_not_seconds(
    store: SQLiteStore,
) -> None:
    """RESTART holds the write lock while it waits for old readers: it gives up after
    50 ms (SQLite's default wait was 5 s of every writer blocked, every second)."""
    store.WAL_RESTART_PAGES = 32
    for _ in range(5):
        await asyncio.gather(*(store.insert_message(_new()) for _ in range(20)))
    reader = sqlite3.connect(store.path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchone()
        await store.insert_message(_new())  # a frame the reader's snapshot lacks
        started = time.monotonic()
        await store.checkpoint()
        assert time.monotonic() - started < 1.0
        await store.insert_message(_new())  # writers were not shut out
    finally:
        reader.close()
    assert _count(store.path) == 102
