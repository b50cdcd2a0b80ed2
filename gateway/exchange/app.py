"""The aiohttp application factory for the ingress listener."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from adapters.base import AdapterContext
from gateway.audit import CheckpointSigner
from gateway.audit.timestamping import Stamper, StampTrust  # --- tsa ---
from gateway.config.model import Config
from gateway.config.outbound import configured_session, learnt_session
from gateway.config.secretstore import SecretBox
from gateway.crypto.keys import KeyPair, jwks_keys, load_gateway_keypair, load_rotated_keys
from gateway.errors import (
    GatewayError,
    InternalError,
    MalformedRequest,
    PayloadTooLarge,
    ServiceUnknown,
)
from gateway.exchange.delivery import Delivery
from gateway.exchange.health import Readiness
from gateway.exchange.limits import IN_FLIGHT, InFlight, handler_args, limits_middleware
from gateway.exchange.meta import Discovery
from gateway.exchange.monitoring import Monitor, central_aggregates, member_records
from gateway.exchange.mtls import LOCAL_TLS, LocalTls
from gateway.exchange.openapi import ingress_document
from gateway.exchange.pipeline import CTX_KEY, Pipeline, RequestContext
from gateway.exchange.tls import TLS_CONTEXT, server_context
from gateway.federation.follower import DirectoryFollower, announce, announcement_of
from gateway.observe.metrics import Metrics
from gateway.observe.traceparent import ensure_traceparent
from gateway.observe.tracing import Span, Tracing, create_tracing
from gateway.problem import problem_response
from gateway.runtime.live import LiveConfig
from gateway.runtime.registry import Runtime, RuntimeHolder, build_runtime
from gateway.signing import Signer, Verifier
from gateway.store import Rejection, Store, create_store
from gateway.store.chain import CheckpointRow  # --- tsa ---

__all__ = [
    "CONFIG",
    "DELIVERY",
    "DIRECTORY",
    "KEYPAIR",
    "LIVE",
    "METRICS",
    "MONITOR",
    "PIPELINE",
    "READINESS",
    "RUNTIME",
    "STAMPER",
    "STORE",
    "TRACING",
    "create_app",
]

log = logging.getLogger("gateway.exchange")

CONFIG = web.AppKey("config", Config)
KEYPAIR = web.AppKey("keypair", KeyPair)
STORE: web.AppKey[Store] = web.AppKey("store")
RUNTIME = web.AppKey("runtime", RuntimeHolder)
PIPELINE = web.AppKey("pipeline", Pipeline)
DELIVERY = web.AppKey("delivery", Delivery)
SESSION = web.AppKey("session", aiohttp.ClientSession)
LEARNT_SESSION = web.AppKey("learnt_session", aiohttp.ClientSession)
LIVE = web.AppKey("live", LiveConfig)
METRICS = web.AppKey("metrics", Metrics)
MONITOR = web.AppKey("monitor", Monitor)
READINESS = web.AppKey("readiness", Readiness)
TRACING = web.AppKey("tracing", Tracing)
DIRECTORY = web.AppKey("directory", DirectoryFollower)
STAMPER = web.AppKey("stamper", Stamper)  # --- tsa ---

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
    traceparent = ensure_traceparent(request.headers.get("traceparent"))
    tracing = request.app[TRACING]
    span: Span | None = None
    if tracing.enabled and request.path.startswith("/v1/"):
        span = tracing.start(_span_name(request), traceparent)
        traceparent = span.traceparent if span is not None else traceparent
    ctx = RequestContext(traceparent=traceparent)
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
    _observe(request, ctx, response, error, started, span)
    return response


def _span_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return f"{request.method} {resource.canonical if resource is not None else 'unmatched'}"


def _observe(
    request: web.Request,
    ctx: RequestContext,
    response: web.StreamResponse,
    error: GatewayError | None,
    started: float,
    span: Span | None,
) -> None:
    """A /v1 request's log line, metrics and span, from what the pipeline noted in ctx."""
    if not request.path.startswith("/v1/"):
        return
    elapsed = time.perf_counter() - started
    runtime = request.app[RUNTIME].current
    exchange = request.path.startswith("/v1/exchange/")
    adapter = None
    if exchange and ctx.service is not None and ctx.service in runtime.services:
        adapter = runtime.routes.lookup(ctx.service, request.headers.get("Gw-Target"))
    code = error.code if error is not None else None
    request.app[METRICS].observe_request(
        runtime,
        ctx,
        exchange=exchange,
        adapter=adapter,
        status=response.status,
        code=code,
        replayed="Gw-Replayed" in response.headers,
        elapsed_s=elapsed,
    )
    _log_exchange(request, ctx, response.status, error, elapsed, adapter)
    request.app[MONITOR].request_done(request, ctx, response, code, runtime.services, adapter)
    if span is not None:
        span.end(
            {
                "http.request.method": request.method,
                "http.response.status_code": response.status,
                "gw.client": ctx.client,
                "gw.service": ctx.service,
                "gw.message_id": ctx.message_id,
                "gw.adapter": adapter,
                "gw.code": code,
            },
            error=code if response.status >= 500 else None,
        )


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
    elapsed_s: float,
    adapter: str | None,
) -> None:
    log.info(
        "exchange",
        extra={
            "event": "exchange",
            "path": request.path,
            "client": ctx.client,
            "message_id": ctx.message_id,
            "service": ctx.service,
            "adapter": adapter,
            "status": status,
            "code": error.code if error else None,
            "trace_id": ctx.traceparent.split("-")[1],
            "latency_ms": round(elapsed_s * 1000, 3),
        },
    )


