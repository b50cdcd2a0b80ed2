"""The tamper-evident message log on real SQLite files and a real gateway: the hash chain,
signed checkpoints, ``gateway audit verify`` naming each break, evidence bundles checked
offline with only the JWKS, and purge keeping the chain valid."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import hashlib
import json
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.audit import (
    CheckpointSigner,
    JwsInvalid,
    Report,
    check_bundle,
    make_checkpoint,
    sign_jws,
    verify_jws,
    verify_store,
)
from gateway.cli import main
from gateway.config.model import parse_config
from gateway.crypto.keys import KeyPair, KeyType, generate, private_to_jwk
from gateway.errors import ConfigError, StoreError
from gateway.exchange.client import ExchangeClient
from gateway.signing import Signer
from gateway.store import DuplicateMessage, NewCallback, NewMessage, Rejection, Store, chain
from gateway.store.sqlite import MIGRATIONS, SQLiteStore
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    NATIONAL_ID,
    PORTAL_ID,
    Harness,
    HarnessFactory,
    Keys,
    config_document,
    store_at,
    verify_file,
)
from tests.factories import private_key
from tests.test_crash import Deployment, _send_until_accepted, deployed

ROOT = Path(__file__).resolve().parent.parent


# Helpers ---------------------------------------------------------------------------------


def _jwks(keys: Keys) -> dict[str, Any]:
    return {"keys": [dict(keys.pairs["gateway"].jwk)]}


def _new(body: bytes = b'{"uscc": "x"}', **changes: Any) -> NewMessage:
    fields: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "client": PORTAL_ID,
        "service": "crossregion.apply",
        "mode": "async",
        "state": "accepted",
        "request_headers": {"Gw-Client": PORTAL_ID, "Signature": "sig1=:AAAA:"},
        "request_body": body,
        "request_digest": hashlib.sha256(body).hexdigest(),
        "next_attempt_at": time.time(),
    }
    fields.update(changes)
    return NewMessage(**fields)


def _answer(seq: int, correlation: str) -> NewCallback:
    body = b'{"decision": "approved"}'
    return NewCallback(
        message_id=str(uuid.uuid4()),
        client=NATIONAL_ID,
        correlation_id=correlation,
        original_seq=seq,
        service="crossregion.apply",
        headers={"Gw-Client": NATIONAL_ID},
        body=body,
        digest=hashlib.sha256(body).hexdigest(),
    )


async def _deliver(store: Store, seq: int) -> None:
    """Claim the message (delivery holds its lease) and record the platform's 202."""
    assert seq in {m.seq for m in await store.claim_due_messages(time.time() + 5, 100, 30)}
    assert await store.set_message_state(seq, "delivered", attempts=1, receiver=NATIONAL_ID)


