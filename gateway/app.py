"""The aiohttp application factory for the ingress listener."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from adapters.base import AdapterContext
from gateway.config import Config
from gateway.delivery import Delivery
from gateway.errors import (
    GatewayError,
    InternalError,
    MalformedRequest,
    PayloadTooLarge,
    ServiceUnknown,
)
from gateway.keys import KeyPair, load_keypair
from gateway.live import LiveConfig
from gateway.openapi import ingress_document
from gateway.pipeline import CTX_KEY, Pipeline, RequestContext, RuntimeHolder
from gateway.problem import problem_response
from gateway.registry import Runtime, build_runtime
from gateway.signing import Signer, Verifier
from gateway.store import Rejection
from gateway.store.sqlite import SQLiteStore
from gateway.trace import ensure_traceparent

__all__ = [
    "CONFIG",
    "DELIVERY",
    "KEYPAIR",
    "LIVE",
    "PIPELINE",
    "RUNTIME",
    "STORE",
    "create_app",
]

log = logging.getLogger("gateway.exchange")

CONFIG = web.AppKey("config", Config)
KEYPAIR = web.AppKey("keypair", KeyPair)
STORE = web.AppKey("store", SQLiteStore)
RUNTIME = web.AppKey("runtime", RuntimeHolder)
PIPELINE = web.AppKey("pipeline", Pipeline)
DELIVERY = web.AppKey("delivery", Delivery)
SESSION = web.AppKey("session", aiohttp.ClientSession)
LIVE = web.AppKey("live", LiveConfig)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _translate(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("the body is too large")
    if isinstance(exc, web.HTTPNotFound):
        return ServiceUnknown("no such resource")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MalformedRequest(f"method {exc.method} is not allowed here")
    return MalformedRequest(exc.reason)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """GatewayError → problem+json; anything else → ``internal``; sign every /v1 answer."""
    ctx = RequestContext(traceparent=ensure_traceparent(request.headers.get("traceparent")))
    request[CTX_KEY] = ctx
    started = time.perf_counter()
    error: GatewayError | None = None
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _translate(exc)
        response = problem_response(error, ctx.message_id)
    except GatewayError as exc:
        error = exc
        response = problem_response(exc, ctx.message_id)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        error = InternalError("an internal error occurred; it has been logged")
        response = problem_response(error, ctx.message_id)
    pipeline = request.app[PIPELINE]
    if request.path.startswith("/v1/") and isinstance(response, web.Response):
        response.headers["traceparent"] = ctx.traceparent
        try:
            pipeline.sign(request, response, ctx)
        except GatewayError:
            log.exception("could not sign the answer to %s", request.path)
    if error is not None and request.path.startswith("/v1/") and not ctx.recorded:
        await _record_rejection(request, ctx, error)
    _log_exchange(request, ctx, response.status, error, started)
    return response


async def _record_rejection(request: web.Request, ctx: RequestContext, error: GatewayError) -> None:
    headers = {
        k: v
        for k, v in request.headers.items()
        if k.lower() not in ("authorization", "cookie", "gw-user")
    }
    try:
        await request.app[STORE].record_rejection(
            Rejection(
                client=ctx.client,
                message_id=ctx.message_id,
                service=ctx.service,
                status=error.status,
                code=error.code,
                detail=error.detail,
                digest=ctx.digest,
                size=ctx.size,
                headers=headers,
            )
        )
    except GatewayError:
        log.exception("could not record a rejection")


def _log_exchange(
    request: web.Request,
    ctx: RequestContext,
    status: int,
    error: GatewayError | None,
    started: float,
) -> None:
    if not request.path.startswith("/v1/"):
        return
    log.info(
        "exchange",
        extra={
            "event": "exchange",
            "path": request.path,
            "client": ctx.client,
            "message_id": ctx.message_id,
            "service": ctx.service,
            "status": status,
            "code": error.code if error else None,
            "trace_id": ctx.traceparent.split("-")[1],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )


async def _jwks(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    keys = [dict(request.app[KEYPAIR].jwk), *(dict(k) for k in config.gateway.previous_keys)]
    return web.json_response({"keys": keys}, headers={"Cache-Control": "max-age=300"})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    reasons: list[str] = []
    try:
        await request.app[STORE].ping()
    except GatewayError as exc:
        reasons.append(f"store: {exc.detail}")
    except Exception as exc:  # any failure of the store means not ready
        reasons.append(f"store: {type(exc).__name__}")
    delivery = request.app.get(DELIVERY)
    if delivery is not None and delivery.state.value != "running":
        reasons.append(f"delivery: {delivery.state.value}")
    for name, slot in request.app[RUNTIME].current.adapters.items():
        if slot.config.enabled and not slot.breaker.allows():
            reasons.append(f"adapter {name}: circuit open")
    status = 503 if reasons else 200
    return web.json_response(
        {"status": "ready" if not reasons else "not ready", "reasons": reasons}, status=status
    )


def create_app(config: Config, *, start_delivery: bool = True) -> web.Application:
    """The ingress application; resources live in cleanup contexts, one yield each."""
    app = web.Application(
        middlewares=[problem_middleware],
        client_max_size=config.security.max_body_bytes + 1,
    )
    app[CONFIG] = config
    keypair = load_keypair(config.gateway.key_path, config.gateway.jwk_path)
    app[KEYPAIR] = keypair
    store = SQLiteStore(config.store.path, synchronous=config.store.synchronous)
    app[STORE] = store
    signer = Signer(keypair)
    holder = RuntimeHolder(build_runtime(config, {}))
    app[RUNTIME] = holder
    app[PIPELINE] = Pipeline(
        identity=config.gateway,
        security=config.security,
        signer=signer,
        verifier=Verifier(skew_s=config.security.clock_skew_s),
        store=store,
        runtime=holder,
    )

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        yield
        await store.close()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=128, ttl_dns_cache=300)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60, connect=5)
        )
        app[SESSION] = session
        yield
        await session.close()

    def install(runtime: Runtime) -> None:
        holder.current = runtime

    def adapter_context() -> AdapterContext:
        return AdapterContext(
            member_id=config.gateway.member_id,
            signer=signer,
            session=app[SESSION],
            base_dir=str(config.base),
        )

    live = LiveConfig(config=config, store=store, apply=install, context=adapter_context)
    app[LIVE] = live

    async def adapters_ctx(app: web.Application) -> AsyncIterator[None]:
        await live.load()
        yield
        await live.aclose()

    async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
        delivery = Delivery(
            config=config.delivery,
            identity=config.gateway,
            store=store,
            runtime=holder,
            pipeline=app[PIPELINE],
            signer=signer,
            session=app[SESSION],
        )
        app[DELIVERY] = delivery
        app[PIPELINE].outbox = delivery
        if start_delivery:
            await delivery.start()
        yield
        if start_delivery:
            await delivery.stop()

    app.cleanup_ctx.extend([store_ctx, session_ctx, adapters_ctx, delivery_ctx])

    async def exchange(request: web.Request) -> web.Response:
        return await request.app[PIPELINE].exchange(request)

    async def message(request: web.Request) -> web.Response:
        return await request.app[PIPELINE].message_status(request)

    async def callback(request: web.Request) -> web.Response:
        return await request.app[PIPELINE].callback(request)

    app.router.add_post("/v1/exchange/{service}", exchange)
    app.router.add_get("/v1/messages/{id}", message)
    app.router.add_post("/v1/callbacks/{service}", callback)
    app.router.add_get("/.well-known/jwks.json", _jwks)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(ingress_document())

    app.router.add_get("/openapi.json", openapi)
    return app
