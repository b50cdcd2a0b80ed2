"""Admin API handlers: adapters, members (and their keys), services, routes, ACL, messages,
dead letters, audit trail and tokens. Every write is validated, takes effect at once
(``LiveConfig``), persists, and is audited with who, what, when, before and after: the
handlers read the request and call the operation in ``gateway.admin.operations``, which
the web console calls too."""

from __future__ import annotations

import calendar
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from gateway.admin.auth import Permission, Principal, authenticate
from gateway.admin.operations import (
    INGRESS,
    add_member_certificate,
    add_member_key,
    create_resource,
    delete_resource,
    issue_token,
    item_or_404,
    patch_resource,
    put_route,
    redeliver_dead_letter,
    remove_route,
    replace_resource,
    revoke_member_certificate,
    revoke_member_key,
    set_member_services,
    withdraw_token,
)
from gateway.admin.views import audit_view, dead_letter_view, for_role, message_view, resource_view
from gateway.errors import (
    GatewayError,
    InternalError,
    MalformedRequest,
    NotPermitted,
    ResourceUnknown,
)
from gateway.exchange.app import LIVE, RUNTIME, STORE
from gateway.exchange.monitoring import admin_records
from gateway.problem import problem_response
from gateway.runtime.live import LiveConfig
from gateway.runtime.registry import adapter_types

__all__ = ["create_admin_app"]

log = logging.getLogger("gateway.admin")
PRINCIPAL = web.RequestKey("principal", Principal)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The permission each /admin/v1 route needs, by (method, route template); a route that
# has none is refused to every role (a new route cannot be open by omission).
ACCESS = web.AppKey("access", dict[tuple[str, str], Permission])


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer authentication for /admin/v1; every error as problem+json."""
    try:
        if request.path.startswith("/admin/v1"):
            ingress = request.app[INGRESS]
            principal = await authenticate(ingress[STORE], request.headers.get("Authorization"))
            request[PRINCIPAL] = principal
            _check_access(request, principal)
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error: GatewayError = (
            ResourceUnknown("no such resource")
            if exc.status == 404
            else MalformedRequest(exc.reason)
        )
        return problem_response(error)
    except GatewayError as exc:
        response = problem_response(exc)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
        return response
    except Exception:
        log.exception("admin API error on %s %s", request.method, request.path)
        return problem_response(InternalError("an internal error occurred; it has been logged"))


def _check_access(request: web.Request, principal: Principal) -> None:
    """The route's own rule, before its handler runs (which may ask for more)."""
    resource = request.match_info.route.resource
    if resource is None:
        return  # no route matched: the handler answers 404 or 405
    method = "GET" if request.method == "HEAD" else request.method
    permission = request.app[ACCESS].get((method, resource.canonical))
    if permission is None:
        raise NotPermitted(f"{method} {resource.canonical} has no access rule")
    principal.require(permission)


def _principal(request: web.Request, permission: Permission) -> Principal:
    principal = request[PRINCIPAL]
    principal.require(permission)
    return principal


def _live(request: web.Request) -> LiveConfig:
    return request.app[INGRESS][LIVE]


async def _body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedRequest("the body is not a JSON document") from exc


# Generic resources: adapters, members, services -------------------------------------


