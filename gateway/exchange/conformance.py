"""The conformance kit (``gateway conformance``): is a member's integration right?

Run by a member's developer against a gateway or the sandbox with the member's own key(s)
and no admin rights. Each check names the PROTOCOL.md clause it tests; the result is a
pass/fail/skip line per check and a JSON report, and any failure fails the run:

- ``discovery``: the signed self-service reads answer, signed by the gateway;
- ``roundtrip.<alg>``, ``digest.<alg>``: a signed sync exchange per key and per digest;
- ``idempotency``, ``error.409``, ``error.401``, ``error.403``, ``error.422``, ``error.503``,
  ``error.429``: each error a member's system must handle, provoked without admin rights
  (503 needs a service the gateway lists as unavailable, 429 a rate limit: the sandbox
  config gives both, docs/members.md says how);
- ``async.callback``: an asynchronous exchange whose callback the kit receives at the
  member's callback URL, checked as the member's system must check it
  (``CallbackVerifier``);
- with ``--callback-url``: a tampered, the genuine and a replayed copy of that callback
  sent to the member's own endpoint, which must refuse the first and the last.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import jsonschema
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.crypto.keys import KeyPair, VerificationKey
from gateway.errors import GatewayError, KeyUnknown, MalformedRequest, SignatureInvalid
from gateway.exchange.client import ExchangeClient, Reply, verify_reply
from gateway.signing import (
    REQUEST_COMPONENTS,
    RequestView,
    Signer,
    VerifiedSignature,
    Verifier,
    check_content_digest,
    parse_signature_input,
)

__all__ = ["CallbackVerifier", "Check", "KitOptions", "Report", "parse_jwks", "run_kit"]

Status = Literal["pass", "fail", "skip"]

SELF_SERVICE = "PROTOCOL.md «Member self-service»"
SIGNATURES = "PROTOCOL.md «Ingress API», signature rules"
SYNC = "PROTOCOL.md «Ingress API», outcomes: sync"
SAME_ID = "PROTOCOL.md «Ingress API», outcomes: same message id again"
ASYNC = "PROTOCOL.md «Ingress API», outcomes: async; «Callbacks»"
ERRORS = "PROTOCOL.md «Errors»"
SPEAKS = "PROTOCOL.md «Trust rules»: a member speaks only for itself"
CALLBACKS = "PROTOCOL.md «Callbacks»: receivers verify the gateway's signature and dedupe"
WELL_KNOWN = "PROTOCOL.md «Well-known endpoints»"
PROBLEM_FIELDS = ("type", "title", "status", "detail", "code")
CALLBACK_COMPONENTS = (*REQUEST_COMPONENTS, "gw-correlation-id")
DIGESTS = ("sha-256", "sha-512", "sm3")
_FORWARDED = (
    "Content-Type",
    "Content-Digest",
    "Gw-Client",
    "Gw-Message-Id",
    "Gw-Correlation-Id",
    "Signature-Input",
    "Signature",
    "traceparent",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    id: str
    clause: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():4}  {self.id:<18} {self.clause}: {self.detail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class KitOptions:
    url: str
    client: str
    keys: tuple[KeyPair, ...]
    callback_url: str | None = None  # the member's own callback endpoint, to attack
    receiver: tuple[str, int] | None = None  # where the kit listens (else its callback URL)
    gateway_jwks: tuple[Mapping[str, Any], ...] = ()  # pinned; else fetched
    timeout_s: float = 30.0


@dataclass(slots=True, kw_only=True)
class Report:
    url: str
    client: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        counts = {s: sum(c.status == s for c in self.checks) for s in ("pass", "fail", "skip")}
        return {
            "url": self.url,
            "client": self.client,
            "ok": self.ok,
            **{f"{k}ed" if k != "skip" else "skipped": v for k, v in counts.items()},
            "checks": [asdict(c) for c in self.checks],
        }


class CallbackVerifier:
    """What a member's callback endpoint must do with each POST, as a function to copy:
    verify the gateway's RFC 9421 signature over the URL the gateway has on record for
    the member (not the Host header), the components a callback covers, its freshness
    and Content-Digest, and refuse a signature seen before (a replay: each genuine
    attempt is signed afresh with a new nonce). Deduping on ``Gw-Message-Id`` is then
    the receiver's business logic."""

    def __init__(
        self,
        keys: Mapping[str, VerificationKey],
        *,
        skew_s: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.skew_s = skew_s
        self._clock = clock
        self._verifier = Verifier(skew_s=skew_s, clock=clock)
        self._seen: dict[str, float] = {}  # signature token → when it stops being fresh

    def verify(
        self, url: str, headers: CIMultiDictProxy[str] | CIMultiDict[str], body: bytes
    ) -> VerifiedSignature:
        sig = parse_signature_input(headers)
        key = self.keys.get(sig.keyid)
        if key is None:
            raise KeyUnknown(f"key {sig.keyid!r} is not one of the gateway's")
        verified = self._verifier.verify(
            RequestView("POST", url, headers), sig, key, required=CALLBACK_COMPONENTS
        )
        check_content_digest(headers.get("Content-Digest", ""), body)
        now = self._clock()
        self._seen = {k: v for k, v in self._seen.items() if v > now}
        token = f"{sig.keyid} {verified.nonce or headers.get('Signature', '')}"
        if token in self._seen:
            raise SignatureInvalid("replayed: this signature was already received")
        self._seen[token] = verified.created + 2 * self.skew_s
        return verified


@dataclass(slots=True)
class _Received:
    url: str
    headers: CIMultiDict[str]
    body: bytes
    error: str | None


class _Receiver:
    """The kit's stand-in for the member's callback endpoint (any path)."""

    def __init__(self, public_url: str, verifier: CallbackVerifier) -> None:
        self.public_url = public_url
        self.verifier = verifier
        self.received: list[_Received] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        service = request.match_info.get("tail", "").rsplit("/", 1)[-1]
        url = self.public_url.replace("{service}", service)
        headers = CIMultiDict(request.headers)
        try:
            self.verifier.verify(url, headers, body)
        except GatewayError as exc:
            self.received.append(_Received(url, headers, body, f"{exc.code}: {exc.detail}"))
            return web.json_response({"code": exc.code, "detail": exc.detail}, status=401)
        self.received.append(_Received(url, headers, body, None))
        return web.json_response({"received": headers.get("Gw-Message-Id")})


def _example(schema: Any) -> Any:
    if isinstance(schema, Mapping):
        examples = schema.get("examples")
        if isinstance(examples, list) and examples:
            return examples[0]
    return None


def _invalid_for(schema: Any) -> Any:
    """A JSON document the schema refuses (found locally, before it is sent)."""
    validator = jsonschema.Draft202012Validator(schema)
    candidates: list[Any] = [[], {}, "", 0, None, {"conformance": "kit"}]
    example = _example(schema)
    if isinstance(example, dict) and example:
        first = next(iter(example))
        broken = dict(example)
        broken.pop(first)
        candidates.insert(0, broken)
    return next((c for c in candidates if not validator.is_valid(c)), ...)


def _tamper(body: bytes) -> bytes:
    """The same document with its first string value changed (a different decision)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body + b" "

    def change(node: Any) -> bool:
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else ()
        )
        for key, value in list(items):
            if isinstance(value, str):
                node[key] = value + "-tampered"
                return True
            if change(value):
                return True
        return False

    if not change(doc):
        return body + b" "
    return json.dumps(doc, ensure_ascii=False).encode()


class _Kit:
    def __init__(self, options: KitOptions, session: aiohttp.ClientSession) -> None:
        self.o = options
        self.session = session
        self.report = Report(url=options.url, client=options.client)
        self.clients = [
            ExchangeClient(
                member_id=options.client,
                signer=Signer(pair, label="sig1"),
                base_url=options.url,
                session=session,
            )
            for pair in options.keys
        ]
        self.gateway_keys: dict[str, VerificationKey] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.details: dict[str, dict[str, Any]] = {}
        self.me: dict[str, Any] = {}
        self.genuine: _Received | None = None

    # Plumbing -------------------------------------------------------------------------

    def add(self, check_id: str, clause: str, status: Status, detail: str) -> None:
        self.report.checks.append(Check(id=check_id, clause=clause, status=status, detail=detail))

    @property
    def main(self) -> ExchangeClient:
        return self.clients[0]

    def signed(self, reply: Reply) -> str | None:
        """Why the gateway's signature on ``reply`` does not hold, or None."""
        try:
            verify_reply(reply, self.gateway_keys)
        except KeyError as exc:
            return f"the answer is signed with unknown key {exc}"
        except GatewayError as exc:
            return f"the answer's signature does not verify: {exc.detail}"
        return None

    async def get(self, path: str, client: ExchangeClient | None = None) -> Reply:
        return await (client or self.main).request("GET", path, message_id=str(uuid.uuid4()))

    def problem(self, reply: Reply, status: int, codes: Sequence[str]) -> str | None:
        """Why ``reply`` is not the signed RFC 9457 problem expected, or None."""
        if reply.status != status:
            return f"expected {status}, got {reply.status}: {reply.body[:200]!r}"
        ctype = reply.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype != "application/problem+json":
            return f"expected application/problem+json, got {ctype or 'no Content-Type'}"
        try:
            body = reply.json()
        except ValueError:
            return "the problem is not JSON"
        missing = [f for f in PROBLEM_FIELDS if f not in body]
        if missing:
            return f"the problem lacks {', '.join(missing)}"
        if body["code"] not in codes:
            return f"expected code {' or '.join(codes)}, got {body['code']}"
        return self.signed(reply)

    async def guarded(
        self, check_id: str, clause: str, step: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            await step()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.add(check_id, clause, "fail", f"could not reach the gateway: {exc!r}")
        except GatewayError as exc:
            self.add(check_id, clause, "fail", exc.detail)
        except (ValueError, KeyError, TypeError, jsonschema.SchemaError) as exc:
            # The gateway answered something the protocol does not describe.
            self.add(check_id, clause, "fail", f"unexpected answer: {exc!r}")

    # Checks ---------------------------------------------------------------------------

    async def keys(self) -> bool:
        if self.o.gateway_jwks:
            found = [VerificationKey.from_jwk(j) for j in self.o.gateway_jwks]
            self.gateway_keys = {k.kid: k for k in found}
            self.add("gateway.crypto.keys", WELL_KNOWN, "pass", f"{len(found)} pinned key(s)")
            return True
        async with self.session.get(self.main.url_for("/.well-known/jwks.json")) as resp:
            data = await resp.json(content_type=None) if resp.status == 200 else None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            self.add("gateway.crypto.keys", WELL_KNOWN, "fail", "no JWKS at /.well-known/jwks.json")
            return False
        found = [VerificationKey.from_jwk(j) for j in data["keys"]]
        self.gateway_keys = {k.kid: k for k in found}
        self.add(
            "gateway.crypto.keys",
            WELL_KNOWN,
            "pass",
            f"{len(found)} key(s) fetched from /.well-known/jwks.json (pin them in "
            "production: --gateway-jwks)",
        )
        return True

    async def discovery(self) -> bool:
        listing = await self.get("/v1/meta/services")
        why = self.signed(listing) if listing.status == 200 else f"HTTP {listing.status}"
        if why is None:
            self.services = {s["code"]: s for s in listing.json()["services"]}
            members = await self.get("/v1/meta/members")
            why = self.signed(members) if members.status == 200 else f"HTTP {members.status}"
            if why is None:
                mine = [m for m in members.json()["members"] if m.get("self")]
                self.me = mine[0] if mine else {}
        if why is None:
            for code in self.services:
                detail = await self.get(f"/v1/meta/services/{code}")
                why = self.signed(detail) if detail.status == 200 else f"{code}: {detail.status}"
                if why is not None:
                    break
                self.details[code] = detail.json()
        if why is not None:
            self.add("discovery", SELF_SERVICE, "fail", why)
            return False
        self.add(
            "discovery",
            SELF_SERVICE,
            "pass",
            f"{len(self.services)} service(s) you may call: {', '.join(sorted(self.services))}",
        )
        return True

    def pick(self, *, asynchronous: bool) -> tuple[str, Any] | None:
        for code, summary in sorted(self.services.items()):
            if not summary.get("available", True):
                continue
            if asynchronous and not (summary.get("allow_async") and summary.get("callback")):
                continue
            if not asynchronous and summary["mode"] != "sync":
                continue
            example = _example(self.details.get(code, {}).get("schemas", {}).get("request"))
            if example is not None:
                return code, example
        return None

    async def roundtrips(self) -> tuple[str, Any, str] | None:
        picked = self.pick(asynchronous=False)
        if picked is None:
            self.add("roundtrip", SYNC, "fail", "no available sync service with an example")
            return None
        code, example = picked
        first: tuple[str, Any, str] | None = None
        for client in self.clients:
            alg = client.signer.algorithm
            message_id = str(uuid.uuid4())
            reply = await client.exchange(code, example, message_id=message_id)
            why = self.signed(reply) if reply.status == 200 else None
            if reply.status != 200:
                why = f"{code}: HTTP {reply.status} {reply.body[:200]!r}"
            if why is None:
                response = self.details[code]["schemas"]["response"]
                errors = list(jsonschema.Draft202012Validator(response).iter_errors(reply.json()))
                why = (
                    f"the answer breaks the response schema: {errors[0].message}"
                    if errors
                    else None
                )
            self.add(
                f"roundtrip.{alg}",
                f"{SYNC}; {SIGNATURES}",
                "fail" if why else "pass",
                why or f"{code} signed with {alg} (kid {client.signer.kid}), answer verified",
            )
            if why is None and first is None:
                first = (code, example, message_id)
        pair = self.o.keys[0]
        used = self.main.signer.digest
        for digest in (d for d in DIGESTS if d != used):
            client = ExchangeClient(
                member_id=self.o.client,
                signer=Signer(pair, label="sig1", digest=digest),
                base_url=self.o.url,
                session=self.session,
            )
            reply = await client.exchange(code, example)
            why = self.signed(reply) if reply.status == 200 else f"HTTP {reply.status}"
            self.add(
                f"digest.{digest}",
                SIGNATURES,
                "fail" if why else "pass",
                why or f"Content-Digest {digest} accepted",
            )
        return first

    async def same_id(self, code: str, example: Any, message_id: str) -> None:
        again = await self.main.exchange(code, example, message_id=message_id)
        why = self.signed(again) if again.status == 200 else f"HTTP {again.status}"
        if why is None and again.headers.get("Gw-Replayed") != "true":
            why = "a repeat with the same body is not marked Gw-Replayed: true"
        self.add("idempotency", SAME_ID, "fail" if why else "pass", why or "stored outcome again")
        other = await self.main.exchange(
            code, {"conformance": "another body"}, message_id=message_id
        )
        why = self.problem(other, 409, ("message_id_reused",))
        self.add("error.409", SAME_ID, "fail" if why else "pass", why or "409 message_id_reused")

    async def unauthenticated(self, code: str, example: Any) -> None:
        url, headers, data = self.main.prepare("POST", f"/v1/exchange/{code}", example)
        raw = headers["Signature"]
        name, _, value = raw.partition("=:")
        flipped = ("A" if value[:1] != "A" else "B") + value[1:]
        headers["Signature"] = f"{name}=:{flipped}"
        async with self.session.post(url, data=data, headers=headers) as resp:
            reply = Reply(
                resp.status, resp.headers, await resp.read(), RequestView("POST", url, headers)
            )
        why = self.problem(reply, 401, ("signature_invalid",))
        if why is None:
            bare = CIMultiDict(headers)
            for name_ in ("Signature", "Signature-Input"):
                bare.popall(name_)
            async with self.session.post(url, data=data, headers=bare) as resp:
                body = await resp.read()
                why = (
                    None
                    if resp.status == 401 and b"signature_missing" in body
                    else (f"an unsigned request got {resp.status}")
                )
        self.add(
            "error.401",
            f"{ERRORS}; {SIGNATURES}",
            "fail" if why else "pass",
            why or "a forged signature is 401 signature_invalid, none is 401 signature_missing",
        )

    async def forbidden(self, code: str, example: Any) -> None:
        # Naming another member as the client, with ourselves as the relay: a system may
        # never vouch for anyone (403 forbidden), whatever the ACL.
        if self.me.get("kind", "system") != "system":
            self.add(
                "error.403",
                f"{ERRORS}; {SPEAKS}",
                "skip",
                "you are a relay: the probe is a system's",
            )
            return
        probe = f"{self.o.client.split(':', 1)[0]}:conformance-probe"
        client = ExchangeClient(
            member_id=probe, signer=self.main.signer, base_url=self.o.url, session=self.session
        )
        reply = await client.exchange(code, example, headers={"Gw-Via": self.o.client})
        why = self.problem(reply, 403, ("forbidden",))
        self.add(
            "error.403",
            f"{ERRORS}; {SPEAKS}",
            "fail" if why else "pass",
            why or "speaking for another member is 403 forbidden",
        )

    async def invalid(self, code: str) -> None:
        schema = self.details[code]["schemas"]["request"]
        document = _invalid_for(schema)
        if document is ...:
            self.add("error.422", ERRORS, "skip", f"{code}'s request schema refuses nothing")
            return
        reply = await self.main.exchange(code, document)
        why = self.problem(reply, 422, ("schema_invalid",))
        if why is None:
            errors = reply.json().get("errors")
            ok = isinstance(errors, list) and errors and all("pointer" in e for e in errors)
            why = None if ok else "a 422 without errors[] pointers"
        self.add(
            "error.422",
            ERRORS,
            "fail" if why else "pass",
            why or "422 schema_invalid with errors[]",
        )

    async def unavailable(self) -> None:
        down = [
            code
            for code, s in sorted(self.services.items())
            if not s.get("available", True)
            and _example(self.details.get(code, {}).get("schemas", {}).get("request")) is not None
        ]
        if not down:
            self.add(
                "error.503",
                ERRORS,
                "skip",
                "every service offered to you is available (the sandbox lists one that is not)",
            )
            return
        code = down[0]
        example = _example(self.details[code]["schemas"]["request"])
        reply = await self.main.exchange(code, example)
        why = self.problem(reply, 503, ("adapter_unavailable", "overloaded"))
        if why is None and not reply.headers.get("Retry-After", "").isdigit():
            why = "a 503 without Retry-After"
        self.add(
            "error.503",
            ERRORS,
            "fail" if why else "pass",
            why or f"{code}: 503 with Retry-After {reply.headers['Retry-After']} s",
        )

    async def rate_limited(self) -> None:
        limits = [s["rate_limit"] for s in self.services.values() if s.get("rate_limit")]
        if not limits:
            self.add("error.429", ERRORS, "skip", "the gateway sets no rate limit for you")
            return
        limit = limits[0]
        budget = int(limit["burst"] + 3 * limit["rate_per_s"] + 20)
        found: list[Reply] = []

        async def one() -> None:
            if found:
                return
            reply = await self.get("/v1/meta/services")
            if reply.status == 429:
                found.append(reply)

        for start in range(0, budget, 16):
            await asyncio.gather(*(one() for _ in range(min(16, budget - start))))
            if found:
                break
        if not found:
            self.add("error.429", ERRORS, "fail", f"{budget} requests in a burst, no 429")
            return
        reply = found[0]
        why = self.problem(reply, 429, ("rate_limited",))
        retry = reply.headers.get("Retry-After", "")
        if why is None and not (retry.isdigit() and int(retry) >= 1):
            why = f"a 429 without a usable Retry-After ({retry!r})"
        self.add(
            "error.429", ERRORS, "fail" if why else "pass", why or f"429 with Retry-After {retry} s"
        )

    async def asynchronous(self) -> None:
        public = self.me.get("callback_url")
        picked = self.pick(asynchronous=True)
        if picked is None:
            self.add("async.callback", ASYNC, "skip", "no asynchronous service with callbacks")
            return
        if not public:
            self.add("async.callback", ASYNC, "fail", "the gateway has no callback URL for you")
            return
        code, example = picked
        receiver = _Receiver(public, CallbackVerifier(self.gateway_keys))
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        parsed = URL(public.replace("{service}", code))
        host, port = self.o.receiver or (parsed.host or "127.0.0.1", parsed.port or 80)
        try:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as exc:
                self.add(
                    "async.callback",
                    ASYNC,
                    "fail",
                    f"cannot listen on {host}:{port} for your callback URL {public} ({exc}); "
                    "stop your system's receiver there or give --receiver HOST:PORT",
                )
                return
            await self._exchange_and_wait(code, example, receiver)
        finally:
            await runner.cleanup()

    async def _exchange_and_wait(self, code: str, example: Any, receiver: _Receiver) -> None:
        message_id = str(uuid.uuid4())
        headers = {} if self.services[code]["mode"] == "async" else {"Prefer": "respond-async"}
        reply = await self.main.exchange(code, example, message_id=message_id, headers=headers)
        why = self.signed(reply) if reply.status == 202 else f"expected 202, got {reply.status}"
        if why is None and reply.headers.get("Location") != f"/v1/messages/{message_id}":
            why = f"202 without Location /v1/messages/{message_id}"
        if why is not None:
            self.add("async.callback", ASYNC, "fail", why)
            return
        deadline = time.monotonic() + self.o.timeout_s
        mine: list[_Received] = []
        while time.monotonic() < deadline:
            mine = [
                r for r in receiver.received if r.headers.get("Gw-Correlation-Id") == message_id
            ]
            if any(r.error is None for r in mine):
                break
            await asyncio.sleep(0.1)
        good = next((r for r in mine if r.error is None), None)
        if good is None:
            errors = "; ".join(r.error or "" for r in mine) or "nothing arrived"
            self.add(
                "async.callback",
                ASYNC,
                "fail",
                f"no verified callback in {self.o.timeout_s:g} s: {errors}",
            )
            return
        schema = self.details[code]["schemas"].get("callback", True)
        problems = list(jsonschema.Draft202012Validator(schema).iter_errors(json.loads(good.body)))
        if problems:
            self.add(
                "async.callback",
                ASYNC,
                "fail",
                f"the callback breaks its schema: {problems[0].message}",
            )
            return
        status = await self.main.status(message_id)
        why = self.signed(status) if status.status == 200 else f"status read: HTTP {status.status}"
        self.genuine = good
        self.add(
            "async.callback",
            ASYNC,
            "fail" if why else "pass",
            why
            or f"{code}: 202, then a callback signed by {good.headers.get('Gw-Client')} verified "
            f"at {good.url}; status {status.json().get('state')}",
        )

    async def attack(self, target: str) -> None:
        clause = CALLBACKS
        if self.genuine is None:
            for name in ("callback.tampered", "callback.genuine", "callback.replayed"):
                self.add(name, clause, "fail", "no genuine callback was captured to send")
            return
        headers = {k: self.genuine.headers[k] for k in _FORWARDED if k in self.genuine.headers}
        body = self.genuine.body
        url = target.replace("{service}", URL(self.genuine.url).path.rsplit("/", 1)[-1])

        async def post(data: bytes) -> int:
            async with self.session.post(
                url, data=data, headers=headers, allow_redirects=False
            ) as r:
                await r.read()
                return r.status

        tampered = await post(_tamper(body))
        self.add(
            "callback.tampered",
            clause,
            "pass" if tampered >= 400 else "fail",
            f"your endpoint answered {tampered} to a callback whose body was changed"
            + (
                ""
                if tampered >= 400
                else " (it must refuse it: check Content-Digest and the signature)"
            ),
        )
        genuine = await post(body)
        self.add(
            "callback.genuine",
            clause,
            "pass" if 200 <= genuine < 300 else "fail",
            f"your endpoint answered {genuine} to the genuine callback"
            + (
                ""
                if 200 <= genuine < 300
                else " (verify @target-uri against your public callback URL)"
            ),
        )
        replayed = await post(body)
        self.add(
            "callback.replayed",
            clause,
            "pass" if replayed >= 400 else "fail",
            f"your endpoint answered {replayed} to the same signed callback again"
            + ("" if replayed >= 400 else " (it must refuse a signature it has seen)"),
        )


async def run_kit(options: KitOptions) -> Report:
    """Every check, in an order that spends the rate limit last."""
    timeout = aiohttp.ClientTimeout(total=max(10.0, options.timeout_s))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        kit = _Kit(options, session)
        try:
            if not await kit.keys() or not await kit.discovery():
                return kit.report
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError,
                GatewayError) as exc:  # fmt: skip
            kit.add("discovery", SELF_SERVICE, "fail", f"could not talk to the gateway: {exc!r}")
            return kit.report
        first: tuple[str, Any, str] | None = None

        async def roundtrips() -> None:
            nonlocal first
            first = await kit.roundtrips()

        await kit.guarded("roundtrip", SYNC, roundtrips)
        if first is not None:
            code, example, message_id = first
            await kit.guarded(
                "idempotency", SAME_ID, lambda: kit.same_id(code, example, message_id)
            )
            await kit.guarded("error.401", ERRORS, lambda: kit.unauthenticated(code, example))
            await kit.guarded("error.403", ERRORS, lambda: kit.forbidden(code, example))
            await kit.guarded("error.422", ERRORS, lambda: kit.invalid(code))
        await kit.guarded("error.503", ERRORS, kit.unavailable)
        await kit.guarded("async.callback", ASYNC, kit.asynchronous)
        if options.callback_url:
            target = options.callback_url
            await kit.guarded("callback", CALLBACKS, lambda: kit.attack(target))
        await kit.guarded("error.429", ERRORS, kit.rate_limited)
        return kit.report


def parse_jwks(text: str) -> tuple[Mapping[str, Any], ...]:
    """A pinned JWKS (``{"keys": [...]}``) or a single JWK."""
    data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("keys"), list):
        return tuple(data["keys"])
    if isinstance(data, dict) and "kty" in data:
        return (data,)
    raise MalformedRequest("not a JWKS or a JWK")
