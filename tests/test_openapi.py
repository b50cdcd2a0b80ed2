"""The OpenAPI 3.1 documents served at /openapi.json: valid, complete, and true to the apps."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.exchange.openapi import admin_document, ingress_document
from tests.conftest import CREDIT_EXAMPLE, PORTAL_ID, TAX_ID, Harness

METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}

Client = TestClient[web.Request, web.Application]


async def served(client: Client) -> dict[str, Any]:
    """The document as a client gets it: no credentials, over HTTP."""
    async with client.get("/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        document: dict[str, Any] = await resp.json()
        return document


def registered(app: web.Application) -> set[tuple[str, str]]:
    """(path template, method) of every route in an app's router; HEAD is aiohttp's echo.
    The web console's pages and stylesheet (gateway/admin/console/) are HTML, not API."""
    operations = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        assert route.resource is not None
        if isinstance(route.resource, web.StaticResource) or getattr(
            route.handler, "__module__", ""
        ).startswith("gateway.admin.console"):
            continue
        # `canonical` is the path with each `{name:regex}` written `{name}`, as OpenAPI does.
        operations.add((route.resource.canonical, route.method.lower()))
    return operations


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def listeners(harness: Harness) -> list[tuple[str, Client, dict[str, Any]]]:
    return [
        ("ingress", harness.gateway, ingress_document()),
        ("admin", harness.admin, admin_document()),
    ]


async def test_both_documents_are_valid_openapi_3_1(harness: Harness) -> None:
    """Each listener serves its own document, and it validates as OpenAPI 3.1."""
    for name, client, expected in listeners(harness):
        document = await served(client)
        assert document == expected, name
        assert document["openapi"].startswith("3.1."), name
        errors = [f"{list(e.absolute_path)}: {e.message}"
                  for e in OpenAPIV31SpecValidator(document).iter_errors()]  # fmt: skip
        assert errors == [], name


async def test_every_route_is_documented_and_nothing_else(harness: Harness) -> None:
    """Router and document list the same (path, method) pairs: none missing, none phantom."""
    for name, client, _ in listeners(harness):
        app = client.app
        assert app is not None
        routes, paths = registered(app), documented(await served(client))
        assert len(routes) > 5, name
        assert routes - paths == set(), f"{name}: routes missing from the document"
        assert paths - routes == set(), f"{name}: phantom routes"


def test_path_parameters_are_declared_exactly() -> None:
    """Each templated path declares exactly the parameters its template names, no more."""
    for name, document in (("ingress", ingress_document()), ("admin", admin_document())):
        for path, item in document["paths"].items():
            declared_on_path = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
            for method in set(item) & METHODS:
                declared = declared_on_path | {
                    p["name"] for p in item[method].get("parameters", []) if p["in"] == "path"
                }
                template = {part[1:-1] for part in path.split("/") if part.startswith("{")}
                assert declared == template, (name, path, method)


def _validator(document: dict[str, Any], component: str) -> jsonschema.Draft202012Validator:
    """A validator for one of the document's component schemas, its $refs resolved in it."""
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:openapi", resource)
    return jsonschema.Draft202012Validator(
        {"$ref": f"urn:openapi#/components/schemas/{component}"}, registry=registry
    )


