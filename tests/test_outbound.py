"""Outbound requests go only where configured; answers are bound to their request.

The attacks run against real servers on loopback: a member endpoint that redirects, an
upstream that answers with a signature bound to nothing (replaying another request's
answer), a peer URL with a ``?`` in it, names that resolve to loopback. The URL policy
(gateway/outbound.py) has its unit tests at the end.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from adapters.base import AdapterContext, Exchange
from adapters.peer import PeerGatewayAdapter
from gateway.app import STORE
from gateway.config import AdapterConfig
from gateway.errors import ConfigError, OutboundRefused, UpstreamError
from gateway.outbound import join
from gateway.registry import build_adapter
from gateway.signing import RequestView, Signer
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    PEER_ID,
    PORTAL_ID,
    Harness,
    HarnessFactory,
    Keys,
)

RECORD = {
    "uscc": "91350100M000100Y43",
    "name": "模拟企业",
    "status": "active",
    "updated_at": "2026-11-26T00:00:00Z",
}


@dataclass
class Spy:
    """A real loopback server that answers as told and records what reached it."""

    server: TestServer
    hits: list[tuple[str, str, bytes]] = field(default_factory=list)

    def url(self, path: str = "") -> str:
        return str(self.server.make_url(path))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def spies() -> AsyncIterator[Callable[[Handler | None], Awaitable[Spy]]]:
    started: list[TestServer] = []

    async def start(handler: Handler | None = None) -> Spy:
        app = web.Application()
        spy: Spy

        async def record(request: web.Request) -> web.StreamResponse:
            spy.hits.append((request.method, request.path_qs, await request.read()))
            if handler is not None:
                return await handler(request)
            return web.json_response({"ok": True})

        app.router.add_route("*", "/{tail:.*}", record)
        server = TestServer(app)
        started.append(server)
        await server.start_server()
        spy = Spy(server)
        return spy

    yield start
    for server in started:
        await server.close()


async def _apply(h: Harness) -> str:
    reply = await h.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    assert reply.status == 202, reply.body
    message_id: str = reply.json()["message_id"]
    return message_id


async def _dead_callback_error(h: Harness) -> str:
    dead = [d for d in await h.app[STORE].dead_letters() if d.kind == "callback"]
    assert len(dead) == 1
    return dead[0].error or ""


# Callbacks never follow redirects ---------------------------------------------------


@pytest.mark.integration
async def test_a_307_from_a_member_does_not_repost_the_signed_callback(
    make_harness: HarnessFactory, spies: Callable[[Handler | None], Awaitable[Spy]]
) -> None:
    """A member's 307 to a loopback service is a failed attempt: nothing is re-posted there."""
    elsewhere = await spies(None)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(elsewhere.url("/steal"))

    member = await spies(redirect)

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 2
        doc["members"][0]["callback_url"] = member.url("/callbacks")

    h = await make_harness(edit)
    await _apply(h)

    async def settled() -> bool:
        dead = any(d.kind == "callback" for d in await h.app[STORE].dead_letters())
        return dead or bool(elsewhere.hits)

    await h.wait_for(settled)
    assert elsewhere.hits == []
    assert [m for m, _, _ in member.hits] == ["POST", "POST"]  # two attempts, both refused
    error = await _dead_callback_error(h)
    assert "307" in error
    assert elsewhere.url("/steal") in error  # logged with its Location


@pytest.mark.integration
async def test_a_302_to_the_admin_listener_is_not_counted_as_delivered(
    make_harness: HarnessFactory, spies: Callable[[Handler | None], Awaitable[Spy]]
) -> None:
    """A 302 to the admin console (which answers 200) leaves the callback undelivered."""
    target: list[str] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(target[0])

    member = await spies(redirect)

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 2
        doc["members"][0]["callback_url"] = member.url("/callbacks")

    h = await make_harness(edit)
    target.append(str(h.admin.make_url("/")))
    async with h.admin.session.get(h.admin.make_url("/")) as resp:
        assert resp.status == 200  # what a followed redirect would have taken as success
    message_id = await _apply(h)

    async def settled() -> bool:
        dead = any(d.kind == "callback" for d in await h.app[STORE].dead_letters())
        return dead or await h.state_of(message_id) == "callback_delivered"

    await h.wait_for(settled)
    assert await h.state_of(message_id) != "callback_delivered"
    assert "302" in await _dead_callback_error(h)


@pytest.mark.integration
async def test_a_redirecting_upstream_is_an_upstream_error_with_its_location(
    make_harness: HarnessFactory, spies: Callable[[Handler | None], Awaitable[Spy]]
) -> None:
    """An adapter's upstream answering 307 is a 502 naming the Location; nothing follows it."""
    elsewhere = await spies(None)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(elsewhere.url("/steal"))

    upstream = await spies(redirect)

    def edit(doc: dict[str, Any]) -> None:
        doc["adapters"][0]["config"]["url"] = upstream.url("/api/exchange/{service}")

    h = await make_harness(edit)
    reply = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 502
    assert reply.json()["code"] == "upstream_error"
    assert "307" in reply.json()["detail"]
    assert elsewhere.hits == []


# Answers are bound to their request ------------------------------------------------


