"""`gateway admin …` over the admin API, against a live gateway and admin listener on loopback.

The CLI runs its own event loop, so in-process runs go through ``asyncio.to_thread`` while
the gateway keeps serving on the test's loop; one test starts the installed script.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from gateway.cli import main
from gateway.cli.admin import TOKEN_ENV, default_url
from gateway.config.model import jwk_path_for
from gateway.crypto.keys import generate, private_to_jwk, write_keypair
from gateway.exchange.client import ExchangeClient
from gateway.signing import Signer
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    DISABLED_ID,
    NATIONAL_ID,
    PEER_ID,
    PORTAL_ID,
    TAX_ID,
    Harness,
    HarnessFactory,
    unused_port,
)

GATEWAY_BIN = Path(sys.executable).parent / "gateway"
BUREAU = "330000:tax-bureau"


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own GATEWAY_ADMIN_TOKEN must not leak into these runs."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


@dataclass(frozen=True)
class Cli:
    """`gateway admin …` in process (in a thread), pointed at a harness's admin listener."""

    harness: Harness
    capsys: pytest.CaptureFixture[str]

    @property
    def url(self) -> str:
        return str(self.harness.admin.make_url("")).rstrip("/")

    async def __call__(self, *argv: str, role: str | None = "admin", url: bool = True) -> Run:
        extra = ["--url", self.url] if url else []
        if role is not None:
            extra += ["--token", self.harness.tokens[role]]
        self.capsys.readouterr()
        # The gateway under test logs in this process too, through the root logger that
        # `main` points at stderr; only the CLI's own output is under test here.
        argv = ("--log-level", "CRITICAL", "admin", *argv, *extra)
        code = await asyncio.to_thread(main, argv)
        out, err = self.capsys.readouterr()
        return Run(code, out, err)

    async def ok(self, *argv: str, role: str = "admin") -> str:
        run = await self(*argv, role=role)
        assert (run.code, run.err) == (0, ""), run
        return run.out

    async def json(self, *argv: str, role: str = "admin") -> Any:
        return json.loads(await self.ok(*argv, "--json", role=role))

    async def api(self, path: str) -> Any:
        """The same resource read straight from the API, to compare against."""
        async with self.harness.admin.get(path, headers=self.harness.auth()) as resp:
            assert resp.status == 200
            return await resp.json()


