"""Group commit on PostgreSQL: the writes asked for while a batch is in flight commit together.

The same contract as SQLite's ``GroupCommit`` (batch.py): every write is a *unit*, here an
async function of a ``Tx``; ``run(unit)`` queues it and waits, and the caller resumes only
after the ``COMMIT`` of the transaction that holds it. The first unit of a turn starts a
flush task; every unit queued before that task runs, and every unit queued while its
transaction is in flight (the next batch), joins one transaction::

    BEGIN
      unit; unit; unit ...                       -- their own rows; chain events queued
      SELECT seq, hash FROM log_head FOR UPDATE  -- the one chain, locked only now
      INSERT INTO log_chain SELECT * FROM unnest(...) ; UPDATE log_head
      NOTIFY gateway_outbox                      -- once, if the batch made outbox work
    COMMIT

Units never append to the chain themselves: they queue their events on the ``Tx`` and the
batch hashes and inserts them at the end, under the head row's lock, so N instances
append one chain and the lock is held for two statements and the commit, not for the
whole batch.

A unit that raises rolls the batch back, which runs again with each unit in a savepoint
(asyncpg's nested transaction): the failed unit alone gets its error, after its
batch-mates committed. A deadlock (40P01) or serialization failure (40001) runs the
whole batch again, a few times, before it fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.errors import StoreError
from gateway.store.batch import BatchObserver
from gateway.store.chain import canonical, content_digest, link

__all__ = ["OUTBOX_CHANNEL", "Conn", "PgGroupCommit", "PgUnit", "Tx", "numbered"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")
# A connection of its own, or one lent by the pool.
Conn = asyncpg.Connection | PoolConnectionProxy
OUTBOX_CHANNEL = "gateway_outbox"
RETRIES = 8
_RETRYABLE = ("40P01", "40001")


@functools.lru_cache(maxsize=2048)
def numbered(sql: str) -> str:
    """The body's ``?`` placeholders as PostgreSQL's ``$1, $2 …`` (once per statement)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], 1))


@functools.lru_cache(maxsize=64)
def _insert_many_sql(table: str, columns: tuple[tuple[str, str], ...], key: str) -> str:
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"${n}::{kind}[]" for n, (_, kind) in enumerate(columns, 1))
    return (
        f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({key}) DO NOTHING RETURNING seq, {key}"
    )


class Tx:
    """What a unit sees: the batch's connection, and where it queues chain events.

    The body's units (gateway/store/body.py) use the methods below (``?`` placeholders);
    ``conn`` is the connection itself, for PostgreSQL-only statements."""

    __slots__ = ("conn", "events", "wake")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.events: list[tuple[str, int | None, float, dict[str, Any]]] = []
        self.wake = False  # the batch made outbox work: NOTIFY other instances

    def chain(self, kind: str, ref: int | None, at: float, **facts: Any) -> None:
        self.events.append((kind, ref, at, facts))

    async def execute(self, sql: str, *params: Any) -> int:
        status: str = await self.conn.execute(numbered(sql), *params)
        tail = status.rsplit(" ", 1)[-1]  # a command tag: ``UPDATE 3``, ``INSERT 0 1``
        return int(tail) if tail.isdigit() else 0

    async def fetch(self, sql: str, *params: Any) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(numbered(sql), *params))

    async def fetchrow(self, sql: str, *params: Any) -> asyncpg.Record | None:
        return await self.conn.fetchrow(numbered(sql), *params)

    async def fetchval(self, sql: str, *params: Any) -> Any:
        return await self.conn.fetchval(numbered(sql), *params)

    async def insert_many(
        self,
        table: str,
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
        key: str,
    ) -> list[int | None]:
        """One statement for every row (``unnest`` of one array a column)."""
        found = await self.conn.fetch(
            _insert_many_sql(table, tuple(columns), key),
            *([row[n] for row in rows] for n in range(len(columns))),
        )
        keys = [k.strip() for k in key.split(",")]
        at = [[name for name, _ in columns].index(k) for k in keys]
        inserted = {tuple(r[k] for k in keys): int(r["seq"]) for r in found}
        # A twin later in the batch finds its key taken by the earlier one (popped).
        return [inserted.pop(tuple(row[n] for n in at), None) for row in rows]

    async def notify(self, channel: str, payload: str) -> None:
        await self.conn.execute("SELECT pg_notify($1, $2)", channel, payload)


PgUnit = Callable[[Tx], Awaitable[T]]


class _UnitFailed(Exception):
    pass


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and exc.sqlstate in _RETRYABLE


