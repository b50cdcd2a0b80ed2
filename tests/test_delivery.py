"""Asynchronous exchange: outbox, retries, dead letters, breaker, callbacks, at least once;
on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.backoff import backoff_delay
from gateway.exchange.app import STORE
from gateway.signing import Signer
from gateway.store import MessageRecord
from tests.conftest import NATIONAL_ID, PORTAL_ID, Harness, HarnessFactory
from tests.factories import APPROVED, post_callback, send_application, until_state


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    """Every delivery test runs on SQLite and on PostgreSQL."""
    return both_backends


def _patient(doc: dict[str, Any]) -> None:
    """Enough attempts to outlast an outage; a breaker that recovers quickly."""
    doc["delivery"]["max_attempts"] = 50
    doc["adapters"][0]["breaker"] = {"failure_threshold": 3, "reset_timeout_s": 0.3}


async def test_async_message_reaches_callback_delivered(harness: Harness) -> None:
    """202 → national ack → signed callback → portal verified it → callback_delivered."""
    message_id = await send_application(harness)
    await until_state(harness, message_id, "callback_delivered")
    assert harness.portal.processed[message_id]["decision"] == "approved"
    status = await harness.client("portal").status(message_id)
    view = status.json()
    assert view["state"] == "callback_delivered"
    assert view["result"]["decision"] == "approved"
    assert view["attempts"] == 1
    assert set(view) >= {"message_id", "service", "client", "target", "created_at", "updated_at"}


def test_backoff_is_full_jitter_and_capped() -> None:
    """Delays stay within [0, min(max, base·2^(n-1))] and spread across that range."""
    rng = random.Random(7)
    for attempt in range(1, 12):
        cap = min(8.0, 0.5 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8
        assert min(delays) < cap * 0.2


async def test_upstream_down_then_back_breaker_opens_and_queue_drains(
    make_harness: HarnessFactory,
) -> None:
    """While the platform refuses connections the breaker opens; afterwards everything drains."""
    h = await make_harness(_patient)
    h.national.mode = "refuse"
    ids = [await send_application(h) for _ in range(6)]

    async def breaker_open() -> bool:
        # Judged on one answer: a loaded machine may see the breaker half-open by the next.
        ready = await h.gateway.get("/readyz")
        reasons = (await ready.json()).get("reasons", []) if ready.status == 503 else []
        return any("circuit open" in reason for reason in reasons)

    await h.wait_for(breaker_open)
    states = {await h.state_of(i) for i in ids}
    assert states <= {"accepted", "delivering"}
    h.national.mode = "ok"
    for message_id in ids:
        await until_state(h, message_id, "callback_delivered", within_s=20)
    assert sorted(h.portal.processed) == sorted(ids)
    assert await h.app[STORE].dead_letters() == []

    async def ready() -> bool:  # adapter health answers are cached for a few seconds
        return (await h.gateway.get("/readyz")).status == 200

    await h.wait_for(ready)


def _attempts(n: int) -> Callable[[dict[str, Any]], None]:
    """``n`` attempts per message, with a breaker that never opens on the way."""

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = n
        doc["adapters"][0]["breaker"] = {"failure_threshold": 100, "reset_timeout_s": 0.1}

    return edit


async def _dead_letter(h: Harness) -> MessageRecord:
    """The portal's application, sent and waited for until it is a dead letter."""
    message_id = await send_application(h)
    await until_state(h, message_id, "dead")
    record = await h.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    return record


async def test_upstream_5xx_retries_then_dead_then_redeliver(make_harness: HarnessFactory) -> None:
    """5xx answers are retried with backoff, then dead-lettered; a redelivery then succeeds."""
    h = await make_harness(_attempts(3))
    h.national.mode = "error"
    record = await _dead_letter(h)
    assert record.attempts == 3
    assert "500" in (record.error or "")
    dead = await h.app[STORE].dead_letters()
    assert [(d.kind, d.message_id) for d in dead] == [("message", record.message_id)]
    h.national.mode = "ok"
    assert await h.app[STORE].redeliver("message", record.seq, 0.0)
    await until_state(h, record.message_id, "callback_delivered")
    assert await h.app[STORE].dead_letters() == []


