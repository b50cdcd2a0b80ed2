"""RFC 3161 stamps kept with their checkpoints (gateway/audit/timestamping.py): SQLite's table
and the snapshot's read of it (the claims and writes are ``StoreBody``'s, body.py).

One ``checkpoint_stamps`` row per checkpoint that an instance has claimed: who holds the
claim and until when (a lease, so that one instance at a time asks the TSA about it), and
once stamped the TSA's DER reply and its time. A checkpoint with no row, or a row without
``tsr``, is unstamped. PostgreSQL's copy of the table is migrations/0007_timestamps.sql.
"""

from __future__ import annotations

import sqlite3

__all__ = ["MIGRATION", "stamps"]

# SQLite migration 12.
MIGRATION = """
    -- Third-party time: the TSA's stamp of each checkpoint (gateway/audit/timestamping.py).
    CREATE TABLE checkpoint_stamps (
        checkpoint_id INTEGER PRIMARY KEY,  -- checkpoints.id
        owner         TEXT    NOT NULL,     -- the instance that holds the claim
        lease_until   REAL    NOT NULL,
        tsr           BLOB,                 -- DER TimeStampResp; NULL until stamped
        gen_time      REAL,                 -- the TSA's time, from the stamp
        stamped_at    REAL
    );
"""


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
