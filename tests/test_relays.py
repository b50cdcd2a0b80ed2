"""Trust boundaries of relays, status reads and destinations (issue 20, parts 1 and 5),
on real ``gateway serve`` processes: province A (330000, no ``public_url``: its targets
come from its bound address) and province B (440000, with one), the national-platform
simulator in-process as the relay, and A's back office as a recording server.

Each test is an attack that worked before: a relay posing as a local system, reading a
local member's results, the relay chain lost on the way to the back office, a relayed
request without a nonce, a request signed for one gateway replayed at another, and the
national simulator relaying what a gateway key may not ask for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.exchange.client import ExchangeClient, Reply
from gateway.federation.directory import Publisher
from gateway.signing import RequestView, Signer
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    NATIONAL_ID,
    PEER_ID,
    PORTAL_ID,
    SCHEMAS,
    TAX_ID,
    Keys,
    unused_port,
)
from tests.test_outbound import _replaying

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

A_ID, B_ID = GATEWAY_ID, PEER_ID  # 330000:gateway, 440000:gateway
B_CLIENT = "440000:citizen-app"
SIGNED_REGISTRY = "330000:signed-registry"  # Gw-Target routed to the "unbound" adapter
DECIDED_LATER = "CASE-DECIDED-LATER"  # Gw-Issue: the office answers 202, a callback decides
RECORD = {
    "uscc": "91350100M000100Y43",
    "name": "模拟企业",
    "status": "active",
    "updated_at": "2026-11-26T00:00:00Z",
}


def _service(code: str, mode: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "code": code,
        "mode": mode,
        "request_schema": str(SCHEMAS / code / "request.json"),
        "response_schema": str(SCHEMAS / code / "response.json"),
        "timeout_s": 5,
    }
    if (SCHEMAS / code / "callback.json").exists():
        entry["callback_schema"] = str(SCHEMAS / code / "callback.json")
    return entry


@dataclass
class Office:
    """A's back office: records what reached it, answers as the services' schemas want."""

    seen: dict[str, CIMultiDict[str]] = field(default_factory=dict)
    moved: int = 0  # callbacks posted to the redirecting callback URL
    stolen: int = 0  # requests that followed its redirect

    async def redirect(self, request: web.Request) -> web.Response:
        await request.read()
        self.moved += 1
        raise web.HTTPTemporaryRedirect("/stolen")  # 307: a client that follows re-posts

    async def steal(self, request: web.Request) -> web.Response:
        await request.read()
        self.stolen += 1
        return web.json_response({})

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen[request.headers.get("Gw-Message-Id", "?")] = CIMultiDict(request.headers)
        if request.headers.get("Gw-Issue") == DECIDED_LATER:  # the decision comes by callback
            return web.json_response({"accepted": True}, status=202)
        if request.match_info["service"] == "crossregion.apply":
            return web.json_response({"accepted": True, "ticket": "BO-1"})
        return web.json_response(RECORD)


@dataclass
class Provinces:
    keys: Keys
    a_url: str
    b_url: str
    sim_url: str
    sim: NationalPlatform
    office: Office
    session: aiohttp.ClientSession

    def client(self, key: str, member_id: str, base: str, **signer: Any) -> ExchangeClient:
        return ExchangeClient(
            member_id=member_id,
            signer=Signer(self.keys.pairs[key], **signer),
            base_url=base,
            session=self.session,
        )

    async def office_got(self, message_id: str, within_s: float = 10.0) -> CIMultiDict[str]:
        deadline = time.monotonic() + within_s
        while message_id not in self.office.seen:
            assert time.monotonic() < deadline, f"{message_id} never reached A's back office"
            await asyncio.sleep(0.02)
        return self.office.seen[message_id]


def _a_config(keys: Keys, tmp: Path, port: int, office_url: str) -> dict[str, Any]:
    return {
        "gateway": {"member_id": A_ID, "key": str(keys.directory / "gateway.pem")},
        "listen": {
            "ingress": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": unused_port()},
        },
        "store": {"path": str(tmp / "a.db")},
        "delivery": {"poll_interval_s": 0.05, "base_delay_s": 0.05, "max_delay_s": 0.2},
        "members": [
            {
                "id": PORTAL_ID,
                "kind": "system",
                "keys": [keys.jwk_file("portal")],
                "services": ["credit.query", "crossregion.apply"],
                "callback_url": f"{office_url}/callbacks",
            },
            {
                "id": TAX_ID,
                "kind": "system",
                "keys": [keys.jwk_file("tax")],
                "services": ["crossregion.apply"],
                "callback_url": f"{office_url}/moved/callbacks",  # answers 307
            },
            {
                "id": NATIONAL_ID,
                "kind": "platform",
                "keys": [keys.jwk_file("national")],
                # The national level's own members, and province B's (explicitly granted).
                "regions": ["100000", "440000"],
                "services": ["credit.query", "crossregion.apply"],
            },
            {
                "id": B_ID,
                "kind": "gateway",
                "keys": [keys.jwk_file("peer")],
                "regions": ["440000"],
                "services": ["credit.query", "crossregion.apply"],
            },
        ],
        "services": [_service("credit.query", "sync"), _service("crossregion.apply", "async")],
        "adapters": [
            # The national platform is the one that decides what the office takes.
            {
                "name": "office",
                "type": "http",
                "config": {"url": f"{office_url}/{{service}}", "receiver": NATIONAL_ID},
            },
            # A registry whose answers the national key signs, over @status and the body only.
            {
                "name": "unbound",
                "type": "http",
                "config": {
                    "url": f"{office_url}/unbound/{{service}}",
                    "verify_response": {"keys": [keys.jwk_file("national")]},
                },
            },
        ],
        "routes": [
            {"service": "credit.query", "adapter": "office"},
            {"service": "credit.query", "adapter": "unbound", "target": SIGNED_REGISTRY},
            {"service": "crossregion.apply", "adapter": "office"},
        ],
    }


def _b_config(keys: Keys, tmp: Path, port: int) -> dict[str, Any]:
    return {
        "gateway": {
            "member_id": B_ID,
            "key": str(keys.directory / "peer.pem"),
            "public_url": f"http://127.0.0.1:{port}",
        },
        "listen": {
            "ingress": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": unused_port()},
        },
        "store": {"path": str(tmp / "b.db")},
        "members": [
            {
                "id": NATIONAL_ID,
                "kind": "platform",
                "keys": [keys.jwk_file("national")],
                "regions": ["100000"],
                "services": ["credit.query"],
            }
        ],
        "services": [_service("credit.query", "sync")],
        "adapters": [
            {
                "name": "registry",
                "type": "mock",
                "config": {"responses": {"credit.query": {"body": RECORD}}},
            }
        ],
        "routes": [{"service": "credit.query", "adapter": "registry"}],
    }


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, _tail(log)
            assert time.monotonic() < deadline, f"{url} never became ready"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module", name="p")
async def provinces(
    keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Provinces]:
    """A and B as `gateway serve` processes, started together and shared by every test."""
    tmp = tmp_path_factory.mktemp("relays")
    a_port, b_port, sim_port, office_port = (unused_port() for _ in range(4))
    a_url, b_url = f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{b_port}"
    office = Office()
    office_app = web.Application()
    office_app.router.add_post("/moved/callbacks", office.redirect)
    office_app.router.add_post("/stolen", office.steal)
    office_app.router.add_post("/unbound/{service}", _replaying(keys, envelope=False))
    office_app.router.add_post("/{service}", office.handle)
    # The simulator knows each gateway by the key the national registry lists for it.
    publisher = Publisher(
        keypair=keys.pairs["stranger"],
        national={"member_id": NATIONAL_ID, "url": f"http://127.0.0.1:{sim_port}",
                  "keys": [{"jwk": keys.pairs["national"].jwk}]},
    )  # fmt: skip
    for region, member, key, url in (("330000", A_ID, "gateway", a_url),
                                     ("440000", B_ID, "peer", b_url)):  # fmt: skip
        publisher.register(
            region,
            {"member_id": member, "url": url, "keys": [{"jwk": keys.pairs[key].jwk}]},
        )
    sim = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted={},
        callback_base=a_url,
        callback_delay_s=60,  # no decisions by callback during these tests
        provinces={"330000": a_url, "440000": b_url},
        publisher=publisher,
    )
    servers = [
        TestServer(office_app, port=office_port),
        TestServer(create_national_app(sim), port=sim_port),
    ]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for server in servers:
            await server.start_server()
        docs = {
            "a": _a_config(keys, tmp, a_port, f"http://127.0.0.1:{office_port}"),
            "b": _b_config(keys, tmp, b_port),
        }
        for name, doc in docs.items():
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(doc), encoding="utf-8")
            with (tmp / f"{name}.log").open("ab") as out:
                command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)]
                processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
        for url, process, name in zip((a_url, b_url), processes, "ab", strict=True):
            await _ready(url, process, tmp / f"{name}.log")
        async with aiohttp.ClientSession() as session:
            yield Provinces(
                keys, a_url, b_url, f"http://127.0.0.1:{sim_port}", sim, office, session
            )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for server in servers:
            await server.close()


async def test_the_national_key_cannot_pose_as_a_local_system(p: Provinces) -> None:
    """The national key vouching for A's own portal is 403 forbidden; nothing is delivered."""
    national = p.client("national", PORTAL_ID, p.a_url)
    message_id = str(uuid.uuid4())
    reply = await national.exchange(
        "credit.query", CREDIT_EXAMPLE, message_id=message_id, headers={"Gw-Via": NATIONAL_ID}
    )
    assert (reply.status, reply.json()["code"]) == (403, "forbidden"), reply.body
    assert message_id not in p.office.seen


