"""The shared store: PostgreSQL through asyncpg, for several instances on one database.

The same ``Store`` as SQLite (sqlite.py) with the same group commit (pgcommit.py: one
transaction per batch, callers resume after COMMIT). What several instances need:

- migrations are numbered SQL files (``migrations/NNNN_name.sql``) recorded with their
  checksums in ``schema_migrations``, applied under an advisory lock (three instances
  started at once: one migrates, the others wait and find nothing to do); a database
  migrated by newer code, or whose applied files changed, is refused;
- the outbox is claimed with ``FOR UPDATE SKIP LOCKED`` under leases that expire and
  are renewed while a delivery runs; every delivery-side update is fenced by the lease
  owner, so an instance whose lease was taken over changes nothing;
- one hash chain: each batch locks the head row only at its end (pgcommit.py);
- duplicates are ``ON CONFLICT DO NOTHING`` or SQLSTATE 23505, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib import resources
from typing import Any, TypeVar

import asyncpg

from gateway.errors import StoreError
from gateway.secretstore import DataKey, SecretBox
from gateway.states import CallbackState, MessageState
from gateway.store import (
    FORWARD,
    IN_OUTBOX,
    TAKES_CALLBACK,
    TAKES_LATER_DECISION,
    CallbackRecord,
    ChangeRecord,
    ConfigConflict,
    Credential,
    DeadLetter,
    DuplicateMessage,
    MessageEvent,
    MessageRecord,
    NewCallback,
    NewMessage,
    Rejection,
    RejectionRecord,
    ResourceChange,
    Signer,
    TokenNameTaken,
    TokenRecord,
    sql_state,
)
from gateway.store.archived import ArchiveMark, mark_of
from gateway.store.batch import BatchObserver
from gateway.store.chain import GENESIS, ChainRow, CheckpointRow, Head, body_digest
from gateway.store.pgcommit import OUTBOX_CHANNEL, Conn, PgGroupCommit, PgUnit, Tx, append_events
from gateway.store.rows import accepted_record, callback_record, message_record
from gateway.store.sealing import opened_changes, opened_overlay, sealed_change

__all__ = ["MIGRATION_LOCK", "Migration", "PostgresStore", "SchemaTooNew", "migrations"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")
MIGRATION_LOCK = 0x6777_6D69  # pg_advisory_lock key: "gwmi"
CONFIG_CHANNEL = "gateway_config"  # NOTIFY: an admin write committed (gateway/live.py)
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_IN_OUTBOX = IN_OUTBOX
_FROM = FORWARD  # state → the states it may follow (gateway.states)
# A delivery-side update lands only while this instance holds the row's lease. Never
# ``lease_owner IS NULL``: that is a lease voided (release_leases) or never taken, and an
# instance whose lease was voided must change nothing.
_FENCE = "lease_owner = {}"
_ACCEPTED = sql_state(MessageState.ACCEPTED)
_DELIVERING = sql_state(MessageState.DELIVERING)
_ANSWERED = sql_state(MessageState.ANSWERED)
_CALLBACK_DELIVERED = sql_state(MessageState.CALLBACK_DELIVERED)
_DEAD = sql_state(MessageState.DEAD)
_PENDING = sql_state(CallbackState.PENDING)
_CB_DEAD = sql_state(CallbackState.DEAD)
# A message's decisions go out one after another, in the order they came (supersede).
_FIRST_PENDING = (
    "NOT EXISTS (SELECT 1 FROM callbacks e WHERE e.original_seq = c.original_seq "
    f"AND e.seq < c.seq AND e.state = {_PENDING})"
)

_MESSAGE_COLUMNS = (
    "seq, message_id, client, service, mode, state, target, adapter, request_headers, "
    "request_body, request_digest, status, code, response_headers, response_body, result, "
    "error, attempts, next_attempt_at, created_at, updated_at, timings, trace_id, receiver"
)
_CALLBACK_JOIN = "callbacks c JOIN messages m ON m.seq = c.original_seq"
_CALLBACK_COLUMNS = (
    "c.seq, c.message_id, c.client, c.correlation_id, c.original_seq, m.client AS original_client, "
    "c.service, c.body, c.digest, c.state, c.attempts, c.next_attempt_at, c.created_at, "
    "c.updated_at, c.error, m.trace_id, m.request_headers AS original_headers"
)
_DATA_COLUMNS = {
    "messages": "seq, message_id, client, service, mode, state, target, request_headers, "
    "request_body, request_digest, status, code, response_body, result, created_at",
    "callbacks": "seq, message_id, client, correlation_id, original_seq, service, headers, body, "
    "digest, state, created_at",
    "rejections": "seq, at, client, message_id, service, status, code, digest, size",
}
_CHAIN_COLUMNS = "seq, at, kind, ref, facts, content_digest, prev_hash, hash"
_ARCHIVE_COLUMNS = (
    "id, name, digest, first_seq, last_seq, last_hash, rows, bytes, before, at"  # archive
)


class SchemaTooNew(StoreError):
    """The database was migrated by newer code than this."""


class Migration:
    __slots__ = ("checksum", "name", "sql", "version")

    def __init__(self, version: int, name: str, sql: str) -> None:
        self.version, self.name, self.sql = version, name, sql
        self.checksum = hashlib.sha256(sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """The numbered SQL files shipped in ``gateway/store/migrations``, in order."""
    found = []
    for entry in resources.files("gateway.store").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise StoreError("the PostgreSQL migrations are not numbered 1, 2, 3 … without gaps")
    return found


def _count(status: str) -> int:
    """Rows changed, from a command tag such as ``UPDATE 3`` or ``INSERT 0 1``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _chain_callback(
    tx: Tx, seq: int, cb: NewCallback, original_seq: int, headers: str, now: float
) -> None:
    """One record for both rows: the callback, and its message now answered by it."""
    tx.chain(
        "callback.accepted",
        seq,
        now,
        message_id=cb.message_id,
        client=cb.client,
        correlation_id=cb.correlation_id,
        original_seq=original_seq,
        service=cb.service,
        digest=cb.digest,
        body_digest=body_digest(cb.body),
        headers_digest=body_digest(headers.encode()),
        state=CallbackState.PENDING.value,
        message_state=MessageState.ANSWERED.value,
    )


def _encoded(value: Any) -> str | None:
    return json.dumps(value, ensure_ascii=False) if value is not None else None


def _chain_row(r: asyncpg.Record) -> ChainRow:
    return ChainRow(
        seq=r["seq"],
        at=r["at"],
        kind=r["kind"],
        ref=r["ref"],
        facts=r["facts"],
        content_digest=r["content_digest"],
        prev_hash=r["prev_hash"],
        hash=r["hash"],
    )


def _checkpoint(r: asyncpg.Record) -> CheckpointRow:
    return CheckpointRow(
        id=r["id"], seq=r["seq"], hash=r["hash"], at=r["at"], kid=r["kid"], jws=r["jws"]
    )


