"""Key material: generation, PKCS#8 PEM files, public JWKs (RFC 7517) and RFC 7638 kids.

A key's RFC 9421 algorithm follows from its type (no algorithm confusion): Ed25519 →
``ed25519``, EC P-256 → ``ecdsa-p256-sha256``, RSA → ``rsa-pss-sha512``, a shared secret
(JWK ``oct``) → ``hmac-sha256``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "KeyPair",
    "PrivateKey",
    "PublicKey",
    "VerificationKey",
    "algorithm_for",
    "ensure_keypair",
    "generate",
    "jwk_thumbprint",
    "load_keypair",
    "private_to_jwk",
    "public_from_jwk",
    "public_to_jwk",
    "write_keypair",
]

KeyType = Literal["ed25519", "ecdsa-p256", "rsa-pss"]
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
ALGORITHMS = ("ed25519", "ecdsa-p256-sha256", "rsa-pss-sha512", "hmac-sha256")
_JWK_ALG = {
    "ed25519": "EdDSA",
    "ecdsa-p256-sha256": "ES256",
    "rsa-pss-sha512": "PS512",
    "hmac-sha256": "HS256",
}


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def algorithm_for(key: PublicKey | PrivateKey | bytes) -> str:
    """The RFC 9421 algorithm a key must be used with."""
    if isinstance(key, bytes):
        return "hmac-sha256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name != "secp256r1":
            raise ValueError(f"unsupported EC curve {key.curve.name}")
        return "ecdsa-p256-sha256"
    return "rsa-pss-sha512"


def generate(kind: KeyType = "ed25519") -> PrivateKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def _required_members(jwk: Mapping[str, Any]) -> dict[str, str]:
    kty = jwk.get("kty")
    names = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
    names["oct"] = ("k", "kty")
    if kty not in names:
        raise ValueError(f"unsupported kty {kty!r}")
    try:
        return {name: str(jwk[name]) for name in names[kty]}
    except KeyError as exc:
        raise ValueError(f"JWK lacks member {exc.args[0]!r}") from exc


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint (base64url), the default ``kid``."""
    canonical = json.dumps(_required_members(jwk), separators=(",", ":"), sort_keys=True)
    return _b64u(hashlib.sha256(canonical.encode()).digest())


def public_to_jwk(key: PublicKey, kid: str | None = None) -> dict[str, str]:
    jwk: dict[str, str]
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64u(raw)}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        nums = key.public_numbers()
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64u(nums.x.to_bytes(32, "big")),
            "y": _b64u(nums.y.to_bytes(32, "big")),
        }
    else:
        rnums = key.public_numbers()
        jwk = {"kty": "RSA", "n": _b64u(_int_bytes(rnums.n)), "e": _b64u(_int_bytes(rnums.e))}
    jwk["alg"] = _JWK_ALG[algorithm_for(key)]
    jwk["use"] = "sig"
    jwk["kid"] = kid or jwk_thumbprint(jwk)
    return jwk


def private_to_jwk(key: PrivateKey, kid: str | None = None) -> dict[str, str]:
    """Public JWK of a private key (the private part never leaves the PEM)."""
    return public_to_jwk(key.public_key(), kid)


def public_from_jwk(jwk: Mapping[str, Any]) -> PublicKey | bytes:
    """A verification key from a public JWK; ``oct`` keys give the shared secret bytes."""
    members = _required_members(jwk)
    if any(name in jwk for name in ("d", "p", "q", "dp", "dq", "qi")):
        raise ValueError("a private JWK was given where a public one is expected")
    kty = members["kty"]
    try:
        if kty == "OKP":
            if members["crv"] != "Ed25519":
                raise ValueError(f"unsupported OKP curve {members['crv']!r}")
            return ed25519.Ed25519PublicKey.from_public_bytes(_unb64u(members["x"]))
        if kty == "EC":
            if members["crv"] != "P-256":
                raise ValueError(f"unsupported EC curve {members['crv']!r}")
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(_unb64u(members["x"]), "big"),
                int.from_bytes(_unb64u(members["y"]), "big"),
                ec.SECP256R1(),
            ).public_key()
        if kty == "RSA":
            return rsa.RSAPublicNumbers(
                int.from_bytes(_unb64u(members["e"]), "big"),
                int.from_bytes(_unb64u(members["n"]), "big"),
            ).public_key()
        return _unb64u(members["k"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid {kty} JWK: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationKey:
    """A member's public key as the verifier needs it."""

    kid: str
    algorithm: str
    key: PublicKey | bytes

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> VerificationKey:
        key = public_from_jwk(jwk)
        kid = str(jwk.get("kid") or jwk_thumbprint(jwk))
        algorithm = algorithm_for(key)
        declared = jwk.get("alg")
        if declared is not None and declared not in {algorithm, _JWK_ALG[algorithm]}:
            raise ValueError(f"JWK alg {declared!r} does not fit a {jwk.get('kty')} key")
        return cls(kid=kid, algorithm=algorithm, key=key)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPair:
    """A signing key with its public JWK."""

    kid: str
    algorithm: str
    private: PrivateKey
    jwk: Mapping[str, str]


def write_keypair(
    key: PrivateKey, pem_path: Path, jwk_path: Path, *, kid: str | None = None
) -> KeyPair:
    """Write a PKCS#8 PEM (mode 0600, created so) and its public JWK."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(pem_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(pem_path, 0o600)
    jwk = private_to_jwk(key, kid)
    jwk_path.write_text(json.dumps(jwk, indent=2) + "\n", encoding="utf-8")
    return KeyPair(kid=jwk["kid"], algorithm=algorithm_for(key), private=key, jwk=jwk)


def load_keypair(pem_path: Path, jwk_path: Path | None = None) -> KeyPair:
    """Load a private key; its kid comes from the JWK file beside it, else the thumbprint."""
    try:
        mode = pem_path.stat().st_mode
        data = pem_path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{pem_path}: cannot read private key ({exc.strerror})"]) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError([f"{pem_path}: private key is accessible by group or others (chmod 600)"])
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{pem_path}: not a usable PKCS#8 PEM private key"]) from exc
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    ):
        raise ConfigError([f"{pem_path}: unsupported key type {type(key).__name__}"])
    kid = None
    if jwk_path is not None and jwk_path.exists():
        kid = json.loads(jwk_path.read_text(encoding="utf-8")).get("kid")
    jwk = private_to_jwk(key, kid)
    return KeyPair(kid=jwk["kid"], algorithm=algorithm_for(key), private=key, jwk=jwk)


def ensure_keypair(pem_path: Path, jwk_path: Path, kind: KeyType = "ed25519") -> KeyPair:
    """Load the key pair, creating it first when the PEM is missing."""
    if not pem_path.exists():
        return write_keypair(generate(kind), pem_path, jwk_path)
    pair = load_keypair(pem_path, jwk_path)
    if not jwk_path.exists():
        jwk_path.write_text(json.dumps(dict(pair.jwk), indent=2) + "\n", encoding="utf-8")
    return pair
