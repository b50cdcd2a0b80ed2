"""Roles, route by route and page by page, and secrets that never come back.

The tables below are the policy of docs/security.md ("Threat model: admin roles and
secrets") written out per route; each is checked against the admin listener's own router,
so a route added without a row here fails ``test_every_route_has_a_row``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import secrets
import sqlite3
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.cli import main
from gateway.exchange.app import LIVE
from gateway.exchange.client import ExchangeClient
from gateway.signing import Signer
from tests.conftest import CREDIT_EXAMPLE, PORTAL_ID, Harness, HarnessFactory, Keys
from tests.test_crash import deployed

ALL = frozenset({"admin", "operator", "auditor"})
WRITE = frozenset({"admin"})
OPERATE = frozenset({"admin", "operator"})
TOKENS = frozenset({"admin", "auditor"})
ROLES = ("auditor", "operator", "admin")  # the admin last: its allowed writes go through
NOPE_MEMBER = "330000:nope"
NOPE_ID = "00000000-0000-4000-8000-000000000000"


@dataclass(frozen=True)
class Case:
    method: str
    route: str  # the route's template, as the router names it
    path: str  # a concrete request to it
    allowed: frozenset[str]
    body: Any = None


A = "/admin/v1"
API_CASES = [
    Case("GET", f"{A}/adapter-types", f"{A}/adapter-types", ALL),
    Case("GET", f"{A}/adapter-types/{{type}}", f"{A}/adapter-types/http", ALL),
    Case("GET", f"{A}/adapters", f"{A}/adapters", ALL),
    Case("POST", f"{A}/adapters", f"{A}/adapters", WRITE, {}),
    Case("GET", f"{A}/adapters/{{id}}", f"{A}/adapters/national", ALL),
    Case("PUT", f"{A}/adapters/{{id}}", f"{A}/adapters/nope", WRITE, {}),
    Case("PATCH", f"{A}/adapters/{{id}}", f"{A}/adapters/nope", OPERATE, {"enabled": True}),
    Case("PATCH", f"{A}/adapters/{{id}}", f"{A}/adapters/nope", WRITE, {"concurrency": 2}),
    Case("DELETE", f"{A}/adapters/{{id}}", f"{A}/adapters/nope", WRITE),
    Case("GET", f"{A}/adapters/{{id}}/health", f"{A}/adapters/national/health", ALL),
    Case("GET", f"{A}/members", f"{A}/members", ALL),
    Case("POST", f"{A}/members", f"{A}/members", WRITE, {}),
    Case("GET", f"{A}/members/{{id}}", f"{A}/members/{PORTAL_ID}", ALL),
    Case("PUT", f"{A}/members/{{id}}", f"{A}/members/{NOPE_MEMBER}", WRITE, {}),
    Case("PATCH", f"{A}/members/{{id}}", f"{A}/members/{NOPE_MEMBER}", OPERATE, {"enabled": True}),
    Case("PATCH", f"{A}/members/{{id}}", f"{A}/members/{NOPE_MEMBER}", WRITE, {"name": "x"}),
    Case("DELETE", f"{A}/members/{{id}}", f"{A}/members/{NOPE_MEMBER}", WRITE),
    Case("POST", f"{A}/members/{{id}}/keys", f"{A}/members/{NOPE_MEMBER}/keys", WRITE, {}),
    Case("DELETE", f"{A}/members/{{id}}/keys/{{kid}}", f"{A}/members/{NOPE_MEMBER}/keys/k", WRITE),
    Case(
        "POST",
        f"{A}/members/{{id}}/certificates",
        f"{A}/members/{NOPE_MEMBER}/certificates",
        WRITE,
        {},
    ),
    Case(
        "DELETE",
        f"{A}/members/{{id}}/certificates/{{fingerprint}}",
        f"{A}/members/{NOPE_MEMBER}/certificates/ab",
        WRITE,
    ),
    Case("GET", f"{A}/services", f"{A}/services", ALL),
    Case("POST", f"{A}/services", f"{A}/services", WRITE, {}),
    Case("GET", f"{A}/services/{{id}}", f"{A}/services/credit.query", ALL),
    Case("PUT", f"{A}/services/{{id}}", f"{A}/services/no.such", WRITE, {}),
    Case("PATCH", f"{A}/services/{{id}}", f"{A}/services/no.such", OPERATE, {"enabled": True}),
    Case("DELETE", f"{A}/services/{{id}}", f"{A}/services/no.such", WRITE),
    Case("GET", f"{A}/acl", f"{A}/acl", ALL),
    Case("PUT", f"{A}/acl/{{member}}", f"{A}/acl/{NOPE_MEMBER}", WRITE, {"services": []}),
    Case("GET", f"{A}/routes", f"{A}/routes", ALL),
    Case("POST", f"{A}/routes", f"{A}/routes", WRITE, {}),
    Case("DELETE", f"{A}/routes/{{service}}", f"{A}/routes/no.such", WRITE),
    Case("DELETE", f"{A}/routes/{{service}}/{{target}}", f"{A}/routes/no.such/1:x", WRITE),
    Case("GET", f"{A}/messages", f"{A}/messages", ALL),
    Case("GET", f"{A}/messages/{{id}}", f"{A}/messages/{NOPE_ID}", ALL),
    Case("GET", f"{A}/dead-letters", f"{A}/dead-letters", ALL),
    Case(
        "POST",
        f"{A}/dead-letters/{{id}}/redeliver",
        f"{A}/dead-letters/{NOPE_ID}/redeliver",
        OPERATE,
    ),
    Case("GET", f"{A}/audit", f"{A}/audit", ALL),
    Case("GET", f"{A}/monitoring/records", f"{A}/monitoring/records", ALL),
    Case("GET", f"{A}/tokens", f"{A}/tokens", TOKENS),
    Case("POST", f"{A}/tokens", f"{A}/tokens", WRITE, {}),
    Case("DELETE", f"{A}/tokens/{{name}}", f"{A}/tokens/nobody", WRITE),
]

M = f"/members/{PORTAL_ID}"
# Console pages (GET) and form actions (POST), with the form each action is sent.
CONSOLE_CASES = [
    Case("GET", "/", "/", ALL),
    Case("GET", "/members", "/members", ALL),
    Case("GET", "/members/{id}", M, ALL),
    Case("GET", "/members/{id}/keys/{kid}/revoke", f"{M}/keys/KID/revoke", WRITE),
    Case("GET", "/members/{id}/delete", f"{M}/delete", WRITE),
    Case("GET", "/adapters", "/adapters", ALL),
    Case("GET", "/adapters/new", "/adapters/new", WRITE),
    Case("GET", "/adapters/{name}/edit", "/adapters/national/edit", WRITE),
    Case("GET", "/adapters/{name}/delete", "/adapters/national/delete", WRITE),
    Case("GET", "/services", "/services", ALL),
    Case("GET", "/services/{code}", "/services/credit.query", ALL),
    Case("GET", "/services/{code}/delete", "/services/credit.query/delete", WRITE),
    Case("GET", "/routes", "/routes", ALL),
    Case("GET", "/messages", "/messages", ALL),
    Case("GET", "/messages/{id}", f"/messages/{NOPE_ID}", ALL),
    Case("GET", "/dead-letters", "/dead-letters", ALL),
    Case("GET", "/audit", "/audit", ALL),
    Case("GET", "/monitoring", "/monitoring", ALL),
    Case("GET", "/tokens", "/tokens", TOKENS),
    Case("POST", "/members", "/members", WRITE, {"member": "{}"}),
    Case("POST", "/members/{id}/keys", f"/members/{NOPE_MEMBER}/keys", WRITE, {"jwk": "{}"}),
    Case("POST", "/members/{id}/keys/{kid}/revoke", f"/members/{NOPE_MEMBER}/keys/k/revoke", WRITE),
    Case("POST", "/members/{id}/certificates", f"/members/{NOPE_MEMBER}/certificates", WRITE),
    Case(
        "POST",
        "/members/{id}/certificates/{fingerprint}/revoke",
        f"/members/{NOPE_MEMBER}/certificates/ab/revoke",
        WRITE,
    ),
    Case("POST", "/members/{id}/enabled", f"/members/{NOPE_MEMBER}/enabled", OPERATE),
    Case("POST", "/members/{id}/services", f"/members/{NOPE_MEMBER}/services", WRITE),
    Case("POST", "/members/{id}/callback", f"/members/{NOPE_MEMBER}/callback", WRITE),
    Case(
        "POST",
        "/members/{id}/replace",
        f"/members/{NOPE_MEMBER}/replace",
        WRITE,
        {"document": "{}"},
    ),
    Case("POST", "/members/{id}/delete", f"/members/{NOPE_MEMBER}/delete", WRITE),
    Case("POST", "/adapters", "/adapters", WRITE, {"name": "x", "type": "mock"}),
    Case("POST", "/adapters/{name}", "/adapters/nope", WRITE, {"name": "nope", "type": "mock"}),
    Case("POST", "/adapters/{name}/enabled", "/adapters/nope/enabled", OPERATE),
    Case("POST", "/adapters/{name}/delete", "/adapters/nope/delete", WRITE),
    Case("POST", "/services", "/services", WRITE, {"service": "{}"}),
    Case("POST", "/services/{code}", "/services/no.such", WRITE, {"service": "{}"}),
    Case("POST", "/services/{code}/delete", "/services/no.such/delete", WRITE),
    Case("POST", "/routes", "/routes", WRITE, {"service": "no.such", "adapter": "nope"}),
    Case("POST", "/routes/delete", "/routes/delete", WRITE, {"service": "no.such"}),
    Case("POST", "/dead-letters/{id}/redeliver", f"/dead-letters/{NOPE_ID}/redeliver", OPERATE),
    Case("POST", "/tokens", "/tokens", WRITE, {"name": "", "role": "admin"}),
    Case("POST", "/tokens/{name}/revoke", "/tokens/nobody/revoke", WRITE),
]
# Reachable without a session or a token, by design.
PUBLIC = {("GET", "/signin"), ("POST", "/signin"), ("POST", "/signout"), ("GET", "/openapi.json")}


def _routes(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD" or resource.canonical.startswith("/static"):
            continue
        found.add((route.method, resource.canonical))
    return found


async def test_every_route_has_a_row(harness: Harness) -> None:
    """Each route of the admin listener (API and console) has a role rule in the tables."""
    assert harness.admin.app is not None
    routes = _routes(harness.admin.app)
    listed = {(c.method, c.route) for c in [*API_CASES, *CONSOLE_CASES]} | PUBLIC
    assert routes - listed == set(), "routes without a role rule in tests/test_admin_auth.py"
    assert listed - routes == set(), "rows for routes that do not exist"


async def test_every_admin_api_route_answers_each_role_as_the_policy_says(
    harness: Harness,
) -> None:
    """Table-driven: each route and role gets 403 forbidden exactly where the policy says."""
    wrong = []
    for role in ROLES:
        for case in API_CASES:
            data = json.dumps(case.body).encode() if case.body is not None else None
            async with harness.admin.request(
                case.method, case.path, data=data, headers=harness.auth(role)
            ) as resp:
                status = resp.status
                code = (await resp.json()).get("code") if resp.status != 204 else None
            denied = status == 403 and code == "forbidden"
            if denied == (role in case.allowed) or status >= 500 or status == 401:
                wrong.append((role, case.method, case.path, status, code))
    assert wrong == []


async def _console(harness: Harness, role: str) -> str:
    """Sign ``role`` in on the console's own client session; its CSRF token."""
    async with harness.admin.post(
        "/signin", data={"token": harness.tokens[role]}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    async with harness.admin.get("/members") as resp:
        match = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert match is not None
    return match.group(1)


async def test_every_console_page_and_action_answers_each_role_as_the_policy_says(
    harness: Harness,
) -> None:
    """Table-driven: each page and form for each role: 403 exactly where the policy says."""
    kid = harness.keys.pairs["portal"].kid
    wrong = []
    for role in ROLES:
        csrf = await _console(harness, role)
        for case in CONSOLE_CASES:
            path = case.path.replace("KID", kid)
            if case.method == "GET":
                request = harness.admin.get(path, allow_redirects=False)
            else:
                form = {"csrf": csrf, **(case.body or {})}
                request = harness.admin.post(path, data=form, allow_redirects=False)
            async with request as resp:
                status = resp.status
            denied = status == 403
            if (
                denied == (role in case.allowed)
                or status >= 500
                or (status == 303 and (resp.headers.get("Location") == "/signin"))
            ):
                wrong.append((role, case.method, path, status))
        harness.admin.session.cookie_jar.clear()
    assert wrong == []


async def test_the_tokens_link_is_shown_only_to_roles_that_may_list_tokens(
    harness: Harness,
) -> None:
    """An operator's navigation has no Tokens link; an auditor's and an admin's do."""
    for role, shown in (("operator", False), ("auditor", True), ("admin", True)):
        await _console(harness, role)
        async with harness.admin.get("/") as resp:
            assert ('href="/tokens"' in await resp.text()) is shown, role
        harness.admin.session.cookie_jar.clear()


# Secrets, on a real `gateway serve` -------------------------------------------------


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _run(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _main(argv: list[str]) -> tuple[int, str, str]:
    """``gateway ARGV`` run by its ``main``: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.integration
async def test_written_secrets_never_come_back_from_a_real_gateway(
    keys: Keys, tmp_path: Path
) -> None:
    """A real gateway serve uses written secrets; no API, page, CLI, log or audit shows them."""
    hmac_secret = b"hmac-" + secrets.token_hex(16).encode()
    bearer_1, bearer_2 = (
        "Bearer tok1-" + secrets.token_hex(12),
        "Bearer tok2-" + secrets.token_hex(12),
    )
    api_key = "apikey-" + secrets.token_hex(12)
    k = _b64u(hmac_secret)
    needles = [k, hmac_secret.decode(), bearer_1, bearer_2, api_key]
    needles += [n.removeprefix("Bearer ") for n in (bearer_1, bearer_2)]

    def edit(doc: dict[str, Any]) -> None:
        doc["logging"] = {"level": "DEBUG", "format": "json"}

    async with deployed(keys, tmp_path, edit) as dep:
        doc = yaml.safe_load(dep.config_path.read_text())
        admin_url = f"http://127.0.0.1:{doc['listen']['admin']['port']}"
        await dep.start()
        code, out, err = await _run(
            "admin", "token", "create", "--name", "t-admin", "--role", "admin",
            "--config", str(dep.config_path),
        )  # fmt: skip
        assert code == 0, err
        tokens = {"admin": out.split()[0]}
        seen: list[str] = []
        async with aiohttp.ClientSession() as session:
            for role in ("operator", "auditor"):
                async with session.post(
                    f"{admin_url}/admin/v1/tokens", json={"name": f"t-{role}", "role": role},
                    headers={"Authorization": f"Bearer {tokens['admin']}"},
                ) as resp:  # fmt: skip
                    tokens[role] = (await resp.json())["token"]

            async def call(method: str, path: str, body: Any = None, role: str = "admin") -> Any:
                async with session.request(
                    method, admin_url + path, json=body,
                    headers={"Authorization": f"Bearer {tokens[role]}"},
                ) as resp:  # fmt: skip
                    text = await resp.text()
                    seen.append(text)
                    assert resp.status < 300, (method, path, resp.status, text)
                    return json.loads(text) if text else None

            member = {
                "id": "330000:hmac-system", "kind": "system", "services": ["credit.query"],
                "keys": [{"kty": "oct", "kid": "hmac-1", "alg": "HS256", "k": k}],
            }  # fmt: skip
            national = doc["adapters"][0]["config"]
            adapter = {
                "name": "upstream", "type": "http",
                "config": {
                    "url": national["url"], "verify_response": national["verify_response"],
                    "headers": {"Authorization": bearer_1, "X-Api-Key": api_key},
                },
            }  # fmt: skip
            await call("POST", "/admin/v1/members", member)
            await call("POST", "/admin/v1/adapters", adapter)
            patched = await call(
                "PATCH", "/admin/v1/adapters/upstream",
                {"config": {"headers": {"Authorization": bearer_2}}},
            )  # fmt: skip
            assert patched["config"]["headers"]["X-Api-Key"].startswith("set · ")
            await call(
                "POST", "/admin/v1/routes", {"service": "credit.query", "adapter": "upstream"}
            )

            # The gateway holds the real values: the HMAC member's exchange verifies.
            client = ExchangeClient(
                member_id="330000:hmac-system",
                signer=Signer(secret=hmac_secret, kid="hmac-1", label="sig1"),
                base_url=dep.url,
                session=session,
            )
            reply = await client.exchange("credit.query", CREDIT_EXAMPLE)
            assert reply.status == 200, reply.body
            message = reply.headers["Gw-Message-Id"]

            for role in ("admin", "operator", "auditor"):
                for case in API_CASES:
                    if case.method == "GET" and role in case.allowed and "{" not in case.route:
                        await call("GET", case.path, role=role)
                await call("GET", "/admin/v1/members/330000:hmac-system", role=role)
                await call("GET", "/admin/v1/adapters/upstream", role=role)
                await call("GET", f"/admin/v1/messages/{message}", role=role)
                jar = aiohttp.CookieJar(unsafe=True)  # the console is on an IP address
                async with aiohttp.ClientSession(cookie_jar=jar) as browser:
                    async with browser.post(
                        admin_url + "/signin", data={"token": tokens[role]}
                    ) as resp:
                        assert resp.status == 200
                    pages = [c.path for c in CONSOLE_CASES if c.method == "GET"]
                    pages += ["/members/330000:hmac-system", "/adapters/upstream/edit"]
                    pages += [f"/messages/{message}", "/audit?kind=adapters"]
                    for page in pages:
                        async with browser.get(admin_url + page.replace("KID", "hmac-1")) as resp:
                            seen.append(await resp.text())
            async with session.get(f"{dep.url}/metrics") as resp:
                seen.append(await resp.text())

        trail = await call_json_audit(admin_url, tokens["auditor"])
        changed = next(e for e in trail if e["kind"] == "adapters" and e["action"] == "update")
        before = changed["before"]["config"]["headers"]["Authorization"]
        after = changed["after"]["config"]["headers"]["Authorization"]
        assert before.startswith("set · ")
        assert after.startswith("set · ")
        assert before != after

        # The command line's own code (main, as the script runs it), in a thread: one
        # interpreter start per command would cost the suite seconds for nothing.
        commands = [
            ["admin", *command, "--url", admin_url, "--token", tokens["admin"], *extra]
            for command in (
                ("members", "list"), ("members", "get", "330000:hmac-system"),
                ("adapters", "list"), ("adapters", "get", "upstream"), ("audit",),
            )
            for extra in ((), ("--json",))
        ]  # fmt: skip
        commands.append(["config", "export", "--config", str(dep.config_path)])
        for command in commands:
            code, out, err = await asyncio.to_thread(_main, command)
            assert code == 0, (command, err)
            seen += [out, err]
        assert "set · " in seen[-2]  # the export
        dep.stop()
        seen.append(dep.log.read_text(encoding="utf-8", errors="replace"))
        with sqlite3.connect(dep.db_path) as db:
            seen += [json.dumps(r) for r in db.execute("SELECT * FROM admin_changes")]

    leaks = [(n, i) for n in needles for i, text in enumerate(seen) if n in text]
    assert leaks == [], f"secret bytes found in {len(leaks)} outputs"


async def call_json_audit(admin_url: str, token: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{admin_url}/admin/v1/audit", headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        entries: list[dict[str, Any]] = (await resp.json())["audit"]
        return entries


# In process: the secret still reaches the upstream -----------------------------------


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    return both_backends


async def test_a_patch_repeating_a_placeholder_keeps_the_header_the_upstream_receives(
    make_harness: HarnessFactory,
) -> None:
    """A PATCH repeating or omitting a placeholder keeps the real header the upstream gets."""
    seen: list[str] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{tail:.*}", upstream)
    server = TestServer(app)
    await server.start_server()
    try:
        h = await make_harness()
        bearer = "Bearer " + secrets.token_hex(16)
        adapter = {
            "name": "up",
            "type": "http",
            "config": {"url": str(server.make_url("/x")), "headers": {"Authorization": bearer}},
        }
        async with h.admin.post("/admin/v1/adapters", json=adapter, headers=h.auth()) as resp:
            created = await resp.json()
            assert resp.status == 201, created
        placeholder = created["config"]["headers"]["Authorization"]
        assert placeholder.startswith("set · ")
        for patch in (
            {"config": {"timeout_s": 5}},
            {"config": {"headers": {"Authorization": placeholder}}},
        ):
            async with h.admin.patch("/admin/v1/adapters/up", json=patch, headers=h.auth()) as resp:
                assert resp.status == 200, await resp.text()
        forged = {"config": {"headers": {"Authorization": "set · 00000000"}}}
        async with h.admin.patch("/admin/v1/adapters/up", json=forged, headers=h.auth()) as resp:
            problem = await resp.json()
            assert (resp.status, problem["errors"][0]["pointer"]) == (
                422, "/config/headers/Authorization",
            )  # fmt: skip
        async with h.admin.post(
            "/admin/v1/routes", json={"service": "credit.query", "adapter": "up"},
            headers=h.auth(),
        ) as resp:  # fmt: skip
            assert resp.status in (200, 201)
        await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
        assert seen == [bearer]
        from gateway.exchange.app import STORE

        trail = await h.app[STORE].changes(kind="adapters")
        assert bearer not in json.dumps([(e.before, e.after) for e in trail])
        assert len(trail) == 3
    finally:
        await server.close()


async def test_a_new_key_or_resource_cannot_be_written_as_a_placeholder(harness: Harness) -> None:
    """A placeholder is never stored as a secret: 422 at its pointer; a real value is taken."""
    h = harness
    fake = {"kty": "oct", "kid": "h9", "k": "set · 0123abcd"}
    async with h.admin.post(
        f"/admin/v1/members/{PORTAL_ID}/keys", json=fake, headers=h.auth()
    ) as resp:
        problem = await resp.json()
        assert (resp.status, [e["pointer"] for e in problem["errors"]]) == (422, ["/k"])
    member = {"id": "330000:new-one", "kind": "system", "keys": [fake]}
    async with h.admin.post("/admin/v1/members", json=member, headers=h.auth()) as resp:
        problem = await resp.json()
        assert (resp.status, [e["pointer"] for e in problem["errors"]]) == (422, ["/keys/0/k"])
    real = {**fake, "k": "cmVhbC1zZWNyZXQ"}
    async with h.admin.post(
        f"/admin/v1/members/{PORTAL_ID}/keys", json=real, headers=h.auth()
    ) as resp:
        shown = await resp.json()
        assert resp.status == 201, shown
    assert shown["k"].startswith("set · ")
    stored = h.app[LIVE].get("members", PORTAL_ID)
    assert stored is not None
    assert any(key.get("k") == "cmVhbC1zZWNyZXQ" for key in stored["keys"])


async def test_a_route_added_without_an_access_rule_is_refused_to_every_role(
    harness: Harness,
) -> None:
    """Deny by default: an /admin/v1 route nobody gave a permission answers 403 to all."""
    from gateway.admin import create_admin_app

    async def leaky(request: web.Request) -> web.Response:
        return web.json_response({"leaked": True})

    app = create_admin_app(harness.app)
    app.router.add_get("/admin/v1/unruled", leaky)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        for role in ROLES:
            async with client.get("/admin/v1/unruled", headers=harness.auth(role)) as resp:
                assert (resp.status, (await resp.json())["code"]) == (403, "forbidden")
    finally:
        await client.close()