@pytest.fixture
def cli(harness: Harness, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(harness, capsys)


def parse_table(text: str) -> tuple[list[dict[str, str]], str]:
    """Rows keyed by header, cut at the header's column offsets; then the count line.

    Cutting at fixed offsets is the alignment check: a cell that started anywhere but
    under its header would end up in the wrong column, or split a word.
    """
    header, *rows, count = text.splitlines()
    spans = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    table = []
    for row in rows:
        cells = {}
        for i, (start, name) in enumerate(spans):
            end = spans[i + 1][0] if i + 1 < len(spans) else None
            assert start == 0 or row[start - 2 : start] == "  ", (name, row)
            cells[name] = row[start:end].strip()
        table.append(cells)
    return table, count


def new_member_files(directory: Path, member_id: str) -> tuple[Path, Signer, str]:
    """A fresh key pair, and a member file naming its public JWK file as config.yaml would."""
    pem = directory / f"{member_id.replace(':', '_')}.pem"
    pair = write_keypair(generate("ecdsa-p256"), pem, jwk_path_for(pem))
    member = {
        "id": member_id,
        "kind": "system",
        "name": "税务局 test",
        "keys": [jwk_path_for(pem).name],
        "services": ["credit.query"],
        "callback_url": "http://127.0.0.1:9/callbacks",
    }
    path = directory / "member.json"
    path.write_text(json.dumps(member, ensure_ascii=False), encoding="utf-8")
    return path, Signer(pair), pair.kid


async def test_lists_print_aligned_tables_and_json_is_the_apis_answer(cli: Cli) -> None:
    """Each list is a header, one aligned row per item and a count; --json equals the API."""
    members, count = parse_table(await cli.ok("members", "list"))
    assert count == "5 members"
    by_id = {m["ID"]: m for m in members}
    assert set(by_id) == {PORTAL_ID, TAX_ID, DISABLED_ID, NATIONAL_ID, PEER_ID}
    assert by_id[DISABLED_ID]["ENABLED"] == "no"
    assert by_id[PORTAL_ID]["ENABLED"] == "yes"
    assert by_id[PORTAL_ID]["SERVICES"] == "credit.query, crossregion.apply"
    assert by_id[NATIONAL_ID]["KIND"] == "platform"
    assert by_id[PEER_ID]["REGIONS"] == "440000"
    assert by_id[TAX_ID]["KEYS"] == "1"

    adapters, count = parse_table(await cli.ok("adapters", "list"))
    assert count == "1 adapter"
    assert adapters[0]["NAME"] == "national"
    assert (adapters[0]["TYPE"], adapters[0]["ENABLED"]) == ("http", "yes")
    assert adapters[0]["URL"].endswith("/api/exchange/{service}")

    services, count = parse_table(await cli.ok("services", "list"))
    assert count == "2 services"
    assert [(s["CODE"], s["MODE"], s["ALLOW ASYNC"]) for s in services] == [
        ("credit.query", "sync", "yes"),
        ("crossregion.apply", "async", "no"),
    ]
    routes, _ = parse_table(await cli.ok("routes", "list"))
    assert {(r["SERVICE"], r["TARGET"], r["ADAPTER"]) for r in routes} == {
        ("credit.query", "*", "national"),
        ("crossregion.apply", "*", "national"),
    }
    acl, _ = parse_table(await cli.ok("acl", "list"))
    assert {a["MEMBER"]: a["SERVICES"] for a in acl}[TAX_ID] == "-"
    types, _ = parse_table(await cli.ok("adapters", "types"))
    assert {t["TYPE"] for t in types} >= {"http", "mock"}
    assert {t["TYPE"]: t["REQUIRED CONFIG"] for t in types}["http"] == "url"
    tokens, count = parse_table(await cli.ok("tokens", "list", role="auditor"))
    assert count == "3 tokens"
    assert {(t["NAME"], t["ROLE"], t["REVOKED"]) for t in tokens} == {
        ("test-admin", "admin", "-"),
        ("test-operator", "operator", "-"),
        ("test-auditor", "auditor", "-"),
    }

    for argv, path in [
        (("members", "list"), "/admin/v1/members"),
        (("adapters", "list"), "/admin/v1/adapters"),
        (("services", "list"), "/admin/v1/services"),
        (("routes", "list"), "/admin/v1/routes"),
        (("acl", "list"), "/admin/v1/acl"),
        (("adapters", "types"), "/admin/v1/adapter-types"),
        (("tokens", "list"), "/admin/v1/tokens"),
        (("members", "get", PORTAL_ID), f"/admin/v1/members/{PORTAL_ID}"),
        (("adapters", "get", "national"), "/admin/v1/adapters/national"),
        (("services", "get", "credit.query"), "/admin/v1/services/credit.query"),
    ]:
        assert await cli.json(*argv) == await cli.api(path), argv


async def test_get_prints_one_resource_as_aligned_fields(cli: Cli) -> None:
    """`get` shows one aligned field per line: keys by kid, booleans as yes/no, long JSON cut."""
    out = await cli.ok("members", "get", DISABLED_ID)
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert lines["id"] == DISABLED_ID
    assert lines["enabled"] == "no"
    kid = cli.harness.keys.pairs["disabled"].kid
    assert lines["keys"] == f"{kid} (OKP)"
    starts = {
        line.index(value) for line, value in zip(out.splitlines(), lines.values(), strict=True)
    }
    assert len(starts) == 1  # every value starts in the same column
    service = await cli.ok("services", "get", "credit.query")
    assert re.search(r"^request_schema\s+\{.{98}…$", service, re.MULTILINE)
    assert service.splitlines()[-1] == "(… shortened; --json shows everything)"


async def test_member_added_from_a_file_exchanges_until_its_key_is_revoked_or_it_is_disabled(
    cli: Cli, tmp_path: Path
) -> None:
    """members add → exchanges at once; keys revoke → 401; keys add → back; disable → 403."""
    h = cli.harness
    member_file, signer, kid = new_member_files(tmp_path, BUREAU)
    out = await cli.ok("members", "add", "--file", str(member_file))
    assert out == f"created member {BUREAU} (1 key; services: credit.query)\n"
    client = ExchangeClient(
        member_id=BUREAU, signer=signer, base_url=h.url, session=h.gateway.session
    )
    assert (await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    listed, count = parse_table(await cli.ok("members", "list"))
    assert count == "6 members"
    assert {m["ID"]: m["NAME"] for m in listed}[BUREAU] == "税务局 test"

    assert await cli.ok("keys", "revoke", BUREAU, kid) == f"revoked key {kid} of {BUREAU}\n"
    revoked = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert (revoked.status, revoked.json()["code"]) == (401, "key_unknown")

    jwk_file = str(tmp_path / f"{BUREAU.replace(':', '_')}.jwk.json")
    assert await cli.ok("keys", "add", BUREAU, "--jwk", jwk_file, "--reinstate") == (
        f"added key {kid} to {BUREAU}\n"
    )
    assert (await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 200

    disabled = await cli.ok("members", "disable", BUREAU, role="operator")
    assert disabled == f"member {BUREAU} disabled\n"
    refused = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert (refused.status, refused.json()["code"]) == (403, "client_disabled")
    assert (await cli.json("members", "get", BUREAU))["enabled"] is False
    await cli.ok("members", "enable", BUREAU, role="operator")
    assert (await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 200


async def test_adapter_service_and_route_take_effect_and_route_delete_removes_it(
    cli: Cli, tmp_path: Path
) -> None:
    """adapters/services/routes add and acl set serve a new service; disable → 503; delete → 503."""
    h = cli.harness
    adapter = {"name": "canned", "type": "mock",
               "config": {"responses": {"default": {"body": {"hello": "世界"}}}}}  # fmt: skip
    service = {
        "code": "demo.echo",
        "mode": "sync",
        "request_schema": {"type": "object"},
        "response_schema": {"type": "object", "required": ["hello"]},
        "timeout_s": 5,
    }
    (tmp_path / "adapter.json").write_text(json.dumps(adapter), encoding="utf-8")
    (tmp_path / "service.json").write_text(json.dumps(service), encoding="utf-8")
    assert await cli.ok("adapters", "add", "--file", str(tmp_path / "adapter.json")) == (
        "created adapter canned (type mock)\n"
    )
    assert await cli.ok("services", "add", "--file", str(tmp_path / "service.json")) == (
        "created service demo.echo (sync)\n"
    )
    assert await cli.ok("routes", "add", "--service", "demo.echo", "--adapter", "canned") == (
        "route demo.echo (target *) → canned\n"
    )
    acl = await cli.ok(
        "acl", "set", PORTAL_ID, "--services", "credit.query, crossregion.apply,demo.echo"
    )
    assert acl == f"{PORTAL_ID} may call: credit.query, crossregion.apply, demo.echo\n"
    portal = h.client("portal")
    reply = await portal.exchange("demo.echo", {"q": 1})
    assert (reply.status, reply.json()) == (200, {"hello": "世界"})

    await cli.ok("adapters", "disable", "canned", role="operator")
    refused = await portal.exchange("demo.echo", {"q": 2})
    assert (refused.status, refused.json()["code"]) == (503, "adapter_unavailable")
    health, _ = parse_table(await cli.ok("adapters", "health", "canned"))
    assert (health[0]["ENABLED"], health[0]["HEALTHY"]) == ("no", "no")
    changes, _ = parse_table(await cli.ok("audit", "--kind", "adapters"))
    assert (changes[0]["ACTOR"], changes[0]["ACTION"], changes[0]["ID"]) == (
        "test-operator", "update", "canned",
    )  # fmt: skip
    assert changes[0]["CHANGED"] == "enabled"
    await cli.ok("adapters", "enable", "canned", role="operator")
    everything, count = parse_table(await cli.ok("adapters", "health"))
    assert count == "2 adapters"
    assert {a["NAME"]: a["HEALTHY"] for a in everything} == {"national": "yes", "canned": "yes"}
    assert (await portal.exchange("demo.echo", {"q": 3})).status == 200

    await cli.ok("routes", "add", "--service", "demo.echo", "--adapter", "national",
                 "--target", PEER_ID)  # fmt: skip
    routes, _ = parse_table(await cli.ok("routes", "list"))
    assert {(r["TARGET"], r["ADAPTER"]) for r in routes if r["SERVICE"] == "demo.echo"} == {
        ("*", "canned"),
        (PEER_ID, "national"),
    }
    await cli.ok("routes", "delete", "--service", "demo.echo", "--target", PEER_ID)
    assert await cli.ok("routes", "delete", "--service", "demo.echo") == (
        "deleted route demo.echo (target *)\n"
    )
    routes, _ = parse_table(await cli.ok("routes", "list"))
    assert "demo.echo" not in {r["SERVICE"] for r in routes}
    unrouted = await portal.exchange("demo.echo", {"q": 4})
    assert (unrouted.status, unrouted.json()["detail"]) == (503, "no route for demo.echo")
    again = await cli("routes", "delete", "--service", "demo.echo")
    assert again.code == 1
    assert again.err.startswith("error: no route demo.echo|* (404 resource_unknown)")


async def test_an_invalid_write_prints_each_pointer_and_exits_1(cli: Cli, tmp_path: Path) -> None:
    """A 422 prints its detail and every errors[] pointer with its message on stderr; exit 1."""
    bad = {"id": "330000:m", "kind": "system", "keys": [{"kty": "OKP", "crv": "Ed25519"}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    run = await cli("members", "add", "--file", str(tmp_path / "bad.json"))
    assert (run.code, run.out) == (1, "")
    first, *details = run.err.splitlines()
    assert first == "error: the member is invalid (422 schema_invalid)"
    assert "  /keys/0/kid: a kid is required" in details
    assert any(line.startswith("  /keys/0: ") for line in details)

    run = await cli("routes", "add", "--service", "credit.query", "--adapter", "ghost")
    assert run.code == 1
    assert run.err.splitlines()[1:] == ["  /adapter: unknown adapter"]
    run = await cli("routes", "add", "--service", "credit.query", "--adapter", "national",
                    "--json")  # fmt: skip
    assert run.code == 0
    assert json.loads(run.out) == {"service": "credit.query", "adapter": "national"}
    # nothing invalid reached the store or the audit trail; the valid replace did
    trail, count = parse_table(await cli.ok("audit"))
    assert count == "1 entry"
    assert (trail[0]["KIND"], trail[0]["ACTION"], trail[0]["CHANGED"]) == (
        "routes", "create", "(no change)",
    )  # fmt: skip


async def test_no_token_or_a_bad_one_exits_1_with_the_401_detail(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No token → 401 detail and a hint; unknown token → 401; env token works; auditor → 403."""
    run = await cli("members", "list", role=None)
    assert (run.code, run.out) == (1, "")
    assert run.err.splitlines() == [
        "error: send Authorization: Bearer <token> (401 signature_missing)",
        f"hint: pass --token or set {TOKEN_ENV}",
    ]
    monkeypatch.setenv(TOKEN_ENV, "gwa_not-a-token")
    run = await cli("members", "list", role=None)
    assert run.code == 1
    assert run.err == "error: the token is unknown or revoked (401 key_unknown)\n"
    monkeypatch.setenv(TOKEN_ENV, cli.harness.tokens["auditor"])
    run = await cli("members", "list", role=None)
    assert (run.code, run.err) == (0, "")
    run = await cli("members", "disable", TAX_ID, role=None)
    assert (run.code, run.err) == (1, "error: role auditor may not operate (403 forbidden)\n")


async def test_local_problems_exit_1_without_a_traceback(cli: Cli, tmp_path: Path) -> None:
    """Unreachable API, missing file, bad JSON, a private JWK: one error line each, exit 1."""
    down = f"http://127.0.0.1:{unused_port()}"
    run = await cli("members", "list", "--url", down, url=False)
    assert run.code == 1
    assert run.err.startswith(f"error: cannot reach the admin API at {down}: ")
    assert len(run.err.splitlines()) == 1

    missing = tmp_path / "missing.json"
    run = await cli("adapters", "add", "--file", str(missing))
    assert (run.code, run.err) == (1, f"error: {missing}: No such file or directory\n")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    run = await cli("services", "add", "--file", str(tmp_path / "broken.json"))
    assert run.code == 1
    assert run.err.startswith(f"error: {tmp_path / 'broken.json'}: not a JSON document")

    secret = tmp_path / "private.jwk.json"
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    private = {**private_to_jwk(key), "d": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}
    secret.write_text(json.dumps(private), encoding="utf-8")
    run = await cli("keys", "add", TAX_ID, "--jwk", str(secret))
    assert run.code == 1
    assert "holds a private key" in run.err
    assert len((await cli.json("members", "get", TAX_ID))["keys"]) == 1


async def test_default_url_is_the_config_files_admin_listener(cli: Cli, tmp_path: Path) -> None:
    """Without --url the admin listener of --config is used; wildcards mean loopback."""
    port = cli.harness.admin.port
    config = tmp_path / "config.yaml"
    config.write_text(f"listen:\n  admin: {{host: 127.0.0.1, port: {port}}}\n", encoding="utf-8")
    run = await cli("services", "list", "--config", str(config), url=False)
    assert (run.code, run.err) == (0, "")
    assert run.out.splitlines()[-1] == "2 services"

    config.write_text("listen:\n  admin: {host: 0.0.0.0, port: 9999}\n", encoding="utf-8")
    assert default_url(str(config)) == "http://127.0.0.1:9999"
    config.write_text("listen:\n  admin: {host: '::', port: 9998}\n", encoding="utf-8")
    assert default_url(str(config)) == "http://[::1]:9998"
    config.write_text("gateway: {}\n", encoding="utf-8")
    assert default_url(str(config)) == "http://127.0.0.1:8081"


async def test_messages_dead_letters_redeliver_and_audit(
    make_harness: HarnessFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Search finds a dead message; show masks Gw-User; operators redeliver it; audit says so."""

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 1

    h = await make_harness(edit)
    cli = Cli(h, capsys)
    h.national.mode = "error"
    reply = await h.client("portal").exchange(
        "crossregion.apply", APPLY_EXAMPLE, headers={"Gw-User": "11010519491231002X"}
    )
    message_id = reply.json()["message_id"]

    async def dead() -> bool:
        return await h.state_of(message_id) == "dead"

    await h.wait_for(dead)
    found, count = parse_table(
        await cli.ok("messages", "search", "--client", PORTAL_ID, "--state", "dead", role="auditor")
    )
    assert count == "1 message"
    assert (found[0]["MESSAGE ID"], found[0]["SERVICE"], found[0]["STATE"]) == (
        message_id, "crossregion.apply", "dead",
    )  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", found[0]["CREATED"])
    shown = await cli.ok("messages", "show", message_id, role="auditor")
    assert re.search(rf"^message_id\s+{message_id}$", shown, re.MULTILINE)
    assert re.search(r"^state\s+dead$", shown, re.MULTILINE)
    record = await cli.json("messages", "show", message_id, role="operator")
    assert record["request_headers"]["Gw-User"] == "***"
    assert (await cli.json("messages", "show", message_id, role="auditor"))["request"] is None
    assert "11010519491231002X" not in shown + json.dumps(record)

    letters, count = parse_table(await cli.ok("dead-letters", "list", role="operator"))
    assert count == "1 dead letter"
    assert (letters[0]["MESSAGE ID"], letters[0]["KIND"]) == (message_id, "message")
    denied = await cli("dead-letters", "redeliver", message_id, role="auditor")
    assert (denied.code, denied.err) == (1, "error: role auditor may not operate (403 forbidden)\n")
    h.national.mode = "ok"
    queued = await cli.ok("dead-letters", "redeliver", message_id, role="operator")
    assert queued == f"message {message_id} queued for redelivery\n"

    async def delivered() -> bool:
        return await h.state_of(message_id) == "callback_delivered"

    await h.wait_for(delivered)
    assert (await cli.json("dead-letters", "list")) == {"dead_letters": []}
    trail, _ = parse_table(await cli.ok("audit", "--kind", "dead-letters"))
    assert (trail[0]["ACTOR"], trail[0]["ACTION"], trail[0]["ID"]) == (
        "test-operator", "redeliver", message_id,
    )  # fmt: skip
    assert "state" in trail[0]["CHANGED"].split(", ")


@pytest.fixture
def summer_time_zone() -> Iterator[str]:
    """This process's local zone set (TZ, tzset) to one on summer time today, then restored.

    Berlin and Sydney keep summer time in overlapping seasons, so one of them always does.
    """
    saved = os.environ.get("TZ")
    on_summer_time = []
    for zone in ("Europe/Berlin", "Australia/Sydney"):
        os.environ["TZ"] = zone
        time.tzset()
        if time.localtime().tm_isdst > 0:
            on_summer_time.append(zone)
    os.environ["TZ"] = on_summer_time[0]
    time.tzset()
    yield on_summer_time[0]
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


async def test_since_is_read_as_utc_whatever_the_servers_local_zone(
    cli: Cli, summer_time_zone: str
) -> None:
    """`messages search --since` half an hour from now (UTC) finds nothing on summer time too."""
    assert (
        await cli.harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    ).status == 200
    now = time.time()
    earlier = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 1800))
    later = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now + 1800))
    assert len((await cli.json("messages", "search", "--since", earlier))["messages"]) == 1
    assert (await cli.json("messages", "search", "--since", later))["messages"] == []


def test_every_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway admin AREA ACTION --help` works for every API-backed command."""
    commands = {
        "adapters": ["list", "get", "add", "enable", "disable", "health", "types"],
        "members": ["list", "get", "add", "enable", "disable"],
        "keys": ["add", "revoke"],
        "services": ["list", "get", "add"],
        "routes": ["list", "add", "delete"],
        "acl": ["list", "set"],
        "messages": ["search", "show"],
        "dead-letters": ["list", "redeliver"],
        "tokens": ["list"],
    }
    argvs = [[area, action] for area, actions in commands.items() for action in actions]
    for argv in [*argvs, ["audit"]]:
        with pytest.raises(SystemExit) as exit_:
            main(["admin", *argv, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: gateway admin {' '.join(argv)} "), argv
        assert "--json" in out
        assert "--token" in out


@pytest.mark.integration
async def test_installed_script_against_the_live_admin_listener(
    harness: Harness, tmp_path: Path
) -> None:
    """The installed `gateway` script prints a table with the env token, and exits 1 on a 422."""
    url = str(harness.admin.make_url("")).rstrip("/")
    env = {**os.environ, TOKEN_ENV: harness.tokens["admin"]}

    async def run(*argv: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            str(GATEWAY_BIN), "admin", *argv, "--url", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, err = await run("members", "list")
    assert (code, err) == (0, "")
    members, count = parse_table(out)
    assert count == "5 members"
    assert PORTAL_ID in {m["ID"] for m in members}
    code, out, err = await run("routes", "add", "--service", "nonesuch.svc", "--adapter", "ghost")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error: the route is invalid (422 schema_invalid)",
        "  /adapter: unknown adapter",
        "  /service: unknown service",
    ]
