"""Secrets by reference and encrypted at rest (gateway/config/secretstore.py): the AEAD and its
vector, the key-encryption key, references in config.yaml, sealing in both real stores,
rekey and KEK rotation, and what ``gateway check`` says."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.exceptions import InvalidTag

from gateway.admin import create_token
from gateway.cli import main
from gateway.config.model import SecretsConfig, parse_config
from gateway.config.secrets import secret_pointers
from gateway.config.secretstore import (
    AES_256_GCM,
    SEALED,
    SM4_GCM,
    KeyEncryptionKey,
    SecretBox,
    decrypt,
    default_cipher,
    encrypt,
    generate_kek_file,
    resolve_document,
    sm4_gcm_available,
)
from gateway.errors import ConfigError, StoreError
from gateway.exchange.app import STORE
from gateway.exchange.client import ExchangeClient
from gateway.signing import Signer
from gateway.store import ResourceChange, Store
from tests.conftest import (
    CREDIT_EXAMPLE,
    SCHEMAS,
    Harness,
    HarnessFactory,
    Keys,
    config_document,
    reserve_port,
    start_on,
    store_at,
    unused_port,
)

SECRET = base64.urlsafe_b64encode(b"hmac shared secret " + secrets.token_bytes(13)).decode()
HEADER = "Bearer s3cret-" + secrets.token_hex(12)


def hmac_member(k: Any = SECRET, rid: str = "330000:hmac-system") -> dict[str, Any]:
    return {"id": rid, "kind": "system", "keys": [{"kty": "oct", "kid": "hmac-1", "k": k}]}


def keyed_adapter(value: Any = HEADER) -> dict[str, Any]:
    return {
        "name": "keyed",
        "type": "http",
        "config": {"url": "http://127.0.0.1:1/{service}", "headers": {"Authorization": value}},
    }


def kek_config(tmp_path: Path, name: str = "gateway.kek") -> SecretsConfig:
    return SecretsConfig(kek_file=tmp_path / name)


# The AEAD ---------------------------------------------------------------------------------


def test_sm4_gcm_matches_the_rfc_8998_vector() -> None:
    """SM4-GCM as used here opens RFC 8998's A.1 ciphertext and refuses it with other AAD."""
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    nonce = bytes.fromhex("00001234567800000000ABCD")
    aad = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
    plain = bytes.fromhex(
        "AA" * 8 + "BB" * 8 + "CC" * 8 + "DD" * 8 + "EE" * 8 + "FF" * 8 + "EE" * 8 + "AA" * 8
    )
    ct = bytes.fromhex(
        "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
        "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
    )
    tag = bytes.fromhex("83DE3541E4C2B58177E065A9BF7B62EC")
    assert decrypt(SM4_GCM, key, nonce + ct + tag, aad) == plain
    with pytest.raises(InvalidTag):
        decrypt(SM4_GCM, key, nonce + ct + tag, aad + b"x")


def test_sm4_gcm_is_the_default_with_this_cryptography() -> None:
    """This environment's cryptography has SM4-GCM, so it is the default cipher."""
    assert sm4_gcm_available()
    assert default_cipher() == SM4_GCM


@pytest.mark.parametrize("alg", [SM4_GCM, AES_256_GCM])
def test_each_cipher_round_trips_and_binds_its_aad(alg: str) -> None:
    """Both AEADs open what they sealed, with fresh nonces, and only with the same AAD."""
    key = os.urandom(16 if alg == SM4_GCM else 32)
    one, two = encrypt(alg, key, b"secret", b"a"), encrypt(alg, key, b"secret", b"a")
    assert one != two
    assert b"secret" not in one
    assert decrypt(alg, key, one, b"a") == b"secret"
    with pytest.raises(InvalidTag):
        decrypt(alg, key, one, b"b")


# The key-encryption key --------------------------------------------------------------------


