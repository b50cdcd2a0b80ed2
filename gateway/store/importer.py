"""Moving in: copy a SQLite store into an empty PostgreSQL one (``gateway store import``).

Every row is copied as it is (binary COPY, one transaction: all or nothing), with its
``seq``: the hash chain refers to rows by seq and covers their exact values, so the chain
verifies in PostgreSQL afterwards. The sequences then continue after the copied rows and
the head row points at the copied chain's last record.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.errors import StoreError
from gateway.store.pgcommit import Tx
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore

__all__ = ["TABLES", "import_sqlite"]

# (SQLite table, PostgreSQL table), parents before children.
TABLES = (
    ("messages", "messages"),
    ("callbacks", "callbacks"),
    ("rejections", "rejections"),
    ("resources", "resources"),
    ("admin_changes", "admin_changes"),
    ("admin_tokens", "admin_tokens"),
    ("log_chain", "log_chain"),
    ("checkpoints", "checkpoints"),
    ("nonces", "nonces"),
)
CHUNK = 5000


def _converter(pg_type: str) -> Any:
    """SQLite's loose typing to the column's type (lease owners were pids: now text)."""
    if pg_type == "bytea":
        return lambda v: v.encode() if isinstance(v, str) else v
    if pg_type == "text":
        return lambda v: str(v) if isinstance(v, int | float) else v
    if pg_type == "double precision":
        return lambda v: float(v) if isinstance(v, int) else v
    return lambda v: v


def _chunks(
    db: sqlite3.Connection, sql: str, convert: list[Any]
) -> Iterator[list[tuple[Any, ...]]]:
    cursor = db.execute(sql)
    while rows := cursor.fetchmany(CHUNK):
        yield [
            tuple(None if v is None else f(v) for f, v in zip(convert, row, strict=True))
            for row in rows
        ]


def _open_readonly(source: Path) -> sqlite3.Connection:
    if not source.is_file():
        raise StoreError(f"no store at {source}")
    return sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True)


async def import_sqlite(source: Path, target: PostgresStore) -> dict[str, int]:
    """Copy ``source`` into ``target`` (open, migrated, empty); rows copied per table."""
    db = _open_readonly(source)
    db.close()
    # Bring the file to the current schema first (an older file has no admin_changes).
    migrated = SQLiteStore(source)
    await migrated.open()
    await migrated.close()
    if not await target.is_empty():
        raise StoreError(
            "the PostgreSQL store already holds messages or a chain: import into an empty database"
        )
    db = _open_readonly(source)
    try:
        counts: dict[str, int] = {}
        high_water = db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'checkpoints'"
        ).fetchone()

        async def unit(tx: Tx) -> None:
            # The genesis record the empty database made at migration gives way to the
            # copied chain (which has its own genesis).
            await tx.conn.execute("DELETE FROM log_chain")
            for src, dst in TABLES:
                types = {
                    r["column_name"]: r["data_type"]
                    for r in await tx.conn.fetch(
                        "SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_schema = current_schema() AND table_name = $1",
                        dst,
                    )
                }
                have = [r[1] for r in db.execute(f"PRAGMA table_info({src})")]
                columns = [c for c in have if c in types]
                convert = [_converter(types[c]) for c in columns]
                total = 0
                for chunk in _chunks(db, f"SELECT {', '.join(columns)} FROM {src}", convert):
                    await tx.conn.copy_records_to_table(dst, records=chunk, columns=columns)
                    total += len(chunk)
                counts[dst] = total

        await target.write(unit)
        await target.finish_import(checkpoint_high_water=int(high_water[0]) if high_water else 0)
        return counts
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {source}: {exc}") from exc
    finally:
        db.close()