async def _claim_callback(store: Store, seq: int) -> None:
    assert seq in {c.seq for c in await store.claim_due_callbacks(time.time() + 5, 100, 30)}


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of our own, as an intruder (or an auditor) would open one."""
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        yield db
    finally:
        db.close()


def _verify(path: Path, keys: Keys) -> Report:
    """Verify through a read-only store, as ``gateway audit verify`` does."""
    return verify_file(path, _jwks(keys))


def _kinds(path: Path) -> list[str]:
    with _connect(path) as db:
        return [r[0] for r in db.execute("SELECT kind FROM log_chain ORDER BY seq")]


@pytest.fixture
async def any_store(store_url: str) -> AsyncIterator[Store]:
    """A store on each backend: the chain is the same on SQLite and PostgreSQL."""
    s = store_at(store_url)
    await s.open()
    yield s
    await s.close()


async def _rows_of(store: Store) -> list[chain.ChainRow]:
    async with store.snapshot() as snap:
        return [row async for row in snap.chain_rows()]


async def _verified(store: Store, keys: Keys) -> Report:
    return await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "db" / "gateway.db")
    await s.open()
    yield s
    await s.close()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``gateway …`` in-process, in a thread of its own: the command runs its own loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        code = pool.submit(main, list(argv)).result()
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# The chain in the store ------------------------------------------------------------------


async def test_every_evidential_event_appends_one_linked_record(
    any_store: Store, keys: Keys
) -> None:
    """Accept, finish, state, callback in and out, redelivery, rejection: each one record."""
    store = any_store
    sync = await store.insert_message(_new(mode="sync", state="delivering", next_attempt_at=None))
    await store.finish_message(
        sync.seq,
        state="answered",
        status=200,
        code=None,
        adapter="national",
        response_headers={"Content-Type": "application/json"},
        response_body=b'{"rating": "A"}',
    )
    queued = await store.insert_message(_new())
    await _deliver(store, queued.seq)
    callback = await store.insert_callback(_answer(queued.seq, queued.message_id))
    assert callback is not None
    await _claim_callback(store, callback.seq)
    await store.finish_callback(callback.seq, state="dead", attempts=3, error="gone")
    assert await store.redeliver("callback", callback.seq, time.time())
    await _claim_callback(store, callback.seq)
    await store.finish_callback(callback.seq, state="delivered", attempts=1, error=None)
    await store.record_rejection(
        Rejection(
            client=PORTAL_ID,
            message_id=None,
            service="credit.query",
            status=401,
            code="signature_missing",
            detail="unsigned",
            digest=None,
            size=3,
            headers={},
        )
    )
    rows = await _rows_of(store)
    assert [r.kind for r in rows] == [
        "genesis",
        "message.accepted",
        "message.finished",
        "message.accepted",
        "message.state",
        "callback.accepted",
        "callback.finished",
        "callback.redelivered",
        "callback.finished",
        "rejection",
    ]
    previous = chain.GENESIS
    for row in rows:
        assert row.content_digest == hashlib.sha256(row.facts.encode()).hexdigest()
        assert row.hash == hashlib.sha256(f"{previous}:{row.content_digest}".encode()).hexdigest()
        assert json.loads(row.facts)["seq"] == row.seq
        previous = row.hash
    assert "decision" not in "".join(r.facts for r in rows)  # digests, never bodies
    assert await store.chain_head() == chain.Head(rows[-1].seq, rows[-1].hash)
    report = await _verified(store, keys)
    assert report.ok, report.findings
    assert report.records == len(rows)


async def test_superseding_decisions_and_an_immediate_answer_chain_and_verify(
    any_store: Store, keys: Keys
) -> None:
    """A decision that supersedes a delivered one, and an upstream's immediate answer: each
    is one chained record, the receiver is chained with the acknowledgement, and it verifies."""
    store = any_store
    queued = await store.insert_message(_new())
    await _deliver(store, queued.seq)
    first = await store.insert_callback(_answer(queued.seq, queued.message_id))
    assert first is not None
    await _claim_callback(store, first.seq)
    assert await store.finish_callback(first.seq, state="delivered", attempts=1, error=None)
    later = await store.insert_callback(_answer(queued.seq, queued.message_id), supersede=True)
    assert later is not None
    at_once = await store.insert_message(_new())
    assert at_once.seq in {m.seq for m in await store.claim_due_messages(time.time(), 10, 30)}
    assert await store.answer_message(
        at_once.seq,
        _answer(at_once.seq, at_once.message_id),
        attempts=1,
        adapter="national",
        receiver=NATIONAL_ID,
    )
    rows = await _rows_of(store)
    assert [r.kind for r in rows][-6:] == [
        "message.state",
        "callback.accepted",
        "callback.finished",
        "callback.accepted",
        "message.accepted",
        "callback.accepted",
    ]
    assert json.loads(rows[-6].facts)["receiver"] == NATIONAL_ID
    report = await _verified(store, keys)
    assert report.ok, report.findings


async def test_a_rolled_back_write_leaves_no_record_and_the_head_unmoved(
    any_store: Store, keys: Keys
) -> None:
    """A duplicate message id rolls back its chain record too; the next one links fine."""
    store = any_store
    first = await store.insert_message(_new())
    head = await store.chain_head()
    with pytest.raises(DuplicateMessage):
        await store.insert_message(_new(message_id=first.message_id))
    assert await store.chain_head() == head
    await store.insert_message(_new())
    assert (await store.chain_head()).seq == head.seq + 1
    assert (await _verified(store, keys)).ok


async def test_a_late_acknowledgement_that_changes_nothing_is_not_chained(
    any_store: Store,
) -> None:
    """A state change the store refuses (answered → delivered) writes no chain record."""
    store = any_store
    queued = await store.insert_message(_new())
    await _deliver(store, queued.seq)
    assert await store.insert_callback(_answer(queued.seq, queued.message_id))
    before = await store.chain_head()
    await store.set_message_state(queued.seq, "delivered", attempts=1)
    assert await store.chain_head() == before


async def test_the_head_is_read_at_open_and_the_chain_continues_across_restarts(
    tmp_path: Path, keys: Keys
) -> None:
    """Close and reopen: the next record links to the last one written before."""
    path = tmp_path / "restart.db"
    for _ in range(3):
        s = SQLiteStore(path)
        await s.open()
        await s.insert_message(_new())
        await s.close()
    assert _kinds(path) == ["genesis"] + ["message.accepted"] * 3
    assert _verify(path, keys).ok


async def test_two_writers_on_one_file_do_not_fork_the_chain(tmp_path: Path, keys: Keys) -> None:
    """A second process appends (a CLI purge); the gateway's stale head catches up."""
    path = tmp_path / "two.db"
    gateway, cli = SQLiteStore(path), SQLiteStore(path)
    await gateway.open()
    await cli.open()
    try:
        await gateway.insert_message(_new())
        await cli.insert_message(_new())  # its head was read before the gateway's append
        await gateway.insert_message(_new())
        with _connect(path) as db:
            chain.purge_bodies(db, chain.HashChain(), time.time() - 86400, time.time())
        await gateway.insert_message(_new())
    finally:
        await gateway.close()
        await cli.close()
    assert _kinds(path)[1:] == ["message.accepted"] * 3 + ["purge", "message.accepted"]
    assert _verify(path, keys).ok


