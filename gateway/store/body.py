"""The store's one body: every ``Store`` method written once, over a small seam per backend.

What both backends do alike lives here: the SQL of each method (``?`` placeholders), its
state guards and lease fence, the chain events it appends, the sealing of secrets and the
mapping of rows to records. What differs sits behind two small things a backend provides:

- a ``Tx`` (``execute``/``fetch``/``fetchrow``/``fetchval``/``insert_many``, ``chain``,
  ``notify``, ``wake``): one unit's view of the group-commit transaction it runs in. SQLite
  runs a unit on its writer thread's connection in one go (batch.py); PostgreSQL awaits
  each statement on the batch's pooled connection and appends the queued chain events at
  the batch's end (pgcommit.py);
- a ``Dialect``: the fragments whose spelling differs (``FOR UPDATE SKIP LOCKED``, a list
  of ids, the directory's one-row key, whether a restart voids every lease).

A backend subclasses ``StoreBody`` and implements ``transact`` (run a unit in the next
group commit), ``fetch`` (a read of committed rows) and its life cycle. Adding a store
method is writing it once here: its SQL with ``?``, a unit ``async def unit(tx)`` for a
write, ``await self.fetch(...)`` for a read (docs/architecture.md, "gateway/store").
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from gateway.config.secretstore import DataKey, SecretBox
from gateway.errors import StoreError
from gateway.states import CallbackState, MessageState
from gateway.store.archived import ARCHIVE_COLUMNS, ArchiveMark
from gateway.store.batch import BatchObserver
from gateway.store.bodies import SEALED_COLUMNS, Opened, key_ids, seal_blob, seal_text
from gateway.store.chain import CheckpointRow, body_digest
from gateway.store.oprecords import (
    INSERT_COLUMNS,
    MONITORING_CHUNK,
    MONITORING_COLUMNS,
    PRUNE_SQL,
    SAMPLES_SQL,
    MonitoringQuery,
    MonitoringRecord,
    MonitoringSample,
    monitoring_row,
    query_sql,
    record_from_row,
)
from gateway.store.records import (
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
    Outcome,
    Rejection,
    RejectionRecord,
    ResourceChange,
    TokenNameTaken,
    TokenRecord,
    sql_state,
)
from gateway.store.rows import Row, accepted_record, callback_record, message_record, record
from gateway.store.sealing import opened_changes, opened_overlay, sealed_change
from gateway.store.statements import Column, Insert

__all__ = [
    "CONFIG_CHANNEL",
    "Column",
    "Dialect",
    "Insert",
    "InsertMessage",
    "StoreBody",
    "Tx",
    "TxUnit",
]

T = TypeVar("T")
CONFIG_CHANNEL = "gateway_config"  # an admin write committed (gateway/runtime/live.py)


class Tx(Protocol):
    """One unit's view of its group-commit transaction. Statements use ``?`` placeholders;
    ``execute`` returns the rows changed. A unit never waits for anything but these."""

    wake: bool  # the unit made outbox work (PostgreSQL then NOTIFYs the other instances)

    async def execute(self, sql: str, *params: Any) -> int: ...
    async def fetch(self, sql: str, *params: Any) -> Sequence[Row]: ...
    async def fetchrow(self, sql: str, *params: Any) -> Row | None: ...
    async def fetchval(self, sql: str, *params: Any) -> Any: ...
    async def insert(self, insert: Insert, *values: Any) -> int | None:
        """Insert one row; its ``seq``, or None when its key is taken."""
        ...

    async def insert_many(self, insert: Insert, rows: Sequence[Sequence[Any]]) -> list[int | None]:
        """Insert ``rows`` unless their key is taken; each row's ``seq``, or None for a
        duplicate (of a stored row or of an earlier one here)."""
        ...

    def chain(self, kind: str, ref: int | None, at: float, **facts: Any) -> None:
        """Append an event to the message log in this transaction."""

    async def notify(self, channel: str, payload: str) -> None:
        """Tell other processes once this transaction commits (no-op where none listen)."""


TxUnit = Callable[[Tx], Coroutine[Any, Any, T]]


def opened(resource: T | None) -> T:
    """A backend's connection, pool or batch, which exists only while the store is open."""
    if resource is None:
        raise StoreError("the store is not open")
    return resource


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Dialect:
    """The SQL fragments whose spelling differs between backends."""

    name: str
    # After a claim's inner SELECT: rows another process is claiming are skipped.
    skip_locked: str
    # A list of ids as one array parameter (``= ANY(?::bigint[])``), else ``IN (?, ?…)``.
    arrays: bool
    # The directory table's one-row key column and its value.
    directory_key: tuple[str, str]
    # release_leases() without an owner voids every lease (one file, one supervisor) or
    # only this process's own (instances share the database).
    restart_voids_all: bool
    # archive: a statement that holds the chain head's lock until COMMIT ("" where the
    # transaction's write lock already excludes every other writer).
    head_lock: str = ""

    def any_of(self, column: str, values: Sequence[int]) -> tuple[str, tuple[Any, ...]]:
        """``column`` is one of ``values``: the SQL and its parameters."""
        if self.arrays:
            return f"{column} = ANY(?::bigint[])", (list(values),)
        return f"{column} IN ({','.join('?' * len(values))})", tuple(values)


# A delivery-side update lands only while this process holds the row's lease. Never
# ``lease_owner IS NULL``: that is a lease voided (release_leases) or never taken, and a
# process whose lease was voided must change nothing.
_FENCE = "lease_owner = ?"
_LEFT = "next_attempt_at=NULL, lease_until=NULL, lease_owner=NULL"  # out of the outbox
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


def _of_message(column: str) -> str:
    return f"(SELECT m.{column} FROM messages m WHERE m.seq = callbacks.original_seq)"


