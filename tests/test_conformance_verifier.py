"""``CallbackVerifier`` (gateway/exchange/conformance.py), the check a member's callback endpoint
makes, on callbacks signed by the gateway's own ``Signer`` as delivery signs them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.cli import main
from gateway.crypto.keys import KeyPair, VerificationKey, algorithm_for, generate, private_to_jwk
from gateway.errors import DigestMismatch, GatewayError, KeyUnknown, SignatureInvalid
from gateway.exchange.conformance import (
    CallbackVerifier,
    KitOptions,
    _invalid_for,
    _tamper,
    run_kit,
)
from gateway.signing import Signer

URL = "https://portal.example/callbacks"
BODY = json.dumps({"decision": "approved", "case_number": "c-1"}).encode()


def _pair() -> KeyPair:
    key = generate("ed25519")
    jwk = private_to_jwk(key)
    return KeyPair(kid=jwk["kid"], algorithm=algorithm_for(key), private=key, jwk=jwk)


@pytest.fixture(scope="module")
def gateway() -> KeyPair:
    return _pair()


def _callback(pair: KeyPair, *, url: str = URL, body: bytes = BODY) -> CIMultiDict[str]:
    """Headers as gateway/exchange/delivery.py sends a callback: signed afresh, with a nonce."""
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Content-Type"] = "application/json"
    headers["Gw-Client"] = "330000:gateway"
    headers["Gw-Message-Id"] = "0b7f0b7e-8d0c-4a53-9d51-6f7f3f6a4a10"
    headers["Gw-Correlation-Id"] = "6c1f2f4e-52f4-4d0e-9a71-1c4d2d1b7a22"
    Signer(pair).sign_request("POST", url, headers, body)
    return headers


def _verifier(pair: KeyPair) -> CallbackVerifier:
    key = VerificationKey.from_jwk(pair.jwk)
    return CallbackVerifier({key.kid: key})


def test_a_genuine_callback_verifies_once_and_its_replay_is_refused(gateway: KeyPair) -> None:
    """The same signed callback a second time is refused as a replay."""
    verifier = _verifier(gateway)
    headers = _callback(gateway)
    assert verifier.verify(URL, headers, BODY).nonce is not None
    with pytest.raises(SignatureInvalid, match="replayed"):
        verifier.verify(URL, headers, BODY)


def test_a_redelivery_signed_afresh_is_not_a_replay(gateway: KeyPair) -> None:
    """The gateway's retry (same body and ids, a new signature) is taken."""
    verifier = _verifier(gateway)
    verifier.verify(URL, _callback(gateway), BODY)
    verifier.verify(URL, _callback(gateway), BODY)


def test_a_changed_body_is_refused(gateway: KeyPair) -> None:
    """A body that is not the one signed fails its Content-Digest."""
    tampered = _tamper(BODY)
    assert tampered != BODY
    assert json.loads(tampered).keys() == json.loads(BODY).keys()
    with pytest.raises(DigestMismatch):
        _verifier(gateway).verify(URL, _callback(gateway), tampered)


def test_a_callback_signed_for_another_url_or_by_another_key_is_refused(
    gateway: KeyPair,
) -> None:
    """The @target-uri is the member's public callback URL; only the gateway's keys count."""
    with pytest.raises(SignatureInvalid):
        _verifier(gateway).verify(URL, _callback(gateway, url="https://other.example/cb"), BODY)
    with pytest.raises(KeyUnknown):
        _verifier(gateway).verify(URL, _callback(_pair()), BODY)


def test_a_callback_not_covering_the_correlation_id_is_refused(gateway: KeyPair) -> None:
    """A signature that leaves Gw-Correlation-Id uncovered could be pinned to any message."""
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "application/json", "Gw-Client": "330000:gateway",
         "Gw-Message-Id": "0b7f0b7e-8d0c-4a53-9d51-6f7f3f6a4a10"}
    )  # fmt: skip
    Signer(gateway).sign_request("POST", URL, headers, BODY)
    headers["Gw-Correlation-Id"] = "6c1f2f4e-52f4-4d0e-9a71-1c4d2d1b7a22"
    with pytest.raises(GatewayError):
        _verifier(gateway).verify(URL, headers, BODY)


def test_a_stale_callback_is_refused(gateway: KeyPair) -> None:
    """A callback signed longer ago than the skew is refused, even the first time."""
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "application/json", "Gw-Client": "330000:gateway",
         "Gw-Message-Id": "0b7f0b7e-8d0c-4a53-9d51-6f7f3f6a4a10",
         "Gw-Correlation-Id": "6c1f2f4e-52f4-4d0e-9a71-1c4d2d1b7a22"}
    )  # fmt: skip
    Signer(gateway).sign_request("POST", URL, headers, BODY, created=int(time.time()) - 3600)
    with pytest.raises(GatewayError) as info:
        _verifier(gateway).verify(URL, headers, BODY)
    assert info.value.status == 401


def test_the_kit_finds_a_document_the_schema_refuses() -> None:
    """The 422 probe is refused by the schema locally before it is sent; none for `true`."""
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}},
              "examples": [{"a": "x"}]}  # fmt: skip
    assert not jsonschema.Draft202012Validator(schema).is_valid(_invalid_for(schema))
    assert _invalid_for(True) is ...


def test_the_kit_command_prints_help_and_refuses_a_bad_member_id(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`gateway conformance --help` exits 0 naming its options; a malformed --client is 2."""
    with pytest.raises(SystemExit) as info:
        main(["conformance", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--callback-url" in out
    assert "--report" in out
    assert main(["conformance", "--url", "http://127.0.0.1:1", "--client", "portal",
                 "--key", str(tmp_path / "none.pem")]) == 2  # fmt: skip


async def test_a_server_that_is_not_a_gateway_fails_the_kit_without_a_crash(
    gateway: KeyPair,
) -> None:
    """An answer the protocol does not describe is a failed check, never a traceback."""
    app = web.Application()

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [dict(gateway.jwk)]})

    async def anything(request: web.Request) -> web.Response:
        return web.json_response({"services": "not a list"})

    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/{tail:.*}", anything)
    async with TestServer(app) as server:
        report = await run_kit(
            KitOptions(
                url=str(server.make_url("")).rstrip("/"), client="330000:portal", keys=(_pair(),)
            )
        )
    assert not report.ok
    assert [c.id for c in report.checks if c.status == "fail"] == ["discovery"]
