"""``peer_gateway``: federation between two real gateways on loopback."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config.model import parse_config
from gateway.exchange.app import STORE, create_app
from gateway.store import Store
from tests.conftest import (
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    PEER_ID,
    PORTAL_ID,
    HarnessFactory,
    Keys,
    unused_port,
)

SCHEMAS = Path(__file__).parent.parent / "schemas" / "services" / "credit.query"
RECORD = {
    "uscc": "91350100M000100Y43",
    "name": "广东模拟企业",
    "status": "active",
    "updated_at": "2026-11-26T00:00:00Z",
}

StartB = Callable[[list[str]], Awaitable[tuple[str, Store]]]


@pytest.fixture
async def start_b(keys: Keys, tmp_path: Path) -> AsyncIterator[StartB]:
    """Province B's gateway (440000), which knows A's gateway as a peer for some regions."""
    servers: list[TestServer] = []

    async def start(regions: list[str]) -> tuple[str, Store]:
        doc = {
            "gateway": {"member_id": PEER_ID, "key": str(keys.directory / "peer.pem")},
            "store": {"path": str(tmp_path / "b.db")},
            "members": [
                {
                    "id": GATEWAY_ID,
                    "kind": "gateway",
                    "keys": [keys.jwk_file("gateway")],
                    "regions": regions,
                    "services": ["credit.query"],
                }
            ],
            "services": [
                {
                    "code": "credit.query",
                    "request_schema": str(SCHEMAS / "request.json"),
                    "response_schema": str(SCHEMAS / "response.json"),
                }
            ],
            "adapters": [
                {
                    "name": "registry",
                    "type": "mock",
                    "config": {"responses": {"credit.query": {"body": RECORD}}},
                }
            ],
            "routes": [{"service": "credit.query", "adapter": "registry"}],
        }
        app = create_app(parse_config(copy.deepcopy(doc), base=tmp_path))
        server = TestServer(app, port=unused_port())
        servers.append(server)  # closed even if the start fails half-way
        await server.start_server()
        return str(server.make_url("")).rstrip("/"), app[STORE]

    yield start
    for server in servers:
        await server.close()


def _route_to(b_url: str, keys: Keys) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["adapters"].append(
            {
                "name": "guangdong",
                "type": "peer_gateway",
                "config": {"url": b_url, "peer_id": PEER_ID, "peer_keys": [keys.jwk_file("peer")]},
            }
        )
        doc["routes"].append({"service": "credit.query", "adapter": "guangdong", "target": PEER_ID})

    return edit


async def test_exchange_through_a_peer_gateway(
    make_harness: HarnessFactory, start_b: StartB, keys: Keys
) -> None:
    """Portal → A → B (vouched, 330000 is A's region) → B's answer, bound to A's request."""
    b_url, b_store = await start_b(["330000"])
    a = await make_harness(_route_to(b_url, keys))
    reply = await a.client("portal").exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": PEER_ID}
    )
    assert reply.status == 200, reply.body
    assert reply.json()["name"] == "广东模拟企业"
    at_b = await b_store.get_message(PORTAL_ID, reply.headers["Gw-Message-Id"])
    assert at_b is not None
    assert at_b.state == "answered"
    assert {k.lower(): v for k, v in at_b.request_headers.items()}["gw-via"] == GATEWAY_ID
    at_a = await a.app[STORE].get_message(PORTAL_ID, reply.headers["Gw-Message-Id"])
    assert at_a is not None
    assert at_a.adapter == "guangdong"
    assert a.national.received == []


async def test_peer_vouching_outside_its_regions_is_refused(
    make_harness: HarnessFactory, start_b: StartB, keys: Keys
) -> None:
    """B registered A only for 110000: A vouching for a 330000 member gets 403 at B."""
    b_url, b_store = await start_b(["110000"])
    a = await make_harness(_route_to(b_url, keys))
    reply = await a.client("portal").exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": PEER_ID}
    )
    assert reply.status == 502
    assert reply.json()["code"] == "upstream_error"
    assert "403" in reply.json()["detail"]
    rejected = await b_store.rejections()
    assert [(r.status, r.code) for r in rejected] == [(403, "forbidden")]
    assert await b_store.count_messages() == 0


async def test_unbound_answer_from_a_peer_is_refused(
    make_harness: HarnessFactory, keys: Keys
) -> None:
    """An answer signed by the peer's key but not bound to our request is not accepted."""
    import json

    from multidict import CIMultiDict

    from gateway.signing import RequestView, Signer

    async def impostor(request: web.Request) -> web.Response:
        await request.read()
        body = json.dumps(RECORD).encode()
        headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
        view = RequestView(request.method, str(request.url), request.headers)
        Signer(keys.pairs["peer"]).sign_response(200, headers, body, view, None)
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/exchange/{service}", impostor)
    server = TestServer(app)
    await server.start_server()
    try:
        a = await make_harness(_route_to(str(server.make_url("")).rstrip("/"), keys))
        reply = await a.client("portal").exchange(
            "credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": PEER_ID}
        )
        assert reply.status == 502
        assert reply.json()["code"] == "upstream_unbound"
        assert "not bound" in reply.json()["detail"]
    finally:
        await server.close()
