"""Key lifecycle: encrypted private keys, gateway key rotation with a grace period in the
JWKS, member key revocation that sticks, and refusing unsafe key files at startup."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.cli import main
from gateway.config.model import jwk_path_for, parse_config
from gateway.crypto.keys import (
    VerificationKey,
    expiry_warning,
    generate,
    jwks_keys,
    load_gateway_keypair,
    load_keypair,
    load_rotated_keys,
    read_passphrase,
    rotate_keypair,
    write_keypair,
)
from gateway.crypto.sm2 import Sm2PrivateKey
from gateway.errors import ConfigError
from gateway.exchange.client import verify_reply
from tests.conftest import (
    CREDIT_EXAMPLE,
    PORTAL_ID,
    Harness,
    HarnessFactory,
    Keys,
    config_document,
    unused_port,
)
from tests.test_observability import until_healthy
from tests.test_signing_sm2 import openssl, openssl_verifies

PASSPHRASE = "correct horse battery staple"
ENV = "TEST_GATEWAY_PASSPHRASE"


def gateway_copy(keys: Keys, directory: Path, *, passphrase: bytes | None = None) -> Path:
    """The session's gateway key written anew (same key, same kid), maybe encrypted."""
    pair = keys.pairs["gateway"]
    pem = directory / "gateway.pem"
    write_keypair(pair.private, pem, jwk_path_for(pem), kid=pair.kid, passphrase=passphrase)
    return pem


