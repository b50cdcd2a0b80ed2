"""The exchange pipeline end to end: real gateway, real national platform, real SQLite."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.config.model import MemberConfig, parse_config
from gateway.crypto.keys import public_from_jwk
from gateway.errors import MalformedRequest, NotPermitted
from gateway.exchange.app import STORE
from gateway.exchange.client import ExchangeClient, verify_reply
from gateway.exchange.pipeline import Authenticated, Pipeline, via_chain
from gateway.runtime.registry import Member
from gateway.signing import Signer, VerifiedSignature
from gateway.store import MessageRecord
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    DISABLED_ID,
    GATEWAY_ID,
    NATIONAL_ID,
    PORTAL_ID,
    Harness,
    HarnessFactory,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_hand_signed_request_gets_a_verifiable_signed_answer(harness: Harness) -> None:
    """A request signed with `cryptography` alone is answered 200, signed by a JWKS key."""
    key = harness.keys.pairs["portal"]
    assert isinstance(key.private, ed25519.Ed25519PrivateKey)
    url = f"{harness.url}/v1/exchange/credit.query"
    body = json.dumps(CREDIT_EXAMPLE).encode()
    digest = f"sha-256=:{_b64(hashlib.sha256(body).digest())}:"
    message_id = str(uuid.uuid4())
    created = int(time.time())
    params = (
        '("@method" "@target-uri" "content-digest" "content-type" "gw-client" "gw-message-id")'
        f';created={created};keyid="{key.kid}";alg="ed25519"'
    )
    base = "\n".join(
        [
            '"@method": POST',
            f'"@target-uri": {url}',
            f'"content-digest": {digest}',
            '"content-type": application/json',
            f'"gw-client": {PORTAL_ID}',
            f'"gw-message-id": {message_id}',
            f'"@signature-params": {params}',
        ]
    )
    signature = _b64(key.private.sign(base.encode()))
    headers = {
        "Content-Type": "application/json",
        "Content-Digest": digest,
        "Gw-Client": PORTAL_ID,
        "Gw-Message-Id": message_id,
        "Signature-Input": f"req={params}",
        "Signature": f"req=:{signature}:",
    }
    async with harness.gateway.session.post(url, data=body, headers=headers) as resp:
        answer = await resp.read()
        assert resp.status == 200, answer
        rh = resp.headers
    assert json.loads(answer)["uscc"] == CREDIT_EXAMPLE["uscc"]

    # Verify the answer by hand too: the base binds it to our own request signature.
    jwks = await (await harness.gateway.get("/.well-known/jwks.json")).json()
    resp_input = rh["Signature-Input"]
    _, _, rest = resp_input.partition("=")
    components_and_params = rest
    jwk = next(k for k in jwks["keys"] if f'keyid="{k["kid"]}"' in components_and_params)
    public = public_from_jwk(jwk)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    assert rh["Content-Digest"] == f"sha-256=:{_b64(hashlib.sha256(answer).digest())}:"
    expected_components = (
        '("@status" "content-digest" "content-type" "gw-message-id" "signature";req;key="req")'
    )
    assert components_and_params.startswith(expected_components)
    resp_base = "\n".join(
        [
            '"@status": 200',
            f'"content-digest": {rh["Content-Digest"]}',
            f'"content-type": {rh["Content-Type"]}',
            f'"gw-message-id": {message_id}',
            f'"signature";req;key="req": :{signature}:',
            f'"@signature-params": {components_and_params}',
        ]
    )
    resp_sig = rh["Signature"].split("=", 1)[1].strip(":")
    public.verify(base64.b64decode(resp_sig), resp_base.encode())  # raises if forged


async def test_answer_is_recorded_with_timings_and_adapter(harness: Harness) -> None:
    """A sync exchange ends `answered` in the log with adapter, digest and stage timings."""
    reply = await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200
    message_id = reply.headers["Gw-Message-Id"]
    record = await harness.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert record.state == "answered"
    assert record.adapter == "national"
    assert record.status == 200
    sent = json.dumps(CREDIT_EXAMPLE, ensure_ascii=False).encode()
    assert record.request_body == sent
    assert record.request_digest == hashlib.sha256(sent).hexdigest()
    assert json.loads(record.response_body or b"{}")["uscc"] == CREDIT_EXAMPLE["uscc"]
    # Recorded once, with its outcome (one commit): its own "record" time is not stored.
    assert {"verify", "validate", "upstream", "total"} <= set(record.timings)
    assert record.request_headers["Gw-Client"] == PORTAL_ID
    assert harness.national.received == [message_id]


async def test_outbound_request_is_signed_by_the_gateway_with_via(harness: Harness) -> None:
    """The national platform verified the gateway's key (else it would have answered 401)."""
    reply = await harness.client("portal").exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Issue": "ZJ2026-0001"}
    )
    assert reply.status == 200, reply.body
    verify_reply(reply, harness.keys.verification("gateway"))


