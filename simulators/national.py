"""The national government service platform, simulated as a small real aiohttp app.

Two entrances, one behaviour:
- ``POST /api/v1/exchange``: the platform's own envelope (``adapters/national.py``):
  ``{"service", "message_id", "client", "source_gateway", "target", "payload"}`` in,
  HTTP 200 ``{"code", "message", "data"?, "ticket"?}`` out;
- ``POST /api/exchange/{service}``: the bare document, for the generic ``http`` adapter.

Every request must be signed by a registered provincial gateway, and a gateway's key
relays only for its own region's clients: who sent it is the gateway whose key signed
(the directory's registry, or ``trusted`` for the gateway at ``callback_base``), never a
header; a ``Gw-Via`` chain must end with that gateway, and a relay carries the chain on
with the platform appended. ``credit.query``,
``enterprise.license.verify`` and ``evaluation.submit`` are answered at once, signed.
``crossregion.apply`` is acknowledged and, when the handling province's gateway is
registered, relayed to it (signed by the platform, vouching for the applicant); that
gateway's decision arrives on ``POST /api/v1/callbacks/{service}`` and is relayed back
to the gateway the application came from. Without a registered handling gateway, and
for ``supervision.report``, the platform answers by callback itself.
With a ``Publisher`` (``gateway/federation/directory.py``) it is also the federation's directory:
``GET /v1/directory`` serves the signed directory (``ETag``, ``If-None-Match`` → 304)
and ``POST /v1/directory/announce`` takes a registered gateway's announcement of its
keys and offered services, signed with a key the directory already lists for it. The
keys it then trusts for exchanges are the directory's as well as ``trusted``.
``POST /_control`` makes it fail on purpose for tests:
``{"mode": "ok" | "refuse" | "error" | "hang" | "slow", "delay_s": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from gateway.config.outbound import join, location_of
from gateway.crypto.keys import KeyPair, VerificationKey
from gateway.errors import DirectoryRefused, GatewayError
from gateway.exchange.client import ExchangeClient, verify_reply
from gateway.federation.directory import Publisher, etag_of
from gateway.signing import Signer, Verifier
from simulators.common import note, problem, signed_json, verify_request

__all__ = ["NationalPlatform", "create_national_app"]

log = logging.getLogger("simulators.national")
PLATFORM_ID = "100000:national-platform"


@dataclass(slots=True, kw_only=True)
class NationalPlatform:
    member_id: str
    keypair: KeyPair
    trusted: Mapping[str, VerificationKey]  # provincial gateways' keys by kid
    callback_base: str  # the (single) gateway to call back when none is recorded
    # The member id of the gateway at ``callback_base``, whose keys ``trusted`` are.
    callback_member: str = "330000:gateway"
    callback_delay_s: float = 0.5
    # Registered provincial gateways: region code → ingress base URL.
    provinces: dict[str, str] = field(default_factory=dict)
    mode: str = "ok"
    delay_s: float = 0.0
    received: list[str] = field(default_factory=list)
    callbacks_sent: list[str] = field(default_factory=list)
    traceparents: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)  # first Content-Digest algorithm of each
    # message id → (service, ingress of the gateway it came from), for relayed answers
    relays: dict[str, tuple[str, str]] = field(default_factory=dict)
    # What happened, hop by hop (the demo prints it)
    trail: list[dict[str, Any]] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)
    publisher: Publisher | None = None
    announcements: list[str] = field(default_factory=list)  # kids that signed them
    # Central monitoring (X-Road's): gateway member id → ingress URL, pulled on a timer;
    # the latest pull of each is served at GET /monitoring.
    monitored: dict[str, str] = field(default_factory=dict)
    monitor_every_s: float = 10.0
    monitoring: dict[str, dict[str, Any]] = field(default_factory=dict)

    def keys(self) -> dict[str, VerificationKey]:
        """Keys accepted on exchanges: ``trusted`` and every key the directory lists."""
        return {kid: key for kid, (key, _) in self.gateways().items()}

    def gateways(self) -> dict[str, tuple[VerificationKey, str]]:
        """Each accepted key by kid, with the gateway it belongs to."""
        found = {kid: (key, self.callback_member) for kid, key in self.trusted.items()}
        if self.publisher is not None:
            for entry in self.publisher.regions.values():
                member = str(entry["gateway"]["member_id"])
                for jwk in self.publisher.keys_of(member):
                    key = VerificationKey.from_jwk(jwk)
                    found[key.kid] = (key, member)
        return found


@dataclass(frozen=True, slots=True, kw_only=True)
class Admitted:
    """A request the platform takes: its body, and the relay chain that sent it, whose
    last hop is the gateway whose key signed (oldest first)."""

    body: bytes
    chain: tuple[str, ...]

    @property
    def gateway(self) -> str:
        return self.chain[-1]


NATIONAL = web.AppKey("national", NationalPlatform)
SESSION = web.AppKey("national_session", aiohttp.ClientSession)
TASKS: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("national_tasks")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _credit_record(doc: Mapping[str, Any]) -> dict[str, Any]:
    uscc = str(doc.get("uscc"))
    rating = "ABCD"[_seed(uscc) % 4]
    return {
        "uscc": uscc,
        "name": f"模拟企业{_seed(uscc) % 1000:03d}有限公司",
        "status": "active",
        "credit_rating": rating,
        "dishonest_entity": rating == "D",
        "administrative_penalties": [],
        "source": "national-credit-information-sharing-platform",
        "updated_at": _now(),
    }


def _license(doc: Mapping[str, Any]) -> dict[str, Any]:
    number = str(doc.get("license_number"))
    valid = not number.endswith("0")
    return {
        "license_number": number,
        "valid": valid,
        "status": "valid" if valid else "revoked",
        "issuer": "国家市场监督管理总局电子营业执照系统 (simulated)",
        "valid_until": "2046-11-25",
        "checked_at": _now(),
    }


def _evaluation(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "evaluation_id": f"HCP{_seed(json.dumps(doc, sort_keys=True)) % 10**12:012d}",
        "recorded_at": _now(),
        "follow_up_required": int(doc.get("grade", 5)) <= 2,
    }


def _decision(doc: Mapping[str, Any], message_id: str) -> dict[str, Any]:
    return {
        "decision": "approved",
        "case_number": f"CR{message_id.replace('-', '')[:20].upper()}",
        "handling_region": doc.get("handling_region", "440000"),
        "decided_at": _now(),
        "reason": "材料齐全，符合法定形式，予以办理",
    }


def _filing(message_id: str) -> dict[str, Any]:
    return {
        "record_number": f"JG{message_id.replace('-', '')[:16].upper()}",
        "filed_at": _now(),
        "status": "filed",
    }


SYNC_ANSWERS = {
    "credit.query": _credit_record,
    "enterprise.license.verify": _license,
    "evaluation.submit": _evaluation,
}


async def _refuse_or_delay(request: web.Request, sim: NationalPlatform) -> web.Response | None:
    if sim.mode == "refuse":
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=503)
    if sim.mode == "hang":
        await asyncio.sleep(3600)
    if sim.mode == "slow":
        await asyncio.sleep(sim.delay_s)
    return None


async def _verified(
    request: web.Request, sim: NationalPlatform
) -> tuple[bytes, str, str] | web.Response:
    """(body, kid, gateway member id) of a request signed by a registered gateway."""
    gateways = sim.gateways()
    try:
        body, kid = await verify_request(
            request,
            {k: key for k, (key, _) in gateways.items()},
            Verifier(),
            also=("gw-client", *(("gw-via",) if "Gw-Via" in request.headers else ())),
        )
    except (GatewayError, web.HTTPUnauthorized, KeyError) as exc:
        return problem(401, "signature_invalid", str(exc))
    if sim.mode == "error":
        return problem(500, "internal", "simulated failure")
    sim.received.append(request.headers["Gw-Message-Id"])
    sim.traceparents.append(request.headers.get("traceparent", ""))
    sim.digests.append(request.headers["Content-Digest"].split("=", 1)[0])
    member = gateways[kid][1]
    note(sim.trail, f"{member} → national platform", f"gateway signature, kid {kid}")
    return body, kid, member


def _handle(
    app: web.Application, service: str, message_id: str, doc: Any, came: Admitted, client: str
) -> tuple[dict[str, Any] | None, str | None]:
    """(result, None) for an immediate answer, (None, ticket) when it will call back."""
    sim = app[NATIONAL]
    source = _source_of(came.gateway, sim)
    if service in SYNC_ANSWERS:
        return SYNC_ANSWERS[service](doc), None
    if service == "crossregion.apply":
        region = str(doc.get("handling_region", ""))
        sim.relays[message_id] = (service, source)
        if region in sim.provinces and sim.provinces[region] != source:
            target = sim.provinces[region]
            _spawn(app, _relay(app, service, message_id, doc, client, target, came.chain))
        else:
            _spawn(app, _call_back(app, service, message_id, _decision(doc, message_id), source))
        return None, f"NP-{message_id}"
    if service == "supervision.report":
        _spawn(app, _call_back(app, service, message_id, _filing(message_id), source))
        return None, f"NP-{message_id}"
    raise KeyError(service)


def _source_of(gateway: str, sim: NationalPlatform) -> str:
    """The ingress of the gateway whose key signed: by its region, else the default."""
    return sim.provinces.get(gateway.split(":", 1)[0], sim.callback_base)


def _region_within(region: str, area: str) -> bool:
    """``region`` is ``area`` or one of its cities or counties (GB/T 2260)."""
    digits = 2 if area.endswith("0000") else 4 if area.endswith("00") else 6
    return region == area or (area != "100000" and region[:digits] == area[:digits])


async def _admit(request: web.Request, sim: NationalPlatform) -> Admitted | web.Response:
    """A request the platform takes, or the answer refusing it: a gateway's key speaks
    only for its own region's clients, and a chain it sends must end with itself."""
    refused = await _refuse_or_delay(request, sim)
    if refused is not None:
        return refused
    checked = await _verified(request, sim)
    if isinstance(checked, web.Response):
        return checked
    body, _, gateway = checked
    client = request.headers.get("Gw-Client", "")
    region = gateway.split(":", 1)[0]
    if not _region_within(client.split(":", 1)[0], region):
        return problem(403, "forbidden", f"{gateway} may not speak for {client or 'no client'}")
    via = request.headers.get("Gw-Via", "")
    chain = tuple(h.strip() for h in via.split(",")) if via.strip() else (gateway,)
    if chain[-1] != gateway:
        return problem(403, "forbidden", f"the relay chain must end with the signer {gateway}")
    return Admitted(body=body, chain=chain)