# The same record straight from an UPDATE … RETURNING on callbacks (a claim).
_CALLBACK_RETURNING = (
    "seq, message_id, client, correlation_id, original_seq, "
    f"{_of_message('client')} AS original_client, service, body, digest, state, attempts, "
    f"next_attempt_at, created_at, updated_at, error, {_of_message('trace_id')} AS trace_id, "
    f"{_of_message('request_headers')} AS original_headers"
)
_NEW_MESSAGE = Insert(
    "messages",
    (
        ("message_id", "text"),
        ("client", "text"),
        ("service", "text"),
        ("mode", "text"),
        ("state", "text"),
        ("target", "text"),
        ("adapter", "text"),
        ("request_headers", "text"),
        ("request_body", "bytea"),
        ("request_digest", "text"),
        ("next_attempt_at", "float8"),
        ("created_at", "float8"),
        ("updated_at", "float8"),
        ("trace_id", "text"),
    ),
    "client, message_id",
)
_NEW_CALLBACK = Insert(
    "callbacks",
    tuple(
        (name, "")
        for name in (
            "message_id",
            "client",
            "correlation_id",
            "original_seq",
            "service",
            "headers",
            "body",
            "digest",
            "state",
            "next_attempt_at",
            "created_at",
            "updated_at",
        )
    ),
    "client, message_id",
)
_NEW_CHANGE = Insert(
    "admin_changes",
    tuple(
        (name, "")
        for name in ("at", "actor", "role", "action", "kind", "resource_id", "before", "after")
    ),
)


def _encoded(value: Any) -> str | None:
    return json.dumps(value, ensure_ascii=False) if value is not None else None


def _change(r: Row) -> ChangeRecord:
    return record(ChangeRecord, r, json_columns=("before", "after"))


def _callback_params(
    cb: NewCallback,
    original_seq: int,
    headers: str,
    now: float,
    key: tuple[DataKey, bytes] | None = None,
) -> tuple[Any, ...]:
    return (
        cb.message_id,
        cb.client,
        cb.correlation_id,
        original_seq,
        cb.service,
        seal_text(key, "headers", headers),
        seal_blob(key, "body", cb.body),
        cb.digest,
        CallbackState.PENDING.value,
        now,
        now,
        now,
    )


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


class InsertMessage:
    """The unit of ``insert_message``. The commonest write, so a backend that can run a
    batch's inserts as one statement does (PostgreSQL's group commit calls ``run_many``:
    one round trip instead of one each)."""

    __slots__ = ("headers", "key", "msg", "now")

    def __init__(
        self, msg: NewMessage, headers: str, now: float, key: tuple[DataKey, bytes] | None = None
    ) -> None:
        self.msg, self.headers, self.now, self.key = msg, headers, now, key

    def row(self) -> tuple[Any, ...]:
        m, now = self.msg, self.now
        return (
            m.message_id,
            m.client,
            m.service,
            m.mode,
            m.state,
            m.target,
            m.adapter,
            seal_text(self.key, "request_headers", self.headers),
            seal_blob(self.key, "request_body", m.request_body),
            m.request_digest,
            m.next_attempt_at,
            now,
            now,
            m.trace_id,
        )

    async def __call__(self, tx: Tx) -> int | None:
        seq = await tx.insert(_NEW_MESSAGE, *self.row())
        if seq is not None:
            self.chained(tx, seq)
        return seq

    @staticmethod
    async def run_many(tx: Tx, units: Sequence[InsertMessage]) -> list[int | None]:
        """Insert every message; each one's seq, or None for a duplicate."""
        seqs = await tx.insert_many(_NEW_MESSAGE, [u.row() for u in units])
        for u, seq in zip(units, seqs, strict=True):
            if seq is not None:
                u.chained(tx, seq)
        return seqs

    def chained(self, tx: Tx, seq: int) -> None:
        tx.wake = tx.wake or self.msg.next_attempt_at is not None
        chain_accepted(tx, seq, self.now, self.msg, self.headers)


def chain_accepted(tx: Tx, seq: int, at: float, m: NewMessage, headers: str) -> None:
    """The ``message.accepted`` event of a new message (its facts, never its bodies)."""
    tx.chain(
        "message.accepted",
        seq,
        at,
        message_id=m.message_id,
        client=m.client,
        service=m.service,
        mode=m.mode,
        state=m.state,
        target=m.target,
        request_digest=m.request_digest,
        headers_digest=body_digest(headers.encode()),
    )


class _Observed(Protocol):
    """A backend's group commit, as far as the body sees it."""

    observer: BatchObserver | None


# --- lean ---
_SYNC_EXCHANGE = Insert(
    "messages",
    (
        *(c for c in _NEW_MESSAGE.columns if c[0] != "next_attempt_at"),
        ("status", "int4"),
        ("code", "text"),
        ("response_headers", "text"),
        ("response_body", "bytea"),
        ("error", "text"),
        ("timings", "text"),
    ),
    "client, message_id",
)


class RecordExchange:
    """The unit of ``record_exchange``: a synchronous exchange, accepted and finished in
    one row and one commit. A batch's are one statement (``run_many``), the duplicate-id
    check included (the insert's ``ON CONFLICT``)."""

    __slots__ = ("headers", "key", "msg", "now", "outcome", "received_at")

    def __init__(
        self,
        msg: NewMessage,
        outcome: Outcome,
        headers: str,
        received_at: float,
        now: float,
        key: tuple[DataKey, bytes] | None = None,
    ) -> None:
        self.msg, self.outcome, self.headers = msg, outcome, headers
        self.received_at, self.now, self.key = received_at, now, key

    async def __call__(self, tx: Tx) -> int | None:
        return (await self.run_many(tx, [self]))[0]

    @staticmethod
    async def run_many(tx: Tx, units: Sequence[RecordExchange]) -> list[int | None]:
        """Record every exchange; each one's seq, or None for a duplicate."""
        seqs = await tx.insert_many(
            _SYNC_EXCHANGE,
            [
                (
                    u.msg.message_id,
                    u.msg.client,
                    u.msg.service,
                    u.msg.mode,
                    u.outcome.state,
                    u.msg.target,
                    u.outcome.adapter or u.msg.adapter,
                    seal_text(u.key, "request_headers", u.headers),
                    seal_blob(u.key, "request_body", u.msg.request_body),
                    u.msg.request_digest,
                    u.received_at,
                    u.now,
                    u.msg.trace_id,
                    u.outcome.status,
                    u.outcome.code,
                    seal_text(
                        u.key, "response_headers", json.dumps(dict(u.outcome.response_headers))
                    ),
                    seal_blob(u.key, "response_body", u.outcome.response_body),
                    u.outcome.error,
                    json.dumps(dict(u.outcome.timings)),
                )
                for u in units
            ],
        )
        for u, seq in zip(units, seqs, strict=True):
            if seq is None:
                continue
            m, o = u.msg, u.outcome
            chain_accepted(tx, seq, u.received_at, m, u.headers)
            tx.chain(
                "message.finished",
                seq,
                u.now,
                state=o.state,
                status=o.status,
                code=o.code,
                response_digest=body_digest(o.response_body),
            )
        return seqs