async def test_a_store_from_before_the_chain_starts_it_with_a_genesis_record(
    tmp_path: Path, keys: Keys
) -> None:
    """Rows older than migration 3 are named by the genesis record, not flagged."""
    path = tmp_path / "old.db"
    with _connect(path) as db:
        for number, script in enumerate(MIGRATIONS[:2], start=1):
            db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        db.execute(
            "INSERT INTO messages (message_id, client, service, mode, state, request_headers, "
            "request_digest, created_at, updated_at) VALUES ('old', ?, 'credit.query', 'sync', "
            "'answered', '{}', '', 1, 1)",
            (PORTAL_ID,),
        )
    s = SQLiteStore(path)
    await s.open()
    await s.insert_message(_new())
    await s.close()
    with _connect(path) as db:
        genesis = json.loads(db.execute("SELECT facts FROM log_chain WHERE seq = 1").fetchone()[0])
    assert genesis["before"] == {"messages": 1, "callbacks": 0, "rejections": 0}
    assert _verify(path, keys).ok


async def test_redelivery_and_purge_keep_the_chain_valid_but_a_quiet_nulling_does_not(
    store: SQLiteStore, keys: Keys
) -> None:
    """Redelivery and purge are chained and verify; a body nulled without a purge does not."""
    dead = await store.insert_message(_new())
    assert dead.seq in {m.seq for m in await store.claim_due_messages(time.time() + 5, 10, 30)}
    await store.set_message_state(dead.seq, "dead", attempts=10, error="gave up")
    assert await store.redeliver("message", dead.seq, time.time())
    await _deliver(store, dead.seq)
    answered = await store.insert_message(_new())
    await _deliver(store, answered.seq)
    callback = await store.insert_callback(_answer(answered.seq, answered.message_id))
    assert callback is not None
    await _claim_callback(store, callback.seq)
    await store.finish_callback(callback.seq, state="delivered", attempts=1, error=None)
    assert _verify(store.path, keys).ok
    purged = await store.purge_bodies(time.time() + 1, time.time())
    assert purged == (2, 1)
    with _connect(store.path) as db:
        assert (
            db.execute("SELECT COUNT(*) FROM messages WHERE request_body IS NULL").fetchone()[0]
            == 2
        )
    assert _verify(store.path, keys).ok
    fresh = await store.insert_message(_new())
    with _connect(store.path) as db:
        db.execute("UPDATE messages SET request_body = NULL WHERE seq = ?", (fresh.seq,))
    report = _verify(store.path, keys)
    assert report.first is not None
    assert report.first.kind == "modified"
    assert "no purge covers it" in report.first.detail


# Checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa-p256", "rsa-pss"])
def test_a_checkpoint_jws_verifies_with_the_jwks_and_nothing_else(kind: KeyType) -> None:
    """Each gateway key type signs a compact JWS; a changed payload or another key fails."""
    key = private_key(kind)
    jwk = private_to_jwk(key)
    pair = KeyPair(kid=jwk["kid"], algorithm=_algorithm(kind), private=key, jwk=jwk)
    jws = sign_jws(pair, {"gateway": GATEWAY_ID, "seq": 7, "hash": "ab" * 32, "at": 1.5})
    header, payload = verify_jws(jws, {"keys": [jwk]})
    assert header["kid"] == jwk["kid"]
    assert payload == {"gateway": GATEWAY_ID, "seq": 7, "hash": "ab" * 32, "at": 1.5}
    head, _, signature = jws.split(".")
    forged_body = json.dumps({"gateway": GATEWAY_ID, "seq": 8, "hash": "ab" * 32, "at": 1.5})
    other = base64.urlsafe_b64encode(forged_body.encode()).rstrip(b"=").decode()
    with pytest.raises(JwsInvalid):
        verify_jws(f"{head}.{other}.{signature}", {"keys": [jwk]})
    impostor = private_to_jwk(private_key(kind, 1), jwk["kid"])
    with pytest.raises(JwsInvalid):
        verify_jws(jws, {"keys": [impostor]})
    with pytest.raises(JwsInvalid, match="does not hold"):
        verify_jws(jws, {"keys": []})


def _algorithm(kind: KeyType) -> str:
    return {"ed25519": "ed25519", "ecdsa-p256": "ecdsa-p256-sha256", "rsa-pss": "rsa-pss-sha512"}[
        kind
    ]


async def test_checkpoints_sign_only_a_moved_head_and_once_more_at_shutdown(
    any_store: Store, keys: Keys
) -> None:
    """The signer skips an unchanged head; ``stop`` signs what came since the last tick."""
    store = any_store
    signer = CheckpointSigner(
        store=store, keypair=keys.pairs["gateway"], gateway=GATEWAY_ID, interval_s=3600
    )
    signer.start()
    first = await signer.checkpoint()
    assert first is not None
    assert await signer.checkpoint() is None  # nothing new to sign
    await store.insert_message(_new())
    await signer.stop()
    async with store.snapshot() as snap:
        cps = await snap.checkpoints()
    last = cps[-1]
    head = await store.chain_head()
    assert [cp.id for cp in cps] == [1, 2]
    assert (last.seq, last.hash) == (head.seq, head.hash)
    _, payload = verify_jws(last.jws, _jwks(keys))
    assert payload == {"gateway": GATEWAY_ID, "seq": last.seq, "hash": last.hash, "at": last.at}
    report = await _verified(store, keys)
    assert report.ok
    assert (report.checkpoints, report.sealed) == (2, head.seq)


async def test_the_gateway_refuses_to_sign_over_a_changed_signed_record(
    store: SQLiteStore, keys: Keys
) -> None:
    """If the record a checkpoint signed changed, no later checkpoint blesses the change."""
    await store.insert_message(_new())
    signed = await make_checkpoint(store, keys.pairs["gateway"], GATEWAY_ID)
    assert signed is not None
    with _connect(store.path) as db:
        db.execute("UPDATE log_chain SET hash = ? WHERE seq = ?", ("0" * 64, signed.seq))
    await store.insert_message(_new())
    with pytest.raises(StoreError, match=f"no longer matches checkpoint {signed.id}"):
        await make_checkpoint(store, keys.pairs["gateway"], GATEWAY_ID)


def test_checkpoint_interval_is_configured_under_store(keys: Keys, tmp_path: Path) -> None:
    """``store.checkpoint_interval_s`` defaults to 60, is read, and must be positive."""
    doc = config_document(keys, store=tmp_path / "g.db", national_url="http://127.0.0.1:1")
    assert parse_config(copy.deepcopy(doc), base=tmp_path).store.checkpoint_interval_s == 60
    doc["store"]["checkpoint_interval_s"] = 2.5
    assert parse_config(copy.deepcopy(doc), base=tmp_path).store.checkpoint_interval_s == 2.5
    doc["store"]["checkpoint_interval_s"] = 0
    with pytest.raises(ConfigError):
        parse_config(doc, base=tmp_path)


# A real gateway, then an intruder --------------------------------------------------------


@dataclass
class Logged:
    """A running gateway that has logged some traffic, and the files an auditor needs."""

    harness: Harness
    config: Path
    db: Path
    jwks: Path
    sync_ids: list[str]
    async_ids: list[str]

    def seq_of(self, message_id: str) -> int:
        with _connect(self.db) as db:
            return int(
                db.execute(
                    "SELECT seq FROM messages WHERE message_id = ?", (message_id,)
                ).fetchone()[0]
            )

    def record(self, kind: str, ref: int) -> int:
        with _connect(self.db) as db:
            return int(
                db.execute(
                    "SELECT seq FROM log_chain WHERE kind = ? AND ref = ?", (kind, ref)
                ).fetchone()[0]
            )


