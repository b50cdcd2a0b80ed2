"""The exchange pipeline, top to bottom in one place.

``POST /v1/exchange/{service}``:
    read body → authenticate (headers, member, key, signature, freshness, digest;
      on the local listener an unsigned request by its client certificate, gateway/exchange/mtls.py)
    → idempotency → authorise → validate → record → route → adapter
    → validate answer → sign → record.
A synchronous exchange is recorded once, with its outcome, after the adapter (one
commit: docs/decisions.md, "A lean exchange"); an asynchronous one before it.

``GET /v1/messages/{id}`` and ``POST /v1/callbacks/{service}`` reuse the same stages.
Each stage is one small method; none reaches into another's storage. Where a stage's
work is shared with the outbox it lives in its own module: route → adapter → validate
answer is ``gateway/exchange/dispatch.py``, the nonce part of freshness
``gateway/exchange/nonces.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.model import MEMBER_ID_PATTERN, GatewayIdentity, SecurityConfig, region_within
from gateway.encoding import iso_utc
from gateway.errors import (
    CallbackConflict,
    CallbackEarly,
    CertificateUnknown,
    ClientDisabled,
    ClientUnknown,
    DirectoryStale,
    GatewayError,
    KeyUnknown,
    MalformedRequest,
    MessageIdReused,
    MessageUnknown,
    MissingHeader,
    NotPermitted,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnknown,
    SignatureInvalid,
    UnsupportedMediaType,
)
from gateway.exchange.dispatch import call_adapter, exchange_of, intended_receiver, validate_answer
from gateway.exchange.limits import RateLimiter, check_json_shape
from gateway.exchange.mtls import LocalTls, PeerCertificate
from gateway.exchange.nonces import NonceGuard
from gateway.observe.traceparent import trace_id_of
from gateway.problem import problem_body
from gateway.runtime.registry import Member, Runtime, RuntimeHolder, Service
from gateway.signing import (
    REQUEST_COMPONENTS,
    RequestView,
    SignatureInput,
    Signer,
    VerifiedSignature,
    Verifier,
    check_content_digest,
    parse_signature_input,
)
from gateway.states import ANSWERED_STATES, AWAITING_CALLBACK, IN_DELIVERY, MessageState
from gateway.store import DuplicateMessage, MessageRecord, NewCallback, NewMessage, Outcome, Store
from gateway.store.rows import accepted_record

__all__ = ["Authenticated", "Pipeline", "via_chain"]

log = logging.getLogger("gateway.exchange")

READ_COMPONENTS = ("@method", "@target-uri", "gw-client")
MEMBER_ID = re.compile(MEMBER_ID_PATTERN)
_SINGLE_HEADERS = (
    "Content-Type",
    "Content-Digest",
    "Gw-Client",
    "Gw-Message-Id",
    "Gw-Target",
    "Gw-User",
    "Gw-Issue",
    "Gw-Via",
    "Gw-Correlation-Id",
)
# Optional headers a signature must cover whenever they are sent.
_COVERED_WHEN_SENT = (
    "gw-message-id",
    "gw-target",
    "gw-user",
    "gw-issue",
    "gw-via",
    "gw-correlation-id",
)
# One answer for a callback nobody may send: an unknown id, another party's message, a
# message that awaits nothing (ids cannot be probed).
_UNAWAITED = "no asynchronous {service} message {id} awaits an answer"
# Never stored: signatures are verifiable only with the rest of the request anyway,
# and Authorization would be a secret.
_NOT_RECORDED = frozenset(
    {"authorization", "cookie", "proxy-authorization", "gw-client-certificate"}
)
# Recorded (the hash chain covers it) for a member authenticated by its certificate:
# the certificate's SHA-256 fingerprint, the evidence of who sent the message.
CERTIFICATE_HEADER = "Gw-Client-Certificate"


class Wakeable(Protocol):
    def wake(self) -> None: ...

    def accepting(self) -> bool: ...


@dataclass(slots=True)
class RequestContext:
    """What the pipeline learned about a request so far (for rejections and logs)."""

    client: str | None = None
    message_id: str | None = None
    service: str | None = None
    digest: str | None = None
    size: int = 0
    signature_label: str | None = None
    recorded: bool = False
    traceparent: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    # Operational monitoring (gateway/exchange/monitoring.py): when the request arrived, each
    # step reached (ms after it), the message's row and the adapter that answered.
    received_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    steps: dict[str, float] = field(default_factory=dict)
    seq: int | None = None
    adapter: str | None = None

    def mark(self, step: str) -> None:
        """Note that ``step`` (verified, validated, upstream, answered) is reached."""
        self.steps[step] = (time.perf_counter() - self.started) * 1000


CTX_KEY = web.RequestKey("gw.ctx", RequestContext)


@dataclass(frozen=True, slots=True, kw_only=True)
class Authenticated:
    """A request whose signature verified (or, on the local listener, whose client
    certificate did): who sent it, and who vouched for it."""

    client: str
    message_id: str  # "" only on a read that named none
    signer: Member  # the member whose key signed (the client, or the vouching peer)
    signature: VerifiedSignature | None  # None: authenticated by ``certificate``
    digest: str  # sha-256 of the body, hex ("" when the request has no body)
    # The relay chain (Gw-Via, oldest first); its last hop is the signer. () if direct.
    via: tuple[str, ...] = ()
    certificate: str | None = None  # SHA-256 fingerprint of an mtls member's certificate


def via_chain(value: str | None) -> tuple[str, ...]:
    """``Gw-Via`` as a chain of member ids, oldest first (PROTOCOL.md § Outbound)."""
    if value is None or not value.strip():
        return ()
    chain = tuple(hop.strip() for hop in value.split(","))
    if not all(MEMBER_ID.match(hop) for hop in chain):
        raise MalformedRequest("Gw-Via must be a comma-separated list of member ids")
    return chain


def _single(headers: CIMultiDictProxy[str], name: str) -> str | None:
    values = headers.getall(name, [])
    if len(values) > 1:
        raise MalformedRequest(f"the {name} header appears more than once")
    return values[0] if values else None


def _require(headers: CIMultiDictProxy[str], name: str) -> str:
    value = _single(headers, name)
    if value is None or not value.strip():
        raise MissingHeader(f"the {name} header is required")
    return value.strip()


def _message_id(value: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except ValueError as exc:
        raise MalformedRequest("Gw-Message-Id must be a UUID") from exc
    if str(parsed) != value.lower():
        raise MalformedRequest("Gw-Message-Id must be a UUID in its canonical form")
    return value.lower()


def _recordable(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _NOT_RECORDED}


def _recorded_request(request: web.Request, auth: Authenticated) -> dict[str, str]:
    """The request's headers as recorded; an mtls member's with its certificate."""
    recorded = _recordable(request.headers)
    if auth.certificate is not None:
        recorded[CERTIFICATE_HEADER] = f"sha256:{auth.certificate}"
    return recorded


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(body: bytes) -> Any:
    """RFC 8259: UTF-8 between systems (json.loads would guess UTF-16/32), no NaN."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedRequest("the body is not a UTF-8 JSON document") from exc


