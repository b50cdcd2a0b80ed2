"""Group commit: the writes asked for during one turn of the event loop commit together.

Every write to the store is a *unit*, a plain function of the write connection that runs
its statements and returns a result. ``GroupCommit.run(unit)`` queues it and waits; the
first unit of a turn schedules a flush (``loop.call_soon``), so every unit queued until
that flush runs joins the same transaction::

    BEGIN IMMEDIATE          -- one write lock, one commit per batch
      unit; unit; unit ...   -- statements straight on the connection
    COMMIT                   -- then every waiter learns its result

A unit that raises rolls the batch back: it alone gets its exception, the others run
again in the next turn's batch (units are plain functions of the database, so running
one again after a rollback is running it once).

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
from typing import Any, Protocol, TypeVar

from gateway.errors import StoreError
from gateway.store.chain import HashChain

__all__ = ["BatchObserver", "GroupCommit", "Unit"]

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], T]

_RETRY_FIRST_S = 0.0002
_RETRY_MAX_S = 0.004


class BatchObserver(Protocol):
    """Told about each batch (gateway/metrics.py turns it into histograms)."""

    def committed(self, units: int, seconds: float) -> None:
        """A batch of ``units`` committed; ``seconds`` from BEGIN to COMMIT (the loop's
        time spent in it)."""

    def busy(self) -> None:
        """A flush was put off: another process held the write lock."""


def _busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


class GroupCommit:
    """Batches units into one transaction per loop turn on ``db`` (the write connection).

    ``chain`` is the message log's hash chain: its in-memory head is put back when a
    batch rolls back (when another process appended meanwhile, ``HashChain.append``
    finds out by its sequence number and reads the head again, under our lock).
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
        self.observer: BatchObserver | None = None

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
        db, chain = self._db, self._chain
        started = time.perf_counter()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _busy(exc) and self._wait_for_lock():
                return
            self._busy_since = None
            self._fail(self._take(), StoreError(f"store write failed: {exc}"))
            return
        self._busy_since, self._retry_s = None, _RETRY_FIRST_S
        batch = self._take()
        head = chain.head
        results: list[Any] = []
        try:
            for unit, future in batch:
                try:
                    results.append(unit(db))
                except Exception as exc:
                    # Undo the whole batch, fail this unit, run the others again next turn
                    # (a failure is rare: a duplicate id; savepoints around every unit
                    # would cost two statements each on every request instead).
                    db.execute("ROLLBACK")
                    chain.head = head
                    if not future.done():
                        future.set_exception(exc)
                    rest = [item for item in batch if item[1] is not future]
                    self._pending[:0] = rest
                    self._handle = asyncio.get_running_loop().call_soon(self._flush)
                    return
            db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            chain.head = head
            failure = (
                exc if isinstance(exc, StoreError) else StoreError(f"store write failed: {exc}")
            )
            self._fail(batch, failure)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.units += len(batch)
        if self.observer is not None:
            self.observer.committed(len(batch), time.perf_counter() - started)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _wait_for_lock(self) -> bool:
        """Try again shortly, unless the lock has been busy for too long."""
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
        elif now - self._busy_since > self._busy_timeout_s:
            return False
        self.busy_retries += 1
        if self.observer is not None:
            self.observer.busy()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self._retry_s, self._flush)
        self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
        return True