def _replaying(keys: Keys, *, envelope: bool, bind_message_id: bool = False) -> Handler:
    """A platform with the real key that signs only @status, content-digest, content-type,
    and answers every request with the answer it gave the first one."""
    captured: list[tuple[bytes, CIMultiDict[str]]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not captured:
            data: Any = {"code": "0", "message": "ok", "data": RECORD} if envelope else RECORD
            body = json.dumps(data).encode()
            headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
            if bind_message_id:
                headers["Gw-Message-Id"] = request.headers["Gw-Message-Id"]
            view = RequestView(request.method, str(request.url), request.headers)
            Signer(keys.pairs["national"]).sign_response(200, headers, body, view, None)
            captured.append((body, headers))
        body, headers = captured[0]
        return web.Response(body=body, headers=headers)

    return answer


def _national_adapter(url: str, keys: Keys) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["adapters"] = [
            {
                "name": "national",
                "type": "national_platform",
                "config": {"base_url": url, "platform_keys": [keys.jwk_file("national")]},
            }
        ]

    return edit


@pytest.mark.integration
@pytest.mark.parametrize("adapter_type", ["national_platform", "http"])
async def test_an_answer_signed_for_another_request_is_refused(
    make_harness: HarnessFactory,
    spies: Callable[[Handler | None], Awaitable[Spy]],
    keys: Keys,
    adapter_type: str,
) -> None:
    """The platform's answer to request X, signed over @status and the body only, is not
    accepted as the answer to request Y: 502 upstream_unbound (both bindable adapters)."""
    national = adapter_type == "national_platform"
    platform = await spies(_replaying(keys, envelope=national))

    def edit(doc: dict[str, Any]) -> None:
        if national:
            _national_adapter(platform.url("").rstrip("/"), keys)(doc)
        else:
            doc["adapters"][0]["config"]["url"] = platform.url("/api/exchange/{service}")

    h = await make_harness(edit)
    replies = [await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE) for _ in range(2)]
    for reply in replies:
        assert reply.status == 502, reply.body
        assert reply.json()["code"] == "upstream_unbound"
    assert len(platform.hits) == 2


@pytest.mark.integration
async def test_an_answer_bound_by_its_message_id_is_accepted_once(
    make_harness: HarnessFactory,
    spies: Callable[[Handler | None], Awaitable[Spy]],
    keys: Keys,
) -> None:
    """An answer covering gw-message-id binds to that message: accepted for it, refused
    when replayed as the answer to another message."""
    platform = await spies(_replaying(keys, envelope=True, bind_message_id=True))
    h = await make_harness(_national_adapter(platform.url("").rstrip("/"), keys))
    first = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert first.status == 200, first.body
    assert first.json()["uscc"] == RECORD["uscc"]
    second = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert second.status == 502
    assert second.json()["code"] == "upstream_unbound"


async def test_the_national_simulator_binds_its_answers(harness: Harness) -> None:
    """The bundled simulator's answers pass the binding rule (the demo keeps working)."""
    reply = await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200, reply.body
    assert harness.national.received == [reply.headers["Gw-Message-Id"]]


# URLs are joined, not concatenated ---------------------------------------------------


def _peer_config(url: str, keys: Keys) -> AdapterConfig:
    return AdapterConfig(
        name="guangdong",
        type="peer_gateway",
        config={"url": url, "peer_id": PEER_ID, "peer_keys": [keys.jwk_file("peer")]},
    )


def _exchange() -> Exchange:
    return Exchange(
        service="credit.query",
        client=PORTAL_ID,
        message_id="6f1c2c1e-4b8a-4f7e-9a51-0c6d2b1e7a10",
        body=json.dumps(CREDIT_EXAMPLE).encode(),
    )


@pytest.mark.parametrize("suffix", ["/gw?x=", "/gw#", "/gw?"])
async def test_a_query_or_fragment_in_a_peer_url_is_refused(
    keys: Keys, spies: Callable[[Handler | None], Awaitable[Spy]], suffix: str
) -> None:
    """A peer URL with ``?`` or ``#`` is refused as config, so no request path can move
    into its query (string concatenation posted to ``/gw`` instead)."""
    peer = await spies(None)
    async with aiohttp.ClientSession() as session:
        context = AdapterContext(
            member_id=GATEWAY_ID, signer=Signer(keys.pairs["gateway"]), session=session
        )
        cfg = _peer_config(peer.url("").rstrip("/") + suffix, keys)
        with pytest.raises(ConfigError, match="url"):
            build_adapter(cfg, context)
    with pytest.raises(ValueError, match="query or a fragment"):
        join(peer.url("").rstrip("/") + suffix, "v1", "exchange")
    assert peer.hits == []


async def test_a_peer_url_with_a_path_keeps_it(
    keys: Keys, spies: Callable[[Handler | None], Awaitable[Spy]]
) -> None:
    """A peer base URL's path stays in front of the joined ``/v1/exchange/{service}``."""
    peer = await spies(None)
    async with aiohttp.ClientSession() as session:
        context = AdapterContext(
            member_id=GATEWAY_ID, signer=Signer(keys.pairs["gateway"]), session=session
        )
        adapter = build_adapter(_peer_config(peer.url("/province/b/"), keys), context)
        assert isinstance(adapter, PeerGatewayAdapter)
        with pytest.raises(UpstreamError):  # the spy does not sign: refused, but it was hit
            await adapter.send(_exchange())
    assert [p for _, p, _ in peer.hits] == ["/province/b/v1/exchange/credit.query"]


# Placeholders used below ------------------------------------------------------------
_ = (ipaddress, logging, socket, AbstractResolver, ResolveResult, OutboundRefused)