async def _exchange_envelope(request: web.Request) -> web.StreamResponse:
    sim = request.app[NATIONAL]
    admitted = await _admit(request, sim)
    if isinstance(admitted, web.Response):
        return admitted
    body = admitted.body
    signer = Signer(sim.keypair)
    try:
        envelope = json.loads(body)
        service, message_id = str(envelope["service"]), str(envelope["message_id"])
        payload = envelope["payload"]
    except (ValueError, KeyError, TypeError):
        return signed_json(request, signer, 200, {"code": "E400", "message": "bad envelope"})
    try:
        client = str(envelope["client"])
        if client != request.headers.get("Gw-Client"):
            reply = {"code": "E403", "message": "the envelope's client is not Gw-Client"}
            return signed_json(request, signer, 200, reply)
        result, ticket = _handle(request.app, service, message_id, payload, admitted, client)
    except KeyError:
        return signed_json(request, signer, 200, {"code": "E404", "message": f"no {service}"})
    if ticket is not None:
        return signed_json(
            request, signer, 200, {"code": "0", "message": "accepted", "ticket": ticket}
        )
    return signed_json(request, signer, 200, {"code": "0", "message": "ok", "data": result})


async def _exchange_bare(request: web.Request) -> web.StreamResponse:
    sim = request.app[NATIONAL]
    admitted = await _admit(request, sim)
    if isinstance(admitted, web.Response):
        return admitted
    body = admitted.body
    service = request.match_info["service"]
    message_id = request.headers["Gw-Message-Id"]
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return problem(400, "malformed_request", "not JSON")
    try:
        result, ticket = _handle(
            request.app,
            service,
            message_id,
            doc,
            admitted,
            request.headers["Gw-Client"],
        )
    except KeyError:
        return problem(404, "service_unknown", f"the national platform has no {service}")
    if ticket is not None:
        return signed_json(request, Signer(sim.keypair), 202, {"accepted": True, "ticket": ticket})
    return signed_json(request, Signer(sim.keypair), 200, result)


