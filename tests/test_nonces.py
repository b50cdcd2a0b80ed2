"""Single-use nonces (gateway/exchange/nonces.py and the pipeline's freshness stage): held
in memory and in the store, message-id dedupe across a restart and across two instances
on one store, and the created/expires window; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from multidict import CIMultiDict

from gateway.errors import SignatureInvalid
from gateway.exchange.app import STORE
from gateway.exchange.nonces import NonceGuard
from gateway.store import Store
from tests.conftest import CREDIT_EXAMPLE, Harness, HarnessFactory, store_at

SKEW = 300


async def send(
    h: Harness,
    *,
    nonce: str | None = None,
    created: int | None = None,
    expires: int | None = None,
    message_id: str | None = None,
    key: str = "portal",
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    """One signed credit.query with the given signature parameters: (status, body, headers)."""
    client = h.client(key)
    body = json.dumps(CREDIT_EXAMPLE).encode()
    url = f"{h.url}/v1/exchange/credit.query"
    headers: CIMultiDict[str] = CIMultiDict(
        {
            "Content-Type": "application/json",
            "Gw-Client": client.member_id,
            "Gw-Message-Id": message_id or str(uuid.uuid4()),
        }
    )
    client.signer.sign_request(
        "POST", url, headers, body, created=created, expires=expires, nonce=nonce
    )
    async with h.gateway.session.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), CIMultiDict(resp.headers)


# The guard on a real store ----------------------------------------------------------


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    """Every harness test here runs on SQLite and on PostgreSQL."""
    return both_backends


@pytest.fixture
async def closing(store_url: str) -> AsyncIterator[Store]:
    """A real store on each backend, closed after the test."""
    store = store_at(store_url)
    await store.open()
    yield store
    await store.close()


async def test_a_nonce_is_accepted_once_per_key(closing: Store) -> None:
    """Same signer, key and nonce twice: the second is a replay; other keys are unaffected."""
    guard = NonceGuard(closing, skew_s=SKEW, clock=lambda: 1000.0)
    await guard.claim("330000:a", "k1", "n-1", created=1000)
    with pytest.raises(SignatureInvalid, match="replayed nonce") as caught:
        await guard.claim("330000:a", "k1", "n-1", created=1000)
    assert (caught.value.status, caught.value.code) == (401, "signature_invalid")
    await guard.claim("330000:a", "k2", "n-1", created=1000)
    await guard.claim("330000:b", "k1", "n-1", created=1000)


async def test_a_nonce_is_remembered_by_the_store_across_a_restart(closing: Store) -> None:
    """A new guard (a restarted gateway) on the same store still refuses the nonce."""
    await NonceGuard(closing, skew_s=SKEW, clock=lambda: 1000.0).claim("m", "k", "n", 1000)
    restarted = NonceGuard(closing, skew_s=SKEW, clock=lambda: 1100.0)
    assert not restarted.cached("m", "k", "n")
    with pytest.raises(SignatureInvalid, match="replayed nonce"):
        await restarted.claim("m", "k", "n", created=1000)


async def test_the_memory_layer_refuses_a_replay_without_the_store(
    closing: Store, store_url: str
) -> None:
    """A cached nonce is refused even when its stored row is gone (no store round trip)."""
    guard = NonceGuard(closing, skew_s=SKEW, clock=lambda: 1000.0)
    await guard.claim("m", "k", "n", created=1000)
    assert guard.cached("m", "k", "n")
    await _sql(store_url, "DELETE FROM nonces")
    with pytest.raises(SignatureInvalid):
        await guard.claim("m", "k", "n", created=1000)


async def test_a_nonce_may_come_back_once_its_signature_could_not_be_fresh(
    closing: Store,
) -> None:
    """After created + skew the nonce is forgotten (the signature would be stale anyway)."""
    now = [1000.0]
    guard = NonceGuard(closing, skew_s=SKEW, clock=lambda: now[0])
    await guard.claim("m", "k", "n", created=1000)
    now[0] = 1000.0 + SKEW + 1
    await guard.claim("m", "k", "n", created=int(now[0]))


async def _sql(store_url: str, sql: str) -> list[tuple[Any, ...]]:
    """A statement behind the store's back, on either backend."""
    if store_url.startswith("postgresql://"):
        conn = await asyncpg.connect(store_url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()
    with contextlib.closing(sqlite3.connect(store_url)) as db:
        rows = db.execute(sql).fetchall()
        db.commit()
        return rows


async def test_expired_nonces_are_pruned_from_memory_and_store(
    closing: Store, store_url: str
) -> None:
    """Once a prune interval has passed, expired nonces leave the dict and the table."""
    now = [1000.0]
    guard = NonceGuard(closing, skew_s=10, clock=lambda: now[0])
    for i in range(5):
        await guard.claim("m", "k", f"old-{i}", created=1000)
    now[0] += guard.PRUNE_EVERY_S + 1
    await guard.claim("m", "k", "new", created=int(now[0]))
    rows = await _sql(store_url, "SELECT nonce FROM nonces")
    assert [r[0] for r in rows] == ["new"]
    assert not guard.cached("m", "k", "old-0")


async def test_the_memory_layer_is_bounded(closing: Store) -> None:
    """Past MAX_CACHED the dict keeps the newest half; the store keeps refusing the rest."""
    guard = NonceGuard(closing, skew_s=SKEW, clock=lambda: 1000.0)
    guard.MAX_CACHED = 10
    for i in range(11):
        await guard.claim("m", "k", f"n{i}", created=1000)
    assert not guard.cached("m", "k", "n0")
    assert guard.cached("m", "k", "n10")
    with pytest.raises(SignatureInvalid):
        await guard.claim("m", "k", "n0", created=1000)


async def test_an_overlong_nonce_is_refused(closing: Store) -> None:
    """A nonce longer than 256 characters is not stored: signature_invalid."""
    guard = NonceGuard(closing, skew_s=SKEW)
    with pytest.raises(SignatureInvalid, match="longer than 256"):
        await guard.claim("m", "k", "n" * 257, created=int(time.time()))


async def test_claim_nonce_in_sql_inserts_once_and_renews_only_when_expired(
    closing: Store,
) -> None:
    """The store's upsert: True on first use, False while live, True again once expired."""
    assert await closing.claim_nonce("m", "k", "n", 100.0, 50.0)
    assert not await closing.claim_nonce("m", "k", "n", 110.0, 60.0)
    assert await closing.claim_nonce("m", "k", "n", 300.0, 200.0)
    assert await closing.prune_nonces(299.0) == 0
    assert await closing.prune_nonces(300.0) == 1


# End to end ----------------------------------------------------------------------------


async def test_a_replayed_nonce_is_401_signature_invalid(harness: Harness) -> None:
    """Two messages signed with one nonce: the second gets 401 signature_invalid."""
    nonce = uuid.uuid4().hex
    first = await send(harness, nonce=nonce)
    assert first[0] == 200
    before = len(harness.national.received)
    status, problem, headers = await send(harness, nonce=nonce)
    assert (status, problem["code"]) == (401, "signature_invalid")
    assert "replayed nonce" in problem["detail"]
    assert headers["Content-Type"] == "application/problem+json"
    assert len(harness.national.received) == before
    assert (await send(harness, nonce=uuid.uuid4().hex))[0] == 200


async def test_an_exact_retransmission_with_a_nonce_is_refused(harness: Harness) -> None:
    """With a nonce, even a byte-identical resend is a replay: a retry must re-sign."""
    message_id, nonce, created = str(uuid.uuid4()), uuid.uuid4().hex, int(time.time())
    assert (await send(harness, nonce=nonce, message_id=message_id, created=created))[0] == 200
    status, problem, _ = await send(harness, nonce=nonce, message_id=message_id, created=created)
    assert (status, problem["code"]) == (401, "signature_invalid")
    again = await send(harness, nonce=uuid.uuid4().hex, message_id=message_id)
    assert (again[0], again[2]["Gw-Replayed"]) == (200, "true")


async def test_nonce_and_message_id_protection_survive_a_restart(
    make_harness: HarnessFactory,
) -> None:
    """After a restart on the same store: the nonce is still spent, the id still replays."""
    first = await make_harness()
    message_id, nonce = str(uuid.uuid4()), uuid.uuid4().hex
    status, answer, _ = await send(first, nonce=nonce, message_id=message_id)
    assert status == 200
    await first.gateway.close()
    second = await make_harness()
    replayed = await send(second, nonce=nonce)
    assert (replayed[0], replayed[1]["code"]) == (401, "signature_invalid")
    resent = await send(second, message_id=message_id)
    assert (resent[0], resent[1], resent[2]["Gw-Replayed"]) == (200, answer, "true")
    stored = await second.app[STORE].get_message("330000:one-stop-portal", message_id)
    assert stored is not None


@pytest.mark.parametrize(
    ("offsets", "status", "code"),
    [
        ({"created": SKEW + 30}, 401, "signature_expired"),  # from the future, beyond skew
        ({"created": -(SKEW + 30)}, 401, "signature_expired"),  # older than the window
        ({"created": -20, "expires": -10}, 401, "signature_expired"),  # expired
        ({"created": SKEW - 30}, 200, None),  # ahead, but within the skew
        ({"created": -(SKEW - 30)}, 200, None),  # old, but within the window
        ({"created": 0, "expires": 60}, 200, None),  # expires later
    ],
)
async def test_created_and_expires_bound_a_signatures_life(
    harness: Harness, offsets: dict[str, int], status: int, code: str | None
) -> None:
    """created beyond the skew either way, or expires passed: 401 signature_expired."""
    now = int(time.time())
    expires = offsets.get("expires")
    got, body, _ = await send(
        harness,
        created=now + offsets["created"],
        expires=now + expires if expires is not None else None,
    )
    assert got == status
    if code is not None:
        assert body["code"] == code


async def test_one_message_id_sent_to_two_instances_at_once_is_one_row(
    make_harness: HarnessFactory,
) -> None:
    """Two gateways on one store, the same message ids sent to both at once: one row
    each; the twin gets the stored outcome (``Gw-Replayed: true``) or the in-flight 409,
    never a 500."""
    one = await make_harness()
    other = await make_harness()
    ids = [str(uuid.uuid4()) for _ in range(10)]
    answers = await asyncio.gather(*(send(h, message_id=mid) for mid in ids for h in (one, other)))
    for first, second in zip(answers[::2], answers[1::2], strict=True):
        statuses = sorted((first[0], second[0]))
        assert statuses in ([200, 200], [200, 409]), (first, second)
        if statuses == [200, 200]:
            replayed = sorted(a[2].get("Gw-Replayed", "false") for a in (first, second))
            assert replayed == ["false", "true"]
            assert first[1] == second[1]
        else:
            conflict = first if first[0] == 409 else second
            assert conflict[1]["code"] == "message_id_reused"
    for mid in ids:
        assert len(await one.app[STORE].find_by_message_id(mid)) == 1
