"""The tamper-evident message log's storage: a hash chain beside the message tables.

Each evidential event (a message accepted, its outcome, a callback, a state change, a
rejection, a purge) appends one ``log_chain`` row in the same transaction as the rows it
describes. A row holds the event's *facts* (ids, members, digests, states, times; never a
body) as canonical JSON, ``content_digest = sha256(facts)`` and
``hash = sha256(prev_hash ":" content_digest)``. Bodies can therefore be purged while the
chain still verifies. Verification and signing live in ``gateway.audit``; SQL lives here.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import StoreError
from gateway.states import IN_DELIVERY, CallbackState

__all__ = [
    "CHAIN_COLUMNS",
    "DATA_COLUMNS",
    "GENESIS",
    "MIGRATION",
    "ChainRow",
    "CheckpointRow",
    "HashChain",
    "Head",
    "add_checkpoint",
    "body_digest",
    "callbacks_of",
    "canonical",
    "chain_rows",
    "checkpoint_covering",
    "checkpoint_high_water",
    "checkpoints",
    "content_digest",
    "data_rows",
    "find_hash",
    "hash_at",
    "latest_checkpoint",
    "link",
    "messages_by_id",
    "own_events",
    "purge_bodies",
    "read_head",
    "schema_has_chain",
]

GENESIS = "0" * 64  # the prev_hash of the first record

# Migration 3 (see ``MIGRATIONS`` in sqlite.py). ``seq`` is given by the writer, not
# AUTOINCREMENT: a writer that lost a race to another process sees the conflict.
MIGRATION = """
    CREATE TABLE log_chain (
        seq            INTEGER PRIMARY KEY,
        at             REAL    NOT NULL,
        kind           TEXT    NOT NULL,
        ref            INTEGER,          -- messages.seq, callbacks.seq or rejections.seq
        facts          TEXT    NOT NULL, -- canonical JSON, what content_digest covers
        content_digest TEXT    NOT NULL,
        prev_hash      TEXT    NOT NULL,
        hash           TEXT    NOT NULL
    );
    CREATE TABLE checkpoints (
        id    INTEGER PRIMARY KEY AUTOINCREMENT,
        seq   INTEGER NOT NULL,  -- the chain record whose hash is signed
        hash  TEXT    NOT NULL,
        at    REAL    NOT NULL,
        kid   TEXT    NOT NULL,
        jws   TEXT    NOT NULL   -- compact JWS over {gateway, seq, hash, at}
    );