async def _callback_in(request: web.Request) -> web.StreamResponse:
    """A handling province's decision: relay it to the gateway the application came from."""
    sim = request.app[NATIONAL]
    checked = await _verified(request, sim)
    if isinstance(checked, web.Response):
        return checked
    body = checked[0]
    correlation = request.headers.get("Gw-Correlation-Id", "")
    if correlation not in sim.relays:
        return problem(404, "message_unknown", f"no relayed application {correlation}")
    service, source = sim.relays[correlation]
    _spawn(request.app, _call_back(request.app, service, correlation, json.loads(body), source, 0))
    return web.json_response({"received": request.headers["Gw-Message-Id"]})


def _name(sim: NationalPlatform, url: str) -> str:
    regions = [region for region, base in sim.provinces.items() if base == url]
    return f"{regions[0]}:gateway" if regions else url


def _spawn(app: web.Application, work: Any) -> None:
    task = asyncio.create_task(work)
    app[TASKS].add(task)
    task.add_done_callback(app[TASKS].discard)


def _signed_headers(
    sim: NationalPlatform, url: str, body: bytes, extra: dict[str, str]
) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json", **extra})
    Signer(sim.keypair).sign_request("POST", url, headers, body)
    return headers


async def _post_until_taken(
    app: web.Application, url: str, body: bytes, extra: dict[str, str], what: str
) -> int | None:
    """POST with retries (the receiver may be restarting); the final status or None."""
    sim = app[NATIONAL]
    for attempt in range(30):
        headers = _signed_headers(sim, url, body, extra)
        try:
            # Never follow a redirect: it would re-post the signed body where nobody
            # registered (a 3xx is a refusal, as a real platform would take it).
            async with app[SESSION].post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()
                if resp.status < 500:
                    if resp.status >= 300:
                        log.warning("%s refused: %s (Location %s)", what, resp.status,
                                    location_of(resp.headers))  # fmt: skip
                    return resp.status
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(min(5.0, 0.2 * 2**attempt) * sim.rng.random())
    log.error("gave up: %s", what)
    return None


