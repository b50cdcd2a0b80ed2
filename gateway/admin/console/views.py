"""The console's pages and form actions.

Every page needs a signed-in session; every form that writes needs the session's CSRF
token and a same-origin request, and then calls the admin operation the API calls too
(``gateway.admin.operations``): the same validation, permission check, audit entry and
live swap as ``/admin/v1``. A validation error comes back onto its field and nothing is written.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from gateway.admin.auth import ROLES, Permission, Principal, authenticate, token_hash
from gateway.admin.console.forms import (
    FormErrors,
    config_fields,
    config_from_form,
    errors_by_field,
    resubmitted,
)
from gateway.admin.console.monitoring import charts as monitoring_charts
from gateway.admin.console.overview import Sampler
from gateway.admin.console.sessions import COOKIE, Session, Sessions
from gateway.admin.operations import (
    INGRESS,
    add_member_certificate,
    add_member_key,
    create_resource,
    delete_resource,
    issue_token,
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
from gateway.admin.resources import resource_schema
from gateway.admin.views import (
    WITHHELD,
    audit_view,
    dead_letter_view,
    for_role,
    message_view,
    resource_view,
)
from gateway.config.secrets import JWK_SECRET_MEMBERS
from gateway.errors import (
    GatewayError,
    MalformedRequest,
    ResourceExists,
    ResourceUnknown,
    SchemaInvalid,
)
from gateway.exchange.app import LIVE, READINESS, RUNTIME, STORE
from gateway.exchange.monitoring import MAX_SAMPLES, aggregate, record_view
from gateway.runtime.live import LiveConfig
from gateway.runtime.registry import adapter_types
from gateway.states import MessageState
from gateway.store import MonitoringQuery

__all__ = ["CONSOLE", "Console", "Viewer", "routes"]

STATES = tuple(MessageState)


@dataclass(frozen=True, slots=True, kw_only=True)
class Console:
    sessions: Sessions
    sampler: Sampler


CONSOLE = web.AppKey("console", Console)


@dataclass(frozen=True, slots=True, kw_only=True)
class Viewer:
    """Who is signed in, as the token's current row says, and their session."""

    principal: Principal
    session: Session

    @property
    def can_write(self) -> bool:
        return self.principal.may("write")

    @property
    def can_operate(self) -> bool:
        return self.principal.may("operate")

    @property
    def can_read_tokens(self) -> bool:
        return self.principal.may("read_tokens")


Form = dict[str, str]
PageHandler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]
ActionHandler = Callable[[web.Request, Viewer, Form], Awaitable[web.StreamResponse]]


# Sessions, rendering, errors ---------------------------------------------------------


def _live(request: web.Request) -> LiveConfig:
    return request.app[INGRESS][LIVE]


async def _viewer(request: web.Request) -> Viewer | None:
    console = request.app[CONSOLE]
    cookie = request.cookies.get(COOKIE)
    session = console.sessions.get(cookie)
    if session is None:
        return None
    # Looked up again every time: a revoked token ends its sessions here.
    row = await request.app[INGRESS][STORE].token_by_hash(session.token_hash)
    if row is None:
        console.sessions.close_token(session.token_hash)
        return None
    token = _fields(row)
    return Viewer(
        principal=Principal(name=str(token["name"]), role=str(token["role"])), session=session
    )


def render(
    request: web.Request,
    viewer: Viewer | None,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
) -> web.Response:
    notices: list[str] = []
    if viewer is not None:
        notices, viewer.session.notices[:] = list(viewer.session.notices), []
    return aiohttp_jinja2.render_template(
        template,
        request,
        {
            **context,
            "viewer": viewer,
            "csrf": viewer.session.csrf if viewer else "",
            "notices": notices,
            "path": request.path,
        },
        status=status,
    )


def _error_page(request: web.Request, viewer: Viewer | None, exc: GatewayError) -> web.Response:
    return render(request, viewer, "error.html", {"error": exc}, status=exc.status)


def _see_other(location: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location)


Page = Callable[[web.Request], Awaitable[web.StreamResponse]]


def page_for(permission: Permission) -> Callable[[PageHandler], Page]:
    """A page for a signed-in viewer whose role has ``permission`` (others get 403);
    anyone not signed in goes to the sign-in page."""

    def decorate(handler: PageHandler) -> Page:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            viewer = await _viewer(request)
            if viewer is None:
                raise _see_other("/signin")
            try:
                viewer.principal.require(permission)
                return await handler(request, viewer)
            except GatewayError as exc:
                return _error_page(request, viewer, exc)

        return wrapped

    return decorate


