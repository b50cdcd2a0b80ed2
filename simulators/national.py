"""The national government service platform, simulated as a small real aiohttp app.

It verifies the gateway's signature, answers ``credit.query`` with a signed credit
record, acknowledges asynchronous jobs (``crossregion.apply``, ``supervision.report``)
and calls back later, signed with its own key. ``POST /_control`` makes it fail on
purpose for tests: ``{"mode": "ok" | "refuse" | "error" | "hang" | "slow", "delay_s": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import GatewayError
from gateway.keys import KeyPair, VerificationKey
from gateway.signing import Signer, Verifier
from simulators.common import problem, signed_json, verify_request

__all__ = ["NationalPlatform", "create_national_app"]

log = logging.getLogger("simulators.national")
ASYNC_SERVICES = frozenset({"crossregion.apply", "supervision.report"})


@dataclass(slots=True, kw_only=True)
class NationalPlatform:
    member_id: str
    keypair: KeyPair
    trusted: Mapping[str, VerificationKey]  # gateway keys by kid
    callback_base: str  # the gateway's ingress, e.g. http://127.0.0.1:8080
    callback_delay_s: float = 0.5
    mode: str = "ok"
    delay_s: float = 0.0
    received: list[str] = field(default_factory=list)
    callbacks_sent: list[str] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)


NATIONAL = web.AppKey("national", NationalPlatform)
SESSION = web.AppKey("national_session", aiohttp.ClientSession)
TASKS: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("national_tasks")


def _credit_record(uscc: str) -> dict[str, Any]:
    seed = int(hashlib.sha256(uscc.encode()).hexdigest()[:8], 16)
    rating = "ABCD"[seed % 4]
    return {
        "uscc": uscc,
        "name": f"模拟企业{seed % 1000:03d}有限公司",
        "status": "active",
        "credit_rating": rating,
        "dishonest_entity": rating == "D",
        "administrative_penalties": [],
        "source": "national-credit-information-sharing-platform",
        "updated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _decision(request_doc: Mapping[str, Any], message_id: str) -> dict[str, Any]:
    return {
        "decision": "approved",
        "case_number": f"CR{message_id.replace('-', '')[:20].upper()}",
        "handling_region": request_doc.get("handling_region", "440000"),
        "decided_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reason": "材料齐全，符合法定形式，予以办理",
    }


async def _exchange(request: web.Request) -> web.StreamResponse:
    sim = request.app[NATIONAL]
    if sim.mode == "refuse":
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=503)
    if sim.mode == "hang":
        await asyncio.sleep(3600)
    if sim.mode == "slow":
        await asyncio.sleep(sim.delay_s)
    try:
        body, _ = await verify_request(request, sim.trusted, Verifier())
    except (GatewayError, web.HTTPUnauthorized, KeyError) as exc:
        return problem(401, "signature_invalid", str(exc))
    if sim.mode == "error":
        return problem(500, "internal", "simulated failure")
    service = request.match_info["service"]
    message_id = request.headers["Gw-Message-Id"]
    sim.received.append(message_id)
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return problem(400, "malformed_request", "not JSON")
    if service == "credit.query":
        return signed_json(request, Signer(sim.keypair), 200, _credit_record(str(doc.get("uscc"))))
    if service in ASYNC_SERVICES:
        task = asyncio.create_task(_call_back(request.app, service, message_id, doc))
        request.app[TASKS].add(task)
        task.add_done_callback(request.app[TASKS].discard)
        ack = {"accepted": True, "ticket": f"NP-{message_id}"}
        return signed_json(request, Signer(sim.keypair), 202, ack)
    return problem(404, "service_unknown", f"the national platform has no {service}")


async def _call_back(app: web.Application, service: str, message_id: str, doc: Any) -> None:
    sim = app[NATIONAL]
    await asyncio.sleep(sim.callback_delay_s)
    body = json.dumps(_decision(doc, message_id), ensure_ascii=False).encode()
    callback_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"decision:{message_id}"))
    url = f"{sim.callback_base.rstrip('/')}/v1/callbacks/{service}"
    for attempt in range(30):
        headers: CIMultiDict[str] = CIMultiDict(
            {
                "Content-Type": "application/json",
                "Gw-Client": sim.member_id,
                "Gw-Message-Id": callback_id,
                "Gw-Correlation-Id": message_id,
            }
        )
        Signer(sim.keypair).sign_request("POST", url, headers, body)
        try:
            async with app[SESSION].post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status < 500:
                    sim.callbacks_sent.append(message_id)
                    if resp.status >= 300:
                        log.warning("callback for %s refused: %s", message_id, resp.status)
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(min(5.0, 0.2 * 2**attempt) * sim.rng.random())
    log.error("gave up calling back for %s", message_id)


async def _control(request: web.Request) -> web.Response:
    sim = request.app[NATIONAL]
    data = await request.json()
    sim.mode = str(data.get("mode", "ok"))
    sim.delay_s = float(data.get("delay_s", 0))
    if "callback_delay_s" in data:
        sim.callback_delay_s = float(data["callback_delay_s"])
    return web.json_response({"mode": sim.mode, "received": len(sim.received)})


async def _health(request: web.Request) -> web.Response:
    sim = request.app[NATIONAL]
    status = 200 if sim.mode == "ok" else 503
    return web.json_response({"status": sim.mode}, status=status)


def create_national_app(sim: NationalPlatform) -> web.Application:
    app = web.Application()
    app[NATIONAL] = sim
    tasks: set[asyncio.Task[None]] = set()
    app[TASKS] = tasks

    async def session_ctx(app: web.Application) -> Any:
        app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        yield
        for task in list(tasks):
            task.cancel()
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/api/exchange/{service}", _exchange)
    app.router.add_post("/_control", _control)
    app.router.add_get("/health", _health)
    return app


def main() -> None:  # pragma: no cover - exercised through `gateway up`
    from pathlib import Path

    from gateway.config import jwk_path_for
    from gateway.keys import ensure_keypair

    parser = argparse.ArgumentParser(description="national platform simulator")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--key", default="keys/national-platform.pem")
    parser.add_argument("--gateway-jwk", default="keys/gateway.jwk.json")
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8080")
    args = parser.parse_args()
    pair = ensure_keypair(Path(args.key), jwk_path_for(Path(args.key)))
    gw = VerificationKey.from_jwk(json.loads(Path(args.gateway_jwk).read_text()))
    sim = NationalPlatform(
        member_id="100000:national-platform",
        keypair=pair,
        trusted={gw.kid: gw},
        callback_base=args.gateway_url,
    )
    web.run_app(create_national_app(sim), host="127.0.0.1", port=args.port)


if __name__ == "__main__":  # pragma: no cover
    main()