async def test_upstream_hang_times_out_and_dead_letters(make_harness: HarnessFactory) -> None:
    """A hanging upstream costs one service timeout per attempt, then a dead letter."""

    def edit(doc: dict[str, Any]) -> None:
        doc["services"][1]["timeout_s"] = 0.3
        _attempts(2)(doc)

    h = await make_harness(edit)
    h.national.mode = "hang"
    record = await _dead_letter(h)
    assert "no answer within" in (record.error or "")


async def test_repeated_callback_is_acknowledged_and_delivered_once(harness: Harness) -> None:
    """The same callback (same Gw-Message-Id) twice: 200 both times, one delivery to the member."""
    harness.national.callback_delay_s = 3600  # the simulator stays silent; we call back
    message_id = await send_application(harness)
    await until_state(harness, message_id, "delivered")
    callback_id = str(uuid.uuid4())
    first = await post_callback(harness, message_id, message_id=callback_id)
    second = await post_callback(harness, message_id, message_id=callback_id)
    assert first[:2] == (200, {**first[1], "state": "accepted"})
    assert second[0] == 200
    assert second[1]["state"] == "duplicate"
    await until_state(harness, message_id, "callback_delivered")
    assert harness.portal.deliveries.count(callback_id) == 1


async def test_bad_callbacks_are_rejected_and_nothing_delivered(harness: Harness) -> None:
    """Bad signature, unknown correlation, schema violation, wrong kind of sender: all refused."""
    harness.national.callback_delay_s = 3600
    message_id = await send_application(harness)
    await until_state(harness, message_id, "delivered")
    cases = [
        (await post_callback(harness, message_id, key="stranger"), 401, "key_unknown"),
        (await post_callback(harness, str(uuid.uuid4())), 404, "message_unknown"),
        (await post_callback(harness, message_id, {"decision": "maybe"}), 422, "schema_invalid"),
        (
            await post_callback(harness, message_id, key="portal", member=PORTAL_ID),
            403,
            "forbidden",
        ),
    ]
    for (status, problem, _), want_status, want_code in cases:
        assert (status, problem["code"]) == (want_status, want_code), problem
    # A forged signature: right key id, wrong key material.
    url = f"{harness.url}/v1/callbacks/crossregion.apply"
    data = json.dumps(APPROVED).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        {
            "Content-Type": "application/json",
            "Gw-Client": NATIONAL_ID,
            "Gw-Message-Id": str(uuid.uuid4()),
            "Gw-Correlation-Id": message_id,
        }
    )
    Signer(harness.keys.pairs["stranger"]).sign_request("POST", url, headers, data)
    national_kid = harness.keys.pairs["national"].kid
    stranger_kid = harness.keys.pairs["stranger"].kid
    headers["Signature-Input"] = headers["Signature-Input"].replace(stranger_kid, national_kid)
    async with harness.gateway.session.post(url, data=data, headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == "signature_invalid"
    assert await harness.state_of(message_id) == "delivered"
    assert harness.portal.deliveries == []


async def test_member_outage_is_retried_until_delivered(harness: Harness) -> None:
    """The portal answers 503 twice; the gateway retries and delivers the same message id."""
    harness.portal.fail_next = 2
    message_id = await send_application(harness)
    await until_state(harness, message_id, "callback_delivered")
    assert len(harness.portal.deliveries) == 1
    assert harness.portal.fail_next == 0


async def test_unreachable_member_dead_letters_the_callback(make_harness: HarnessFactory) -> None:
    """A member that never takes its callbacks ends with a dead callback, listed for operators."""

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 2
        doc["members"][0]["callback_url"] = "http://127.0.0.1:9/unreachable"

    h = await make_harness(edit)
    message_id = await send_application(h)

    async def dead() -> bool:
        return any(d.kind == "callback" for d in await h.app[STORE].dead_letters())

    await h.wait_for(dead)
    assert await h.state_of(message_id) == "answered"