page = page_for("read")


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


async def _form(request: web.Request) -> Form:
    data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str)}


def action(handler: ActionHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A form that writes: a signed-in viewer, same origin, the session's CSRF token."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        viewer = await _viewer(request)
        if viewer is None:
            raise _see_other("/signin")
        form = await _form(request)
        if not _same_origin(request) or not viewer.session.csrf_ok(form.get("csrf")):
            return _error_page(
                request,
                viewer,
                MalformedRequest("the form is stale or came from elsewhere; reload the page"),
            )
        try:
            return await handler(request, viewer, form)
        except GatewayError as exc:
            return _error_page(request, viewer, exc)

    return wrapped


def _done(viewer: Viewer, notice: str, location: str) -> web.HTTPSeeOther:
    viewer.session.notices.append(notice)
    return _see_other(location)


def _json_field(form: Form, name: str) -> tuple[Any, FormErrors]:
    try:
        return json.loads(form.get(name, "")), {}
    except json.JSONDecodeError as exc:
        return None, {name: [f"is not JSON ({exc.msg} at line {exc.lineno})"]}


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


def _resubmitted(kind: str, text: str) -> str:
    """A JSON document sent back onto the page after a refusal, secrets typed into it
    shown as placeholders (a page never echoes a secret; it is typed again)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return "" if _has_jwk_secret(text) else text
    return _pretty(resource_view(kind, document)) if isinstance(document, dict) else text


def _has_jwk_secret(text: str) -> bool:
    # Unparsable text cannot be redacted field by field: drop it if it may hold key material.
    return any(f'"{m}"' in text for m in JWK_SECRET_MEMBERS)


def _fields(record: Any) -> dict[str, Any]:
    """A store record (a typed record or a mapping) as a dict for a template."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    return dict(record)


def _utc(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC"


# Sign in and out ---------------------------------------------------------------------


async def signin_page(request: web.Request) -> web.StreamResponse:
    if await _viewer(request) is not None:
        raise _see_other("/")
    return render(request, None, "signin.html", {"errors": {}})


async def signin(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    if not _same_origin(request):
        return render(
            request, None, "signin.html", {"errors": {"": ["cross-site sign-in"]}}, status=403
        )
    token = form.get("token", "").strip()
    store = request.app[INGRESS][STORE]
    try:
        # The admin API's own check: the same hashes, the same constant-time comparison.
        await authenticate(store, f"Bearer {token}" if token else None)
    except GatewayError as exc:
        message = "enter an admin token" if not token else "the token is unknown or revoked"
        return render(
            request, None, "signin.html", {"errors": {"token": [message]}}, status=exc.status
        )
    cookie, _ = request.app[CONSOLE].sessions.open(token_hash(token))
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(request.app[CONSOLE].sessions.ttl_s),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    raise response


async def signout(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    console = request.app[CONSOLE]
    cookie = request.cookies.get(COOKIE)
    session = console.sessions.get(cookie)
    if session is not None and _same_origin(request) and session.csrf_ok(form.get("csrf")):
        console.sessions.close(cookie)
    response = web.HTTPSeeOther("/signin")
    response.del_cookie(COOKIE, path="/")
    raise response


# Overview ----------------------------------------------------------------------------


@page
async def overview(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    ingress = request.app[INGRESS]
    sampler = request.app[CONSOLE].sampler
    reasons = await ingress[READINESS].reasons()
    store = ingress[STORE]
    depth = await store.outbox_depth()
    oldest = await store.oldest_outbox_age(time.time())
    runtime = ingress[RUNTIME].current
    breakers = [
        {"name": name, "state": slot.breaker.state.value, "enabled": slot.config.enabled}
        for name, slot in sorted(runtime.adapters.items())
    ]
    rate = sampler.per_minute()
    errors = sampler.error_rate()
    return render(
        request,
        viewer,
        "overview.html",
        {
            "reasons": reasons,
            "per_minute": rate,
            "error_rate": errors,
            "depth": depth,
            "oldest": oldest,
            "breakers": breakers,
            "chart": sampler.chart(),
        },
    )


# Members -----------------------------------------------------------------------------

MEMBER_TEMPLATE = {"id": "", "kind": "system", "keys": [], "services": []}


@page
async def members(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return _members_page(request, viewer, _pretty(MEMBER_TEMPLATE), {})


def _members_page(
    request: web.Request, viewer: Viewer, draft: str, errors: FormErrors, status: int = 200
) -> web.Response:
    rows = [
        {
            "id": m["id"],
            "kind": m.get("kind", "system"),
            "enabled": m.get("enabled", True),
            "keys": len(m.get("keys", [])),
            "services": m.get("services", []),
        }
        for m in _live(request).items("members")
    ]
    context = {"members": rows, "draft": draft, "errors": errors}
    return render(request, viewer, "members.html", context, status=status)


@action
async def member_create(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    body, errors = _json_field(form, "member")
    if not errors:
        try:
            rid, _ = await create_resource(_live(request), viewer.principal, "members", body)
        except SchemaInvalid as exc:
            errors = errors_by_field(exc.errors, [], default="member")
        except ResourceExists as exc:
            errors = {"member": [exc.detail]}
        else:
            raise _done(viewer, f"Member {rid} added.", f"/members/{rid}")
    return _members_page(request, viewer, _resubmitted("members", form.get("member", "")), errors)


def _member_or_404(request: web.Request) -> dict[str, Any]:
    member_id = request.match_info["id"]
    member = _live(request).get("members", member_id)
    if member is None:
        raise ResourceUnknown(f"no member {member_id}")
    return member


def _key_rows(member: Mapping[str, Any]) -> list[dict[str, str]]:
    from gateway.crypto.keys import VerificationKey

    rows = []
    for jwk in member.get("keys", []):
        try:
            key = VerificationKey.from_jwk(jwk)
            rows.append({"kid": key.kid, "algorithm": key.algorithm})
        except (ValueError, TypeError):
            rows.append({"kid": str(jwk.get("kid", "?")), "algorithm": "unreadable"})
    return rows


def _member_page(
    request: web.Request,
    viewer: Viewer,
    *,
    errors: FormErrors | None = None,
    values: Mapping[str, str] | None = None,
    status: int = 200,
) -> web.Response:
    member = _member_or_404(request)
    services = [s.code for s in _live(request).config.services]
    shown = resource_view("members", member)  # secrets as placeholders, for every role
    if values is not None and "document" in values:
        values = {**values, "document": _resubmitted("members", values["document"])}
    context = {
        "member": shown,
        "keys": _key_rows(member),
        "all_services": services,
        "errors": errors or {},
        "values": values or {},
        "document": _pretty(shown),  # a replace that keeps a placeholder keeps the secret
        "shown": _pretty(shown),
    }
    return render(request, viewer, "member.html", context, status=status)


@page
async def member_detail(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return _member_page(request, viewer)


@action
async def member_add_key(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    member_id = request.match_info["id"]
    jwk, errors = _json_field(form, "jwk")
    if not errors:
        try:
            await add_member_key(
                _live(request),
                viewer.principal,
                member_id,
                jwk,
                reinstate=form.get("reinstate") == "true",
            )
        except SchemaInvalid as exc:
            errors = errors_by_field(exc.errors, [], default="jwk")
        else:
            raise _done(viewer, "Key added.", f"/members/{member_id}")
    return _member_page(request, viewer, errors=errors, values=form)


@page
async def member_revoke_confirm(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    member = _member_or_404(request)
    kid = request.match_info["kid"]
    viewer.principal.require("write")
    return render(
        request,
        viewer,
        "confirm.html",
        {
            "title": f"Revoke key {kid}?",
            "text": f"{member['id']} can no longer sign with key {kid}: its next request "
            "signed with it is refused. A revoked key comes back only on purpose (reinstate).",
            "action_url": request.path,
            "button": "Revoke key",
            "back": f"/members/{member['id']}",
        },
    )


@action
async def member_revoke(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    member_id, kid = request.match_info["id"], request.match_info["kid"]
    await revoke_member_key(_live(request), viewer.principal, member_id, kid)
    raise _done(viewer, f"Key {kid} revoked.", f"/members/{member_id}")


@action
async def member_add_certificate(
    request: web.Request, viewer: Viewer, form: Form
) -> web.StreamResponse:
    member_id = request.match_info["id"]
    try:
        await add_member_certificate(
            _live(request),
            viewer.principal,
            member_id,
            {"fingerprint": form.get("fingerprint", "").strip()},
            reinstate=form.get("reinstate") == "true",
        )
    except SchemaInvalid as exc:
        errors = errors_by_field(exc.errors, ["fingerprint"], default="fingerprint")
        return _member_page(request, viewer, errors=errors, values=form)
    raise _done(viewer, "Certificate pinned.", f"/members/{member_id}")


@action
async def member_revoke_certificate(
    request: web.Request, viewer: Viewer, form: Form
) -> web.StreamResponse:
    member_id, fingerprint = request.match_info["id"], request.match_info["fingerprint"]
    await revoke_member_certificate(_live(request), viewer.principal, member_id, fingerprint)
    raise _done(viewer, "Certificate revoked.", f"/members/{member_id}")


@action
async def member_enabled(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    member_id = request.match_info["id"]
    enabled = form.get("enabled") == "true"
    await patch_resource(
        _live(request), viewer.principal, "members", member_id, {"enabled": enabled}
    )
    state = "enabled" if enabled else "disabled"
    raise _done(viewer, f"Member {member_id} {state}.", f"/members/{member_id}")


@action
async def member_services(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    member_id = request.match_info["id"]
    data = await request.post()  # several values under one name
    chosen = [v for v in data.getall("services", []) if isinstance(v, str)]
    try:
        await set_member_services(_live(request), viewer.principal, member_id, {"services": chosen})
    except SchemaInvalid as exc:
        errors = errors_by_field(exc.errors, [], default="services")
        return _member_page(request, viewer, errors=errors)
    raise _done(viewer, "Services saved.", f"/members/{member_id}")


@action
async def member_callback(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    member_id = request.match_info["id"]
    url = form.get("callback_url", "").strip()
    try:
        await patch_resource(
            _live(request), viewer.principal, "members", member_id, {"callback_url": url or None}
        )
    except SchemaInvalid as exc:
        errors = errors_by_field(exc.errors, ["callback_url"], default="callback_url")
        return _member_page(request, viewer, errors=errors, values=form)
    raise _done(viewer, "Callback URL saved.", f"/members/{member_id}")


@action
async def member_replace(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    member_id = request.match_info["id"]
    body, errors = _json_field(form, "document")
    if not errors:
        try:
            await replace_resource(_live(request), viewer.principal, "members", member_id, body)
        except SchemaInvalid as exc:
            errors = errors_by_field(exc.errors, [], default="document")
        else:
            raise _done(viewer, f"Member {member_id} replaced.", f"/members/{member_id}")
    return _member_page(request, viewer, errors=errors, values=form)


def _delete_confirm(request: web.Request, viewer: Viewer, what: str, back: str) -> web.Response:
    viewer.principal.require("write")
    return render(
        request,
        viewer,
        "confirm.html",
        {
            "title": f"Delete {what}?",
            "text": f"{what} is removed from the live configuration at once (audited).",
            "action_url": request.path,
            "button": "Delete",
            "back": back,
        },
    )


@page
async def member_delete_confirm(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    member = _member_or_404(request)
    return _delete_confirm(request, viewer, f"member {member['id']}", f"/members/{member['id']}")


@action
async def member_delete(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    member_id = request.match_info["id"]
    await delete_resource(_live(request), viewer.principal, "members", member_id)
    raise _done(viewer, f"Member {member_id} deleted.", "/members")


# Adapters ----------------------------------------------------------------------------

# The adapter resource's own options (beside name, type and config), as generated fields.
OPTIONS_PREFIX = "adapter."
_OWN = frozenset({"name", "type", "config"})


async def _health(request: web.Request) -> dict[str, dict[str, Any]]:
    slots = request.app[INGRESS][RUNTIME].current.adapters

    async def ask(name: str) -> tuple[str, dict[str, Any]]:
        slot = slots[name]
        try:
            async with asyncio.timeout(1.0):
                health = await slot.adapter.health()
            healthy, detail = health.healthy, health.detail
        except TimeoutError:
            healthy, detail = False, "no answer within 1 s"
        except Exception as exc:  # a failing health check is an unhealthy adapter
            healthy, detail = False, type(exc).__name__
        return name, {
            "healthy": healthy and slot.config.enabled,
            "detail": detail,
            "circuit": slot.breaker.state.value,
        }

    return dict(await asyncio.gather(*(ask(n) for n in slots)))


@page
async def adapters(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    health = await _health(request)
    rows = [
        {
            "name": a["name"],
            "type": a["type"],
            "enabled": a.get("enabled", True),
            **health.get(a["name"], {"healthy": False, "detail": "not built", "circuit": ""}),
        }
        for a in _live(request).items("adapters")
    ]
    types = sorted(adapter_types(refresh=True))
    return render(request, viewer, "adapters.html", {"adapters": rows, "types": types})


def _adapter_form(
    request: web.Request,
    viewer: Viewer,
    *,
    name: str,
    kind: str,
    config: Mapping[str, Any] | None,
    options: Mapping[str, Any] | None,
    errors: FormErrors,
    editing: bool,
    submitted: Mapping[str, str] | None = None,
    retyped: bool = False,
    status: int = 200,
) -> web.Response:
    types = adapter_types(refresh=True)
    if kind not in types:
        errors = {**errors, "type": [*errors.get("type", []), "unknown adapter type"]}
    schema = types[kind].config_schema if kind in types else {}
    context = {
        "editing": editing,
        "name": name,
        "type": kind,
        "types": sorted(types),
        "fields": config_fields(schema, config, errors, submitted=submitted),
        "options": config_fields(
            resource_schema("adapters"),
            options,
            errors,
            submitted=submitted,
            prefix=OPTIONS_PREFIX,
            skip=_OWN,
        ),
        "errors": errors,
        "retyped": retyped,
        "action_url": f"/adapters/{name}" if editing else "/adapters",
    }
    return render(request, viewer, "adapter_form.html", context, status=status)


@page
async def adapter_new(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    viewer.principal.require("write")
    types = sorted(adapter_types(refresh=True))
    kind = request.query.get("type") or (types[0] if types else "")
    return _adapter_form(
        request,
        viewer,
        name=request.query.get("name", ""),
        kind=kind,
        config=None,
        options=None,
        errors={},
        editing=False,
    )


@page
async def adapter_edit(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    viewer.principal.require("write")
    name = request.match_info["name"]
    item = _live(request).get("adapters", name)
    if item is None:
        raise ResourceUnknown(f"no adapter {name}")
    options = {k: v for k, v in item.items() if k not in _OWN}
    return _adapter_form(
        request,
        viewer,
        name=name,
        kind=str(item["type"]),
        config=resource_view("adapters", item).get("config", {}),  # secrets as placeholders
        options=options,
        errors={},
        editing=True,
    )


def _adapter_body(form: Form) -> tuple[dict[str, Any], FormErrors, str]:
    """The adapter a submitted form describes, what could not be read, and the type whose
    fields the form showed (``shown_type``)."""
    kind = form.get("type", "")
    types = adapter_types(refresh=True)
    schema = types[kind].config_schema if kind in types else {}
    config, errors = config_from_form(schema, form)
    options, option_errors = config_from_form(
        resource_schema("adapters"), form, prefix=OPTIONS_PREFIX, skip=_OWN
    )
    body: dict[str, Any] = {"name": form.get("name", "").strip(), "type": kind, **options}
    body["config"] = config
    return body, {**errors, **option_errors}, form.get("shown_type", kind)


async def _save_adapter(
    request: web.Request, viewer: Viewer, form: Form, *, editing: bool
) -> web.StreamResponse:
    body, errors, shown = _adapter_body(form)
    options = {k: v for k, v in body.items() if k not in _OWN}
    if shown != body["type"]:
        # Another type was chosen: show its fields, write nothing.
        return _adapter_form(
            request,
            viewer,
            name=body["name"],
            kind=body["type"],
            config=None,
            options=options,
            errors={},
            editing=editing,
            retyped=True,
        )
    if not errors:
        live = _live(request)
        try:
            if editing:
                await replace_resource(
                    live, viewer.principal, "adapters", request.match_info["name"], body
                )
            else:
                await create_resource(live, viewer.principal, "adapters", body)
        except SchemaInvalid as exc:
            errors = errors_by_field(exc.errors, _adapter_inputs(form))
        except ResourceExists as exc:
            errors = {"name": [exc.detail]}
        else:
            verb = "saved" if editing else "registered"
            raise _done(viewer, f"Adapter {body['name']} {verb}.", "/adapters")
    types = adapter_types()
    if body["type"] in types:  # what was typed into secret fields is not sent back
        shown = resource_view("adapters", body).get("config", {})
        form = resubmitted(types[body["type"]].config_schema, form, shown)
    return _adapter_form(
        request,
        viewer,
        name=body["name"],
        kind=body["type"],
        config=None,
        options=None,
        errors=errors,
        editing=editing,
        submitted=form,
        status=200,
    )


def _adapter_inputs(form: Form) -> list[str]:
    names = ["name", "type"]
    names += [k for k in form if k.startswith("config.")]
    names += [k for k in form if k.startswith(OPTIONS_PREFIX)]
    return [*names, "config"]


@action
async def adapter_create(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    return await _save_adapter(request, viewer, form, editing=False)


@action
async def adapter_save(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    if form.get("name", "") != request.match_info["name"]:
        form = {**form, "name": request.match_info["name"]}
    return await _save_adapter(request, viewer, form, editing=True)


@action
async def adapter_enabled(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    name = request.match_info["name"]
    enabled = form.get("enabled") == "true"
    await patch_resource(_live(request), viewer.principal, "adapters", name, {"enabled": enabled})
    raise _done(viewer, f"Adapter {name} {'enabled' if enabled else 'disabled'}.", "/adapters")


@page
async def adapter_delete_confirm(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    name = request.match_info["name"]
    if _live(request).get("adapters", name) is None:
        raise ResourceUnknown(f"no adapter {name}")
    return _delete_confirm(request, viewer, f"adapter {name}", "/adapters")


@action
async def adapter_delete(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    name = request.match_info["name"]
    await delete_resource(_live(request), viewer.principal, "adapters", name)
    raise _done(viewer, f"Adapter {name} deleted.", "/adapters")


# Services ----------------------------------------------------------------------------

SERVICE_TEMPLATE = {
    "code": "",
    "mode": "sync",
    "request_schema": {"type": "object"},
    "response_schema": {"type": "object"},
    "timeout_s": 10,
}


def _services_page(
    request: web.Request, viewer: Viewer, draft: str, errors: FormErrors, status: int = 200
) -> web.Response:
    rows = _live(request).items("services")
    context = {"services": rows, "draft": draft, "errors": errors}
    return render(request, viewer, "services.html", context, status=status)


@page
async def services(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return _services_page(request, viewer, _pretty(SERVICE_TEMPLATE), {})


@action
async def service_create(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    body, errors = _json_field(form, "service")
    if not errors:
        try:
            rid, _ = await create_resource(_live(request), viewer.principal, "services", body)
        except SchemaInvalid as exc:
            errors = errors_by_field(exc.errors, [], default="service")
        except ResourceExists as exc:
            errors = {"service": [exc.detail]}
        else:
            raise _done(viewer, f"Service {rid} created.", f"/services/{rid}")
    return _services_page(request, viewer, form.get("service", ""), errors)


def _service_page(
    request: web.Request,
    viewer: Viewer,
    draft: str | None = None,
    errors: FormErrors | None = None,
    status: int = 200,
) -> web.Response:
    code = request.match_info["code"]
    service = _live(request).get("services", code)
    if service is None:
        raise ResourceUnknown(f"no service {code}")
    schemas = {
        part: _pretty(service[part])
        for part in ("request_schema", "response_schema", "callback_schema")
        if service.get(part) is not None
    }
    context = {
        "service": service,
        "schemas": schemas,
        "draft": draft if draft is not None else _pretty(service),
        "errors": errors or {},
    }
    return render(request, viewer, "service.html", context, status=status)


@page
async def service_detail(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return _service_page(request, viewer)


@action
async def service_replace(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    code = request.match_info["code"]
    body, errors = _json_field(form, "service")
    if not errors:
        try:
            await replace_resource(_live(request), viewer.principal, "services", code, body)
        except SchemaInvalid as exc:
            errors = errors_by_field(exc.errors, [], default="service")
        else:
            raise _done(viewer, f"Service {code} replaced.", f"/services/{code}")
    return _service_page(request, viewer, form.get("service", ""), errors)


@page
async def service_delete_confirm(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    code = request.match_info["code"]
    if _live(request).get("services", code) is None:
        raise ResourceUnknown(f"no service {code}")
    return _delete_confirm(request, viewer, f"service {code}", f"/services/{code}")


@action
async def service_delete(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    code = request.match_info["code"]
    await delete_resource(_live(request), viewer.principal, "services", code)
    raise _done(viewer, f"Service {code} deleted.", "/services")


# Routes ------------------------------------------------------------------------------


def _routes_page(
    request: web.Request,
    viewer: Viewer,
    values: Mapping[str, str] | None = None,
    errors: FormErrors | None = None,
    status: int = 200,
) -> web.Response:
    live = _live(request)
    context = {
        "routes": live.items("routes"),
        "services": [s.code for s in live.config.services],
        "adapters": [a.name for a in live.config.adapters],
        "values": values or {},
        "errors": errors or {},
    }
    return render(request, viewer, "routes.html", context, status=status)


@page
async def routes_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return _routes_page(request, viewer)


@action
async def route_put(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    body = {"service": form.get("service", ""), "adapter": form.get("adapter", "")}
    if form.get("target", "").strip():
        body["target"] = form["target"].strip()
    try:
        await put_route(_live(request), viewer.principal, body)
    except SchemaInvalid as exc:
        errors = errors_by_field(exc.errors, ["service", "adapter", "target"])
        return _routes_page(request, viewer, form, errors)
    raise _done(viewer, f"Route for {body['service']} saved.", "/routes")


@action
async def route_delete(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    service, target = form.get("service", ""), form.get("target") or None
    await remove_route(_live(request), viewer.principal, service, target)
    raise _done(viewer, f"Route for {service} deleted.", "/routes")


# Messages, dead letters, audit -------------------------------------------------------


def _since(value: str) -> float | None:
    """An ``<input type=datetime-local>`` value, read as UTC."""
    value = value.strip()
    if not value:
        return None
    for pattern in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"):
        try:
            return float(calendar.timegm(time.strptime(value, pattern)))
        except ValueError:
            continue
    raise MalformedRequest("since is a date and time, YYYY-MM-DDTHH:MM (UTC)")


def _sensitive(request: web.Request) -> dict[str, tuple[str, ...]]:
    return {s.code: s.sensitive for s in _live(request).config.services}


@page
async def messages(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    q = request.query
    message_id = q.get("id", "").strip().lower()
    if message_id:
        raise _see_other(f"/messages/{message_id}")
    errors: FormErrors = {}
    try:
        since = _since(q.get("since", ""))
    except MalformedRequest as exc:
        errors["since"] = [exc.detail]
        since = None
    records = await request.app[INGRESS][STORE].search_messages(
        client=q.get("client") or None,
        service=q.get("service") or None,
        state=q.get("state") or None,
        since=since,
        limit=100,
    )
    live = _live(request)
    context = {
        "messages": [
            {
                **for_role(
                    viewer.principal, message_view(r, _sensitive(request).get(r.service, ()))
                ),
                "created": _utc(r.created_at),
                "updated": _utc(r.updated_at),
            }
            for r in records
        ],
        "query": dict(q),
        "errors": errors,
        "states": STATES,
        "services": [s.code for s in live.config.services],
        "members": [m.id for m in live.config.members],
    }
    return render(request, viewer, "messages.html", context, status=200)


@page
async def message_detail(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    message_id = request.match_info["id"].lower()
    store = request.app[INGRESS][STORE]
    records = await store.find_by_message_id(message_id)
    if not records:
        raise ResourceUnknown(f"no message {message_id}")
    items = []
    for record in records:
        view = for_role(
            viewer.principal, message_view(record, _sensitive(request).get(record.service, ()))
        )
        events = await store.message_events(record.seq)
        items.append(
            {
                "view": view,
                "created": _utc(record.created_at),
                "updated": _utc(record.updated_at),
                "timeline": [
                    {"at": _utc(e.at), "kind": e.kind, "state": e.state or ""} for e in events
                ],
                "bodies": {
                    part: _pretty(view[part])
                    for part in ("request", "response", "result")
                    if view[part] is not None
                },
                "headers": _pretty(view["request_headers"]),
                "withheld": bool(view.get(WITHHELD)),
            }
        )
    return render(request, viewer, "message.html", {"message_id": message_id, "items": items})


@page
async def dead_letters(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rows = await request.app[INGRESS][STORE].dead_letters(limit=200)
    shown = [{**dead_letter_view(d), "updated": _utc(d.updated_at)} for d in rows]
    return render(request, viewer, "dead_letters.html", {"dead_letters": shown})


@action
async def dead_letter_redeliver(
    request: web.Request, viewer: Viewer, form: Form
) -> web.StreamResponse:
    message_id = request.match_info["id"]
    kind = await redeliver_dead_letter(request.app[INGRESS], viewer.principal, message_id)
    raise _done(viewer, f"The {kind} {message_id} is queued for delivery again.", "/dead-letters")


@page
async def audit(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    kind = request.query.get("kind") or None
    entries = await request.app[INGRESS][STORE].changes(kind=kind, limit=200)
    shown = [
        {
            **e,
            "when": _utc(e["at"]),
            "before_text": _pretty(e["before"]) if e["before"] is not None else "",
            "after_text": _pretty(e["after"]) if e["after"] is not None else "",
        }
        for e in map(audit_view, entries)
    ]
    kinds = ("adapters", "members", "services", "routes", "tokens", "dead-letters")
    return render(request, viewer, "audit.html", {"entries": shown, "kind": kind, "kinds": kinds})


# Tokens ------------------------------------------------------------------------------


def _tokens_page(
    request: web.Request,
    viewer: Viewer,
    tokens: Sequence[Any],
    *,
    created: Mapping[str, str] | None = None,
    errors: FormErrors | None = None,
    values: Mapping[str, str] | None = None,
    status: int = 200,
) -> web.Response:
    shown = [{**t, "created": _utc(t["created_at"])} for t in map(_fields, tokens)]
    context = {
        "tokens": shown,
        "roles": ROLES,
        "created": created,
        "errors": errors or {},
        "values": values or {},
    }
    return render(request, viewer, "tokens.html", context, status=status)


@page_for("read_tokens")
async def tokens(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rows = await request.app[INGRESS][STORE].list_tokens()
    return _tokens_page(request, viewer, rows)


@action
async def token_create(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    store = request.app[INGRESS][STORE]
    name, role = form.get("name", "").strip(), form.get("role", "")
    try:
        token = await issue_token(store, viewer.principal, name, role)
    except MalformedRequest as exc:
        field = "role" if "role" in exc.detail else "name"
        errors = {field: [exc.detail]}
        return _tokens_page(request, viewer, await store.list_tokens(), errors=errors, values=form)
    created = {"name": name, "role": role, "token": token}
    return _tokens_page(request, viewer, await store.list_tokens(), created=created)


@action
async def token_revoke(request: web.Request, viewer: Viewer, form: Form) -> web.StreamResponse:
    name = request.match_info["name"]
    await withdraw_token(request.app[INGRESS][STORE], viewer.principal, name)
    raise _done(viewer, f"Token {name} revoked; its sessions have ended.", "/tokens")


# Operational monitoring ---------------------------------------------------------------

_WINDOWS = {"1": 3600.0, "6": 6 * 3600.0, "24": 86400.0, "168": 7 * 86400.0}


@page
async def monitoring_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Per-service traffic, latency and error charts from the operational records."""
    hours = request.query.get("hours", "1")
    if hours not in _WINDOWS:
        hours = "1"
    store = request.app[INGRESS][STORE]
    until = time.time()
    since = until - _WINDOWS[hours]
    samples = await store.monitoring_samples(since, until, MAX_SAMPLES)
    rows = aggregate(samples)
    recent = await store.monitoring_records(MonitoringQuery(since=since, limit=20))
    context = {
        "hours": hours,
        "windows": list(_WINDOWS),
        "rows": [a.view() for a in rows],
        "charts": monitoring_charts(rows),
        "truncated": len(samples) >= MAX_SAMPLES,
        "recent": [record_view(r) for r in recent],
    }
    return render(request, viewer, "monitoring.html", context)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", overview),
        web.get("/monitoring", monitoring_page),
        web.get("/signin", signin_page),
        web.post("/signin", signin),
        web.post("/signout", signout),
        web.get("/members", members),
        web.post("/members", member_create),
        web.get("/members/{id}", member_detail),
        web.post("/members/{id}/keys", member_add_key),
        web.get("/members/{id}/keys/{kid}/revoke", member_revoke_confirm),
        web.post("/members/{id}/keys/{kid}/revoke", member_revoke),
        web.post("/members/{id}/certificates", member_add_certificate),
        web.post("/members/{id}/certificates/{fingerprint}/revoke", member_revoke_certificate),
        web.post("/members/{id}/enabled", member_enabled),
        web.post("/members/{id}/services", member_services),
        web.post("/members/{id}/callback", member_callback),
        web.post("/members/{id}/replace", member_replace),
        web.get("/members/{id}/delete", member_delete_confirm),
        web.post("/members/{id}/delete", member_delete),
        web.get("/adapters", adapters),
        web.post("/adapters", adapter_create),
        web.get("/adapters/new", adapter_new),
        web.get("/adapters/{name}/edit", adapter_edit),
        web.post("/adapters/{name}", adapter_save),
        web.post("/adapters/{name}/enabled", adapter_enabled),
        web.get("/adapters/{name}/delete", adapter_delete_confirm),
        web.post("/adapters/{name}/delete", adapter_delete),
        web.get("/services", services),
        web.post("/services", service_create),
        web.get("/services/{code}", service_detail),
        web.post("/services/{code}", service_replace),
        web.get("/services/{code}/delete", service_delete_confirm),
        web.post("/services/{code}/delete", service_delete),
        web.get("/routes", routes_page),
        web.post("/routes", route_put),
        web.post("/routes/delete", route_delete),
        web.get("/messages", messages),
        web.get("/messages/{id}", message_detail),
        web.get("/dead-letters", dead_letters),
        web.post("/dead-letters/{id}/redeliver", dead_letter_redeliver),
        web.get("/audit", audit),
        web.get("/tokens", tokens),
        web.post("/tokens", token_create),
        web.post("/tokens/{name}/revoke", token_revoke),
    ]