async def _relay(
    app: web.Application,
    service: str,
    message_id: str,
    doc: Any,
    client: str,
    target: str,
    chain: tuple[str, ...],
) -> None:
    """Hand an application to the handling province's gateway, vouching for the applicant;
    the chain it came through travels on, the platform appended (the signing hop)."""
    sim = app[NATIONAL]
    body = json.dumps(doc, ensure_ascii=False).encode()
    url = join(target, "v1", "exchange", service)
    extra = {
        "Gw-Client": client,
        "Gw-Message-Id": message_id,
        "Gw-Via": ", ".join((*chain, sim.member_id)),
    }
    status = await _post_until_taken(app, url, body, extra, f"relay of {message_id}")
    note(
        sim.trail, f"national platform → {_name(sim, target)}", f"platform-signed relay ({status})"
    )


async def _call_back(
    app: web.Application,
    service: str,
    message_id: str,
    decision: Mapping[str, Any],
    target: str,
    delay: float | None = None,
) -> None:
    sim = app[NATIONAL]
    await asyncio.sleep(sim.callback_delay_s if delay is None else delay)
    body = json.dumps(decision, ensure_ascii=False).encode()
    url = join(target, "v1", "callbacks", service)
    extra = {
        "Gw-Client": sim.member_id,
        "Gw-Message-Id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"decision:{message_id}")),
        "Gw-Correlation-Id": message_id,
    }
    status = await _post_until_taken(app, url, body, extra, f"callback for {message_id}")
    if status is not None:
        sim.callbacks_sent.append(message_id)
        hop = f"national platform → {_name(sim, target)} (callback)"
        note(sim.trail, hop, f"platform-signed callback ({status})")


async def _directory(request: web.Request) -> web.Response:
    sim = request.app[NATIONAL]
    if sim.publisher is None:
        return problem(404, "service_unknown", "this platform publishes no directory")
    refused = await _refuse_or_delay(request, sim)
    if refused is not None:
        return refused
    jws = sim.publisher.current()
    etag = etag_of(jws)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    return web.Response(text=jws, content_type="application/jose", headers=headers)


async def _announce(request: web.Request) -> web.Response:
    """A gateway's announcement, signed with a key the directory lists for it as current
    (a retired key within its overlap may not re-key it); single use (``Publisher``)."""
    sim = request.app[NATIONAL]
    if sim.publisher is None:
        return problem(404, "service_unknown", "this platform publishes no directory")
    member = request.headers.get("Gw-Client", "")
    listed = [VerificationKey.from_jwk(j) for j in sim.publisher.announcing_keys_of(member)]
    if not listed:
        return problem(403, "client_unknown", f"{member or 'no Gw-Client'} is not registered")
    try:
        body, kid = await verify_request(request, {k.kid: k for k in listed}, Verifier())
    except (GatewayError, web.HTTPUnauthorized, KeyError) as exc:
        return problem(401, "signature_invalid", str(getattr(exc, "reason", exc)))
    try:
        announcement = json.loads(body)
        if not isinstance(announcement, dict) or announcement.get("member_id") != member:
            return problem(400, "malformed_request", "member_id must be the signer's Gw-Client")
        changed = sim.publisher.announce(member, announcement)
    except json.JSONDecodeError:
        return problem(400, "malformed_request", "the announcement is not JSON")
    except DirectoryRefused as exc:
        if exc.reason in ("replayed", "older", "stale", "retired_key"):
            log.warning("%s (%s)", exc.detail, member)
            return problem(409, "announcement_refused", exc.detail)
        return problem(422, "schema_invalid", exc.detail)
    sim.announcements.append(kid)
    if "url" in announcement:
        sim.provinces[member.split(":", 1)[0]] = str(announcement["url"]).rstrip("/")
    note(sim.trail, f"{member} → national platform (directory)", f"announcement, kid {kid}")
    jws = sim.publisher.current()  # a change is signed now, as its new version
    return web.json_response(
        {"changed": changed, "version": sim.publisher.version, "etag": etag_of(jws)}
    )


