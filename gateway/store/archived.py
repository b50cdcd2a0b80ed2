"""The message log's archived prefix, in SQLite (the PostgreSQL twin is in postgres.py).

``gateway log archive`` (gateway/audit/archive.py) writes the oldest part of the chain and
the rows it describes to signed archive files, then *cuts* it (``StoreBody.cut_archived``):
one transaction deletes those rows and chain records and adds one ``log_archives`` row
(and one chained ``archive`` event) per file. The
live chain then starts after the last archived record; ``audit verify`` starts its walk
from that row's ``last_hash`` (docs/audit.md, "Archives").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ARCHIVE_COLUMNS", "MIGRATION", "ArchiveMark", "archive_marks", "mark_of"]

# Migration 13 (``MIGRATIONS`` in sqlite.py; PostgreSQL: migrations/0008_archive.sql).
MIGRATION = """
    CREATE TABLE log_archives (
        id        INTEGER PRIMARY KEY, -- 1, 2, 3 … in chain order
        name      TEXT    NOT NULL UNIQUE,
        digest    TEXT    NOT NULL,    -- sha256 of the whole archive file
        first_seq INTEGER NOT NULL,
        last_seq  INTEGER NOT NULL,
        last_hash TEXT    NOT NULL,    -- the chain hash at last_seq: the live chain links to it
        rows      INTEGER NOT NULL,    -- messages + callbacks + rejections moved out
        bytes     INTEGER NOT NULL,
        before    TEXT    NOT NULL,    -- the genesis marks, carried for the live verify (JSON)
        at        REAL    NOT NULL
    );
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchiveMark:
    """One archive file the store has handed its records to."""

    id: int
    name: str
    digest: str
    first_seq: int
    last_seq: int
    last_hash: str
    rows: int
    bytes: int
    before: Mapping[str, int]
    at: float

    def chained(self) -> dict[str, Any]:
        """The facts of the ``archive`` event that records this cut in the chain."""
        return {
            "name": self.name,
            "digest": self.digest,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
        }


ARCHIVE_COLUMNS = "id, name, digest, first_seq, last_seq, last_hash, rows, bytes, before, at"


def mark_of(r: Mapping[str, Any] | Sequence[Any]) -> ArchiveMark:
    v = list(r.values()) if isinstance(r, Mapping) else list(r)
    return ArchiveMark(
        id=int(v[0]),
        name=str(v[1]),
        digest=str(v[2]),
        first_seq=int(v[3]),
        last_seq=int(v[4]),
        last_hash=str(v[5]),
        rows=int(v[6]),
        bytes=int(v[7]),
        before={k: int(n) for k, n in json.loads(v[8]).items()},
        at=float(v[9]),
    )


def archive_marks(db: sqlite3.Connection) -> list[ArchiveMark]:
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='log_archives'"
    ).fetchone()
    if exists is None:
        return []
    return [
        mark_of(tuple(r))
        for r in db.execute(f"SELECT {ARCHIVE_COLUMNS} FROM log_archives ORDER BY id")
    ]
