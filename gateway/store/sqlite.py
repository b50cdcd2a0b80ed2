"""The embedded store: SQLite in WAL mode through aiosqlite, with versioned migrations."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from gateway.config.secretstore import SecretBox
from gateway.errors import StoreError, StoreReadOnly
from gateway.store import archived
from gateway.store import chain as log_chain
from gateway.store import stamps as log_stamps
from gateway.store.archived import MIGRATION as ARCHIVE_MIGRATION
from gateway.store.archived import ArchiveMark
from gateway.store.batch import GroupCommit, Unit
from gateway.store.body import Dialect, StoreBody, TxUnit, opened
from gateway.store.chain import MIGRATION as CHAIN_MIGRATION
from gateway.store.chain import ChainRow, CheckpointRow, HashChain, Head
from gateway.store.records import Signer, instance_id
from gateway.store.stamps import MIGRATION as STAMPS_MIGRATION
from gateway.store.statements import Insert

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
    -- Data keys (gateway/config/secretstore.py): random AEAD keys, each wrapped by the
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
    """
    -- 11: operational monitoring (issue 25, gateway/store/oprecords.py): a row per
    -- exchange, callback and outbox attempt, apart from the evidence log (no chain, no
    -- bodies), pruned by its own retention. Members page their own rows newest first.
    CREATE TABLE monitoring_records (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        kind           TEXT    NOT NULL,
        received_at    REAL    NOT NULL,
        message_id     TEXT,
        seq            INTEGER,
        correlation_id TEXT,
        client         TEXT,
        service        TEXT,
        target         TEXT,
        adapter        TEXT,
        via            TEXT,
        relay          TEXT,
        verified_ms    REAL,
        validated_ms   REAL,
        upstream_ms    REAL,
        answered_ms    REAL,
        delivered_ms   REAL,
        duration_ms    REAL    NOT NULL,
        request_size   INTEGER,
        response_size  INTEGER,
        status         INTEGER,
        code           TEXT,
        outcome        TEXT,
        ok             INTEGER NOT NULL,
        attempt        INTEGER,
        instance       TEXT    NOT NULL,
        trace_id       TEXT
    );
    CREATE INDEX monitoring_client ON monitoring_records (client, id);
    CREATE INDEX monitoring_received ON monitoring_records (received_at);
    """,
    # --- tsa ---
    STAMPS_MIGRATION,  # 12: checkpoint_stamps (gateway/store/stamps.py)
    # --- end tsa ---
    # --- archive ---
    ARCHIVE_MIGRATION,  # 13: log_archives (gateway/store/archived.py)
    # --- end archive ---
)


_SQLITE = Dialect(
    name="sqlite",
    skip_locked="",  # one writer at a time: the write lock is the claim's only lock
    arrays=False,
    directory_key=("id", "1"),
    restart_voids_all=True,
)


def fault(exc: BaseException, doing: str) -> StoreError:
    """The store's own error for a sqlite3 one, or for a batch's ``StoreError`` caused by
    one (readiness and logs show a stable kind)."""
    cause = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ else exc
    if isinstance(cause, sqlite3.Error) and (
        getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY
        or "readonly" in str(cause)
    ):
        return StoreReadOnly(f"{doing} failed: the store is read-only ({cause})")
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"{doing} failed: {exc}")


def _drive(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a unit's coroutine to its end in one go: SQLite's statements never wait, so a
    unit never suspends, and the group commit runs it as the plain function it is."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coroutine.close()
    raise StoreError("a store unit waited for something other than its statements")


class _Tx:
    """``Tx`` on the write connection inside the group commit's transaction: each
    statement runs at once, and a chain event is appended at once (``HashChain``)."""

    __slots__ = ("chain_", "db", "wake")

    def __init__(self, db: sqlite3.Connection, chain: HashChain) -> None:
        self.db, self.chain_ = db, chain
        self.wake = False  # workers on one file poll: nobody to wake

    async def execute(self, sql: str, *params: Any) -> int:
        cursor = self.db.execute(sql, params)
        count = cursor.rowcount
        cursor.close()
        return count

    async def fetch(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        return self.db.execute(sql, params).fetchall()

    async def fetchrow(self, sql: str, *params: Any) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(sql, params).fetchone()
        return row

    async def fetchval(self, sql: str, *params: Any) -> Any:
        row = self.db.execute(sql, params).fetchone()
        return row[0] if row is not None else None

    async def insert(self, insert: Insert, *values: Any) -> int | None:
        cursor = self.db.execute(insert.bare, values)
        seq = cursor.lastrowid if cursor.rowcount == 1 else None
        cursor.close()
        return seq

    async def insert_many(self, insert: Insert, rows: Sequence[Sequence[Any]]) -> list[int | None]:
        return [await self.insert(insert, *row) for row in rows]

    def chain(self, kind: str, ref: int | None, at: float, **facts: Any) -> None:
        self.chain_.append(self.db, kind, ref, at, **facts)

    async def notify(self, channel: str, payload: str) -> None:
        """Nobody listens: other processes on the file poll."""


class SQLiteStore(StoreBody):
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

    dialect = _SQLITE
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
        return opened(self._db)

    @property
    def writer(self) -> sqlite3.Connection:
        """The write connection; only ``GroupCommit`` runs statements on it."""
        return opened(self._writer)

    @property
    def batch(self) -> GroupCommit:
        return opened(self._batch)

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
            # archive: reads (the data keys that open bodies sealed at rest) on a
            # read-only connection; every write is refused by SQLite itself.
            try:
                ro = sqlite3.connect(
                    self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=10
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
            ro.row_factory = sqlite3.Row
            self._db = self._writer = ro
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
        for connection in {id(c): c for c in (self._db, self._writer) if c is not None}.values():
            connection.close()
        self._db = self._writer = None

    async def write(self, unit: Unit[T]) -> T:
        """Run ``unit`` (a plain function of the write connection) in the next group
        commit (batch.py); the body's units come through ``transact``."""
        try:
            return await self.batch.run(unit)
        except sqlite3.IntegrityError:
            raise
        except (sqlite3.Error, StoreError) as exc:
            mapped = fault(exc, "store write")
            if mapped is exc:
                raise
            raise mapped from exc

    async def transact(self, unit: TxUnit[T]) -> T:
        """Run a body unit in the next group commit: on the write connection, in one go."""
        chain = self.chain
        return await self.write(lambda db: _drive(unit(_Tx(db, chain))))

    async def fetch(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        return self._rows(sql, params)

    async def fetch_slow(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        """A scan (about 15 ms for 100,000 outbox rows) in the maintenance connection's
        thread, off the loop."""
        maintenance = opened(self._maintenance)
        try:
            async with maintenance.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise fault(exc, "store query") from exc

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
            raise fault(exc, "store query") from exc

    async def wait_for_config_change(self, timeout_s: float) -> None:
        """SQLite notifies no one: the caller polls ``config_version`` after the timeout."""
        await asyncio.sleep(timeout_s)

    # The message log: kept in memory by ``HashChain``, checkpoints in ``sqlite_sequence``

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

    # --- tsa ---
    async def stamps(self) -> dict[int, bytes]:
        return log_stamps.stamps(self.db)

    # --- end tsa ---

    # --- archive ---
    async def archives(self) -> list[ArchiveMark]:
        return archived.archive_marks(self.db)

    # --- end archive ---
