"""``sm2-sm3`` end to end on loopback: a gateway, the national-platform simulator and the portal
all on SM2 keys; the OpenSSL command line as an independent member (its signature accepted,
the gateway's answer verified by it); hostile signatures refused 401 quietly; per-member
``allowed_algs`` from config and the admin API; SM2 JWKs through the admin API and in the JWKS.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from gateway.crypto.keys import KeyType, private_to_jwk
from gateway.crypto.sm2 import ORDER, Sm2PrivateKey
from gateway.signing import content_digest
from tests.conftest import (
    CREDIT_EXAMPLE,
    KEY_KINDS,
    PORTAL_ID,
    TAX_ID,
    Harness,
    HarnessFactory,
    Keys,
    make_keys,
)

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"  # dev.py test installs it when missing
SIGN = ["pkeyutl", "-sign", "-rawin", "-digest", "sm3"]
DISTID = ["-pkeyopt", "distid:1234567812345678"]
COMPONENTS = ("@method", "@target-uri", "content-digest", "content-type", "gw-client",
              "gw-message-id")  # fmt: skip
BODY = json.dumps(CREDIT_EXAMPLE, ensure_ascii=False).encode()
# Python's report of a log handler whose stream another test closed: not ours, not C's.
_LOGGING_ERROR = re.compile(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", re.S)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """The conftest's key set with SM2 for the gateway, portal, national platform, stranger."""
    sm2: dict[str, KeyType] = dict.fromkeys(("gateway", "portal", "national", "stranger"), "sm2")
    return make_keys(tmp_path_factory.mktemp("sm2-keys"), {**KEY_KINDS, **sm2})


def openssl(*args: str, data: bytes | None = None) -> bytes:
    ran = subprocess.run([OPENSSL, *args], input=data, capture_output=True, check=False)
    assert ran.returncode == 0, ran.stderr.decode()
    return ran.stdout


def openssl_sign(pem: Path, data: bytes, distid: list[str] = DISTID) -> bytes:
    """OpenSSL's SM2 signature, DER converted to r‖s."""
    r, s = decode_dss_signature(openssl(*SIGN, *distid, "-inkey", str(pem), data=data))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def openssl_verifies(public_pem: Path, data: bytes, rs: bytes, tmp: Path) -> bool:
    sig = tmp / "answer.der"
    sig.write_bytes(
        encode_dss_signature(int.from_bytes(rs[:32], "big"), int.from_bytes(rs[32:], "big"))
    )
    ran = subprocess.run(
        [OPENSSL, "pkeyutl", "-verify", "-rawin", "-digest", "sm3", *DISTID, "-pubin",
         "-inkey", str(public_pem), "-sigfile", str(sig)],
        input=data, capture_output=True, check=False,
    )  # fmt: skip
    return ran.returncode == 0 and b"Signature Verified Successfully" in ran.stdout


def request_base(h: Harness, headers: dict[str, str], params: str) -> bytes:
    """The RFC 9421 signature base joined by hand (no code of ours builds it)."""
    values = {"@method": "POST", "@target-uri": f"{h.url}/v1/exchange/credit.query"}
    lines = [f'"{name}": {values.get(name) or headers[name]}' for name in COMPONENTS]
    return "\n".join([*lines, f'"@signature-params": {params}']).encode()


def member_request(
    h: Harness,
    sign: Callable[[bytes], bytes],
    *,
    keyid: str,
    client: str = PORTAL_ID,
    alg: str = "sm2-sm3",
) -> dict[str, str]:
    headers = {
        "content-digest": content_digest(BODY, "sm3"),
        "content-type": "application/json",
        "gw-client": client,
        "gw-message-id": str(uuid.uuid4()),
    }
    inner = " ".join(f'"{c}"' for c in COMPONENTS)
    params = f'({inner});created={int(time.time())};keyid="{keyid}";alg="{alg}"'
    signature = sign(request_base(h, headers, params))
    headers["signature-input"] = f"sig1={params}"
    headers["signature"] = f"sig1=:{base64.b64encode(signature).decode()}:"
    return headers


