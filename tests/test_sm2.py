"""SM2 with SM3 (gateway/crypto/sm2.py and its use in keys and checkpoints): the GB/T 32918 vector,
the OpenSSL command line as an independent peer, canonical signatures only, quiet failures,
keys round-tripping PEM ↔ JWK, and the SM2-SM3 checkpoint JWS."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit import JwsInvalid, sign_jws, verify_jws
from gateway.config.model import jwk_path_for
from gateway.crypto.keys import (
    KeyPair,
    VerificationKey,
    generate,
    jwk_thumbprint,
    load_keypair,
    private_to_jwk,
    public_from_jwk,
    public_to_jwk,
    rotate_keypair,
    write_keypair,
)
from gateway.crypto.sm2 import ORDER, Sm2PrivateKey, Sm2PublicKey, _lib
from gateway.errors import ConfigError, DigestMismatch
from gateway.signing import check_content_digest, content_digest

LOCAL_VECTOR = Path(__file__).parent / "vectors" / "sm2-sm3-gbt32918.json"
DISTID = "distid:1234567812345678"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"  # dev.py test installs it when missing


def vector() -> dict[str, str]:
    """The GB/T 32918.5 Annex A example, as the project keeps it in tests/vectors."""
    data: dict[str, str] = json.loads(LOCAL_VECTOR.read_text(encoding="utf-8"))
    return data


def openssl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The OpenSSL command line (an independent SM2 implementation's front end)."""
    return subprocess.run([OPENSSL, *args], input=data, capture_output=True, check=False)


