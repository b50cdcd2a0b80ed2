"""OpenAPI 3.1 documents of the ingress and admin APIs (served at ``/openapi.json``).

Resource schemas come from ``schemas/config.schema.json`` so the API and the file
cannot drift apart; its ``$defs`` become ``components/schemas``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from gateway import __version__
from gateway.config.model import MEMBER_ID_PATTERN, SCHEMA_DIR, ServiceConfig
from gateway.states import MessageState

__all__ = ["admin_document", "ingress_document", "service_document"]

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def _rewrite(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" else _rewrite(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(v) for v in node]
    return node


@cache
def _config_schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (SCHEMA_DIR / "config.schema.json").read_text(encoding="utf-8")
    )
    return loaded


_FINGERPRINT: dict[str, Any] = {
    "type": "object",
    "required": ["fingerprint"],
    "properties": {"fingerprint": {"type": "string", "pattern": "^[0-9a-fA-F:]{64,95}$"}},
}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _problems(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {
            "description": "RFC 9457 problem",
            "content": {"application/problem+json": {"schema": _PROBLEM}},
        }
        for s in statuses
    }


def _header(
    name: str, description: str, *, required: bool = False, **schema: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": {"type": "string", **schema},
    }


_COMMON_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "message_id": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["pointer", "message"],
                    "properties": {"pointer": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["message_id", "state"],
        "properties": {"message_id": {"type": "string"}, "state": {"type": "string"}},
    },
    "MessageStatus": {
        "type": "object",
        "required": ["message_id", "service", "client", "state", "attempts", "created_at"],
        "properties": {
            "message_id": {"type": "string"},
            "service": {"type": "string"},
            "client": {"type": "string"},
            "target": {"type": ["string", "null"]},
            "state": {"enum": [str(state) for state in MessageState]},
            "attempts": {"type": "integer"},
            "created_at": {"type": "string"},
            "updated_at": {"type": "string"},
            "result": {},
            "error": {"type": "object"},
        },
    },
    "JWKS": {
        "type": "object",
        "required": ["keys"],
        "properties": {"keys": {"type": "array", "items": {"type": "object"}}},
    },
    "Health": {"type": "object", "properties": {"status": {"type": "string"}}},
}

_SIGNED = [
    _header("Gw-Client", "the sender's member id", required=True, pattern=MEMBER_ID_PATTERN),
    _header("Gw-Message-Id", "UUID, the idempotency key", required=True, pattern=_UUID),
    _header("Signature-Input", "RFC 9421", required=True),
    _header("Signature", "RFC 9421", required=True),
]


_RECORDS_PAGE: dict[str, Any] = {
    "type": "object",
    "required": ["records", "next"],
    "properties": {
        "records": {"type": "array", "items": {"type": "object"}},
        "next": {"type": ["string", "null"]},
    },
}


def _monitoring_paths() -> dict[str, Any]:
    """Operational monitoring (gateway/exchange/monitoring.py): signed GETs, no body."""
    query = [
        {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
        for n in ("since", "until", "service", "status", "limit", "cursor")
    ]
    return {
        "/v1/monitoring/records": {
            "get": {
                "operationId": "monitoringRecords",
                "summary": "The caller's own operational records, newest first",
                "parameters": [*query, *_SIGNED],
                "responses": {
                    "200": {
                        "description": "a page of records; next is the cursor of the next",
                        "content": {
                            "application/json": {"schema": _RECORDS_PAGE},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    **_problems(400, 401, 403, 429, 500),
                },
            }
        },
        "/v1/monitoring/aggregates": {
            "get": {
                "operationId": "monitoringAggregates",
                "summary": "Per-service counts, errors and latency percentiles (central monitor)",
                "parameters": [*query[:2], *_SIGNED],
                "responses": {
                    "200": {
                        "description": "the aggregates of the window",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_problems(400, 401, 403, 429, 500),
                },
            }
        },
    }


@cache
def ingress_document() -> dict[str, Any]:
    service_param = {
        "name": "service",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)+$"},
    }
    post_headers = [
        *_SIGNED,
        _header("Content-Digest", "RFC 9530 sha-256 or sha-512", required=True),
        _header("Gw-Target", "the intended receiver", pattern=MEMBER_ID_PATTERN),
        _header("Gw-User", "end user or official acting (masked in logs)"),
        _header("Gw-Issue", "case number (办件编号)"),
        _header("Prefer", "respond-async (RFC 7240)"),
        _header("traceparent", "W3C trace context"),
    ]
    json_body = {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Government data exchange gateway — ingress API",
            "version": __version__,
            "description": "Signed (RFC 9421 + RFC 9530), schema-validated exchange.",
        },
        "paths": {
            "/v1/exchange/{service}": {
                "post": {
                    "operationId": "exchange",
                    "summary": "Send a service request",
                    "parameters": [service_param, *post_headers],
                    "requestBody": json_body,
                    "responses": {
                        "200": {
                            "description": "the receiver's answer, signed",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "202": {
                            "description": "accepted for asynchronous handling",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                        },
                        **_problems(
                            400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 502, 503, 504
                        ),
                    },
                }
            },
            "/v1/messages/{id}": {
                "get": {
                    "operationId": "messageStatus",
                    "summary": "State of a message the caller sent",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        *_SIGNED,
                    ],
                    "responses": {
                        "200": {
                            "description": "the message's state",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/MessageStatus"}
                                }
                            },
                        },
                        **_problems(400, 401, 403, 404, 429, 500, 503),
                    },
                }
            },
            "/v1/callbacks/{service}": {
                "post": {
                    "operationId": "callback",
                    "summary": "A decision from the national platform or a peer gateway",
                    "parameters": [
                        service_param,
                        *post_headers[:5],
                        _header("Gw-Correlation-Id", "the original message id", required=True),
                    ],
                    "requestBody": json_body,
                    "responses": {
                        "200": {
                            "description": "acknowledged (also for a repeated callback)",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_problems(400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 503),
                    },
                }
            },
            **_meta_paths(),
            "/.well-known/jwks.json": {
                "get": {
                    "operationId": "jwks",
                    "summary": "The gateway's public keys",
                    "responses": {
                        "200": {
                            "description": "JWKS",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/JWKS"}
                                }
                            },
                        }
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is alive",
                    "responses": {
                        "200": {
                            "description": "alive",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Health"}
                                }
                            },
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Store writable, keys loaded, adapters healthy",
                    "responses": {
                        "200": {
                            "description": "ready",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "503": {
                            "description": "not ready, with reasons",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": _COMMON_SCHEMAS},
    }
    document["paths"].update(_monitoring_paths())
    return document


def _resource(kind: str) -> dict[str, Any]:
    root = _config_schema()
    return _rewrite(root["properties"][kind]["items"])  # type: ignore[no-any-return]


def _ok(schema: dict[str, Any], status: str = "200", description: str = "OK") -> dict[str, Any]:
    return {
        status: {"description": description, "content": {"application/json": {"schema": schema}}}
    }


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(key: str, name: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [key],
        "properties": {key: {"type": "array", "items": _ref(name)}},
    }


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_UNIX: dict[str, Any] = {"type": "number", "description": "Unix time, seconds"}
_STR_OR_NULL: dict[str, Any] = {"type": ["string", "null"]}

# What the admin API answers, beside the resources cut from the config schema.
_ADMIN_SCHEMAS: dict[str, Any] = {
    "PublicJwk": {
        **_object(["kty", "kid"], kty=_STR, kid={"type": "string", "minLength": 1}),
        "description": "A public JWK (RFC 7517) with its kid; a private one is refused.",
        "not": {"required": ["d"]},
    },
    "AdapterType": _object(
        ["type", "config_schema"],
        type=_STR,
        config_schema={"type": "object", "description": "JSON Schema (Draft 2020-12)"},
    ),
    "AdapterHealth": _object(
        ["name", "type", "enabled", "healthy", "circuit"],
        name=_STR, type=_STR, enabled=_BOOL, healthy=_BOOL, detail=_STR,
        circuit={"enum": ["closed", "open", "half_open"]},
    ),
    "AclEntry": _object(
        ["member", "services"], member=_STR, services={"type": "array", "items": _STR}
    ),
    "MessageRecord": _object(
        ["seq", "message_id", "client", "service", "mode", "state", "attempts",
         "created_at", "updated_at"],
        seq=_INT, message_id=_STR, client=_STR, service=_STR, mode=_STR, state=_STR,
        target=_STR_OR_NULL, adapter=_STR_OR_NULL, status={"type": ["integer", "null"]},
        code=_STR_OR_NULL, error=_STR_OR_NULL, attempts=_INT, request_digest=_STR,
        request_headers={"type": ["object", "null"], "additionalProperties": _STR},
        request={}, response={}, result={},
        withheld={
            "type": "array", "items": _STR,
            "description": "fields left out (null) for a role that may not read bodies",
        },
        timings_ms={"type": "object", "additionalProperties": {"type": "number"}},
        trace_id=_STR_OR_NULL, created_at=_UNIX, updated_at=_UNIX,
    ),
    "DeadLetter": _object(
        ["kind", "seq", "message_id", "service", "attempts"],
        kind={"enum": ["message", "callback"]}, seq=_INT, message_id=_STR, client=_STR,
        service=_STR, attempts=_INT, error=_STR_OR_NULL, updated_at=_UNIX,
    ),
    "Redelivery": _object(
        ["message_id", "kind", "state"],
        message_id=_STR, kind={"enum": ["message", "callback"]}, state={"const": "queued"},
    ),
    "AuditEntry": _object(
        ["seq", "at", "actor", "role", "action", "kind", "resource_id", "before", "after"],
        seq=_INT, at=_UNIX, actor=_STR, role=_STR, action=_STR, kind=_STR, resource_id=_STR,
        before={"description": "the resource before the change; null for a create"},
        after={"description": "the resource after the change; null for a delete"},
    ),
    "Token": _object(
        ["name", "role", "created_at"],
        name=_STR, role={"enum": ["admin", "operator", "auditor"]}, created_at=_UNIX,
        revoked_at={"type": ["number", "null"]},
    ),
    "NewToken": _object(
        ["name", "role", "token"],
        name=_STR, role={"enum": ["admin", "operator", "auditor"]},
        token={"type": "string", "description": "shown once; only its hash is stored"},
    ),
}  # fmt: skip


def _member() -> dict[str, Any]:
    """The config's member, but the API takes keys only as JWK objects, not file paths."""
    member = _resource("members")
    member["properties"]["keys"] = {"type": "array", "items": _ref("PublicJwk")}
    return member


