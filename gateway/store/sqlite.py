"""The embedded store: SQLite in WAL mode through aiosqlite, with versioned migrations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.errors import StoreError
from gateway.store import (
    CallbackRecord,
    DuplicateMessage,
    MessageEvent,
    MessageRecord,
    NewCallback,
    NewMessage,
    Rejection,
    ResourceChange,
)
from gateway.store.batch import GroupCommit, Unit
from gateway.store.chain import MIGRATION as CHAIN_MIGRATION
from gateway.store.chain import HashChain, body_digest

__all__ = ["MIGRATIONS", "SQLiteStore"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")

# Append only: each entry moves the schema one version up (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE messages (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id       TEXT    NOT NULL,
        client           TEXT    NOT NULL,
        service          TEXT    NOT NULL,
        mode             TEXT    NOT NULL,
        state            TEXT    NOT NULL,
        target           TEXT,
        adapter          TEXT,
        request_headers  TEXT    NOT NULL,
        request_body     BLOB,
        request_digest   TEXT    NOT NULL,
        status           INTEGER,
        code             TEXT,
        response_headers TEXT    NOT NULL DEFAULT '{}',
        response_body    BLOB,
        result           BLOB,
        error            TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL,
        lease_until      REAL,
        created_at       REAL    NOT NULL,
        updated_at       REAL    NOT NULL,
        timings          TEXT    NOT NULL DEFAULT '{}',
        trace_id         TEXT,
        UNIQUE (client, message_id)
    );
    CREATE INDEX messages_due ON messages (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
    CREATE INDEX messages_state ON messages (state, created_at);
    CREATE INDEX messages_message_id ON messages (message_id);

    CREATE TABLE callbacks (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id       TEXT    NOT NULL,
        client           TEXT    NOT NULL,
        correlation_id   TEXT    NOT NULL,
        original_seq     INTEGER NOT NULL REFERENCES messages (seq),
        service          TEXT    NOT NULL,
        headers          TEXT    NOT NULL,
        body             BLOB    NOT NULL,
        digest           TEXT    NOT NULL,
        state            TEXT    NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL,
        lease_until      REAL,
        error            TEXT,
        created_at       REAL    NOT NULL,
        updated_at       REAL    NOT NULL,
        UNIQUE (client, message_id)
    );
    CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE next_attempt_at IS NOT NULL;

    CREATE TABLE rejections (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        at         REAL    NOT NULL,
        client     TEXT,
        message_id TEXT,
        service    TEXT,
        status     INTEGER NOT NULL,
        code       TEXT    NOT NULL,
        detail     TEXT    NOT NULL,
        digest     TEXT,
        size       INTEGER NOT NULL,
        headers    TEXT    NOT NULL
    );
    """,
    """
    CREATE TABLE resources (
        kind       TEXT NOT NULL,
        id         TEXT NOT NULL,
        body       TEXT,            -- JSON; NULL is a tombstone (deleted by an admin)
        updated_at REAL NOT NULL,
        updated_by TEXT NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE TABLE audit (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        at          REAL NOT NULL,
        actor       TEXT NOT NULL,
        role        TEXT NOT NULL,
        action      TEXT NOT NULL,
        kind        TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        before      TEXT,
        after       TEXT
    );
    CREATE TABLE admin_tokens (
        name       TEXT PRIMARY KEY,
        role       TEXT NOT NULL,
        hash       TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    """,
    CHAIN_MIGRATION,  # the tamper-evident message log (gateway/store/chain.py)
    """
    -- Signature nonces seen, kept until the signature could no longer be fresh anyway.
    CREATE TABLE nonces (
        signer     TEXT NOT NULL,
        keyid      TEXT NOT NULL,
        nonce      TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (signer, keyid, nonce)
    ) WITHOUT ROWID;
    CREATE INDEX nonces_expiry ON nonces (expires_at);
    """,
    """
    -- Who holds a lease (a process id), so one dead worker's leases can be voided alone.
    ALTER TABLE messages ADD COLUMN lease_owner INTEGER;
    ALTER TABLE callbacks ADD COLUMN lease_owner INTEGER;
    """,
)