async def _jwks(request: web.Request) -> web.Response:
    gw = request.app[CONFIG].gateway
    # The retired-keys file is small and this endpoint is cached: read it each time, so
    # a rotation's grace period ends on time without a restart.
    rotated = load_rotated_keys(gw.rotated_keys_path)
    keys = jwks_keys(request.app[KEYPAIR].jwk, gw.previous_keys, rotated, time.time())
    return web.json_response({"keys": keys}, headers={"Cache-Control": "max-age=300"})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(
    config: Config,
    *,
    start_delivery: bool = True,
    tracing: Tracing | None = None,
    worker: bool = False,
) -> web.Application:
    """The ingress application; resources live in cleanup contexts, one yield each.

    ``tracing`` replaces the one ``config.tracing`` describes (tests pass an exporter);
    ``worker`` marks one of several processes (``gateway serve --workers``)."""
    in_flight = InFlight(config.security.max_concurrent)
    app = web.Application(
        middlewares=[problem_middleware, limits_middleware(config.security, in_flight)],
        client_max_size=config.security.max_body_bytes + 1,
        handler_args=handler_args(config.security),
    )
    app[CONFIG] = config
    app[IN_FLIGHT] = in_flight
    gw = config.gateway
    keypair = load_gateway_keypair(gw)
    app[KEYPAIR] = keypair
    if config.ingress.tls is not None:
        app[TLS_CONTEXT] = server_context(config.ingress.tls)
    local = LocalTls(config.local) if config.local is not None else None
    if local is not None:
        app[LOCAL_TLS] = local  # `gateway serve` adds the local listener's site
    store = create_store(config.store)
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
        local=local,
    )
    metrics = app[METRICS] = Metrics()
    metrics.set_signing_key(keypair.kid, keypair.expires_at)
    monitor = app[MONITOR] = Monitor(
        config=config.monitoring,
        store=store,
        instance=store.instance_id,
        registry=metrics.registry,
    )
    app[TRACING] = tracing if tracing is not None else create_tracing(config.tracing)
    readiness = app[READINESS] = Readiness(
        store=store,
        runtime=holder,
        keypair=keypair,
        delivery=lambda: app.get(DELIVERY),
        directory=lambda: app.get(DIRECTORY),
        stamper=lambda: app.get(STAMPER),
    )
    # --- tsa ---
    stamp_trust = StampTrust.of(config.timestamping) if config.timestamping else None

    def checkpoint_signed(checkpoint: CheckpointRow) -> None:
        stamper = app.get(STAMPER)
        if stamper is not None:
            stamper.wake()

    # --- end tsa ---

    async def tracing_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(app[TRACING].shutdown)  # flushes buffered spans

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        # Secrets at rest: a missing or wrong key-encryption key stops the start here.
        box = SecretBox(store, config.secrets, create=True)
        try:
            await box.load()
        except BaseException:
            await store.close()
            raise
        store.use_secrets(box)
        store.observe(metrics)
        yield
        await store.close()

    async def monitor_ctx(app: web.Application) -> AsyncIterator[None]:
        # Operational records, written in batches off the request path; the last on stop.
        await monitor.start()
        yield
        await monitor.stop()

    async def checkpoints_ctx(app: web.Application) -> AsyncIterator[None]:
        # Signs the message log's head now and then; the last one after delivery stopped.
        checkpoints = CheckpointSigner(
            store=store,
            keypair=keypair,
            gateway=config.gateway.member_id,
            interval_s=config.store.checkpoint_interval_s,
            on_signed=checkpoint_signed,
        )
        checkpoints.start()
        yield
        await checkpoints.stop()

    async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
        # --- archive --- log.retention: the background archiver (gateway/audit/retention.py)
        retention = None
        if config.log.retention is not None:
            from gateway.audit.retention import Retention

            retention = Retention(
                store=store,
                keypair=keypair,
                jwks={"keys": [dict(keypair.jwk), *map(dict, config.gateway.previous_keys)]},
                gateway=config.gateway.member_id,
                config=config.log.retention,
                registry=metrics.registry,
            )
            retention.start()
        yield
        if retention is not None:
            await retention.stop()
        # --- end archive ---

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # Configured URLs go through one pool, learnt ones (the directory's) through a
        # guarded one: addresses checked against config.outbound at connect time.
        app[SESSION] = configured_session()
        app[LEARNT_SESSION] = learnt_session(config.outbound)
        yield
        await app[SESSION].close()
        await app[LEARNT_SESSION].close()

    # --- tsa ---
    async def stamper_ctx(app: web.Application) -> AsyncIterator[None]:
        # Third-party time: stamps every checkpoint, in the background, never in the way.
        if config.timestamping is None or stamp_trust is None:
            yield
            return
        stamper = app[STAMPER] = Stamper(
            store=store,
            config=config.timestamping,
            trust=stamp_trust,
            session=lambda: app[SESSION],
            metrics=metrics,
            poll_s=config.store.checkpoint_interval_s,
        )
        stamper.start()
        yield
        await stamper.stop()

    # --- end tsa ---

    def install(runtime: Runtime) -> None:
        holder.current = runtime

    def adapter_context() -> AdapterContext:
        return AdapterContext(
            member_id=config.gateway.member_id,
            signer=signer,
            session=app[SESSION],
            base_dir=str(config.base),
            learnt_session=app[LEARNT_SESSION],
        )

    live = LiveConfig(config=config, store=store, apply=install, context=adapter_context)
    app[LIVE] = live

    async def adapters_ctx(app: web.Application) -> AsyncIterator[None]:
        await live.load()
        live.watch()  # admin writes made by other workers or instances
        yield
        await live.aclose()

    async def directory_ctx(app: web.Application) -> AsyncIterator[None]:
        # The federation directory: announce ourselves, then follow it
        # (gateway/federation/follower.py).
        directory = config.directory
        if directory is None:
            yield
            return
        if directory.announce_url is not None and not worker:
            try:
                status = await announce(
                    app[SESSION],
                    directory.announce_url,
                    keypair,
                    config.gateway.member_id,
                    announcement_of(config, keypair),
                )
                if status >= 300:
                    log.warning("directory announcement refused (HTTP %d)", status)
            except GatewayError as exc:
                log.warning("%s", exc.detail)
        follower = DirectoryFollower(
            config=directory,
            own=config.gateway.member_id,
            store=store,
            live=live,
            session=lambda: app[SESSION],
            metrics=metrics,
        )
        app[DIRECTORY] = follower
        await follower.start()
        yield
        await follower.stop()

    async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
        delivery = Delivery(
            config=config.delivery,
            identity=config.gateway,
            store=store,
            runtime=holder,
            signer=signer,
            session=app[SESSION],
            learnt_session=app[LEARNT_SESSION],
            metrics=metrics,
            tracing=app[TRACING],
        )
        app[DELIVERY] = delivery
        delivery.monitor = monitor
        app[PIPELINE].outbox = delivery
        if start_delivery:
            await delivery.start(release_leases=not worker)
        yield
        if start_delivery:
            await delivery.stop()

    app.cleanup_ctx.extend(
        [
            tracing_ctx,
            store_ctx,
            monitor_ctx,
            checkpoints_ctx,
            retention_ctx,  # archive
            session_ctx,
            stamper_ctx,  # --- tsa ---
            adapters_ctx,
            directory_ctx,
            delivery_ctx,
        ]
    )
    if metrics.multiprocess:
        app.cleanup_ctx.append(metrics.breaker_publisher(holder))

    async def exchange(request: web.Request) -> web.Response:
        return await request.app[PIPELINE].exchange(request)

    async def message(request: web.Request) -> web.Response:
        return await request.app[PIPELINE].message_status(request)

    async def callback(request: web.Request) -> web.Response:
        return await request.app[PIPELINE].callback(request)

    app.router.add_post("/v1/exchange/{service}", exchange)
    app.router.add_get("/v1/messages/{id}", message)
    app.router.add_post("/v1/callbacks/{service}", callback)
    discovery = Discovery(app[PIPELINE])  # PROTOCOL.md «Member self-service»
    app.router.add_get("/v1/meta/services", discovery.services)
    app.router.add_get("/v1/meta/services/{code}", discovery.service)
    app.router.add_get("/v1/meta/members", discovery.members)
    app.router.add_get("/.well-known/jwks.json", _jwks)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", readiness.handler)
    app.router.add_get("/metrics", metrics.endpoint(store, holder))

    # Operational monitoring (gateway/exchange/monitoring.py), signed like any exchange.
    async def monitoring_records(request: web.Request) -> web.Response:
        return await member_records(request.app[PIPELINE], request)

    async def monitoring_aggregates(request: web.Request) -> web.Response:
        return await central_aggregates(request.app[PIPELINE], config.monitoring, request)

    app.router.add_get("/v1/monitoring/records", monitoring_records)
    app.router.add_get("/v1/monitoring/aggregates", monitoring_aggregates)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(ingress_document())

    app.router.add_get("/openapi.json", openapi)
    return app