@cache
def admin_document() -> dict[str, Any]:
    obj = {"type": "object"}
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {}
    id_param = _path_param("id")
    names = {"adapters": "Adapter", "members": "Member", "services": "Service"}
    for kind, name in names.items():
        ref = {"$ref": f"#/components/schemas/{name}"}
        listing = _list_of(kind, name)
        paths[f"/admin/v1/{kind}"] = {
            "get": {
                "operationId": f"list_{kind}",
                "responses": {**_ok(listing), **_problems(401, 403)},
            },
            "post": {
                "operationId": f"create_{kind}",
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
                "responses": {**_ok(ref, "201", "created"), **_problems(400, 401, 403, 409, 422)},
            },
        }
        paths[f"/admin/v1/{kind}/{{id}}"] = {
            "parameters": [id_param],
            "get": {
                "operationId": f"get_{kind}",
                "responses": {**_ok(ref), **_problems(401, 403, 404)},
            },
            "put": {
                "operationId": f"replace_{kind}",
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
                "responses": {
                    **_ok(ref),
                    **_ok(ref, "201", "created"),
                    **_problems(400, 401, 403, 422),
                },
            },
            "patch": {
                "operationId": f"patch_{kind}",
                "description": "RFC 7396 JSON Merge Patch; {enabled} alone is an operator's job.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/merge-patch+json": {"schema": obj},
                        "application/json": {"schema": obj},
                    },
                },
                "responses": {**_ok(ref), **_problems(400, 401, 403, 404, 422)},
            },
            "delete": {
                "operationId": f"delete_{kind}",
                "responses": {"204": {"description": "deleted"}, **_problems(401, 403, 404, 422)},
            },
        }
    paths["/admin/v1/adapters/{id}/health"] = {
        "parameters": [id_param],
        "get": {
            "operationId": "adapter_health",
            "responses": {**_ok(_ref("AdapterHealth")), **_problems(401, 403, 404)},
        },
    }
    paths["/admin/v1/adapter-types"] = {
        "get": {
            "operationId": "list_adapter_types",
            "responses": {
                **_ok(_list_of("adapter_types", "AdapterType")),
                **_problems(401, 403),
            },
        }
    }
    paths["/admin/v1/adapter-types/{type}"] = {
        "parameters": [_path_param("type")],
        "get": {
            "operationId": "get_adapter_type",
            "responses": {**_ok(_ref("AdapterType")), **_problems(401, 403, 404)},
        },
    }
    paths["/admin/v1/members/{id}/keys"] = {
        "parameters": [id_param],
        "post": {
            "operationId": "add_key",
            "parameters": [
                {
                    "name": "reinstate",
                    "in": "query",
                    "description": "true: allow a kid this member had revoked back (audited)",
                    "schema": {"type": "string", "enum": ["true", "false"]},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("PublicJwk")}},
            },
            "responses": {
                **_ok(_ref("PublicJwk"), "201", "added"),
                **_problems(400, 401, 403, 404, 422),
            },
        },
    }
    # PUT and PATCH of a whole member keep its revoked kids out too, unless ?reinstate=true.
    reinstate = paths["/admin/v1/members/{id}/keys"]["post"]["parameters"]
    for method in ("put", "patch"):
        paths["/admin/v1/members/{id}"][method]["parameters"] = reinstate
    paths["/admin/v1/members/{id}/keys/{kid}"] = {
        "parameters": [
            id_param,
            _path_param("kid"),
        ],
        "delete": {
            "operationId": "revoke_key",
            "responses": {"204": {"description": "revoked"}, **_problems(401, 403, 404, 422)},
        },
    }
    # Client certificates of mtls members, registered and revoked like keys.
    paths["/admin/v1/members/{id}/certificates"] = {
        "parameters": [id_param],
        "post": {
            "operationId": "add_certificate",
            "parameters": reinstate,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _FINGERPRINT}},
            },
            "responses": {
                **_ok(_FINGERPRINT, "201", "pinned"),
                **_problems(400, 401, 403, 404, 422),
            },
        },
    }
    paths["/admin/v1/members/{id}/certificates/{fingerprint}"] = {
        "parameters": [id_param, _path_param("fingerprint")],
        "delete": {
            "operationId": "revoke_certificate",
            "responses": {"204": {"description": "revoked"}, **_problems(401, 403, 404, 422)},
        },
    }
    paths["/admin/v1/acl"] = {
        "get": {
            "operationId": "list_acl",
            "responses": {**_ok(_list_of("acl", "AclEntry")), **_problems(401, 403)},
        }
    }
    paths["/admin/v1/acl/{member}"] = {
        "parameters": [_path_param("member")],
        "put": {
            "operationId": "put_acl",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["services"],
                            "properties": {
                                "services": {"type": "array", "items": {"type": "string"}}
                            },
                        }
                    }
                },
            },
            "responses": {**_ok(_ref("AclEntry")), **_problems(400, 401, 403, 404, 422)},
        },
    }
    route = _ref("Route")
    paths["/admin/v1/routes"] = {
        "get": {
            "operationId": "list_routes",
            "responses": {**_ok(_list_of("routes", "Route")), **_problems(401, 403)},
        },
        "post": {
            "operationId": "create_route",
            "requestBody": {"required": True, "content": {"application/json": {"schema": route}}},
            "responses": {
                **_ok(route),
                **_ok(route, "201", "created"),
                **_problems(400, 401, 403, 422),
            },
        },
    }
    svc = _path_param("service")
    paths["/admin/v1/routes/{service}"] = {
        "parameters": [svc],
        "delete": {
            "operationId": "delete_route",
            "responses": {"204": {"description": "deleted"}, **_problems(401, 403, 404, 422)},
        },
    }
    paths["/admin/v1/routes/{service}/{target}"] = {
        "parameters": [
            svc,
            _path_param("target"),
        ],
        "delete": {
            "operationId": "delete_target_route",
            "responses": {"204": {"description": "deleted"}, **_problems(401, 403, 404, 422)},
        },
    }
    query = [
        {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
        for n in ("client", "service", "state", "since", "limit")
    ]
    paths["/admin/v1/messages"] = {
        "get": {
            "operationId": "search_messages",
            "parameters": query,
            "responses": {
                **_ok(_list_of("messages", "MessageRecord")),
                **_problems(400, 401, 403),
            },
        }
    }
    paths["/admin/v1/messages/{id}"] = {
        "parameters": [id_param],
        "get": {
            "operationId": "get_message",
            "responses": {**_ok(_ref("MessageRecord")), **_problems(401, 403, 404)},
        },
    }
    paths["/admin/v1/dead-letters"] = {
        "get": {
            "operationId": "list_dead_letters",
            "parameters": query[-1:],
            "responses": {
                **_ok(_list_of("dead_letters", "DeadLetter")),
                **_problems(400, 401, 403),
            },
        }
    }
    paths["/admin/v1/dead-letters/{id}/redeliver"] = {
        "parameters": [id_param],
        "post": {
            "operationId": "redeliver",
            "responses": {**_ok(_ref("Redelivery"), "202", "queued"), **_problems(401, 403, 404)},
        },
    }
    paths["/admin/v1/audit"] = {
        "get": {
            "operationId": "audit",
            "parameters": [
                {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                for n in ("kind", "since", "limit")
            ],
            "responses": {**_ok(_list_of("audit", "AuditEntry")), **_problems(400, 401, 403)},
        }
    }
    paths["/admin/v1/monitoring/records"] = {
        "get": {
            "operationId": "monitoring_records",
            "summary": "Every member's operational records (client= picks one)",
            "parameters": [
                {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                for n in ("client", "since", "until", "service", "status", "limit", "cursor")
            ],
            "responses": {
                "200": {
                    "description": "a page of records",
                    "content": {
                        "application/json": {"schema": _RECORDS_PAGE},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                **_problems(400, 401, 403),
            },
        }
    }
    paths["/admin/v1/tokens"] = {
        "get": {
            "operationId": "list_tokens",
            "responses": {**_ok(_list_of("tokens", "Token")), **_problems(401, 403)},
        },
        "post": {
            "operationId": "create_token",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["name", "role"],
                            "properties": {
                                "name": {"type": "string"},
                                "role": {"enum": ["admin", "operator", "auditor"]},
                            },
                        }
                    }
                },
            },
            "responses": {
                **_ok(_ref("NewToken"), "201", "created; the token is shown once"),
                **_problems(400, 401, 403),
            },
        },
    }
    paths["/admin/v1/tokens/{name}"] = {
        "parameters": [_path_param("name")],
        "delete": {
            "operationId": "revoke_token",
            "responses": {"204": {"description": "revoked"}, **_problems(401, 403, 404)},
        },
    }
    for item in paths.values():
        for method, op in item.items():
            if method != "parameters":
                op["security"] = secured
    paths["/openapi.json"] = {
        "get": {"operationId": "admin_openapi", "security": [], "responses": _ok(obj)}
    }
    schemas = {
        **_COMMON_SCHEMAS,
        **{k: _rewrite(v) for k, v in _config_schema()["$defs"].items()},
        **_ADMIN_SCHEMAS,
        "Adapter": _resource("adapters"),
        "Member": _member(),
        "Service": _resource("services"),
        "Route": _resource("routes"),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Government data exchange gateway — admin API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# Member self-service: discovery (gateway/exchange/meta.py) ------------------------------------

_META_SIGNED = [
    _header("Gw-Client", "the caller's member id", required=True, pattern=MEMBER_ID_PATTERN),
    _header("Gw-Message-Id", "UUID (covered by the signature)", required=True, pattern=_UUID),
    _header("Signature-Input", "RFC 9421", required=True),
    _header("Signature", "RFC 9421", required=True),
]


def _meta_get(operation: str, summary: str, extra: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "parameters": [*extra, *_META_SIGNED],
            "responses": {
                "200": {
                    "description": "signed like an exchange answer",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_problems(400, 401, 403, 404, 429, 500, 503),
            },
        }
    }


def _meta_paths() -> dict[str, Any]:
    """The discovery endpoints, as the ingress document lists them."""
    return {
        "/v1/meta/services": _meta_get("metaServices", "The services the caller may call", []),
        "/v1/meta/services/{code}": _meta_get(
            "metaService",
            "One service's schemas and its OpenAPI 3.1 document",
            [_path_param("code")],
        ),
        "/v1/meta/members": _meta_get(
            "metaMembers", "The members and gateways offering the caller its services", []
        ),
    }


def _embedded(schema: Mapping[str, Any] | bool, name: str) -> Any:
    """A service schema as ``components/schemas/<name>``: its own ``$id`` dropped and its
    local references (``#/...``) re-rooted, so they resolve inside the OpenAPI document."""
    if isinstance(schema, bool):
        return schema
    root = f"#/components/schemas/{name}"

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {
                k: (root + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else walk(v))
                for k, v in node.items()
            }  # fmt: skip
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    out.pop("$id", None)
    return out


def _operation_id(code: str) -> str:
    words = code.replace("_", ".").split(".")
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def service_document(
    service: ServiceConfig, *, servers: Sequence[str] = (), max_body_bytes: int | None = None
) -> dict[str, Any]:
    """OpenAPI 3.1 for one service, as a member calls it: the signed exchange with the
    service's own request and response schemas, its asynchronous acceptance, the status
    read, and (for a service with callbacks) the callback the member receives, as a
    webhook."""
    code = service.code
    asynchronous = service.mode == "async"
    schemas: dict[str, Any] = {
        "Request": _embedded(service.request_schema, "Request"),
        "Response": _embedded(service.response_schema, "Response"),
        "Problem": _COMMON_SCHEMAS["Problem"],
        "Accepted": _COMMON_SCHEMAS["Accepted"],
        "MessageStatus": _COMMON_SCHEMAS["MessageStatus"],
    }
    responses: dict[str, Any] = {}
    if not asynchronous:
        responses["200"] = {
            "description": "the receiver's answer, signed by the gateway",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Response"}}},
        }
    if asynchronous or service.allow_async:
        responses["202"] = {
            "description": "stored, then accepted for asynchronous handling",
            "headers": {"Location": {"schema": {"type": "string"}}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
        }
    responses.update(_problems(400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 502, 503, 504))
    post_headers = [
        *_SIGNED,
        _header("Content-Type", "application/json", required=True),
        _header("Content-Digest", "RFC 9530: sha-256, sha-512 or sm3", required=True),
        _header("Gw-Target", "the intended receiver", pattern=MEMBER_ID_PATTERN),
        _header("Gw-User", "end user or official acting (masked in logs)"),
        _header("Gw-Issue", "case number (办件编号)"),
        _header("traceparent", "W3C trace context"),
    ]
    if service.allow_async and not asynchronous:
        post_headers.append(_header("Prefer", "respond-async (RFC 7240)"))
    body_schema: dict[str, Any] = {"$ref": "#/components/schemas/Request"}
    request_body = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    description = f"Service {code} ({service.mode})"
    if max_body_bytes is not None:
        description += f"; request bodies up to {max_body_bytes} bytes"
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": f"{code}", "version": __version__, "description": description},
        "paths": {
            f"/v1/exchange/{code}": {
                "post": {
                    "operationId": _operation_id(code),
                    "summary": f"Send a {code} request",
                    "parameters": post_headers,
                    "requestBody": request_body,
                    "responses": responses,
                }
            },
            "/v1/messages/{id}": {
                "get": {
                    "operationId": "messageStatus",
                    "summary": "State of a message the caller sent",
                    "parameters": [_path_param("id"), *_SIGNED[:1], *_SIGNED[2:]],
                    "responses": {
                        "200": {
                            "description": "the message's state",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/MessageStatus"}
                                }
                            },
                        },
                        **_problems(400, 401, 404, 429),
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
    if servers:
        document["servers"] = [{"url": url} for url in servers]
    if service.callback_schema is not None:
        schemas["Callback"] = _embedded(service.callback_schema, "Callback")
        document["webhooks"] = {
            f"{code}.callback": {
                "post": {
                    "operationId": _operation_id(code) + "Callback",
                    "summary": "The decision, POSTed to the member's callback URL, signed by "
                    "the gateway (dedupe on Gw-Message-Id)",
                    "parameters": [
                        _header("Gw-Client", "the gateway's member id", required=True),
                        _header("Gw-Message-Id", "this callback's id", required=True),
                        _header("Gw-Correlation-Id", "the original message id", required=True),
                        _header("Content-Digest", "RFC 9530", required=True),
                        _header("Signature-Input", "RFC 9421", required=True),
                        _header("Signature", "RFC 9421", required=True),
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Callback"}
                            }
                        },
                    },
                    "responses": {"200": {"description": "taken (any 2xx)"}},
                }
            }
        }
    return document