def _fast_checkpoints(doc: dict[str, Any]) -> None:
    doc["store"]["checkpoint_interval_s"] = 0.1


async def _sealed(h: Harness) -> None:
    """Wait for the gateway's own timer to sign the current head."""

    async def sealed() -> bool:
        with _connect(h.config.store.path) as db:
            last = chain.latest_checkpoint(db)
            return last is not None and last.seq == chain.read_head(db).seq

    await h.wait_for(sealed)


async def _logged(make_harness: HarnessFactory, tmp_path: Path) -> Logged:
    h = await make_harness(_fast_checkpoints)
    portal = h.client("portal")
    sync_ids = []
    for _ in range(3):
        reply = await portal.exchange("credit.query", CREDIT_EXAMPLE)
        assert reply.status == 200, reply.body
        sync_ids.append(reply.headers["Gw-Message-Id"])
    await _sealed(h)
    async_ids = []
    for _ in range(2):
        reply = await portal.exchange("crossregion.apply", APPLY_EXAMPLE)
        assert reply.status == 202, reply.body
        async_ids.append(reply.json()["message_id"])
    for message_id in async_ids:

        async def delivered(message_id: str = message_id) -> bool:
            return await h.state_of(message_id) == "callback_delivered"

        await h.wait_for(delivered)
    async with h.gateway.session.post(f"{h.url}/v1/exchange/credit.query", data=b"{}") as resp:
        assert resp.status >= 400  # unsigned: a chained rejection
    await _sealed(h)  # a second checkpoint: the head moved since the first
    db_path = h.config.store.path
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(h.config.raw), encoding="utf-8")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(_jwks(h.keys)), encoding="utf-8")
    return Logged(h, config, db_path, jwks, sync_ids, async_ids)


Tamper = Callable[[sqlite3.Connection, Logged], tuple[str, int | None, str]]