async def test_a_local_members_results_are_unknown_to_relays(p: Provinces) -> None:
    """The portal reads its own message; the national key asking for it, vouching for the
    portal, gets 404 message_unknown, as for an id that does not exist."""
    portal = p.client("portal", PORTAL_ID, p.a_url)
    sent = await portal.exchange("crossregion.apply", APPLY_EXAMPLE)
    assert sent.status == 202, sent.body
    message_id = sent.json()["message_id"]
    assert (await portal.status(message_id)).status == 200
    national = p.client("national", PORTAL_ID, p.a_url)
    read = await national.request(
        "GET", f"/v1/messages/{message_id}", headers={"Gw-Via": NATIONAL_ID}
    )
    assert (read.status, read.json()["code"]) == (404, "message_unknown"), read.body
    unknown = await national.request(
        "GET", f"/v1/messages/{uuid.uuid4()}", headers={"Gw-Via": NATIONAL_ID}
    )
    assert (unknown.status, unknown.json()["code"]) == (404, "message_unknown")


async def test_a_relayed_message_is_readable_by_its_relay_and_no_other(p: Provinces) -> None:
    """B relayed a message for its citizen app: B reads it (200); the national platform,
    also granted 440000 at A, did not relay it and gets 404 message_unknown."""
    b = p.client("peer", B_CLIENT, p.a_url)
    sent = await b.exchange("crossregion.apply", APPLY_EXAMPLE, headers={"Gw-Via": B_ID})
    assert sent.status == 202, sent.body
    path = f"/v1/messages/{sent.json()['message_id']}"
    own = await b.request("GET", path, headers={"Gw-Via": B_ID})
    assert own.status == 200, own.body
    assert own.json()["client"] == B_CLIENT
    other = await p.client("national", B_CLIENT, p.a_url).request(
        "GET", path, headers={"Gw-Via": NATIONAL_ID}
    )
    assert (other.status, other.json()["code"]) == (404, "message_unknown"), other.body