async def test_openssl_member_is_served_and_openssl_verifies_the_sm2_answer(
    harness: Harness, keys: Keys, tmp_path: Path
) -> None:
    """A request signed by `openssl pkeyutl` is answered 200; the answer is sm2-sm3 over an
    sm3 digest, and OpenSSL verifies it with the gateway's public key; the gateway's
    outbound request to the (SM2) national platform carried an sm3 digest too."""
    portal = keys.pairs["portal"]
    headers = member_request(
        harness, lambda base: openssl_sign(keys.directory / "portal.pem", base), keyid=portal.kid
    )
    response = await harness.gateway.post("/v1/exchange/credit.query", data=BODY, headers=headers)
    answer = await response.read()
    assert response.status == 200, answer
    assert harness.national.digests[-1] == "sm3"
    assert response.headers["Content-Digest"] == content_digest(answer, "sm3")
    sm3 = openssl("dgst", "-sm3", "-binary", data=answer)
    assert response.headers["Content-Digest"] == f"sm3=:{base64.b64encode(sm3).decode()}:"
    params = response.headers["Signature-Input"].removeprefix("gw=")
    assert 'alg="sm2-sm3"' in params
    items = re.fullmatch(r"\((.*)\);.*", params)
    assert items is not None
    lines = []
    for item in items.group(1).split(" "):
        if item == '"signature";req;key="sig1"':
            lines.append(f"{item}: {headers['signature'].removeprefix('sig1=')}")
        elif item == '"@status"':
            lines.append(f"{item}: {response.status}")
        else:
            lines.append(f"{item}: {response.headers[item.strip(chr(34))]}")
    base = "\n".join([*lines, f'"@signature-params": {params}']).encode()
    signature = base64.b64decode(response.headers["Signature"].removeprefix("gw=:")[:-1])
    public = tmp_path / "gateway.pub.pem"
    public.write_bytes(openssl("pkey", "-in", str(keys.directory / "gateway.pem"), "-pubout"))
    assert openssl_verifies(public, base, signature, tmp_path)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not openssl_verifies(public, base, flipped, tmp_path)