"""


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical(facts: Mapping[str, Any]) -> str:
    """Sorted keys, no spaces, ASCII only: the same text on every platform."""
    return _CANONICAL.encode(facts)


def content_digest(facts_text: str) -> str:
    return hashlib.sha256(facts_text.encode("ascii")).hexdigest()


def link(prev_hash: str, digest: str) -> str:
    """A record's hash: it covers the previous record's hash and its own content digest."""
    return hashlib.sha256(f"{prev_hash}:{digest}".encode("ascii")).hexdigest()


def body_digest(body: bytes | None) -> str | None:
    return None if body is None else hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    hash: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainRow:
    seq: int
    at: float
    kind: str
    ref: int | None
    facts: str
    content_digest: str
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointRow:
    id: int
    seq: int
    hash: str
    at: float
    kid: str
    jws: str


class HashChain:
    """The chain's head, read once at open and then kept in memory.

    ``append`` runs inside the caller's transaction; the caller restores ``head`` when
    that transaction rolls back (``SQLiteStore._chained`` does).
    """

    def __init__(self) -> None:
        self.head = Head(0, GENESIS)

    def load(self, db: sqlite3.Connection) -> None:
        self.head = read_head(db)

    def append(
        self, db: sqlite3.Connection, kind: str, ref: int | None, at: float, **facts: Any
    ) -> Head:
        for retry in (False, True):
            seq = self.head.seq + 1
            text = canonical({"kind": kind, "seq": seq, "ref": ref, "at": at, **facts})
            digest = content_digest(text)
            new = link(self.head.hash, digest)
            try:
                db.execute(
                    "INSERT INTO log_chain (seq, at, kind, ref, facts, content_digest, prev_hash, "
                    "hash) VALUES (?,?,?,?,?,?,?,?)",
                    (seq, at, kind, ref, text, digest, self.head.hash, new),
                ).close()
            except sqlite3.IntegrityError as exc:
                if retry:
                    raise StoreError(f"cannot append to the message log: {exc}") from exc
                # Another process (the CLI) appended since we read the head; we hold the
                # write lock now, so the head we read again is the real one.
                self.load(db)
                continue
            except sqlite3.Error as exc:
                raise StoreError(f"cannot append to the message log: {exc}") from exc
            self.head = Head(seq, new)
            break
        return self.head

    def genesis(self, db: sqlite3.Connection, at: float) -> None:
        """Start an empty chain; records already in the tables predate it."""
        if self.head.seq:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            self.load(db)
            if not self.head.seq:
                sql = "SELECT COALESCE(MAX(seq), 0) FROM {}"
                marks = {
                    table: int(db.execute(sql.format(table)).fetchone()[0])
                    for table in ("messages", "callbacks", "rejections")
                }
                self.append(db, "genesis", None, at, before=marks)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self.head = Head(0, GENESIS)
            raise


def schema_has_chain(db: sqlite3.Connection) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='log_chain'")
    return row.fetchone() is not None


def read_head(db: sqlite3.Connection) -> Head:
    row = db.execute("SELECT seq, hash FROM log_chain ORDER BY seq DESC LIMIT 1").fetchone()
    return Head(int(row[0]), str(row[1])) if row else Head(0, GENESIS)


def _chain_row(r: sqlite3.Row | tuple[Any, ...]) -> ChainRow:
    return ChainRow(
        seq=r[0],
        at=r[1],
        kind=r[2],
        ref=r[3],
        facts=r[4],
        content_digest=r[5],
        prev_hash=r[6],
        hash=r[7],
    )


CHAIN_COLUMNS = "seq, at, kind, ref, facts, content_digest, prev_hash, hash"


def chain_rows(
    db: sqlite3.Connection, first: int = 1, last: int | None = None
) -> Iterator[ChainRow]:
    sql = f"SELECT {CHAIN_COLUMNS} FROM log_chain WHERE seq >= ?"
    params: list[Any] = [first]
    if last is not None:
        sql += " AND seq <= ?"
        params.append(last)
    for r in db.execute(sql + " ORDER BY seq", params):
        yield _chain_row(r)


def hash_at(db: sqlite3.Connection, seq: int) -> str | None:
    row = db.execute("SELECT hash FROM log_chain WHERE seq = ?", (seq,)).fetchone()
    return str(row[0]) if row else None


def find_hash(db: sqlite3.Connection, value: str) -> int | None:
    """Which record has this hash (a scan: only ever asked about a broken link)."""
    row = db.execute("SELECT seq FROM log_chain WHERE hash = ? LIMIT 1", (value,)).fetchone()
    return int(row[0]) if row else None


def own_events(
    db: sqlite3.Connection, message_seq: int, callback_seqs: list[int]
) -> tuple[int, int] | None:
    """The first and last chain records about one message and its callbacks."""
    marks = ",".join("?" * len(callback_seqs)) or "NULL"
    row = db.execute(
        "SELECT MIN(seq), MAX(seq) FROM log_chain WHERE (kind LIKE 'message.%' AND ref = ?) "
        f"OR (kind LIKE 'callback.%' AND ref IN ({marks}))",
        (message_seq, *callback_seqs),
    ).fetchone()
    return None if row[0] is None else (int(row[0]), int(row[1]))


def _checkpoint(r: sqlite3.Row | tuple[Any, ...]) -> CheckpointRow:
    return CheckpointRow(id=r[0], seq=r[1], hash=r[2], at=r[3], kid=r[4], jws=r[5])


def checkpoints(db: sqlite3.Connection) -> list[CheckpointRow]:
    rows = db.execute("SELECT id, seq, hash, at, kid, jws FROM checkpoints ORDER BY id")
    return [_checkpoint(r) for r in rows]


def checkpoint_high_water(db: sqlite3.Connection) -> int:
    """The highest checkpoint id ever handed out (AUTOINCREMENT remembers deleted ones)."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'checkpoints'").fetchone()
    return int(row[0]) if row else 0


