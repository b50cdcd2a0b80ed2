"""Group commit: the writes asked for during one turn of the event loop commit together.

Every write to the store is a *unit*, a plain function of the write connection that runs
its statements and returns a result. ``GroupCommit.run(unit)`` queues it and waits; the
first unit of a turn schedules a flush (``loop.call_soon``), so every unit queued until
that flush runs joins the same transaction::

    BEGIN IMMEDIATE                      -- one write lock, one commit per batch
      SAVEPOINT unit  ...  RELEASE unit  -- each unit: all or nothing on its own
      SAVEPOINT unit  ...  ROLLBACK TO unit; RELEASE unit   -- a failed unit undoes itself
    COMMIT                               -- then every waiter learns its result

A caller's ``await`` returns only after ``COMMIT``: "accepted means committed" holds,
with one commit (and with ``synchronous=FULL``, one fsync) shared by every request of
the turn instead of one each.

The flush runs on the loop, as every statement here does (no thread: a thread per batch
would wait for the GIL behind a busy loop). It never waits for another process's lock:
the write connection has no busy handler (SQLite's sleeps 1, 2, 5 … 100 ms with the loop
frozen, which is what stalled a worker whenever another held the lock), so a busy
``BEGIN IMMEDIATE`` reschedules the flush a fraction of a millisecond later while the
loop goes on; the units queued meanwhile join the batch. After ``busy_timeout_s`` of
that, the batch fails with ``StoreError``.

A unit queued by a caller that is then cancelled still runs: the write was asked for and
may already be half the story (a recorded message whose answer will never be sent is an
accepted message; the outbox or a replay completes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.errors import StoreError
from gateway.store.chain import HashChain

__all__ = ["GroupCommit", "Unit"]

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], T]

_RETRY_FIRST_S = 0.0002
_RETRY_MAX_S = 0.004


def _busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


class GroupCommit:
    """Batches units into one transaction per loop turn on ``db`` (the write connection).

    ``chain`` is the message log's hash chain: its head is read again under the write
    lock at the start of each batch (another process may have appended) and put back
    when a unit or the batch rolls back.
    """

    def __init__(
        self, db: sqlite3.Connection, chain: HashChain, *, busy_timeout_s: float = 10.0
    ) -> None:
        self._db = db
        self._chain = chain
        self._busy_timeout_s = busy_timeout_s
        self._pending: list[tuple[Unit[Any], asyncio.Future[Any]]] = []
        self._handle: asyncio.Handle | None = None
        self._busy_since: float | None = None
        self._retry_s = _RETRY_FIRST_S
        self.batches = 0  # committed transactions
        self.units = 0  # units committed in them
        self.busy_retries = 0  # flushes put off because another process held the lock

    async def run(self, unit: Unit[T]) -> T:
        """Run ``unit`` in the next batch; its result once the batch has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((unit, future))
        if self._handle is None:
            self._handle = loop.call_soon(self._flush)
        return await future

    def close(self) -> None:
        """Fail whatever is still queued (the store is closing)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._fail(self._take(), StoreError("the store is closed"))

    def _take(self) -> list[tuple[Unit[Any], asyncio.Future[Any]]]:
        batch, self._pending = self._pending, []
        return batch

    @staticmethod
    def _fail(batch: list[tuple[Unit[Any], asyncio.Future[Any]]], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    def _flush(self) -> None:
        self._handle = None
        if not self._pending:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _busy(exc) and self._wait_for_lock():
                return
            self._busy_since = None
            self._fail(self._take(), StoreError(f"store write failed: {exc}"))
            return
        self._busy_since, self._retry_s = None, _RETRY_FIRST_S
        batch = self._take()
        try:
            outcomes = self._run_batch(batch)
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error, StoreError):
                self._chain.load(self._db)
            failure = (
                exc if isinstance(exc, StoreError) else StoreError(f"store write failed: {exc}")
            )
            self._fail(batch, failure)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.units += len(batch)
        for future, result, error in outcomes:
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _run_batch(
        self, batch: list[tuple[Unit[Any], asyncio.Future[Any]]]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        db, chain = self._db, self._chain
        chain.load(db)  # under the write lock: the real head, whoever appended last
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for unit, future in batch:
            head = chain.head
            db.execute("SAVEPOINT unit")
            try:
                result = unit(db)
            except Exception as exc:
                db.execute("ROLLBACK TO unit")
                db.execute("RELEASE unit")
                chain.head = head
                outcomes.append((future, None, exc))
            else:
                db.execute("RELEASE unit")
                outcomes.append((future, result, None))
        return outcomes

    def _wait_for_lock(self) -> bool:
        """Try again shortly, unless the lock has been busy for too long."""
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
        elif now - self._busy_since > self._busy_timeout_s:
            return False
        self.busy_retries += 1
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self._retry_s, self._flush)
        self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
        return True