async def test_same_message_id_same_body_replays_the_stored_answer(harness: Harness) -> None:
    """Sending a message twice returns the stored answer with Gw-Replayed; upstream sees one."""
    client = harness.client("portal")
    message_id = str(uuid.uuid4())
    first = await client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
    second = await client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
    assert first.status == second.status == 200
    assert second.headers["Gw-Replayed"] == "true"
    assert second.body == first.body
    verify_reply(second, harness.keys.verification("gateway"))
    assert harness.national.received == [message_id]


async def test_async_replay_returns_the_202(harness: Harness) -> None:
    """An async message sent twice is acknowledged twice with the same Location."""
    client = harness.client("portal")
    message_id = str(uuid.uuid4())
    first = await client.exchange("crossregion.apply", APPLY_EXAMPLE, message_id=message_id)
    second = await client.exchange("crossregion.apply", APPLY_EXAMPLE, message_id=message_id)
    assert first.status == second.status == 202
    assert second.headers["Location"] == first.headers["Location"] == f"/v1/messages/{message_id}"
    assert second.headers["Gw-Replayed"] == "true"


async def test_prefer_respond_async_on_a_service_that_allows_it(harness: Harness) -> None:
    """`Prefer: respond-async` on a sync service with allow_async gives 202 and a result."""
    client = harness.client("portal")
    reply = await client.exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Prefer": "respond-async"}
    )
    assert reply.status == 202
    message_id = reply.json()["message_id"]

    async def answered() -> bool:
        return await harness.state_of(message_id) == "callback_delivered"

    await harness.wait_for(answered)
    status = await client.status(message_id)
    assert status.status == 200
    assert status.json()["result"]["uscc"] == CREDIT_EXAMPLE["uscc"]
    assert harness.portal.processed[message_id]["uscc"] == CREDIT_EXAMPLE["uscc"]


async def test_message_status_is_private_to_its_sender(harness: Harness) -> None:
    """Another member asking for a message it did not send gets 404 message_unknown."""
    reply = await harness.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    message_id = reply.json()["message_id"]
    own = await harness.client("portal").status(message_id)
    assert own.status == 200
    assert own.json()["service"] == "crossregion.apply"
    other = await harness.client("tax").status(message_id)
    assert other.status == 404
    assert other.json()["code"] == "message_unknown"


def _hand_signed_get(
    harness: Harness, path: str, message_id: str | None, covered: bool
) -> dict[str, str]:
    """Headers of a GET signed by the portal's key with `cryptography` alone."""
    key = harness.keys.pairs["portal"]
    assert isinstance(key.private, ed25519.Ed25519PrivateKey)
    components = ['"@method"', '"@target-uri"', '"gw-client"']
    lines = ['"@method": GET', f'"@target-uri": {harness.url}{path}', f'"gw-client": {PORTAL_ID}']
    if message_id is not None and covered:
        components.append('"gw-message-id"')
        lines.append(f'"gw-message-id": {message_id}')
    params = f'({" ".join(components)});created={int(time.time())};keyid="{key.kid}"'
    lines.append(f'"@signature-params": {params}')
    signature = _b64(key.private.sign("\n".join(lines).encode()))
    headers = {
        "Gw-Client": PORTAL_ID,
        "Signature-Input": f"req={params}",
        "Signature": f"req=:{signature}:",
    }
    if message_id is not None:
        headers["Gw-Message-Id"] = message_id
    return headers


