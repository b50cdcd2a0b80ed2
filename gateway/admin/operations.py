"""The admin operations: every write the admin API (``gateway.admin.app``) and the web
console (``gateway.admin.console``) both make, as a function of the live config (or the ingress
app, or the store) and the principal, so both run the very same permission check,
validation, audit entry and live swap. The API's handlers and the console's views are thin
over these; neither imports the other.

``INGRESS`` is the admin app's key for the ingress app it serves (store, live config,
runtime), shared by the API and the console.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.admin.auth import Principal, create_token
from gateway.admin.resources import carry_revocations, check_resource
from gateway.config.secrets import restore
from gateway.errors import (
    ConfigError,
    FieldError,
    MalformedRequest,
    ResourceExists,
    ResourceUnknown,
    SchemaInvalid,
)
from gateway.exchange.app import DELIVERY, STORE
from gateway.masking import masked_error
from gateway.runtime.live import LiveConfig, resource_id
from gateway.states import CallbackState, MessageState
from gateway.store import ResourceChange, Store

__all__ = [
    "INGRESS",
    "KEY",
    "add_member_certificate",
    "add_member_key",
    "create_resource",
    "delete_resource",
    "issue_token",
    "item_or_404",
    "patch_resource",
    "put_route",
    "redeliver_dead_letter",
    "remove_route",
    "replace_resource",
    "revoke_member_certificate",
    "revoke_member_key",
    "set_member_services",
    "withdraw_token",
]

INGRESS = web.AppKey("ingress", web.Application)
# The field that names each resource kind (its id in the live config).
KEY = {"adapters": "name", "members": "id", "services": "code"}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


async def _write(
    live: LiveConfig,
    kind: str,
    rid: str,
    body: Mapping[str, Any] | None,
    action: str,
    principal: Principal,
    *,
    reinstate: bool = False,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if kind == "members" and body is not None:
        # A revoked kid stays revoked unless the request says ?reinstate=true.
        body = carry_revocations(body, live.get(kind, rid), reinstate=reinstate)
    if body is not None:
        check_resource(kind, body, live)
    try:
        return await live.write(
            kind, rid, body, action=action, actor=principal.name, role=principal.role
        )
    except ConfigError as exc:
        raise SchemaInvalid(
            "the change would make the configuration invalid",
            [FieldError("", problem) for problem in exc.problems],
        ) from exc


def item_or_404(live: LiveConfig, kind: str, rid: str) -> dict[str, Any]:
    item = live.get(kind, rid)
    if item is None:
        raise ResourceUnknown(f"no {kind[:-1]} {rid}")
    return item


async def create_resource(
    live: LiveConfig, principal: Principal, kind: str, body: Any, *, reinstate: bool = False
) -> tuple[str, dict[str, Any] | None]:
    """Create an adapter, member or service; its id and its state after."""
    principal.require("write")
    body = restore(kind, body, None)  # a placeholder in a create names no stored secret
    check_resource(kind, body, live)
    rid = resource_id(kind, body)
    if live.get(kind, rid) is not None:
        raise ResourceExists(f"{kind[:-1]} {rid} exists; PUT or PATCH it instead")
    _, after = await _write(live, kind, rid, body, "create", principal, reinstate=reinstate)
    return rid, after


async def replace_resource(
    live: LiveConfig,
    principal: Principal,
    kind: str,
    rid: str,
    body: Any,
    *,
    reinstate: bool = False,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    principal.require("write")
    body = restore(kind, body, live.get(kind, rid))  # placeholders keep the stored secrets
    check_resource(kind, body, live)
    if resource_id(kind, body) != rid:
        raise SchemaInvalid(
            "the body names another resource", [FieldError(f"/{KEY[kind]}", f"must be {rid}")]
        )
    return await _write(live, kind, rid, body, "replace", principal, reinstate=reinstate)


async def patch_resource(
    live: LiveConfig,
    principal: Principal,
    kind: str,
    rid: str,
    changes: Any,
    *,
    reinstate: bool = False,
) -> dict[str, Any] | None:
    """RFC 7396 merge patch; enabling or disabling is an operator's job, the rest an admin's."""
    if not isinstance(changes, Mapping):
        raise MalformedRequest("a merge patch is a JSON object")
    principal.require("operate" if set(changes) <= {"enabled"} else "write")
    current = item_or_404(live, kind, rid)
    # Omitted secrets stay as merged; a repeated placeholder is the stored secret again.
    merged = restore(kind, _merge_patch(current, changes), current)
    if resource_id(kind, merged) != rid:
        raise SchemaInvalid("a patch cannot rename", [FieldError(f"/{KEY[kind]}", "fixed")])
    _, after = await _write(live, kind, rid, merged, "update", principal, reinstate=reinstate)
    return after


async def delete_resource(live: LiveConfig, principal: Principal, kind: str, rid: str) -> None:
    principal.require("write")
    item_or_404(live, kind, rid)
    await _write(live, kind, rid, None, "delete", principal)


async def add_member_key(
    live: LiveConfig, principal: Principal, member_id: str, jwk: Any, *, reinstate: bool = False
) -> None:
    """Add a public JWK to a member; errors point into the JWK itself."""
    principal.require("write")
    member = item_or_404(live, "members", member_id)
    try:  # a new key has no stored secret a placeholder could name
        restore("members", {"keys": [jwk]}, None)
    except SchemaInvalid as exc:
        raise SchemaInvalid(
            exc.detail,
            [FieldError(e.pointer.removeprefix("/keys/0"), e.message) for e in exc.errors],
        ) from exc
    member["keys"] = [*member.get("keys", []), jwk]
    try:
        await _write(live, "members", member_id, member, "add_key", principal, reinstate=reinstate)
    except SchemaInvalid as exc:
        n = len(member["keys"]) - 1
        raise SchemaInvalid(
            exc.detail,
            [FieldError(e.pointer.removeprefix(f"/keys/{n}"), e.message) for e in exc.errors],
        ) from exc


async def revoke_member_key(
    live: LiveConfig, principal: Principal, member_id: str, kid: str
) -> None:
    principal.require("write")
    member = item_or_404(live, "members", member_id)
    keys = member.get("keys", [])
    kept = [k for k in keys if not (isinstance(k, Mapping) and k.get("kid") == kid)]
    if len(kept) == len(keys):
        raise ResourceUnknown(f"{member_id} has no key {kid}")
    member["keys"] = kept
    member["revoked_keys"] = [*member.get("revoked_keys", []), kid]
    await _write(live, "members", member_id, member, "revoke_key", principal)


async def add_member_certificate(
    live: LiveConfig, principal: Principal, member_id: str, body: Any, *, reinstate: bool = False
) -> str:
    """Pin a client certificate (``{"fingerprint": sha256 hex}``) for an mtls member, as a
    key is added: in force on every instance through the live configuration."""
    principal.require("write")
    member = item_or_404(live, "members", member_id)
    fingerprint = body.get("fingerprint") if isinstance(body, Mapping) else None
    if not isinstance(fingerprint, str):
        raise SchemaInvalid(
            'a certificate is {"fingerprint": <sha-256 hex>}',
            [FieldError("/fingerprint", "required")],
        )
    fingerprint = fingerprint.lower().replace(":", "")
    listed = member.get("certificates", [])
    if fingerprint not in listed:
        member["certificates"] = [*listed, fingerprint]
    try:
        await _write(
            live, "members", member_id, member, "add_certificate", principal, reinstate=reinstate
        )
    except SchemaInvalid as exc:
        errors = [FieldError("/fingerprint", e.message) for e in exc.errors]
        raise SchemaInvalid(exc.detail, errors) from exc
    return fingerprint


async def revoke_member_certificate(
    live: LiveConfig, principal: Principal, member_id: str, fingerprint: str
) -> None:
    """Revoke a certificate by fingerprint: unpinned, and refused even where the member's
    ``certificate_ca`` would admit it, until reinstated (``?reinstate=true``)."""
    principal.require("write")
    member = item_or_404(live, "members", member_id)
    fingerprint = fingerprint.lower().replace(":", "")
    listed = member.get("certificates", [])
    revoked = member.get("revoked_certificates", [])
    if fingerprint in revoked:
        raise ResourceUnknown(f"{member_id}'s certificate {fingerprint} is already revoked")
    member["certificates"] = [fp for fp in listed if fp != fingerprint]
    member["revoked_certificates"] = [*revoked, fingerprint]
    await _write(live, "members", member_id, member, "revoke_certificate", principal)


async def set_member_services(
    live: LiveConfig, principal: Principal, member_id: str, body: Any
) -> list[Any]:
    """A member's ACL: ``{services: [...]}``."""
    principal.require("write")
    member = item_or_404(live, "members", member_id)
    if not isinstance(body, Mapping) or not isinstance(body.get("services"), list):
        raise SchemaInvalid("expected {services: [...]}", [FieldError("/services", "required")])
    member["services"] = body["services"]
    await _write(live, "members", member_id, member, "update_acl", principal)
    return list(member["services"])