# --- end lean ---


class StoreBody:
    """The ``Store`` methods both backends share; a backend supplies the seam below."""

    dialect: ClassVar[Dialect]
    instance_id: str
    _secrets: SecretBox

    # The seam -------------------------------------------------------------------------

    @property
    def batch(self) -> _Observed:
        """The backend's group commit (batch.py, pgcommit.py)."""
        raise NotImplementedError

    def observe(self, observer: BatchObserver) -> None:
        self.batch.observer = observer

    async def transact(self, unit: TxUnit[T]) -> T:
        """Run ``unit`` in the next group commit; its result once that has committed."""
        raise NotImplementedError

    async def fetch(self, sql: str, *params: Any) -> Sequence[Row]:
        """A read of committed rows (``?`` placeholders)."""
        raise NotImplementedError

    async def fetch_slow(self, sql: str, *params: Any) -> Sequence[Row]:
        """A read that scans (metrics): a backend may run it off the event loop."""
        return await self.fetch(sql, *params)

    async def _fetchval(self, sql: str, *params: Any) -> Any:
        rows = await self.fetch(sql, *params)
        return rows[0][0] if rows else None

    async def _execute(self, sql: str, *params: Any, wake: bool = False) -> int:
        """One write statement in the next group commit; the rows it changed."""

        async def unit(tx: Tx) -> int:
            tx.wake = tx.wake or wake
            return await tx.execute(sql, *params)

        return await self.transact(unit)

    async def ping(self) -> None:
        """Prove the store takes writes (readiness): a read-only file, a replica or a
        database in recovery refuses this."""
        await self._execute("DELETE FROM rejections WHERE 1 = 0")

    # Exchanges ------------------------------------------------------------------------

    async def insert_message(self, msg: NewMessage) -> MessageRecord:
        now = time.time()
        headers = json.dumps(dict(msg.request_headers))
        seq = await self.transact(InsertMessage(msg, headers, now, await self._body_key()))
        if seq is None:
            raise DuplicateMessage(msg.message_id)
        return accepted_record(msg, seq, now)  # what we just wrote: no need to read it back

    async def get_message(self, client: str, message_id: str) -> MessageRecord | None:
        rows = await self.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE client = ? AND message_id = ?",
            client,
            message_id,
        )
        rows = await self._loaded(rows)  # archive: bodies at rest
        return self._message(rows[0]) if rows else None

    async def get_message_by_seq(self, seq: int) -> MessageRecord | None:
        rows = await self.fetch(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE seq = ?", seq)
        rows = await self._loaded(rows)  # archive: bodies at rest
        return self._message(rows[0]) if rows else None

    async def find_by_message_id(self, message_id: str) -> Sequence[MessageRecord]:
        rows = await self.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ? ORDER BY seq",
            message_id,
        )
        rows = await self._loaded(rows)  # archive: bodies at rest
        return [self._message(r) for r in rows]

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
        key = await self._body_key()
        headers = seal_text(key, "response_headers", json.dumps(dict(response_headers)))
        sealed_body = seal_blob(key, "response_body", response_body)
        spent = json.dumps(dict(timings or {}))

        async def unit(tx: Tx) -> bool:
            count = await tx.execute(
                "UPDATE messages SET state=?, status=?, code=?, adapter=COALESCE(?, adapter), "
                "response_headers=?, response_body=?, error=?, timings=?, updated_at=?, "
                f"{_LEFT} WHERE seq=? AND state={_DELIVERING}",
                state,
                status,
                code,
                adapter,
                headers,
                sealed_body,
                error,
                spent,
                now,
                seq,
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

        return await self.transact(unit)

    # --- lean ---
    async def record_exchange(
        self, msg: NewMessage, outcome: Outcome, *, received_at: float
    ) -> int:
        """A synchronous exchange, accepted and finished, in one row of one commit."""
        headers = json.dumps(dict(msg.request_headers))
        key = await self._body_key()
        unit = RecordExchange(msg, outcome, headers, received_at, time.time(), key)
        seq = await self.transact(unit)
        if seq is None:
            raise DuplicateMessage(msg.message_id)
        return seq

    # --- end lean ---

    async def record_rejection(self, rejection: Rejection) -> None:
        now = time.time()

        async def unit(tx: Tx) -> None:
            seq = await tx.fetchval(
                "INSERT INTO rejections (at, client, message_id, service, status, code, detail, "
                "digest, size, headers) VALUES (?,?,?,?,?,?,?,?,?,?) RETURNING seq",
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

        await self.transact(unit)

    async def message_events(self, seq: int) -> Sequence[MessageEvent]:
        """The chained events of one message and its callbacks, oldest first."""
        rows = await self.fetch(
            "SELECT at, kind, facts FROM log_chain WHERE (kind LIKE 'message.%' AND ref = ?) "
            "OR (kind LIKE 'callback.%' AND ref IN (SELECT seq FROM callbacks "
            "WHERE original_seq = ?)) ORDER BY seq",
            seq,
            seq,
        )
        return [
            MessageEvent(at=r["at"], kind=r["kind"], state=json.loads(r["facts"]).get("state"))
            for r in rows
        ]

    async def rejections(self, limit: int = 100) -> list[RejectionRecord]:
        rows = await self.fetch("SELECT * FROM rejections ORDER BY seq DESC LIMIT ?", limit)
        return [record(RejectionRecord, r, json_columns=("headers",)) for r in rows]

    async def search_messages(
        self,
        *,
        client: str | None = None,
        service: str | None = None,
        state: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> Sequence[MessageRecord]:
        where, params = _where(
            ("client = ?", client),
            ("service = ?", service),
            ("state = ?", state),
            ("created_at >= ?", since),
        )
        rows = await self.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages {where} ORDER BY seq DESC LIMIT ?",
            *params,
            limit,
        )
        rows = await self._loaded(rows)  # archive: bodies at rest
        return [self._message(r) for r in rows]

    async def count_messages(self, state: str | None = None) -> int:
        where, params = _where(("state = ?", state or None))
        return int(await self._fetchval(f"SELECT COUNT(*) FROM messages {where}", *params))

    # Outbox ---------------------------------------------------------------------------

    async def outbox_depth(self) -> int:
        return int(
            await self._fetchval(
                "SELECT (SELECT COUNT(*) FROM messages WHERE next_attempt_at IS NOT NULL) + "
                "(SELECT COUNT(*) FROM callbacks WHERE next_attempt_at IS NOT NULL)"
            )
        )

    async def oldest_outbox_age(self, now: float) -> float:
        """Seconds since the oldest message or callback still in the outbox was created
        (a scan of the outbox: only a metrics scrape asks)."""
        rows = await self.fetch_slow(
            "SELECT MIN(t) AS t FROM (SELECT MIN(created_at) AS t FROM messages "
            "WHERE next_attempt_at IS NOT NULL UNION ALL SELECT MIN(created_at) "
            "FROM callbacks WHERE next_attempt_at IS NOT NULL) o"
        )
        oldest = rows[0][0] if rows else None
        return max(0.0, now - float(oldest)) if oldest is not None else 0.0

    async def claim_due_messages(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[MessageRecord]:
        """Lease up to ``limit`` due messages. Rows another process is claiming right now
        are skipped, not waited for (``SKIP LOCKED`` where the database has row locks),
        and never claimed twice."""
        rows = await self._claim(
            "messages",
            f"state={_DELIVERING}, ",
            f"c.state IN {IN_OUTBOX}",
            _MESSAGE_COLUMNS,
            now,
            limit,
            lease_s,
        )
        rows = await self._loaded(rows)  # archive: bodies at rest
        return sorted((self._message(r) for r in rows), key=lambda m: m.seq)

    async def _claim(
        self,
        table: str,
        moves: str,
        due: str,
        returning: str,
        now: float,
        limit: int,
        lease_s: float,
    ) -> Sequence[Row]:
        """Lease up to ``limit`` rows of ``table`` that are ``due`` (a condition on ``c``),
        oldest due first, whose lease is free or expired; ``moves`` sets more columns."""
        sql = (
            f"UPDATE {table} SET {moves}lease_until=?, lease_owner=?, updated_at=? WHERE seq "
            f"IN (SELECT c.seq FROM {table} c WHERE c.next_attempt_at IS NOT NULL AND "
            f"c.next_attempt_at <= ? AND {due} AND (c.lease_until IS NULL OR c.lease_until "
            f"<= ?) ORDER BY c.next_attempt_at LIMIT ?{self.dialect.skip_locked}) "
            f"RETURNING {returning}"
        )
        owner = self.instance_id

        async def unit(tx: Tx) -> Sequence[Row]:
            return await tx.fetch(sql, now + lease_s, owner, now, now, now, limit)

        return await self.transact(unit)

    async def reschedule_message(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> bool:
        return await self._reschedule(
            "messages", f"state IN {IN_OUTBOX}", seq, attempts, next_attempt_at, error
        )

    async def _reschedule(
        self, table: str, guard: str, seq: int, attempts: int, next_attempt_at: float, error: str
    ) -> bool:
        """Put a delivery off (its lease given up) while its row is still ``guard`` and
        this process holds the lease."""
        count = await self._execute(
            f"UPDATE {table} SET attempts=?, next_attempt_at=?, lease_until=NULL, "
            f"lease_owner=NULL, error=?, updated_at=? WHERE seq=? AND {guard} AND {_FENCE}",
            attempts,
            next_attempt_at,
            error,
            time.time(),
            seq,
            self.instance_id,
            wake=True,
        )
        return count == 1

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
        one from a process whose lease was taken over or voided. ``receiver``: the member
        the message was delivered to (whose callback it then awaits)."""
        if state not in FORWARD:
            raise StoreError(f"no message moves to state {state!r} this way")
        allowed = FORWARD[state]
        now = time.time()
        owner = self.instance_id
        sealed_result = seal_blob(await self._body_key(), "result", result)

        async def unit(tx: Tx) -> bool:
            count = await tx.execute(
                "UPDATE messages SET state=?, adapter=COALESCE(?, adapter), error=?, "
                "result=COALESCE(?, result), attempts=COALESCE(?, attempts), "
                f"receiver=COALESCE(?, receiver), {_LEFT}, updated_at=? "
                f"WHERE seq=? AND state IN {allowed} AND {_FENCE}",
                state,
                adapter,
                error,
                sealed_result,
                attempts,
                receiver,
                now,
                seq,
                owner,
            )
            if count == 1:
                facts: dict[str, str | None] = {} if receiver is None else {"receiver": receiver}
                if result is not None:
                    facts["result_digest"] = body_digest(result)
                tx.chain("message.state", seq, now, state=state, **facts)
            return count == 1

        return await self.transact(unit)

    async def answer_message(
        self, seq: int, answer: NewCallback, *, attempts: int, adapter: str, receiver: str | None
    ) -> bool:
        """The upstream answered at once: the message is answered and its answer goes to
        the member as a callback, in one transaction, if this process still holds the
        message's lease and it is still in the outbox."""
        now = time.time()
        headers = json.dumps(dict(answer.headers))
        owner = self.instance_id
        key = await self._body_key()

        async def unit(tx: Tx) -> bool:
            moved = await tx.execute(
                f"UPDATE messages SET state={_ANSWERED}, result=?, receiver=?, attempts=?, "
                f"adapter=?, error=NULL, {_LEFT}, updated_at=? "
                f"WHERE seq=? AND state IN {IN_OUTBOX} AND {_FENCE}",
                seal_blob(key, "result", answer.body),
                receiver,
                attempts,
                adapter,
                now,
                seq,
                owner,
            )
            if moved != 1:
                return False
            tx.wake = True
            cb_seq = await tx.insert(
                _NEW_CALLBACK, *_callback_params(answer, seq, headers, now, key)
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

        return await self.transact(unit)

    async def note_attempt(self, seq: int, *, attempts: int, adapter: str | None) -> bool:
        """Count a delivery attempt without moving the message's state."""
        count = await self._execute(
            "UPDATE messages SET attempts=?, adapter=COALESCE(?, adapter), updated_at=? "
            f"WHERE seq=? AND state IN {IN_OUTBOX} AND {_FENCE}",
            attempts,
            adapter,
            time.time(),
            seq,
            self.instance_id,
        )
        return count == 1

    async def release_leases(self, owner: str | None = None) -> int:
        """Void leases: those of ``owner`` (a dead worker's instance id); without one, on
        SQLite every lease (after a restart nothing is in flight: one file has one
        supervisor), on PostgreSQL this instance's own (others may be delivering right
        now; a dead instance's leases expire by themselves). A voided lease has no owner,
        so a late update from its old holder changes nothing (the fence)."""
        who = owner or (None if self.dialect.restart_voids_all else self.instance_id)
        where, params = ("lease_owner=? AND ", (who,)) if who is not None else ("", ())

        async def unit(tx: Tx) -> int:
            tx.wake = True
            total = 0
            for table in ("messages", "callbacks"):
                total += await tx.execute(
                    f"UPDATE {table} SET lease_until=NULL, lease_owner=NULL "
                    f"WHERE {where}lease_until IS NOT NULL",
                    *params,
                )
            return total

        return await self.transact(unit)

    async def renew_leases(
        self, messages: Sequence[int], callbacks: Sequence[int], until: float
    ) -> int:
        """Extend this process's leases on rows it is still delivering."""
        owner = self.instance_id

        async def unit(tx: Tx) -> int:
            total = 0
            for table, seqs in (("messages", messages), ("callbacks", callbacks)):
                if seqs:
                    ids, params = self.dialect.any_of("seq", seqs)
                    total += await tx.execute(
                        f"UPDATE {table} SET lease_until=? WHERE {ids} AND lease_owner=? "
                        "AND lease_until IS NOT NULL",
                        until,
                        *params,
                        owner,
                    )
            return total

        return await self.transact(unit)

    # Callbacks ------------------------------------------------------------------------

    async def insert_callback(
        self, cb: NewCallback, *, supersede: bool = False
    ) -> CallbackRecord | None:
        """Store a callback and mark its message answered, in one transaction, only if the
        caller is the member the message was delivered to and the message awaits it
        (``delivered``; with ``supersede`` also once answered: a later decision, kept
        beside the earlier ones). None when that guard refused it, and nothing changed;
        ``DuplicateMessage`` when the caller sent this callback id already. The guarded
        UPDATE comes before the insert: of two concurrent callbacks, the second waits for
        the first's row lock (PostgreSQL), then finds the state moved on."""
        now = time.time()
        headers = json.dumps(dict(cb.headers))
        allowed = TAKES_LATER_DECISION if supersede else TAKES_CALLBACK
        key = await self._body_key()

        async def unit(tx: Tx) -> int | None:
            seen = await tx.fetchval(
                "SELECT 1 FROM callbacks WHERE client = ? AND message_id = ?",
                cb.client,
                cb.message_id,
            )
            if seen is not None:
                return -1
            moved = await tx.execute(
                f"UPDATE messages SET state={_ANSWERED}, result=?, {_LEFT}, updated_at=? "
                f"WHERE seq=? AND state IN {allowed} AND receiver = ?",
                seal_blob(key, "result", cb.body),
                now,
                cb.original_seq,
                cb.client,
            )
            if moved != 1:
                return None
            seq = await tx.insert(
                _NEW_CALLBACK, *_callback_params(cb, cb.original_seq, headers, now, key)
            )
            if seq is None:  # a concurrent twin committed between: undo the UPDATE too
                raise DuplicateMessage(cb.message_id)
            tx.wake = True
            _chain_callback(tx, int(seq), cb, cb.original_seq, headers, now)
            return int(seq)

        seq = await self.transact(unit)
        if seq == -1:
            raise DuplicateMessage(cb.message_id)
        if seq is None:
            return None
        rows = await self.fetch(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} WHERE c.seq = ?", seq
        )
        rows = await self._loaded(rows)  # archive: bodies at rest
        return self._callback(rows[0])

    async def callbacks_of(self, original_seq: int) -> Sequence[CallbackRecord]:
        """Every decision recorded for a message, oldest first (its history)."""
        rows = await self.fetch(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} WHERE c.original_seq = ? "
            "ORDER BY c.seq",
            original_seq,
        )
        rows = await self._loaded(rows)  # archive: bodies at rest
        return [self._callback(r) for r in rows]

    async def get_callback(self, client: str, message_id: str) -> CallbackRecord | None:
        rows = await self.fetch(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} "
            "WHERE c.client = ? AND c.message_id = ?",
            client,
            message_id,
        )
        rows = await self._loaded(rows)  # archive: bodies at rest
        return self._callback(rows[0]) if rows else None

    async def claim_due_callbacks(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[CallbackRecord]:
        """Lease up to ``limit`` due callbacks, the first pending decision of each message."""
        rows = await self._claim(
            "callbacks",
            "",
            f"c.state = {_PENDING} AND {_FIRST_PENDING}",
            _CALLBACK_RETURNING,
            now,
            limit,
            lease_s,
        )
        rows = await self._loaded(rows)  # archive: bodies at rest
        return sorted((self._callback(r) for r in rows), key=lambda c: c.seq)

    async def finish_callback(
        self, seq: int, *, state: str, attempts: int, error: str | None
    ) -> bool:
        """Close a pending callback; once delivered, its message reaches
        ``callback_delivered`` (when no later decision of it is still pending). Both rows
        change in one transaction, so a crash never strands the message."""
        now = time.time()
        owner = self.instance_id

        async def unit(tx: Tx) -> bool:
            count = await tx.execute(
                f"UPDATE callbacks SET state=?, attempts=?, error=?, {_LEFT}, updated_at=? "
                f"WHERE seq=? AND state = {_PENDING} AND {_FENCE}",
                state,
                attempts,
                error,
                now,
                seq,
                owner,
            )
            moved = 0
            if count == 1 and state == CallbackState.DELIVERED:
                moved = await tx.execute(
                    f"UPDATE messages SET state={_CALLBACK_DELIVERED}, updated_at=? WHERE seq = "
                    f"(SELECT original_seq FROM callbacks WHERE seq=?) AND state = {_ANSWERED} "
                    "AND NOT EXISTS (SELECT 1 FROM callbacks p WHERE p.original_seq = "
                    f"messages.seq AND p.state = {_PENDING})",
                    now,
                    seq,
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

        return await self.transact(unit)

    async def reschedule_callback(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> bool:
        return await self._reschedule(
            "callbacks", f"state = {_PENDING}", seq, attempts, next_attempt_at, error
        )

    async def dead_letters(self, limit: int = 100) -> Sequence[DeadLetter]:
        rows = await self.fetch(
            "SELECT 'message' AS kind, seq, message_id, client, service, attempts, error, "
            f"updated_at FROM messages WHERE state={_DEAD} UNION ALL "
            "SELECT 'callback' AS kind, c.seq, c.message_id, m.client, c.service, c.attempts, "
            "c.error, c.updated_at FROM callbacks c JOIN messages m ON m.seq = c.original_seq "
            f"WHERE c.state={_CB_DEAD} ORDER BY updated_at DESC LIMIT ?",
            limit,
        )
        return [record(DeadLetter, r) for r in rows]

    async def redeliver(self, kind: str, seq: int, now: float) -> bool:
        """Put one dead letter back in the outbox with a fresh attempt budget; its
        created_at restarts the age limit, so it is chained as a new start."""
        table, state, dead = (
            ("messages", MessageState.ACCEPTED, _DEAD)
            if kind == "message"
            else ("callbacks", CallbackState.PENDING, _CB_DEAD)
        )

        async def unit(tx: Tx) -> bool:
            count = await tx.execute(
                f"UPDATE {table} SET state={sql_state(state)}, attempts=0, next_attempt_at=?, "
                "lease_until=NULL, lease_owner=NULL, created_at=?, updated_at=? "
                f"WHERE seq=? AND state={dead}",
                now,
                now,
                now,
                seq,
            )
            if count == 1:
                tx.wake = True
                tx.chain(f"{kind}.redelivered", seq, now, state=state.value)
            return count == 1

        return await self.transact(unit)

    # Live configuration, admin change trail, admin tokens -----------------------------

    async def load_overlay(self) -> list[tuple[str, str, Any]]:
        """Admin changes to apply over the file: (kind, id, body or None for deleted)."""
        rows = await self.fetch("SELECT kind, id, body FROM resources ORDER BY version, kind, id")
        overlay = [(r["kind"], r["id"], json.loads(r["body"]) if r["body"] else None) for r in rows]
        return await opened_overlay(self._secrets, overlay)

    async def config_version(self) -> int:
        """The configuration version: one row, read on every poll of every worker."""
        return int(await self._fetchval("SELECT version FROM config_version") or 0)

    async def put_resource(
        self, change: ResourceChange, *, expected_version: int | None = None
    ) -> int:
        """Persist one admin write and its change record together, bumping the configuration
        version (compare-and-set on ``expected_version``: ``ConfigConflict`` if it moved,
        nothing written); the new version. The row lock on ``config_version`` orders
        concurrent writers; every process learns of the write once it commits."""
        change = await sealed_change(self._secrets, change)
        now = time.time()
        after = _encoded(change.after)

        async def unit(tx: Tx) -> int | None:
            version = await tx.fetchval(
                "UPDATE config_version SET version = version + 1 "
                "WHERE CAST(? AS BIGINT) IS NULL OR version = ? RETURNING version",
                expected_version,
                expected_version,
            )
            if version is None:
                return None  # no exception: that would roll the whole batch back
            await tx.execute(
                "INSERT INTO resources (kind, id, body, updated_at, updated_by, version) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (kind, id) DO UPDATE SET body=excluded.body, "
                "updated_at=excluded.updated_at, updated_by=excluded.updated_by, "
                "version=excluded.version",
                change.kind,
                change.id,
                after,
                now,
                change.actor,
                version,
            )
            await _insert_change(tx, change, now)
            await tx.notify(CONFIG_CHANNEL, str(version))
            return int(version)

        version = await self.transact(unit)
        if version is None:
            raise ConfigConflict(f"the configuration is past version {expected_version}")
        return version

    async def save_directory(self, version: int, jws: str) -> bool:
        """Keep an accepted directory unless one of a higher version is already kept
        (another worker may have been first); True when this one is now kept."""
        key, one = self.dialect.directory_key
        sql = (
            f"INSERT INTO directory ({key}, version, jws, accepted_at) VALUES ({one},?,?,?) "
            f"ON CONFLICT ({key}) DO UPDATE SET version=excluded.version, jws=excluded.jws, "
            "accepted_at=excluded.accepted_at WHERE excluded.version >= directory.version "
            "RETURNING version"
        )
        now = time.time()

        async def unit(tx: Tx) -> bool:
            return bool(await tx.fetch(sql, version, jws, now))

        return await self.transact(unit)

    async def load_directory(self) -> str | None:
        """The last accepted directory JWS, if any."""
        value = await self._fetchval("SELECT jws FROM directory")
        return str(value) if value is not None else None

    async def record_change(self, change: ResourceChange) -> int:
        """A recorded admin action that changes no configuration (a redelivery, a token)."""
        change = await sealed_change(self._secrets, change)
        now = time.time()

        async def unit(tx: Tx) -> int:
            return await _insert_change(tx, change, now)

        return await self.transact(unit)

    async def changes(
        self, *, kind: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[ChangeRecord]:
        where, params = _where(("kind = ?", kind), ("at >= ?", since))
        rows = await self.fetch(
            f"SELECT * FROM admin_changes {where} ORDER BY seq DESC LIMIT ?", *params, limit
        )
        return await opened_changes(self._secrets, [_change(r) for r in rows])

    async def add_token(self, name: str, role: str, token_hash: str) -> None:
        count = await self._execute(
            "INSERT INTO admin_tokens (name, role, hash, created_at) VALUES (?,?,?,?) "
            "ON CONFLICT DO NOTHING",
            name,
            role,
            token_hash,
            time.time(),
        )
        if count != 1:
            raise TokenNameTaken(name)

    async def token_by_hash(self, token_hash: str) -> Credential | None:
        rows = await self.fetch(
            "SELECT name, role, hash FROM admin_tokens WHERE hash = ? AND revoked_at IS NULL",
            token_hash,
        )
        return record(Credential, rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self.fetch(
            "SELECT name, role, created_at, revoked_at FROM admin_tokens ORDER BY created_at"
        )
        return [record(TokenRecord, r) for r in rows]

    async def revoke_token(self, name: str) -> bool:
        count = await self._execute(
            "UPDATE admin_tokens SET revoked_at=? WHERE name=? AND revoked_at IS NULL",
            time.time(),
            name,
        )
        return count == 1

    # Secrets at rest (gateway/config/secretstore.py) -----------------------------------------

    def use_secrets(self, box: SecretBox) -> None:
        self._secrets = box

    # --- archive --- bodies and stored headers sealed at rest (gateway/store/bodies.py)
    async def _body_key(self) -> tuple[DataKey, bytes] | None:
        """The current data key to seal with; None for a store opened without a KEK (a
        library use: the gateway always opens its store with one)."""
        box = self._secrets
        if not box.can_seal:
            return None
        if box.current is None:
            await box.load()
        return box.key_material()

    async def _loaded(self, rows: Sequence[Row]) -> Sequence[Row]:
        """``rows``, after loading any data key their sealed columns name."""
        box = self._secrets
        if not box.can_seal:
            return rows
        wanted: set[str] = set()
        for r in rows:
            for column in SEALED_COLUMNS:
                try:
                    wanted |= key_ids((r[column],))
                except (KeyError, IndexError):
                    continue
        if any(box.key_material(k) is None for k in wanted):
            await box.load()
        return rows

    def _message(self, row: Row) -> MessageRecord:
        return message_record(Opened(row, self._secrets))

    def _callback(self, row: Row) -> CallbackRecord:
        return callback_record(Opened(row, self._secrets))

    # --- end archive ---

    @property
    def secrets(self) -> SecretBox:
        return self._secrets

    async def data_keys(self) -> list[DataKey]:
        rows = await self.fetch(
            "SELECT generation, key_id, alg, kek_id, wrapped, created_at FROM data_keys "
            "ORDER BY generation"
        )
        return [record(DataKey, r, wrapped=bytes(r["wrapped"])) for r in rows]

    async def add_data_key(self, key: DataKey) -> bool:
        added = await self._execute(
            "INSERT INTO data_keys (generation, key_id, alg, kek_id, wrapped, created_at) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
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
                await tx.execute(
                    "UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE key_id = ?",
                    key.kek_id,
                    key.wrapped,
                    key.key_id,
                )

        await self.transact(unit)

    async def reseal(self) -> int:
        """Every stored secret sealed again under the current data key; rows changed. A
        row a concurrent write replaced meanwhile is left to it (compare-and-set)."""
        box = self._secrets
        updates: list[tuple[str, tuple[Any, ...]]] = []
        for r in await self.fetch("SELECT kind, id, body FROM resources WHERE body IS NOT NULL"):
            body = json.loads(r["body"])
            new = await box.reseal(r["kind"], r["id"], body)
            if new is not body:
                sql = "UPDATE resources SET body = ? WHERE kind = ? AND id = ? AND body = ?"
                updates.append((sql, (_encoded(new), r["kind"], r["id"], r["body"])))
        for r in await self.fetch(
            "SELECT seq, kind, resource_id, before, after FROM admin_changes"
        ):
            for column in ("before", "after"):
                if r[column] is None:
                    continue
                value = json.loads(r[column])
                new = await box.reseal(r["kind"], r["resource_id"], value)
                if new is not value:
                    sql = f"UPDATE admin_changes SET {column} = ? WHERE seq = ? AND {column} = ?"
                    updates.append((sql, (_encoded(new), r["seq"], r[column])))

        async def unit(tx: Tx) -> int:
            return sum([await tx.execute(sql, *params) for sql, params in updates])

        return await self.transact(unit) if updates else 0

    # Signature nonces -----------------------------------------------------------------

    async def claim_nonce(
        self, signer: str, keyid: str, nonce: str, expires_at: float, now: float
    ) -> bool:
        """Record a nonce; False when it is already recorded and not yet expired (two
        processes claiming one nonce at once: the second waits for the first's row and
        then finds it unexpired)."""
        count = await self._execute(
            "INSERT INTO nonces (signer, keyid, nonce, expires_at) VALUES (?,?,?,?) "
            "ON CONFLICT (signer, keyid, nonce) DO UPDATE SET expires_at=excluded.expires_at "
            "WHERE nonces.expires_at <= ?",
            signer,
            keyid,
            nonce,
            expires_at,
            now,
        )
        return count == 1

    async def prune_nonces(self, now: float) -> int:
        return await self._execute("DELETE FROM nonces WHERE expires_at <= ?", now)

    # Operational monitoring (gateway/exchange/monitoring.py): apart from the log, no chain ------

    async def insert_monitoring(self, records: Sequence[MonitoringRecord]) -> None:
        """One unit per batch: multi-row INSERTs of at most MONITORING_CHUNK rows each
        (a few statements, so PostgreSQL's group commit waits on few round trips)."""
        rows = [monitoring_row(r) for r in records]
        one = "(" + ", ".join("?" * len(MONITORING_COLUMNS)) + ")"

        async def unit(tx: Tx) -> None:
            for i in range(0, len(rows), MONITORING_CHUNK):
                chunk = rows[i : i + MONITORING_CHUNK]
                await tx.execute(
                    f"INSERT INTO monitoring_records ({INSERT_COLUMNS}) VALUES "
                    + ", ".join([one] * len(chunk)),
                    *(value for row in chunk for value in row),
                )

        await self.transact(unit)

    async def monitoring_records(self, query: MonitoringQuery) -> list[MonitoringRecord]:
        sql, params = query_sql(query, lambda _: "?")
        names = ("id", *MONITORING_COLUMNS)
        return [record_from_row({n: r[n] for n in names}) for r in await self.fetch(sql, *params)]

    async def monitoring_samples(
        self, since: float, until: float, limit: int
    ) -> list[MonitoringSample]:
        rows = await self.fetch_slow(SAMPLES_SQL.format("?", "?", "?"), since, until, limit)
        return [
            # By position: a slow read's rows may be plain tuples (SQLite, off the loop).
            MonitoringSample(
                received_at=r[0], service=r[1], kind=r[2], ok=bool(r[3]), duration_ms=r[4]
            )
            for r in rows
        ]

    async def prune_monitoring(self, cutoff: float) -> int:
        return await self._execute(PRUNE_SQL.format("?"), cutoff)

    # The message log ------------------------------------------------------------------

    # --- archive ---
    async def cut_archived(
        self, marks: Sequence[ArchiveMark], rows: Mapping[str, Sequence[int]], seen_head: int
    ) -> bool:
        """Delete what ``marks`` archived and add them (``log_archives``, and one chained
        ``archive`` event each) in one transaction; False (nothing changed) when the log
        moved past what the archive saw: another cut, a changed record, or an event after
        ``seen_head`` about an archived row (the head's lock keeps new ones out)."""
        first, last, now = marks[0], marks[-1], time.time()
        messages, callbacks = set(rows.get("messages", ())), set(rows.get("callbacks", ()))

        async def unit(tx: Tx) -> bool | None:
            if self.dialect.head_lock:
                await tx.fetch(self.dialect.head_lock)
            low = await tx.fetchrow("SELECT MIN(seq), MAX(seq) FROM log_chain")
            at_last = await tx.fetchval("SELECT hash FROM log_chain WHERE seq = ?", last.last_seq)
            if low is None or low[0] != first.first_seq or at_last != last.last_hash:
                return None
            if int(low[1]) <= last.last_seq:  # the head record always stays
                return None
            for r in await tx.fetch(
                "SELECT kind, ref, facts FROM log_chain WHERE seq > ?", seen_head
            ):
                kind, ref = str(r[0]), r[1]
                if (kind.startswith("message.") and ref in messages) or (
                    kind.startswith("callback.") and ref in callbacks
                ):
                    return None
                if kind == "callback.accepted" and (
                    json.loads(r[2]).get("original_seq") in messages
                ):
                    return None
            for table in ("callbacks", "messages", "rejections"):  # callbacks name messages
                ids = list(rows.get(table, ()))
                for at in range(0, len(ids), 500):
                    where, params = self.dialect.any_of("seq", ids[at : at + 500])
                    await tx.execute(f"DELETE FROM {table} WHERE {where}", *params)
            await tx.execute("DELETE FROM log_chain WHERE seq <= ?", last.last_seq)
            for m in marks:
                await tx.execute(
                    f"INSERT INTO log_archives ({ARCHIVE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    m.id, m.name, m.digest, m.first_seq, m.last_seq, m.last_hash, m.rows,
                    m.bytes, json.dumps(dict(m.before), sort_keys=True), m.at,
                )  # fmt: skip
                tx.chain("archive", None, now, **m.chained())
            return True

        return bool(await self.transact(unit))

    # --- end archive ---

    async def purge_bodies(self, cutoff: float, now: float, batch: int = 500) -> tuple[int, int]:
        """Drop the bodies of finished records created before ``cutoff``; keep every
        digest. The purge is chained first (a verifier then knows these bodies may be
        gone), then done in short transactions that never hold the write lock for long.
        ``callbacks.body`` is NOT NULL, so a purged callback body is the empty blob."""

        async def mark(tx: Tx) -> None:
            tx.chain("purge", None, now, cutoff=cutoff)

        await self.transact(mark)
        counts = []
        for sql, params in (
            (
                "UPDATE messages SET request_body=NULL, response_body=NULL, result=NULL "
                "WHERE seq IN (SELECT seq FROM messages WHERE created_at < ? AND "
                f"next_attempt_at IS NULL AND state NOT IN {IN_OUTBOX} AND (request_body IS "
                "NOT NULL OR response_body IS NOT NULL OR result IS NOT NULL) LIMIT ?)",
                (cutoff, batch),
            ),
            (
                "UPDATE callbacks SET body=? WHERE seq IN (SELECT seq FROM callbacks WHERE "
                f"created_at < ? AND state != {_PENDING} AND length(body) > 0 LIMIT ?)",
                (b"", cutoff, batch),
            ),
        ):
            total = 0
            while True:
                count = await self._execute(sql, *params)
                total += count
                if count < batch:
                    break
            counts.append(total)
        return counts[0], counts[1]

    # --- tsa ---
    # Third-party time (gateway/audit/timestamping.py): checkpoint_stamps, one claim row per
    # checkpoint (gateway/store/stamps.py).

    async def claim_unstamped(
        self, now: float, lease_s: float, limit: int = 20
    ) -> list[CheckpointRow]:
        """Lease the unstamped checkpoints to this instance: those it holds, those whose
        lease ran out, those never claimed; oldest first. One transaction: a second
        instance waits for the first's (row locks, or SQLite's write lock) and sees its
        leases unexpired."""
        owner, until = self.instance_id, now + lease_s

        async def unit(tx: Tx) -> Sequence[Row]:
            await tx.execute(
                "UPDATE checkpoint_stamps SET owner = ?, lease_until = ? WHERE tsr IS NULL "
                "AND (owner = ? OR lease_until < ?)",
                owner,
                until,
                owner,
                now,
            )
            await tx.execute(
                "INSERT INTO checkpoint_stamps (checkpoint_id, owner, lease_until) "
                "SELECT c.id, ?, ? FROM checkpoints c WHERE NOT EXISTS (SELECT 1 FROM "
                "checkpoint_stamps s WHERE s.checkpoint_id = c.id) ORDER BY c.id LIMIT ? "
                "ON CONFLICT (checkpoint_id) DO NOTHING",
                owner,
                until,
                limit,
            )
            return await tx.fetch(
                "SELECT c.id, c.seq, c.hash, c.at, c.kid, c.jws FROM checkpoints c JOIN "
                "checkpoint_stamps s ON s.checkpoint_id = c.id WHERE s.tsr IS NULL AND "
                "s.owner = ? ORDER BY c.id LIMIT ?",
                owner,
                limit,
            )

        rows = await self.transact(unit)
        return [
            CheckpointRow(id=r[0], seq=r[1], hash=r[2], at=r[3], kid=r[4], jws=r[5]) for r in rows
        ]

    async def save_stamp(self, checkpoint_id: int, tsr: bytes, gen_time: float, now: float) -> bool:
        """Keep a stamp while this instance holds the checkpoint's claim and none is kept."""
        count = await self._execute(
            "UPDATE checkpoint_stamps SET tsr = ?, gen_time = ?, stamped_at = ? "
            "WHERE checkpoint_id = ? AND owner = ? AND tsr IS NULL",
            tsr,
            gen_time,
            now,
            checkpoint_id,
            self.instance_id,
        )
        return count == 1

    async def stamp_backlog(self) -> tuple[int, float | None]:
        """(checkpoints without a stamp, when the oldest of them was signed)."""
        rows = await self.fetch(
            "SELECT COUNT(*), MIN(c.at) FROM checkpoints c LEFT JOIN checkpoint_stamps s "
            "ON s.checkpoint_id = c.id WHERE s.tsr IS NULL"
        )
        count, oldest = rows[0][0], rows[0][1]
        return int(count), (float(oldest) if oldest is not None else None)

    # --- end tsa ---


async def _insert_change(tx: Tx, change: ResourceChange, now: float) -> int:
    before, after = change.trail()
    seq = await tx.insert(
        _NEW_CHANGE,
        now,
        change.actor,
        change.role,
        change.action,
        change.kind,
        change.id,
        _encoded(before),
        _encoded(after),
    )
    if seq is None:  # no key, so never a duplicate
        raise StoreError("the change record was not inserted")
    return seq


def _where(*clauses: tuple[str, Any]) -> tuple[str, list[Any]]:
    """``WHERE`` the clauses whose value is given (not None), and their values."""
    given = [(sql, value) for sql, value in clauses if value is not None]
    if not given:
        return "", []
    return "WHERE " + " AND ".join(sql for sql, _ in given), [value for _, value in given]
