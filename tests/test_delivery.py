"""Asynchronous exchange: outbox, retries, dead letters, breaker, callbacks, at least once;
on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.app import STORE
from gateway.delivery import backoff_delay
from gateway.signing import Signer
from tests.conftest import APPLY_EXAMPLE, NATIONAL_ID, PORTAL_ID, Harness, HarnessFactory


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    """Every delivery test runs on SQLite and on PostgreSQL."""
    return both_backends


DECISION = {
    "decision": "approved",
    "case_number": "CR2026112600000001",
    "handling_region": "440000",
    "decided_at": "2026-11-26T10:00:00Z",
}


def _patient(doc: dict[str, Any]) -> None:
    """Enough attempts to outlast an outage; a breaker that recovers quickly."""
    doc["delivery"]["max_attempts"] = 50
    doc["adapters"][0]["breaker"] = {"failure_threshold": 3, "reset_timeout_s": 0.3}


async def _apply(h: Harness) -> str:
    reply = await h.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    assert reply.status == 202, reply.body
    assert reply.headers["Location"].endswith(reply.json()["message_id"])
    message_id: str = reply.json()["message_id"]
    return message_id


async def _until_state(h: Harness, message_id: str, state: str, within_s: float = 10) -> None:
    async def reached() -> bool:
        return await h.state_of(message_id) == state

    await h.wait_for(reached, within_s)


async def _callback(
    h: Harness,
    correlation: str,
    body: Any = None,
    *,
    key: str = "national",
    member: str = NATIONAL_ID,
    message_id: str | None = None,
) -> tuple[int, dict[str, Any]]:
    url = f"{h.url}/v1/callbacks/crossregion.apply"
    data = json.dumps(DECISION if body is None else body).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        {
            "Content-Type": "application/json",
            "Gw-Client": member,
            "Gw-Message-Id": message_id or str(uuid.uuid4()),
            "Gw-Correlation-Id": correlation,
        }
    )
    Signer(h.keys.pairs[key]).sign_request("POST", url, headers, data)
    async with h.gateway.session.post(url, data=data, headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


async def test_async_message_reaches_callback_delivered(harness: Harness) -> None:
    """202 → national ack → signed callback → portal verified it → callback_delivered."""
    message_id = await _apply(harness)
    await _until_state(harness, message_id, "callback_delivered")
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
    ids = [await _apply(h) for _ in range(6)]

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
        await _until_state(h, message_id, "callback_delivered", within_s=20)
    assert sorted(h.portal.processed) == sorted(ids)
    assert await h.app[STORE].dead_letters() == []

    async def ready() -> bool:  # adapter health answers are cached for a few seconds
        return (await h.gateway.get("/readyz")).status == 200

    await h.wait_for(ready)


async def test_upstream_5xx_retries_then_dead_then_redeliver(make_harness: HarnessFactory) -> None:
    """5xx answers are retried with backoff, then dead-lettered; a redelivery then succeeds."""

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 3
        doc["adapters"][0]["breaker"] = {"failure_threshold": 100, "reset_timeout_s": 0.1}

    h = await make_harness(edit)
    h.national.mode = "error"
    message_id = await _apply(h)
    await _until_state(h, message_id, "dead")
    record = await h.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert record.attempts == 3
    assert "500" in (record.error or "")
    dead = await h.app[STORE].dead_letters()
    assert [(d.kind, d.message_id) for d in dead] == [("message", message_id)]
    h.national.mode = "ok"
    assert await h.app[STORE].redeliver("message", record.seq, 0.0)
    await _until_state(h, message_id, "callback_delivered")
    assert await h.app[STORE].dead_letters() == []


async def test_upstream_hang_times_out_and_dead_letters(make_harness: HarnessFactory) -> None:
    """A hanging upstream costs one service timeout per attempt, then a dead letter."""

    def edit(doc: dict[str, Any]) -> None:
        doc["services"][1]["timeout_s"] = 0.3
        doc["delivery"]["max_attempts"] = 2
        doc["adapters"][0]["breaker"] = {"failure_threshold": 100, "reset_timeout_s": 0.1}

    h = await make_harness(edit)
    h.national.mode = "hang"
    message_id = await _apply(h)
    await _until_state(h, message_id, "dead")
    record = await h.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert "no answer within" in (record.error or "")


async def test_repeated_callback_is_acknowledged_and_delivered_once(harness: Harness) -> None:
    """The same callback (same Gw-Message-Id) twice: 200 both times, one delivery to the member."""
    harness.national.callback_delay_s = 3600  # the simulator stays silent; we call back
    message_id = await _apply(harness)
    await _until_state(harness, message_id, "delivered")
    callback_id = str(uuid.uuid4())
    first = await _callback(harness, message_id, message_id=callback_id)
    second = await _callback(harness, message_id, message_id=callback_id)
    assert first == (200, {**first[1], "state": "accepted"})
    assert second[0] == 200
    assert second[1]["state"] == "duplicate"
    await _until_state(harness, message_id, "callback_delivered")
    assert harness.portal.deliveries.count(callback_id) == 1


async def test_bad_callbacks_are_rejected_and_nothing_delivered(harness: Harness) -> None:
    """Bad signature, unknown correlation, schema violation, wrong kind of sender: all refused."""
    harness.national.callback_delay_s = 3600
    message_id = await _apply(harness)
    await _until_state(harness, message_id, "delivered")
    cases = [
        (await _callback(harness, message_id, key="stranger"), 401, "key_unknown"),
        (await _callback(harness, str(uuid.uuid4())), 404, "message_unknown"),
        (await _callback(harness, message_id, {"decision": "maybe"}), 422, "schema_invalid"),
        (
            await _callback(harness, message_id, key="portal", member=PORTAL_ID),
            403,
            "forbidden",
        ),
    ]
    for (status, problem), want_status, want_code in cases:
        assert (status, problem["code"]) == (want_status, want_code), problem
    # A forged signature: right key id, wrong key material.
    url = f"{harness.url}/v1/callbacks/crossregion.apply"
    data = json.dumps(DECISION).encode()
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
    message_id = await _apply(harness)
    await _until_state(harness, message_id, "callback_delivered")
    assert len(harness.portal.deliveries) == 1
    assert harness.portal.fail_next == 0


async def test_unreachable_member_dead_letters_the_callback(make_harness: HarnessFactory) -> None:
    """A member that never takes its callbacks ends with a dead callback, listed for operators."""

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 2
        doc["members"][0]["callback_url"] = "http://127.0.0.1:9/unreachable"

    h = await make_harness(edit)
    message_id = await _apply(h)

    async def dead() -> bool:
        return any(d.kind == "callback" for d in await h.app[STORE].dead_letters())

    await h.wait_for(dead)
    assert await h.state_of(message_id) == "answered"