class Pipeline:
    local: LocalTls | None = None  # the local (mTLS) listener, when configured

    def __init__(
        self,
        *,
        identity: GatewayIdentity,
        security: SecurityConfig,
        signer: Signer,
        verifier: Verifier,
        store: Store,
        runtime: RuntimeHolder,
        outbox: Wakeable | None = None,
        clock: Callable[[], float] = time.time,
        local: LocalTls | None = None,
    ) -> None:
        self.identity = identity
        self.security = security
        self.signer = signer
        self.verifier = verifier
        self.store = store
        self.runtime = runtime
        self.outbox = outbox
        self._clock = clock
        self.local = local
        self.rate_limiter = RateLimiter(security.rate_limit)
        self.nonces = NonceGuard(store, skew_s=security.clock_skew_s, clock=clock)
        # Synchronous exchanges on their way (client, message id): recorded only once they
        # end, so a twin arriving meanwhile is told so here (docs/decisions.md, "A lean
        # exchange").
        self._in_flight: set[tuple[str, str]] = set()

    # Stages --------------------------------------------------------------------------

    async def read_body(self, request: web.Request, limit: int, ctx: RequestContext) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the body exceeds {limit} bytes")
        try:
            if request.content.is_eof():  # it came with the headers: nothing to wait for
                body = await request.read()
            else:  # a client trickling its body is cut off, not waited for
                async with asyncio.timeout(self.security.body_timeout_s):
                    body = await request.read()
        except TimeoutError as exc:
            raise RequestTimeout(
                f"the body did not arrive within {self.security.body_timeout_s:g} s"
            ) from exc
        except web.RequestPayloadError as exc:
            raise MalformedRequest("the body's framing is invalid (chunked or length)") from exc
        ctx.size = len(body)
        if len(body) > limit:
            raise PayloadTooLarge(f"the body exceeds {limit} bytes")
        return body

    def target_uri(self, request: web.Request) -> str:
        """The ``@target-uri`` a request to this gateway must have been signed for.

        One of the configured public URLs (the one whose authority is the Host header's,
        else the first); without any, the listener's own bound address (scheme, host,
        actual port). Never the Host header alone: a request signed for another gateway
        must not verify here. On the local listener: its own bound address."""
        urls = self.identity.public_urls
        if urls and not (self.local is not None and self.local.peer(request) is not None):
            host = request.headers.get("Host", "").lower()
            base = next((u for u in urls if _authority(u) == host), urls[0])
            return base + request.raw_path
        return _bound_origin(request) + request.raw_path

    def authenticate(
        self,
        request: web.Request,
        body: bytes | None,
        runtime: Runtime,
        ctx: RequestContext,
        *,
        required: tuple[str, ...] = REQUEST_COMPONENTS,
        read: bool = False,
    ) -> Authenticated:
        """Who sent this, proven by an RFC 9421 signature and an RFC 9530 digest.

        The signer is the ``Gw-Client`` itself, or the last hop of the ``Gw-Via`` chain,
        which must be a relay granted the client's region (never this gateway's own);
        the signature is checked against this gateway's own target URI (``target_uri``).
        A ``read`` needs no ``Gw-Message-Id``; one that is sent must be covered anyway.
        An unsigned request on the local listener is authenticated by its certificate."""
        headers = request.headers
        started = time.perf_counter()
        local = self.local
        peer = local.peer(request) if local is not None else None
        if local is not None and peer is not None:
            if "Signature" not in headers and "Signature-Input" not in headers:
                return self._by_certificate(request, body, runtime, ctx, peer, read=read)
            local.check_revoked(runtime, peer)  # a signer's connection, too
        sig: SignatureInput = parse_signature_input(headers)
        ctx.signature_label = sig.label
        for name in _SINGLE_HEADERS:
            _single(headers, name)
        client = _require(headers, "Gw-Client")
        ctx.client = client
        raw_message_id = (
            _require(headers, "Gw-Message-Id") if not read or "Gw-Message-Id" in headers else None
        )
        if body is not None:
            _require(headers, "Content-Digest")
            _require(headers, "Content-Type")
        if not MEMBER_ID.match(client):
            raise MalformedRequest("Gw-Client must be a member id <region>:<system>")
        via = via_chain(_single(headers, "Gw-Via"))
        # The signing hop is the chain's last entry: its key must be the one that signed.
        signer = self._member(runtime, via[-1] if via else client)
        if via:
            self._check_vouching(signer, client, self.identity.region)
        if "signature" not in signer.config.auth:
            raise KeyUnknown(f"{signer.id} authenticates by certificate on the local listener")
        key = signer.keys.get(sig.keyid)
        if key is None:
            raise KeyUnknown(f"key {sig.keyid!r} is not a key of {signer.id}")
        present = tuple(
            name for name in _COVERED_WHEN_SENT if name in headers and name not in required
        )
        verified = self.verifier.verify(
            RequestView(request.method, self.target_uri(request), headers),
            sig,
            key,
            required=required + present,
            allowed_algs=signer.config.allowed_algs,
        )
        digest = ""
        if body is not None:
            digest = check_content_digest(headers["Content-Digest"], body)
            ctx.digest = digest
            ctype = headers["Content-Type"].split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                raise UnsupportedMediaType("the body must be application/json")
        # Only a well-formed id is repeated in answers and logs.
        message_id = ""
        if raw_message_id is not None:
            message_id = ctx.message_id = _message_id(raw_message_id)
        ctx.timings["verify"] = (time.perf_counter() - started) * 1000
        ctx.mark("verified")
        return Authenticated(
            client=client,
            message_id=message_id,
            signer=signer,
            signature=verified,
            digest=digest,
            via=via,
        )

    def _by_certificate(
        self,
        request: web.Request,
        body: bytes | None,
        runtime: Runtime,
        ctx: RequestContext,
        peer: PeerCertificate,
        *,
        read: bool,
    ) -> Authenticated:
        """An mtls member on the local listener: its certificate names exactly one member,
        which must be ``Gw-Client``; the same headers as a signed request, the digest
        optional (TLS protects the body in transit; it is checked when sent)."""
        assert self.local is not None
        headers = request.headers
        started = time.perf_counter()
        for name in _SINGLE_HEADERS:
            _single(headers, name)
        client = _require(headers, "Gw-Client")
        ctx.client = client
        raw_message_id = (
            _require(headers, "Gw-Message-Id") if not read or "Gw-Message-Id" in headers else None
        )
        if not MEMBER_ID.match(client):
            raise MalformedRequest("Gw-Client must be a member id <region>:<system>")
        owner = self.local.member_of(runtime, peer)
        if owner.id != client:
            raise CertificateUnknown(f"the client certificate is not one of {client}'s")
        member = self._member(runtime, client)
        if via_chain(_single(headers, "Gw-Via")):
            raise NotPermitted(f"{client} speaks only for itself: no Gw-Via on the local listener")
        digest = ""
        if body is not None:
            ctype = _require(headers, "Content-Type").split(";", 1)[0].strip().lower()
            sent = _single(headers, "Content-Digest")
            if sent is not None:
                digest = check_content_digest(sent, body)
            else:
                digest = hashlib.sha256(body).hexdigest()
            ctx.digest = digest
            if ctype != "application/json":
                raise UnsupportedMediaType("the body must be application/json")
        message_id = ""
        if raw_message_id is not None:
            message_id = ctx.message_id = _message_id(raw_message_id)
        ctx.timings["verify"] = (time.perf_counter() - started) * 1000
        return Authenticated(
            client=client,
            message_id=message_id,
            signer=member,
            signature=None,
            digest=digest,
            certificate=peer.fingerprint,
        )

    async def admit(self, auth: Authenticated) -> None:
        """Freshness and single use, once the signer is proven: its rate limit, then its
        signature's nonce (single use while the signature could be fresh). A relayed or
        cross-region request must carry one (docs/decisions.md, "Relays")."""
        self.rate_limiter.admit(auth.signer.config)
        sig = auth.signature
        if sig is None:  # a certificate on the local listener: TLS has no replayable token
            return
        if sig.nonce is None and (auth.via or self._cross_region(auth)):
            raise SignatureInvalid(
                "a relayed or cross-region request must carry a nonce signature parameter"
            )
        if sig.nonce is not None:
            await self.nonces.claim(auth.signer.id, sig.keyid, sig.nonce, sig.created)

    def _cross_region(self, auth: Authenticated) -> bool:
        own = self.identity.region
        return not (
            region_within(auth.signer.config.region, own)
            and region_within(auth.client.split(":", 1)[0], own)
        )

    @staticmethod
    def _member(runtime: Runtime, member_id: str) -> Member:
        member = runtime.members.get(member_id)
        if member is None:
            raise ClientUnknown(f"{member_id} is not a member of this exchange")
        if not member.config.enabled:
            raise ClientDisabled(f"{member_id} is disabled")
        if member_id in runtime.refused:
            raise DirectoryStale(runtime.refused[member_id], retry_after=60)
        return member

    @staticmethod
    def _check_vouching(peer: Member, client: str, own_region: str) -> None:
        """A relay vouches only for the regions it is explicitly granted (``100000`` is
        the national level's own members), and never for this gateway's own region or
        its sub-regions: a local member speaks only with its own key."""
        if peer.config.kind == "system":
            raise NotPermitted(f"{peer.id} is not a gateway and cannot relay for others")
        region = client.split(":", 1)[0]
        if region_within(region, own_region):
            raise NotPermitted(
                f"{peer.id} may not vouch for {client}: members of region {own_region} "
                "speak only with their own keys"
            )
        if region not in peer.config.regions:
            raise NotPermitted(f"{peer.id} may not vouch for members of region {region}")

    @staticmethod
    def service_of(runtime: Runtime, code: str) -> Service:
        service = runtime.services.get(code)
        if service is None:
            raise ServiceUnknown(f"no service {code!r} is offered here")
        return service

    @staticmethod
    def authorise(auth: Authenticated, service: Service) -> None:
        if service.code not in auth.signer.config.services:
            raise NotPermitted(f"{auth.signer.id} may not call {service.code}")

    async def replay(
        self, request: web.Request, auth: Authenticated, ctx: RequestContext
    ) -> web.Response | None:
        """Same message id again: the stored outcome, or 409 for a different body."""
        existing = await self.store.get_message(auth.client, auth.message_id)
        if existing is None:
            return None
        # Another relay of the same client is not given the first one's answer: to it the
        # id is simply taken, as for another body.
        if existing.request_digest != auth.digest or not self._may_read(auth, existing):
            raise MessageIdReused(f"message {auth.message_id} was already sent with another body")
        if existing.mode == "async":
            response = self.accepted_response(existing)
        elif existing.finished:
            response = web.Response(
                status=existing.status or 200,
                body=existing.response_body or b"",
                content_type=None,
                headers={
                    "Content-Type": existing.response_headers.get(
                        "Content-Type", "application/json"
                    ),
                    "Gw-Message-Id": existing.message_id,
                },
            )
        else:
            raise MessageIdReused(f"message {auth.message_id} is still being processed")
        response.headers["Gw-Replayed"] = "true"
        return response

    def validate(self, service: Service, body: bytes, ctx: RequestContext) -> Any:
        started = time.perf_counter()
        self.check_shape(body)
        document = _json(body)
        service.request.validate(document, "request")
        ctx.timings["validate"] = (time.perf_counter() - started) * 1000
        ctx.mark("validated")
        return document

    async def record(
        self,
        request: web.Request,
        auth: Authenticated,
        service: Service,
        body: bytes,
        asynchronous: bool,
        ctx: RequestContext,
    ) -> MessageRecord:
        started = time.perf_counter()
        if asynchronous and self.outbox is not None and not self.outbox.accepting():
            raise Overloaded("the outbox is full; try again later", retry_after=5)
        record = await self.store.insert_message(
            self.new_message(request, auth, service, body, asynchronous, ctx)
        )
        ctx.recorded = True
        ctx.seq = record.seq
        ctx.timings["record"] = (time.perf_counter() - started) * 1000
        return record

    def new_message(
        self,
        request: web.Request,
        auth: Authenticated,
        service: Service,
        body: bytes,
        asynchronous: bool,
        ctx: RequestContext,
    ) -> NewMessage:
        return NewMessage(
            message_id=auth.message_id,
            client=auth.client,
            service=service.code,
            mode="async" if asynchronous else "sync",
            state=MessageState.ACCEPTED if asynchronous else MessageState.DELIVERING,
            request_headers=_recorded_request(request, auth),
            request_body=body,
            request_digest=auth.digest,
            target=request.headers.get("Gw-Target"),
            trace_id=trace_id_of(ctx.traceparent),
            next_attempt_at=self._clock() if asynchronous else None,
        )

    def check_shape(self, body: bytes) -> None:
        limits = self.security
        check_json_shape(body, max_depth=limits.max_json_depth, max_items=limits.max_json_items)

    def sign(self, request: web.Request, response: web.Response, ctx: RequestContext) -> None:
        """Sign any answer; bind it to the request's signature when there is one."""
        body = response.body if isinstance(response.body, bytes) else b""
        headers: CIMultiDict[str] = CIMultiDict(response.headers)
        if ctx.message_id and "Gw-Message-Id" not in headers:
            headers["Gw-Message-Id"] = ctx.message_id
        label = ctx.signature_label if "Signature" in request.headers else None
        try:
            target = self.target_uri(request)
        except GatewayError:  # the client left; an answer's base does not cover the target
            target = str(request.url)
        view = RequestView(request.method, target, request.headers)
        try:
            self.signer.sign_response(response.status, headers, body, view, label)
        except GatewayError:
            # The request's own Signature was unusable for ;req: sign without the binding.
            self.signer.sign_response(response.status, headers, body, view, None)
        response.headers.clear()
        response.headers.extend(headers)

    # Flows ---------------------------------------------------------------------------

    async def exchange(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        ctx: RequestContext = request[CTX_KEY]
        runtime = self.runtime.current
        code = request.match_info["service"]
        ctx.service = code
        known = runtime.services.get(code)
        limit = self.security.max_body_bytes
        if known is not None and known.config.max_body_bytes:
            limit = min(limit, known.config.max_body_bytes)
        body = await self.read_body(request, limit, ctx)
        auth = self.authenticate(request, body, runtime, ctx)
        await self.admit(auth)
        service = self.service_of(runtime, code)
        prefer = request.headers.get("Prefer", "").lower()
        asynchronous = service.config.mode == "async" or (
            service.config.allow_async and "respond-async" in prefer
        )
        if asynchronous:
            return await self._exchange(request, runtime, auth, service, body, True, ctx, started)
        # A synchronous exchange is recorded only when it ends: until then its id is held
        # here, before the replay check, so a twin either finds it held (409, as it found
        # an unfinished record) or, once released, finds it committed (a replay).
        key = (auth.client, auth.message_id)
        if key in self._in_flight:
            raise MessageIdReused(f"message {auth.message_id} is still being processed")
        self._in_flight.add(key)
        try:
            return await self._exchange(request, runtime, auth, service, body, False, ctx, started)
        finally:
            self._in_flight.discard(key)

    async def _exchange(
        self,
        request: web.Request,
        runtime: Runtime,
        auth: Authenticated,
        service: Service,
        body: bytes,
        asynchronous: bool,
        ctx: RequestContext,
        started: float,
    ) -> web.Response:
        replayed = await self.replay(request, auth, ctx)
        if replayed is not None:
            return replayed
        self.authorise(auth, service)
        self.validate(service, body, ctx)
        try:
            if not asynchronous:
                msg = self.new_message(request, auth, service, body, False, ctx)
                return await self.deliver_sync(runtime, service, msg, ctx, started)
            record = await self.record(request, auth, service, body, asynchronous, ctx)
        except DuplicateMessage:
            # A concurrent twin won the insert: answer as a replay.
            replayed = await self.replay(request, auth, ctx)
            if replayed is None:  # pragma: no cover - the twin's row exists by definition
                raise
            return replayed
        if self.outbox is not None:
            self.outbox.wake()
        return self.accepted_response(record)

    async def deliver_sync(
        self,
        runtime: Runtime,
        service: Service,
        msg: NewMessage,
        ctx: RequestContext,
        started: float,
    ) -> web.Response:
        """Call the upstream, then record the exchange with its outcome in one commit.

        A crash before that commit leaves no trace: the client's retry of the same
        message id is delivered again (receivers dedupe on it, PROTOCOL.md). The answer
        is sent only after the commit, so an answered exchange is always recorded."""
        received_at = time.time()
        adapter_name: str | None = None
        upstream_started = time.perf_counter()
        ctx.mark("upstream")
        try:
            adapter_name, answer = await call_adapter(
                runtime,
                service,
                exchange_of(accepted_record(msg, 0, received_at), service, ctx.traceparent),
            )
            ctx.timings["upstream"] = (time.perf_counter() - upstream_started) * 1000
            ctx.mark("answered")
            ctx.adapter = adapter_name
            validate_answer(service, answer)
        except GatewayError as exc:
            ctx.timings["upstream"] = (time.perf_counter() - upstream_started) * 1000
            ctx.timings["total"] = (time.perf_counter() - started) * 1000
            failed = Outcome(
                state=MessageState.FAILED,
                status=exc.status,
                code=exc.code,
                adapter=adapter_name,
                response_headers={"Content-Type": "application/problem+json"},
                response_body=json.dumps(problem_body(exc, msg.message_id)).encode(),
                error=exc.detail,
                timings=dict(ctx.timings),
            )
            await self._record_exchange(msg, failed, received_at, ctx)
            raise
        response = web.Response(
            status=200,
            body=answer.body,
            content_type=None,
            headers={"Content-Type": answer.content_type, "Gw-Message-Id": msg.message_id},
        )
        ctx.timings["total"] = (time.perf_counter() - started) * 1000
        answered = Outcome(
            state=MessageState.ANSWERED,
            status=200,
            code=None,
            adapter=adapter_name,
            response_headers={"Content-Type": answer.content_type},
            response_body=answer.body,
            timings=dict(ctx.timings),
        )
        await self._record_exchange(msg, answered, received_at, ctx)
        return response

    async def _record_exchange(
        self, msg: NewMessage, outcome: Outcome, received_at: float, ctx: RequestContext
    ) -> None:
        """The exchange's one commit. Its own time is a stage of the request (metrics,
        logs), not of the stored timings, which it writes."""
        started = time.perf_counter()
        ctx.seq = await self.store.record_exchange(msg, outcome, received_at=received_at)
        ctx.recorded = True
        ctx.timings["record"] = (time.perf_counter() - started) * 1000

    def accepted_response(self, record: MessageRecord) -> web.Response:
        state = record.state
        body = json.dumps({"message_id": record.message_id, "state": state}).encode()
        return web.Response(
            status=202,
            body=body,
            content_type=None,
            headers={
                "Content-Type": "application/json",
                "Location": f"/v1/messages/{record.message_id}",
                "Gw-Message-Id": record.message_id,
            },
        )

    async def message_status(self, request: web.Request) -> web.Response:
        """``GET /v1/messages/{id}``, readable only by the member that sent it and by the
        relay whose key vouched for it; to anyone else it does not exist (no probing)."""
        ctx: RequestContext = request[CTX_KEY]
        runtime = self.runtime.current
        message_id = request.match_info["id"].lower()
        unknown = f"no message {message_id} for this client"
        try:
            auth = self.authenticate(
                request, None, runtime, ctx, required=READ_COMPONENTS, read=True
            )
        except NotPermitted as exc:  # a relay that may not speak for the client
            raise MessageUnknown(unknown) from exc
        await self.admit(auth)
        record = await self.store.get_message(auth.client, message_id)
        if record is None or not self._may_read(auth, record):
            raise MessageUnknown(unknown)
        view: dict[str, Any] = {
            "message_id": record.message_id,
            "service": record.service,
            "client": record.client,
            "target": record.target,
            "state": record.state,
            "attempts": record.attempts,
            "created_at": iso_utc(record.created_at, millis=True),
            "updated_at": iso_utc(record.updated_at, millis=True),
        }
        if record.result is not None:
            view["result"] = _json_or_text(record.result)
        elif record.response_body is not None and record.status == 200:
            view["result"] = _json_or_text(record.response_body)
        if record.error:
            view["error"] = {"code": record.code, "detail": record.error}
        return web.json_response(view)

    @staticmethod
    def _may_read(auth: Authenticated, record: MessageRecord) -> bool:
        """The sender itself, or the relay that signed the message's last hop."""
        if not auth.via:
            return auth.signer.id == record.client
        relayed = record.via
        return bool(relayed) and relayed[-1] == auth.signer.id

    async def callback(self, request: web.Request) -> web.Response:
        """``POST /v1/callbacks/{service}`` from the national platform or a peer gateway.

        Taken only from the member the message was delivered to (recorded at delivery),
        speaking for itself, while the message awaits it; anyone else is answered as if
        the message did not exist. An identical repeat is 200 and changes nothing; a
        different decision after the final one is 409 (``supersede``: kept as history)."""
        ctx: RequestContext = request[CTX_KEY]
        runtime = self.runtime.current
        code = request.match_info["service"]
        ctx.service = code
        body = await self.read_body(request, self.security.max_body_bytes, ctx)
        auth = self.authenticate(
            request, body, runtime, ctx, required=(*REQUEST_COMPONENTS, "gw-correlation-id")
        )
        await self.admit(auth)
        if auth.signer.config.kind == "system":
            raise NotPermitted(f"{auth.signer.id} is not a platform or gateway")
        if auth.signer.id != auth.client:
            raise NotPermitted(f"{auth.signer.id} may not call back for {auth.client}")
        service = self.service_of(runtime, code)
        correlation = _message_id(_require(request.headers, "Gw-Correlation-Id"))
        seen = await self.store.get_callback(auth.client, auth.message_id)
        if seen is not None:
            if seen.digest != auth.digest or seen.correlation_id != correlation:
                raise MessageIdReused(
                    f"callback {auth.message_id} was already sent with another body"
                )
            return self._callback_ack(seen.message_id, correlation, "duplicate", replayed=True)
        if service.callback is None:
            raise ServiceUnknown(f"{code} takes no callbacks")
        self.check_shape(body)
        document = _json(body)
        service.callback.validate(document, "callback")
        ctx.mark("validated")
        original = await self._original(correlation, code, auth.client, runtime)
        new = NewCallback(
            message_id=auth.message_id,
            client=auth.client,
            correlation_id=correlation,
            original_seq=original.seq,
            service=code,
            headers=_recordable(request.headers),
            body=body,
            digest=auth.digest,
        )
        supersede = service.config.supersede
        for _ in range(2):  # once more when a concurrent transition moved the message first
            if original.state in ANSWERED_STATES:
                if await self._kept_decision(original) == auth.digest:
                    return self._callback_ack(
                        auth.message_id, correlation, "duplicate", replayed=True
                    )
                if not supersede:
                    raise CallbackConflict(
                        f"message {correlation} already has a different decision; it is kept"
                    )
            elif original.state not in AWAITING_CALLBACK:
                raise MessageUnknown(_UNAWAITED.format(service=code, id=correlation))
            try:
                inserted = await self.store.insert_callback(new, supersede=supersede)
            except DuplicateMessage:
                return self._callback_ack(auth.message_id, correlation, "duplicate")
            if inserted is not None:
                ctx.recorded = True
                if self.outbox is not None:
                    self.outbox.wake()
                return self._callback_ack(auth.message_id, correlation, "accepted")
            moved = await self.store.get_message_by_seq(original.seq)
            if moved is None:  # pragma: no cover - messages are never deleted
                break
            original = moved
        raise CallbackEarly(f"message {correlation} is changing state; retry", retry_after=1)

    async def _original(
        self, correlation: str, service: str, caller: str, runtime: Runtime
    ) -> MessageRecord:
        """The asynchronous message ``caller`` may call back for: the one delivered to it.

        Before its delivery is committed (the receiver may answer and call back at once),
        the member it is being delivered to is told to retry (503, Retry-After); everyone
        else, for every message, gets what an unknown id gets."""
        found = [
            m
            for m in await self.store.find_by_message_id(correlation)
            if m.service == service and m.mode == "async"
        ]
        mine: list[MessageRecord] = []
        for record in found:
            if record.state in IN_DELIVERY:
                if (record.receiver or intended_receiver(runtime, record)) == caller:
                    raise CallbackEarly(
                        f"message {correlation} is still being delivered; retry", retry_after=1
                    )
            elif record.receiver == caller:
                mine.append(record)
        if len(mine) > 1:
            # Message ids are unique per sender only: two senders' messages with one id sent
            # to one receiver cannot be told apart by its callback. Taking either would hand
            # one sender's decision to the other, so neither is taken (docs/security.md).
            log.warning(
                "callback for %s refused: %d messages with that id were sent to %s",
                correlation, len(mine), caller,
                extra={"event": "callback_ambiguous", "correlation_id": correlation},
            )  # fmt: skip
            raise CallbackConflict(
                f"message id {correlation} names more than one message sent to {caller}"
            )
        if mine:
            return mine[0]
        raise MessageUnknown(_UNAWAITED.format(service=service, id=correlation))

    async def _kept_decision(self, original: MessageRecord) -> str | None:
        """The digest of the message's current decision (the latest callback kept)."""
        decisions = await self.store.callbacks_of(original.seq)
        return decisions[-1].digest if decisions else None

    @staticmethod
    def _callback_ack(
        message_id: str, correlation: str, state: str, *, replayed: bool = False
    ) -> web.Response:
        headers = {"Gw-Message-Id": message_id}
        if replayed:
            headers["Gw-Replayed"] = "true"
        return web.json_response(
            {"message_id": message_id, "correlation_id": correlation, "state": state},
            headers=headers,
        )


def _authority(url: str) -> str:
    """``https://gw.example:8443/x`` → ``gw.example:8443`` (lowercase), as a Host header."""
    return url.split("://", 1)[-1].split("/", 1)[0].lower()


def _bound_origin(request: web.Request) -> str:
    """``scheme://host:port`` of the socket the request arrived on (the listener's own
    bound address), the default port omitted as clients write it."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        raise MalformedRequest("the connection closed before the request was read")
    host, port = str(sockname[0]), int(sockname[1])
    scheme = request.scheme
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + ("" if port == default else f":{port}")


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data.decode("utf-8", "replace")
