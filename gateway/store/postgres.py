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
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, TypeVar

import asyncpg

from gateway.config.secretstore import SecretBox
from gateway.errors import StoreError, StoreReadOnly, StoreUnavailable
from gateway.store.archived import ARCHIVE_COLUMNS, ArchiveMark, mark_of
from gateway.store.body import CONFIG_CHANNEL, Dialect, StoreBody, opened
from gateway.store.chain import (
    CHAIN_COLUMNS,
    DATA_COLUMNS,
    GENESIS,
    ChainRow,
    CheckpointRow,
    Head,
    chain_row,
    checkpoint_row,
)
from gateway.store.pgcommit import (
    OUTBOX_CHANNEL,
    Conn,
    PgGroupCommit,
    PgUnit,
    Tx,
    append_events,
    numbered,
)
from gateway.store.records import Signer

__all__ = ["MIGRATION_LOCK", "Migration", "PostgresStore", "SchemaTooNew", "fault", "migrations"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")
MIGRATION_LOCK = 0x6777_6D69  # pg_advisory_lock key: "gwmi"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_POSTGRES = Dialect(
    name="postgresql",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    arrays=True,
    directory_key=("one", "true"),
    restart_voids_all=False,
    head_lock="SELECT 1 FROM log_head FOR UPDATE",  # archive: as every append takes it
)
# Driver errors: what the store raises instead (its own tree, gateway/errors.py).
_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)
_READ_ONLY = "25006"  # read_only_sql_transaction: a replica, default_transaction_read_only


def fault(exc: BaseException, doing: str) -> StoreError:
    """The store's own error for a driver's (readiness and logs show a stable kind)."""
    cause = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ else exc
    state = getattr(cause, "sqlstate", None) or ""
    if state == _READ_ONLY:
        return StoreReadOnly(f"{doing} failed: the store is read-only ({cause})")
    lost = OSError | asyncpg.InterfaceError | asyncpg.InternalClientError
    if isinstance(cause, lost) or state[:2] in ("08", "57"):
        return StoreUnavailable(f"{doing} failed: the store is unavailable ({cause})")
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"{doing} failed: {exc}")


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


class _Snapshot:
    """``ChainSnapshot`` on one connection in a REPEATABLE READ, READ ONLY transaction."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def chain_rows(self, first: int = 1, last: int | None = None) -> AsyncIterator[ChainRow]:
        sql = f"SELECT {CHAIN_COLUMNS} FROM log_chain WHERE seq >= $1"
        params: list[Any] = [first]
        if last is not None:
            sql += " AND seq <= $2"
            params.append(last)
        async for r in self.conn.cursor(sql + " ORDER BY seq", *params, prefetch=2000):
            yield chain_row(r)

    async def checkpoints(self) -> list[CheckpointRow]:
        rows = await self.conn.fetch(
            "SELECT id, seq, hash, at, kid, jws FROM checkpoints ORDER BY id"
        )
        return [checkpoint_row(r) for r in rows]

    async def checkpoint_high_water(self) -> int:
        return int(await self.conn.fetchval("SELECT checkpoint_id FROM log_head") or 0)

    # --- tsa ---
    async def stamps(self) -> dict[int, bytes]:
        if not await self.conn.fetchval("SELECT to_regclass('checkpoint_stamps') IS NOT NULL"):
            return {}  # a database migrated by older code (a read-only verify)
        rows = await self.conn.fetch(
            "SELECT checkpoint_id, tsr FROM checkpoint_stamps WHERE tsr IS NOT NULL "
            "ORDER BY checkpoint_id"
        )
        return {int(r["checkpoint_id"]): bytes(r["tsr"]) for r in rows}

    # --- end tsa ---

    async def checkpoint_covering(self, seq: int) -> CheckpointRow | None:
        row = await self.conn.fetchrow(
            "SELECT id, seq, hash, at, kid, jws FROM checkpoints WHERE seq >= $1 "
            "ORDER BY seq, id LIMIT 1",
            seq,
        )
        return checkpoint_row(row) if row else None

    async def find_hash(self, value: str) -> int | None:
        seq = await self.conn.fetchval("SELECT seq FROM log_chain WHERE hash = $1 LIMIT 1", value)
        return int(seq) if seq is not None else None

    async def data_rows(self, table: str) -> AsyncIterator[dict[str, Any]]:
        sql = f"SELECT {DATA_COLUMNS[table]} FROM {table} ORDER BY seq"
        async for r in self.conn.cursor(sql, prefetch=1000):
            yield dict(r.items())

    async def messages_by_id(self, message_id: str) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            f"SELECT {DATA_COLUMNS['messages']} FROM messages WHERE message_id = $1 ORDER BY seq",
            message_id,
        )
        return [dict(r.items()) for r in rows]

    async def callbacks_of(self, message_seq: int) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            f"SELECT {DATA_COLUMNS['callbacks']} FROM callbacks WHERE original_seq = $1 "
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
        rows = await self.conn.fetch(f"SELECT {ARCHIVE_COLUMNS} FROM log_archives ORDER BY id")
        return [mark_of(tuple(r.values())) for r in rows]

    # --- end archive ---


# --- lean ---
class _Connection(asyncpg.Connection):
    """A pooled connection released without reset statements.

    asyncpg's default sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release: a round trip per release, more than half of the statements
    of a sync exchange (docs/decisions.md, "A lean exchange"). The store leaves no session
    state on a pooled connection: no ``SET``, no ``LISTEN`` (the listener has a connection
    of its own), cursors only inside transactions, the migration lock released in a
    ``finally``; and asyncpg still rolls back a transaction left open on release."""

    def get_reset_query(self) -> str:
        return ""


# --- end lean ---


class PostgresStore(StoreBody):
    """``Store`` on a PostgreSQL database shared by any number of instances.

    One pool: reads take any connection, the group commit one at a time for its batch.
    """

    dialect = _POSTGRES
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
        return opened(self._pool)

    @property
    def batch(self) -> PgGroupCommit:
        return opened(self._batch)

    async def open_pool(self) -> asyncpg.Pool:
        """Connect, without looking at the schema (``gateway store migrate``)."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.POOL_SIZE,
                command_timeout=60,
                connection_class=_Connection,  # lean
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
        """Run ``unit`` (an async function of the batch's ``Tx``) in the next group commit
        (pgcommit.py); a driver's error comes out as the store's own."""
        try:
            return await self.batch.run(unit)
        except (*_DRIVER_ERRORS, StoreError) as exc:
            mapped = fault(exc, "store write")
            if mapped is exc:
                raise
            raise mapped from exc

    transact = write  # the batch's Tx is the body's (pgcommit.py)

    async def fetch(self, sql: str, *params: Any) -> list[asyncpg.Record]:
        try:
            async with self.pool.acquire() as conn:
                return list(await conn.fetch(numbered(sql), *params))
        except _DRIVER_ERRORS as exc:
            raise fault(exc, "store query") from exc

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

    # The message log: the head row ``log_head`` (its lock orders every batch's chain)

    async def chain_head(self) -> Head:
        rows = await self.fetch("SELECT seq, hash FROM log_head")
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

    # Moving in -----------------------------------------------------------------------

    async def is_empty(self) -> bool:
        """No message, callback, rejection or chain record but the genesis yet (``store
        import``)."""
        return bool(
            await self._fetchval(
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
            # The configuration version goes on from the copied one (gateway/runtime/live.py).
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
