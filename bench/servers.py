"""The upstream and the two reference contenders, each run as its own process.

    python -m bench.servers upstream --port P --gateway-url URL --key national.pem
    python -m bench.servers bare --port P --upstream URL
    python -m bench.servers floor --port P --upstream URL --key gateway.pem --client-jwk J

``upstream`` answers ``credit.query`` with a constant credit record; ``crossregion.apply``
with ``202`` and then a signed callback to the gateway (async mode); ``POST /callbacks``
is the member's callback receiver, and ``GET /stats`` says how many callbacks arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench import sig
from gateway.config.model import jwk_path_for
from gateway.crypto.keys import load_keypair, public_from_jwk
from gateway.serve import eventloop

__all__ = ["create_bare_app", "create_floor_app", "create_upstream_app", "main"]

PLATFORM_ID = "100000:national-platform"
GATEWAY_ID = "330000:gateway"
EXCHANGE_PATH = "/v1/exchange/{service}"
# A valid credit.query answer (schemas/services/credit.query/response.json), sent as is.
CREDIT_RECORD = json.dumps(
    {
        "uscc": "91350100M000100Y43",
        "name": "模拟企业001有限公司",
        "status": "active",
        "credit_rating": "A",
        "dishonest_entity": False,
        "administrative_penalties": [],
        "source": "national-credit-information-sharing-platform",
        "updated_at": "2026-11-26T08:00:00Z",
    },
    ensure_ascii=False,
).encode()
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    """One shared keep-alive session per app, with the gateway's limits and timeouts."""
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=128)
    app[SESSION] = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60, connect=5)
    )
    yield
    await app[SESSION].close()


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# Upstream -----------------------------------------------------------------------------


def create_upstream_app(
    *, gateway_url: str, key: ed25519.Ed25519PrivateKey, kid: str
) -> web.Application:
    """The trivial JSON service behind every contender, and the callback receiver."""
    app = web.Application()
    received: set[str] = set()
    tasks: set[asyncio.Task[None]] = set()
    callback_limit = asyncio.Semaphore(64)

    async def exchange(request: web.Request) -> web.Response:
        body = await request.read()
        if request.match_info["service"] != "crossregion.apply":
            return web.Response(body=CREDIT_RECORD, content_type="application/json")
        message_id = request.headers["Gw-Message-Id"]
        task = asyncio.create_task(call_back(request.app[SESSION], message_id, body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return web.json_response({"accepted": True, "ticket": f"NP-{message_id}"}, status=202)

    async def call_back(session: aiohttp.ClientSession, message_id: str, request: bytes) -> None:
        """The decision, signed as the national platform (as ``simulators/national.py``)."""
        decision = {
            "decision": "approved",
            "case_number": f"CR{message_id.replace('-', '')[:20].upper()}",
            "handling_region": json.loads(request).get("handling_region", "440000"),
            "decided_at": "2026-11-26T10:00:00Z",
        }
        body = json.dumps(decision).encode()
        url = f"{gateway_url}/v1/callbacks/crossregion.apply"
        headers = {
            "content-type": "application/json",
            "gw-client": PLATFORM_ID,
            "gw-message-id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"decision:{message_id}")),
            "gw-correlation-id": message_id,
            "content-digest": sig.content_digest(body),
        }
        names = (*sig.REQUEST_HEADERS, "gw-correlation-id")
        lines = sig.request_lines("POST", url, headers, names)
        async with callback_limit:
            for attempt in range(10):
                # Re-signed on each attempt: a nonce is single use, and a callback that
                # arrives before the delivery is committed is told to retry (503).
                headers["signature-input"], headers["signature"] = sig.sign(
                    key, kid, "sig1", lines, nonce=secrets.token_urlsafe(16)
                )
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status < 500:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05 * 2**attempt)

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        received.add(request.headers.get("Gw-Message-Id", ""))
        return web.json_response({"received": True})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"callbacks": len(received)})

    async def drain(app: web.Application) -> AsyncIterator[None]:
        yield
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.cleanup_ctx.extend([_session_ctx, drain])
    app.router.add_post("/api/exchange/{service}", exchange)
    app.router.add_post("/callbacks", receive)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", _health)
    return app


# Contenders ---------------------------------------------------------------------------


