"""The embedded store: SQLite in WAL mode through aiosqlite, with versioned migrations."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

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
    archived,
    instance_id,
    sql_state,
)
from gateway.store import chain as log_chain
from gateway.store.archived import MIGRATION as ARCHIVE_MIGRATION
from gateway.store.archived import ArchiveMark
from gateway.store.batch import BatchObserver, GroupCommit, Unit
from gateway.store.chain import MIGRATION as CHAIN_MIGRATION
from gateway.store.chain import ChainRow, CheckpointRow, HashChain, Head, body_digest
from gateway.store.rows import accepted_record, callback_record, message_record
from gateway.store.sealing import opened_changes, opened_overlay, sealed_change

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
    """
    -- "audit" is the tamper-evident message log; the admin change trail gets its own name.
    -- Lease owners are opaque instance ids now (text; SQLite keeps the column's affinity).
    ALTER TABLE audit RENAME TO admin_changes;
    """,
    """
    -- The configuration version, bumped in the transaction of every admin write: each
    -- process notices a change by reading one row, and the overlay applies in version
    -- order (wall clocks of several writers need not agree).
    ALTER TABLE resources ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
    UPDATE resources SET version = (
        SELECT COUNT(*) FROM resources r
        WHERE (r.updated_at, r.kind, r.id) <= (resources.updated_at, resources.kind, resources.id)
    );
    CREATE TABLE config_version (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO config_version (id, version) SELECT 1, COUNT(*) FROM resources;
    """,
    """
    -- The last federation directory this gateway accepted (a JWS), for a restart while
    -- the national platform is down. One row; a lower version never replaces it.
    CREATE TABLE directory (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        version     INTEGER NOT NULL,
        jws         TEXT    NOT NULL,
        accepted_at REAL    NOT NULL
    );
    """,
    """
    -- Trust rules (PROTOCOL.md): the member a message was delivered to, the one party
    -- whose callback is taken for it; callbacks found by their message (a message's
    -- decisions go out in order, and a later one is compared with the kept one).
    ALTER TABLE messages ADD COLUMN receiver TEXT;
    CREATE INDEX callbacks_original ON callbacks (original_seq, seq);
    """,
    """
    -- Data keys (gateway/secretstore.py): random AEAD keys, each wrapped by the
    -- key-encryption key from config; the highest generation seals what is written now.
    CREATE TABLE data_keys (
        generation INTEGER PRIMARY KEY,
        key_id     TEXT    NOT NULL UNIQUE,
        alg        TEXT    NOT NULL,
        kek_id     TEXT    NOT NULL,
        wrapped    BLOB    NOT NULL,
        created_at REAL    NOT NULL
    );
    """,
    # --- archive ---
    # 11 and 12 are other branches' migrations: these placeholders keep 13 at 13 until
    # the merge puts the real ones here (the lead drops the placeholders).
    "-- placeholder for migration 11",
    "-- placeholder for migration 12",
    ARCHIVE_MIGRATION,  # 13: log_archives (gateway/store/archived.py)
    # --- end archive ---
)

# Message states move forward only; each target state lists the states it may follow.
_IN_OUTBOX = IN_OUTBOX
_FROM = FORWARD  # state → the states it may follow (gateway.states)

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


def _change(row: sqlite3.Row) -> ChangeRecord:
    return ChangeRecord(
        seq=row["seq"],
        at=row["at"],
        actor=row["actor"],
        role=row["role"],
        action=row["action"],
        kind=row["kind"],
        resource_id=row["resource_id"],
        before=json.loads(row["before"]) if row["before"] else None,
        after=json.loads(row["after"]) if row["after"] else None,
    )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _rejection(row: sqlite3.Row) -> RejectionRecord:
    return RejectionRecord(
        seq=row["seq"],
        at=row["at"],
        client=row["client"],
        message_id=row["message_id"],
        service=row["service"],
        status=row["status"],
        code=row["code"],
        detail=row["detail"],
        digest=row["digest"],
        size=row["size"],
        headers=json.loads(row["headers"]),
    )


# A delivery-side update lands only while this process holds the row's lease: a row never
# claimed, or claimed by another process since, is not this process's to move.
_FENCE = "lease_owner = ?"
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

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "normal",
        instance: str | None = None,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly  # only snapshots (audit verify): nothing opened, nothing made
        self.instance_id = instance or instance_id()
        self._synchronous = synchronous.upper()
        self._db: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._batch: GroupCommit | None = None
        self._maintenance: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self.chain = HashChain()  # the message log's hash chain (gateway/store/chain.py)
        self._secrets = SecretBox.locked()  # until use_secrets: no secret kept in clear

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

    def observe(self, observer: BatchObserver) -> None:
        self.batch.observer = observer

    async def watch_outbox(self, wake: Callable[[], None]) -> None:
        """Nothing to listen to: workers on one file find new work by polling."""

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
        if self.readonly:
            if not self.path.exists():
                raise StoreError(f"no store at {self.path}")
            return
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
        except (sqlite3.Error, OSError, StoreError) as exc:
            for connection in opened:
                connection.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        self._db, self._writer = db, writer
        self._batch = GroupCommit(writer, self.chain)
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="checkpoint")

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the store is at schema version {version}, newer than this gateway knows "
                f"({len(MIGRATIONS)}): upgrade the gateway"
            )
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
        rows = self._rows("SELECT kind, id, body FROM resources ORDER BY version, kind, id")
        overlay = [(r["kind"], r["id"], json.loads(r["body"]) if r["body"] else None) for r in rows]
        return await opened_overlay(self._secrets, overlay)

    async def config_version(self) -> int:
        """The configuration version: one row, read on every poll of every worker."""
        rows = self._rows("SELECT version FROM config_version")
        return int(rows[0][0]) if rows else 0

    async def wait_for_config_change(self, timeout_s: float) -> None:
        """SQLite notifies no one: the caller polls ``config_version`` after the timeout."""
        await asyncio.sleep(timeout_s)

    async def put_resource(
        self, change: ResourceChange, *, expected_version: int | None = None
    ) -> int:
        """Persist one admin write and its audit record together, bumping the configuration
        version; return the new version. With ``expected_version``, write only if the
        version is still that one, else raise ``ConfigConflict`` having written nothing."""
        change = await sealed_change(self._secrets, change)
        now = time.time()
        after = json.dumps(change.after, ensure_ascii=False) if change.after is not None else None

        def unit(db: sqlite3.Connection) -> int | None:
            bumped = _fetch(
                db,
                "UPDATE config_version SET version = version + 1 "
                "WHERE ?1 IS NULL OR version = ?1 RETURNING version",
                (expected_version,),
            )
            if not bumped:
                return None  # no exception: that would roll the whole batch back
            version = int(bumped[0][0])
            db.execute(
                "INSERT INTO resources (kind, id, body, updated_at, updated_by, version) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (kind, id) DO UPDATE SET body=excluded.body, "
                "updated_at=excluded.updated_at, updated_by=excluded.updated_by, "
                "version=excluded.version",
                (change.kind, change.id, after, now, change.actor, version),
            ).close()
            self._insert_change(db, change, now)
            return version

        try:
            version = await self.write(unit)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc
        if version is None:
            raise ConfigConflict(f"the configuration is past version {expected_version}")
        return version

    async def save_directory(self, version: int, jws: str) -> bool:
        """Keep an accepted directory unless one of a higher version is already kept
        (another worker may have been first); True when this one is now kept."""
        now = time.time()

        def unit(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT INTO directory (id, version, jws, accepted_at) VALUES (1,?,?,?) "
                "ON CONFLICT (id) DO UPDATE SET version=excluded.version, jws=excluded.jws, "
                "accepted_at=excluded.accepted_at WHERE excluded.version >= directory.version",
                (version, jws, now),
            )
            changed = cur.rowcount > 0
            cur.close()
            return changed

        try:
            return await self.write(unit)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    async def load_directory(self) -> str | None:
        """The last accepted directory JWS, if any."""
        rows = self._rows("SELECT jws FROM directory WHERE id = 1")
        return str(rows[0]["jws"]) if rows else None

    async def record_change(self, change: ResourceChange) -> int:
        """A recorded admin action that changes no configuration (a redelivery, a token)."""
        change = await sealed_change(self._secrets, change)
        now = time.time()
        try:
            return await self.write(lambda db: self._insert_change(db, change, now))
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    @staticmethod
    def _insert_change(db: sqlite3.Connection, change: ResourceChange, now: float) -> int:
        def encoded(value: Any) -> str | None:
            return json.dumps(value, ensure_ascii=False) if value is not None else None

        before, after = change.trail()
        cur = db.execute(
            "INSERT INTO admin_changes (at, actor, role, action, kind, resource_id, before, after) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (
                now,
                change.actor,
                change.role,
                change.action,
                change.kind,
                change.id,
                encoded(before),
                encoded(after),
            ),
        )
        seq = int(cur.lastrowid or 0)
        cur.close()
        return seq

    async def changes(
        self, *, kind: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[ChangeRecord]:
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
            f"SELECT * FROM admin_changes {where} ORDER BY seq DESC LIMIT ?", (*params, limit)
        )
        return await opened_changes(self._secrets, [_change(r) for r in rows])

    # Secrets at rest (gateway/secretstore.py) -------------------------------------------

    def use_secrets(self, box: SecretBox) -> None:
        self._secrets = box

    @property
    def secrets(self) -> SecretBox:
        return self._secrets

    async def data_keys(self) -> list[DataKey]:
        rows = self._rows(
            "SELECT generation, key_id, alg, kek_id, wrapped, created_at FROM data_keys "
            "ORDER BY generation"
        )
        return [DataKey(**{**dict(r), "wrapped": bytes(r["wrapped"])}) for r in rows]

    async def add_data_key(self, key: DataKey) -> bool:
        added = await self._write(
            "INSERT INTO data_keys (generation, key_id, alg, kek_id, wrapped, created_at) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (key.generation, key.key_id, key.alg, key.kek_id, key.wrapped, key.created_at),
        )
        return added == 1

    async def rewrap_data_keys(self, keys: Sequence[DataKey]) -> None:
        def unit(db: sqlite3.Connection) -> None:
            for key in keys:
                db.execute(
                    "UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE key_id = ?",
                    (key.kek_id, key.wrapped, key.key_id),
                ).close()

        await self.write(unit)

    async def reseal(self) -> int:
        """Every stored secret sealed again under the current data key; rows changed."""
        box = self._secrets
        updates: list[tuple[str, tuple[Any, ...]]] = []
        for r in self._rows("SELECT kind, id, body FROM resources WHERE body IS NOT NULL"):
            body = json.loads(r["body"])
            new = await box.reseal(r["kind"], r["id"], body)
            if new is not body:
                sql = "UPDATE resources SET body = ? WHERE kind = ? AND id = ? AND body = ?"
                updates.append((sql, (_json(new), r["kind"], r["id"], r["body"])))
        for r in self._rows("SELECT seq, kind, resource_id, before, after FROM admin_changes"):
            for column in ("before", "after"):
                if r[column] is None:
                    continue
                value = json.loads(r[column])
                new = await box.reseal(r["kind"], r["resource_id"], value)
                if new is not value:
                    sql = f"UPDATE admin_changes SET {column} = ? WHERE seq = ? AND {column} = ?"
                    updates.append((sql, (_json(new), r["seq"], r[column])))

        def unit(db: sqlite3.Connection) -> int:
            return sum(_count(db.execute(sql, params)) for sql, params in updates)

        return await self.write(unit) if updates else 0

    async def add_token(self, name: str, role: str, token_hash: str) -> None:
        try:
            await self._write(
                "INSERT INTO admin_tokens (name, role, hash, created_at) VALUES (?,?,?,?)",
                (name, role, token_hash, time.time()),
            )
        except sqlite3.IntegrityError as exc:
            raise TokenNameTaken(name) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    async def token_by_hash(self, token_hash: str) -> Credential | None:
        rows = self._rows(
            "SELECT name, role, hash FROM admin_tokens WHERE hash = ? AND revoked_at IS NULL",
            (token_hash,),
        )
        return Credential(**dict(rows[0])) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = self._rows(
            "SELECT name, role, created_at, revoked_at FROM admin_tokens ORDER BY created_at"
        )
        return [TokenRecord(**dict(r)) for r in rows]

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
        return accepted_record(msg, seq, now)

    async def get_message(self, client: str, message_id: str) -> MessageRecord | None:
        rows = self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE client = ? AND message_id = ?",
            (client, message_id),
        )
        return message_record(rows[0]) if rows else None

    async def get_message_by_seq(self, seq: int) -> MessageRecord | None:
        rows = self._rows(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE seq = ?", (seq,))
        return message_record(rows[0]) if rows else None

    async def find_by_message_id(self, message_id: str) -> Sequence[MessageRecord]:
        rows = self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ?", (message_id,)
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

        def unit(db: sqlite3.Connection) -> bool:
            count = _count(
                db.execute(
                    "UPDATE messages SET state=?, status=?, code=?, adapter=COALESCE(?, adapter), "
                    "response_headers=?, response_body=?, error=?, timings=?, updated_at=?, "
                    f"next_attempt_at=NULL, lease_until=NULL WHERE seq=? AND state={_DELIVERING}",
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
            return count == 1

        return await self.write(unit)

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

    async def rejections(self, limit: int = 100) -> list[RejectionRecord]:
        rows = self._rows("SELECT * FROM rejections ORDER BY seq DESC LIMIT ?", (limit,))
        return [_rejection(r) for r in rows]

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
        return [message_record(r) for r in rows]

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
            f"UPDATE messages SET state={_DELIVERING}, lease_until=?, lease_owner=?, updated_at=? "
            "WHERE seq IN ("
            "SELECT seq FROM messages WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ? "
            f"AND state IN {_IN_OUTBOX} "
            "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at LIMIT ?) "
            f"RETURNING {_MESSAGE_COLUMNS}",
            (now + lease_s, self.instance_id, now, now, now, limit),
        )
        return sorted((message_record(r) for r in rows), key=lambda m: m.seq)

    async def reschedule_message(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> bool:
        return (
            await self._write(
                "UPDATE messages SET attempts=?, next_attempt_at=?, lease_until=NULL, error=?, "
                f"updated_at=? WHERE seq=? AND state IN {_IN_OUTBOX} AND {_FENCE}",
                (attempts, next_attempt_at, error, time.time(), seq, self.instance_id),
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
        one from a process that does not hold the message's lease. ``receiver``: the
        member the message was delivered to (whose callback it then awaits)."""
        allowed = self._from(state)
        now = time.time()

        def unit(db: sqlite3.Connection) -> bool:
            count = _run(
                db,
                "UPDATE messages SET state=?, adapter=COALESCE(?, adapter), error=?, "
                "result=COALESCE(?, result), attempts=COALESCE(?, attempts), "
                "receiver=COALESCE(?, receiver), "
                f"next_attempt_at=NULL, lease_until=NULL, updated_at=? WHERE seq=? AND state IN "
                f"{allowed} AND {_FENCE}",
                (state, adapter, error, result, attempts, receiver, now, seq, self.instance_id),
            )
            if count == 1:
                facts: dict[str, str | None] = {} if receiver is None else {"receiver": receiver}
                if result is not None:
                    facts["result_digest"] = body_digest(result)
                self.chain.append(db, "message.state", seq, now, state=state, **facts)
            return count == 1

        return await self.write(unit)

    async def answer_message(
        self, seq: int, answer: NewCallback, *, attempts: int, adapter: str, receiver: str | None
    ) -> bool:
        """The upstream answered at once: the message is answered and its answer goes to
        the member as a callback, in one transaction, if this process still holds the
        message's lease and it is still in the outbox."""
        now = time.time()
        headers = json.dumps(dict(answer.headers))

        def unit(db: sqlite3.Connection) -> bool:
            moved = _run(
                db,
                f"UPDATE messages SET state={_ANSWERED}, result=?, receiver=?, attempts=?, "
                "adapter=?, error=NULL, next_attempt_at=NULL, lease_until=NULL, updated_at=? "
                f"WHERE seq=? AND state IN {_IN_OUTBOX} AND {_FENCE}",
                (answer.body, receiver, attempts, adapter, now, seq, self.instance_id),
            )
            if moved != 1:
                return False
            cur = db.execute(
                "INSERT OR IGNORE INTO callbacks (message_id, client, correlation_id, "
                "original_seq, service, headers, body, digest, state, next_attempt_at, "
                f"created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,{_PENDING},?,?,?)",
                (
                    answer.message_id,
                    answer.client,
                    answer.correlation_id,
                    seq,
                    answer.service,
                    headers,
                    answer.body,
                    answer.digest,
                    now,
                    now,
                    now,
                ),
            )
            inserted, cb_seq = cur.rowcount == 1, int(cur.lastrowid or 0)
            cur.close()
            if inserted:
                self._chain_callback(db, cb_seq, answer, seq, headers, now)
            else:  # an earlier run stored this answer already
                digest = body_digest(answer.body)
                self.chain.append(
                    db,
                    "message.state",
                    seq,
                    now,
                    state=MessageState.ANSWERED.value,
                    result_digest=digest,
                )
            return True

        return await self.write(unit)

    def _chain_callback(
        self,
        db: sqlite3.Connection,
        seq: int,
        cb: NewCallback,
        original_seq: int,
        headers: str,
        now: float,
    ) -> None:
        """One record for both rows: the callback, and its message now answered by it."""
        self.chain.append(
            db,
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

    async def note_attempt(self, seq: int, *, attempts: int, adapter: str | None) -> bool:
        """Count a delivery attempt without moving the message's state."""
        return (
            await self._write(
                "UPDATE messages SET attempts=?, adapter=COALESCE(?, adapter), updated_at=? "
                f"WHERE seq=? AND state IN {_IN_OUTBOX} AND {_FENCE}",
                (attempts, adapter, time.time(), seq, self.instance_id),
            )
            == 1
        )

    @staticmethod
    def _from(state: str) -> str:
        if state not in _FROM:
            raise StoreError(f"no message moves to state {state!r} this way")
        return _FROM[state]

    async def release_leases(self, owner: str | None = None) -> int:
        """Void leases: every one after a restart (nothing is in flight: one file has one
        supervisor), or those of one worker that died while others go on (``owner``, its
        instance id). A voided lease has no owner, so a late update from its old holder
        changes nothing (the fence)."""
        where, params = ("lease_owner=? AND ", (owner,)) if owner is not None else ("", ())

        def unit(db: sqlite3.Connection) -> int:
            return sum(
                _run(
                    db,
                    f"UPDATE {table} SET lease_until=NULL, lease_owner=NULL "
                    f"WHERE {where}lease_until IS NOT NULL",
                    params,
                )
                for table in ("messages", "callbacks")
            )

        return await self.write(unit)

    async def renew_leases(
        self, messages: Sequence[int], callbacks: Sequence[int], until: float
    ) -> int:
        """Extend this process's leases on rows it is still delivering."""

        def unit(db: sqlite3.Connection) -> int:
            total = 0
            for table, seqs in (("messages", messages), ("callbacks", callbacks)):
                if seqs:
                    total += _run(
                        db,
                        f"UPDATE {table} SET lease_until=? WHERE seq IN "
                        f"({','.join('?' * len(seqs))}) AND lease_owner=? "
                        "AND lease_until IS NOT NULL",
                        (until, *seqs, self.instance_id),
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
        ``DuplicateMessage`` when the caller sent this callback id already."""
        now = time.time()
        headers = json.dumps(dict(cb.headers))
        allowed = TAKES_LATER_DECISION if supersede else TAKES_CALLBACK

        def unit(db: sqlite3.Connection) -> int | None:
            seen = _fetch(
                db,
                "SELECT 1 FROM callbacks WHERE client = ? AND message_id = ?",
                (cb.client, cb.message_id),
            )
            if seen:
                return -1
            moved = _run(
                db,
                f"UPDATE messages SET state={_ANSWERED}, result=?, next_attempt_at=NULL, "
                f"lease_until=NULL, updated_at=? WHERE seq=? AND state IN {allowed} "
                "AND receiver = ?",
                (cb.body, now, cb.original_seq, cb.client),
            )
            if moved != 1:
                return None
            cur = db.execute(
                "INSERT INTO callbacks (message_id, client, correlation_id, original_seq, "
                "service, headers, body, digest, state, next_attempt_at, created_at, "
                f"updated_at) VALUES (?,?,?,?,?,?,?,?,{_PENDING},?,?,?)",
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
            seq = int(cur.lastrowid or 0)
            cur.close()
            self._chain_callback(db, seq, cb, cb.original_seq, headers, now)
            return seq

        try:
            seq = await self.write(unit)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc
        if seq == -1:
            raise DuplicateMessage(cb.message_id)
        if seq is None:
            return None
        rows = self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} WHERE c.seq = ?", (seq,)
        )
        return callback_record(rows[0])

    async def callbacks_of(self, original_seq: int) -> Sequence[CallbackRecord]:
        """Every decision recorded for a message, oldest first (its history)."""
        rows = self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} WHERE c.original_seq = ? "
            "ORDER BY c.seq",
            (original_seq,),
        )
        return [callback_record(r) for r in rows]

    async def get_callback(self, client: str, message_id: str) -> CallbackRecord | None:
        rows = self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} "
            "WHERE c.client = ? AND c.message_id = ?",
            (client, message_id),
        )
        return callback_record(rows[0]) if rows else None

    async def claim_due_callbacks(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[CallbackRecord]:
        rows = await self._fetch_written(
            "UPDATE callbacks SET lease_until=?, lease_owner=?, updated_at=? WHERE seq IN ("
            "SELECT c.seq FROM callbacks c WHERE c.next_attempt_at IS NOT NULL "
            f"AND c.next_attempt_at <= ? AND c.state = {_PENDING} AND (c.lease_until IS NULL "
            f"OR c.lease_until <= ?) AND {_FIRST_PENDING} ORDER BY c.next_attempt_at LIMIT ?) "
            "RETURNING seq",
            (now + lease_s, self.instance_id, now, now, now, limit),
        )
        if not rows:
            return []
        seqs = [int(r[0]) for r in rows]
        found = self._rows(
            f"SELECT {_CALLBACK_COLUMNS} FROM {_CALLBACK_JOIN} "
            f"WHERE c.seq IN ({','.join('?' * len(seqs))}) ORDER BY c.seq",
            seqs,
        )
        return [callback_record(r) for r in found]

    async def finish_callback(
        self, seq: int, *, state: str, attempts: int, error: str | None
    ) -> bool:
        """Close a pending callback; once delivered, its message reaches
        ``callback_delivered`` (when no later decision of it is still pending).

        Both rows change in one transaction, so a crash never strands the message."""
        now = time.time()

        def unit(db: sqlite3.Connection) -> bool:
            count = _run(
                db,
                "UPDATE callbacks SET state=?, attempts=?, error=?, next_attempt_at=NULL, "
                f"lease_until=NULL, updated_at=? WHERE seq=? AND state = {_PENDING} AND {_FENCE}",
                (state, attempts, error, now, seq, self.instance_id),
            )
            moved = 0
            if count == 1 and state == CallbackState.DELIVERED:
                moved = _run(
                    db,
                    f"UPDATE messages SET state={_CALLBACK_DELIVERED}, updated_at=? WHERE seq = "
                    f"(SELECT original_seq FROM callbacks WHERE seq=?) AND state = {_ANSWERED} "
                    "AND NOT EXISTS (SELECT 1 FROM callbacks p WHERE p.original_seq = "
                    f"messages.seq AND p.state = {_PENDING})",
                    (now, seq),
                )
            if count == 1:
                self.chain.append(
                    db,
                    "callback.finished",
                    seq,
                    now,
                    state=state,
                    message_state=MessageState.CALLBACK_DELIVERED.value if moved == 1 else None,
                )
            return count == 1

        try:
            return await self.write(unit)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    async def reschedule_callback(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> bool:
        return (
            await self._write(
                "UPDATE callbacks SET attempts=?, next_attempt_at=?, lease_until=NULL, error=?, "
                f"updated_at=? WHERE seq=? AND state = {_PENDING} AND {_FENCE}",
                (attempts, next_attempt_at, error, time.time(), seq, self.instance_id),
            )
            == 1
        )

    async def dead_letters(self, limit: int = 100) -> Sequence[DeadLetter]:
        rows = self._rows(
            "SELECT 'message' AS kind, seq, message_id, client, service, attempts, error, "
            f"updated_at FROM messages WHERE state={_DEAD} UNION ALL "
            "SELECT 'callback' AS kind, c.seq, c.message_id, m.client, c.service, c.attempts, "
            "c.error, c.updated_at FROM callbacks c JOIN messages m ON m.seq = c.original_seq "
            f"WHERE c.state={_CB_DEAD} ORDER BY updated_at DESC LIMIT ?",
            (limit,),
        )
        return [DeadLetter(**dict(r)) for r in rows]

    async def redeliver(self, kind: str, seq: int, now: float) -> bool:
        """Put one dead letter back in the outbox with a fresh attempt budget."""

        def unit(db: sqlite3.Connection) -> bool:
            if kind == "message":
                count = _run(
                    db,
                    f"UPDATE messages SET state={_ACCEPTED}, attempts=0, next_attempt_at=?, "
                    f"lease_until=NULL, created_at=?, updated_at=? WHERE seq=? AND state={_DEAD}",
                    (now, now, now, seq),
                )
                state = MessageState.ACCEPTED.value
            else:
                count = _run(
                    db,
                    f"UPDATE callbacks SET state={_PENDING}, attempts=0, next_attempt_at=?, "
                    "lease_until=NULL, created_at=?, updated_at=? WHERE seq=? "
                    f"AND state={_CB_DEAD}",
                    (now, now, now, seq),
                )
                state = CallbackState.PENDING.value
            if count == 1:  # its created_at restarts the age limit: chained as a new start
                self.chain.append(db, f"{kind}.redelivered", seq, now, state=state)
            return count == 1

        return await self.write(unit)

    # The message log -----------------------------------------------------------------

    async def chain_head(self) -> Head:
        return self.chain.head

    async def sign_checkpoint(self, sign: Signer) -> CheckpointRow | None:
        """Sign the head under the write lock (two workers never sign one head twice)
        and store the checkpoint; None when the head is signed already."""

        def unit(db: sqlite3.Connection) -> CheckpointRow | None:
            head = log_chain.read_head(db)
            last = log_chain.latest_checkpoint(db)
            if head.seq == 0 or (last is not None and last.seq >= head.seq):
                return None
            if last is not None and log_chain.hash_at(db, last.seq) != last.hash:
                # Never bless a chain whose signed part changed: `audit verify` names it.
                raise StoreError(
                    f"the chain no longer matches checkpoint {last.id} at seq {last.seq}; not "
                    "signing (run gateway audit verify)"
                )
            at = time.time()
            kid, jws = sign(head, at)
            log_chain.add_checkpoint(db, seq=head.seq, hash=head.hash, at=at, kid=kid, jws=jws)
            return log_chain.latest_checkpoint(db)

        return await self.write(unit)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[_Snapshot]:
        """A read transaction on a connection of its own: one WAL snapshot throughout."""
        db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=10)
        try:
            db.execute("BEGIN")
            if not log_chain.schema_has_chain(db):
                raise StoreError("this store has no message log chain yet (start the gateway once)")
            yield _Snapshot(db)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the message log: {exc}") from exc
        finally:
            db.close()

    # --- archive ---
    async def cut_archived(
        self, marks: Sequence[ArchiveMark], rows: Mapping[str, Sequence[int]], seen_head: int
    ) -> bool:
        """Delete what ``marks`` archived (archived.py), on a connection of its own like
        the purge: one transaction that queues behind group commit."""
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            return archived.cut_archived(db, marks, rows, seen_head)
        finally:
            db.close()

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """An ``flock`` on a file beside the database: every process on this file
        shares it, and the kernel releases it when the holder dies."""
        lock = self.path.with_name(f"{self.path.name}.{name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- end archive ---

    async def purge_bodies(self, cutoff: float, now: float) -> tuple[int, int]:
        """Drop old bodies, keep digests (chain.py); on a connection of its own, so the
        purge's short transactions queue behind group commit like any other process."""
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            return log_chain.purge_bodies(db, HashChain(), cutoff, now)
        finally:
            db.close()


class _Snapshot:
    """``ChainSnapshot`` on a plain connection inside one read transaction. SQLite reads
    take microseconds, so these run on the loop, a chunk of rows at a time."""

    CHUNK = 2000

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @staticmethod
    async def _iterate(rows: Iterator[T]) -> AsyncIterator[T]:
        for n, row in enumerate(rows, 1):
            yield row
            if n % _Snapshot.CHUNK == 0:
                await asyncio.sleep(0)  # let the loop breathe during a long walk

    def chain_rows(self, first: int = 1, last: int | None = None) -> AsyncIterator[ChainRow]:
        return self._iterate(log_chain.chain_rows(self.db, first, last))

    async def checkpoints(self) -> list[CheckpointRow]:
        return log_chain.checkpoints(self.db)

    async def checkpoint_high_water(self) -> int:
        return log_chain.checkpoint_high_water(self.db)

    async def checkpoint_covering(self, seq: int) -> CheckpointRow | None:
        return log_chain.checkpoint_covering(self.db, seq)

    async def find_hash(self, value: str) -> int | None:
        return log_chain.find_hash(self.db, value)

    def data_rows(self, table: str) -> AsyncIterator[dict[str, Any]]:
        return self._iterate(log_chain.data_rows(self.db, table))

    async def messages_by_id(self, message_id: str) -> list[dict[str, Any]]:
        return log_chain.messages_by_id(self.db, message_id)

    async def callbacks_of(self, message_seq: int) -> list[dict[str, Any]]:
        return log_chain.callbacks_of(self.db, message_seq)

    async def own_events(
        self, message_seq: int, callback_seqs: list[int]
    ) -> tuple[int, int] | None:
        return log_chain.own_events(self.db, message_seq, callback_seqs)

    # --- archive ---
    async def archives(self) -> list[ArchiveMark]:
        return archived.archive_marks(self.db)

    # --- end archive ---