async def test_the_relay_chain_reaches_the_back_office(p: Provinces) -> None:
    """B's relay reaches A's back office with Gw-Via "440000:gateway, 330000:gateway"
    (appended, oldest first), not overwritten with A's own id."""
    message_id = str(uuid.uuid4())
    reply = await p.client("peer", B_CLIENT, p.a_url).exchange(
        "credit.query", CREDIT_EXAMPLE, message_id=message_id, headers={"Gw-Via": B_ID}
    )
    assert reply.status == 200, reply.body
    headers = await p.office_got(message_id)
    assert headers["Gw-Via"] == f"{B_ID}, {A_ID}"
    assert headers["Gw-Client"] == B_CLIENT


async def test_the_last_hop_of_the_chain_must_be_the_signer(p: Provinces) -> None:
    """A chain ending in the national platform, signed with B's key, is 401 key_unknown:
    the signing hop is the chain's last entry, and its key must have signed."""
    reply = await p.client("peer", B_CLIENT, p.a_url).exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Via": f"{B_ID}, {NATIONAL_ID}"}
    )
    assert (reply.status, reply.json()["code"]) == (401, "key_unknown"), reply.body


async def test_a_relayed_request_without_a_nonce_is_refused(p: Provinces) -> None:
    """B relaying without a `nonce` parameter is 401 signature_invalid."""
    bare = p.client("peer", B_CLIENT, p.a_url, nonces=False)
    reply = await bare.exchange("credit.query", CREDIT_EXAMPLE, headers={"Gw-Via": B_ID})
    assert (reply.status, reply.json()["code"]) == (401, "signature_invalid"), reply.body
    assert "nonce" in reply.json()["detail"]