def create_bare_app(upstream: str) -> web.Application:
    """A pass-through proxy: read the body, POST it upstream, return the answer's body."""
    app = web.Application()

    async def exchange(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with request.app[SESSION].post(upstream, data=body, headers=headers) as resp:
            answer = await resp.read()
            status = resp.status
            ctype = resp.headers.get("Content-Type", "application/json")
        return web.Response(status=status, body=answer, headers={"Content-Type": ctype})

    app.cleanup_ctx.append(_session_ctx)
    app.router.add_post(EXCHANGE_PATH, exchange)
    app.router.add_get("/health", _health)
    return app


def create_floor_app(
    *,
    upstream: str,
    base_url: str,
    key: ed25519.Ed25519PrivateKey,
    kid: str,
    client_key: ed25519.Ed25519PublicKey,
) -> web.Application:
    """The bare proxy plus the unavoidable cryptography, inline: verify, sign, sign."""
    app = web.Application()

    async def exchange(request: web.Request) -> web.Response:
        body = await request.read()
        h = request.headers
        if sig.content_digest(body) != h.get("Content-Digest"):
            return web.json_response({"code": "digest_mismatch"}, status=400)
        lines = sig.request_lines("POST", base_url + request.raw_path, h)
        if not sig.verify(client_key, h["Signature-Input"], h["Signature"], lines):
            return web.json_response({"code": "signature_invalid"}, status=401)
        out = {
            "content-type": h["Content-Type"],
            "content-digest": h["Content-Digest"],
            "gw-client": h["Gw-Client"],
            "gw-message-id": h["Gw-Message-Id"],
            "gw-via": GATEWAY_ID,
        }
        out_lines = sig.request_lines("POST", upstream, out, (*sig.REQUEST_HEADERS, "gw-via"))
        out["signature-input"], out["signature"] = sig.sign(key, kid, "gw", out_lines)
        async with request.app[SESSION].post(upstream, data=body, headers=out) as resp:
            answer = await resp.read()
            status = resp.status
            ctype = resp.headers.get("Content-Type", "application/json")
        headers = {
            "content-type": ctype,
            "content-digest": sig.content_digest(answer),
            "gw-message-id": h["Gw-Message-Id"],
        }
        label, _, request_signature = h["Signature"].partition("=")
        answer_lines = sig.answer_lines(status, headers, label, request_signature)
        headers["signature-input"], headers["signature"] = sig.sign(key, kid, "gw", answer_lines)
        return web.Response(status=status, body=answer, headers=headers)

    app.cleanup_ctx.append(_session_ctx)
    app.router.add_post(EXCHANGE_PATH, exchange)
    app.router.add_get("/health", _health)
    return app


# Command line -------------------------------------------------------------------------


def _ed25519(pem: Path) -> tuple[ed25519.Ed25519PrivateKey, str]:
    pair = load_keypair(pem, jwk_path_for(pem))
    if not isinstance(pair.private, ed25519.Ed25519PrivateKey):
        raise SystemExit(f"{pem}: the benchmark signs with Ed25519 keys only")
    return pair.private, pair.kid


def _app(args: argparse.Namespace) -> web.Application:
    if args.role == "bare":
        return create_bare_app(args.upstream)
    key, kid = _ed25519(Path(args.key))
    if args.role == "upstream":
        return create_upstream_app(gateway_url=args.gateway_url, key=key, kid=kid)
    client_key = public_from_jwk(json.loads(Path(args.client_jwk).read_text(encoding="utf-8")))
    if not isinstance(client_key, ed25519.Ed25519PublicKey):
        raise SystemExit(f"{args.client_jwk}: the benchmark verifies Ed25519 keys only")
    return create_floor_app(
        upstream=args.upstream,
        base_url=f"http://127.0.0.1:{args.port}",
        key=key,
        kid=kid,
        client_key=client_key,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=__doc__)
    parser.add_argument("role", choices=["upstream", "bare", "floor"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", help="upstream URL (bare, floor)")
    parser.add_argument("--gateway-url", help="gateway ingress for callbacks (upstream)")
    parser.add_argument("--key", help="Ed25519 PKCS#8 PEM this process signs with")
    parser.add_argument("--client-jwk", help="the member's public JWK (floor)")
    parser.add_argument("--loop", choices=eventloop.LOOPS, default="auto", help="event loop")
    args = parser.parse_args(argv)
    # Like `gateway serve`: no access log, the same event loop as the gateway.
    factory = eventloop.loop_factory(args.loop)
    loop = factory() if factory is not None else asyncio.new_event_loop()
    web.run_app(
        _app(args), host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop
    )


if __name__ == "__main__":
    main()
