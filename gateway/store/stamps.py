"""RFC 3161 stamps kept with their checkpoints (gateway/timestamping.py), SQLite's SQL.

One ``checkpoint_stamps`` row per checkpoint that an instance has claimed: who holds the
claim and until when (a lease, so that one instance at a time asks the TSA about it), and
once stamped the TSA's DER reply and its time. A checkpoint with no row, or a row without
``tsr``, is unstamped. PostgreSQL's copy of the table is migrations/0007_timestamps.sql.
"""

from __future__ import annotations

import sqlite3

from gateway.store.chain import CheckpointRow

__all__ = ["BACKLOG_SQL", "MIGRATION", "backlog", "claim", "save", "stamps"]

# SQLite migration 12.
MIGRATION = """
    -- Third-party time: the TSA's stamp of each checkpoint (gateway/timestamping.py).
    CREATE TABLE checkpoint_stamps (
        checkpoint_id INTEGER PRIMARY KEY,  -- checkpoints.id
        owner         TEXT    NOT NULL,     -- the instance that holds the claim
        lease_until   REAL    NOT NULL,
        tsr           BLOB,                 -- DER TimeStampResp; NULL until stamped
        gen_time      REAL,                 -- the TSA's time, from the stamp
        stamped_at    REAL
    );
"""

_CHECKPOINT = "c.id, c.seq, c.hash, c.at, c.kid, c.jws"


def claim(
    db: sqlite3.Connection, owner: str, now: float, lease_s: float, limit: int
) -> list[CheckpointRow]:
    """Inside the write transaction: lease the unstamped checkpoints to ``owner``."""
    until = now + lease_s
    db.execute(
        "UPDATE checkpoint_stamps SET owner = ?, lease_until = ? WHERE tsr IS NULL "
        "AND (owner = ? OR lease_until < ?)",
        (owner, until, owner, now),
    ).close()
    db.execute(
        "INSERT OR IGNORE INTO checkpoint_stamps (checkpoint_id, owner, lease_until) "
        "SELECT c.id, ?, ? FROM checkpoints c WHERE NOT EXISTS (SELECT 1 FROM "
        "checkpoint_stamps s WHERE s.checkpoint_id = c.id) ORDER BY c.id LIMIT ?",
        (owner, until, limit),
    ).close()
    rows = db.execute(
        f"SELECT {_CHECKPOINT} FROM checkpoints c JOIN checkpoint_stamps s ON "
        "s.checkpoint_id = c.id WHERE s.tsr IS NULL AND s.owner = ? ORDER BY c.id LIMIT ?",
        (owner, limit),
    ).fetchall()
    return [CheckpointRow(id=r[0], seq=r[1], hash=r[2], at=r[3], kid=r[4], jws=r[5]) for r in rows]


def save(
    db: sqlite3.Connection, owner: str, checkpoint_id: int, tsr: bytes, gen_time: float, now: float
) -> bool:
    cursor = db.execute(
        "UPDATE checkpoint_stamps SET tsr = ?, gen_time = ?, stamped_at = ? "
        "WHERE checkpoint_id = ? AND owner = ? AND tsr IS NULL",
        (tsr, gen_time, now, checkpoint_id, owner),
    )
    count = cursor.rowcount
    cursor.close()
    return count == 1


# (checkpoints without a stamp, when the oldest of them was signed); the same on PostgreSQL.
BACKLOG_SQL = (
    "SELECT COUNT(*), MIN(c.at) FROM checkpoints c LEFT JOIN checkpoint_stamps s "
    "ON s.checkpoint_id = c.id WHERE s.tsr IS NULL"
)


def backlog(row: tuple[object, ...] | sqlite3.Row) -> tuple[int, float | None]:
    count, oldest = row[0], row[1]
    assert isinstance(count, int)
    return count, (float(oldest) if isinstance(oldest, int | float) else None)


def stamps(db: sqlite3.Connection) -> dict[int, bytes]:
    """Every kept stamp; none from a store that predates the table (a read-only verify)."""
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoint_stamps'"
    ).fetchone():
        return {}
    rows = db.execute(
        "SELECT checkpoint_id, tsr FROM checkpoint_stamps WHERE tsr IS NOT NULL "
        "ORDER BY checkpoint_id"
    )
    return {int(r[0]): bytes(r[1]) for r in rows}
