"""The console over HTTP, without a browser: sessions, CSRF, origin, roles, revocation.

Browser flows are in tests/test_console_browser.py; these pin the security properties
at the HTTP level, where each header and status can be read.
"""

from __future__ import annotations

import datetime
import json
import re
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.admin import create_admin_app
from gateway.admin.console import CONSOLE, CSP
from gateway.exchange.app import LIVE, STORE
from tests.conftest import PORTAL_ID, Harness

Client = TestClient[web.Request, web.Application]


async def _sign_in(admin: Client, token: str) -> str:
    """Sign in; the CSRF token of the session (from a form on the overview)."""
    async with admin.post("/signin", data={"token": token}, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"] == "/"
    async with admin.get(f"/members/{PORTAL_ID}") as resp:
        assert resp.status == 200
        match = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert match is not None
    return match.group(1)


async def test_sign_in_sets_a_strict_http_only_session_cookie(harness: Harness) -> None:
    """HttpOnly, SameSite=Strict, Path=/, Max-Age; not Secure over plain HTTP; the cookie
    is not the token; the sessions keep only the token's hash."""
    token = harness.tokens["admin"]
    async with harness.admin.post("/signin", data={"token": token}, allow_redirects=False) as resp:
        assert resp.status == 303
        cookie = resp.cookies["gw_console"]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/"
    assert int(cookie["max-age"]) == 8 * 3600
    assert not cookie["secure"]
    assert token not in cookie.value
    sessions = harness.admin.app[CONSOLE].sessions if harness.admin.app else None
    assert sessions is not None
    assert len(sessions) == 1
    assert token not in repr(list(sessions._open.values()))


async def test_a_wrong_or_missing_token_is_refused_on_the_field(harness: Harness) -> None:
    """No session; the Token field says why, aria-invalid."""
    for token, status in (("gwa_wrong", 401), ("", 401)):
        async with harness.admin.post("/signin", data={"token": token}) as resp:
            assert resp.status == status
            page = await resp.text()
        assert 'aria-invalid="true"' in page
        assert "gw_console" not in resp.cookies
    assert await _status(harness.admin, "/") == 303


async def _status(admin: Client, path: str) -> int:
    async with admin.get(path, allow_redirects=False) as resp:
        return resp.status


async def test_every_page_needs_a_session_and_carries_the_csp(harness: Harness) -> None:
    """Signed out, pages redirect to the sign-in page; every answer has the CSP."""
    for path in ("/", "/members", "/adapters", "/messages", "/audit", "/tokens"):
        async with harness.admin.get(path, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/signin"
            assert resp.headers["Content-Security-Policy"] == CSP
    async with harness.admin.get("/static/console.css") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
    async with harness.admin.get("/signin") as resp:
        page = await resp.text()
    assert "<script" not in page
    assert "style=" not in page


async def test_a_write_without_the_csrf_token_or_from_elsewhere_changes_nothing(
    harness: Harness,
) -> None:
    """Missing CSRF token, another session's, or a foreign Origin: refused, not written."""
    csrf = await _sign_in(harness.admin, harness.tokens["admin"])
    url = f"/members/{PORTAL_ID}/enabled"
    attempts = [
        ({"enabled": "false"}, {}),
        ({"enabled": "false", "csrf": "forged"}, {}),
        ({"enabled": "false", "csrf": csrf}, {"Origin": "http://evil.example"}),
    ]
    for data, headers in attempts:
        async with harness.admin.post(url, data=data, headers=headers) as resp:
            assert resp.status == 400
            assert "stale or came from elsewhere" in await resp.text()
    member = harness.app[LIVE].get("members", PORTAL_ID)
    assert member is not None
    assert member.get("enabled", True) is True
    async with harness.admin.post(
        url, data={"enabled": "false", "csrf": csrf}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    member = harness.app[LIVE].get("members", PORTAL_ID)
    assert member is not None
    assert member["enabled"] is False
    trail = await harness.app[STORE].changes(kind="members")
    assert [(e.action, e.actor) for e in trail] == [("update", "test-admin")]


async def test_revoking_the_token_ends_its_sessions(harness: Harness) -> None:
    """Revoked through the admin API, the token's console session is refused at once."""
    await _sign_in(harness.admin, harness.tokens["operator"])
    assert await _status(harness.admin, "/members") == 200
    async with harness.admin.delete(
        "/admin/v1/tokens/test-operator", headers=harness.auth("admin")
    ) as resp:
        assert resp.status == 204
    assert await _status(harness.admin, "/members") == 303
    sessions = harness.admin.app[CONSOLE].sessions if harness.admin.app else None
    assert sessions is not None
    assert len(sessions) == 0


async def test_sign_out_ends_the_session_and_needs_its_csrf_token(harness: Harness) -> None:
    """A forged sign-out does not end the session (no logout CSRF); the real one does."""
    csrf = await _sign_in(harness.admin, harness.tokens["auditor"])
    cookie = harness.admin.session.cookie_jar.filter_cookies(harness.admin.make_url("/"))
    value = cookie["gw_console"].value
    sessions = harness.admin.app[CONSOLE].sessions if harness.admin.app else None
    assert sessions is not None
    async with harness.admin.post("/signout", data={}, allow_redirects=False) as resp:
        assert resp.status == 303
    assert sessions.get(value) is not None  # the browser forgot it; the server did not
    harness.admin.session.cookie_jar.update_cookies({"gw_console": value})
    async with harness.admin.post("/signout", data={"csrf": csrf}, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/signin"
    assert sessions.get(value) is None


@pytest.mark.parametrize(("role", "status"), [("auditor", 403), ("operator", 403), ("admin", 303)])
async def test_roles_decide_as_in_the_api(harness: Harness, role: str, status: int) -> None:
    """Deleting a route needs an admin: the console asks the API's own permission check."""
    csrf = await _sign_in(harness.admin, harness.tokens[role])
    async with harness.admin.post(
        "/routes/delete",
        data={"csrf": csrf, "service": "crossregion.apply", "target": ""},
        allow_redirects=False,
    ) as resp:
        assert resp.status == status
    routes = [r["service"] for r in harness.app[LIVE].items("routes")]
    assert ("crossregion.apply" in routes) is (role != "admin")


def test_dev_py_installs_chromium_as_root_and_otherwise_says_how(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python3 dev.py test``'s chromium step: apt-get as root, else a hint, never both."""
    import os
    import shutil

    import dev

    installs: list[str] = []
    monkeypatch.setattr(dev, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(dev, "_apt_install", installs.append)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    dev.ensure_chromium()
    assert installs == ["chromium"]
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    dev.ensure_chromium()
    assert installs == ["chromium"]
    assert "sudo apt-get install chromium" in capsys.readouterr().out


async def test_an_invalid_document_is_shown_on_its_field_and_nothing_is_written(
    harness: Harness,
) -> None:
    """A service with an invalid schema: the API's pointer and message on the text area."""
    csrf = await _sign_in(harness.admin, harness.tokens["admin"])
    body = json.dumps(
        {"code": "tax.query", "mode": "sync", "request_schema": {"type": 7}, "response_schema": {}}
    )
    async with harness.admin.post("/services", data={"csrf": csrf, "service": body}) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert re.search(r'<textarea id="f-service"[^>]*aria-invalid="true"', page)
    assert "/request_schema/type: not a valid Draft 2020-12 schema" in page
    assert harness.app[LIVE].get("services", "tax.query") is None
    assert await harness.app[STORE].changes() == []


@pytest.mark.parametrize(("role", "status"), [("auditor", 403), ("operator", 303)])
async def test_an_operator_may_disable_a_member_and_an_auditor_may_not(
    harness: Harness, role: str, status: int
) -> None:
    """Enable/disable is an operator's job, as in the API (PATCH of only ``enabled``)."""
    csrf = await _sign_in(harness.admin, harness.tokens[role])
    async with harness.admin.post(
        f"/members/{PORTAL_ID}/enabled",
        data={"csrf": csrf, "enabled": "false"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == status
    member = harness.app[LIVE].get("members", PORTAL_ID)
    assert member is not None
    assert member.get("enabled", True) is (role == "auditor")


async def test_an_adapter_is_edited_through_its_generated_form(harness: Harness) -> None:
    """The edit form shows the current config; saving replaces it, live and audited. A
    delete the configuration cannot take (routes use it) shows why and deletes nothing."""
    csrf = await _sign_in(harness.admin, harness.tokens["admin"])
    async with harness.admin.get("/adapters/national/edit") as resp:
        page = await resp.text()
    url = re.search(r'id="f-config-url" name="config.url" type="text" value="([^"]+)"', page)
    assert url is not None
    form = {
        "csrf": csrf,
        "name": "national",
        "type": "http",
        "shown_type": "http",
        "config.url": url.group(1),
        "config.timeout_s": "7.5",
        "config.forward_user": "true",
        "adapter.concurrency": "3",
    }
    async with harness.admin.post("/adapters/national", data=form, allow_redirects=False) as resp:
        assert resp.status == 303
    adapter = harness.app[LIVE].get("adapters", "national")
    assert adapter is not None
    assert adapter["config"]["timeout_s"] == 7.5
    assert adapter["concurrency"] == 3
    assert "health_url" not in adapter["config"]  # left blank: removed
    trail = await harness.app[STORE].changes(kind="adapters")
    assert [(e.resource_id, e.action) for e in trail] == [("national", "replace")]
    async with harness.admin.post("/adapters/national/delete", data={"csrf": csrf}) as resp:
        assert resp.status == 422
        assert "would make the configuration invalid" in await resp.text()
    assert harness.app[LIVE].get("adapters", "national") is not None


def _self_signed(directory: Path) -> ssl.SSLContext:
    """A server context with a throwaway certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "console.crt", directory / "console.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


async def test_under_tls_the_session_cookie_is_secure(harness: Harness, tmp_path: Path) -> None:
    """The admin app served over HTTPS sets the cookie Secure (browsers then never send
    it over plain HTTP)."""
    server = TestServer(create_admin_app(harness.app))
    await server.start_server(ssl=_self_signed(tmp_path))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.make_url("/signin"),
                data={"token": harness.tokens["admin"]},
                allow_redirects=False,
                ssl=False,  # a throwaway certificate; what is checked is the cookie
            ) as resp,
        ):
            assert resp.status == 303
            cookie = resp.cookies["gw_console"]
        assert cookie["secure"] is True
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
    finally:
        await server.close()


async def test_an_adapters_secret_headers_show_as_placeholders_and_an_unchanged_form_keeps_them(
    harness: Harness,
) -> None:
    """Header values show as placeholders, kept when saved as shown, never echoed back."""
    bearer = "Bearer console-secret-1"
    adapter = {
        "name": "up",
        "type": "http",
        "config": {"url": "http://127.0.0.1:9/x", "headers": {"Authorization": bearer}},
    }
    async with harness.admin.post(
        "/admin/v1/adapters", json=adapter, headers=harness.auth()
    ) as resp:
        assert resp.status == 201
    csrf = await _sign_in(harness.admin, harness.tokens["admin"])
    async with harness.admin.get("/adapters/up/edit") as resp:
        page = await resp.text()
    assert "console-secret-1" not in page
    textarea = re.search(r'name="config.headers"[^>]*>([^<]*)</textarea>', page)
    assert textarea is not None
    shown = json.loads(textarea.group(1).replace("&#34;", '"').replace("&quot;", '"'))
    assert re.fullmatch(r"set · [0-9a-f]{8}", shown["Authorization"])
    assert "Write-only" in page
    form = {
        "csrf": csrf, "name": "up", "type": "http", "shown_type": "http",
        "config.url": "http://127.0.0.1:9/y", "config.headers": json.dumps(shown),
    }  # fmt: skip
    async with harness.admin.post("/adapters/up", data=form, allow_redirects=False) as resp:
        assert resp.status == 303
    stored = harness.app[LIVE].get("adapters", "up")
    assert stored is not None
    assert stored["config"]["url"] == "http://127.0.0.1:9/y"
    assert stored["config"]["headers"] == {"Authorization": bearer}

    typed = {**form, "config.headers": json.dumps({"Authorization": "Bearer console-secret-2"})}
    async with harness.admin.post(
        "/adapters/up", data={**typed, "config.timeout_s": "soon"}, allow_redirects=False
    ) as resp:
        refused = await resp.text()
        assert resp.status == 200
    assert "must be a number" in refused
    assert "console-secret-2" not in refused
    async with harness.admin.post("/adapters/up", data=typed, allow_redirects=False) as resp:
        assert resp.status == 303
    stored = harness.app[LIVE].get("adapters", "up")
    assert stored is not None
    assert stored["config"]["headers"] == {"Authorization": "Bearer console-secret-2"}
    async with harness.admin.get("/audit?kind=adapters") as resp:
        trail = await resp.text()
    assert "console-secret" not in trail
    assert trail.count("set · ") >= 3


async def test_an_hmac_members_page_shows_its_key_as_a_fingerprint_and_a_replace_keeps_it(
    harness: Harness,
) -> None:
    """No role's member page holds k; a replace of the shown document keeps the secret."""
    k = "aG1hYy1jb25zb2xlLXNlY3JldA"  # base64url of b"hmac-console-secret"
    member = {
        "id": "330000:hmac-desk", "kind": "system", "services": [],
        "keys": [{"kty": "oct", "kid": "h1", "k": k}],
    }  # fmt: skip
    async with harness.admin.post("/admin/v1/members", json=member, headers=harness.auth()) as resp:
        assert resp.status == 201
    for role in ("auditor", "operator", "admin"):
        harness.admin.session.cookie_jar.clear()
        csrf = await _sign_in(harness.admin, harness.tokens[role])
        async with harness.admin.get("/members/330000:hmac-desk") as resp:
            page = await resp.text()
        assert k not in page
        assert "set · " in page
    document = re.search(r'name="document"[^>]*>([^<]*)</textarea>', page)
    assert document is not None
    text = document.group(1).replace("&#34;", '"').replace("&quot;", '"')
    async with harness.admin.post(
        "/members/330000:hmac-desk/replace",
        data={"csrf": csrf, "document": text},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303, await resp.text()
    stored = harness.app[LIVE].get("members", "330000:hmac-desk")
    assert stored is not None
    assert stored["keys"][0]["k"] == k


async def test_the_console_pins_and_revokes_a_members_certificate(harness: Harness) -> None:
    """An admin pins a fingerprint on the member page, revokes it, and cannot pin it again
    without reinstate; an auditor cannot pin at all (mTLS onboarding, issue 26)."""
    member = {"id": "330000:legacy-desk", "kind": "system", "auth": ["mtls"], "services": []}
    async with harness.admin.post("/admin/v1/members", json=member, headers=harness.auth()) as resp:
        assert resp.status == 201, await resp.text()
    fp = "ab" * 32
    page_url = "/members/330000:legacy-desk"
    csrf = await _sign_in(harness.admin, harness.tokens["admin"])
    form = {"csrf": csrf, "fingerprint": fp.upper()}
    async with harness.admin.post(
        f"{page_url}/certificates", data=form, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
    stored = harness.app[LIVE].get("members", "330000:legacy-desk")
    assert stored is not None
    assert stored["certificates"] == [fp]
    async with harness.admin.get(page_url) as resp:
        assert fp in await resp.text()
    async with harness.admin.post(
        f"{page_url}/certificates/{fp}/revoke", data={"csrf": csrf}, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
    stored = harness.app[LIVE].get("members", "330000:legacy-desk")
    assert stored is not None
    assert (stored.get("certificates"), stored["revoked_certificates"]) == ([], [fp])
    async with harness.admin.post(f"{page_url}/certificates", data=form) as resp:
        assert "is revoked for this member" in await resp.text()  # shown on the form
    stored = harness.app[LIVE].get("members", "330000:legacy-desk")
    assert stored is not None
    assert not stored.get("certificates")
    harness.admin.session.cookie_jar.clear()
    csrf = await _sign_in(harness.admin, harness.tokens["auditor"])
    async with harness.admin.post(
        f"{page_url}/certificates", data={"csrf": csrf, "fingerprint": "cd" * 32}
    ) as resp:
        assert resp.status == 403