def _collection(kind: str) -> dict[str, Handler]:
    async def list_items(request: web.Request) -> web.Response:
        _principal(request, "read")
        return web.json_response(
            {kind: [resource_view(kind, i) for i in _live(request).items(kind)]}
        )

    async def get_item(request: web.Request) -> web.Response:
        _principal(request, "read")
        item = item_or_404(_live(request), kind, request.match_info["id"])
        return web.json_response(resource_view(kind, item))

    async def create(request: web.Request) -> web.Response:
        principal = _principal(request, "write")
        body = await _body(request)
        rid, after = await create_resource(
            _live(request), principal, kind, body, reinstate=_reinstate(request)
        )
        return web.json_response(
            _shown(kind, after), status=201, headers={"Location": f"/admin/v1/{kind}/{rid}"}
        )

    async def replace(request: web.Request) -> web.Response:
        principal = _principal(request, "write")
        rid = request.match_info["id"]
        body = await _body(request)
        before, after = await replace_resource(
            _live(request), principal, kind, rid, body, reinstate=_reinstate(request)
        )
        return web.json_response(_shown(kind, after), status=200 if before else 201)

    async def patch(request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        changes = await _body(request)
        after = await patch_resource(
            _live(request), request[PRINCIPAL], kind, rid, changes, reinstate=_reinstate(request)
        )
        return web.json_response(_shown(kind, after))

    async def delete(request: web.Request) -> web.Response:
        await delete_resource(_live(request), request[PRINCIPAL], kind, request.match_info["id"])
        return web.Response(status=204)

    return {"list": list_items, "get": get_item, "create": create, "replace": replace,
            "patch": patch, "delete": delete}  # fmt: skip


def _shown(kind: str, item: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if item is None else resource_view(kind, item)


def _reinstate(request: web.Request) -> bool:
    return request.query.get("reinstate") == "true"


# Adapters ----------------------------------------------------------------------------


async def list_adapter_types(request: web.Request) -> web.Response:
    _principal(request, "read")
    types = adapter_types(refresh=True)
    return web.json_response(
        {
            "adapter_types": [
                {"type": n, "config_schema": t.config_schema} for n, t in sorted(types.items())
            ]
        }
    )


async def get_adapter_type(request: web.Request) -> web.Response:
    _principal(request, "read")
    name = request.match_info["type"]
    types = adapter_types(refresh=True)
    if name not in types:
        raise ResourceUnknown(f"no adapter type {name}")
    return web.json_response({"type": name, "config_schema": types[name].config_schema})


async def adapter_health(request: web.Request) -> web.Response:
    _principal(request, "read")
    name = request.match_info["id"]
    slot = request.app[INGRESS][RUNTIME].current.adapters.get(name)
    if slot is None:
        raise ResourceUnknown(f"no adapter {name}")
    health = await slot.adapter.health()
    return web.json_response(
        {
            "name": name,
            "type": slot.config.type,
            "enabled": slot.config.enabled,
            "healthy": health.healthy and slot.config.enabled,
            "detail": health.detail,
            "circuit": slot.breaker.state.value,
        }
    )


# Member keys and ACL -----------------------------------------------------------------


async def add_key(request: web.Request) -> web.Response:
    jwk = await _body(request)
    await add_member_key(
        _live(request),
        request[PRINCIPAL],
        request.match_info["id"],
        jwk,
        reinstate=_reinstate(request),
    )
    return web.json_response(resource_view("members", {"keys": [jwk]})["keys"][0], status=201)


async def revoke_key(request: web.Request) -> web.Response:
    member_id, kid = request.match_info["id"], request.match_info["kid"]
    await revoke_member_key(_live(request), request[PRINCIPAL], member_id, kid)
    return web.Response(status=204)


async def add_certificate(request: web.Request) -> web.Response:
    fingerprint = await add_member_certificate(
        _live(request),
        request[PRINCIPAL],
        request.match_info["id"],
        await _body(request),
        reinstate=_reinstate(request),
    )
    return web.json_response({"fingerprint": fingerprint}, status=201)


async def revoke_certificate(request: web.Request) -> web.Response:
    member_id, fingerprint = request.match_info["id"], request.match_info["fingerprint"]
    await revoke_member_certificate(_live(request), request[PRINCIPAL], member_id, fingerprint)
    return web.Response(status=204)


async def list_acl(request: web.Request) -> web.Response:
    _principal(request, "read")
    members = _live(request).items("members")
    return web.json_response(
        {"acl": [{"member": m["id"], "services": m.get("services", [])} for m in members]}
    )


async def put_acl(request: web.Request) -> web.Response:
    principal = _principal(request, "write")
    member_id = request.match_info["member"]
    body = await _body(request)
    services = await set_member_services(_live(request), principal, member_id, body)
    return web.json_response({"member": member_id, "services": services})


# Routes ------------------------------------------------------------------------------


async def list_routes(request: web.Request) -> web.Response:
    _principal(request, "read")
    return web.json_response({"routes": _live(request).items("routes")})


async def create_route(request: web.Request) -> web.Response:
    principal = _principal(request, "write")
    body = await _body(request)
    before, after = await put_route(_live(request), principal, body)
    return web.json_response(after, status=200 if before else 201)


async def delete_route(request: web.Request) -> web.Response:
    service, target = request.match_info["service"], request.match_info.get("target")
    await remove_route(_live(request), request[PRINCIPAL], service, target)
    return web.Response(status=204)


# Messages, dead letters, audit -------------------------------------------------------


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return float(calendar.timegm(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")))
        except ValueError as exc:
            raise MalformedRequest("since is a Unix time or YYYY-MM-DDTHH:MM:SS (UTC)") from exc


def _limit(request: web.Request) -> int:
    try:
        return max(1, min(1000, int(request.query.get("limit", "100"))))
    except ValueError as exc:
        raise MalformedRequest("limit is an integer") from exc


async def search_messages(request: web.Request) -> web.Response:
    _principal(request, "read")
    q = request.query
    records = await request.app[INGRESS][STORE].search_messages(
        client=q.get("client"),
        service=q.get("service"),
        state=q.get("state"),
        since=_since(q.get("since")),
        limit=_limit(request),
    )
    sensitive = _sensitive(request)
    principal = request[PRINCIPAL]
    return web.json_response(
        {
            "messages": [
                for_role(principal, message_view(r, sensitive.get(r.service, ()))) for r in records
            ]
        }
    )


async def get_message(request: web.Request) -> web.Response:
    _principal(request, "read")
    records = await request.app[INGRESS][STORE].find_by_message_id(request.match_info["id"].lower())
    if not records:
        raise ResourceUnknown(f"no message {request.match_info['id']}")
    fields = _sensitive(request).get(records[0].service, ())
    return web.json_response(for_role(request[PRINCIPAL], message_view(records[0], fields)))


async def monitoring_records(request: web.Request) -> web.Response:
    _principal(request, "read")
    return await admin_records(request.app[INGRESS][STORE], request)


def _sensitive(request: web.Request) -> dict[str, tuple[str, ...]]:
    return {s.code: s.sensitive for s in _live(request).config.services}


async def list_dead_letters(request: web.Request) -> web.Response:
    _principal(request, "read")
    rows = await request.app[INGRESS][STORE].dead_letters(limit=_limit(request))
    return web.json_response({"dead_letters": [dead_letter_view(r) for r in rows]})


async def redeliver(request: web.Request) -> web.Response:
    message_id = request.match_info["id"].lower()
    kind = await redeliver_dead_letter(request.app[INGRESS], request[PRINCIPAL], message_id)
    return web.json_response(
        {"message_id": message_id, "kind": kind, "state": "queued"}, status=202
    )


async def audit_trail(request: web.Request) -> web.Response:
    _principal(request, "read")
    entries = await request.app[INGRESS][STORE].changes(
        kind=request.query.get("kind"),
        since=_since(request.query.get("since")),
        limit=_limit(request),
    )
    return web.json_response({"audit": [audit_view(e) for e in entries]})


# Tokens ------------------------------------------------------------------------------


async def list_tokens(request: web.Request) -> web.Response:
    _principal(request, "read_tokens")
    tokens = await request.app[INGRESS][STORE].list_tokens()
    return web.json_response({"tokens": [dataclasses.asdict(t) for t in tokens]})


async def new_token(request: web.Request) -> web.Response:
    principal = _principal(request, "write")
    body = await _body(request)
    if not isinstance(body, Mapping):
        raise MalformedRequest("expected {name, role}")
    name, role = str(body.get("name", "")), str(body.get("role", ""))
    token = await issue_token(request.app[INGRESS][STORE], principal, name, role)
    return web.json_response({"name": name, "role": role, "token": token}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    await withdraw_token(
        request.app[INGRESS][STORE], request[PRINCIPAL], request.match_info["name"]
    )
    return web.Response(status=204)


def create_admin_app(ingress: web.Application) -> web.Application:
    """The admin listener's app; it shares the ingress app's store and live config."""
    from gateway.exchange.openapi import admin_document

    app = web.Application(middlewares=[admin_middleware], client_max_size=4 * 1024 * 1024)
    app[INGRESS] = ingress
    access: dict[tuple[str, str], Permission] = {}
    app[ACCESS] = access
    r = app.router
    base = "/admin/v1"

    def add(method: str, path: str, handler: Handler, permission: Permission) -> None:
        if method == "GET":
            r.add_get(base + path, handler)  # and HEAD, under the same rule
        else:
            r.add_route(method, base + path, handler)
        access[(method, base + path)] = permission

    add("GET", "/adapter-types", list_adapter_types, "read")
    add("GET", "/adapter-types/{type}", get_adapter_type, "read")
    for kind in ("adapters", "members", "services"):
        h = _collection(kind)
        add("GET", f"/{kind}", h["list"], "read")
        add("POST", f"/{kind}", h["create"], "write")
        add("GET", f"/{kind}/{{id}}", h["get"], "read")
        add("PUT", f"/{kind}/{{id}}", h["replace"], "write")
        add("PATCH", f"/{kind}/{{id}}", h["patch"], "operate")  # more than enabled: write
        add("DELETE", f"/{kind}/{{id}}", h["delete"], "write")
    add("GET", "/adapters/{id}/health", adapter_health, "read")
    add("POST", "/members/{id}/keys", add_key, "write")
    add("DELETE", "/members/{id}/keys/{kid}", revoke_key, "write")
    add("POST", "/members/{id}/certificates", add_certificate, "write")
    add("DELETE", "/members/{id}/certificates/{fingerprint}", revoke_certificate, "write")
    add("GET", "/acl", list_acl, "read")
    add("PUT", "/acl/{member}", put_acl, "write")
    add("GET", "/routes", list_routes, "read")
    add("POST", "/routes", create_route, "write")
    add("DELETE", "/routes/{service}", delete_route, "write")
    add("DELETE", "/routes/{service}/{target}", delete_route, "write")
    add("GET", "/messages", search_messages, "read")  # bodies only with read_bodies
    add("GET", "/messages/{id}", get_message, "read")
    add("GET", "/dead-letters", list_dead_letters, "read")
    add("POST", "/dead-letters/{id}/redeliver", redeliver, "operate")
    add("GET", "/audit", audit_trail, "read")
    # Every role: records hold ids, times, sizes and codes, never bodies or headers.
    add("GET", "/monitoring/records", monitoring_records, "read")
    add("GET", "/tokens", list_tokens, "read_tokens")
    add("POST", "/tokens", new_token, "write")
    add("DELETE", "/tokens/{name}", revoke_token, "write")

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(admin_document())

    r.add_get("/openapi.json", openapi)
    # Local: importing gateway.admin.console first imports gateway.admin (its operations), whose
    # __init__ imports this module; at module level that order would find it half-made.
    from gateway.admin.console import mount_console

    mount_console(app)  # the web console at / (gateway/admin/console/)
    return app