@pytest.mark.parametrize(
    ("component", "body"),
    [
        (
            "Member",
            {"id": "330000:tax-system", "kind": "system", "services": ["credit.query"],
             "callback_url": "http://127.0.0.1:9/cb", "regions": ["330000"],
             "keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1",
                       "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]},
        ),
        ("Adapter", {"name": "national", "type": "national_platform", "config": {}}),
        (
            "Service",
            {"code": "credit.query", "mode": "sync", "request_schema": {"type": "object"},
             "response_schema": {}, "callback_schema": {}, "timeout_s": 10,
             "max_body_bytes": 1048576},
        ),
        ("Route", {"service": "credit.query", "adapter": "national", "target": "440000:gateway"}),
    ],
)  # fmt: skip
def test_request_schemas_accept_the_shapes_protocol_md_gives(
    component: str, body: dict[str, Any]
) -> None:
    """The admin document's resource schemas accept PROTOCOL.md's example bodies as written."""
    errors = [e.message for e in _validator(admin_document(), component).iter_errors(body)]
    assert errors == []


def _response_validator(
    document: dict[str, Any], path: str, method: str, status: str, media: str = "application/json"
) -> jsonschema.Draft202012Validator:
    """A validator for the schema one operation documents for one answer."""
    parts = ["paths", path, method, "responses", status, "content", media, "schema"]
    pointer = "/".join(quote(p.replace("~", "~0").replace("/", "~1"), safe="") for p in parts)
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:openapi", resource)
    return jsonschema.Draft202012Validator({"$ref": f"urn:openapi#/{pointer}"}, registry=registry)


async def test_admin_answers_conform_to_their_documented_schemas(harness: Harness) -> None:
    """Every admin GET, two writes and a 401 answer exactly what the document says they do."""
    document = admin_document()
    assert (await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    headers = harness.auth()
    acl = {"services": ["credit.query"]}
    async with harness.admin.put(f"/admin/v1/acl/{TAX_ID}", json=acl, headers=headers) as resp:
        writes = [("/admin/v1/acl/{member}", "put", resp.status, await resp.json())]
    token = {"name": "ops-2", "role": "operator"}
    async with harness.admin.post("/admin/v1/tokens", json=token, headers=headers) as resp:
        writes.append(("/admin/v1/tokens", "post", resp.status, await resp.json()))
    async with harness.admin.get("/admin/v1/messages", headers=headers) as resp:
        message_id = (await resp.json())["messages"][0]["message_id"]
    reads = {
        "/admin/v1/adapters": "/admin/v1/adapters",
        "/admin/v1/adapters/{id}": "/admin/v1/adapters/national",
        "/admin/v1/adapters/{id}/health": "/admin/v1/adapters/national/health",
        "/admin/v1/adapter-types": "/admin/v1/adapter-types",
        "/admin/v1/adapter-types/{type}": "/admin/v1/adapter-types/http",
        "/admin/v1/members": "/admin/v1/members",
        "/admin/v1/members/{id}": f"/admin/v1/members/{PORTAL_ID}",
        "/admin/v1/services": "/admin/v1/services",
        "/admin/v1/services/{id}": "/admin/v1/services/credit.query",
        "/admin/v1/routes": "/admin/v1/routes",
        "/admin/v1/acl": "/admin/v1/acl",
        "/admin/v1/messages": "/admin/v1/messages",
        "/admin/v1/messages/{id}": f"/admin/v1/messages/{message_id}",
        "/admin/v1/dead-letters": "/admin/v1/dead-letters",
        "/admin/v1/audit": "/admin/v1/audit",
        "/admin/v1/tokens": "/admin/v1/tokens",
        "/admin/v1/monitoring/records": "/admin/v1/monitoring/records",
    }
    documented_gets = {p for p, m in documented(document) if m == "get" and p != "/openapi.json"}
    assert set(reads) == documented_gets  # every documented read is exercised here
    for template, concrete in reads.items():
        async with harness.admin.get(concrete, headers=headers) as resp:
            assert (resp.status, resp.content_type) == (200, "application/json"), concrete
            answer = await resp.json()
        validator = _response_validator(document, template, "get", "200")
        assert [e.message for e in validator.iter_errors(answer)] == [], (concrete, answer)
    for template, method, status, answer in writes:
        validator = _response_validator(document, template, method, str(status))
        assert [e.message for e in validator.iter_errors(answer)] == [], (template, answer)
    async with harness.admin.get(f"/admin/v1/members/{PORTAL_ID}") as resp:
        assert resp.status == 401
        problem = await resp.json(content_type="application/problem+json")
    validator = _response_validator(
        document, "/admin/v1/members/{id}", "get", "401", "application/problem+json"
    )
    assert [e.message for e in validator.iter_errors(problem)] == []


@pytest.mark.parametrize(
    ("label", "key"),
    [
        ("a JWK file path", "keys/member.jwk.json"),
        ("a JWK without kid", {"kty": "OKP", "crv": "Ed25519",
                               "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
        ("a private JWK", {"kty": "OKP", "crv": "Ed25519", "kid": "k",
                           "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                           "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}),
    ],
)  # fmt: skip
async def test_document_and_api_agree_on_member_keys(
    harness: Harness, label: str, key: Any
) -> None:
    """A key the API refuses (a path, no kid, a private JWK) is one the document refuses."""
    member = {"id": "330000:keyed", "kind": "system", "keys": [key]}
    errors = list(_validator(admin_document(), "Member").iter_errors(member))
    assert errors != [], label
    async with harness.admin.post("/admin/v1/members", json=member, headers=harness.auth()) as r:
        assert r.status == 422, label


async def test_unsigned_ingress_answers_conform_to_their_documented_schemas(
    harness: Harness,
) -> None:
    """Each ingress GET that needs no signature answers a documented status, type and body."""
    document = ingress_document()
    reads = sorted(
        path
        for path, item in document["paths"].items()
        if "get" in item and "{" not in path and "parameters" not in item["get"]
    )
    assert reads == ["/.well-known/jwks.json", "/healthz", "/metrics", "/openapi.json", "/readyz"]
    for path in reads:
        async with harness.gateway.get(path) as resp:
            status, media, body = str(resp.status), resp.content_type, await resp.read()
        documented_answer = document["paths"][path]["get"]["responses"].get(status)
        assert documented_answer is not None, (path, status)
        assert media in documented_answer["content"], (path, media)
        if media == "application/json":
            validator = _response_validator(document, path, "get", status)
            answer = json.loads(body)
            assert [e.message for e in validator.iter_errors(answer)] == [], (path, answer)