async def test_a_read_signed_as_the_protocol_says_needs_no_message_id(harness: Harness) -> None:
    """GET /v1/messages/{id} signed over @method, @target-uri, gw-client alone is answered 200."""
    reply = await harness.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    message_id = reply.json()["message_id"]
    path = f"/v1/messages/{message_id}"
    headers = _hand_signed_get(harness, path, None, covered=False)
    async with harness.gateway.session.get(harness.url + path, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert body["message_id"] == message_id
    assert body["service"] == "crossregion.apply"


async def test_a_read_may_send_a_message_id_only_if_its_signature_covers_it(
    harness: Harness,
) -> None:
    """A covered Gw-Message-Id on a read is accepted; an uncovered one is 401 signature_invalid."""
    reply = await harness.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    message_id = reply.json()["message_id"]
    path = f"/v1/messages/{message_id}"
    url = harness.url + path
    covered = _hand_signed_get(harness, path, str(uuid.uuid4()), covered=True)
    async with harness.gateway.session.get(url, headers=covered) as resp:
        assert resp.status == 200, await resp.text()
    uncovered = _hand_signed_get(harness, path, str(uuid.uuid4()), covered=False)
    async with harness.gateway.session.get(url, headers=uncovered) as resp:
        problem = await resp.json()
        assert resp.status == 401, problem
    assert problem["code"] == "signature_invalid"
    assert "gw-message-id" in problem["detail"]


async def test_peer_gateway_may_vouch_for_its_own_region(make_harness: HarnessFactory) -> None:
    """440000:gateway relaying for a 440000 member is accepted (signed by the peer's key).
    Answered locally: the national platform takes from this gateway only 330000's clients."""

    def local_registry(doc: dict[str, Any]) -> None:
        record = {"uscc": CREDIT_EXAMPLE["uscc"], "name": "x", "status": "active",
                  "updated_at": "2026-11-26T00:00:00Z"}  # fmt: skip
        doc["adapters"].append(
            {"name": "registry", "type": "mock",
             "config": {"responses": {"credit.query": {"body": record}}}}
        )  # fmt: skip
        doc["routes"][0]["adapter"] = "registry"

    harness = await make_harness(local_registry)
    peer = harness.client("peer", member_id="440000:back-office")
    reply = await peer.exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Via": "440000:gateway"}
    )
    assert reply.status == 200, reply.body


async def test_peer_gateway_may_not_vouch_outside_its_regions(harness: Harness) -> None:
    """440000:gateway relaying for a 330000 member is refused 403 forbidden, before upstream."""
    peer = harness.client("peer", member_id="330000:one-stop-portal")
    reply = await peer.exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Via": "440000:gateway"}
    )
    assert reply.status == 403
    assert reply.json()["code"] == "forbidden"
    assert harness.national.received == []


async def test_schema_errors_list_every_violation_with_pointers(harness: Harness) -> None:
    """A document with several faults gets 422 with one {pointer, message} per fault."""
    bad: dict[str, Any] = {
        "uscc": "91350100M000100Y44",
        "scope": ["basic", "gossip"],
        "extra": 1,
    }
    reply = await harness.client("portal").exchange("credit.query", bad)
    assert reply.status == 422
    problem = reply.json()
    assert problem["code"] == "schema_invalid"
    pointers = {e["pointer"] for e in problem["errors"]}
    assert {"", "/uscc", "/scope/1"} <= pointers
    text = json.dumps(problem)
    assert "91350100M000100Y44" not in text  # values are never echoed
    assert harness.national.received == []


async def test_disabled_member_is_refused(harness: Harness) -> None:
    """A disabled member gets 403 client_disabled even with a valid signature."""
    reply = await harness.client("disabled").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 403
    assert reply.json()["code"] == "client_disabled"
    assert DISABLED_ID not in harness.national.received


async def test_every_answer_is_signed_even_errors(harness: Harness) -> None:
    """A 404 for an unknown service is still signed by the gateway and bound to the request."""
    reply = await harness.client("portal").exchange("no.such", {})
    assert reply.status == 404
    assert reply.headers["Content-Type"] == "application/problem+json"
    verify_reply(reply, harness.keys.verification("gateway"))


async def test_upstream_answer_violating_schema_is_502(make_harness: HarnessFactory) -> None:
    """An upstream answer that fails the response schema never reaches the member."""

    def edit(doc: dict[str, Any]) -> None:
        doc["adapters"].append(
            {
                "name": "bad",
                "type": "mock",
                "config": {"responses": {"default": {"body": {"uscc": 42}}}},
            }
        )
        doc["routes"][0]["adapter"] = "bad"

    h = await make_harness(edit)
    reply = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 502
    assert reply.json()["code"] == "upstream_error"
    record = await h.app[STORE].get_message(PORTAL_ID, reply.headers["Gw-Message-Id"])
    assert record is not None
    assert record.state == "failed"
    assert record.code == "upstream_error"


