"""Discovery (PROTOCOL.md «Member self-service»): what a member may call, and who offers it.

``GET /v1/meta/services``, ``GET /v1/meta/services/{code}`` and ``GET /v1/meta/members``
are signed requests, verified by the exchange pipeline's own ``authenticate`` and
``admit`` stages (one verifier, one rate limit, one nonce guard), and answered signed by
the same middleware as every ``/v1`` answer. What a caller sees is cut from its ACL:

- a service it may not call does not exist for it (``404 service_unknown``, the very
  answer an unknown code gets), so codes cannot be probed;
- a member appears only when it offers the caller one of the caller's services (or is
  the caller itself), and only with those services;
- no key, adapter name, upstream URL, other member's callback URL, secret, or directory
  entry refused by screening is ever part of an answer (refused entries never reach the
  runtime; the views below name their fields one by one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.config.model import RateLimit
from gateway.errors import ServiceUnknown
from gateway.exchange.dispatch import receiver_for
from gateway.exchange.openapi import service_document
from gateway.exchange.pipeline import CTX_KEY, Authenticated, Pipeline
from gateway.runtime.registry import Member, Runtime, Service

__all__ = ["META_COMPONENTS", "Discovery", "served_by"]

# A self-service GET covers what an exchange covers, less the body's components.
META_COMPONENTS = ("@method", "@target-uri", "gw-client", "gw-message-id")
_RELAY_TYPES = {"national_platform": "national"}


def _rate(limit: RateLimit | None) -> dict[str, float | int] | None:
    if limit is None:
        return None
    return {"rate_per_s": limit.rate_per_s, "burst": limit.burst}


def _region(member_id: str) -> str:
    return member_id.split(":", 1)[0]


def served_by(runtime: Runtime, code: str) -> tuple[str | list[str], list[str], bool]:
    """Where ``code`` is served (``"local"``, ``"national"`` or the regions whose gateways
    serve it), the regions a ``Gw-Target`` routes to, and whether a route is usable now.

    Read from the route table: the catch-all route says local or national; routes for a
    target (``<region>:*`` from the directory, or one member) name regions. Adapter
    names and URLs stay inside: only their kind is told."""
    routes = [r for r in runtime.routes.routes() if r.service == code]
    regions = sorted({_region(r.target) for r in routes if r.target is not None})
    catch_all = next((r for r in routes if r.target is None), None)
    usable = any(_usable(runtime, r.adapter) for r in routes)
    if catch_all is None:
        return (regions if regions else "local"), regions, usable
    slot = runtime.adapters.get(catch_all.adapter)
    kind = slot.config.type if slot is not None else ""
    if kind in _RELAY_TYPES:
        return _RELAY_TYPES[kind], regions, usable
    receiver = receiver_for(runtime, catch_all.adapter)
    member = runtime.members.get(receiver) if receiver is not None else None
    if member is not None and member.config.kind == "platform":
        return "national", regions, usable
    if member is not None and member.config.kind == "gateway":
        return [_region(member.id)], regions, usable
    return "local", regions, usable


def _usable(runtime: Runtime, adapter: str) -> bool:
    slot = runtime.adapters.get(adapter)
    return slot is not None and slot.config.enabled and adapter not in runtime.refused


def _offers(runtime: Runtime, allowed: set[str]) -> dict[str, set[str]]:
    """Member id → the services in ``allowed`` it offers: the receiver of a route's
    adapter, the gateway of a routed target's region, or the routed member itself."""
    offers: dict[str, set[str]] = {}
    relays = {
        m.id: m
        for m in runtime.members.values()
        if m.config.kind in ("gateway", "platform") and m.config.enabled
    }
    for route in runtime.routes.routes():
        if route.service not in allowed:
            continue
        receiver = receiver_for(runtime, route.adapter)
        if receiver is not None:
            offers.setdefault(receiver, set()).add(route.service)
        if route.target is None:
            continue
        if route.target in runtime.members:
            offers.setdefault(route.target, set()).add(route.service)
        region = _region(route.target)
        for relay in relays.values():
            if _region(relay.id) == region and relay.config.kind == "gateway":
                offers.setdefault(relay.id, set()).add(route.service)
    return offers


