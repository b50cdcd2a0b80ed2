"""The message log's archived prefix, in SQLite (the PostgreSQL twin is in postgres.py).

``gateway log archive`` (gateway/audit/archive.py) writes the oldest part of the chain and
the rows it describes to signed archive files, then *cuts* it here: one transaction
deletes those rows and chain records and adds one ``log_archives`` row per file. The
live chain then starts after the last archived record; ``audit verify`` starts its walk
from that row's ``last_hash`` (docs/audit.md, "Archives").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import StoreError

__all__ = ["MIGRATION", "ArchiveMark", "archive_marks", "cut_archived"]

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


_COLUMNS = "id, name, digest, first_seq, last_seq, last_hash, rows, bytes, before, at"


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
        mark_of(tuple(r)) for r in db.execute(f"SELECT {_COLUMNS} FROM log_archives ORDER BY id")
    ]


def cut_archived(
    db: sqlite3.Connection,
    marks: Sequence[ArchiveMark],
    rows: Mapping[str, Sequence[int]],
    seen_head: int,
) -> bool:
    """Delete what ``marks`` archived, in one transaction; False (nothing changed) when
    the log moved in a way the archive did not see: another cut, a changed record, or an
    event after ``seen_head`` about an archived row."""
    first, last = marks[0], marks[-1]
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            ok = _guards_hold(db, first, last, rows, seen_head)
            if ok:
                for table in ("callbacks", "messages", "rejections"):
                    db.executemany(
                        f"DELETE FROM {table} WHERE seq = ?", [(s,) for s in rows.get(table, ())]
                    )
                db.execute("DELETE FROM log_chain WHERE seq <= ?", (last.last_seq,))
                db.executemany(
                    f"INSERT INTO log_archives ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [
                        (m.id, m.name, m.digest, m.first_seq, m.last_seq, m.last_hash, m.rows,
                         m.bytes, json.dumps(dict(m.before), sort_keys=True), m.at)
                        for m in marks
                    ],
                )  # fmt: skip
            db.execute("COMMIT" if ok else "ROLLBACK")
            return ok
        except BaseException:
            db.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StoreError(f"cannot cut the archived records: {exc}") from exc


def _guards_hold(
    db: sqlite3.Connection,
    first: ArchiveMark,
    last: ArchiveMark,
    rows: Mapping[str, Sequence[int]],
    seen_head: int,
) -> bool:
    low = db.execute("SELECT MIN(seq), MAX(seq) FROM log_chain").fetchone()
    at_last = db.execute("SELECT hash FROM log_chain WHERE seq = ?", (last.last_seq,)).fetchone()
    if low[0] != first.first_seq or at_last is None or at_last[0] != last.last_hash:
        return False
    if int(low[1]) <= last.last_seq:  # the head record always stays
        return False
    messages = set(rows.get("messages", ()))
    callbacks = set(rows.get("callbacks", ()))
    for kind, ref, facts in db.execute(
        "SELECT kind, ref, facts FROM log_chain WHERE seq > ?", (seen_head,)
    ):
        if (kind.startswith("message.") and ref in messages) or (
            kind.startswith("callback.") and ref in callbacks
        ):
            return False
        if kind == "callback.accepted" and json.loads(facts).get("original_seq") in messages:
            return False
    return True
