"""Discovery (gateway/exchange/meta.py): signed reads, cut from the caller's ACL, leaking nothing.

Each test runs a real gateway, national platform and portal on loopback (the harness);
requests are signed by ``ExchangeClient`` as a member's system signs them, and every
answer's signature is checked with the gateway's public key.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import TestServer
from openapi_spec_validator import validate

from gateway.exchange.client import Reply, verify_reply
from gateway.exchange.openapi import service_document
from gateway.federation.directory import Publisher
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import (
    CREDIT_EXAMPLE,
    NATIONAL_ID,
    PEER_ID,
    PORTAL_ID,
    SCHEMAS,
    TAX_ID,
    Harness,
    HarnessFactory,
    Keys,
    unused_port,
)

pytestmark = pytest.mark.integration

SECRET_SERVICE = "supervision.report"  # only the tax system may call it


def _with_secret_service(doc: dict[str, Any]) -> None:
    """The tax system alone may call supervision.report, served by the national platform."""
    doc["services"].append(
        {
            "code": SECRET_SERVICE,
            "mode": "async",
            "request_schema": str(SCHEMAS / SECRET_SERVICE / "request.json"),
            "response_schema": str(SCHEMAS / SECRET_SERVICE / "response.json"),
            "callback_schema": str(SCHEMAS / SECRET_SERVICE / "callback.json"),
        }
    )
    doc["routes"].append({"service": SECRET_SERVICE, "adapter": "national"})
    tax = next(m for m in doc["members"] if m["id"] == TAX_ID)
    tax["services"] = [SECRET_SERVICE]


@pytest.fixture
async def h(make_harness: HarnessFactory) -> Harness:
    return await make_harness(_with_secret_service)


async def _get(h: Harness, path: str, name: str = "portal") -> Reply:
    reply = await h.client(name).request("GET", path, message_id=str(uuid.uuid4()))
    verify_reply(reply, h.keys.verification("gateway"))  # every answer is signed and bound
    return reply


async def test_discovery_lists_only_the_services_the_caller_may_call(h: Harness) -> None:
    """The portal sees its two services with mode, limits and where they are served."""
    reply = await _get(h, "/v1/meta/services")
    assert reply.status == 200, reply.body
    services = {s["code"]: s for s in reply.json()["services"]}
    assert set(services) == {"credit.query", "crossregion.apply"}
    credit = services["credit.query"]
    assert credit["mode"] == "sync"
    assert credit["max_body_bytes"] == 4096  # the service's limit under the gateway's
    assert credit["served_by"] == "national"  # its adapter delivers to the platform
    assert credit["available"] is True
    tax = await _get(h, "/v1/meta/services", "tax")
    assert [s["code"] for s in tax.json()["services"]] == [SECRET_SERVICE]


async def test_a_service_only_another_member_may_call_answers_as_an_unknown_code(
    h: Harness,
) -> None:
    """The portal cannot tell supervision.report (the tax system's) from a code that does not
    exist: same status, code, title and detail shape."""
    hidden = await _get(h, f"/v1/meta/services/{SECRET_SERVICE}")
    unknown = await _get(h, "/v1/meta/services/no.such.service")
    assert hidden.status == unknown.status == 404
    a, b = hidden.json(), unknown.json()
    assert a["code"] == b["code"] == "service_unknown"
    assert a["detail"].replace(SECRET_SERVICE, "X") == b["detail"].replace("no.such.service", "X")
    assert {k for k in a if k != "message_id"} == {k for k in b if k != "message_id"}
    assert a["title"] == b["title"]
    assert a["type"] == b["type"]
    listed = await _get(h, "/v1/meta/members")
    assert SECRET_SERVICE not in listed.body.decode()


async def test_unsigned_and_badly_signed_discovery_requests_are_refused(h: Harness) -> None:
    """No signature is 401 signature_missing; another member's key is 401 key_unknown; a
    read without a Gw-Message-Id is 400 missing_header (the exchange's own stages)."""
    async with h.gateway.get("/v1/meta/services", headers={"Gw-Client": PORTAL_ID}) as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == "signature_missing"
    stolen = h.client("tax", member_id=PORTAL_ID)
    reply = await stolen.request("GET", "/v1/meta/members", message_id=str(uuid.uuid4()))
    assert reply.status == 401
    assert reply.json()["code"] == "key_unknown"
    bare = await h.client("portal").request("GET", "/v1/meta/services")  # no Gw-Message-Id
    assert bare.status == 400
    assert bare.json()["code"] == "missing_header"


async def test_a_disabled_member_gets_no_discovery(h: Harness) -> None:
    """A disabled member is 403 client_disabled, as for an exchange."""
    reply = await h.client("disabled").request(
        "GET", "/v1/meta/services", message_id=str(uuid.uuid4())
    )
    assert reply.status == 403
    assert reply.json()["code"] == "client_disabled"


async def test_the_service_document_is_valid_openapi_with_the_service_s_schemas(
    h: Harness,
) -> None:
    """GET /v1/meta/services/{code}: the schemas as configured, and an OpenAPI 3.1 document
    that openapi-spec-validator accepts, whose request schema takes the example."""
    reply = await _get(h, "/v1/meta/services/crossregion.apply")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["code"] == "crossregion.apply"
    assert body["mode"] == "async"
    configured = json.loads((SCHEMAS / "crossregion.apply" / "callback.json").read_text())
    assert body["schemas"]["callback"] == configured
    document = body["openapi"]
    validate(document)  # raises on an invalid OpenAPI 3.1 document
    assert document["openapi"] == "3.1.0"
    post = document["paths"]["/v1/exchange/crossregion.apply"]["post"]
    assert "202" in post["responses"]
    assert "200" not in post["responses"]
    assert "crossregion.apply.callback" in document["webhooks"]
    request_schema = document["components"]["schemas"]["Request"]
    example = body["schemas"]["request"]["examples"][0]
    jsonschema.Draft202012Validator(request_schema).validate(example)
    credit = await _get(h, "/v1/meta/services/credit.query")
    validate(credit.json()["openapi"])
    assert "callback" in credit.json()["schemas"]  # this harness gives it one
    jsonschema.Draft202012Validator(credit.json()["schemas"]["request"]).validate(CREDIT_EXAMPLE)


def test_local_references_of_a_service_schema_resolve_inside_the_openapi_document() -> None:
    """A schema with its own $id and #/$defs references still validates once embedded."""
    from gateway.config.model import ServiceConfig

    schema = {
        "$id": "https://example.invalid/s.json",
        "type": "object",
        "required": ["n"],
        "properties": {"n": {"$ref": "#/$defs/n"}},
        "$defs": {"n": {"type": "integer"}},
    }
    doc = service_document(
        ServiceConfig(code="x.y", request_schema=schema, response_schema=True),
        servers=("https://gw.example",),
    )
    validate(doc)
    ref = doc["components"]["schemas"]["Request"]["properties"]["n"]["$ref"]
    assert ref == "#/components/schemas/Request/$defs/n"
    assert "$id" not in doc["components"]["schemas"]["Request"]
    assert doc["servers"] == [{"url": "https://gw.example"}]


async def test_members_lists_the_caller_and_who_offers_its_services_without_secrets(
    h: Harness,
) -> None:
    """The portal sees itself (with its own callback URL) and the national platform (with
    the portal's services only); not the tax system, the disabled member or the peer
    gateway, and no key, adapter name or upstream URL of anyone."""
    reply = await _get(h, "/v1/meta/members")
    assert reply.status == 200, reply.body
    members = {m["id"]: m for m in reply.json()["members"]}
    assert set(members) == {PORTAL_ID, NATIONAL_ID}
    assert members[NATIONAL_ID]["services"] == ["credit.query", "crossregion.apply"]
    assert members[NATIONAL_ID]["kind"] == "platform"
    me = members[PORTAL_ID]
    assert me["self"] is True
    assert me["callback_url"] == f"{h.portal_url}/callbacks"
    assert me["may_call"] == ["credit.query", "crossregion.apply"]
    text = reply.body.decode()
    national_url = h.config.adapters[0].config["url"].split("/api")[0]
    assert national_url not in text  # the upstream's address
    assert '"national"' not in text  # the adapter's name
    for name in ("national", "tax", "peer", "gateway"):
        assert h.keys.pairs[name].jwk["x"] not in text  # no one's key material
    assert "callback_url" not in members[NATIONAL_ID]
    tax = await _get(h, "/v1/meta/members", "tax")
    assert {m["id"] for m in tax.json()["members"]} == {TAX_ID, NATIONAL_ID}
    assert PEER_ID not in tax.body.decode()


async def test_the_ingress_openapi_lists_the_discovery_endpoints(h: Harness) -> None:
    """/openapi.json names the three discovery paths."""
    async with h.gateway.get("/openapi.json") as resp:
        paths = (await resp.json())["paths"]
    assert {"/v1/meta/services", "/v1/meta/services/{code}", "/v1/meta/members"} <= set(paths)


async def test_directory_gateways_are_listed_and_entries_refused_by_screening_are_not(
    make_harness: HarnessFactory, keys: Keys
) -> None:
    """A gateway learnt from the federation directory appears with the service it offers
    the portal (source: directory, region in target_regions); entries the follower's
    screening refuses (a gateway outside its region, a foreign vouch) appear nowhere."""
    port = unused_port()
    national_url = f"http://127.0.0.1:{port}"
    publisher = Publisher(
        keypair=keys.pairs["stranger"],  # the directory key the follower pins
        national={"member_id": NATIONAL_ID, "url": national_url,
                  "keys": [{"jwk": keys.pairs["national"].jwk}]},
    )  # fmt: skip
    offer = [{"code": "credit.query"}]
    publisher.register(
        "440000",
        {"member_id": PEER_ID, "url": "http://127.0.0.1:1/b-internal", "services": offer,
         "keys": [{"jwk": keys.pairs["peer"].jwk}]},
    )  # fmt: skip
    publisher.register(
        "450000",
        {"member_id": "440000:rogue-gateway", "url": "http://127.0.0.1:2", "services": offer,
         "keys": [{"jwk": keys.pairs["tax"].jwk}]},
    )  # fmt: skip
    publisher.register(
        "460000",
        {"member_id": "460000:gateway", "url": "http://127.0.0.1:3", "services": offer,
         "vouches_for": ["330000"], "keys": [{"jwk": keys.pairs["disabled"].jwk}]},
    )  # fmt: skip
    sim = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted={},
        callback_base="http://127.0.0.1:1",
        publisher=publisher,
    )
    server = TestServer(create_national_app(sim), port=port)
    await server.start_server()
    try:

        def follow(doc: dict[str, Any]) -> None:
            doc["members"] = [m for m in doc["members"] if m["id"] != PEER_ID]
            doc["directory"] = {
                "url": f"{national_url}/v1/directory",
                "keys": [keys.jwk_file("stranger")],
                "refresh_s": 0.3,
            }
            doc["outbound"] = {"allow_http": True, "allow_networks": ["127.0.0.0/8"]}

        h = await make_harness(follow)
        reply = await _get(h, "/v1/meta/members")
        members = {m["id"]: m for m in reply.json()["members"]}
        assert members[PEER_ID]["services"] == ["credit.query"]
        assert members[PEER_ID]["source"] == "directory"
        assert members[PEER_ID]["kind"] == "gateway"
        text = reply.body.decode()
        assert "rogue" not in text
        assert "460000" not in text
        assert "b-internal" not in text  # the peer's learnt URL stays inside
        assert keys.pairs["peer"].jwk["x"] not in text
        services = await _get(h, "/v1/meta/services")
        credit = next(s for s in services.json()["services"] if s["code"] == "credit.query")
        assert credit["target_regions"] == ["440000"]
        assert "460000" not in services.body.decode()
    finally:
        await server.close()