async def test_target_routes_to_its_own_adapter(make_harness: HarnessFactory) -> None:
    """A route with a Gw-Target match wins over the service's catch-all route."""

    def edit(doc: dict[str, Any]) -> None:
        record = {
            "uscc": "91350100M000100Y43",
            "name": "粤港企业",
            "status": "active",
            "updated_at": "2026-01-01T00:00:00Z",
        }
        doc["adapters"].append(
            {"name": "gd", "type": "mock", "config": {"responses": {"default": {"body": record}}}}
        )
        doc["routes"].append(
            {"service": "credit.query", "adapter": "gd", "target": "440000:gateway"}
        )

    h = await make_harness(edit)
    client = h.client("portal")
    routed = await client.exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": "440000:gateway"}
    )
    assert routed.json()["name"] == "粤港企业"
    default = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert default.json()["name"] != "粤港企业"
    assert len(h.national.received) == 1


async def test_client_signed_with_ecdsa_is_accepted(make_harness: HarnessFactory) -> None:
    """A member with an ECDSA P-256 key exchanges like an Ed25519 one."""

    def edit(doc: dict[str, Any]) -> None:
        doc["members"][1]["services"] = ["credit.query"]

    h = await make_harness(edit)
    reply = await h.client("tax").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200, reply.body


# Trust rules as units: vouching, the relay chain, who may read, the target URI ----------


def _relay(
    kind: str, regions: tuple[str, ...], member_id: str = "100000:national-platform"
) -> Member:
    return Member(config=MemberConfig(id=member_id, kind=kind, regions=regions), keys={})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("regions", "client", "allowed"),
    [
        (("100000",), "330000:one-stop-portal", False),  # the gateway's own region, never
        (("100000", "330000"), "330000:one-stop-portal", False),  # not even when granted
        (("100000", "330000"), "330100:city-portal", False),  # nor its sub-regions
        (("100000",), "440000:back-office", False),  # 100000 is not every region
        (("100000",), "100000:ministry-system", True),  # it is the national level's own
        (("440000",), "440000:back-office", True),
        (("440000",), "440100:city-office", False),  # granted exactly, not by prefix
    ],
)
def test_a_relay_vouches_only_for_what_it_is_granted(
    regions: tuple[str, ...], client: str, allowed: bool
) -> None:
    """Vouching at the 330000 gateway: explicit grants only, never the own region."""
    relay = _relay("platform", regions)
    if allowed:
        Pipeline._check_vouching(relay, client, "330000")
    else:
        with pytest.raises(NotPermitted):
            Pipeline._check_vouching(relay, client, "330000")


def test_a_system_cannot_relay_at_all() -> None:
    """A member of kind system vouches for nobody, whatever its regions say."""
    with pytest.raises(NotPermitted, match="not a gateway"):
        Pipeline._check_vouching(_relay("system", ("440000",), "440000:x"), "440000:y", "330000")


def test_the_relay_chain_is_read_oldest_first() -> None:
    """Gw-Via is a comma-separated chain of member ids; anything else is malformed."""
    assert via_chain("440000:gateway, 100000:national-platform") == (
        "440000:gateway",
        "100000:national-platform",
    )
    assert via_chain(None) == via_chain("  ") == ()
    for bad in ("440000:gateway,", "gateway", "440000:gateway;100000:x"):
        with pytest.raises(MalformedRequest):
            via_chain(bad)


def _record(headers: dict[str, str], client: str = "440000:citizen-app") -> MessageRecord:
    now = time.time()
    return MessageRecord(
        seq=1, message_id=str(uuid.uuid4()), client=client, service="s", mode="async",
        state="accepted", request_headers=headers, request_body=b"{}", request_digest="",
        target=None, adapter=None, status=None, code=None, response_headers={},
        response_body=None, result=None, error=None, attempts=0, next_attempt_at=None,
        created_at=now, updated_at=now,
    )  # fmt: skip


def _auth(signer: str, client: str, via: tuple[str, ...]) -> Authenticated:
    return Authenticated(
        client=client,
        message_id="",
        signer=_relay("gateway", ("440000",), signer),
        signature=VerifiedSignature(
            label="s", keyid="k", algorithm="ed25519", created=0, nonce="n"
        ),
        digest="",
        via=via,
    )