# Message states move forward only; each target state lists the states it may follow.
_IN_OUTBOX = "('accepted', 'delivering')"
_FROM = {
    "delivered": _IN_OUTBOX,
    "answered": "('accepted', 'delivering', 'delivered')",
    "dead": _IN_OUTBOX,
    "failed": _IN_OUTBOX,
}

_MESSAGE_COLUMNS = (
    "seq, message_id, client, service, mode, state, target, adapter, request_headers, "
    "request_body, request_digest, status, code, response_headers, response_body, result, "
    "error, attempts, next_attempt_at, created_at, updated_at, timings, trace_id"
)
_CALLBACK_JOIN = "callbacks c JOIN messages m ON m.seq = c.original_seq"
_CALLBACK_COLUMNS = (
    "c.seq, c.message_id, c.client, c.correlation_id, c.original_seq, m.client AS original_client, "
    "c.service, c.body, c.digest, c.state, c.attempts, c.next_attempt_at, c.created_at, "
    "c.updated_at, c.error, m.trace_id, m.request_headers AS original_headers"
)


def _message(row: sqlite3.Row) -> MessageRecord:
    return MessageRecord(
        seq=row["seq"],
        message_id=row["message_id"],
        client=row["client"],
        service=row["service"],
        mode=row["mode"],
        state=row["state"],
        target=row["target"],
        adapter=row["adapter"],
        request_headers=json.loads(row["request_headers"]),
        request_body=row["request_body"],
        request_digest=row["request_digest"],
        status=row["status"],
        code=row["code"],
        response_headers=json.loads(row["response_headers"]),
        response_body=row["response_body"],
        result=row["result"],
        error=row["error"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        timings=json.loads(row["timings"]),
        trace_id=row["trace_id"],
    )


def _header(headers_json: str, name: str) -> str | None:
    for key, value in json.loads(headers_json).items():
        if key.lower() == name:
            return str(value)
    return None


def _callback(row: sqlite3.Row) -> CallbackRecord:
    return CallbackRecord(
        seq=row["seq"],
        message_id=row["message_id"],
        client=row["client"],
        correlation_id=row["correlation_id"],
        original_seq=row["original_seq"],
        original_client=row["original_client"],
        original_via=_header(row["original_headers"], "gw-via"),
        service=row["service"],
        body=row["body"],
        digest=row["digest"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        error=row["error"],
        trace_id=row["trace_id"],
    )


def _count(cursor: sqlite3.Cursor) -> int:
    count = cursor.rowcount
    cursor.close()
    return count


def _run(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Execute one write statement on ``db``; the number of rows it changed."""
    return _count(db.execute(sql, params))


def _fetch(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    return list(db.execute(sql, params).fetchall())


class SQLiteStore:
    """``Store`` on one SQLite file in WAL mode.

    Statements run on the event loop's thread: an indexed SQLite statement in WAL mode
    takes microseconds and (with ``synchronous=NORMAL``) never waits for the disk, while
    handing each one to a worker thread cost milliseconds under load (the thread must win
    the GIL back from a busy loop; measured in bench/, see the performance notes).

    Three connections: reads run on ``db``; every write is a unit run by ``GroupCommit``
    (batch.py) on ``writer``, one transaction per loop turn, and its caller resumes once
    that transaction has committed; the WAL checkpoint, which does wait for the disk,
    runs on a third connection in aiosqlite's thread. A unit has no await inside, so it
    is atomic with respect to every other coroutine; a reader never sees a write that
    has not committed.
    """

    CHECKPOINT_EVERY_S = 1.0
    WAL_RESTART_PAGES = 4096  # 16 MiB of 4 KiB pages

    def __init__(self, path: Path | str, *, synchronous: str = "normal") -> None:
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._db: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._batch: GroupCommit | None = None
        self._maintenance: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self.chain = HashChain()  # the message log's hash chain (gateway/store/chain.py)

    @property
    def db(self) -> sqlite3.Connection:
        """The reading connection (every write goes through ``write``)."""
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    @property
    def writer(self) -> sqlite3.Connection:
        """The write connection; only ``GroupCommit`` runs statements on it."""
        if self._writer is None:
            raise StoreError("the store is not open")
        return self._writer

    @property
    def batch(self) -> GroupCommit:
        if self._batch is None:
            raise StoreError("the store is not open")
        return self._batch

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute("PRAGMA foreign_keys=ON")
        # Checkpoints (which fsync) are ours to run, off the loop; see _checkpoint_loop.
        db.execute("PRAGMA wal_autocheckpoint=0")
        # A WAL file that grew under a burst is cut back to this size when it restarts.
        db.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
        return db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opened: list[sqlite3.Connection] = []
        try:
            writer = self._connect()
            opened.append(writer)
            self._migrate(writer)
            self.chain.load(writer)
            self.chain.genesis(writer, time.time())
            # From now on the writer never sleeps in SQLite's busy handler: GroupCommit
            # retries a busy BEGIN IMMEDIATE from the loop instead.
            writer.execute("PRAGMA busy_timeout=0")
            db = self._connect()
            opened.append(db)
            self._maintenance = await aiosqlite.connect(self.path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            for connection in opened:
                connection.close()
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        self._db, self._writer = db, writer
        self._batch = GroupCommit(writer, self.chain)
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="checkpoint")

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")

    async def _checkpoint_loop(self) -> None:
        """Move the WAL into the database file now and then, in aiosqlite's thread."""
        while True:
            await asyncio.sleep(self.CHECKPOINT_EVERY_S)
            try:
                await self.checkpoint()
            except StoreError:
                log.warning("WAL checkpoint failed; will retry", exc_info=True)

    async def checkpoint(self) -> None:
        """Copy the WAL into the database; restart the WAL once it has grown.

        A PASSIVE checkpoint never waits, so under steady load it never catches up with
        the writer, the WAL is never started again and only grows: measured, 140 MB of WAL
        in 25 s and throughput down from 880 to 550 req/s, every read searching a larger
        WAL index. So past ``WAL_RESTART_PAGES`` a RESTART checkpoint follows: it takes the
        write lock for the little the passive one left (GroupCommit waits for it without
        blocking the loop) and makes the next writer begin the WAL again."""
        if self._maintenance is None:
            return
        try:
            async with self._maintenance.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
                row = await cur.fetchone()
            if row is not None and row[1] >= self.WAL_RESTART_PAGES:
                # RESTART holds the write lock while it waits for readers of old frames
                # (a long report, `gateway audit verify`): give up after 50 ms rather than
                # keep every writer waiting, and try again at the next tick.
                await self._maintenance.execute("PRAGMA busy_timeout=50")
                try:
                    await self._maintenance.execute("PRAGMA wal_checkpoint(RESTART)")
                finally:
                    await self._maintenance.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreError(f"checkpoint failed: {exc}") from exc

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        if self._maintenance is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await self._maintenance.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await self._maintenance.close()
            self._maintenance = None
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        for connection in (self._db, self._writer):
            if connection is not None:
                connection.close()
        self._db = self._writer = None

    async def write(self, unit: Unit[T]) -> T:
        """Run ``unit`` on the write connection in the next group commit (batch.py)."""
        try:
            return await self.batch.run(unit)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write statement; the number of rows it changed."""
        return await self.write(lambda db: _count(db.execute(sql, params)))

    async def _fetch_written(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One write statement with ``RETURNING``; the rows it returned."""
        return await self.write(lambda db: _fetch(db, sql, params))

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read, on the write connection while no batch runs (every unit runs inside
        one flush, so it sees only committed rows): its page cache stays warm, where a
        second connection's is dropped after every commit the writer makes (WAL), which
        cost ~50 µs per lookup under load. The write connection never waits for a lock;
        in the rare case that a read would (another process recovering the WAL), the
        read goes to ``db``, which does."""
        try:
            try:
                return self.writer.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
            return self.db.execute(sql, params).fetchall()
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"store query failed: {exc}") from exc

    async def ping(self) -> None:
        """Prove the store is writable (readiness): take the write lock and write.

        A read-only connection grants ``BEGIN IMMEDIATE``; only a write statement fails."""
        await self._write("DELETE FROM rejections WHERE 0")

    # Live configuration, audit trail, admin tokens -----------------------------------

    async def load_overlay(self) -> list[tuple[str, str, Any]]:
        """Admin changes to apply over the file: (kind, id, body or None for deleted)."""
        rows = self._rows("SELECT kind, id, body FROM resources ORDER BY updated_at, kind, id")
        return [(r["kind"], r["id"], json.loads(r["body"]) if r["body"] else None) for r in rows]

    async def put_resource(self, change: ResourceChange) -> int:
        """Persist one admin write and its audit record together; return the audit seq."""
        now = time.time()
        after = json.dumps(change.after, ensure_ascii=False) if change.after is not None else None

        def unit(db: sqlite3.Connection) -> int:
            db.execute(
                "INSERT INTO resources (kind, id, body, updated_at, updated_by) "
                "VALUES (?,?,?,?,?) ON CONFLICT (kind, id) DO UPDATE SET body=excluded.body, "
                "updated_at=excluded.updated_at, updated_by=excluded.updated_by",
                (change.kind, change.id, after, now, change.actor),
            ).close()
            return self._insert_audit(db, change, now)

        try:
            return await self.write(unit)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    async def audit(self, change: ResourceChange) -> int:
        """An audited action that changes no configuration (a redelivery, a token)."""
        now = time.time()
        try:
            return await self.write(lambda db: self._insert_audit(db, change, now))
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    @staticmethod
    def _insert_audit(db: sqlite3.Connection, change: ResourceChange, now: float) -> int:
        def encoded(value: Any) -> str | None:
            return json.dumps(value, ensure_ascii=False) if value is not None else None

        cur = db.execute(
            "INSERT INTO audit (at, actor, role, action, kind, resource_id, before, after) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (
                now,
                change.actor,
                change.role,
                change.action,
                change.kind,
                change.id,
                encoded(change.before),
                encoded(change.after),
            ),
        )
        seq = int(cur.lastrowid or 0)
        cur.close()
        return seq

    async def audit_trail(
        self, *, kind: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(
            f"SELECT * FROM audit {where} ORDER BY seq DESC LIMIT ?", (*params, limit)
        )
        out = []
        for r in rows:
            item = dict(r)
            item["before"] = json.loads(item["before"]) if item["before"] else None
            item["after"] = json.loads(item["after"]) if item["after"] else None
            out.append(item)
        return out

    async def add_token(self, name: str, role: str, token_hash: str) -> None:
        try:
            await self._write(
                "INSERT INTO admin_tokens (name, role, hash, created_at) VALUES (?,?,?,?)",
                (name, role, token_hash, time.time()),
            )
        except sqlite3.IntegrityError as exc:
            raise DuplicateMessage(name) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    async def token_by_hash(self, token_hash: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT name, role, hash, created_at FROM admin_tokens "
            "WHERE hash = ? AND revoked_at IS NULL",
            (token_hash,),
        )
        return dict(rows[0]) if rows else None

    async def list_tokens(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT name, role, created_at, revoked_at FROM admin_tokens ORDER BY created_at"
        )
        return [dict(r) for r in rows]

    async def revoke_token(self, name: str) -> bool:
        count = await self._write(
            "UPDATE admin_tokens SET revoked_at=? WHERE name=? AND revoked_at IS NULL",
            (time.time(), name),
        )
        return count == 1

    # Signature nonces ----------------------------------------------------------------

    async def claim_nonce(
        self, signer: str, keyid: str, nonce: str, expires_at: float, now: float
    ) -> bool:
        """Record a nonce; False when it is already recorded and not yet expired."""
        count = await self._write(
            "INSERT INTO nonces (signer, keyid, nonce, expires_at) VALUES (?,?,?,?) "
            "ON CONFLICT (signer, keyid, nonce) DO UPDATE SET expires_at=excluded.expires_at "
            "WHERE nonces.expires_at <= ?",
            (signer, keyid, nonce, expires_at, now),
        )
        return count == 1

    async def prune_nonces(self, now: float) -> int:
        return await self._write("DELETE FROM nonces WHERE expires_at <= ?", (now,))

    # Exchanges -----------------------------------------------------------------------

    async def insert_message(self, msg: NewMessage) -> MessageRecord:
        now = time.time()
        headers = json.dumps(dict(msg.request_headers))

        def unit(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO messages (message_id, client, service, mode, state, target, "
                "adapter, request_headers, request_body, request_digest, next_attempt_at, "
                "created_at, updated_at, trace_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    msg.message_id,
                    msg.client,
                    msg.service,
                    msg.mode,
                    msg.state,
                    msg.target,
                    msg.adapter,
                    headers,
                    msg.request_body,
                    msg.request_digest,
                    msg.next_attempt_at,
                    now,
                    now,
                    msg.trace_id,
                ),
            )
            seq = int(cur.lastrowid or 0)
            cur.close()
            self.chain.append(
                db,
                "message.accepted",
                seq,
                now,
                message_id=msg.message_id,
                client=msg.client,
                service=msg.service,
                mode=msg.mode,
                state=msg.state,
                target=msg.target,
                request_digest=msg.request_digest,
                headers_digest=body_digest(headers.encode()),
            )
            return seq

        try:
            seq = await self.write(unit)
        except sqlite3.IntegrityError as exc:
            raise DuplicateMessage(msg.message_id) from exc
        # The row is what we just wrote: no need to read it back.
        return MessageRecord(
            seq=seq,
            message_id=msg.message_id,
            client=msg.client,
            service=msg.service,
            mode=msg.mode,
            state=msg.state,
            request_headers=msg.request_headers,
            request_body=msg.request_body,
            request_digest=msg.request_digest,
            target=msg.target,
            adapter=msg.adapter,
            status=None,
            code=None,
            response_headers={},
            response_body=None,
            result=None,
            error=None,
            attempts=0,
            next_attempt_at=msg.next_attempt_at,
            created_at=now,
            updated_at=now,
            trace_id=msg.trace_id,
        )

    async def get_message(self, client: str, message_id: str) -> MessageRecord | None:
        rows = self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE client = ? AND message_id = ?",
            (client, message_id),
        )
        return _message(rows[0]) if rows else None

    async def get_message_by_seq(self, seq: int) -> MessageRecord | None:
        rows = self._rows(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE seq = ?", (seq,))
        return _message(rows[0]) if rows else None

    async def find_by_message_id(self, message_id: str) -> Sequence[MessageRecord]:
        rows = self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ?", (message_id,)
        )
        return [_message(r) for r in rows]

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
    ) -> None:
        now = time.time()

        def unit(db: sqlite3.Connection) -> None:
            count = _count(
                db.execute(
                    "UPDATE messages SET state=?, status=?, code=?, adapter=COALESCE(?, adapter), "
                    "response_headers=?, response_body=?, error=?, timings=?, updated_at=?, "
                    "next_attempt_at=NULL, lease_until=NULL WHERE seq=?",
                    (
                        state,
                        status,
                        code,
                        adapter,
                        json.dumps(dict(response_headers)),
                        response_body,
                        error,
                        json.dumps(dict(timings or {})),
                        now,
                        seq,
                    ),
                )
            )
            if count == 1:
                self.chain.append(
                    db,
                    "message.finished",
                    seq,
                    now,
                    state=state,
                    status=status,
                    code=code,
                    response_digest=body_digest(response_body),
                )

        await self.write(unit)

    async def record_rejection(self, rejection: Rejection) -> None:
        now = time.time()

        def unit(db: sqlite3.Connection) -> None:
            rows = _fetch(
                db,
                "INSERT INTO rejections (at, client, message_id, service, status, code, detail, "
                "digest, size, headers) VALUES (?,?,?,?,?,?,?,?,?,?) RETURNING seq",
                (
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
                ),
            )
            self.chain.append(
                db,
                "rejection",
                int(rows[0][0]),
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
        rows = self._rows(
            "SELECT at, kind, facts FROM log_chain WHERE (kind LIKE 'message.%' AND ref = ?) "
            "OR (kind LIKE 'callback.%' AND ref IN (SELECT seq FROM callbacks "
            "WHERE original_seq = ?)) ORDER BY seq",
            (seq, seq),
        )
        return [MessageEvent(at=r[0], kind=r[1], state=json.loads(r[2]).get("state")) for r in rows]

    async def rejections(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM rejections ORDER BY seq DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

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
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("created_at >= ?")
            params.append(since)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages {where} ORDER BY seq DESC LIMIT ?",
            (*params, limit),
        )
        return [_message(r) for r in rows]

    async def count_messages(self, state: str | None = None) -> int:
        sql = "SELECT COUNT(*) FROM messages" + (" WHERE state = ?" if state else "")
        rows = self._rows(sql, (state,) if state else ())
        return int(rows[0][0])

    # Outbox --------------------------------------------------------------------------

    async def outbox_depth(self) -> int:
        rows = self._rows(
            "SELECT (SELECT COUNT(*) FROM messages WHERE next_attempt_at IS NOT NULL) + "
            "(SELECT COUNT(*) FROM callbacks WHERE next_attempt_at IS NOT NULL)"
        )
        return int(rows[0][0])

    async def oldest_outbox_age(self, now: float) -> float:
        """Seconds since the oldest message or callback still in the outbox was created.

        It reads every outbox row (about 15 ms for 100,000), so it runs in the maintenance
        connection's thread, off the loop; only a metrics scrape asks for it."""
        if self._maintenance is None:
            raise StoreError("the store is not open")
        try:
            async with self._maintenance.execute(
                "SELECT MIN(t) FROM (SELECT MIN(created_at) AS t FROM messages "
                "WHERE next_attempt_at IS NOT NULL UNION ALL SELECT MIN(created_at) "
                "FROM callbacks WHERE next_attempt_at IS NOT NULL)"
            ) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"store query failed: {exc}") from exc
        oldest = row[0] if row is not None else None
        return max(0.0, now - float(oldest)) if oldest is not None else 0.0

    async def claim_due_messages(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[MessageRecord]:
        rows = await self._fetch_written(
            "UPDATE messages SET state='delivering', lease_until=?, lease_owner=?, updated_at=? "
            "WHERE seq IN ("
            "SELECT seq FROM messages WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ? "
            "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at LIMIT ?) "
            f"RETURNING {_MESSAGE_COLUMNS}",
            (now + lease_s, os.getpid(), now, now, now, limit),
        )
        return sorted((_message(r) for r in rows), key=lambda m: m.seq)

    async def reschedule_message(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> None:
        await self._write(
            "UPDATE messages SET attempts=?, next_attempt_at=?, lease_until=NULL, error=?, "
            f"updated_at=? WHERE seq=? AND state IN {_IN_OUTBOX}",
            (attempts, next_attempt_at, error, time.time(), seq),
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
    ) -> None:
        """Move a message forward; it leaves the outbox. A transition that would move it
        back (a late acknowledgement after its answer) changes nothing."""
        allowed = self._from(state)
        now = time.time()

        def unit(db: sqlite3.Connection) -> None:
            count = _run(
                db,
                "UPDATE messages SET state=?, adapter=COALESCE(?, adapter), error=?, "
                "result=COALESCE(?, result), attempts=COALESCE(?, attempts), "
                f"next_attempt_at=NULL, lease_until=NULL, updated_at=? WHERE seq=? AND state IN "
                f"{allowed}",
                (state, adapter, error, result, attempts, now, seq),
            )
            if count == 1:
                facts = {} if result is None else {"result_digest": body_digest(result)}
                self.chain.append(db, "message.state", seq, now, state=state, **facts)

        await self.write(unit)

    async def note_attempt(self, seq: int, *, attempts: int, adapter: str | None) -> None:
        """Count a delivery attempt without moving the message's state."""
        await self._write(
            "UPDATE messages SET attempts=?, adapter=COALESCE(?, adapter), updated_at=? "
            "WHERE seq=?",
            (attempts, adapter, time.time(), seq),
        )

    @staticmethod
    def _from(state: str) -> str:
        if state not in _FROM:
            raise StoreError(f"no message moves to state {state!r} this way")
        return _FROM[state]

    async def release_leases(self, owner: int | None = None) -> int:
        """Void leases: every one after a restart (nothing is in flight), or those of one
        process that died while others go on (``owner``, its process id)."""
        where, params = ("lease_owner=? AND ", (owner,)) if owner is not None else ("", ())

        def unit(db: sqlite3.Connection) -> int:
            return sum(
                _run(
                    db,
                    f"UPDATE {table} SET lease_until=NULL WHERE {where}lease_until IS NOT NULL",
                    params,
                )
                for table in ("messages", "callbacks")
            )

        return await self.write(unit)

    # Callbacks -----------------------------------------------------------------------

    async def insert_callback(self, cb: NewCallback) -> CallbackRecord:
        """Store a callback and mark its message answered, in one transaction."""
        now = time.time()
        headers = json.dumps(dict(cb.headers))

        def unit(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO callbacks (message_id, client, correlation_id, original_seq, "
                "service, headers, body, digest, state, next_attempt_at, created_at, "
                "updated_at) VALUES (?,?,?,?,?,?,?,?,'pending',?,?,?)",
                (
                    cb.message_id,
                    cb.client,
                    cb.correlation_id,
                    cb.original_seq,
                    cb.service,
                    headers,
                    cb.body,
                    cb.digest,
                    now,
                    now,
                    now,
                ),
            )
            seq = cur.lastrowid
            cur.close()
            # A later decision supersedes an earlier one; a late ack never demotes it.
            _run(
                db,
                "UPDATE messages SET state='answered', result=?, next_attempt_at=NULL, "
                "lease_until=NULL, updated_at=? WHERE seq=?",
                (cb.body, now, cb.original_seq),
            )
            # One record for both rows: the callback, and its message now answered by it.
            self.chain.append(
                db,
                "callback.accepted",
                int(seq or 0),
                now,
                message_id=cb.message_id,
                client=cb.client,
                correlation_id=cb.correlation_id,
                original_seq=cb.original_seq,
                service=cb.service,
                digest=cb.digest,
                body_digest=body_digest(cb.body),
                headers_digest=body_digest(headers.encode()),
                state="pending",
                message_state="answered",
            )
            return int(seq or 0)

        try:
            seq = await self.write(unit)
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):  # e.g. a FOREIGN KEY failure: no such message
                raise StoreError(f"store write failed: {exc}") from exc
            raise DuplicateMessage(cb.message_id) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc
        rows = self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} WHERE c.seq = ?", (seq,)
        )
        return _callback(rows[0])

    async def get_callback(self, client: str, message_id: str) -> CallbackRecord | None:
        rows = self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} "
            "WHERE c.client = ? AND c.message_id = ?",
            (client, message_id),
        )
        return _callback(rows[0]) if rows else None

    async def claim_due_callbacks(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[CallbackRecord]:
        rows = await self._fetch_written(
            "UPDATE callbacks SET lease_until=?, lease_owner=?, updated_at=? WHERE seq IN ("
            "SELECT seq FROM callbacks WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ? "
            "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at LIMIT ?) "
            "RETURNING seq",
            (now + lease_s, os.getpid(), now, now, now, limit),
        )
        if not rows:
            return []
        seqs = [int(r[0]) for r in rows]
        found = self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} "
            f"WHERE c.seq IN ({','.join('?' * len(seqs))}) ORDER BY c.seq",
            seqs,
        )
        return [_callback(r) for r in found]

    async def finish_callback(
        self, seq: int, *, state: str, attempts: int, error: str | None
    ) -> None:
        """Close a callback; once delivered, its message reaches ``callback_delivered``.

        Both rows change in one transaction, so a crash never strands the message."""
        now = time.time()

        def unit(db: sqlite3.Connection) -> None:
            count = _run(
                db,
                "UPDATE callbacks SET state=?, attempts=?, error=?, next_attempt_at=NULL, "
                "lease_until=NULL, updated_at=? WHERE seq=?",
                (state, attempts, error, now, seq),
            )
            moved = 0
            if state == "delivered":
                moved = _run(
                    db,
                    "UPDATE messages SET state='callback_delivered', updated_at=? WHERE seq = "
                    "(SELECT original_seq FROM callbacks WHERE seq=?) AND state = 'answered'",
                    (now, seq),
                )
            if count == 1:
                self.chain.append(
                    db,
                    "callback.finished",
                    seq,
                    now,
                    state=state,
                    message_state="callback_delivered" if moved == 1 else None,
                )

        try:
            await self.write(unit)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    async def reschedule_callback(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> None:
        await self._write(
            "UPDATE callbacks SET attempts=?, next_attempt_at=?, lease_until=NULL, error=?, "
            "updated_at=? WHERE seq=?",
            (attempts, next_attempt_at, error, time.time(), seq),
        )

    async def dead_letters(self, limit: int = 100) -> Sequence[Mapping[str, Any]]:
        rows = self._rows(
            "SELECT 'message' AS kind, seq, message_id, client, service, attempts, error, "
            "updated_at FROM messages WHERE state='dead' UNION ALL "
            "SELECT 'callback' AS kind, c.seq, c.message_id, m.client, c.service, c.attempts, "
            "c.error, c.updated_at FROM callbacks c JOIN messages m ON m.seq = c.original_seq "
            "WHERE c.state='dead' ORDER BY updated_at DESC LIMIT ?",
            (limit,),
        )
        return [dict(r) for r in rows]

    async def redeliver(self, kind: str, seq: int, now: float) -> bool:
        """Put one dead letter back in the outbox with a fresh attempt budget."""

        def unit(db: sqlite3.Connection) -> bool:
            if kind == "message":
                count = _run(
                    db,
                    "UPDATE messages SET state='accepted', attempts=0, next_attempt_at=?, "
                    "lease_until=NULL, created_at=?, updated_at=? WHERE seq=? AND state='dead'",
                    (now, now, now, seq),
                )
                state = "accepted"
            else:
                count = _run(
                    db,
                    "UPDATE callbacks SET state='pending', attempts=0, next_attempt_at=?, "
                    "lease_until=NULL, created_at=?, updated_at=? WHERE seq=? AND state='dead'",
                    (now, now, now, seq),
                )
                state = "pending"
            if count == 1:  # its created_at restarts the age limit: chained as a new start
                self.chain.append(db, f"{kind}.redelivered", seq, now, state=state)
            return count == 1

        return await self.write(unit)