def rs_from_der(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def der_from_rs(rs: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(rs[:32], "big"), int.from_bytes(rs[32:], "big"))


@pytest.fixture(scope="module")
def sm2_key() -> Sm2PrivateKey:
    return Sm2PrivateKey.generate()


# The GB/T 32918.5 vector ---------------------------------------------------------------


def test_the_gbt32918_signature_verifies() -> None:
    """Annex A's (r, s) over "message digest" verifies under its key (ID 1234567812345678)."""
    v = vector()
    key = Sm2PublicKey.from_point(int(v["public_key_x"], 16), int(v["public_key_y"], 16))
    signature = base64.b64decode(v["signature_rs_base64"])
    assert signature.hex().upper() == v["r"] + v["s"]
    key.verify(signature, v["message_ascii"].encode())
    with pytest.raises(InvalidSignature):
        key.verify(signature, b"message digesT")


def test_the_gbt32918_vector_through_a_jwk() -> None:
    """The vector's key as the JWK members would send it verifies the same signature."""
    v = vector()
    jwk = {
        "kty": "EC",
        "crv": "SM2",
        "x": base64.urlsafe_b64encode(bytes.fromhex(v["public_key_x"])).rstrip(b"=").decode(),
        "y": base64.urlsafe_b64encode(bytes.fromhex(v["public_key_y"])).rstrip(b"=").decode(),
    }
    key = VerificationKey.from_jwk(jwk)
    assert key.algorithm == "sm2-sm3"
    assert key.kid == jwk_thumbprint(jwk)
    assert isinstance(key.key, Sm2PublicKey)
    key.key.verify(base64.b64decode(v["signature_rs_base64"]), v["message_ascii"].encode())


def test_sm3_digest_of_abc_is_the_standard_one() -> None:
    """GB/T 32905's example: SM3("abc"); Content-Digest sm3 carries it and is checked."""
    expected = bytes.fromhex(vector()["sm3_abc"])
    field = content_digest(b"abc", "sm3")
    assert field == f"sm3=:{base64.b64encode(expected).decode()}:"
    sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert check_content_digest(field, b"abc") == sha256  # recorded under its sha-256
    assert check_content_digest(f"{content_digest(b'abc')}, {field}", b"abc") == sha256
    with pytest.raises(DigestMismatch, match="sm3"):
        check_content_digest(field, b"abd")


# OpenSSL as the other party ---------------------------------------------------------------


def test_openssl_verifies_our_signature_and_we_verify_its(
    sm2_key: Sm2PrivateKey, tmp_path: Path
) -> None:
    """Both directions with `openssl pkeyutl -rawin -digest sm3 -pkeyopt distid:…`."""
    pem = tmp_path / "k.pem"
    pem.write_bytes(sm2_key.private_pem())
    message = tmp_path / "m"
    message.write_bytes(b'"@method": POST\n"@signature-params": ("@method")')
    sig = tmp_path / "s.der"
    sig.write_bytes(der_from_rs(sm2_key.sign(message.read_bytes())))
    verify = ["pkeyutl", "-verify", "-rawin", "-digest", "sm3", "-pkeyopt", DISTID]
    ran = openssl(*verify, "-inkey", str(pem), "-in", str(message), "-sigfile", str(sig))
    assert ran.returncode == 0, ran.stderr
    assert b"Signature Verified Successfully" in ran.stdout
    sign = ["pkeyutl", "-sign", "-rawin", "-digest", "sm3", "-pkeyopt", DISTID]
    theirs = openssl(*sign, "-inkey", str(pem), "-in", str(message))
    assert theirs.returncode == 0, theirs.stderr
    sm2_key.public_key().verify(rs_from_der(theirs.stdout), message.read_bytes())


def test_a_signature_under_another_id_does_not_verify(
    sm2_key: Sm2PrivateKey, tmp_path: Path
) -> None:
    """OpenSSL's default (empty) ID and any other ID give signatures we refuse."""
    pem = tmp_path / "k.pem"
    pem.write_bytes(sm2_key.private_pem())
    message = b"the signature base"
    for extra in ([], ["-pkeyopt", "distid:1234567812345679"]):
        ran = openssl(
            "pkeyutl", "-sign", "-rawin", "-digest", "sm3", *extra, "-inkey", str(pem),
            data=message,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        with pytest.raises(InvalidSignature):
            sm2_key.public_key().verify(rs_from_der(ran.stdout), message)


def test_pems_from_openssl_genpkey_load_as_they_are(tmp_path: Path) -> None:
    """`openssl genpkey -algorithm SM2`, plain and AES-encrypted, loads; its JWK is SM2."""
    plain, encrypted = tmp_path / "plain.pem", tmp_path / "enc.pem"
    assert openssl("genpkey", "-algorithm", "SM2", "-out", str(plain)).returncode == 0
    ran = openssl(
        "genpkey", "-algorithm", "SM2", "-aes-256-cbc", "-pass", "pass:s3cret",
        "-out", str(encrypted),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    for path in (plain, encrypted):
        path.chmod(0o600)
    pair = load_keypair(plain)
    assert pair.algorithm == "sm2-sm3"
    assert isinstance(pair.private, Sm2PrivateKey)
    assert pair.private.private_pem() == plain.read_bytes()  # written back exactly as read
    public = openssl("pkey", "-in", str(plain), "-pubout", "-outform", "DER").stdout
    x = base64.urlsafe_b64decode(pair.jwk["x"] + "=")
    y = base64.urlsafe_b64decode(pair.jwk["y"] + "=")
    assert public.endswith(b"\x04" + x + y)
    assert load_keypair(encrypted, passphrase=b"s3cret").jwk["crv"] == "SM2"
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_keypair(encrypted, passphrase=b"wrong")


def test_our_encrypted_pkcs8_opens_with_openssl(sm2_key: Sm2PrivateKey, tmp_path: Path) -> None:
    """write_keypair with a passphrase: PKCS#8 0600 that `openssl pkey -passin` decrypts."""
    pem = tmp_path / "gw.pem"
    pair = write_keypair(sm2_key, pem, jwk_path_for(pem), passphrase=b"pw")
    assert pem.stat().st_mode & 0o777 == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    ran = openssl("pkey", "-in", str(pem), "-passin", "pass:pw", "-noout", "-text")
    assert ran.returncode == 0, ran.stderr
    assert b"SM2" in ran.stdout
    assert json.loads(jwk_path_for(pem).read_text())["kid"] == pair.kid
    assert load_keypair(pem, jwk_path_for(pem), passphrase=b"pw").kid == pair.kid


def test_rotation_keeps_an_sm2_key_sm2(tmp_path: Path) -> None:
    """rotate_keypair on an SM2 key makes a new SM2 key and retires the old JWK."""
    pem = tmp_path / "gw.pem"
    old = write_keypair(generate("sm2"), pem, jwk_path_for(pem))
    rotated = tmp_path / "gw.previous.jwks.json"
    _, new, _ = rotate_keypair(pem, jwk_path_for(pem), rotated, grace_s=60)
    assert new.algorithm == "sm2-sm3"
    assert new.kid != old.kid
    assert load_keypair(pem, jwk_path_for(pem)).kid == new.kid
    assert json.loads(rotated.read_text())["keys"][0]["kid"] == old.kid


# Only canonical signatures, refused quietly ----------------------------------------------


def _hostile(signature: bytes) -> dict[str, bytes]:
    r, s = signature[:32], signature[32:]
    flipped = bytearray(signature)
    flipped[17] ^= 0x10
    return {
        "one flipped bit": bytes(flipped),
        "DER-encoded": der_from_rs(signature),
        "s = n": r + ORDER.to_bytes(32, "big"),
        "s = 0": r + bytes(32),
        "r ≥ n": (2**256 - 1).to_bytes(32, "big") + s,
        "short": signature[:63],
        "long": signature + b"\x00",
    }


def test_non_canonical_or_altered_signatures_fail_without_noise(
    sm2_key: Sm2PrivateKey, capfd: pytest.CaptureFixture[str]
) -> None:
    """Each hostile form raises InvalidSignature, prints nothing, leaves no OpenSSL error."""
    message = b"base"
    good = sm2_key.sign(message)
    public = sm2_key.public_key()
    for name, signature in _hostile(good).items():
        with pytest.raises(InvalidSignature):
            public.verify(signature, message)
        assert _lib().ERR_peek_error() == 0, name
    public.verify(good, message)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_points_off_the_curve_and_p256_keys_are_not_sm2(tmp_path: Path) -> None:
    """A JWK whose point is not on sm2p256v1 is refused; a P-256 PEM is not taken as SM2;
    an SM2 PEM with explicit curve parameters is refused (no odd encodings reach the codec)."""
    p256 = private_to_jwk(generate("ecdsa-p256"))
    with pytest.raises(ValueError, match="SM2"):
        public_from_jwk({**p256, "crv": "SM2"})
    with pytest.raises(ValueError, match="32 bytes"):
        public_from_jwk({"kty": "EC", "crv": "SM2", "x": "AQ", "y": "AQ"})
    pem = tmp_path / "p256.pem"
    assert openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                   "-out", str(pem)).returncode == 0  # fmt: skip
    with pytest.raises(ValueError, match="not an SM2 key"):
        Sm2PrivateKey.from_pem(pem.read_bytes())
    explicit = tmp_path / "explicit.pem"
    assert openssl("ecparam", "-name", "SM2", "-genkey", "-param_enc", "explicit", "-noout",
                   "-out", str(explicit)).returncode == 0  # fmt: skip
    with pytest.raises(ValueError, match="explicit parameters are refused"):
        Sm2PrivateKey.from_pem(explicit.read_bytes())


# Properties ---------------------------------------------------------------------------

KEYS = [Sm2PrivateKey.generate() for _ in range(4)]
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    index=st.integers(0, len(KEYS) - 1),
    passphrase=st.none() | st.binary(min_size=1, max_size=24).filter(lambda b: b"\0" not in b),
)
def test_keys_round_trip_pem_and_jwk(index: int, passphrase: bytes | None) -> None:
    """PEM → key → PEM is the same key; public JWK → key → JWK is the same JWK (kid too)."""
    key = KEYS[index]
    again = Sm2PrivateKey.from_pem(key.private_pem(passphrase), passphrase)
    assert private_to_jwk(again) == private_to_jwk(key)
    jwk = private_to_jwk(key)
    assert jwk["kid"] == jwk_thumbprint(jwk)
    public = public_from_jwk(jwk)
    assert isinstance(public, Sm2PublicKey)
    assert public_to_jwk(public) == jwk
    assert public == key.public_key()


@PROPERTY
@given(
    index=st.integers(0, len(KEYS) - 1), message=st.binary(max_size=512), bit=st.integers(0, 511)
)
def test_signatures_round_trip_and_any_flipped_bit_fails(
    index: int, message: bytes, bit: int
) -> None:
    """sign → verify holds for any message; flipping any one of the 512 bits breaks it."""
    key = KEYS[index]
    signature = key.sign(message)
    assert len(signature) == 64
    key.public_key().verify(signature, message)
    flipped = bytearray(signature)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidSignature):
        key.public_key().verify(bytes(flipped), message)


# Checkpoints ----------------------------------------------------------------------------


def test_checkpoint_jws_signed_with_sm2(sm2_key: Sm2PrivateKey) -> None:
    """An SM2 gateway signs checkpoints as alg SM2-SM3; the JWKS verifies; tampering fails."""
    pair = KeyPair(kid="gw-sm2", algorithm="sm2-sm3", private=sm2_key,
                   jwk=private_to_jwk(sm2_key, "gw-sm2"))  # fmt: skip
    jws = sign_jws(pair, {"seq": 7, "hash": "ab" * 32})
    jwks = {"keys": [dict(pair.jwk)]}
    header, payload = verify_jws(jws, jwks)
    assert header["alg"] == "SM2-SM3"
    assert payload["seq"] == 7
    head, _body, sig = jws.split(".")
    forged = base64.urlsafe_b64encode(b'{"hash":"00","seq":8}').rstrip(b"=").decode()
    with pytest.raises(JwsInvalid, match="does not verify"):
        verify_jws(f"{head}.{forged}.{sig}", jwks)
