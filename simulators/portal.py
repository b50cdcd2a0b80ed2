"""A provincial system (the one-stop portal), simulated: it sends exchanges and takes callbacks.

``POST /callbacks`` verifies the gateway's signature and dedupes on ``Gw-Message-Id``;
``GET /callbacks`` lists what arrived; ``POST /_control`` with ``{"fail": n}`` makes the
next n callbacks fail with 503 (to exercise retries); ``GET /send/{service}`` sends the
service's first schema example through the gateway and shows the signed answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.crypto.keys import KeyPair, VerificationKey
from gateway.errors import GatewayError
from gateway.exchange.client import ExchangeClient, verify_reply
from gateway.signing import Signer, Verifier
from simulators.common import note, problem, verify_request

__all__ = ["Portal", "create_portal_app"]


@dataclass(slots=True, kw_only=True)
class Portal:
    member_id: str
    keypair: KeyPair
    gateway_keys: Mapping[str, VerificationKey]
    gateway_url: str
    examples: Mapping[str, Any] = field(default_factory=dict)
    fail_next: int = 0
    deliveries: list[str] = field(default_factory=list)  # every Gw-Message-Id that arrived
    seen: dict[str, int] = field(default_factory=dict)  # correlation id → deliveries
    traceparents: dict[str, str] = field(default_factory=dict)  # correlation id → last one
    trail: list[dict[str, Any]] = field(default_factory=list)
    processed: dict[str, Any] = field(default_factory=dict)  # correlation id → result, once


PORTAL = web.AppKey("portal", Portal)
SESSION = web.AppKey("portal_session", aiohttp.ClientSession)


async def _callback(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    if portal.fail_next > 0:
        portal.fail_next -= 1
        return problem(503, "overloaded", "simulated outage")
    try:
        body, kid = await verify_request(request, portal.gateway_keys, Verifier())
    except (GatewayError, web.HTTPUnauthorized, KeyError) as exc:
        return problem(401, "signature_invalid", str(exc))
    message_id = request.headers["Gw-Message-Id"]
    correlation = request.headers.get("Gw-Correlation-Id", "")
    portal.deliveries.append(message_id)
    note(portal.trail, f"{request.headers.get('Gw-Client')} → {portal.member_id} (callback)",
         f"gateway signature, kid {kid}")  # fmt: skip
    portal.seen[correlation] = portal.seen.get(correlation, 0) + 1
    portal.traceparents[correlation] = request.headers.get("traceparent", "")
    duplicate = correlation in portal.processed
    if not duplicate:
        portal.processed[correlation] = json.loads(body)
    return web.json_response({"received": message_id, "duplicate": duplicate})


async def _list(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    return web.json_response(
        {"deliveries": portal.deliveries, "processed": sorted(portal.processed)}
    )


async def _control(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    data = await request.json()
    portal.fail_next = int(data.get("fail", 0))
    return web.json_response({"fail_next": portal.fail_next})


async def _send(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    service = request.match_info["service"]
    if service not in portal.examples:
        return problem(404, "service_unknown", f"no example for {service}")
    client = ExchangeClient(
        member_id=portal.member_id,
        signer=Signer(portal.keypair),
        base_url=portal.gateway_url,
        session=request.app[SESSION],
    )
    reply = await client.exchange(service, portal.examples[service])
    try:
        kid = verify_reply(reply, portal.gateway_keys)
        verified = f"gateway signature verified (kid {kid})"
    except (GatewayError, KeyError) as exc:
        verified = f"gateway signature NOT verified: {exc}"
    return web.json_response(
        {"status": reply.status, "signature": verified, "answer": json.loads(reply.body)}
    )


def create_portal_app(portal: Portal) -> web.Application:
    app = web.Application()
    app[PORTAL] = portal

    async def session_ctx(app: web.Application) -> Any:
        app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/callbacks", _callback)
    app.router.add_get("/callbacks", _list)
    app.router.add_post("/_control", _control)
    app.router.add_get("/send/{service}", _send)
    return app