class _Snapshot:
    """``ChainSnapshot`` on one connection in a REPEATABLE READ, READ ONLY transaction."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def chain_rows(self, first: int = 1, last: int | None = None) -> AsyncIterator[ChainRow]:
        sql = f"SELECT {_CHAIN_COLUMNS} FROM log_chain WHERE seq >= $1"
        params: list[Any] = [first]
        if last is not None:
            sql += " AND seq <= $2"
            params.append(last)
        async for r in self.conn.cursor(sql + " ORDER BY seq", *params, prefetch=2000):
            yield _chain_row(r)

    async def checkpoints(self) -> list[CheckpointRow]:
        rows = await self.conn.fetch(
            "SELECT id, seq, hash, at, kid, jws FROM checkpoints ORDER BY id"
        )
        return [_checkpoint(r) for r in rows]

    async def checkpoint_high_water(self) -> int:
        return int(await self.conn.fetchval("SELECT checkpoint_id FROM log_head") or 0)

    async def checkpoint_covering(self, seq: int) -> CheckpointRow | None:
        row = await self.conn.fetchrow(
            "SELECT id, seq, hash, at, kid, jws FROM checkpoints WHERE seq >= $1 "
            "ORDER BY seq, id LIMIT 1",
            seq,
        )
        return _checkpoint(row) if row else None

    async def find_hash(self, value: str) -> int | None:
        seq = await self.conn.fetchval("SELECT seq FROM log_chain WHERE hash = $1 LIMIT 1", value)
        return int(seq) if seq is not None else None

    async def data_rows(self, table: str) -> AsyncIterator[dict[str, Any]]:
        sql = f"SELECT {_DATA_COLUMNS[table]} FROM {table} ORDER BY seq"
        async for r in self.conn.cursor(sql, prefetch=1000):
            yield dict(r.items())

    async def messages_by_id(self, message_id: str) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            f"SELECT {_DATA_COLUMNS['messages']} FROM messages WHERE message_id = $1 ORDER BY seq",
            message_id,
        )
        return [dict(r.items()) for r in rows]

    async def callbacks_of(self, message_seq: int) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            f"SELECT {_DATA_COLUMNS['callbacks']} FROM callbacks WHERE original_seq = $1 "
            "ORDER BY seq",
            message_seq,
        )
        return [dict(r.items()) for r in rows]

    async def own_events(
        self, message_seq: int, callback_seqs: list[int]
    ) -> tuple[int, int] | None:
        row = await self.conn.fetchrow(
            "SELECT MIN(seq), MAX(seq) FROM log_chain WHERE (kind LIKE 'message.%' AND ref = $1) "
            "OR (kind LIKE 'callback.%' AND ref = ANY($2::bigint[]))",
            message_seq,
            callback_seqs,
        )
        return None if row is None or row[0] is None else (int(row[0]), int(row[1]))

    # --- archive ---
    async def archives(self) -> list[ArchiveMark]:
        rows = await self.conn.fetch(f"SELECT {_ARCHIVE_COLUMNS} FROM log_archives ORDER BY id")
        return [mark_of(tuple(r.values())) for r in rows]

    # --- end archive ---


_INSERT_MESSAGES = (
    "INSERT INTO messages (message_id, client, service, mode, state, target, adapter, "
    "request_headers, request_body, request_digest, next_attempt_at, created_at, updated_at, "
    "trace_id) SELECT i, c, s, mo, st, ta, ad, h, b, d, na, at, at, tr FROM unnest($1::text[], "
    "$2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], "
    "$9::bytea[], $10::text[], $11::float8[], $12::float8[], $13::text[]) AS u (i, c, s, mo, "
    "st, ta, ad, h, b, d, na, at, tr) ON CONFLICT (client, message_id) DO NOTHING "
    "RETURNING seq, client, message_id"
)


class _InsertMessage:
    """The unit of ``insert_message``. The commonest write, so a batch runs all of its
    inserts as one statement (``run_many``): one round trip instead of one each."""

    __slots__ = ("headers", "msg", "now")

    def __init__(self, msg: NewMessage, headers: str, now: float) -> None:
        self.msg, self.headers, self.now = msg, headers, now

    async def __call__(self, tx: Tx) -> int | None:
        return (await self.run_many(tx, [self]))[0]

    @staticmethod
    async def run_many(tx: Tx, units: Sequence[_InsertMessage]) -> list[int | None]:
        """Insert every message; each one's seq, or None for a duplicate (of a stored row,
        or of an earlier one in this very batch)."""
        msgs = [u.msg for u in units]
        rows = await tx.conn.fetch(
            _INSERT_MESSAGES,
            [m.message_id for m in msgs],
            [m.client for m in msgs],
            [m.service for m in msgs],
            [m.mode for m in msgs],
            [m.state for m in msgs],
            [m.target for m in msgs],
            [m.adapter for m in msgs],
            [u.headers for u in units],
            [m.request_body for m in msgs],
            [m.request_digest for m in msgs],
            [m.next_attempt_at for m in msgs],
            [u.now for u in units],
            [m.trace_id for m in msgs],
        )
        inserted = {(r["client"], r["message_id"]): int(r["seq"]) for r in rows}
        seqs: list[int | None] = []
        for u in units:
            m = u.msg
            seq = inserted.pop((m.client, m.message_id), None)
            seqs.append(seq)
            if seq is None:
                continue
            tx.wake = tx.wake or m.next_attempt_at is not None
            tx.chain(
                "message.accepted",
                seq,
                u.now,
                message_id=m.message_id,
                client=m.client,
                service=m.service,
                mode=m.mode,
                state=m.state,
                target=m.target,
                request_digest=m.request_digest,
                headers_digest=body_digest(u.headers.encode()),
            )
        return seqs


class PostgresStore:
    """``Store`` on a PostgreSQL database shared by any number of instances.

    One pool: reads take any connection, the group commit one at a time for its batch.
    """

    POOL_SIZE = 8

    def __init__(self, url: str, *, instance: str, migrate: bool = True) -> None:
        self.url = url
        self.instance_id = instance
        self._migrate_at_open = migrate
        self._pool: asyncpg.Pool | None = None
        self._batch: PgGroupCommit | None = None
        self._listener: asyncpg.Connection | None = None
        self._config_changed: asyncio.Event | None = None  # set by NOTIFY gateway_config
        self._listening = asyncio.Lock()
        self._secrets = SecretBox.locked()  # until use_secrets: no secret kept in clear

    # Life cycle ----------------------------------------------------------------------

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    @property
    def batch(self) -> PgGroupCommit:
        if self._batch is None:
            raise StoreError("the store is not open")
        return self._batch

    def observe(self, observer: BatchObserver) -> None:
        self.batch.observer = observer

    async def open_pool(self) -> asyncpg.Pool:
        """Connect, without looking at the schema (``gateway store migrate``)."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.POOL_SIZE, command_timeout=60
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot open the store at {_safe(self.url)}: {exc}") from exc
        return self._pool

    async def open(self) -> None:
        """Connect and migrate (or, read-only, check that the schema is one we know)."""
        pool = await self.open_pool()
        try:
            async with pool.acquire() as conn:
                if self._migrate_at_open:
                    await migrate(conn)
                else:
                    await check_schema(conn)
        except BaseException as exc:
            await pool.close()
            self._pool = None
            if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
                raise StoreError(f"cannot prepare the store: {exc}") from exc
            raise
        self._batch = PgGroupCommit(pool)

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self._listener.close()
            self._listener = None
        if self._batch is not None:
            await self._batch.close()
            self._batch = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def write(self, unit: PgUnit[T]) -> T:
        return await self.batch.run(unit)

    async def _write(self, sql: str, *params: Any, wake: bool = False) -> int:
        async def unit(tx: Tx) -> int:
            tx.wake = tx.wake or wake
            return _count(await tx.conn.execute(sql, *params))

        return await self.write(unit)

    async def _rows(self, sql: str, *params: Any) -> list[asyncpg.Record]:
        try:
            async with self.pool.acquire() as conn:
                return list(await conn.fetch(sql, *params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise StoreError(f"store query failed: {exc}") from exc

    async def _value(self, sql: str, *params: Any) -> Any:
        rows = await self._rows(sql, *params)
        return rows[0][0] if rows else None

    async def ping(self) -> None:
        """Prove the database takes writes (readiness): a replica or a database in
        recovery refuses this."""
        await self._write("DELETE FROM rejections WHERE false")

    # Exchanges -----------------------------------------------------------------------

    async def insert_message(self, msg: NewMessage) -> MessageRecord:
        now = time.time()
        headers = json.dumps(dict(msg.request_headers))

        seq = await self.write(_InsertMessage(msg, headers, now))
        if seq is None:
            raise DuplicateMessage(msg.message_id)
        return accepted_record(msg, seq, now)

    async def get_message(self, client: str, message_id: str) -> MessageRecord | None:
        rows = await self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE client = $1 AND message_id = $2",
            client,
            message_id,
        )
        return message_record(rows[0]) if rows else None

    async def get_message_by_seq(self, seq: int) -> MessageRecord | None:
        rows = await self._rows(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE seq = $1", seq)
        return message_record(rows[0]) if rows else None

    async def find_by_message_id(self, message_id: str) -> Sequence[MessageRecord]:
        rows = await self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = $1 ORDER BY seq",
            message_id,
        )
        return [message_record(r) for r in rows]

    async def finish_message(
        self,
        seq: int,
        *,
        state: str,
        status: int,
        code: str | None,
        adapter: str | None,
        response_headers: Mapping[str, str],
        response_body: bytes | None,
        error: str | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> bool:
        """Close a synchronous exchange (it was recorded ``delivering``); False when it was
        closed already."""
        now = time.time()
        headers = json.dumps(dict(response_headers))
        spent = json.dumps(dict(timings or {}))

        async def unit(tx: Tx) -> bool:
            count = _count(
                await tx.conn.execute(
                    "UPDATE messages SET state=$1, status=$2, code=$3, adapter=COALESCE($4, "
                    "adapter), response_headers=$5, response_body=$6, error=$7, timings=$8, "
                    "updated_at=$9, next_attempt_at=NULL, lease_until=NULL, lease_owner=NULL "
                    f"WHERE seq=$10 AND state={_DELIVERING}",
                    state,
                    status,
                    code,
                    adapter,
                    headers,
                    response_body,
                    error,
                    spent,
                    now,
                    seq,
                )
            )
            if count == 1:
                tx.chain(
                    "message.finished",
                    seq,
                    now,
                    state=state,
                    status=status,
                    code=code,
                    response_digest=body_digest(response_body),
                )
            return count == 1

        return await self.write(unit)

    async def record_rejection(self, rejection: Rejection) -> None:
        now = time.time()

        async def unit(tx: Tx) -> None:
            seq = await tx.conn.fetchval(
                "INSERT INTO rejections (at, client, message_id, service, status, code, detail, "
                "digest, size, headers) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) RETURNING seq",
                now,
                rejection.client,
                rejection.message_id,
                rejection.service,
                rejection.status,
                rejection.code,
                rejection.detail,
                rejection.digest,
                rejection.size,
                json.dumps(dict(rejection.headers)),
            )
            tx.chain(
                "rejection",
                int(seq),
                now,
                client=rejection.client,
                message_id=rejection.message_id,
                service=rejection.service,
                status=rejection.status,
                code=rejection.code,
                digest=rejection.digest,
                size=rejection.size,
            )

        await self.write(unit)

    async def message_events(self, seq: int) -> Sequence[MessageEvent]:
        """The chained events of one message and its callbacks, oldest first."""
        rows = await self._rows(
            "SELECT at, kind, facts FROM log_chain WHERE (kind LIKE 'message.%' AND ref = $1) "
            "OR (kind LIKE 'callback.%' AND ref IN (SELECT seq FROM callbacks "
            "WHERE original_seq = $1)) ORDER BY seq",
            seq,
        )
        return [
            MessageEvent(at=r["at"], kind=r["kind"], state=json.loads(r["facts"]).get("state"))
            for r in rows
        ]

    async def rejections(self, limit: int = 100) -> list[RejectionRecord]:
        rows = await self._rows("SELECT * FROM rejections ORDER BY seq DESC LIMIT $1", limit)
        return [
            RejectionRecord(
                seq=r["seq"],
                at=r["at"],
                client=r["client"],
                message_id=r["message_id"],
                service=r["service"],
                status=r["status"],
                code=r["code"],
                detail=r["detail"],
                digest=r["digest"],
                size=r["size"],
                headers=json.loads(r["headers"]),
            )
            for r in rows
        ]

    async def search_messages(
        self,
        *,
        client: str | None = None,
        service: str | None = None,
        state: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> Sequence[MessageRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("client", client), ("service", service), ("state", state)):
            if value is not None:
                params.append(value)
                clauses.append(f"{column} = ${len(params)}")
        if since is not None:
            params.append(since)
            clauses.append(f"created_at >= ${len(params)}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(limit)
        rows = await self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages {where} ORDER BY seq DESC "
            f"LIMIT ${len(params)}",
            *params,
        )
        return [message_record(r) for r in rows]

    async def count_messages(self, state: str | None = None) -> int:
        if state:
            return int(await self._value("SELECT COUNT(*) FROM messages WHERE state = $1", state))
        return int(await self._value("SELECT COUNT(*) FROM messages"))

    # Outbox --------------------------------------------------------------------------

    async def outbox_depth(self) -> int:
        return int(
            await self._value(
                "SELECT (SELECT COUNT(*) FROM messages WHERE next_attempt_at IS NOT NULL) + "
                "(SELECT COUNT(*) FROM callbacks WHERE next_attempt_at IS NOT NULL)"
            )
        )

    async def oldest_outbox_age(self, now: float) -> float:
        oldest = await self._value(
            "SELECT MIN(t) FROM (SELECT MIN(created_at) AS t FROM messages "
            "WHERE next_attempt_at IS NOT NULL UNION ALL SELECT MIN(created_at) "
            "FROM callbacks WHERE next_attempt_at IS NOT NULL) o"
        )
        return max(0.0, now - float(oldest)) if oldest is not None else 0.0

    async def claim_due_messages(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[MessageRecord]:
        """Lease up to ``limit`` due messages. Rows another instance is claiming right now
        are skipped, not waited for (``SKIP LOCKED``), and never claimed twice."""

        async def unit(tx: Tx) -> list[asyncpg.Record]:
            return list(
                await tx.conn.fetch(
                    f"UPDATE messages SET state={_DELIVERING}, lease_until=$1, lease_owner=$2, "
                    "updated_at=$3 WHERE seq IN (SELECT seq FROM messages WHERE "
                    "next_attempt_at IS NOT NULL AND next_attempt_at <= $3 AND state IN "
                    f"{_IN_OUTBOX} AND (lease_until IS "
                    "NULL OR lease_until <= $3) ORDER BY next_attempt_at LIMIT $4 "
                    f"FOR UPDATE SKIP LOCKED) RETURNING {_MESSAGE_COLUMNS}",
                    now + lease_s,
                    self.instance_id,
                    now,
                    limit,
                )
            )

        rows = await self.write(unit)
        return sorted((message_record(r) for r in rows), key=lambda m: m.seq)

    async def reschedule_message(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> bool:
        return (
            await self._write(
                "UPDATE messages SET attempts=$1, next_attempt_at=$2, lease_until=NULL, "
                f"lease_owner=NULL, error=$3, updated_at=$4 WHERE seq=$5 AND state IN {_IN_OUTBOX} "
                f"AND {_FENCE.format('$6')}",
                attempts,
                next_attempt_at,
                error,
                time.time(),
                seq,
                self.instance_id,
                wake=True,
            )
            == 1
        )

    async def set_message_state(
        self,
        seq: int,
        state: str,
        *,
        adapter: str | None = None,
        error: str | None = None,
        result: bytes | None = None,
        attempts: int | None = None,
        receiver: str | None = None,
    ) -> bool:
        """Move a message forward; it leaves the outbox. A transition that would move it
        back (a late acknowledgement after its answer) changes nothing, and neither does
        one from an instance whose lease was taken over or voided. ``receiver``: the
        member the message was delivered to (whose callback it then awaits)."""
        if state not in _FROM:
            raise StoreError(f"no message moves to state {state!r} this way")
        allowed = _FROM[state]
        now = time.time()

        async def unit(tx: Tx) -> bool:
            count = _count(
                await tx.conn.execute(
                    "UPDATE messages SET state=$1, adapter=COALESCE($2, adapter), error=$3, "
                    "result=COALESCE($4, result), attempts=COALESCE($5, attempts), "
                    "receiver=COALESCE($9, receiver), "
                    "next_attempt_at=NULL, lease_until=NULL, lease_owner=NULL, updated_at=$6 "
                    f"WHERE seq=$7 AND state IN {allowed} AND {_FENCE.format('$8')}",
                    state,
                    adapter,
                    error,
                    result,
                    attempts,
                    now,
                    seq,
                    self.instance_id,
                    receiver,
                )
            )
            if count == 1:
                facts: dict[str, str | None] = {} if receiver is None else {"receiver": receiver}
                if result is not None:
                    facts["result_digest"] = body_digest(result)
                tx.chain("message.state", seq, now, state=state, **facts)
            return count == 1

        return await self.write(unit)

    async def answer_message(
        self, seq: int, answer: NewCallback, *, attempts: int, adapter: str, receiver: str | None
    ) -> bool:
        """The upstream answered at once: the message is answered and its answer goes to
        the member as a callback, in one transaction, if this instance still holds the
        message's lease and it is still in the outbox."""
        now = time.time()
        headers = json.dumps(dict(answer.headers))

        async def unit(tx: Tx) -> bool:
            moved = _count(
                await tx.conn.execute(
                    f"UPDATE messages SET state={_ANSWERED}, result=$1, receiver=$2, "
                    "attempts=$3, adapter=$4, error=NULL, next_attempt_at=NULL, "
                    "lease_until=NULL, lease_owner=NULL, updated_at=$5 "
                    f"WHERE seq=$6 AND state IN {_IN_OUTBOX} AND {_FENCE.format('$7')}",
                    answer.body,
                    receiver,
                    attempts,
                    adapter,
                    now,
                    seq,
                    self.instance_id,
                )
            )
            if moved != 1:
                return False
            tx.wake = True
            cb_seq = await tx.conn.fetchval(
                "INSERT INTO callbacks (message_id, client, correlation_id, original_seq, "
                "service, headers, body, digest, state, next_attempt_at, created_at, "
                f"updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,{_PENDING},$9,$9,$9) "
                "ON CONFLICT (client, message_id) DO NOTHING RETURNING seq",
                answer.message_id,
                answer.client,
                answer.correlation_id,
                seq,
                answer.service,
                headers,
                answer.body,
                answer.digest,
                now,
            )
            if cb_seq is not None:
                _chain_callback(tx, int(cb_seq), answer, seq, headers, now)
            else:  # an earlier run stored this answer already
                tx.chain(
                    "message.state",
                    seq,
                    now,
                    state=MessageState.ANSWERED.value,
                    result_digest=body_digest(answer.body),
                )
            return True

        return await self.write(unit)

    async def note_attempt(self, seq: int, *, attempts: int, adapter: str | None) -> bool:
        return (
            await self._write(
                "UPDATE messages SET attempts=$1, adapter=COALESCE($2, adapter), updated_at=$3 "
                f"WHERE seq=$4 AND state IN {_IN_OUTBOX} AND {_FENCE.format('$5')}",
                attempts,
                adapter,
                time.time(),
                seq,
                self.instance_id,
            )
            == 1
        )

    async def release_leases(self, owner: str | None = None) -> int:
        """Void the leases of ``owner`` (a dead worker's instance id), or this instance's
        own. Never everyone's: other instances may be delivering right now, and a dead
        instance's leases expire by themselves."""
        who = owner or self.instance_id

        async def unit(tx: Tx) -> int:
            tx.wake = True
            total = 0
            for table in ("messages", "callbacks"):
                total += _count(
                    await tx.conn.execute(
                        f"UPDATE {table} SET lease_until=NULL, lease_owner=NULL "
                        "WHERE lease_owner=$1 AND lease_until IS NOT NULL",
                        who,
                    )
                )
            return total

        return await self.write(unit)

    async def renew_leases(
        self, messages: Sequence[int], callbacks: Sequence[int], until: float
    ) -> int:
        """Extend this instance's leases on rows it is still delivering."""

        async def unit(tx: Tx) -> int:
            total = 0
            for table, seqs in (("messages", messages), ("callbacks", callbacks)):
                if seqs:
                    total += _count(
                        await tx.conn.execute(
                            f"UPDATE {table} SET lease_until=$1 WHERE seq = ANY($2::bigint[]) "
                            "AND lease_owner=$3 AND lease_until IS NOT NULL",
                            until,
                            list(seqs),
                            self.instance_id,
                        )
                    )
            return total

        return await self.write(unit)

    # Callbacks -----------------------------------------------------------------------

    async def insert_callback(
        self, cb: NewCallback, *, supersede: bool = False
    ) -> CallbackRecord | None:
        """Store a callback and mark its message answered, in one transaction, only if the
        caller is the member the message was delivered to and the message awaits it
        (``delivered``; with ``supersede`` also once answered: a later decision, kept
        beside the earlier ones). None when that guard refused it, and nothing changed;
        ``DuplicateMessage`` when the caller sent this callback id already. The guarded
        UPDATE comes first: of two concurrent callbacks, the second waits for the first's
        row lock, then finds the state moved on."""
        now = time.time()
        headers = json.dumps(dict(cb.headers))
        allowed = TAKES_LATER_DECISION if supersede else TAKES_CALLBACK

        async def unit(tx: Tx) -> int | None:
            seen = await tx.conn.fetchval(
                "SELECT 1 FROM callbacks WHERE client = $1 AND message_id = $2",
                cb.client,
                cb.message_id,
            )
            if seen is not None:
                return -1
            moved = _count(
                await tx.conn.execute(
                    f"UPDATE messages SET state={_ANSWERED}, result=$1, next_attempt_at=NULL, "
                    "lease_until=NULL, lease_owner=NULL, updated_at=$2 WHERE seq=$3 AND "
                    f"state IN {allowed} AND receiver = $4",
                    cb.body,
                    now,
                    cb.original_seq,
                    cb.client,
                )
            )
            if moved != 1:
                return None
            seq = await tx.conn.fetchval(
                "INSERT INTO callbacks (message_id, client, correlation_id, original_seq, "
                "service, headers, body, digest, state, next_attempt_at, created_at, "
                f"updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,{_PENDING},$9,$9,$9) "
                "ON CONFLICT (client, message_id) DO NOTHING RETURNING seq",
                cb.message_id,
                cb.client,
                cb.correlation_id,
                cb.original_seq,
                cb.service,
                headers,
                cb.body,
                cb.digest,
                now,
            )
            if seq is None:  # a concurrent twin committed between: undo the UPDATE too
                raise DuplicateMessage(cb.message_id)
            tx.wake = True
            _chain_callback(tx, int(seq), cb, cb.original_seq, headers, now)
            return int(seq)

        seq = await self.write(unit)
        if seq == -1:
            raise DuplicateMessage(cb.message_id)
        if seq is None:
            return None
        rows = await self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} WHERE c.seq = $1", seq
        )
        return callback_record(rows[0])

    async def callbacks_of(self, original_seq: int) -> Sequence[CallbackRecord]:
        """Every decision recorded for a message, oldest first (its history)."""
        rows = await self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} WHERE c.original_seq = $1 "
            "ORDER BY c.seq",
            original_seq,
        )
        return [callback_record(r) for r in rows]

    async def get_callback(self, client: str, message_id: str) -> CallbackRecord | None:
        rows = await self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} "
            "WHERE c.client = $1 AND c.message_id = $2",
            client,
            message_id,
        )
        return callback_record(rows[0]) if rows else None

    async def claim_due_callbacks(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[CallbackRecord]:
        async def unit(tx: Tx) -> list[asyncpg.Record]:
            return list(
                await tx.conn.fetch(
                    "WITH claimed AS (UPDATE callbacks SET lease_until=$1, lease_owner=$2, "
                    "updated_at=$3 WHERE seq IN (SELECT c.seq FROM callbacks c WHERE "
                    "c.next_attempt_at IS NOT NULL AND c.next_attempt_at <= $3 AND "
                    f"c.state = {_PENDING} AND (c.lease_until IS NULL OR c.lease_until <= $3) "
                    f"AND {_FIRST_PENDING} ORDER BY c.next_attempt_at LIMIT $4 FOR UPDATE "
                    "SKIP LOCKED) RETURNING *) SELECT "
                    + _CALLBACK_COLUMNS
                    + " FROM claimed c JOIN messages m ON m.seq = c.original_seq ORDER BY c.seq",
                    now + lease_s,
                    self.instance_id,
                    now,
                    limit,
                )
            )

        return [callback_record(r) for r in await self.write(unit)]

    async def finish_callback(
        self, seq: int, *, state: str, attempts: int, error: str | None
    ) -> bool:
        """Close a pending callback; once delivered, its message reaches
        ``callback_delivered`` (when no later decision of it is still pending)."""
        now = time.time()

        async def unit(tx: Tx) -> bool:
            count = _count(
                await tx.conn.execute(
                    "UPDATE callbacks SET state=$1, attempts=$2, error=$3, next_attempt_at=NULL, "
                    f"lease_until=NULL, lease_owner=NULL, updated_at=$4 WHERE seq=$5 AND "
                    f"state = {_PENDING} AND {_FENCE.format('$6')}",
                    state,
                    attempts,
                    error,
                    now,
                    seq,
                    self.instance_id,
                )
            )
            moved = 0
            if count == 1 and state == CallbackState.DELIVERED:
                moved = _count(
                    await tx.conn.execute(
                        f"UPDATE messages SET state={_CALLBACK_DELIVERED}, updated_at=$1 WHERE "
                        "seq = (SELECT original_seq FROM callbacks WHERE seq=$2) AND "
                        f"state = {_ANSWERED} AND NOT EXISTS (SELECT 1 FROM callbacks p WHERE "
                        f"p.original_seq = messages.seq AND p.state = {_PENDING})",
                        now,
                        seq,
                    )
                )
            if count == 1:
                tx.chain(
                    "callback.finished",
                    seq,
                    now,
                    state=state,
                    message_state=MessageState.CALLBACK_DELIVERED.value if moved == 1 else None,
                )
            return count == 1

        return await self.write(unit)

    async def reschedule_callback(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> bool:
        return (
            await self._write(
                "UPDATE callbacks SET attempts=$1, next_attempt_at=$2, lease_until=NULL, "
                f"lease_owner=NULL, error=$3, updated_at=$4 WHERE seq=$5 AND state = {_PENDING} "
                f"AND {_FENCE.format('$6')}",
                attempts,
                next_attempt_at,
                error,
                time.time(),
                seq,
                self.instance_id,
                wake=True,
            )
            == 1
        )

    async def dead_letters(self, limit: int = 100) -> Sequence[DeadLetter]:
        rows = await self._rows(
            "SELECT 'message' AS kind, seq, message_id, client, service, attempts, error, "
            f"updated_at FROM messages WHERE state={_DEAD} UNION ALL "
            "SELECT 'callback' AS kind, c.seq, c.message_id, m.client, c.service, c.attempts, "
            "c.error, c.updated_at FROM callbacks c JOIN messages m ON m.seq = c.original_seq "
            f"WHERE c.state={_CB_DEAD} ORDER BY updated_at DESC LIMIT $1",
            limit,
        )
        return [DeadLetter(**dict(r.items())) for r in rows]

    async def redeliver(self, kind: str, seq: int, now: float) -> bool:
        """Put one dead letter back in the outbox with a fresh attempt budget."""
        table, state, dead = (
            ("messages", _ACCEPTED, _DEAD)
            if kind == "message"
            else ("callbacks", _PENDING, _CB_DEAD)
        )

        async def unit(tx: Tx) -> bool:
            count = _count(
                await tx.conn.execute(
                    f"UPDATE {table} SET state={state}, attempts=0, next_attempt_at=$1, "
                    "lease_until=NULL, lease_owner=NULL, created_at=$1, updated_at=$1 "
                    f"WHERE seq=$2 AND state={dead}",
                    now,
                    seq,
                )
            )
            if count == 1:
                tx.wake = True
                tx.chain(f"{kind}.redelivered", seq, now, state=state.strip("'"))
            return count == 1

        return await self.write(unit)

    # Live configuration, admin change trail, admin tokens ----------------------------

    async def load_overlay(self) -> list[tuple[str, str, Any]]:
        rows = await self._rows("SELECT kind, id, body FROM resources ORDER BY version, kind, id")
        overlay = [(r["kind"], r["id"], json.loads(r["body"]) if r["body"] else None) for r in rows]
        return await opened_overlay(self._secrets, overlay)

    async def config_version(self) -> int:
        return int(await self._value("SELECT version FROM config_version") or 0)

    async def save_directory(self, version: int, jws: str) -> bool:
        """Keep an accepted directory unless a higher version is kept already."""
        row = await self._value(
            "INSERT INTO directory (version, jws, accepted_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (one) DO UPDATE SET version = excluded.version, jws = excluded.jws, "
            "accepted_at = excluded.accepted_at WHERE excluded.version >= directory.version "
            "RETURNING version",
            version,
            jws,
            time.time(),
        )
        return row is not None

    async def load_directory(self) -> str | None:
        value = await self._value("SELECT jws FROM directory")
        return str(value) if value is not None else None

    async def wait_for_config_change(self, timeout_s: float) -> None:
        """Until a NOTIFY on ``gateway_config`` (any instance's admin write committed) or
        ``timeout_s``: without a listening connection, the caller's poll is all there is."""
        if self._config_changed is None:
            self._config_changed = asyncio.Event()
            await self._listen(CONFIG_CHANNEL, self._config_changed.set)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._config_changed.wait()
        self._config_changed.clear()  # before the caller reads the version: none is missed

    async def put_resource(
        self, change: ResourceChange, *, expected_version: int | None = None
    ) -> int:
        """Persist one admin write and its change record together, bumping the configuration
        version (compare-and-set on ``expected_version``: ``ConfigConflict`` if it moved,
        nothing written); the new version. The row lock on ``config_version`` orders
        concurrent writers; a NOTIFY tells every instance once the write commits."""
        change = await sealed_change(self._secrets, change)
        now = time.time()
        after = _encoded(change.after)

        async def unit(tx: Tx) -> int | None:
            version = await tx.conn.fetchval(
                "UPDATE config_version SET version = version + 1 "
                "WHERE $1::bigint IS NULL OR version = $1 RETURNING version",
                expected_version,
            )
            if version is None:
                return None  # no exception: that would roll the whole batch back
            await tx.conn.execute(
                "INSERT INTO resources (kind, id, body, updated_at, updated_by, version) "
                "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (kind, id) DO UPDATE SET "
                "body=excluded.body, updated_at=excluded.updated_at, "
                "updated_by=excluded.updated_by, version=excluded.version",
                change.kind,
                change.id,
                after,
                now,
                change.actor,
                version,
            )
            await self._insert_change(tx, change, now)
            await tx.conn.execute("SELECT pg_notify($1, $2)", CONFIG_CHANNEL, str(version))
            return int(version)

        version = await self.write(unit)
        if version is None:
            raise ConfigConflict(f"the configuration is past version {expected_version}")
        return version

    async def record_change(self, change: ResourceChange) -> int:
        """A recorded admin action that changes no configuration (a redelivery, a token)."""
        change = await sealed_change(self._secrets, change)
        now = time.time()
        return await self.write(lambda tx: self._insert_change(tx, change, now))

    @staticmethod
    async def _insert_change(tx: Tx, change: ResourceChange, now: float) -> int:
        before, after = change.trail()
        seq = await tx.conn.fetchval(
            "INSERT INTO admin_changes (at, actor, role, action, kind, resource_id, before, "
            "after) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) RETURNING seq",
            now,
            change.actor,
            change.role,
            change.action,
            change.kind,
            change.id,
            _encoded(before),
            _encoded(after),
        )
        return int(seq)

    async def changes(
        self, *, kind: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[ChangeRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if kind is not None:
            params.append(kind)
            clauses.append(f"kind = ${len(params)}")
        if since is not None:
            params.append(since)
            clauses.append(f"at >= ${len(params)}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(limit)
        rows = await self._rows(
            f"SELECT * FROM admin_changes {where} ORDER BY seq DESC LIMIT ${len(params)}", *params
        )
        return await opened_changes(self._secrets, [
            ChangeRecord(
                seq=r["seq"],
                at=r["at"],
                actor=r["actor"],
                role=r["role"],
                action=r["action"],
                kind=r["kind"],
                resource_id=r["resource_id"],
                before=json.loads(r["before"]) if r["before"] else None,
                after=json.loads(r["after"]) if r["after"] else None,
            )
            for r in rows
        ])  # fmt: skip

    # Secrets at rest (gateway/secretstore.py) -------------------------------------------

    def use_secrets(self, box: SecretBox) -> None:
        self._secrets = box

    @property
    def secrets(self) -> SecretBox:
        return self._secrets

    async def data_keys(self) -> list[DataKey]:
        rows = await self._rows(
            "SELECT generation, key_id, alg, kek_id, wrapped, created_at FROM data_keys "
            "ORDER BY generation"
        )
        return [DataKey(**dict(r.items())) for r in rows]

    async def add_data_key(self, key: DataKey) -> bool:
        added = await self._write(
            "INSERT INTO data_keys (generation, key_id, alg, kek_id, wrapped, created_at) "
            "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT DO NOTHING",
            key.generation,
            key.key_id,
            key.alg,
            key.kek_id,
            key.wrapped,
            key.created_at,
        )
        return added == 1

    async def rewrap_data_keys(self, keys: Sequence[DataKey]) -> None:
        async def unit(tx: Tx) -> None:
            for key in keys:
                await tx.conn.execute(
                    "UPDATE data_keys SET kek_id = $1, wrapped = $2 WHERE key_id = $3",
                    key.kek_id,
                    key.wrapped,
                    key.key_id,
                )

        await self.write(unit)

    async def reseal(self) -> int:
        """Every stored secret sealed again under the current data key; rows changed."""
        box = self._secrets
        updates: list[tuple[str, tuple[Any, ...]]] = []
        for r in await self._rows("SELECT kind, id, body FROM resources WHERE body IS NOT NULL"):
            body = json.loads(r["body"])
            new = await box.reseal(r["kind"], r["id"], body)
            if new is not body:
                sql = "UPDATE resources SET body = $1 WHERE kind = $2 AND id = $3 AND body = $4"
                updates.append((sql, (_encoded(new), r["kind"], r["id"], r["body"])))
        for r in await self._rows(
            "SELECT seq, kind, resource_id, before, after FROM admin_changes"
        ):
            for column in ("before", "after"):
                if r[column] is None:
                    continue
                value = json.loads(r[column])
                new = await box.reseal(r["kind"], r["resource_id"], value)
                if new is not value:
                    sql = f"UPDATE admin_changes SET {column} = $1 WHERE seq = $2 AND {column} = $3"
                    updates.append((sql, (_encoded(new), r["seq"], r[column])))

        async def unit(tx: Tx) -> int:
            return sum([_count(await tx.conn.execute(sql, *params)) for sql, params in updates])

        return await self.write(unit) if updates else 0

    async def add_token(self, name: str, role: str, token_hash: str) -> None:
        count = await self._write(
            "INSERT INTO admin_tokens (name, role, hash, created_at) VALUES ($1,$2,$3,$4) "
            "ON CONFLICT DO NOTHING",
            name,
            role,
            token_hash,
            time.time(),
        )
        if count != 1:
            raise TokenNameTaken(name)

    async def token_by_hash(self, token_hash: str) -> Credential | None:
        rows = await self._rows(
            "SELECT name, role, hash FROM admin_tokens WHERE hash = $1 AND revoked_at IS NULL",
            token_hash,
        )
        return Credential(**dict(rows[0].items())) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._rows(
            "SELECT name, role, created_at, revoked_at FROM admin_tokens ORDER BY created_at"
        )
        return [TokenRecord(**dict(r.items())) for r in rows]

    async def revoke_token(self, name: str) -> bool:
        count = await self._write(
            "UPDATE admin_tokens SET revoked_at=$1 WHERE name=$2 AND revoked_at IS NULL",
            time.time(),
            name,
        )
        return count == 1

    # Signature nonces ----------------------------------------------------------------

    async def claim_nonce(
        self, signer: str, keyid: str, nonce: str, expires_at: float, now: float
    ) -> bool:
        """Record a nonce; False when it is already recorded and not yet expired (two
        instances claiming one nonce at once: the second waits for the first's row and
        then finds it unexpired)."""
        count = await self._write(
            "INSERT INTO nonces (signer, keyid, nonce, expires_at) VALUES ($1,$2,$3,$4) "
            "ON CONFLICT (signer, keyid, nonce) DO UPDATE SET expires_at=excluded.expires_at "
            "WHERE nonces.expires_at <= $5",
            signer,
            keyid,
            nonce,
            expires_at,
            now,
        )
        return count == 1

    async def prune_nonces(self, now: float) -> int:
        return await self._write("DELETE FROM nonces WHERE expires_at <= $1", now)

    # The message log -----------------------------------------------------------------

    async def chain_head(self) -> Head:
        rows = await self._rows("SELECT seq, hash FROM log_head")
        return Head(int(rows[0]["seq"]), str(rows[0]["hash"])) if rows else Head(0, GENESIS)

    async def sign_checkpoint(self, sign: Signer) -> CheckpointRow | None:
        """Sign the head under its lock and store the checkpoint with the next id; None
        when the head is signed already. Two instances never sign one head twice."""

        async def unit(tx: Tx) -> CheckpointRow | None:
            head = await tx.conn.fetchrow(
                "SELECT seq, hash, checkpoint_id FROM log_head FOR UPDATE"
            )
            last = await tx.conn.fetchrow(
                "SELECT c.id, c.seq, c.hash, c.at, c.kid, c.jws, l.hash AS chained "
                "FROM checkpoints c LEFT JOIN log_chain l ON l.seq = c.seq "
                "ORDER BY c.id DESC LIMIT 1"
            )
            if (
                head is None
                or head["seq"] == 0
                or (last is not None and last["seq"] >= head["seq"])
            ):
                return None
            if last is not None and last["chained"] != last["hash"]:
                raise StoreError(
                    f"the chain no longer matches checkpoint {last['id']} at seq {last['seq']}; "
                    "not signing (run gateway audit verify)"
                )
            at = time.time()
            kid, jws = sign(Head(int(head["seq"]), str(head["hash"])), at)
            number = int(head["checkpoint_id"]) + 1
            await tx.conn.execute(
                "INSERT INTO checkpoints (id, seq, hash, at, kid, jws) VALUES ($1,$2,$3,$4,$5,$6)",
                number,
                head["seq"],
                head["hash"],
                at,
                kid,
                jws,
            )
            await tx.conn.execute("UPDATE log_head SET checkpoint_id = $1", number)
            return CheckpointRow(
                id=number, seq=head["seq"], hash=head["hash"], at=at, kid=kid, jws=jws
            )

        return await self.write(unit)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[_Snapshot]:
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield _Snapshot(conn)

    # --- archive ---
    async def cut_archived(
        self, marks: Sequence[ArchiveMark], rows: Mapping[str, Sequence[int]], seen_head: int
    ) -> bool:
        """Delete what ``marks`` archived in one transaction that holds the head row's
        lock, so no event about an archived row can be appended meanwhile; False (nothing
        changed) when the log moved past what the archive saw (archived.py)."""
        first, last = marks[0], marks[-1]
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT 1 FROM log_head FOR UPDATE")
                low = await conn.fetchrow("SELECT MIN(seq) AS lo, MAX(seq) AS hi FROM log_chain")
                at_last = await conn.fetchval(
                    "SELECT hash FROM log_chain WHERE seq = $1", last.last_seq
                )
                messages = list(rows.get("messages", ()))
                callbacks = list(rows.get("callbacks", ()))
                later = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM log_chain WHERE seq > $1 AND ("
                    "(kind LIKE 'message.%' AND ref = ANY($2::bigint[])) OR "
                    "(kind LIKE 'callback.%' AND ref = ANY($3::bigint[])) OR "
                    "(kind = 'callback.accepted' AND (facts::json->>'original_seq')::bigint "
                    "= ANY($2::bigint[]))))",
                    seen_head,
                    messages,
                    callbacks,
                )
                if (
                    low is None
                    or low["lo"] != first.first_seq
                    or at_last != last.last_hash
                    or int(low["hi"]) <= last.last_seq
                    or later
                ):
                    return False
                for table in ("callbacks", "messages", "rejections"):
                    await conn.execute(
                        f"DELETE FROM {table} WHERE seq = ANY($1::bigint[])",
                        list(rows.get(table, ())),
                    )
                await conn.execute("DELETE FROM log_chain WHERE seq <= $1", last.last_seq)
                await conn.executemany(
                    f"INSERT INTO log_archives ({_ARCHIVE_COLUMNS}) VALUES "
                    "($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
                    [
                        (m.id, m.name, m.digest, m.first_seq, m.last_seq, m.last_hash, m.rows,
                         m.bytes, json.dumps(dict(m.before), sort_keys=True), m.at)
                        for m in marks
                    ],
                )  # fmt: skip
                return True
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise StoreError(f"cannot cut the archived records: {exc}") from exc

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """A session advisory lock on a connection held for the block: one holder
        across every instance on this database, released if the holder dies."""
        key = int.from_bytes(hashlib.sha256(b"gateway-lock:" + name.encode()).digest()[:4])
        async with self.pool.acquire() as conn:
            held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1::bigint)", key))
            try:
                yield held
            finally:
                if held:
                    await conn.execute("SELECT pg_advisory_unlock($1::bigint)", key)

    # --- end archive ---

    async def purge_bodies(self, cutoff: float, now: float, batch: int = 500) -> tuple[int, int]:
        """Drop the bodies of finished records created before ``cutoff``; keep every
        digest. The purge is chained first, then done in short transactions."""

        async def mark(tx: Tx) -> None:
            tx.chain("purge", None, now, cutoff=cutoff)

        await self.write(mark)
        counts = []
        for sql in (
            "UPDATE messages SET request_body=NULL, response_body=NULL, result=NULL WHERE seq IN ("
            "SELECT seq FROM messages WHERE created_at < $1 AND next_attempt_at IS NULL "
            f"AND state NOT IN {_IN_OUTBOX} AND (request_body IS NOT NULL OR "
            "response_body IS NOT NULL OR result IS NOT NULL) LIMIT $2)",
            "UPDATE callbacks SET body='' WHERE seq IN (SELECT seq FROM callbacks WHERE "
            f"created_at < $1 AND state != {_PENDING} AND length(body) > 0 LIMIT $2)",
        ):
            total = 0
            while True:
                count = await self._write(sql, cutoff, batch)
                total += count
                if count < batch:
                    break
            counts.append(total)
        return counts[0], counts[1]

    # Moving in -----------------------------------------------------------------------

    async def is_empty(self) -> bool:
        """No message, callback, rejection or chain record but the genesis yet (``store
        import``)."""
        return bool(
            await self._value(
                "SELECT NOT EXISTS (SELECT 1 FROM messages) AND NOT EXISTS (SELECT 1 FROM "
                "callbacks) AND NOT EXISTS (SELECT 1 FROM rejections) AND NOT EXISTS "
                "(SELECT 1 FROM log_chain WHERE kind != 'genesis')"
            )
        )

    async def finish_import(self, *, checkpoint_high_water: int = 0) -> None:
        """After ``store import``: the sequences continue after the copied rows and the
        head row is the copied chain's last record."""

        async def unit(tx: Tx) -> None:
            for table in ("messages", "callbacks", "rejections", "admin_changes"):
                await tx.conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'), "
                    f"COALESCE((SELECT MAX(seq) FROM {table}), 0) + 1, false)"
                )
            await tx.conn.execute(
                "UPDATE log_head SET seq = COALESCE((SELECT MAX(seq) FROM log_chain), 0), "
                "hash = COALESCE((SELECT hash FROM log_chain ORDER BY seq DESC LIMIT 1), "
                "repeat('0', 64)), checkpoint_id = GREATEST($1, COALESCE((SELECT MAX(id) FROM "
                "checkpoints), 0))",
                checkpoint_high_water,
            )
            # The configuration version goes on from the copied one (gateway/live.py).
            await tx.conn.execute(
                "UPDATE config_version SET version = GREATEST(version, "
                "(SELECT COALESCE(MAX(version), 0) FROM resources))"
            )

        await self.write(unit)

    # Wake-ups ------------------------------------------------------------------------

    async def _listen(self, channel: str, callback: Callable[[], None]) -> None:
        """LISTEN on ``channel`` on the store's one listening connection (opened on first
        use; the lock keeps two subscribers from opening two, or sharing it mid-command)."""
        async with self._listening:
            try:
                if self._listener is None:
                    self._listener = await asyncpg.connect(self.url)
                await self._listener.add_listener(channel, lambda *_: callback())
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("no notifications on %s (polling only): %s", channel, exc)

    async def watch_outbox(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever a batch that made outbox work commits, on any instance
        (LISTEN on a connection of its own; delivery's polling stays the fallback)."""
        await self._listen(OUTBOX_CHANNEL, wake)


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


async def check_schema(conn: Conn) -> int:
    """The applied version; refuses a database newer than this code or with changed files."""
    known = {m.version: m for m in migrations()}
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    applied = await conn.fetch(
        "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
    )
    for row in applied:
        mine = known.get(row["version"])
        if mine is None:
            raise SchemaTooNew(
                f"the database is at schema version {applied[-1]['version']}, newer than this "
                f"gateway knows ({max(known, default=0)}): upgrade the gateway"
            )
        if mine.checksum != row["checksum"]:
            raise StoreError(
                f"migration {row['version']} ({row['name']}) applied to this database differs "
                "from the one this gateway ships"
            )
    return int(applied[-1]["version"]) if applied else 0


async def migrate(conn: Conn) -> list[int]:
    """Apply the missing migrations under the advisory lock, then start the chain; the
    versions applied. Three instances starting at once: one does it, two find it done."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, checksum text NOT NULL, applied_at double precision NOT NULL)"
        )
        version = await check_schema(conn)
        done = []
        for m in migrations():
            if m.version <= version:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at) "
                    "VALUES ($1, $2, $3, $4)",
                    m.version,
                    m.name,
                    m.checksum,
                    time.time(),
                )
            done.append(m.version)
            log.info("applied PostgreSQL migration %04d_%s", m.version, m.name)
        await _genesis(conn)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def _genesis(conn: Conn) -> None:
    """Start an empty chain; records already in the tables predate it."""
    async with conn.transaction():
        head = await conn.fetchrow("SELECT seq FROM log_head FOR UPDATE")
        if head is not None and head["seq"] == 0:
            marks = {
                table: int(await conn.fetchval(f"SELECT COALESCE(MAX(seq), 0) FROM {table}"))
                for table in ("messages", "callbacks", "rejections")
            }
            await append_events(conn, [("genesis", None, time.time(), {"before": marks})])