class Discovery:
    """The three discovery endpoints, on the pipeline's authentication stages."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def _caller(self, request: web.Request, runtime: Runtime) -> Authenticated:
        ctx = request[CTX_KEY]
        auth = self.pipeline.authenticate(request, None, runtime, ctx, required=META_COMPONENTS)
        await self.pipeline.admit(auth)
        return auth

    @staticmethod
    def _allowed(runtime: Runtime, auth: Authenticated) -> list[Service]:
        """The services the caller may call, as ``authorise`` decides (the signer's ACL)."""
        codes = sorted(set(auth.signer.config.services))
        return [runtime.services[c] for c in codes if c in runtime.services]

    def _limit(self, service: Service) -> int:
        limit = self.pipeline.security.max_body_bytes
        if service.config.max_body_bytes:
            limit = min(limit, service.config.max_body_bytes)
        return limit

    def _summary(self, runtime: Runtime, auth: Authenticated, service: Service) -> dict[str, Any]:
        where, regions, usable = served_by(runtime, service.code)
        limit = auth.signer.config.rate_limit or self.pipeline.security.rate_limit
        return {
            "code": service.code,
            "mode": service.config.mode,
            "allow_async": service.config.mode == "async" or service.config.allow_async,
            "max_body_bytes": self._limit(service),
            "rate_limit": _rate(limit),
            "served_by": where,
            "target_regions": regions,
            "available": usable,
            "callback": service.callback is not None,
        }

    async def services(self, request: web.Request) -> web.Response:
        """``GET /v1/meta/services``: only what the caller may call."""
        runtime = self.pipeline.runtime.current
        auth = await self._caller(request, runtime)
        return web.json_response(
            {"services": [self._summary(runtime, auth, s) for s in self._allowed(runtime, auth)]}
        )

    async def service(self, request: web.Request) -> web.Response:
        """``GET /v1/meta/services/{code}``: schemas and an OpenAPI 3.1 document; a
        service the caller may not call is answered exactly as an unknown code."""
        runtime = self.pipeline.runtime.current
        code = request.match_info["code"]
        request[CTX_KEY].service = code
        auth = await self._caller(request, runtime)
        service = next((s for s in self._allowed(runtime, auth) if s.code == code), None)
        if service is None:
            raise ServiceUnknown(f"no service {code!r} is offered here")
        cfg = service.config
        schemas: dict[str, Any] = {"request": cfg.request_schema, "response": cfg.response_schema}
        if cfg.callback_schema is not None:
            schemas["callback"] = cfg.callback_schema
        body = self._summary(runtime, auth, service)
        body["schemas"] = schemas
        body["openapi"] = service_document(
            cfg,
            servers=self.pipeline.identity.public_urls,
            max_body_bytes=self._limit(service),
        )
        return web.json_response(body)

    async def members(self, request: web.Request) -> web.Response:
        """``GET /v1/meta/members``: the caller, and each member or gateway (from config
        or the directory) offering it one of its services, with those services only."""
        runtime = self.pipeline.runtime.current
        auth = await self._caller(request, runtime)
        allowed = {s.code for s in self._allowed(runtime, auth)}
        offers = _offers(runtime, allowed)
        me = auth.signer
        listed: list[dict[str, Any]] = []
        for member_id in sorted(set(offers) | {me.id}):
            member = runtime.members.get(member_id)
            if member is None or member_id in runtime.refused:
                continue
            if not member.config.enabled and member_id != me.id:
                continue
            listed.append(_member_view(member, offers.get(member_id, set()), me, allowed))
        return web.json_response({"members": listed})


def _member_view(
    member: Member, offered: set[str], me: Member, allowed: set[str]
) -> dict[str, Any]:
    """One member as another sees it: named fields only (never keys or URLs of others)."""
    view: dict[str, Any] = {
        "id": member.id,
        "kind": member.config.kind,
        "name": member.config.name,
        "services": sorted(offered),
        "source": "directory" if member.config.learnt else "config",
    }
    if member.id == me.id:  # what the caller may learn of itself
        own: Mapping[str, Any] = {
            "self": True,
            "may_call": sorted(allowed),
            "callback_url": member.config.callback_url,
            "keys": sorted(member.keys),
        }
        view.update(own)
    return view