def _flip_request_body(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    seq = lg.seq_of(lg.sync_ids[1])
    body = bytearray(
        db.execute("SELECT request_body FROM messages WHERE seq=?", (seq,)).fetchone()[0]
    )
    body[5] ^= 1
    db.execute("UPDATE messages SET request_body = ? WHERE seq = ?", (bytes(body), seq))
    return "modified", lg.record("message.accepted", seq), f"messages.seq {seq}: its request body"


def _change_status(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    seq = lg.seq_of(lg.sync_ids[2])
    db.execute("UPDATE messages SET status = 404 WHERE seq = ?", (seq,))
    return "modified", lg.record("message.finished", seq), "status differs"


def _edit_chain_facts(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    seq = lg.record("message.accepted", lg.seq_of(lg.async_ids[0]))
    db.execute(
        "UPDATE log_chain SET facts = replace(facts, ?, ?) WHERE seq = ?",
        (PORTAL_ID, "330000:other-system", seq),
    )
    return "modified", seq, "content digest"


def _null_response(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    seq = lg.seq_of(lg.sync_ids[0])
    db.execute("UPDATE messages SET response_body = NULL WHERE seq = ?", (seq,))
    return "modified", lg.record("message.finished", seq), "no purge covers it"


def _delete_message(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    seq = lg.seq_of(lg.sync_ids[0])
    db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
    return "deleted", lg.record("message.accepted", seq), f"messages.seq {seq}"


def _delete_chain_record(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    seq = lg.record("message.finished", lg.seq_of(lg.sync_ids[1]))
    db.execute("DELETE FROM log_chain WHERE seq = ?", (seq,))
    return "deleted", seq, f"record {seq} is missing"


def _insert_message(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    cur = db.execute(
        "INSERT INTO messages (message_id, client, service, mode, state, request_headers, "
        "request_body, request_digest, created_at, updated_at) SELECT ?, client, service, mode, "
        "state, request_headers, request_body, request_digest, created_at, updated_at "
        "FROM messages WHERE message_id = ?",
        (str(uuid.uuid4()), lg.sync_ids[0]),
    )
    return "inserted", None, f"messages.seq {cur.lastrowid} "


def _insert_chain_record(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    message = lg.seq_of(lg.sync_ids[1])
    at = lg.record("message.finished", message)
    for (seq,) in db.execute(
        "SELECT seq FROM log_chain WHERE seq >= ? ORDER BY seq DESC", (at,)
    ).fetchall():
        db.execute("UPDATE log_chain SET seq = seq + 1 WHERE seq = ?", (seq,))
    prev = db.execute("SELECT hash FROM log_chain WHERE seq = ?", (at - 1,)).fetchone()[0]
    now = time.time()
    facts = chain.canonical(
        {"kind": "message.state", "seq": at, "ref": message, "at": now, "state": "failed"}
    )
    digest = chain.content_digest(facts)
    db.execute(
        "INSERT INTO log_chain VALUES (?,?,?,?,?,?,?,?)",
        (at, now, "message.state", message, facts, digest, prev, chain.link(prev, digest)),
    )
    return "inserted", at, f"record {at} is not in the chain"


def _swap_messages(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    a, b = lg.seq_of(lg.sync_ids[0]), lg.seq_of(lg.sync_ids[2])
    db.execute("UPDATE messages SET seq = -1 WHERE seq = ?", (a,))
    db.execute("UPDATE messages SET seq = ? WHERE seq = ?", (a, b))
    db.execute("UPDATE messages SET seq = ? WHERE seq = -1", (b,))
    return "reordered", lg.record("message.accepted", a), f"messages.seq {a} holds"


def _swap_chain_records(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    i = lg.record("message.accepted", lg.seq_of(lg.sync_ids[0]))
    j = lg.record("message.accepted", lg.seq_of(lg.sync_ids[2]))
    db.execute("UPDATE log_chain SET seq = -1 WHERE seq = ?", (i,))
    db.execute("UPDATE log_chain SET seq = ? WHERE seq = ?", (i, j))
    db.execute("UPDATE log_chain SET seq = ? WHERE seq = -1", (j,))
    return "reordered", i, f"record {i} links to record {j - 1}"


def _rewrite_chain(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    """Change a body and recompute every later record: only the signed checkpoint knows."""
    message = lg.seq_of(lg.sync_ids[1])
    body = b'{"uscc": "forged"}'
    digest = hashlib.sha256(body).hexdigest()
    db.execute(
        "UPDATE messages SET request_body = ?, request_digest = ? WHERE seq = ?",
        (body, digest, message),
    )
    start = lg.record("message.accepted", message)
    prev = db.execute("SELECT hash FROM log_chain WHERE seq = ?", (start - 1,)).fetchone()[0]
    for seq, facts_text in db.execute(
        "SELECT seq, facts FROM log_chain WHERE seq >= ? ORDER BY seq", (start,)
    ).fetchall():
        facts = json.loads(facts_text)
        if seq == start:
            facts["request_digest"] = digest
        text = chain.canonical(facts)
        content = chain.content_digest(text)
        new = chain.link(prev, content)
        db.execute(
            "UPDATE log_chain SET facts = ?, content_digest = ?, prev_hash = ?, hash = ? "
            "WHERE seq = ?",
            (text, content, prev, new, seq),
        )
        prev = new
    sealed = db.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM checkpoints WHERE seq < ?", (start,)
    ).fetchone()[0]
    return "modified", int(sealed) + 1, "were rewritten"


def _forge_checkpoint(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    stranger = lg.harness.keys.pairs["stranger"]
    gateway_kid = lg.harness.keys.pairs["gateway"].kid
    impostor = KeyPair(
        kid=gateway_kid, algorithm="ed25519", private=stranger.private, jwk=stranger.jwk
    )
    head = chain.read_head(db)
    at = time.time()
    jws = sign_jws(impostor, {"gateway": GATEWAY_ID, "seq": head.seq, "hash": head.hash, "at": at})
    chain.add_checkpoint(db, seq=head.seq, hash=head.hash, at=at, kid=gateway_kid, jws=jws)
    return "forged", head.seq, "does not verify"


def _alter_checkpoint(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    seq = db.execute("SELECT seq FROM checkpoints WHERE id = 1").fetchone()[0]
    db.execute("UPDATE checkpoints SET seq = seq - 1 WHERE id = 1")
    return "forged", int(seq) - 1, "differs from what was signed"


def _delete_checkpoint(db: sqlite3.Connection, lg: Logged) -> tuple[str, int | None, str]:
    db.execute("DELETE FROM checkpoints WHERE id = 1")
    seq = db.execute("SELECT seq FROM checkpoints ORDER BY id LIMIT 1").fetchone()[0]
    return "deleted", int(seq), "checkpoints 1..1 are missing"


TAMPERING: dict[str, Tamper] = {
    "a byte of a stored body": _flip_request_body,
    "an outcome field": _change_status,
    "a chain record's facts": _edit_chain_facts,
    "a body nulled without purge": _null_response,
    "a message deleted": _delete_message,
    "a chain record deleted": _delete_chain_record,
    "a message inserted": _insert_message,
    "a chain record inserted": _insert_chain_record,
    "two messages swapped": _swap_messages,
    "two chain records swapped": _swap_chain_records,
    "the chain rewritten after a change": _rewrite_chain,
    "a forged checkpoint": _forge_checkpoint,
    "a checkpoint altered": _alter_checkpoint,
    "a checkpoint deleted": _delete_checkpoint,
}


@pytest.mark.parametrize("tamper", list(TAMPERING.values()), ids=list(TAMPERING))
async def test_verify_names_the_first_break_behind_the_gateways_back(
    tamper: Tamper,
    make_harness: HarnessFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An edit to the SQLite file while the gateway runs: verify exits 1 naming seq and kind."""
    lg = await _logged(make_harness, tmp_path)
    code, out = _cli(capsys, "audit", "verify", "--config", str(lg.config))
    assert code == 0, out
    assert "OK: every record, link and checkpoint holds" in out
    with _connect(lg.db) as db:
        kind, seq, phrase = tamper(db, lg)
    code, out = _cli(capsys, "audit", "verify", "--config", str(lg.config))
    assert code == 1, out
    where = f"seq {seq}" if seq is not None else "outside the chain"
    assert f"BROKEN: {where}: {kind}: " in out, out
    first = out.split("BROKEN: ", 1)[1].splitlines()[0]
    assert phrase in first, out


@pytest.mark.integration
async def test_verify_runs_as_a_real_process_and_reports_json(
    make_harness: HarnessFactory, tmp_path: Path
) -> None:
    """``gateway audit verify --json`` in its own process: exit 0, every record sealed."""
    lg = await _logged(make_harness, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "audit",
        "verify",
        "--json",
        "--config",
        str(lg.config),
        "--jwks",
        str(lg.jwks),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["ok"] is True
    assert report["findings"] == []
    # genesis, 3 × (accepted, finished), 2 × (accepted, delivered, callback in, out), rejection
    assert report["records"] == report["sealed"] == 1 + 3 * 2 + 2 * 4 + 1


@pytest.fixture
async def deployment(keys: Keys, tmp_path: Path) -> AsyncIterator[Deployment]:
    """A gateway subprocess (as in test_crash), checkpointing every 0.2 s."""

    def often(doc: dict[str, Any]) -> None:
        doc["store"]["checkpoint_interval_s"] = 0.2

    async with deployed(keys, tmp_path, often) as dep:
        yield dep


@pytest.mark.integration
async def test_sigkills_under_load_leave_a_chain_that_verifies(
    deployment: Deployment, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway killed twice mid-stream, then drained: verify finds every record sealed."""
    await deployment.start()
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        client = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(keys.pairs["portal"]),
            base_url=deployment.url,
            session=session,
        )
        senders = [asyncio.create_task(_send_until_accepted(deployment, client, stop))]
        for pause in (0.7, 0.4):
            await asyncio.sleep(pause)
            deployment.kill()
            await deployment.start()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*senders)

    async def delivered() -> bool:
        states = deployment.states()
        return all(states.get(i) == "callback_delivered" for i in deployment.accepted)

    deadline = time.monotonic() + 30
    while not await delivered():
        assert time.monotonic() < deadline, "the accepted messages were not all delivered"
        await asyncio.sleep(0.1)
    deployment.stop()
    assert len(deployment.accepted) >= 3
    code, out = _cli(capsys, "audit", "verify", "--config", str(deployment.config_path))
    assert code == 0, out
    assert "records not covered" not in out


# Evidence bundles ------------------------------------------------------------------------


async def test_an_exported_bundle_verifies_offline_with_only_the_jwks(
    make_harness: HarnessFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Export an answered async message; check it with the JWKS (0) and without (3)."""
    lg = await _logged(make_harness, tmp_path)
    bundle = tmp_path / "evidence.json"
    message_id = lg.async_ids[0]
    code, out = _cli(
        capsys, "audit", "export", message_id, "--out", str(bundle), "--config", str(lg.config)
    )
    assert code == 0, out
    doc = json.loads(bundle.read_bytes())
    kinds = [json.loads(r["facts"])["kind"] for r in doc["chain"] if "facts" in r]
    assert kinds[0] == "message.accepted"
    assert {"callback.accepted", "callback.finished"} <= set(kinds)
    assert doc["jwks"]["keys"] == _jwks(lg.harness.keys)["keys"]
    assert any("facts" not in r for r in doc["chain"]), "other messages appear as digests only"
    code, out = _cli(capsys, "audit", "check", str(bundle), "--jwks", str(lg.jwks))
    assert code == 0, out
    assert f"message {message_id} from {PORTAL_ID}" in out
    assert "OK: verified against" in out
    code, out = _cli(capsys, "audit", "check", str(bundle))
    assert code == 3, out
    assert "CONSISTENT, but checked only against the key inside the bundle" in out


async def test_a_one_byte_change_anywhere_in_a_bundle_is_caught(
    make_harness: HarnessFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every byte of the bundle, flipped in turn, makes the check fail (as does a rekeyed JWKS)."""
    lg = await _logged(make_harness, tmp_path)
    bundle = tmp_path / "evidence.json"
    code, out = _cli(
        capsys, "audit", "export", lg.async_ids[1], "--out", str(bundle), "--config", str(lg.config)
    )
    assert code == 0, out
    raw = bundle.read_bytes()
    trusted = _jwks(lg.harness.keys)
    assert check_bundle(raw, trusted).ok
    survivors = []
    for i in range(len(raw)):
        changed = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]
        if check_bundle(changed, trusted).ok:
            survivors.append(i)
    assert survivors == []
    impostor = private_to_jwk(generate("ed25519"), lg.harness.keys.pairs["gateway"].kid)
    report = check_bundle(raw, {"keys": [impostor]})
    assert not report.ok
    assert report.problem == "the bundle's key differs from the trusted key with the same kid"
    bundle.write_bytes(raw.replace(b'"request_body": "', b'"request_body": "A', 1))
    code, out = _cli(capsys, "audit", "check", str(bundle), "--jwks", str(lg.jwks))
    assert code == 1
    assert "BROKEN:" in out


async def test_export_signs_a_checkpoint_when_none_covers_the_message_yet(
    store: SQLiteStore, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A message newer than the last checkpoint: export signs one, and the bundle checks."""
    await store.insert_message(_new())
    assert await make_checkpoint(store, keys.pairs["gateway"], GATEWAY_ID) is not None
    later = await store.insert_message(_new())
    doc = config_document(keys, store=store.path, national_url="http://127.0.0.1:1")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    bundle = tmp_path / "later.json"
    argv = ["audit", "export", later.message_id, "--out", str(bundle), "--config", str(config)]
    code, out = _cli(capsys, *argv)
    assert code == 0, out
    with _connect(store.path) as db:
        signed = [cp.seq for cp in chain.checkpoints(db)]
    assert signed == [store.chain.head.seq - 1, store.chain.head.seq]
    assert check_bundle(bundle.read_bytes(), _jwks(keys)).ok
    argv[2] = str(uuid.uuid4())
    code, out = _cli(capsys, *argv)
    assert code == 1
    assert f"no message {argv[2]}" in out


# Retention -------------------------------------------------------------------------------


async def test_purge_drops_bodies_and_the_chain_and_bundles_still_verify(
    make_harness: HarnessFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``audit purge --older-than 0``: bodies gone, digests kept, verify and check still pass."""
    lg = await _logged(make_harness, tmp_path)
    code, out = _cli(capsys, "audit", "purge", "--older-than", "0", "--config", str(lg.config))
    assert code == 0, out
    assert "purged the bodies of 5 message(s) and 2 callback(s)" in out
    with _connect(lg.db) as db:
        left = db.execute(
            "SELECT COUNT(*) FROM messages WHERE request_body IS NOT NULL OR "
            "response_body IS NOT NULL OR result IS NOT NULL"
        ).fetchone()[0]
        digests = db.execute("SELECT COUNT(*) FROM messages WHERE request_digest != ''")
        assert (left, digests.fetchone()[0]) == (0, 5)
    code, out = _cli(capsys, "audit", "verify", "--config", str(lg.config))
    assert code == 0, out
    bundle = tmp_path / "purged.json"
    code, out = _cli(
        capsys, "audit", "export", lg.sync_ids[0], "--out", str(bundle), "--config", str(lg.config)
    )
    assert code == 0, out
    assert json.loads(bundle.read_bytes())["message"]["request_body"] is None
    code, out = _cli(capsys, "audit", "check", str(bundle), "--jwks", str(lg.jwks))
    assert code == 0, out