def _p256_signer(keys: Keys) -> Callable[[bytes], bytes]:
    key = keys.pairs["tax"].private
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    def sign(base: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(base, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def _hostile(keys: Keys, case: str) -> tuple[Callable[[bytes], bytes], str, str]:
    """(signing function, keyid, client) for one hostile case."""
    pem = keys.directory / "portal.pem"
    kid = keys.pairs["portal"].kid

    def altered(base: bytes) -> bytes:
        good = openssl_sign(pem, base)
        if case == "one flipped bit":
            return good[:40] + bytes([good[40] ^ 0x04]) + good[41:]
        if case == "DER-encoded":
            r, s = int.from_bytes(good[:32], "big"), int.from_bytes(good[32:], "big")
            return encode_dss_signature(r, s)
        return good[:32] + ORDER.to_bytes(32, "big")  # s ≥ n

    if case == "wrong ID":
        return (lambda base: openssl_sign(pem, base, ["-pkeyopt", "distid:ALICE123@YAHOO.COM"]),
                kid, PORTAL_ID)  # fmt: skip
    if case == "P-256 key claiming sm2-sm3":
        return _p256_signer(keys), keys.pairs["tax"].kid, TAX_ID
    return altered, kid, PORTAL_ID


@pytest.mark.parametrize(
    "case",
    ["one flipped bit", "wrong ID", "DER-encoded", "s ≥ n", "P-256 key claiming sm2-sm3"],
)
async def test_hostile_sm2_signatures_are_refused_401_quietly(
    harness: Harness, keys: Keys, case: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Each is a 401 problem (never a 500), nothing is delivered, nothing reaches stderr."""
    sign, kid, client = _hostile(keys, case)
    headers = member_request(harness, sign, keyid=kid, client=client)
    before = len(harness.national.received)
    response = await harness.gateway.post("/v1/exchange/credit.query", data=BODY, headers=headers)
    problem = await response.json(content_type=None)
    assert response.status == 401, problem
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert problem["code"] == "signature_invalid"
    assert len(harness.national.received) == before
    assert _LOGGING_ERROR.sub("", capfd.readouterr().err) == ""


async def test_allowed_algs_refuses_other_algorithms_with_a_detail_saying_so(
    make_harness: HarnessFactory, keys: Keys
) -> None:
    """A member limited to sm2-sm3 that signs with P-256 gets 401 naming the policy; an SM2
    member under the same policy is served."""

    def policy(doc: dict[str, Any]) -> None:
        for member in doc["members"]:
            if member["id"] in (PORTAL_ID, TAX_ID):
                member["allowed_algs"] = ["sm2-sm3"]
                member["services"] = ["credit.query"]

    h = await make_harness(policy)
    tax = h.client("tax")
    refused = await tax.exchange("credit.query", CREDIT_EXAMPLE)
    assert refused.status == 401
    assert refused.json()["code"] == "signature_invalid"
    detail = refused.json()["detail"]
    assert "ecdsa-p256-sha256 is not allowed" in detail
    assert "allowed_algs: sm2-sm3" in detail
    served = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert served.status == 200, served.body


async def test_admin_api_sets_allowed_algs_and_accepts_sm2_jwks(
    make_harness: HarnessFactory, keys: Keys
) -> None:
    """PATCH allowed_algs onto the P-256 member: it is refused; give it an SM2 JWK through
    the admin API: signing with that key it is served again."""
    h = await make_harness()
    path = f"/admin/v1/members/{TAX_ID}"
    patched = await h.admin.patch(
        path, json={"allowed_algs": ["sm2-sm3"], "services": ["credit.query"]}, headers=h.auth()
    )
    assert patched.status == 200, await patched.text()
    refused = await h.client("tax").exchange("credit.query", CREDIT_EXAMPLE)
    assert refused.status == 401
    assert "allowed_algs" in refused.json()["detail"]
    fresh = Sm2PrivateKey.generate()
    jwk = private_to_jwk(fresh)
    assert jwk["crv"] == "SM2"
    added = await h.admin.post(f"{path}/keys", json=jwk, headers=h.auth())
    assert added.status == 201, await added.text()
    shown = await (await h.admin.get(path, headers=h.auth())).json()
    assert shown["allowed_algs"] == ["sm2-sm3"]
    assert any(k.get("kid") == jwk["kid"] for k in shown["keys"])
    headers = member_request(h, fresh.sign, keyid=jwk["kid"], client=TAX_ID)
    served = await h.gateway.post("/v1/exchange/credit.query", data=BODY, headers=headers)
    assert served.status == 200, await served.text()


async def test_the_jwks_publishes_the_sm2_gateway_key(harness: Harness, keys: Keys) -> None:
    """/.well-known/jwks.json holds the gateway's SM2 key: EC, crv SM2, its RFC 7638 kid."""
    jwks = await (await harness.gateway.get("/.well-known/jwks.json")).json()
    current = jwks["keys"][0]
    assert current == dict(keys.pairs["gateway"].jwk)
    assert (current["kty"], current["crv"], current["alg"]) == ("EC", "SM2", "SM2-SM3")


async def test_an_adapters_content_digest_option_overrides_the_keys_default(
    make_harness: HarnessFactory,
) -> None:
    """The SM2 gateway writes sm3 by default; `content_digest: sha-512` on the adapter wins."""

    def sha512(doc: dict[str, Any]) -> None:
        doc["adapters"][0]["config"]["content_digest"] = "sha-512"

    h = await make_harness(sha512)
    reply = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200, reply.body
    assert h.national.digests == ["sha-512"]


async def test_admin_api_refuses_an_unknown_algorithm_in_allowed_algs(harness: Harness) -> None:
    """allowed_algs holds only the protocol's algorithm names: anything else is a 422."""
    response = await harness.admin.patch(
        f"/admin/v1/members/{TAX_ID}", json={"allowed_algs": ["sm9"]}, headers=harness.auth()
    )
    assert response.status == 422, await response.text()
    problem = await response.json(content_type=None)
    assert any("allowed_algs" in e["pointer"] for e in problem["errors"]), problem