async def put_route(
    live: LiveConfig, principal: Principal, body: Any
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Create or replace the route for (service, target)."""
    principal.require("write")
    check_resource("routes", body, live)
    rid = resource_id("routes", body)
    return await _write(live, "routes", rid, body, "create", principal)


async def remove_route(
    live: LiveConfig, principal: Principal, service: str, target: str | None
) -> None:
    principal.require("write")
    rid = f"{service}|{target or '*'}"
    item_or_404(live, "routes", rid)
    await _write(live, "routes", rid, None, "delete", principal)


async def redeliver_dead_letter(
    ingress: web.Application, principal: Principal, message_id: str
) -> str:
    """Queue a dead message or callback again (an operator's job); its kind."""
    principal.require("operate")
    message_id = message_id.lower()
    rows = [
        r for r in await ingress[STORE].dead_letters(limit=100_000) if r.message_id == message_id
    ]
    if not rows:
        raise ResourceUnknown(f"no dead letter {message_id}")
    row = rows[0]
    await ingress[STORE].redeliver(row.kind, row.seq, time.time())
    await ingress[STORE].record_change(
        ResourceChange(
            kind="dead-letters",
            id=message_id,
            action="redeliver",
            actor=principal.name,
            role=principal.role,
            # The change trail is a view, not evidence: the error as views show it.
            before={"state": "dead", "attempts": row.attempts, "error": masked_error(row.error)},
            after={
                "state": MessageState.ACCEPTED if row.kind == "message" else CallbackState.PENDING
            },
        )
    )
    delivery = ingress.get(DELIVERY)
    if delivery is not None:
        delivery.wake()
    return row.kind


async def issue_token(store: Store, principal: Principal, name: str, role: str) -> str:
    """A new admin token (shown once), audited."""
    principal.require("write")
    token = await create_token(store, name, role)
    await store.record_change(
        ResourceChange(
            kind="tokens", id=name, action="create", actor=principal.name,
            role=principal.role, after={"name": name, "role": role},
        )
    )  # fmt: skip
    return token


async def withdraw_token(store: Store, principal: Principal, name: str) -> None:
    """Revoke an admin token: its bearer, and every console session signed in with it, is
    refused from the next request on."""
    principal.require("write")
    if not await store.revoke_token(name):
        raise ResourceUnknown(f"no active token {name}")
    await store.record_change(
        ResourceChange(
            kind="tokens", id=name, action="revoke", actor=principal.name, role=principal.role,
            before={"name": name}, after=None,
        )
    )  # fmt: skip
