"""The `gateway` command line, in process and as a real subprocess, on files in tmp_path."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.cli import main
from gateway.store import NewMessage
from gateway.store.sqlite import SQLiteStore
from tests.conftest import ROOT, Keys

GATEWAY_BIN = Path(sys.executable).parent / "gateway"
PORTAL = "330000:one-stop-portal"
# config.yaml names these keys; a fresh deployment creates them with `gateway keygen`.
DEPLOYMENT_KEYS = ("gateway", "one-stop-portal", "national-platform")


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    """The repository's config.yaml and schemas, copied, with keys made by `gateway keygen`."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    for name in DEPLOYMENT_KEYS:
        assert main(["keygen", "--out", str(tmp_path / "keys" / f"{name}.pem")]) == 0
    return tmp_path / "config.yaml"


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _rfc7638(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint computed here, independently of gateway.crypto.keys."""
    members = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
    required = {name: jwk[name] for name in members[jwk["kty"]]}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return _b64u(hashlib.sha256(canonical.encode()).digest())


def _public_members(pem: bytes) -> dict[str, str]:
    """The JWK public members a PEM private key must have, derived with cryptography."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64u(raw)}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        nums = key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64u(nums.x.to_bytes(32, "big")),
            "y": _b64u(nums.y.to_bytes(32, "big")),
        }
    assert isinstance(key, rsa.RSAPrivateKey)
    rnums = key.public_key().public_numbers()
    return {
        "kty": "RSA",
        "n": _b64u(rnums.n.to_bytes((rnums.n.bit_length() + 7) // 8, "big")),
        "e": _b64u(rnums.e.to_bytes((rnums.e.bit_length() + 7) // 8, "big")),
    }


def _run(work: Callable[[SQLiteStore], Awaitable[Any]], path: Path) -> Any:
    async def go() -> Any:
        store = SQLiteStore(path)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _message(message_id: str, **changes: Any) -> NewMessage:
    fields: dict[str, Any] = {
        "message_id": message_id,
        "client": PORTAL,
        "service": "crossregion.apply",
        "mode": "async",
        "state": "accepted",
        "request_headers": {"Gw-Client": PORTAL, "Gw-User": "zhangsan@zj", "Gw-Issue": "ZJ-1"},
        "request_body": '{"applicant": "张三"}'.encode(),
        "request_digest": "d1g35t",
        "next_attempt_at": time.time(),
    }
    fields.update(changes)
    return NewMessage(**fields)


@pytest.mark.parametrize(
    ("kind", "alg", "kty"),
    [
        ("ed25519", "ed25519", "OKP"),
        ("ecdsa-p256", "ecdsa-p256-sha256", "EC"),
        ("rsa-pss", "rsa-pss-sha512", "RSA"),
    ],
)
def test_keygen_writes_private_pem_0600_and_public_jwk(
    kind: str, alg: str, kty: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen writes a 0600 PKCS#8 PEM and the matching public JWK with an RFC 7638 kid."""
    pem = tmp_path / "keys" / "member.pem"
    assert main(["keygen", "--type", kind, "--out", str(pem)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    pem_bytes = pem.read_bytes()
    assert pem_bytes.startswith(b"-----BEGIN PRIVATE KEY-----")
    jwk_file = tmp_path / "keys" / "member.jwk.json"
    jwk = json.loads(jwk_file.read_text(encoding="utf-8"))
    assert jwk["kty"] == kty
    assert "d" not in jwk
    assert {k: jwk[k] for k in _public_members(pem_bytes)} == _public_members(pem_bytes)
    assert jwk["kid"] == _rfc7638(jwk)
    assert printed == {
        "kid": jwk["kid"],
        "alg": alg,
        "private": str(pem),
        "public_jwk": str(jwk_file),
    }


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing key is kept unless --force is given; with it the key is replaced."""
    pem = tmp_path / "gateway.pem"
    assert main(["keygen", "--out", str(pem)]) == 0
    original = pem.read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(pem)]) == 1
    assert "--force" in capsys.readouterr().err
    assert pem.read_bytes() == original
    assert main(["keygen", "--out", str(pem), "--force"]) == 0
    assert pem.read_bytes() != original
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600


def test_keygen_uses_a_given_kid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--kid replaces the thumbprint as the key id in the JWK and the output."""
    pem = tmp_path / "k.pem"
    assert main(["keygen", "--out", str(pem), "--kid", "zj-2026-01"]) == 0
    assert json.loads(capsys.readouterr().out)["kid"] == "zj-2026-01"
    assert json.loads((tmp_path / "k.jwk.json").read_text(encoding="utf-8"))["kid"] == "zj-2026-01"


def test_check_accepts_the_repository_config(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` on config.yaml with its keys present prints OK with the counts and exits 0."""
    assert main(["check", "--config", str(deployment)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"{deployment}: OK (3 members, 6 services, 2 adapters, 6 routes)")


def test_check_prints_warnings_but_passes(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service without a route is a located warning; the config still checks OK."""
    doc = yaml.safe_load(deployment.read_text(encoding="utf-8"))
    doc["routes"] = doc["routes"][:1]
    deployment.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert main(["check", "--config", str(deployment)]) == 0
    lines = capsys.readouterr().out.splitlines()
    unrouted = [s["code"] for s in doc["services"][1:]]
    assert lines == [
        *(
            f"{deployment}:/services/{i}: service {code} has no route (answers 503) [warning]"
            for i, code in enumerate(unrouted, start=1)
        ),
        f"{deployment}: OK (3 members, 6 services, 2 adapters, 1 routes)",
    ]


def test_check_and_serve_refuse_a_public_listener_without_public_url(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Beyond loopback without gateway.public_url: `check` exits 1 naming the key, `serve`
    exits 2 before binding (a --listen override too); with public_url `check` is OK."""
    doc = yaml.safe_load(deployment.read_text(encoding="utf-8"))
    doc["listen"]["ingress"]["host"] = "0.0.0.0"
    deployment.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert main(["check", "--config", str(deployment)]) == 1
    assert "/gateway/public_url: the ingress listens on 0.0.0.0" in capsys.readouterr().out
    assert main(["serve", "--config", str(deployment)]) == 2
    assert "/gateway/public_url" in capsys.readouterr().err
    doc["listen"]["ingress"]["host"] = "127.0.0.1"
    deployment.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert main(["serve", "--config", str(deployment), "--listen", "0.0.0.0:0"]) == 2
    assert "/gateway/public_url" in capsys.readouterr().err
    doc["gateway"]["public_url"] = "https://gw.zj.example"
    doc["listen"]["ingress"]["host"] = "0.0.0.0"
    deployment.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert main(["check", "--config", str(deployment)]) == 0


def test_check_lists_every_schema_problem_with_its_location(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config breaking the schema in three places prints three located problems, exit 1."""
    doc = yaml.safe_load(deployment.read_text(encoding="utf-8"))
    doc["members"][0]["id"] = "portal"
    doc["services"][1]["mode"] = "eventually"
    doc["routes"][0]["extra"] = 1
    deployment.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert main(["check", "--config", str(deployment)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "3 problem(s)"
    locations = [line.removeprefix(f"{deployment}:").split(": ", 1)[0] for line in lines[:-1]]
    assert sorted(locations) == ["/members/0/id", "/routes/0", "/services/1/mode"]


def test_check_lists_cross_reference_and_adapter_problems(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Problems the schema cannot see, and bad adapter config, are printed with locations."""
    doc = yaml.safe_load(deployment.read_text(encoding="utf-8"))
    del doc["services"][1]["callback_schema"]
    doc["routes"][0]["adapter"] = "nowhere"
    deployment.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert main(["check", "--config", str(deployment)]) == 1
    out = capsys.readouterr().out
    assert f"{deployment}:/services/1/callback_schema: an async service needs one" in out
    assert f"{deployment}:/routes/0/adapter: unknown adapter nowhere" in out
    assert out.splitlines()[-1] == "2 problem(s)"

    doc = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    doc["adapters"][0]["config"]["base_url"] = "ftp://national"
    doc["adapters"][0]["config"]["retries"] = 3
    deployment.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    (deployment.parent / "keys" / "gateway.pem").unlink()
    assert main(["check", "--config", str(deployment)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "3 problem(s)"
    assert any(line.startswith(f"{deployment}:/adapters/0/config/base_url: ") for line in lines)
    assert any(line.startswith(f"{deployment}:/adapters/0/config: ") for line in lines)
    assert f"{deployment}:/gateway/key: " in lines[-2]
    assert "gateway keygen" in lines[-2]


def test_log_show_prints_the_exchange_with_the_user_masked(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`log show ID` prints the recorded exchange as JSON, with Gw-User replaced by ***."""
    message_id = str(uuid.uuid4())
    store_path = deployment.parent / "var" / "gateway.db"
    _run(lambda s: s.insert_message(_message(message_id)), store_path)
    assert main(["log", "show", "--config", str(deployment), message_id.upper()]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["message_id"] == message_id
    assert shown["client"] == PORTAL
    assert shown["state"] == "accepted"
    assert shown["request_headers"] == {"Gw-Client": PORTAL, "Gw-User": "***", "Gw-Issue": "ZJ-1"}
    assert shown["request"] == {"applicant": "张三"}
    assert shown["result"] is None


def test_log_show_unknown_id_exits_1(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An id that was never recorded is reported on stderr with exit status 1."""
    assert main(["log", "show", "--config", str(deployment), "no-such-id"]) == 1
    assert "no message no-such-id" in capsys.readouterr().err


def test_dead_letters_list_and_redeliver(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dead message is listed (table and JSON) and redelivered once; a second try fails."""
    store_path = deployment.parent / "var" / "gateway.db"
    message_id = str(uuid.uuid4())

    async def seed(store: SQLiteStore) -> int:
        record = await store.insert_message(_message(message_id))
        await store.insert_message(_message(str(uuid.uuid4())))  # alive
        await store.claim_due_messages(time.time() + 5, 10, 30)  # delivery holds the lease
        await store.set_message_state(record.seq, "dead", error="national down", attempts=12)
        return record.seq

    seq: int = _run(seed, store_path)
    config = ["--config", str(deployment)]
    assert main(["dead-letters", "list", *config]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["KIND", "SEQ", "MESSAGE", "ID", "SERVICE", "ATTEMPTS", "ERROR"]
    assert out[1].split() == [
        "message",
        str(seq),
        message_id,
        "crossregion.apply",
        "12",
        "national",
        "down",
    ]
    assert out[-1] == "1 dead letter(s)"

    assert main(["dead-letters", "list", "--json", *config]) == 0
    (letter,) = json.loads(capsys.readouterr().out)
    assert (letter["kind"], letter["seq"], letter["message_id"]) == ("message", seq, message_id)

    assert main(["dead-letters", "redeliver", *config, "message", str(seq)]) == 0
    assert capsys.readouterr().out.strip() == "queued for redelivery"
    assert main(["dead-letters", "redeliver", *config, "message", str(seq)]) == 1
    assert capsys.readouterr().out.strip() == f"no dead message {seq}"
    record = _run(lambda s: s.get_message_by_seq(seq), store_path)
    assert (record.state, record.attempts) == ("accepted", 0)
    assert main(["dead-letters", "list", *config]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 dead letter(s)"


def test_broken_config_for_a_store_command_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Commands other than check report config problems on stderr and exit 2."""
    path = tmp_path / "config.yaml"
    path.write_text("gateway: {}\n", encoding="utf-8")
    assert main(["dead-letters", "list", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "config: /: 'members' is a required property" in err
    assert "config: /gateway: 'member_id' is a required property" in err


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command argparse exits with status 2 and a usage line."""
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "usage: gateway" in capsys.readouterr().err


def _gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed console script; warnings are errors there too."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    return subprocess.run(
        [str(GATEWAY_BIN), *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


@pytest.mark.integration
def test_installed_script_runs_help_and_check(deployment: Path) -> None:
    """The installed `gateway` script runs as a real process: --help, then check OK and broken."""
    helped = _gateway("--help", cwd=deployment.parent)
    assert helped.returncode == 0, helped.stderr
    for command in ("serve", "up", "check", "keygen", "log", "dead-letters"):
        assert command in helped.stdout
    checked = _gateway("check", "--config", str(deployment), cwd=deployment.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == (
        f"{deployment}: OK (3 members, 6 services, 2 adapters, 6 routes)"
    )
    (deployment.parent / "keys" / "national-platform.jwk.json").unlink()
    broken = _gateway("check", "--config", "config.yaml", cwd=deployment.parent)
    assert broken.returncode == 1
    assert broken.stdout.startswith("config.yaml:/members/1/keys/0: cannot read")
    assert broken.stdout.splitlines()[-1] == "1 problem(s)"


@pytest.mark.integration
async def test_serve_listen_flags_override_the_config_s_listeners(
    keys: Keys, tmp_path: Path
) -> None:
    """`serve --listen/--admin-listen`: both listeners where the flags say, none where the
    file says (so several instances can share one config file)."""
    import aiohttp

    from tests.conftest import unused_port
    from tests.test_observability import _serve_config, until_healthy

    file_port = _serve_config(keys, tmp_path / "serve", {"level": "warning"})
    ingress, admin = unused_port(), unused_port()
    config = tmp_path / "serve" / "config.yaml"
    log_path = tmp_path / "serve.log"
    flags = ["--listen", f"127.0.0.1:{ingress}", "--admin-listen", f"127.0.0.1:{admin}"]
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [str(GATEWAY_BIN), "serve", "--config", str(config), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as session:
            await until_healthy(session, process, ingress, log_path)
            async with session.get(f"http://127.0.0.1:{admin}/openapi.json") as resp:
                assert resp.status == 200
                assert "/admin/v1/members" in (await resp.json())["paths"]
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(f"http://127.0.0.1:{file_port}/healthz"):
                    pass
    finally:
        process.terminate()
        assert process.wait(10) == 0


def test_config_export_prints_placeholders_and_writes_secrets_only_to_a_0600_file(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stdout shows secrets as placeholders; --out writes them into a loadable 0600 file."""
    doc = yaml.safe_load(deployment.read_text(encoding="utf-8"))
    doc["adapters"].append(
        {
            "name": "upstream",
            "type": "http",
            "config": {"url": "http://127.0.0.1:9/x", "headers": {"X-Api-Key": "export-s3cret"}},
        }
    )
    doc["members"].append(
        {
            "id": "330000:hmac-desk",
            "kind": "system",
            "keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0LWs"}],
        }
    )
    deployment.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert main(["config", "export", "--config", str(deployment)]) == 0
    printed = capsys.readouterr().out
    assert "export-s3cret" not in printed
    assert "c2VjcmV0LWs" not in printed
    assert len(re.findall(r"set · [0-9a-f]{8}", printed)) == 2
    out = deployment.parent / "exported.yaml"
    assert main(["config", "export", "--config", str(deployment), "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    written = out.read_text(encoding="utf-8")
    assert "export-s3cret" in written
    assert "c2VjcmV0LWs" in written
    shutil.copy(out, deployment)
    assert main(["check", "--config", str(deployment)]) == 0