def test_a_generated_kek_file_is_private_and_never_replaced(tmp_path: Path) -> None:
    """The KEK file is made 0600 with 32 random bytes; a second generation keeps the first;
    the KEK's repr does not show it."""
    path = tmp_path / "keys" / "gateway.kek"
    generate_kek_file(path)
    first = path.read_text()
    generate_kek_file(path)
    assert path.read_text() == first
    assert path.stat().st_mode & 0o777 == 0o600
    kek = KeyEncryptionKey.load(SecretsConfig(kek_file=path))
    assert len(kek.material) == 32
    assert kek.material.hex() not in repr(kek)
    assert repr(kek.material) not in repr(kek)


def test_a_kek_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A KEK file group or others can read is a config error naming chmod 600."""
    path = tmp_path / "gateway.kek"
    generate_kek_file(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        KeyEncryptionKey.load(SecretsConfig(kek_file=path))


def test_a_kek_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``{"env": NAME}``: the KEK is read from the variable; unset or short is a clear error."""
    config = SecretsConfig(kek_env="TEST_GATEWAY_KEK")
    with pytest.raises(ConfigError, match=r"TEST_GATEWAY_KEK .* is not set"):
        KeyEncryptionKey.load(config)
    monkeypatch.setenv("TEST_GATEWAY_KEK", base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="must be 32 bytes"):
        KeyEncryptionKey.load(config)
    monkeypatch.setenv("TEST_GATEWAY_KEK", base64.b64encode(bytes(range(32))).decode())
    assert KeyEncryptionKey.load(config).material == bytes(range(32))


# What is secret, and references --------------------------------------------------------------


def test_the_secrets_of_members_and_http_adapters() -> None:
    """A JWK's k and the http adapter's header values are the secrets; nothing else is."""
    assert secret_pointers("members", hmac_member()) == ["/keys/0/k"]
    assert secret_pointers("adapters", keyed_adapter()) == ["/config/headers/Authorization"]
    assert secret_pointers("routes", {"service": "a", "adapter": "b"}) == []


def _doc(keys: Keys, tmp_path: Path) -> dict[str, Any]:
    doc = config_document(keys, store=tmp_path / "g.db", national_url="http://127.0.0.1:1")
    doc["members"].append(hmac_member({"env": "TEST_HMAC_K"}))
    doc["adapters"].append(keyed_adapter({"file": "secrets/header.txt"}))
    return doc


def test_references_resolve_for_the_runtime_and_stay_in_the_document(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """{"env"} and {"file"} (relative to config.yaml) give the runtime their values; the raw
    document, which is what is stored and shown, keeps the references."""
    monkeypatch.setenv("TEST_HMAC_K", SECRET)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "header.txt").write_text(HEADER + "\n")
    (tmp_path / "secrets" / "header.txt").chmod(0o600)
    doc = _doc(keys, tmp_path)
    config = parse_config(doc, base=tmp_path)
    member = next(m for m in config.members if m.id == "330000:hmac-system")
    assert member.keys[0]["k"] == SECRET
    adapter = next(a for a in config.adapters if a.name == "keyed")
    assert adapter.config["headers"]["Authorization"] == HEADER
    assert config.raw["members"][-1]["keys"][0]["k"] == {"env": "TEST_HMAC_K"}
    assert config.raw["adapters"][-1]["config"]["headers"]["Authorization"] == {
        "file": "secrets/header.txt"
    }


