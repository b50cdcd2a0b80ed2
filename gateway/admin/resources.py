"""Validation of admin writes, with JSON Pointers into the request body.

Each resource is first checked against its part of ``schemas/config.schema.json`` (the
same rules as the file), then by kind: an adapter's ``config`` against its type's JSON
Schema, member keys as JWKs with a ``kid``, service schemas as valid Draft 2020-12,
routes only to adapters and services that exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from typing import Any

import jsonschema

from gateway.config.model import SCHEMA_DIR
from gateway.config.secretstore import own_keys, resolve_resource
from gateway.crypto.keys import VerificationKey
from gateway.errors import FieldError, SchemaInvalid, SecretUnresolved
from gateway.runtime.live import LiveConfig
from gateway.runtime.registry import adapter_types
from gateway.validation import field_errors, pointer_of

__all__ = ["carry_revocations", "check_resource", "resource_schema"]


@cache
def resource_schema(kind: str) -> Mapping[str, Any]:
    """The JSON Schema of one resource, cut from the config schema with its ``$defs``."""
    root = json.loads((SCHEMA_DIR / "config.schema.json").read_text(encoding="utf-8"))
    item = root["properties"][kind]["items"]
    return {"$schema": root["$schema"], "$defs": root["$defs"], **item}


@cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(resource_schema(kind))


def check_resource(kind: str, body: Any, live: LiveConfig) -> None:
    """Raise ``SchemaInvalid`` listing every problem of ``body`` as a ``kind`` resource;
    ``SecretUnresolved`` when a secret reference names a variable or file this gateway
    cannot read (the rest is checked with the values the references resolve to)."""
    errors = field_errors(_validator(kind).iter_errors(body))
    if not errors and isinstance(body, Mapping):
        base = live.config.base
        resolved, problems = resolve_resource(kind, body, base, own=own_keys(live.doc, base))
        if problems:
            raise SecretUnresolved(
                "a secret reference does not resolve on this gateway",
                [FieldError(*problem.split(": ", 1)) for problem in problems],
            )
        errors += _KIND_CHECKS[kind](resolved, live)
    if errors:
        raise SchemaInvalid(f"the {kind[:-1]} is invalid", sorted(errors, key=lambda e: e.pointer))


def _adapter(body: Mapping[str, Any], live: LiveConfig) -> list[FieldError]:
    types = adapter_types(refresh=True)
    kind = body["type"]
    if kind not in types:
        return [FieldError("/type", f"unknown adapter type; installed: {', '.join(sorted(types))}")]
    validator = jsonschema.Draft202012Validator(types[kind].config_schema)
    return [
        FieldError("/config" + e.pointer, e.message)
        for e in field_errors(validator.iter_errors(dict(body.get("config", {}))))
    ]


def _member(body: Mapping[str, Any], live: LiveConfig) -> list[FieldError]:
    errors: list[FieldError] = []
    kids: set[str] = set()
    for i, jwk in enumerate(body.get("keys", [])):
        if not isinstance(jwk, Mapping):
            errors.append(FieldError(f"/keys/{i}", "must be a public JWK object"))
            continue
        if not jwk.get("kid"):
            errors.append(FieldError(f"/keys/{i}/kid", "a kid is required"))
        try:
            key = VerificationKey.from_jwk(jwk)
        except (ValueError, TypeError) as exc:
            errors.append(FieldError(f"/keys/{i}", str(exc)))
            continue
        if key.kid in kids:
            errors.append(FieldError(f"/keys/{i}/kid", "appears twice"))
        if key.kid in body.get("revoked_keys", []):
            errors.append(
                FieldError(
                    f"/keys/{i}/kid",
                    "was revoked for this member; add it again only with ?reinstate=true",
                )
            )
        kids.add(key.kid)
    services = {s.code for s in live.config.services}
    for j, code in enumerate(body.get("services", [])):
        if code not in services:
            errors.append(FieldError(f"/services/{j}", "unknown service"))
    if body["kind"] == "gateway" and not body.get("regions"):
        errors.append(FieldError("/regions", "a peer gateway needs the regions it serves"))
    return errors


def carry_revocations(
    body: Mapping[str, Any], current: Mapping[str, Any] | None, *, reinstate: bool
) -> Mapping[str, Any]:
    """A member write keeps every kid revoked so far, whatever its body says; with
    ``reinstate`` the kids among its keys leave the revoked list (an explicit act)."""
    revoked = body.get("revoked_keys", [])
    if not isinstance(revoked, list) or not isinstance(body.get("keys", []), list):
        return body  # the schema check names the problem
    kept = list(dict.fromkeys([*(current or {}).get("revoked_keys", []), *revoked]))
    if reinstate:
        listed = {k.get("kid") for k in body.get("keys", []) if isinstance(k, Mapping)}
        kept = [kid for kid in kept if kid not in listed]
    merged = {k: v for k, v in body.items() if k != "revoked_keys"}
    if kept:
        merged["revoked_keys"] = kept
    return _carry_certificates(merged, current, reinstate=reinstate)


def _carry_certificates(
    body: dict[str, Any], current: Mapping[str, Any] | None, *, reinstate: bool
) -> dict[str, Any]:
    """The same for certificate fingerprints (``revoked_certificates``)."""
    revoked = body.get("revoked_certificates", [])
    listed = body.get("certificates", [])
    if not isinstance(revoked, list) or not isinstance(listed, list):
        return body  # the schema check names the problem
    kept = list(dict.fromkeys([*(current or {}).get("revoked_certificates", []), *revoked]))
    if reinstate:
        kept = [fp for fp in kept if fp not in listed]
    body.pop("revoked_certificates", None)
    if kept:
        body["revoked_certificates"] = kept
    return body


def _service(body: Mapping[str, Any], live: LiveConfig) -> list[FieldError]:
    errors: list[FieldError] = []
    for part in ("request_schema", "response_schema", "callback_schema"):
        schema = body.get(part)
        if schema is None or isinstance(schema, str):
            continue
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            errors.append(
                FieldError(f"/{part}" + pointer_of(exc), "not a valid Draft 2020-12 schema")
            )
    if body.get("mode") == "async" and body.get("callback_schema") is None:
        errors.append(FieldError("/callback_schema", "an async service needs one"))
    return errors


def _route(body: Mapping[str, Any], live: LiveConfig) -> list[FieldError]:
    errors: list[FieldError] = []
    if body["service"] not in {s.code for s in live.config.services}:
        errors.append(FieldError("/service", "unknown service"))
    if body["adapter"] not in {a.name for a in live.config.adapters}:
        errors.append(FieldError("/adapter", "unknown adapter"))
    return errors


_KIND_CHECKS = {
    "adapters": _adapter,
    "members": _member,
    "services": _service,
    "routes": _route,
}