def config_file(keys: Keys, tmp_path: Path, **gateway: Any) -> Path:
    """A config.yaml on disk for CLI commands, with free ports and the gateway settings given."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    doc["gateway"].update(gateway)
    doc["listen"] = {"ingress": {"port": unused_port()}, "admin": {"port": unused_port()}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


# Encrypted private keys ----------------------------------------------------------------


def test_keygen_encrypt_writes_an_encrypted_pkcs8_pem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen --encrypt: an ENCRYPTED PRIVATE KEY PEM, 0600, that loads only with the passphrase."""
    monkeypatch.setenv("GATEWAY_KEY_PASSPHRASE", PASSPHRASE)
    pem = tmp_path / "member.pem"
    assert main(["keygen", "--out", str(pem), "--encrypt"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["encrypted"] is True
    assert pem.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert pem.stat().st_mode & 0o777 == 0o600
    pair = load_keypair(pem, jwk_path_for(pem), passphrase=PASSPHRASE.encode())
    assert pair.kid == printed["kid"]
    with pytest.raises(ConfigError, match="encrypted; give its passphrase"):
        load_keypair(pem, jwk_path_for(pem))
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_keypair(pem, jwk_path_for(pem), passphrase=b"not it")


def test_keygen_encrypt_reads_a_passphrase_file_and_refuses_an_open_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--passphrase-file must be 0600; its one line (newline stripped) is the passphrase."""
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o644)
    pem = tmp_path / "k.pem"
    args = ["keygen", "--out", str(pem), "--encrypt", "--passphrase-file", str(secret)]
    assert main(args) == 2
    assert "passphrase file is accessible by group or others" in capsys.readouterr().err
    secret.chmod(0o600)
    assert main(args) == 0
    assert load_keypair(pem, passphrase=PASSPHRASE.encode()).algorithm == "ed25519"


def test_keygen_encrypt_without_a_passphrase_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--encrypt with the variable unset: exit 2 naming the variable, no key written."""
    monkeypatch.delenv("GATEWAY_KEY_PASSPHRASE", raising=False)
    pem = tmp_path / "k.pem"
    assert main(["keygen", "--out", str(pem), "--encrypt"]) == 2
    assert "GATEWAY_KEY_PASSPHRASE (the key passphrase) is not set" in capsys.readouterr().err
    assert not pem.exists()


def test_read_passphrase_prefers_the_environment_then_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing configured → None; env named → its value; else the 0600 file; empty → error."""
    assert read_passphrase(None, None) is None
    monkeypatch.setenv(ENV, "from-env")
    assert read_passphrase(ENV, tmp_path / "absent") == b"from-env"
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        read_passphrase(None, empty)


async def test_the_gateway_decrypts_its_key_with_the_configured_passphrase(
    make_harness: HarnessFactory, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gateway.key_passphrase_env: an encrypted gateway key loads and signs answers."""
    monkeypatch.setenv(ENV, PASSPHRASE)
    (tmp_path / "enc").mkdir()
    pem = gateway_copy(keys, tmp_path / "enc", passphrase=PASSPHRASE.encode())

    def edit(doc: dict[str, Any]) -> None:
        doc["gateway"].update(key=str(pem), key_passphrase_env=ENV)

    h = await make_harness(edit)
    reply = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200
    assert verify_reply(reply, keys.verification("gateway")) == keys.pairs["gateway"].kid


def test_a_jwk_file_that_is_not_the_pems_key_is_refused(tmp_path: Path) -> None:
    """A stale .jwk.json beside a replaced PEM would publish the wrong kid: refused."""
    pem = tmp_path / "k.pem"
    write_keypair(generate(), pem, jwk_path_for(pem))
    write_keypair(generate(), tmp_path / "other.pem", jwk_path_for(pem))
    with pytest.raises(ConfigError, match="not the key in"):
        load_keypair(pem, jwk_path_for(pem))


# Startup refuses unsafe key files (a real process) -----------------------------------


def serve(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`gateway serve` as a real process that is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "error", **(env or {})},
        check=False,
    )


@pytest.mark.integration
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_serve_refuses_a_private_key_readable_by_group_or_others(
    keys: Keys, tmp_path: Path, mode: int
) -> None:
    """A gateway key readable beyond its owner: serve exits 2 and says why and what to do."""
    pem = gateway_copy(keys, tmp_path)
    pem.chmod(mode)
    ran = serve(config_file(keys, tmp_path, key=str(pem)))
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert f"config: {pem}: private key is accessible by group or others (chmod 600)" in (
        ran.stderr
    )
    assert "Ready" not in ran.stdout


@pytest.mark.integration
def test_serve_refuses_an_encrypted_key_without_its_passphrase(keys: Keys, tmp_path: Path) -> None:
    """An encrypted key and no (or a wrong) passphrase: serve exits 2 with the reason."""
    pem = gateway_copy(keys, tmp_path, passphrase=PASSPHRASE.encode())
    config = config_file(keys, tmp_path, key=str(pem), key_passphrase_env=ENV)
    unset = serve(config, {ENV: ""})
    assert unset.returncode == 2
    assert f"{ENV} (the key passphrase) is not set" in unset.stderr
    wrong = serve(config, {ENV: "wrong"})
    assert wrong.returncode == 2
    assert "cannot decrypt the private key (wrong passphrase?)" in wrong.stderr


# Rotation ------------------------------------------------------------------------------


def test_rotate_keypair_retires_the_old_key_with_an_expiry(keys: Keys, tmp_path: Path) -> None:
    """The new key is current on disk; the old JWK is in the retired file until now + grace."""
    pem = gateway_copy(keys, tmp_path)
    rotated = tmp_path / "gateway.previous.jwks.json"
    old, new, expiry = rotate_keypair(
        pem, jwk_path_for(pem), rotated, grace_s=3600, now=1_000_000.0
    )
    assert old.kid == keys.pairs["gateway"].kid != new.kid
    assert expiry == 1_003_600.0
    assert load_keypair(pem, jwk_path_for(pem)).kid == new.kid
    assert pem.stat().st_mode & 0o777 == 0o600
    assert [(k["kid"], k["exp"]) for k in load_rotated_keys(rotated)] == [(old.kid, 1_003_600)]
    _, newer, _ = rotate_keypair(pem, jwk_path_for(pem), rotated, grace_s=60, now=1_000_100.0)
    assert [k["kid"] for k in load_rotated_keys(rotated)] == [old.kid, new.kid]
    _, _, _ = rotate_keypair(pem, jwk_path_for(pem), rotated, grace_s=60, now=1_003_601.0)
    assert [k["kid"] for k in load_rotated_keys(rotated)] == [newer.kid]  # expired ones go


def test_jwks_publishes_current_configured_and_unexpired_retired_keys() -> None:
    """Current first, then configured previous keys, then retired keys until their exp."""
    current = {"kid": "new"}
    retired = [{"kid": "old", "exp": 2000}, {"kid": "new", "exp": 3000}]
    published = jwks_keys(current, [{"kid": "pinned"}], retired, now=1999.0)
    assert [k["kid"] for k in published] == ["new", "pinned", "old"]
    assert [k["kid"] for k in jwks_keys(current, [], retired, now=2000.0)] == ["new"]


def test_rotating_an_encrypted_key_keeps_it_encrypted(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """keys rotate with key_passphrase_env: the new PEM is encrypted with the same passphrase."""
    monkeypatch.setenv(ENV, PASSPHRASE)
    pem = gateway_copy(keys, tmp_path, passphrase=PASSPHRASE.encode())
    config = config_file(keys, tmp_path, key=str(pem), key_passphrase_env=ENV)
    assert main(["keys", "rotate", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["encrypted"] is True
    assert pem.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_keypair(pem, passphrase=PASSPHRASE.encode()).kid != report["old_kid"]


async def test_after_rotation_the_new_key_signs_and_the_old_kid_stays_until_expiry(
    make_harness: HarnessFactory,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`gateway keys rotate`, restart: answers carry the new kid; the JWKS lists both until
    the old one's grace period ends, then only the new one."""
    (tmp_path / "gw").mkdir()
    pem = gateway_copy(keys, tmp_path / "gw")
    config = config_file(keys, tmp_path, key=str(pem))
    assert main(["keys", "rotate", "--config", str(config), "--grace-days", "7"]) == 0
    report = json.loads(capsys.readouterr().out)
    old_kid, new_kid = keys.pairs["gateway"].kid, report["new_kid"]
    assert report["old_kid"] == old_kid != new_kid

    h = await make_harness(lambda doc: doc["gateway"].update(key=str(pem)))
    async with h.gateway.get("/.well-known/jwks.json") as resp:
        published = (await resp.json())["keys"]
    assert [k["kid"] for k in published] == [new_kid, old_kid]
    assert published[1]["exp"] == pytest.approx(time.time() + 7 * 86400, abs=60)

    # A peer that fetched the JWKS trusts both; the answer it gets is signed by the new key.
    trusted = {k["kid"]: VerificationKey.from_jwk(k) for k in published}
    h.national.trusted = trusted
    reply = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200
    assert verify_reply(reply, trusted) == new_kid
    assert h.national.received  # the outbound request verified with the new key too

    retired = pem.with_name("gateway.previous.jwks.json")
    document = json.loads(retired.read_text())
    document["keys"][0]["exp"] = int(time.time()) - 1  # the grace period is over
    retired.write_text(json.dumps(document))
    async with h.gateway.get("/.well-known/jwks.json") as resp:
        assert [k["kid"] for k in (await resp.json())["keys"]] == [new_kid]


# Member key revocation -----------------------------------------------------------------


async def admin(h: Harness, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    async with h.admin.request(method, "/admin/v1" + path, data=data, headers=h.auth()) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else None


async def test_a_revoked_member_key_cannot_come_back_without_reinstate(
    harness: Harness, keys: Keys
) -> None:
    """Revoked → 401; re-adding by POST, PUT or PATCH is refused; ?reinstate=true restores."""
    portal = harness.client("portal")
    kid = keys.pairs["portal"].kid
    jwk = dict(keys.pairs["portal"].jwk)
    member = f"/members/{PORTAL_ID}"
    assert (await admin(harness, "DELETE", f"{member}/keys/{kid}"))[0] == 204
    refused = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert (refused.status, refused.json()["code"]) == (401, "key_unknown")
    status, current = await admin(harness, "GET", member)
    assert (status, current["revoked_keys"], current.get("keys", [])) == (200, [kid], [])

    status, problem = await admin(harness, "POST", f"{member}/keys", jwk)
    assert (status, problem["code"]) == (422, "schema_invalid")
    assert problem["errors"] == [
        {"pointer": "/kid", "message": "was revoked for this member; add it again only with "
         "?reinstate=true"}
    ]  # fmt: skip
    replaced = {k: v for k, v in current.items() if k != "revoked_keys"} | {"keys": [jwk]}
    status, problem = await admin(harness, "PUT", member, replaced)
    assert (status, problem["errors"][0]["pointer"]) == (422, "/keys/0/kid")
    status, patched = await admin(harness, "PATCH", member, {"revoked_keys": None})
    assert (status, patched["revoked_keys"]) == (200, [kid])  # a patch cannot forget it

    status, _ = await admin(harness, "POST", f"{member}/keys?reinstate=true", jwk)
    assert status == 201
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    status, current = await admin(harness, "GET", member)
    assert "revoked_keys" not in current
    status, audit = await admin(harness, "GET", "/audit?kind=members")
    assert [e["action"] for e in audit["audit"]][:2] == ["add_key", "update"]


async def test_revocation_survives_a_restart(make_harness: HarnessFactory, keys: Keys) -> None:
    """A revoked kid is still refused by a restarted gateway on the same store."""
    first = await make_harness()
    kid = keys.pairs["portal"].kid
    assert (await admin(first, "DELETE", f"/members/{PORTAL_ID}/keys/{kid}"))[0] == 204
    await first.gateway.close()
    second = await make_harness()
    refused = await second.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert (refused.status, refused.json()["code"]) == (401, "key_unknown")
    status, _ = await admin(second, "POST", f"/members/{PORTAL_ID}/keys", keys.pairs["portal"].jwk)
    assert status == 422


def test_a_config_file_may_not_list_a_revoked_kid_as_a_key(keys: Keys, tmp_path: Path) -> None:
    """In config.yaml too, a member's key whose kid is in its revoked_keys is a problem."""
    doc = config_document(keys, store=tmp_path / "db", national_url="http://127.0.0.1:9")
    doc["members"][0]["revoked_keys"] = [keys.pairs["portal"].kid]
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, base=tmp_path)
    assert caught.value.problems == (
        f"/members/0/keys: kid {keys.pairs['portal'].kid} is revoked for this member",
    )


# SM2 keys through the command line ------------------------------------------------------


def test_keygen_alg_sm2_writes_what_openssl_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen --alg sm2 [--encrypt]: PKCS#8 PEM 0600 that `openssl pkey` opens, SM2 JWK."""
    monkeypatch.setenv("GATEWAY_KEY_PASSPHRASE", PASSPHRASE)
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    for encrypt in ([], ["--encrypt"]):
        pem = tmp_path / f"sm2{len(encrypt)}.pem"
        assert main(["keygen", "--alg", "sm2", "--out", str(pem), *encrypt]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["alg"] == "sm2-sm3"
        assert pem.stat().st_mode & 0o777 == 0o600
        jwk = json.loads(jwk_path_for(pem).read_text())
        assert (jwk["kty"], jwk["crv"], jwk["kid"]) == ("EC", "SM2", printed["kid"])
        ran = subprocess.run(
            [openssl, "pkey", "-in", str(pem), "-passin", f"pass:{PASSPHRASE}", "-noout", "-text"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert "ASN1 OID: SM2" in ran.stdout


def _openssl_verifies_a_signature_of(pem: Path, tmp_path: Path) -> bool:
    """A signature made with the key at ``pem`` (as the gateway signs) verifies with
    `openssl pkeyutl -verify`, SM2 with SM3 and the protocol's signer ID, against the public
    key `openssl pkey` takes out of that PEM: OpenSSL is the independent SM2 peer."""
    data = b"signed with a key the command line made"
    public = tmp_path / f"{pem.stem}.pub.pem"
    public.write_bytes(openssl("pkey", "-in", str(pem), "-pubout"))
    private = load_keypair(pem, jwk_path_for(pem)).private
    assert isinstance(private, Sm2PrivateKey)
    signature = private.sign(data)
    return openssl_verifies(public, data, signature, tmp_path)


def test_keygen_alg_sm2_sm3_makes_an_sm2_key_whose_signature_openssl_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen --alg sm2-sm3 (the algorithm's name) makes an SM2 key; OpenSSL verifies it."""
    pem = tmp_path / "member.pem"
    assert main(["keygen", "--alg", "sm2-sm3", "--out", str(pem)]) == 0
    assert json.loads(capsys.readouterr().out)["alg"] == "sm2-sm3"
    assert json.loads(jwk_path_for(pem).read_text())["crv"] == "SM2"
    assert _openssl_verifies_a_signature_of(pem, tmp_path)


def test_keygen_refuses_an_algorithm_it_does_not_know(tmp_path: Path) -> None:
    """keygen --alg sm2-sha256 is a usage error (exit 2) and writes no key."""
    with pytest.raises(SystemExit) as exited:
        main(["keygen", "--alg", "sm2-sha256", "--out", str(tmp_path / "k.pem")])
    assert exited.value.code == 2
    assert not (tmp_path / "k.pem").exists()


@pytest.mark.integration
async def test_up_alg_sm2_sm3_creates_sm2_keys_that_openssl_verifies(
    keys: Keys, tmp_path: Path
) -> None:
    """`gateway up --alg sm2-sm3`: the missing gateway and simulator keys are made SM2, the
    running gateway publishes the SM2 key, and OpenSSL verifies signatures made with each."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    ingress = unused_port()
    doc["gateway"]["key"] = str(tmp_path / "made" / "gateway.pem")
    doc["listen"] = {"ingress": {"port": ingress}, "admin": {"port": unused_port()}}
    national = next(m["id"] for m in doc["members"] if m["kind"] == "platform")
    doc["simulators"] = {
        name: {"member_id": member, "port": unused_port(), "key": str(tmp_path / "made" / pem)}
        for name, member, pem in (
            ("national", national, "national.pem"),
            ("portal", PORTAL_ID, "portal.pem"),
        )
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gateway"), "up", "--config", str(config),
             "--alg", "sm2-sm3"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            await until_healthy(session, process, ingress, log_path)
            async with session.get(f"http://127.0.0.1:{ingress}/.well-known/jwks.json") as resp:
                published = (await resp.json())["keys"]
    finally:
        process.terminate()
        assert process.wait(10) == 0
    assert [(k["kty"], k["crv"]) for k in published] == [("EC", "SM2")]
    for pem in ("gateway.pem", "national.pem", "portal.pem"):
        assert _openssl_verifies_a_signature_of(tmp_path / "made" / pem, tmp_path), pem


def test_keys_rotate_keeps_an_sm2_gateway_key_sm2(
    keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keys rotate on an SM2 gateway key: the new key is SM2; --alg ed25519 switches it."""
    pem = tmp_path / "gateway.pem"
    old = write_keypair(generate("sm2"), pem, jwk_path_for(pem))
    config = config_file(keys, tmp_path, key=str(pem))
    assert main(["keys", "rotate", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["old_kid"], report["alg"]) == (old.kid, "sm2-sm3")
    assert load_keypair(pem, jwk_path_for(pem)).algorithm == "sm2-sm3"
    assert main(["keys", "rotate", "--config", str(config), "--alg", "ed25519"]) == 0
    assert json.loads(capsys.readouterr().out)["alg"] == "ed25519"


# Expiry --------------------------------------------------------------------------------


def test_a_jwk_exp_is_the_keys_expiry_and_the_config_overrides_it(
    keys: Keys, tmp_path: Path
) -> None:
    """The public JWK's exp is the key's expiry (and is published); gateway.key_expires_at
    (RFC 3339) overrides it; a date without an offset is refused."""
    pem = gateway_copy(keys, tmp_path)
    jwk_file = jwk_path_for(pem)
    jwk_file.write_text(json.dumps({**keys.pairs["gateway"].jwk, "exp": 1900000000}))
    pair = load_keypair(pem, jwk_file)
    assert (pair.expires_at, pair.jwk["exp"]) == (1900000000.0, 1900000000)
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    doc["gateway"].update(key=str(pem), key_expires_at="2030-01-01T00:00:00+08:00")
    configured = load_gateway_keypair(parse_config(doc, base=tmp_path).gateway)
    assert configured.expires_at == 1893427200.0
    assert configured.jwk["exp"] == 1893427200
    doc["gateway"]["key_expires_at"] = "2030-01-01T00:00:00"
    with pytest.raises(ConfigError, match=r"/gateway/key_expires_at: .* with an offset"):
        parse_config(doc, base=tmp_path)


def test_keygen_expires_days_writes_the_jwk_exp_the_gateway_reads(tmp_path: Path) -> None:
    """keygen --expires-days N: the public JWK carries exp, and the loaded key expires then."""
    pem = tmp_path / "k.pem"
    assert main(["keygen", "--out", str(pem), "--expires-days", "10"]) == 0
    pair = load_keypair(pem, jwk_path_for(pem))
    assert pair.expires_at is not None
    assert abs(pair.expires_at - (time.time() + 10 * 86400)) < 60


def test_the_expiry_warning_starts_fourteen_days_before(keys: Keys) -> None:
    """No word 15 days out; days left inside 14; 'expired' after; none without an expiry."""
    now = 1_800_000_000.0
    base = keys.pairs["gateway"]
    assert expiry_warning(base, now) is None
    assert expiry_warning(dataclasses.replace(base, expires_at=now + 15 * 86400), now) is None
    soon = expiry_warning(dataclasses.replace(base, expires_at=now + 3 * 86400), now)
    assert soon is not None
    assert f"{base.kid} expires in 3.0 days" in soon
    gone = expiry_warning(dataclasses.replace(base, expires_at=now - 1), now)
    assert gone is not None
    assert "expired at" in gone


async def _console_overview(h: Harness) -> str:
    async with h.admin.post(
        "/signin", data={"token": h.tokens["auditor"]}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    async with h.admin.get("/") as resp:
        assert resp.status == 200
        return await resp.text()


@pytest.mark.parametrize("days", [5, 30])
async def test_a_key_near_its_expiry_warns_in_readyz_metrics_and_console(
    make_harness: HarnessFactory, days: int
) -> None:
    """Inside 14 days: /readyz stays 200 with a warning, the gauge counts the seconds
    left, the console shows a banner on every page; 30 days out: the gauge only."""
    expires = time.time() + days * 86400
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))

    def edit(doc: dict[str, Any]) -> None:
        doc["gateway"]["key_expires_at"] = stamp

    h = await make_harness(edit)
    kid = h.keys.pairs["gateway"].kid
    resp = await h.gateway.get("/readyz")
    ready = await resp.json()
    assert resp.status == 200, ready
    warned = [w for w in ready["warnings"] if "expires in" in w]
    assert len(warned) == (1 if days < 14 else 0)
    resp = await h.gateway.get("/metrics")
    text = await resp.text()
    line = next(x for x in text.splitlines() if x.startswith("gateway_signing_key_expires_in"))
    assert f'kid="{kid}"' in line
    assert abs(float(line.split()[-1]) - days * 86400) < 120
    page = await _console_overview(h)
    assert ("banner-key" in page) == (days < 14)
    assert (f"the signing key {kid} expires in" in page) == (days < 14)
