"""The admin API: live, validated, persisted, audited writes; roles; runtime plugins."""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.crypto.keys import generate, private_to_jwk, write_keypair
from gateway.exchange.app import STORE
from gateway.exchange.client import ExchangeClient
from gateway.signing import Signer
from tests.conftest import CREDIT_EXAMPLE, PORTAL_ID, Harness, HarnessFactory

PLUGIN = Path(__file__).parent / "plugins" / "echo_adapter"


async def _call(
    h: Harness, method: str, path: str, body: Any = None, role: str = "admin"
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    async with h.admin.request(method, path, data=data, headers=h.auth(role)) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else None


def _new_member(tmp_path: Path, member_id: str) -> tuple[dict[str, Any], Signer]:
    pem = tmp_path / f"{member_id.replace(':', '_')}.pem"
    pair = write_keypair(generate("ecdsa-p256"), pem, pem.with_suffix(".jwk.json"))
    member = {
        "id": member_id,
        "kind": "system",
        "keys": [dict(pair.jwk)],
        "services": ["credit.query"],
        "callback_url": "http://127.0.0.1:9/callbacks",
    }
    return member, Signer(pair)


async def test_member_registered_at_runtime_can_exchange_then_be_revoked_and_disabled(
    harness: Harness, tmp_path: Path
) -> None:
    """Register → exchange at once; revoke its key → 401 key_unknown; disable → 403."""
    member, signer = _new_member(tmp_path, "330000:tax-bureau")
    status, created = await _call(harness, "POST", "/admin/v1/members", member)
    assert status == 201, created
    client = ExchangeClient(
        member_id="330000:tax-bureau",
        signer=signer,
        base_url=harness.url,
        session=harness.gateway.session,
    )
    assert (await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 200

    kid = member["keys"][0]["kid"]
    status, _ = await _call(harness, "DELETE", f"/admin/v1/members/330000:tax-bureau/keys/{kid}")
    assert status == 204
    revoked = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert (revoked.status, revoked.json()["code"]) == (401, "key_unknown")

    status, _ = await _call(
        harness, "POST", "/admin/v1/members/330000:tax-bureau/keys", member["keys"][0]
    )
    assert status == 422  # a revoked key comes back only on purpose (tests/test_keys.py)
    status, _ = await _call(
        harness,
        "POST",
        "/admin/v1/members/330000:tax-bureau/keys?reinstate=true",
        member["keys"][0],
    )
    assert status == 201
    assert (await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    status, _ = await _call(
        harness, "PATCH", "/admin/v1/members/330000:tax-bureau", {"enabled": False}, "operator"
    )
    assert status == 200
    disabled = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert (disabled.status, disabled.json()["code"]) == (403, "client_disabled")


async def test_roles_and_tokens(harness: Harness) -> None:
    """No token → 401; a bad token → 401; an auditor's write → 403; an operator's edit → 403."""
    async with harness.admin.get("/admin/v1/members") as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == "signature_missing"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    bad = {"Authorization": "Bearer gwa_not-a-token"}
    async with harness.admin.get("/admin/v1/members", headers=bad) as resp:
        assert (resp.status, (await resp.json())["code"]) == (401, "key_unknown")
    assert (await _call(harness, "GET", "/admin/v1/members", role="auditor"))[0] == 200
    status, problem = await _call(
        harness, "PATCH", "/admin/v1/adapters/national", {"enabled": False}, "auditor"
    )
    assert (status, problem["code"]) == (403, "forbidden")
    status, problem = await _call(
        harness, "PATCH", "/admin/v1/adapters/national", {"concurrency": 2}, "operator"
    )
    assert (status, problem["code"]) == (403, "forbidden")
    status, _ = await _call(harness, "DELETE", "/admin/v1/tokens/test-auditor")
    assert status == 204
    status, _ = await _call(harness, "GET", "/admin/v1/members", role="auditor")
    assert status == 401
    tokens = (await _call(harness, "GET", "/admin/v1/tokens"))[1]["tokens"]
    assert all("hash" not in t and "token" not in t for t in tokens)


async def test_every_write_is_audited_with_before_and_after(harness: Harness) -> None:
    """Create, update and delete of a route leave three audit entries with before/after."""
    route = {"service": "credit.query", "adapter": "national", "target": "440000:gateway"}
    assert (await _call(harness, "POST", "/admin/v1/routes", route))[0] == 201
    assert (await _call(harness, "PATCH", "/admin/v1/adapters/national", {"concurrency": 8}))[
        0
    ] == 200
    assert (await _call(harness, "DELETE", "/admin/v1/routes/credit.query/440000:gateway"))[
        0
    ] == 204
    status, trail = await _call(harness, "GET", "/admin/v1/audit", role="auditor")
    assert status == 200
    entries = trail["audit"][:3]
    assert [(e["kind"], e["action"]) for e in entries] == [
        ("routes", "delete"),
        ("adapters", "update"),
        ("routes", "create"),
    ]
    assert all(e["actor"] == "test-admin" for e in entries)
    assert entries[0]["before"] == route
    assert entries[0]["after"] is None
    assert "concurrency" not in entries[1]["before"]  # the file left it at its default
    assert entries[1]["after"]["concurrency"] == 8
    assert entries[2]["before"] is None
    assert entries[2]["after"] == route


async def test_invalid_writes_name_the_field(harness: Harness) -> None:
    """Bad adapter config, bad JWK, bad schema, route to nowhere: 422 with pointers."""
    cases = [
        (
            "/admin/v1/adapters",
            {"name": "x", "type": "http", "config": {"url": "ftp://no", "timeout_s": -1}},
            {"/config/url", "/config/timeout_s"},
        ),
        ("/admin/v1/adapters", {"name": "y", "type": "nonesuch"}, {"/type"}),
        (
            "/admin/v1/members",
            {"id": "330000:m", "kind": "system", "keys": [{"kty": "OKP", "crv": "Ed25519"}]},
            {"/keys/0", "/keys/0/kid"},
        ),
        (
            "/admin/v1/services",
            {
                "code": "a.b",
                "mode": "async",
                "request_schema": {"type": "nonsense"},
                "response_schema": {},
            },
            {"/request_schema/type", "/callback_schema"},
        ),
        ("/admin/v1/routes", {"service": "credit.query", "adapter": "ghost"}, {"/adapter"}),
        ("/admin/v1/members", {"id": "bad id", "kind": "alien"}, {"/id", "/kind"}),
    ]
    for path, body, pointers in cases:
        status, problem = await _call(harness, "POST", path, body)
        assert status == 422, (path, problem)
        assert problem["code"] == "schema_invalid"
        assert {e["pointer"] for e in problem["errors"]} >= pointers, problem
    audit = (await _call(harness, "GET", "/admin/v1/audit"))[1]["audit"]
    assert audit == []


async def test_adapter_type_schema_is_served(harness: Harness) -> None:
    """Each adapter type's config JSON Schema is served for clients to validate against."""
    status, http_type = await _call(harness, "GET", "/admin/v1/adapter-types/http")
    assert status == 200
    assert http_type["config_schema"]["required"] == ["url"]
    status, _ = await _call(harness, "GET", "/admin/v1/adapter-types/nonesuch")
    assert status == 404


async def test_writes_persist_across_restart(make_harness: HarnessFactory, tmp_path: Path) -> None:
    """A member added through the API is still there after the gateway restarts on its store."""
    store = tmp_path / "persist.db"
    first = await make_harness(store=store)
    member, signer = _new_member(tmp_path, "330000:archives")
    assert (await _call(first, "POST", "/admin/v1/members", member))[0] == 201
    await first.gateway.close()
    second = await make_harness(store=store)
    status, found = await _call(second, "GET", "/admin/v1/members/330000:archives")
    assert status == 200
    assert found["keys"][0]["kid"] == member["keys"][0]["kid"]
    client = ExchangeClient(
        member_id="330000:archives",
        signer=signer,
        base_url=second.url,
        session=second.gateway.session,
    )
    assert (await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 200


@pytest.fixture(scope="module")
def echo_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Install the external adapter package (kept under tests/plugins) into a fresh target."""
    target = tmp_path_factory.mktemp("plugins")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--target", str(target), str(PLUGIN),
        ],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield
    sys.path.remove(str(target))
    sys.modules.pop("gateway_echo_adapter", None)
    importlib.invalidate_caches()


async def test_plugin_adapter_registered_at_runtime_while_traffic_flows(
    harness: Harness, echo_plugin: None
) -> None:
    """An external adapter type serves a new route; concurrent traffic elsewhere sees no error."""
    client = harness.client("portal")
    stop = asyncio.Event()
    statuses: list[int] = []

    async def stream() -> None:
        while not stop.is_set():
            statuses.append((await client.exchange("credit.query", CREDIT_EXAMPLE)).status)

    async def answered_since(count: int) -> bool:
        return len(statuses) >= count

    workers = [asyncio.create_task(stream()) for _ in range(4)]
    await harness.wait_for(lambda: answered_since(5))  # traffic flows before the change
    types = (await _call(harness, "GET", "/admin/v1/adapter-types"))[1]["adapter_types"]
    assert "echo" in {t["type"] for t in types}
    adapter = {"name": "echoes", "type": "echo", "config": {"greeting": "你好"}}
    assert (await _call(harness, "POST", "/admin/v1/adapters", adapter))[0] == 201
    service = {
        "code": "echo.test",
        "mode": "sync",
        "request_schema": {"type": "object", "required": ["q"]},
        "response_schema": {"type": "object", "required": ["greeting", "echo"]},
        "timeout_s": 5,
    }
    assert (await _call(harness, "POST", "/admin/v1/services", service))[0] == 201
    assert (
        await _call(
            harness, "POST", "/admin/v1/routes", {"service": "echo.test", "adapter": "echoes"}
        )
    )[0] == 201
    status, _ = await _call(
        harness, "PUT", f"/admin/v1/acl/{PORTAL_ID}",
        {"services": ["credit.query", "crossregion.apply", "echo.test"]},
    )  # fmt: skip
    assert status == 200
    reply = await client.exchange("echo.test", {"q": "跨省通办"})
    assert reply.status == 200, reply.body
    assert reply.json() == {
        "greeting": "你好", "adapter": "echoes", "echo": {"q": "跨省通办"}, "client": PORTAL_ID,
    }  # fmt: skip
    after = len(statuses)
    await harness.wait_for(lambda: answered_since(after + 5))  # ... and goes on after it
    stop.set()
    await asyncio.gather(*workers)
    assert len(statuses) > 10
    assert set(statuses) == {200}
    health = (await _call(harness, "GET", "/admin/v1/adapters/echoes/health"))[1]
    assert health["healthy"] is True
    assert health["detail"] == "1 calls"


async def test_messages_dead_letters_and_redeliver(make_harness: HarnessFactory) -> None:
    """Operators search messages, see a dead letter, and redeliver it through the API."""

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 1

    h = await make_harness(edit)
    h.national.mode = "error"
    reply = await h.client("portal").exchange(
        "crossregion.apply",
        json.loads(
            (
                Path(__file__).parent.parent / "schemas/services/crossregion.apply/request.json"
            ).read_text()
        )["examples"][0],
        headers={"Gw-User": "11010519491231002X"},
    )
    message_id = reply.json()["message_id"]

    async def dead() -> bool:
        return await h.state_of(message_id) == "dead"

    await h.wait_for(dead)
    status, found = await _call(
        h, "GET", f"/admin/v1/messages?client={PORTAL_ID}&state=dead", role="operator"
    )
    assert status == 200
    assert [m["message_id"] for m in found["messages"]] == [message_id]
    view = found["messages"][0]
    assert view["request_headers"]["Gw-User"] == "***"
    assert "11010519491231002X" not in json.dumps(found)
    # An auditor sees the record without its bodies and headers (docs/security.md).
    status, audited = await _call(h, "GET", f"/admin/v1/messages/{message_id}", role="auditor")
    assert status == 200
    assert audited["state"] == "dead"
    assert (audited["request"], audited["request_headers"]) == (None, None)
    assert audited["withheld"] == ["request", "response", "result", "request_headers"]
    letters = (await _call(h, "GET", "/admin/v1/dead-letters", role="operator"))[1]["dead_letters"]
    assert [d["message_id"] for d in letters] == [message_id]
    assert (
        await _call(h, "POST", f"/admin/v1/dead-letters/{message_id}/redeliver", role="auditor")
    )[0] == 403
    h.national.mode = "ok"
    status, queued = await _call(
        h, "POST", f"/admin/v1/dead-letters/{message_id}/redeliver", role="operator"
    )
    assert (status, queued["state"]) == (202, "queued")

    async def delivered() -> bool:
        return await h.state_of(message_id) == "callback_delivered"

    await h.wait_for(delivered)
    audit = (await _call(h, "GET", "/admin/v1/audit?kind=dead-letters"))[1]["audit"]
    assert (audit[0]["action"], audit[0]["actor"]) == ("redeliver", "test-operator")
    assert await h.app[STORE].dead_letters() == []


async def test_jwk_without_kid_from_thumbprint_tool_is_accepted(harness: Harness) -> None:
    """A member key given with its RFC 7638 thumbprint as kid registers fine."""
    jwk = private_to_jwk(generate("ed25519"))
    member = {"id": "330000:thumb", "kind": "system", "keys": [jwk], "services": []}
    status, body = await _call(harness, "POST", "/admin/v1/members", member)
    assert status == 201, body
    assert (await _call(harness, "POST", "/admin/v1/members", member))[0] == 409