def test_a_message_is_readable_by_its_sender_and_the_relay_that_signed_it() -> None:
    """The last hop of the recorded chain reads it, and the client itself; another relay
    (even one earlier in the chain) does not; a direct message no relay reads."""
    relayed = _record({"Gw-Via": "330000:gateway, 100000:national-platform"})
    assert relayed.via == ("330000:gateway", "100000:national-platform")
    nat, b = "100000:national-platform", "440000:gateway"
    assert Pipeline._may_read(_auth(nat, relayed.client, (nat,)), relayed)
    assert Pipeline._may_read(_auth(relayed.client, relayed.client, ()), relayed)
    assert not Pipeline._may_read(_auth(b, relayed.client, (b,)), relayed)
    assert not Pipeline._may_read(
        _auth("330000:gateway", relayed.client, ("330000:gateway",)), relayed
    )
    direct = _record({})
    assert not Pipeline._may_read(_auth(b, direct.client, (b,)), direct)


def _request(host: str, sockname: tuple[Any, ...], path: str = "/v1/exchange/x?a=1") -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        sockname if name == "sockname" else default
    )
    return make_mocked_request("POST", path, headers={"Host": host}, transport=transport)


def _target_pipeline(public_url: Any = None) -> Pipeline:
    doc: dict[str, Any] = {"member_id": GATEWAY_ID, "key": "k.pem"}
    if public_url is not None:
        doc["public_url"] = public_url
    pipeline = Pipeline.__new__(Pipeline)
    pipeline.identity = parse_config(
        {"gateway": doc, "members": [], "services": [], "adapters": [], "routes": []},
        base=Path("."),
    ).gateway
    return pipeline


def test_without_a_public_url_the_target_is_the_bound_address_not_the_host() -> None:
    """@target-uri comes from the socket the request arrived on, never the Host header."""
    pipeline = _target_pipeline()
    request = _request("gw-b.example:9", ("127.0.0.1", 18080))
    assert pipeline.target_uri(request) == "http://127.0.0.1:18080/v1/exchange/x?a=1"
    v6 = _request("gw-b.example:9", ("::1", 18080, 0, 0))
    assert pipeline.target_uri(v6) == "http://[::1]:18080/v1/exchange/x?a=1"
    default_port = _request("x", ("127.0.0.1", 80))
    assert pipeline.target_uri(default_port) == "http://127.0.0.1/v1/exchange/x?a=1"


def test_with_public_urls_the_target_is_one_of_them() -> None:
    """The public URL whose authority is the Host header's, else the first: a Host naming
    another gateway never makes its URL the target."""
    pipeline = _target_pipeline(["https://gw.example/", "https://gw-2.example:8443/base"])
    sock = ("10.0.0.5", 8080)
    first = _request("gw.example", sock)
    assert pipeline.target_uri(first) == "https://gw.example/v1/exchange/x?a=1"
    second = _request("GW-2.example:8443", sock)
    assert pipeline.target_uri(second) == "https://gw-2.example:8443/base/v1/exchange/x?a=1"
    other = _request("gw-b.example", sock)
    assert pipeline.target_uri(other) == "https://gw.example/v1/exchange/x?a=1"


async def test_a_cross_region_request_without_a_nonce_is_refused(harness: Harness) -> None:
    """The national platform speaking for itself without a nonce is 401 signature_invalid;
    with one (our signers' default) it passes authentication (403: it has no services)."""
    bare = ExchangeClient(
        member_id=NATIONAL_ID,
        signer=Signer(harness.keys.pairs["national"], nonces=False),
        base_url=harness.url,
        session=harness.gateway.session,
    )
    reply = await bare.exchange("credit.query", CREDIT_EXAMPLE)
    assert (reply.status, reply.json()["code"]) == (401, "signature_invalid"), reply.body
    assert "nonce" in reply.json()["detail"]
    signed = await harness.client("national").exchange("credit.query", CREDIT_EXAMPLE)
    assert signed.json()["code"] == "forbidden"


async def test_a_local_member_may_retry_byte_for_byte_without_a_nonce(harness: Harness) -> None:
    """A local system's request without a nonce is accepted, and its identical resend is
    answered from the store (Gw-Replayed): nonces are not required locally."""
    portal = ExchangeClient(
        member_id=PORTAL_ID,
        signer=Signer(harness.keys.pairs["portal"], nonces=False),
        base_url=harness.url,
        session=harness.gateway.session,
    )
    url, headers, data = portal.prepare("POST", "/v1/exchange/credit.query", CREDIT_EXAMPLE)
    for replayed in (False, True):
        async with harness.gateway.session.post(url, data=data, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert ("Gw-Replayed" in resp.headers) is replayed
