"""One commit per synchronous exchange (issue 23), on both backends: a sync exchange is
recorded with its outcome when it ends; twins of one message id on one instance reach
the upstream once, and twins on two instances of one database end in one row."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from gateway.exchange.app import STORE
from gateway.exchange.client import ExchangeClient
from gateway.signing import Signer
from tests.conftest import CREDIT_EXAMPLE, PORTAL_ID, Harness, HarnessFactory


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    return both_backends


def _batches(harness: Harness) -> int:
    return int(harness.app[STORE].batch.batches)  # type: ignore[attr-defined]


def _without_nonces(harness: Harness) -> ExchangeClient:
    """The portal signing without a nonce (a same-region member need not send one): a
    nonce is claimed in the store before the exchange, a write of its own."""
    return ExchangeClient(
        member_id=PORTAL_ID,
        signer=Signer(harness.keys.pairs["portal"], label="sig1", nonces=False),
        base_url=harness.url,
        session=harness.gateway.session,
    )


async def test_a_sync_exchange_commits_once_and_is_answered_only_after(
    make_harness: HarnessFactory,
) -> None:
    """One answered sync exchange is one store commit (was two: accepted, then finished),
    and the answer's row is readable the moment the client has the answer."""
    harness = await make_harness(start_delivery=False)
    client = _without_nonces(harness)
    before = _batches(harness)
    reply = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200
    assert _batches(harness) == before + 1
    record = await harness.app[STORE].get_message(PORTAL_ID, reply.headers["Gw-Message-Id"])
    assert record is not None
    assert (record.state, record.status) == ("answered", 200)


async def test_a_failed_sync_exchange_is_recorded_once_and_replayed(
    make_harness: HarnessFactory,
) -> None:
    """An upstream failure is recorded `failed` with its problem in the same single commit;
    the retry of that id is the stored problem (Gw-Replayed), the upstream not called."""
    harness = await make_harness(start_delivery=False)
    harness.national.mode = "error"
    client = harness.client("portal")
    message_id = str(uuid.uuid4())
    first = await client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
    assert first.status >= 500
    record = await harness.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert record.state == "failed"
    harness.national.mode = "ok"
    again = await client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
    assert (again.status, again.headers.get("Gw-Replayed")) == (first.status, "true")
    assert again.json()["code"] == first.json()["code"]
    assert harness.national.received == []  # "error" refuses before counting; ok never came


async def test_twins_on_one_instance_reach_the_upstream_once(
    make_harness: HarnessFactory,
) -> None:
    """Five copies of one message id sent at once to one instance while the upstream is
    slow: one 200, the others 409 (in flight), the upstream called once, one row."""
    harness = await make_harness(start_delivery=False)
    harness.national.mode, harness.national.delay_s = "slow", 0.3
    client = harness.client("portal")
    message_id = str(uuid.uuid4())
    replies = await asyncio.gather(
        *(client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id) for _ in range(5))
    )
    assert sorted(r.status for r in replies) == [200, 409, 409, 409, 409]
    assert {r.json()["code"] for r in replies if r.status == 409} == {"message_id_reused"}
    assert harness.national.received == [message_id]
    later = await client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
    assert (later.status, later.headers.get("Gw-Replayed")) == (200, "true")
    assert harness.national.received == [message_id]
    assert len(await harness.app[STORE].find_by_message_id(message_id)) == 1


async def test_twins_on_two_instances_end_in_one_row_and_one_answer(
    make_harness: HarnessFactory, harness_store_url: str | None, tmp_path: Path
) -> None:
    """Twins sent at once to two instances of one database (PostgreSQL, or one SQLite file
    as `--workers` shares it) while the upstream
    is slow: one row; one client gets the upstream's answer, the other that same stored
    answer (Gw-Replayed) or 409; the upstream sees the id at most once per instance."""
    shared = tmp_path / "shared.db" if harness_store_url is None else None
    one = await make_harness(start_delivery=False, store=shared)
    two = await make_harness(start_delivery=False, store=shared)
    for h in (one, two):
        h.national.mode, h.national.delay_s = "slow", 0.2
    for _ in range(5):
        message_id = str(uuid.uuid4())
        replies = await asyncio.gather(
            one.client("portal").exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id),
            two.client("portal").exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id),
        )
        fresh = [r for r in replies if r.status == 200 and "Gw-Replayed" not in r.headers]
        assert len(fresh) == 1, [(r.status, dict(r.headers)) for r in replies]
        for r in replies:
            assert r.status in (200, 409)
            if r.status == 200:
                assert r.json() == fresh[0].json()
        rows = await one.app[STORE].find_by_message_id(message_id)
        assert len(rows) == 1
        assert rows[0].state == "answered"
        calls = one.national.received.count(message_id) + two.national.received.count(message_id)
        assert 1 <= calls <= 2