async def _send_as_if_to(p: Provinces, signed_for: str, sent_to: str) -> Reply:
    """A national-platform request signed for ``signed_for``, sent to ``sent_to`` with
    the Host header of ``signed_for``."""
    national = p.client("national", NATIONAL_ID, signed_for)
    url, headers, data = national.prepare("POST", "/v1/exchange/credit.query", CREDIT_EXAMPLE)
    headers["Host"] = signed_for.removeprefix("http://")
    target = sent_to + url.removeprefix(signed_for)
    async with p.session.post(target, data=data, headers=headers) as resp:
        view = RequestView("POST", target, headers)
        return Reply(resp.status, resp.headers, await resp.read(), view)


async def test_a_request_signed_for_one_gateway_is_refused_by_the_other(p: Provinces) -> None:
    """Signed for B, sent to A (no public_url) with B's Host: 401 signature_invalid, as
    A's @target-uri is its own bound address; signed for A, sent to B (public_url set)
    with A's Host: 401 too. Each request at the gateway it was signed for is 200."""
    replayed = await _send_as_if_to(p, p.b_url, p.a_url)
    assert (replayed.status, replayed.json()["code"]) == (401, "signature_invalid")
    replayed = await _send_as_if_to(p, p.a_url, p.b_url)
    assert (replayed.status, replayed.json()["code"]) == (401, "signature_invalid")
    assert (await _send_as_if_to(p, p.b_url, p.b_url)).status == 200
    assert (await _send_as_if_to(p, p.a_url, p.a_url)).status == 200


async def test_the_simulator_relays_only_for_the_signing_gateways_region(
    p: Provinces,
) -> None:
    """B's key asking the national platform to hand A's portal's application to A is 403
    forbidden at the platform; nothing reaches A's back office."""
    message_id = str(uuid.uuid4())
    forged = APPLY_EXAMPLE | {"handling_region": "330000"}
    reply = await p.client("peer", PORTAL_ID, p.sim_url).request(
        "POST",
        "/api/exchange/crossregion.apply",
        forged,
        message_id=message_id,
        headers={"Gw-Via": B_ID},
    )
    assert reply.status == 403, reply.body
    assert message_id not in p.sim.relays
    await asyncio.sleep(0.3)  # a relay would have been spawned at once
    assert message_id not in p.office.seen


async def test_the_simulator_takes_the_origin_from_the_key_not_the_header(
    p: Provinces,
) -> None:
    """B's citizen app applies in A. With a forged Gw-Via naming A, signed by B's key, the
    platform refuses (403: the chain must end with the signer); sent honestly, it relays
    with the chain B → platform, A's back office sees A appended, and the decision would
    go back to B, the gateway whose key signed."""
    application = APPLY_EXAMPLE | {"source_region": "440000", "handling_region": "330000"}
    b = p.client("peer", B_CLIENT, p.sim_url)
    path = "/api/exchange/crossregion.apply"
    forged = await b.request("POST", path, application, headers={"Gw-Via": A_ID})
    assert forged.status == 403, forged.body
    message_id = str(uuid.uuid4())
    reply = await b.request("POST", path, application, message_id=message_id)
    assert reply.status == 202, reply.body
    assert p.sim.relays[message_id][1] == p.b_url
    headers = await p.office_got(message_id)
    assert headers["Gw-Via"] == f"{B_ID}, {NATIONAL_ID}, {A_ID}"
    assert headers["Gw-Client"] == B_CLIENT