class PgGroupCommit:
    """Batches units into transactions on connections from ``pool``.

    Up to ``IN_FLIGHT`` batches run at once, each on its own connection: a batch spends
    most of its time waiting for round trips, so while one waits for its COMMIT the next
    runs its statements. They serialise only at
    the chain's head row, which each takes just before its COMMIT."""

    IN_FLIGHT = 3

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._pending: list[tuple[PgUnit[Any], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0
        self.units = 0
        self.retries = 0  # batches run again after a deadlock or serialization failure
        self.observer: BatchObserver | None = None
        self._starting = False  # a flush is scheduled for this loop turn

    async def run(self, unit: PgUnit[T]) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((unit, future))
        if len(self._flushes) < self.IN_FLIGHT and not self._starting:
            self._starting = True
            loop.call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        self._starting = False
        if not self._pending or len(self._flushes) >= self.IN_FLIGHT:
            return
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._commit(batch), name="group-commit")
        self._flushes.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if self._pending and not self._starting:
            self._starting = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    async def close(self) -> None:
        self._closed = True
        # Let what was queued commit; no new unit is accepted.
        while self._flushes or (self._pending and self._starting):
            await asyncio.gather(*self._flushes, return_exceptions=True)
            await asyncio.sleep(0)
        for _, future in self._pending:
            if not future.done():
                future.set_exception(StoreError("the store is closed"))
        self._pending = []

    async def _commit(self, batch: list[tuple[PgUnit[Any], asyncio.Future[Any]]]) -> None:
        started = time.perf_counter()
        careful = False
        attempt = 0
        while True:
            try:
                outcomes = await self._attempt(batch, careful)
                break
            except _UnitFailed:
                careful = True
            except Exception as exc:
                attempt += 1
                if _retryable(exc) and attempt < RETRIES:
                    self.retries += 1
                    await asyncio.sleep(0.001 * attempt)
                    continue
                reason = exc.detail if isinstance(exc, StoreError) else f"store write failed: {exc}"
                for _, future in batch:
                    if not future.done():
                        error = StoreError(reason)
                        error.__cause__ = exc
                        future.set_exception(error)
                return
        self.batches += 1
        self.units += len(batch)
        for (_, future), (result, failure) in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if failure is None:
                future.set_result(result)
            else:
                future.set_exception(failure)
        if self.observer is not None:
            try:
                self.observer.committed(len(batch), time.perf_counter() - started)
            except Exception:  # metrics must never break the store
                log.exception("the batch observer failed")

    async def _attempt(
        self, batch: list[tuple[PgUnit[Any], asyncio.Future[Any]]], careful: bool
    ) -> list[tuple[Any, Exception | None]]:
        outcomes: list[tuple[Any, Exception | None]] = []
        async with self._pool.acquire() as conn, conn.transaction():
            tx = Tx(conn)
            together = {} if careful else await self._together(tx, batch)
            for n, (unit, _) in enumerate(batch):
                if n in together:
                    outcomes.append((together[n], None))
                    continue
                if not careful:
                    try:
                        outcomes.append((await unit(tx), None))
                    except Exception as exc:
                        if _retryable(exc) or isinstance(exc, OSError | asyncpg.InterfaceError):
                            raise
                        raise _UnitFailed from exc
                    continue
                mark, wake = len(tx.events), tx.wake
                try:
                    async with conn.transaction():  # a savepoint
                        outcomes.append((await unit(tx), None))
                except Exception as exc:
                    if _retryable(exc) or isinstance(exc, OSError | asyncpg.InterfaceError):
                        raise
                    del tx.events[mark:]
                    tx.wake = wake
                    outcomes.append((None, exc))
            if tx.events:
                await append_events(conn, tx.events)
            if tx.wake:
                await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        return outcomes

    @staticmethod
    async def _together(
        tx: Tx, batch: list[tuple[PgUnit[Any], asyncio.Future[Any]]]
    ) -> dict[int, Any]:
        """Run the batch's units that can share one statement (a ``run_many`` of their
        class, when there are several of a class); their results by position."""
        kinds: dict[Any, list[int]] = {}
        for n, (unit, _) in enumerate(batch):
            if hasattr(type(unit), "run_many"):
                kinds.setdefault(type(unit), []).append(n)
        results: dict[int, Any] = {}
        for kind, positions in kinds.items():
            if len(positions) < 2:
                continue
            try:
                values = await kind.run_many(tx, [batch[n][0] for n in positions])
            except Exception as exc:
                if _retryable(exc) or isinstance(exc, OSError | asyncpg.InterfaceError):
                    raise
                raise _UnitFailed from exc
            results.update(zip(positions, values, strict=True))
        return results


async def append_events(
    conn: Conn, events: list[tuple[str, int | None, float, dict[str, Any]]]
) -> tuple[int, str]:
    """Hash and insert ``events`` after the head, under the head row's lock; the new head.

    Runs inside the caller's transaction, which holds the lock until it ends."""
    head = await conn.fetchrow("SELECT seq, hash FROM log_head FOR UPDATE")
    if head is None:
        raise StoreError("the message log has no head row (run gateway store migrate)")
    seq, prev = int(head["seq"]), str(head["hash"])
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
    for kind, ref, at, facts in events:
        seq += 1
        text = canonical({"kind": kind, "seq": seq, "ref": ref, "at": at, **facts})
        digest = content_digest(text)
        new = link(prev, digest)
        for column, value in zip(
            columns, (seq, at, kind, ref, text, digest, prev, new), strict=True
        ):
            column.append(value)
        prev = new
    await conn.execute(
        "WITH added AS (INSERT INTO log_chain (seq, at, kind, ref, facts, content_digest, "
        "prev_hash, hash) SELECT * FROM unnest($1::bigint[], $2::float8[], $3::text[], "
        "$4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[])) "
        "UPDATE log_head SET seq = $9, hash = $10",
        *columns,
        seq,
        prev,
    )
    return seq, prev