def test_a_missing_reference_is_a_config_error_with_its_pointer(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unset variable and an absent file are each a problem at their JSON Pointer."""
    monkeypatch.delenv("TEST_HMAC_K", raising=False)
    doc = _doc(keys, tmp_path)
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, base=tmp_path)
    member, adapter = len(doc["members"]) - 1, len(doc["adapters"]) - 1
    first, second = caught.value.problems  # nothing else: no echo of the same cause
    assert first == f"/members/{member}/keys/0/k/env: environment variable TEST_HMAC_K is not set"
    assert second.startswith(f"/adapters/{adapter}/config/headers/Authorization/file: cannot read")


def test_a_secret_file_readable_by_others_is_refused(keys: Keys, tmp_path: Path) -> None:
    """A referenced secret file with group or other access is refused, not read."""
    _, problems = resolve_document({"adapters": [keyed_adapter({"file": "header.txt"})]}, tmp_path)
    assert problems
    assert "cannot read" in problems[0]
    (tmp_path / "header.txt").write_text(HEADER)
    (tmp_path / "header.txt").chmod(0o640)
    _, problems = resolve_document({"adapters": [keyed_adapter({"file": "header.txt"})]}, tmp_path)
    assert problems == [
        f"/adapters/0/config/headers/Authorization/file: {tmp_path / 'header.txt'} (a secret) "
        "is accessible by group or others (chmod 600)"
    ]


def test_a_reference_may_not_name_the_gateways_own_keys(keys: Keys, tmp_path: Path) -> None:
    """The signing key, its KEK and the passphrase variable cannot be referenced: an
    adapter's header would otherwise carry them to its upstream."""
    doc = config_document(keys, store=tmp_path / "g.db", national_url="http://127.0.0.1:1")
    doc["adapters"] = [
        keyed_adapter({"file": str(keys.directory / "gateway.pem")}),
        keyed_adapter({"file": str(keys.directory / "gateway.kek")}) | {"name": "kek"},
        keyed_adapter({"env": "GATEWAY_KEY_PASSPHRASE"}) | {"name": "phrase"},
    ]
    _, problems = resolve_document(doc, tmp_path)
    where, own = "config/headers/Authorization", "the gateway's own key material"
    assert problems == [
        f"/adapters/0/{where}/file: {keys.directory / 'gateway.pem'} is {own}",
        f"/adapters/1/{where}/file: {keys.directory / 'gateway.kek'} is {own}",
        f"/adapters/2/{where}/env: GATEWAY_KEY_PASSPHRASE holds {own}",
    ]


def test_gateway_check_names_the_pointer_of_a_missing_reference(
    keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gateway check` prints the unresolved reference at its pointer and exits 1."""
    monkeypatch.delenv("TEST_HMAC_K", raising=False)
    doc = _doc(keys, tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["check", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    member = len(doc["members"]) - 1
    assert (
        f"{path}:/members/{member}/keys/0/k/env: environment variable TEST_HMAC_K is not set"
        in (out.splitlines())
    )


# Sealing in the store (both backends) -----------------------------------------------------------


@pytest.fixture
async def store(store_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A real store (SQLite file or PostgreSQL database) with a box and a fresh KEK."""
    store = store_at(store_url)
    box = SecretBox(store, kek_config(tmp_path), create=True)
    store.use_secrets(box)
    await store.open()
    await box.load()
    yield store
    await store.close()


def _change(body: Any, kind: str = "members") -> ResourceChange:
    return ResourceChange(
        kind=kind, id=body["id"] if kind == "members" else body["name"], action="create",
        actor="alice", role="admin", after=body,
    )  # fmt: skip


async def raw_rows(store_url: str) -> str:
    """Every row of every table as the database holds it, as text (PostgreSQL: each row
    cast to text; SQLite: the file and its WAL, byte for byte)."""
    if store_url.startswith("postgresql://"):
        conn = await asyncpg.connect(store_url)
        try:
            tables = [
                r[0]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            ]
            rows = []
            for table in tables:  # names from the catalogue, quoted
                rows += [str(r[0]) for r in await conn.fetch(f'SELECT t::text FROM "{table}" t')]  # noqa: S608
            return "\n".join(rows)
        finally:
            await conn.close()
    files = [Path(store_url), Path(store_url + "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists()).decode("latin-1")


async def stored_values(store_url: str) -> str:
    """The admin tables' current rows as text (no older page versions: SQLite's WAL
    and free pages keep those, and old ciphertexts are still ciphertexts)."""
    if store_url.startswith("postgresql://"):
        return await raw_rows(store_url)
    import sqlite3

    db = sqlite3.connect(store_url)
    try:
        tables = ("resources", "admin_changes")
        return "\n".join(repr(r) for t in tables for r in db.execute(f"SELECT * FROM {t}"))  # noqa: S608
    finally:
        db.close()


async def stored_body(store_url: str, rid: str) -> Any:
    """One overlay row's body as stored (sealed values left sealed)."""
    sql = "SELECT body FROM resources WHERE id = "
    if store_url.startswith("postgresql://"):
        conn = await asyncpg.connect(store_url)
        try:
            return json.loads(await conn.fetchval(sql + "$1", rid))
        finally:
            await conn.close()
    import sqlite3

    db = sqlite3.connect(store_url)
    try:
        return json.loads(db.execute(sql + "?", (rid,)).fetchone()[0])
    finally:
        db.close()


async def test_stored_secrets_are_sealed_and_read_back_in_clear(
    store: Store, store_url: str
) -> None:
    """A member's k and an adapter's header are sealed in the overlay and the change trail;
    the store hands them back in clear, references untouched."""
    await store.put_resource(_change(hmac_member()))
    await store.put_resource(_change(keyed_adapter(), "adapters"))
    referenced = hmac_member({"env": "SOME_VAR"}, rid="330000:by-reference")
    await store.put_resource(_change(referenced))
    raw = await raw_rows(store_url)
    assert SECRET not in raw
    assert HEADER not in raw
    assert SEALED in raw
    assert "SOME_VAR" in raw
    overlay = {rid: body for _, rid, body in await store.load_overlay()}
    assert overlay["330000:hmac-system"] == hmac_member()
    assert overlay["keyed"] == keyed_adapter()
    assert overlay["330000:by-reference"] == referenced
    assert {c.resource_id: c.after for c in await store.changes()}["keyed"] == keyed_adapter()


async def test_a_sealed_value_moved_to_another_resource_does_not_open(
    store: Store, tmp_path: Path
) -> None:
    """The AAD binds a ciphertext to its resource and field: copied onto another member it
    fails to open with a clear StoreError."""
    sealed = await store.secrets.seal("members", "330000:a", hmac_member(rid="330000:a"))
    assert await store.secrets.open("members", "330000:a", sealed) == hmac_member(rid="330000:a")
    with pytest.raises(StoreError, match="moved from another resource or field"):
        await store.secrets.open("members", "330000:b", sealed)


async def test_a_store_without_the_kek_keeps_no_secret_in_clear(store_url: str) -> None:
    """A store opened without a box refuses to write a secret at all."""
    store = store_at(store_url)
    await store.open()
    try:
        with pytest.raises(StoreError, match="without the key-encryption key"):
            await store.put_resource(_change(hmac_member()))
        await store.put_resource(_change({"id": "330000:plain", "kind": "system"}))
    finally:
        await store.close()


async def test_a_wrong_kek_is_a_clear_error(store: Store, store_url: str, tmp_path: Path) -> None:
    """Reopened with another KEK, or with the KEK file gone, the box says which KEK
    wrapped the store's keys (and makes no new KEK file over a store that has keys)."""
    kek_id = KeyEncryptionKey.load(kek_config(tmp_path)).id
    other = store_at(store_url)
    await other.open()
    try:
        generate_kek_file(tmp_path / "other.kek")
        with pytest.raises(ConfigError, match=f"wrapped by key-encryption key {kek_id}"):
            await SecretBox(other, kek_config(tmp_path, "other.kek"), create=True).load()
        with pytest.raises(ConfigError, match=rf"does not exist; .* key-encryption key {kek_id}"):
            await SecretBox(other, kek_config(tmp_path, "gone.kek"), create=True).load()
        assert not (tmp_path / "gone.kek").exists()
    finally:
        await other.close()


async def test_rekey_reencrypts_and_old_records_stay_readable(store: Store, store_url: str) -> None:
    """A new data key: until re-encrypted, records under the old key still open; after
    `reseal` every sealed value names the new key; both keys are kept."""
    await store.put_resource(_change(hmac_member()))
    old = store.secrets.current
    assert old is not None
    assert old.generation == 1
    assert old.alg == SM4_GCM
    new = await store.secrets.rotate(AES_256_GCM)
    assert (new.generation, new.alg) == (2, AES_256_GCM)
    assert [b for _, _, b in await store.load_overlay()] == [hmac_member()]
    assert old.key_id in await stored_values(store_url)
    assert await store.reseal() == 2  # the resource body and the change record's after
    raw = await stored_values(store_url)
    assert f"v1.{old.key_id}." not in raw
    assert f"v1.{new.key_id}." in raw
    assert [b for _, _, b in await store.load_overlay()] == [hmac_member()]
    assert await store.reseal() == 0  # nothing left under another key
    assert [k.generation for k in await store.data_keys()] == [1, 2]


async def test_another_process_follows_a_rotation(
    store: Store, store_url: str, tmp_path: Path
) -> None:
    """A second process's box, loaded before a rekey, opens what is sealed under the new
    key (it reads the keys again) and seals its own writes with the new key."""
    other = store_at(store_url)
    box = SecretBox(other, kek_config(tmp_path))
    other.use_secrets(box)
    await other.open()
    try:
        await box.load()
        new = await store.secrets.rotate()
        await store.put_resource(_change(hmac_member()))
        assert [b for _, _, b in await other.load_overlay()] == [hmac_member()]
        await other.put_resource(_change(keyed_adapter(), "adapters"))
        assert SecretBox.sealed_with(await stored_body(store_url, "keyed")) == {new.key_id}
        assert box.current == new
    finally:
        await other.close()


async def test_kek_rotation_rewraps_every_data_key(
    store: Store, store_url: str, tmp_path: Path
) -> None:
    """Re-wrapped with a new KEK, the store's keys open with it and no longer with the old."""
    await store.put_resource(_change(hmac_member()))
    await store.secrets.rotate()
    generate_kek_file(tmp_path / "new.kek")
    new = KeyEncryptionKey.load(kek_config(tmp_path, "new.kek"))
    await store.rewrap_data_keys(store.secrets.rewrapped(new))
    reopened = store_at(store_url)
    await reopened.open()
    try:
        with pytest.raises(ConfigError, match="not by the configured one"):
            await SecretBox(reopened, kek_config(tmp_path)).load()
        box = SecretBox(reopened, kek_config(tmp_path, "new.kek"))
        reopened.use_secrets(box)
        assert [b for _, _, b in await reopened.load_overlay()] == [hmac_member()]
    finally:
        await reopened.close()


# A real gateway (in process, on loopback), both backends ------------------------------------

HMAC_ID = "330000:hmac-system"
TARGET = "440000:gateway"  # a route to the keyed adapter: Gw-Target picks it
CREDIT_ANSWER = json.loads((SCHEMAS / "credit.query" / "response.json").read_text())["examples"][0]


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    return both_backends


@dataclass
class Upstream:
    """A real HTTP upstream on loopback that records the headers it was sent."""

    url: str
    seen: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with AsyncExitStack() as stack:
        port, sock = reserve_port(stack)
        up = Upstream(f"http://127.0.0.1:{port}")

        async def answer(request: web.Request) -> web.Response:
            up.seen.append(dict(request.headers))
            return web.json_response(CREDIT_ANSWER)

        app = web.Application()
        app.router.add_post("/x/{service}", answer)
        await start_on(stack, TestServer(app, port=port, socket_factory=sock))
        yield up


def hmac_client(h: Harness, raw: bytes) -> ExchangeClient:
    return ExchangeClient(
        member_id=HMAC_ID,
        signer=Signer(secret=raw, kid="hmac-1", label="sig1"),
        base_url=h.url,
        session=h.gateway.session,
    )


async def write_secrets(h: Harness, up: Upstream, k: Any, header: Any) -> None:
    """An HMAC member, an http adapter with a secret header and its route, by the admin API."""
    member = hmac_member(k) | {"services": ["credit.query"]}
    adapter = keyed_adapter(header)
    adapter["config"]["url"] = f"{up.url}/x/{{service}}"
    for kind, body in (
        ("members", member),
        ("adapters", adapter),
        ("routes", {"service": "credit.query", "adapter": "keyed", "target": TARGET}),
    ):
        resp = await h.admin.post(f"/admin/v1/{kind}", json=body, headers=h.auth())
        assert resp.status == 201, await resp.text()


async def exchange_through_keyed(h: Harness, raw: bytes) -> None:
    reply = await hmac_client(h, raw).exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": TARGET}
    )
    assert reply.status == 200, reply.body


def store_location(h: Harness) -> str:
    return h.config.store.url or str(h.config.store.path)


async def test_admin_written_secrets_are_not_in_the_database(
    make_harness: HarnessFactory, upstream: Upstream
) -> None:
    """An HMAC member and an http adapter's secret header written through the admin API:
    no byte of the database (SQLite file and WAL; every PostgreSQL row as text) holds them;
    the gateway verifies the member's signatures and the upstream gets the header, also
    from a second gateway started on the same store."""
    raw = secrets.token_bytes(32)
    k = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    h = await make_harness()
    await write_secrets(h, upstream, k, HEADER)
    await exchange_through_keyed(h, raw)
    assert upstream.seen[-1]["Authorization"] == HEADER
    dump = await raw_rows(store_location(h))
    for needle in (k, HEADER, HEADER.split()[1]):
        assert needle not in dump
    assert raw.decode("latin-1") not in dump
    restarted = await make_harness(store=h.config.store.path)
    await exchange_through_keyed(restarted, raw)
    assert len(upstream.seen) == 2
    assert upstream.seen[-1]["Authorization"] == HEADER


async def test_references_resolve_at_the_admin_write_and_are_what_is_shown(
    make_harness: HarnessFactory,
    upstream: Upstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """{"env"} for the HMAC k and {"file"} for the header: the gateway uses their values,
    the API shows and stores the references; a reference that does not resolve is
    422 secret_unresolved naming its pointer, and nothing is written."""
    raw = secrets.token_bytes(32)
    monkeypatch.setenv("TEST_HMAC_K", base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    (tmp_path / "header.txt").write_text(HEADER + "\n")
    (tmp_path / "header.txt").chmod(0o600)
    h = await make_harness()
    await write_secrets(h, upstream, {"env": "TEST_HMAC_K"}, {"file": "header.txt"})
    await exchange_through_keyed(h, raw)
    assert upstream.seen[-1]["Authorization"] == HEADER
    shown = await (await h.admin.get(f"/admin/v1/members/{HMAC_ID}", headers=h.auth())).json()
    assert shown["keys"][0]["k"] == {"env": "TEST_HMAC_K"}
    patched = await h.admin.patch(
        f"/admin/v1/members/{HMAC_ID}", json={"name": "renamed"}, headers=h.auth()
    )
    assert patched.status == 200, await patched.text()
    stored = {rid: b for _, rid, b in await h.app[STORE].load_overlay()}
    assert stored[HMAC_ID]["keys"][0]["k"] == {"env": "TEST_HMAC_K"}
    assert stored["keyed"]["config"]["headers"]["Authorization"] == {"file": "header.txt"}
    missing = hmac_member({"env": "TEST_UNSET_K"}, rid="330000:unresolved")
    resp = await h.admin.post("/admin/v1/members", json=missing, headers=h.auth())
    assert resp.status == 422
    problem = await resp.json()
    assert problem["code"] == "secret_unresolved"
    assert problem["errors"] == [
        {"pointer": "/keys/0/k/env", "message": "environment variable TEST_UNSET_K is not set"}
    ]
    assert "330000:unresolved" not in {rid for _, rid, _ in await h.app[STORE].load_overlay()}
    stolen = keyed_adapter({"file": str(h.keys.directory / "gateway.pem")}) | {"name": "thief"}
    resp = await h.admin.post("/admin/v1/adapters", json=stolen, headers=h.auth())
    assert resp.status == 422
    assert (await resp.json())["code"] == "secret_unresolved"


# Real processes: `gateway serve`, restarted, rekeyed, and refused with a wrong KEK ----------


def serve(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def until_up(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, tail(log)
            assert time.monotonic() < deadline, "the gateway never answered /healthz"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.integration
async def test_real_processes_restart_rekey_and_refuse_a_wrong_kek(
    keys: Keys, tmp_path: Path, upstream: Upstream, both_backends: str | None
) -> None:
    """`gateway serve` with secrets written by the admin API: restarted it still verifies
    the HMAC member and sends the header; `gateway store rekey` re-encrypts under a new
    data key and the next process reads it; with another KEK the start fails, exit 2,
    saying which KEK wrapped the store's keys."""
    ingress, admin = unused_port(), unused_port()
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:1")
    doc["listen"] = {"ingress": {"port": ingress}, "admin": {"port": admin}}
    doc["secrets"] = {"kek": {"file": "gw.kek"}}
    if both_backends is not None:
        doc["store"]["url"] = both_backends
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    url, admin_url, log = (
        f"http://127.0.0.1:{ingress}",
        f"http://127.0.0.1:{admin}",
        tmp_path / "gw.log",
    )
    raw = secrets.token_bytes(32)
    k = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    async def exchange(session: aiohttp.ClientSession) -> None:
        client = ExchangeClient(
            member_id=HMAC_ID,
            signer=Signer(secret=raw, kid="hmac-1"),
            base_url=url,
            session=session,
        )
        reply = await client.exchange("credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": TARGET})
        assert reply.status == 200, reply.body
        assert upstream.seen[-1]["Authorization"] == HEADER

    process = serve(config_path, log)
    try:
        await until_up(process, url, log)
        assert (tmp_path / "gw.kek").stat().st_mode & 0o777 == 0o600  # made at first start
        store = store_at(both_backends or str(tmp_path / "gw.db"))
        await store.open()
        try:
            token = await create_token(store, "alice", "admin")
        finally:
            await store.close()
        async with aiohttp.ClientSession() as session:
            auth = {"Authorization": f"Bearer {token}"}
            member = hmac_member(k) | {"services": ["credit.query"]}
            adapter = keyed_adapter()
            adapter["config"]["url"] = f"{upstream.url}/x/{{service}}"
            route = {"service": "credit.query", "adapter": "keyed", "target": TARGET}
            for kind, body in (("members", member), ("adapters", adapter), ("routes", route)):
                async with session.post(
                    f"{admin_url}/admin/v1/{kind}", json=body, headers=auth
                ) as r:
                    assert r.status == 201, await r.text()
            await exchange(session)
    finally:
        stop(process)
    location = both_backends or str(tmp_path / "gw.db")
    assert k not in await raw_rows(location)
    assert HEADER not in await raw_rows(location)

    rekey = await asyncio.to_thread(run_cli, "store", "rekey", "--config", str(config_path))
    assert rekey.returncode == 0, rekey.stderr
    assert "generation 2" in rekey.stdout
    new_key = rekey.stdout.split()[2]
    assert f"v1.{new_key}." in await stored_values(location)

    process = serve(config_path, log)
    try:
        await until_up(process, url, log)
        async with aiohttp.ClientSession() as session:
            await exchange(session)
    finally:
        stop(process)

    kek_id = KeyEncryptionKey.load(SecretsConfig(kek_file=tmp_path / "gw.kek")).id
    (tmp_path / "gw.kek").unlink()
    generate_kek_file(tmp_path / "gw.kek")  # another KEK where the right one was
    wrong = await asyncio.to_thread(run_cli, "serve", "--config", str(config_path))
    assert wrong.returncode == 2
    assert f"wrapped by key-encryption key {kek_id}" in wrong.stderr
    assert "Traceback" not in wrong.stderr
