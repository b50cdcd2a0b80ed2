"""Checkpoints as compact JWS (RFC 7515/7518/8037): sign the chain head, check a signature.

A checkpoint is a JWS over ``{gateway, seq, hash, at}`` (canonical JSON) made with the
gateway's key and checkable with nothing but its JWKS. Strict base64url: one spelling per
byte string, so no bit of a stored checkpoint can change unnoticed.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from gateway.crypto.hsm import HardwareKey
from gateway.crypto.keys import KeyPair, public_from_jwk
from gateway.crypto.sm2 import Sm2PrivateKey, Sm2PublicKey
from gateway.errors import StoreError
from gateway.store.chain import canonical

__all__ = ["CHECKPOINT_TYPE", "JwsInvalid", "jwks_from", "sign_jws", "verify_jws"]

CHECKPOINT_TYPE = "gw-checkpoint"

# JWS (RFC 7515/7518/8037) names of the gateway's key algorithms; SM2-SM3 is ours, with an
# r‖s signature as ES256 (docs/decisions.md, National cryptography).
_JWS_ALG = {
    "ed25519": "EdDSA",
    "ecdsa-p256-sha256": "ES256",
    "rsa-pss-sha512": "PS512",
    "sm2-sm3": "SM2-SM3",
}
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64)
_B64U = re.compile(r"^[A-Za-z0-9_-]*$")


class JwsInvalid(ValueError):
    """A checkpoint signature that does not hold, or cannot be checked."""


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes:
    """Strict base64url: one spelling per byte string, so no bit can change unnoticed."""
    if not _B64U.match(text):
        raise JwsInvalid("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64u(data) != text:
        raise JwsInvalid("non-canonical base64url")
    return data


def sign_jws(keypair: KeyPair, payload: Mapping[str, Any], *, typ: str = CHECKPOINT_TYPE) -> str:
    """A compact JWS over ``payload`` (canonical JSON) with the gateway's key."""
    alg = _JWS_ALG.get(keypair.algorithm)
    if alg is None:
        raise StoreError(f"cannot sign checkpoints with a {keypair.algorithm} key")
    header = {"alg": alg, "kid": keypair.kid, "typ": typ}
    signing_input = f"{_b64u(canonical(header).encode())}.{_b64u(canonical(payload).encode())}"
    data = signing_input.encode("ascii")
    key = keypair.private
    if isinstance(key, HardwareKey | Sm2PrivateKey | ed25519.Ed25519PrivateKey):
        signature = key.sign(data)  # a token's key signs in JWS form (ES256: r‖s) already
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = key.sign(data, _PSS, hashes.SHA512())
    return f"{signing_input}.{_b64u(signature)}"


def verify_jws(
    jws: str, jwks: Mapping[str, Any], *, typ: str = CHECKPOINT_TYPE
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a checkpoint JWS against a JWKS; return its header and payload."""
    parts = jws.split(".")
    if len(parts) != 3:
        raise JwsInvalid("not a compact JWS")
    try:
        header = json.loads(_unb64u(parts[0]))
        payload = json.loads(_unb64u(parts[1]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JwsInvalid("the JWS header or payload is not JSON") from exc
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise JwsInvalid("the JWS header or payload is not an object")
    if header.get("typ") != typ:
        raise JwsInvalid(f"not a {typ} (typ {header.get('typ')!r})")
    kid = header.get("kid")
    found = [k for k in jwks.get("keys", []) if isinstance(k, dict) and k.get("kid") == kid]
    if not found:
        raise JwsInvalid(f"signed by key {kid!r}, which the JWKS does not hold")
    try:
        key = public_from_jwk(found[0])
    except ValueError as exc:
        raise JwsInvalid(f"the JWKS key {kid!r} is unusable: {exc}") from exc
    signature = _unb64u(parts[2])
    data = f"{parts[0]}.{parts[1]}".encode("ascii")
    alg = header.get("alg")
    try:
        if (isinstance(key, ed25519.Ed25519PublicKey) and alg == "EdDSA") or (
            isinstance(key, Sm2PublicKey) and alg == "SM2-SM3"
        ):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey) and alg == "ES256":
            if len(signature) != 64:
                raise InvalidSignature
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            key.verify(der, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey) and alg == "PS512":
            key.verify(signature, data, _PSS, hashes.SHA512())
        else:
            raise JwsInvalid(f"alg {alg!r} does not fit key {kid!r}")
    except InvalidSignature as exc:
        raise JwsInvalid(f"the signature by key {kid!r} does not verify") from exc
    return header, payload


def jwks_from(config_jwk: Path, previous: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The gateway's public keys as its JWKS endpoint serves them."""
    keys: list[dict[str, Any]] = [json.loads(config_jwk.read_text(encoding="utf-8"))]
    keys.extend(dict(k) for k in previous)
    return {"keys": keys}
