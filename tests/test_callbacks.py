"""Callbacks are bound (PROTOCOL.md «Trust rules»): taken only from the member the message
was delivered to, in a state that awaits one; an identical repeat changes nothing, a
different one after the final decision is 409 unless the service supersedes. Real
servers on loopback (gateway, national simulator, portal), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.exchange.app import STORE
from gateway.signing import RequestView, Signer
from tests.conftest import (
    APPLY_EXAMPLE,
    NATIONAL_ID,
    PEER_ID,
    PORTAL_ID,
    Harness,
    HarnessFactory,
    Keys,
)
from tests.factories import APPROVED, post_callback, send_application, until_state

REJECTED = {**APPROVED, "decision": "rejected", "decided_at": "2026-11-27T10:00:00Z"}


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    """Every callback test runs on SQLite and on PostgreSQL."""
    return both_backends


def _as_unknown(problem: dict[str, Any], correlation: str, other: str) -> dict[str, Any]:
    """A problem with the correlation id swapped and without the callback's own id: two 404s
    compare equal only if they say the same thing about different messages."""
    swapped = json.loads(json.dumps(problem).replace(correlation, other))
    return {k: v for k, v in swapped.items() if k != "message_id"}


async def test_a_peer_that_never_handled_the_message_gets_what_an_unknown_id_gets(
    harness: Harness,
) -> None:
    """A peer gateway's callback for a message delivered to the platform is 404, word for
    word the answer to an unknown id; the portal receives nothing until the platform decides."""
    harness.national.callback_delay_s = 3600  # the simulator stays silent; we call back
    message_id = await send_application(harness)
    await until_state(harness, message_id, "delivered")
    status, problem, _ = await post_callback(
        harness, message_id, REJECTED, key="peer", member=PEER_ID
    )
    unknown = str(uuid.uuid4())
    status_unknown, problem_unknown, _ = await post_callback(
        harness, unknown, REJECTED, key="peer", member=PEER_ID
    )
    assert (status, problem["code"]) == (404, "message_unknown")
    assert (status_unknown, _as_unknown(problem_unknown, unknown, message_id)) == (
        404,
        _as_unknown(problem, message_id, message_id),
    )
    assert await harness.state_of(message_id) == "delivered"
    assert harness.portal.deliveries == []
    path = f"/admin/v1/messages/{message_id}"
    async with harness.admin.get(path, headers=harness.auth("auditor")) as resp:
        assert (await resp.json())["receiver"] == NATIONAL_ID  # recorded at delivery
    status, ack, _ = await post_callback(harness, message_id)  # the platform it went to
    assert (status, ack["state"]) == (200, "accepted")
    await until_state(harness, message_id, "callback_delivered")
    assert harness.portal.processed[message_id]["decision"] == "approved"
    view = (await harness.client("portal").status(message_id)).json()
    assert view["result"]["decision"] == "approved"


def _patient(doc: dict[str, Any]) -> None:
    """Enough attempts to outlast an outage; a breaker that recovers quickly."""
    doc["delivery"]["max_attempts"] = 50
    doc["adapters"][0]["breaker"] = {"failure_threshold": 3, "reset_timeout_s": 0.3}


async def test_a_callback_while_the_message_is_still_in_the_outbox_does_not_stop_its_delivery(
    make_harness: HarnessFactory,
) -> None:
    """While the platform is down the message waits in the outbox: a callback for it is a
    retryable 503 to the platform (404 to anyone else), and the message is still delivered."""
    h = await make_harness(_patient)
    h.national.mode = "refuse"
    message_id = await send_application(h)

    async def tried() -> bool:
        record = await h.app[STORE].get_message(PORTAL_ID, message_id)
        return record is not None and record.error is not None

    await h.wait_for(tried)
    status, problem, headers = await post_callback(h, message_id, REJECTED)
    assert (status, problem["code"]) == (503, "overloaded")
    assert headers["Retry-After"] == "1"
    status, problem, _ = await post_callback(h, message_id, REJECTED, key="peer", member=PEER_ID)
    assert (status, problem["code"]) == (404, "message_unknown")
    record = await h.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert record.state in ("accepted", "delivering")
    assert record.next_attempt_at is not None  # still due: the delivery goes on
    h.national.mode = "ok"
    await until_state(h, message_id, "callback_delivered", within_s=20)
    assert message_id in h.national.received  # the upstream did get it
    assert h.portal.processed[message_id]["decision"] == "approved"  # the simulator's decision


async def test_a_callback_right_after_the_acknowledgement_is_not_lost(harness: Harness) -> None:
    """The simulator calls back at once after its 202 (before our commit may land): the
    early callback is told to retry, and the decision reaches the portal."""
    harness.national.callback_delay_s = 0
    message_id = await send_application(harness)
    await until_state(harness, message_id, "callback_delivered")
    assert harness.national.callbacks_sent == [message_id]
    assert harness.portal.processed[message_id]["decision"] == "approved"


async def test_an_identical_repeat_changes_nothing_and_a_different_decision_conflicts(
    harness: Harness,
) -> None:
    """The same decision again (a new callback id) is 200 and changes nothing; a different
    one after it is 409 callback_conflict; the first is kept and delivered once."""
    harness.national.callback_delay_s = 3600
    message_id = await send_application(harness)
    await until_state(harness, message_id, "delivered")
    first = await post_callback(harness, message_id)
    assert (first[0], first[1]["state"]) == (200, "accepted")
    again = await post_callback(harness, message_id)
    assert (again[0], again[1]["state"], again[2]["Gw-Replayed"]) == (200, "duplicate", "true")
    other = await post_callback(harness, message_id, REJECTED)
    assert (other[0], other[1]["code"]) == (409, "callback_conflict")
    await until_state(harness, message_id, "callback_delivered")
    late = await post_callback(harness, message_id, REJECTED)  # after delivery, still refused
    assert (late[0], late[1]["code"]) == (409, "callback_conflict")
    assert harness.portal.deliveries == [first[1]["message_id"]]
    view = (await harness.client("portal").status(message_id)).json()
    assert (view["state"], view["result"]["decision"]) == ("callback_delivered", "approved")
    record = await harness.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert len(await harness.app[STORE].callbacks_of(record.seq)) == 1


async def test_a_superseding_service_keeps_and_delivers_every_decision_in_order(
    make_harness: HarnessFactory,
) -> None:
    """With supersede: true each later decision is kept beside the earlier, none overwritten,
    and each is delivered to the member, in order; the status shows the latest."""

    def supersede(doc: dict[str, Any]) -> None:
        doc["services"][1]["supersede"] = True

    h = await make_harness(supersede)
    h.national.callback_delay_s = 3600
    message_id = await send_application(h)
    await until_state(h, message_id, "delivered")
    first = await post_callback(h, message_id)
    await until_state(h, message_id, "callback_delivered")
    second = await post_callback(h, message_id, REJECTED)
    repeat = await post_callback(h, message_id, REJECTED)  # the latest again: nothing changes
    assert [r[1]["state"] for r in (first, second, repeat)] == ["accepted", "accepted", "duplicate"]

    async def both() -> bool:
        return len(h.portal.deliveries) == 2 and await h.state_of(message_id) == (
            "callback_delivered"
        )

    await h.wait_for(both)
    assert h.portal.deliveries == [first[1]["message_id"], second[1]["message_id"]]
    record = await h.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    history = await h.app[STORE].callbacks_of(record.seq)
    assert [json.loads(c.body)["decision"] for c in history] == ["approved", "rejected"]
    view = (await h.client("portal").status(message_id)).json()
    assert view["result"]["decision"] == "rejected"


async def test_supersede_is_set_through_the_admin_services_resource(harness: Harness) -> None:
    """An admin PATCH {"supersede": true} on a service takes effect: a later decision is then
    kept instead of refused; a supersede that is not a boolean is refused (422)."""
    harness.national.callback_delay_s = 3600
    path = "/admin/v1/services/crossregion.apply"

    async def patch(body: Any) -> int:
        data = json.dumps(body).encode()
        async with harness.admin.patch(path, data=data, headers=harness.auth()) as resp:
            return resp.status

    assert await patch({"supersede": "yes"}) == 422
    message_id = await send_application(harness)
    await until_state(harness, message_id, "delivered")
    assert (await post_callback(harness, message_id))[0] == 200
    assert (await post_callback(harness, message_id, REJECTED))[0] == 409
    assert await patch({"supersede": True}) == 200

    async def superseding() -> bool:  # the admin write is in force within a second
        status, _, _ = await post_callback(harness, message_id, REJECTED)
        return status == 200

    await harness.wait_for(superseding)
    record = await harness.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert len(await harness.app[STORE].callbacks_of(record.seq)) == 2


async def test_a_message_delivered_to_a_peer_takes_the_peers_callback_not_the_platforms(
    make_harness: HarnessFactory, keys: Keys
) -> None:
    """Routed to a peer gateway (peer_gateway records its peer_id as the receiver): the
    platform's callback is 404 as for an unknown id, the peer's is taken and delivered."""

    async def province_b(request: web.Request) -> web.Response:
        await request.read()
        body = json.dumps({"message_id": request.headers["Gw-Message-Id"], "state": "accepted"})
        headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
        label = request.headers["Signature-Input"].split("=", 1)[0]
        view = RequestView(request.method, str(request.url), request.headers)
        Signer(keys.pairs["peer"]).sign_response(202, headers, body.encode(), view, label)
        return web.Response(status=202, body=body.encode(), headers=headers)

    app = web.Application()
    app.router.add_post("/v1/exchange/{service}", province_b)
    server = TestServer(app)
    await server.start_server()
    try:

        def route(doc: dict[str, Any]) -> None:
            peer: dict[str, Any] = {"url": str(server.make_url("")).rstrip("/")}
            peer |= {"peer_id": PEER_ID, "peer_keys": [keys.jwk_file("peer")]}
            doc["adapters"].append({"name": "guangdong", "type": "peer_gateway", "config": peer})
            doc["routes"].insert(0, {"service": "crossregion.apply", "adapter": "guangdong"})
            doc["routes"][0]["target"] = PEER_ID

        h = await make_harness(route)
        reply = await h.client("portal").exchange(
            "crossregion.apply", APPLY_EXAMPLE, headers={"Gw-Target": PEER_ID}
        )
        assert reply.status == 202, reply.body
        message_id = reply.json()["message_id"]
        await until_state(h, message_id, "delivered")
        assert h.national.received == []
        status, problem, _ = await post_callback(h, message_id)
        assert (status, problem["code"]) == (404, "message_unknown")
        status, ack, _ = await post_callback(h, message_id, REJECTED, key="peer", member=PEER_ID)
        assert (status, ack["state"]) == (200, "accepted")
        await until_state(h, message_id, "callback_delivered")
        assert h.portal.processed[message_id]["decision"] == "rejected"
    finally:
        await server.close()


def _tax_applies(doc: dict[str, Any]) -> None:
    """A second local system that may apply too (its callbacks to the portal's URL)."""
    for member in doc["members"]:
        if member["id"] == "330000:tax-system":
            member["services"] = ["crossregion.apply"]
            portal = next(m for m in doc["members"] if m["id"] == PORTAL_ID)
            member["callback_url"] = portal["callback_url"]


async def test_a_decision_for_an_id_two_senders_used_is_given_to_neither(
    make_harness: HarnessFactory,
) -> None:
    """Two local systems send applications with the same message id (ids are unique per
    sender only) to one platform: its callback cannot say whose it is, so it is 409
    callback_conflict and neither message takes the other's decision."""
    h = await make_harness(_tax_applies)
    h.national.callback_delay_s = 3600  # the simulator stays silent; we call back
    shared = str(uuid.uuid4())
    for name in ("tax", "portal"):
        reply = await h.client(name).exchange("crossregion.apply", APPLY_EXAMPLE, message_id=shared)
        assert reply.status == 202, reply.body
    await until_state(h, shared, "delivered")

    async def both_delivered() -> bool:
        records = await h.app[STORE].find_by_message_id(shared)
        return len(records) == 2 and all(r.state == "delivered" for r in records)

    await h.wait_for(both_delivered)
    status, problem, _ = await post_callback(h, shared)
    assert (status, problem["code"]) == (409, "callback_conflict"), problem
    for name in ("tax", "portal"):
        view = (await h.client(name).status(shared)).json()
        assert "result" not in view, view