async def _call_back(
    p: Provinces, key: str, member: str, correlation: str, decision: str
) -> tuple[int, dict[str, Any]]:
    url = f"{p.a_url}/v1/callbacks/crossregion.apply"
    body = {"decision": decision, "case_number": "CR2026112600000001",
            "handling_region": "440000", "decided_at": "2026-11-26T10:00:00Z"}  # fmt: skip
    data = json.dumps(body).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "application/json", "Gw-Client": member,
         "Gw-Message-Id": str(uuid.uuid4()), "Gw-Correlation-Id": correlation}
    )  # fmt: skip
    Signer(p.keys.pairs[key]).sign_request("POST", url, headers, data)
    async with p.session.post(url, data=data, headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


async def test_only_the_party_a_message_went_to_may_call_back_and_only_once(
    p: Provinces,
) -> None:
    """On a real `gateway serve`: B's key calling back for a message A delivered to the
    platform's side is 404 message_unknown; the platform's decision is taken; the same
    decision again is 200; a different one after it is 409 callback_conflict, first kept."""
    portal = p.client("portal", PORTAL_ID, p.a_url)
    sent = await portal.exchange(
        "crossregion.apply", APPLY_EXAMPLE, headers={"Gw-Issue": DECIDED_LATER}
    )
    assert sent.status == 202, sent.body
    message_id = sent.json()["message_id"]
    deadline = time.monotonic() + 10
    while (await portal.status(message_id)).json()["state"] != "delivered":
        assert time.monotonic() < deadline, (await portal.status(message_id)).body
        await asyncio.sleep(0.05)
    status, problem = await _call_back(p, "peer", B_ID, message_id, "rejected")
    assert (status, problem["code"]) == (404, "message_unknown"), problem
    status, ack = await _call_back(p, "national", NATIONAL_ID, message_id, "approved")
    assert (status, ack["state"]) == (200, "accepted"), ack
    status, ack = await _call_back(p, "national", NATIONAL_ID, message_id, "approved")
    assert (status, ack["state"]) == (200, "duplicate"), ack
    status, problem = await _call_back(p, "national", NATIONAL_ID, message_id, "rejected")
    assert (status, problem["code"]) == (409, "callback_conflict"), problem
    deadline = time.monotonic() + 10
    while "result" not in (view := (await portal.status(message_id)).json()):
        assert time.monotonic() < deadline, "the decision never reached the message"
        await asyncio.sleep(0.05)
    assert view["result"]["decision"] == "approved"


async def test_another_relay_resending_a_relayed_message_is_not_given_its_answer(
    p: Provinces,
) -> None:
    """B relayed its citizen app's query and got the answer; the national platform, also
    granted 440000 at A, sending the same client, id and body gets 409 message_id_reused,
    not B's stored answer (nor a Gw-Replayed copy of it)."""
    b = p.client("peer", B_CLIENT, p.a_url)
    message_id = str(uuid.uuid4())
    first = await b.exchange(
        "credit.query", CREDIT_EXAMPLE, message_id=message_id, headers={"Gw-Via": B_ID}
    )
    assert first.status == 200, first.body
    again = await b.exchange(
        "credit.query", CREDIT_EXAMPLE, message_id=message_id, headers={"Gw-Via": B_ID}
    )
    assert (again.status, again.headers.get("Gw-Replayed")) == (200, "true"), again.body
    other = await p.client("national", B_CLIENT, p.a_url).exchange(
        "credit.query", CREDIT_EXAMPLE, message_id=message_id, headers={"Gw-Via": NATIONAL_ID}
    )
    assert (other.status, other.json()["code"]) == (409, "message_id_reused"), other.body
    assert "Gw-Replayed" not in other.headers


async def test_an_answer_not_bound_to_its_request_is_refused(p: Provinces) -> None:
    """On a real `gateway serve`: the registry's signed answer to the first query, replayed
    as the answer to the next, is 502 upstream_unbound both times (it covers neither our
    signature nor our message id)."""
    portal = p.client("portal", PORTAL_ID, p.a_url)
    for _ in range(2):
        reply = await portal.exchange(
            "credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": SIGNED_REGISTRY}
        )
        assert (reply.status, reply.json()["code"]) == (502, "upstream_unbound"), reply.body


async def test_a_redirecting_callback_url_is_never_followed(p: Provinces) -> None:
    """On a real `gateway serve`: the member's callback URL answers 307 to another loopback
    service; the signed callback is not re-posted there and is not counted as delivered."""
    tax = p.client("tax", TAX_ID, p.a_url)
    sent = await tax.exchange(
        "crossregion.apply", APPLY_EXAMPLE, headers={"Gw-Issue": DECIDED_LATER}
    )
    assert sent.status == 202, sent.body
    message_id = sent.json()["message_id"]
    deadline = time.monotonic() + 10
    while (await tax.status(message_id)).json()["state"] != "delivered":
        assert time.monotonic() < deadline, (await tax.status(message_id)).body
        await asyncio.sleep(0.05)
    moved = p.office.moved
    status, ack = await _call_back(p, "national", NATIONAL_ID, message_id, "approved")
    assert (status, ack["state"]) == (200, "accepted"), ack
    deadline = time.monotonic() + 10
    while p.office.moved < moved + 2:  # tried, and tried again: a failed attempt
        assert time.monotonic() < deadline, "the callback was never attempted twice"
        await asyncio.sleep(0.05)
    assert p.office.stolen == 0
    assert (await tax.status(message_id)).json()["state"] != "callback_delivered"