async def _control(request: web.Request) -> web.Response:
    sim = request.app[NATIONAL]
    data = await request.json()
    sim.mode = str(data.get("mode", "ok"))
    sim.delay_s = float(data.get("delay_s", 0))
    if "callback_delay_s" in data:
        sim.callback_delay_s = float(data["callback_delay_s"])
    return web.json_response({"mode": sim.mode, "received": len(sim.received)})


async def _pull_aggregates(app: web.Application) -> None:
    """One round of central monitoring: a signed GET of each gateway's aggregates, its
    answer's signature checked against the gateway's keys."""
    sim = app[NATIONAL]
    for gateway, url in sim.monitored.items():
        client = ExchangeClient(
            member_id=sim.member_id,
            signer=Signer(sim.keypair),
            base_url=url,
            session=app[SESSION],
        )
        pulled: dict[str, Any] = {"pulled_at": _now(), "url": url}
        try:
            reply = await client.request(
                "GET", "/v1/monitoring/aggregates", message_id=str(uuid.uuid4())
            )
            pulled["status"] = reply.status
            if reply.status == 200:
                verify_reply(reply, {kid: key for kid, (key, _) in sim.gateways().items()})
                pulled["aggregates"] = reply.json()
            else:
                pulled["error"] = reply.json().get("code")
        except (aiohttp.ClientError, TimeoutError, GatewayError, ValueError) as exc:
            pulled["error"] = type(exc).__name__
        sim.monitoring[gateway] = pulled


async def _central_monitor(app: web.Application) -> Any:
    async def run() -> None:
        while True:
            await _pull_aggregates(app)
            await asyncio.sleep(app[NATIONAL].monitor_every_s)

    task = asyncio.create_task(run(), name="central-monitor")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _monitoring(request: web.Request) -> web.Response:
    """What central monitoring last pulled from each gateway."""
    return web.json_response({"gateways": request.app[NATIONAL].monitoring})


async def _health(request: web.Request) -> web.Response:
    sim = request.app[NATIONAL]
    # Slow is up, only slow; refusing, failing or hanging is what a health check reports.
    status = 200 if sim.mode in ("ok", "slow") else 503
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
    if sim.monitored:
        app.cleanup_ctx.append(_central_monitor)
    app.router.add_get("/monitoring", _monitoring)
    app.router.add_post("/api/v1/exchange", _exchange_envelope)
    app.router.add_post("/api/exchange/{service}", _exchange_bare)
    app.router.add_post("/api/v1/callbacks/{service}", _callback_in)
    app.router.add_get("/v1/directory", _directory)
    app.router.add_post("/v1/directory/announce", _announce)
    app.router.add_post("/_control", _control)
    app.router.add_get("/health", _health)
    return app


def main() -> None:  # pragma: no cover - exercised through `gateway up`
    from pathlib import Path

    from gateway.config.model import jwk_path_for
    from gateway.crypto.keys import ensure_keypair

    parser = argparse.ArgumentParser(description="national platform simulator")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--key", default="keys/national-platform.pem")
    parser.add_argument("--gateway-jwk", default="keys/gateway.jwk.json")
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8080")
    args = parser.parse_args()
    pair = ensure_keypair(Path(args.key), jwk_path_for(Path(args.key)))
    gw = VerificationKey.from_jwk(json.loads(Path(args.gateway_jwk).read_text()))
    sim = NationalPlatform(
        member_id=PLATFORM_ID, keypair=pair, trusted={gw.kid: gw}, callback_base=args.gateway_url
    )
    web.run_app(create_national_app(sim), host="127.0.0.1", port=args.port)


if __name__ == "__main__":  # pragma: no cover
    main()
