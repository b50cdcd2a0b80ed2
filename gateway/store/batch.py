"""Group commit: the writes asked for during one turn of the event loop commit together.

Every write to the store is a *unit*, a plain function of the write connection that runs
its statements and returns a result. ``GroupCommit.run(unit)`` queues it and waits; the
first unit of a turn schedules a flush (``loop.call_soon``), so every unit queued until
that flush runs joins the same transaction::

    BEGIN IMMEDIATE          -- one write lock, one commit per batch
      unit; unit; unit ...   -- statements straight on the connection
    COMMIT                   -- then every waiter learns its result

A unit that raises rolls the batch back, and the batch runs again at once with each
unit in a savepoint: the failed unit alone gets its exception, and only after its
batch-mates committed (units are plain functions of the database, so running one again
after a rollback is running it once; savepoints on every unit of every batch would cost
two statements per write on every request, for a failure that is rare).

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
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from gateway.errors import StoreError
from gateway.store.chain import HashChain

__all__ = ["BatchObserver", "GroupCommit", "Unit", "settle"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], T]

_RETRY_FIRST_S = 0.0002
_RETRY_MAX_S = 0.004


class BatchObserver(Protocol):
    """Told about each batch (gateway/observe/metrics.py turns it into histograms)."""

    def committed(self, units: int, seconds: float) -> None:
        """A batch of ``units`` committed; ``seconds`` from BEGIN to COMMIT (the loop's
        time spent in it)."""

    def busy(self) -> None:
        """A flush was put off: another process held the write lock."""


def settle(
    batch: Sequence[tuple[Any, asyncio.Future[Any]]],
    outcomes: Sequence[tuple[Any, Exception | None]],
    observer: BatchObserver | None,
    started: float,
) -> None:
    """After a batch's COMMIT: each waiter learns its unit's result or failure, and the
    observer the batch (both group commits, this one and pgcommit.py's)."""
    for (_, future), (result, failure) in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if failure is None:
            future.set_result(result)
        else:
            future.set_exception(failure)
    if observer is not None:
        try:
            observer.committed(len(batch), time.perf_counter() - started)
        except Exception:  # metrics must never break the store
            log.exception("the batch observer failed")


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
        self._careful = False  # the next batch runs each unit in a savepoint
        self._later = False  # the last busy BEGIN rescheduled the flush

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
        self._fail(self._take(), "the store is closed")

    def _take(self) -> list[tuple[Unit[Any], asyncio.Future[Any]]]:
        batch, self._pending = self._pending, []
        return batch

    @staticmethod
    def _fail(
        batch: list[tuple[Unit[Any], asyncio.Future[Any]]],
        reason: str,
        cause: BaseException | None = None,
    ) -> None:
        for _, future in batch:
            if not future.done():
                error = StoreError(reason)  # one each: a shared one would pile up tracebacks
                error.__cause__ = cause
                future.set_exception(error)

    def _begin(self) -> sqlite3.Error | None:
        """``BEGIN IMMEDIATE``: None once begun, else the error (the flush is already
        rescheduled when it was the lock, see ``_later``)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._later = _busy(exc) and self._wait_for_lock()
            if not self._later:
                self._busy_since = None
            return exc
        self._busy_since, self._retry_s = None, _RETRY_FIRST_S
        return None

    def _rollback(self, head: Any) -> None:
        if self._db.in_transaction:  # SQLite may have rolled back already (disk full, I/O)
            self._db.execute("ROLLBACK")
        self._chain.head = head

    def _flush(self) -> None:
        self._handle = None
        if not self._pending:
            return
        error = self._begin()
        if error is not None:
            if not self._later:
                self._fail(self._take(), f"store write failed: {error}", error)
            return
        started = time.perf_counter()
        careful, self._careful = self._careful, False
        batch = self._take()
        head = self._chain.head
        try:
            outcomes = self._run(batch, careful)
            if outcomes is None:
                # A unit failed (a duplicate id, rarely anything else). Its error must not
                # reach its caller before its batch-mates have committed (a twin's insert
                # is what made it a duplicate), so the batch runs again, each unit in a
                # savepoint; every caller then learns its outcome after that COMMIT.
                self._rollback(head)
                error = self._begin()
                if error is not None:
                    if not self._later:
                        raise error
                    self._pending[:0] = batch  # the lock went elsewhere: next time, carefully
                    self._careful = True
                    return
                outcomes = self._run(batch, careful=True)
                assert outcomes is not None
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._rollback(head)
            self._chain.head = head
            reason = exc.detail if isinstance(exc, StoreError) else f"store write failed: {exc}"
            self._fail(batch, reason, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.units += len(batch)
        settle(batch, outcomes, self.observer, started)

    def _run(
        self, batch: list[tuple[Unit[Any], asyncio.Future[Any]]], careful: bool
    ) -> list[tuple[Any, Exception | None]] | None:
        """Run every unit; None when one raised (not careful: stop at the first failure).

        Careful, each unit runs in a savepoint, and a failure undoes that unit only."""
        db, chain = self._db, self._chain
        outcomes: list[tuple[Any, Exception | None]] = []
        for unit, _ in batch:
            if not careful:
                try:
                    outcomes.append((unit(db), None))
                except Exception:
                    return None
                continue
            unit_head = chain.head
            db.execute("SAVEPOINT unit")
            try:
                outcomes.append((unit(db), None))
            except Exception as exc:
                if not db.in_transaction:
                    raise  # SQLite rolled everything back (disk full, I/O): the batch fails
                db.execute("ROLLBACK TO unit")
                chain.head = unit_head
                outcomes.append((None, exc))
            db.execute("RELEASE unit")
        return outcomes

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