def latest_checkpoint(db: sqlite3.Connection) -> CheckpointRow | None:
    row = db.execute(
        "SELECT id, seq, hash, at, kid, jws FROM checkpoints ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return _checkpoint(row) if row else None


def checkpoint_covering(db: sqlite3.Connection, seq: int) -> CheckpointRow | None:
    """The first checkpoint at or after chain record ``seq``."""
    row = db.execute(
        "SELECT id, seq, hash, at, kid, jws FROM checkpoints WHERE seq >= ? ORDER BY seq, id "
        "LIMIT 1",
        (seq,),
    ).fetchone()
    return _checkpoint(row) if row else None


def add_checkpoint(
    db: sqlite3.Connection, *, seq: int, hash: str, at: float, kid: str, jws: str
) -> None:
    try:
        db.execute(
            "INSERT INTO checkpoints (seq, hash, at, kid, jws) VALUES (?,?,?,?,?)",
            (seq, hash, at, kid, jws),
        ).close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot store a checkpoint: {exc}") from exc


DATA_COLUMNS = {
    "messages": "seq, message_id, client, service, mode, state, target, request_headers, "
    "request_body, request_digest, status, code, response_body, result, created_at",
    "callbacks": "seq, message_id, client, correlation_id, original_seq, service, headers, body, "
    "digest, state, created_at",
    "rejections": "seq, at, client, message_id, service, status, code, digest, size",
}


def data_rows(db: sqlite3.Connection, table: str) -> Iterator[dict[str, Any]]:
    """Every row of ``messages``, ``callbacks`` or ``rejections`` with the chained columns."""
    cursor = db.execute(f"SELECT {DATA_COLUMNS[table]} FROM {table} ORDER BY seq")
    names = [d[0] for d in cursor.description]
    for r in cursor:
        yield dict(zip(names, r, strict=True))


def messages_by_id(db: sqlite3.Connection, message_id: str) -> list[dict[str, Any]]:
    cursor = db.execute(
        f"SELECT {DATA_COLUMNS['messages']} FROM messages WHERE message_id = ? ORDER BY seq",
        (message_id,),
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor]


def callbacks_of(db: sqlite3.Connection, message_seq: int) -> list[dict[str, Any]]:
    cursor = db.execute(
        f"SELECT {DATA_COLUMNS['callbacks']} FROM callbacks WHERE original_seq = ? ORDER BY seq",
        (message_seq,),
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor]


def purge_bodies(
    db: sqlite3.Connection, chain: HashChain, cutoff: float, now: float, batch: int = 500
) -> tuple[int, int]:
    """Drop the bodies of finished records created before ``cutoff``; keep every digest.

    The purge is chained first (so a verifier knows these bodies may be gone), then done in
    short transactions that never hold the write lock for long. ``callbacks.body`` is
    NOT NULL since schema 1, so a purged callback body is the empty blob.
    """
    head = chain.head
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            chain.load(db)  # under the write lock: the real head, whoever wrote it
            chain.append(db, "purge", None, now, cutoff=cutoff)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            chain.head = head
            raise
        return _purge(db, cutoff, batch)
    except sqlite3.Error as exc:
        raise StoreError(f"purge failed: {exc}") from exc


# What a purge never touches: messages still on their way (state literals from states.py).
_IN_DELIVERY = "(" + ", ".join(f"'{state.value}'" for state in IN_DELIVERY) + ")"


def _purge(db: sqlite3.Connection, cutoff: float, batch: int) -> tuple[int, int]:
    counts = []
    for sql in (
        "UPDATE messages SET request_body=NULL, response_body=NULL, result=NULL WHERE seq IN ("
        "SELECT seq FROM messages WHERE created_at < ? AND next_attempt_at IS NULL "
        f"AND state NOT IN {_IN_DELIVERY} AND (request_body IS NOT NULL OR "
        "response_body IS NOT NULL OR result IS NOT NULL) LIMIT ?)",
        "UPDATE callbacks SET body=X'' WHERE seq IN (SELECT seq FROM callbacks WHERE "
        f"created_at < ? AND state != '{CallbackState.PENDING.value}' AND length(body) > 0 "
        "LIMIT ?)",
    ):
        total = 0
        while True:
            count = db.execute(sql, (cutoff, batch)).rowcount
            total += count
            if count < batch:
                break
        counts.append(total)
    return counts[0], counts[1]
