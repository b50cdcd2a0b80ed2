"""Key material: generation, PKCS#8 PEM files, public JWKs (RFC 7517) and RFC 7638 kids.

A key's RFC 9421 algorithm follows from its type (no algorithm confusion): Ed25519 →
``ed25519``, EC P-256 → ``ecdsa-p256-sha256``, RSA → ``rsa-pss-sha512``, SM2 →
``sm2-sm3``, a shared secret (JWK ``oct``) → ``hmac-sha256``. SM2 keys are
``gateway.crypto.sm2`` objects (``cryptography`` has no SM2); a key in a PKCS#11 token is a
``gateway.crypto.hsm.HardwareKey`` (named by a ``pkcs11:`` URI where a PEM path would be); the
others are ``cryptography``'s.

A signing key may carry an expiry (``KeyPair.expires_at``: the config's
``gateway.key_expires_at``, else the ``exp`` of its public JWK file): ``expiry_warning``
words what ``/readyz`` and the console say inside ``EXPIRY_WARNING_S`` of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.crypto.files import check_private_file
from gateway.crypto.hsm import HardwareKey, Pkcs11Uri, is_pkcs11_uri, open_key
from gateway.crypto.sm2 import Sm2PrivateKey, Sm2PublicKey, Sm2Unavailable
from gateway.encoding import b64u, unb64u
from gateway.errors import ConfigError


class GatewayKeySource(Protocol):
    """Where the gateway's signing key is configured (``gateway.config.model.GatewayIdentity``
    is one): a PEM file or a PKCS#11 URI, the JWK beside it, its passphrase, its expiry."""

    @property
    def key_uri(self) -> Pkcs11Uri | None: ...
    @property
    def key_path(self) -> Path | None: ...
    @property
    def jwk_path(self) -> Path | None: ...
    @property
    def key_passphrase_env(self) -> str | None: ...
    @property
    def key_passphrase_file(self) -> Path | None: ...
    @property
    def key_expires_at(self) -> float | None: ...


__all__ = [
    "ALGORITHMS",
    "EXPIRY_WARNING_S",
    "KEY_TYPES",
    "KEY_TYPE_NAMES",
    "GatewayKeySource",
    "KeyPair",
    "PrivateKey",
    "PublicKey",
    "VerificationKey",
    "algorithm_for",
    "check_private_file",
    "ensure_keypair",
    "expiry_warning",
    "generate",
    "jose_alg",
    "jwk_thumbprint",
    "jwks_keys",
    "kind_of",
    "load_gateway_keypair",
    "load_key",
    "load_keypair",
    "load_rotated_keys",
    "private_pem",
    "private_to_jwk",
    "public_from_jwk",
    "public_to_jwk",
    "read_passphrase",
    "rotate_keypair",
    "write_keypair",
]

KeyType = Literal["ed25519", "ecdsa-p256", "rsa-pss", "sm2"]
KEY_TYPES: tuple[KeyType, ...] = ("ed25519", "ecdsa-p256", "rsa-pss", "sm2")
# What a command line's `--alg` may name: a key type, or the RFC 9421 algorithm its keys
# sign with (`--alg sm2-sm3` makes an SM2 key).
KEY_TYPE_NAMES: dict[str, KeyType] = {
    **{kind: kind for kind in KEY_TYPES},
    "ecdsa-p256-sha256": "ecdsa-p256",
    "rsa-pss-sha512": "rsa-pss",
    "sm2-sm3": "sm2",
}
PrivateKey = (
    ed25519.Ed25519PrivateKey
    | ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | Sm2PrivateKey
    | HardwareKey
)
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey | Sm2PublicKey
ALGORITHMS = ("ed25519", "ecdsa-p256-sha256", "rsa-pss-sha512", "sm2-sm3", "hmac-sha256")
# JOSE names (JWK ``alg``, the checkpoints' JWS). SM2 has none registered: "SM2-SM3" is
# ours, as "sm2-sm3" is for RFC 9421 (docs/decisions.md, National cryptography).
_JWK_ALG = {
    "ed25519": "EdDSA",
    "ecdsa-p256-sha256": "ES256",
    "rsa-pss-sha512": "PS512",
    "sm2-sm3": "SM2-SM3",
    "hmac-sha256": "HS256",
}


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def algorithm_for(key: PublicKey | PrivateKey | bytes) -> str:
    """The RFC 9421 algorithm a key must be used with."""
    if isinstance(key, bytes):
        return "hmac-sha256"
    if isinstance(key, HardwareKey):
        return key.algorithm
    if isinstance(key, Sm2PrivateKey | Sm2PublicKey):
        return "sm2-sm3"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name != "secp256r1":
            raise ValueError(f"unsupported EC curve {key.curve.name}")
        return "ecdsa-p256-sha256"
    return "rsa-pss-sha512"


def jose_alg(algorithm: str) -> str:
    """The JOSE ``alg`` name of an RFC 9421 algorithm (JWK ``alg``, JWS headers)."""
    return _JWK_ALG[algorithm]


def generate(kind: KeyType = "ed25519") -> PrivateKey:
    if kind == "sm2":
        try:
            return Sm2PrivateKey.generate()
        except Sm2Unavailable as exc:
            raise ConfigError([f"cannot make an SM2 key: {exc}"]) from exc
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
    return b64u(hashlib.sha256(canonical.encode()).digest())


def public_to_jwk(key: PublicKey, kid: str | None = None) -> dict[str, str]:
    jwk: dict[str, str]
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64u(raw)}
    elif isinstance(key, Sm2PublicKey):
        x, y = key.point()
        jwk = {"kty": "EC", "crv": "SM2", "x": b64u(x.to_bytes(32, "big"))}
        jwk["y"] = b64u(y.to_bytes(32, "big"))
    elif isinstance(key, ec.EllipticCurvePublicKey):
        nums = key.public_numbers()
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64u(nums.x.to_bytes(32, "big")),
            "y": b64u(nums.y.to_bytes(32, "big")),
        }
    else:
        rnums = key.public_numbers()
        jwk = {"kty": "RSA", "n": b64u(_int_bytes(rnums.n)), "e": b64u(_int_bytes(rnums.e))}
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
            return ed25519.Ed25519PublicKey.from_public_bytes(unb64u(members["x"]))
        if kty == "EC" and members["crv"] == "SM2":
            x, y = unb64u(members["x"]), unb64u(members["y"])
            if len(x) != 32 or len(y) != 32:
                raise ValueError("SM2 coordinates are 32 bytes each")
            return Sm2PublicKey.from_point(int.from_bytes(x, "big"), int.from_bytes(y, "big"))
        if kty == "EC":
            if members["crv"] != "P-256":
                raise ValueError(f"unsupported EC curve {members['crv']!r}")
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(unb64u(members["x"]), "big"),
                int.from_bytes(unb64u(members["y"]), "big"),
                ec.SECP256R1(),
            ).public_key()
        if kty == "RSA":
            return rsa.RSAPublicNumbers(
                int.from_bytes(unb64u(members["e"]), "big"),
                int.from_bytes(unb64u(members["n"]), "big"),
            ).public_key()
        return unb64u(members["k"])
    except Sm2Unavailable as exc:
        raise ValueError(f"SM2 keys cannot be used here: {exc}") from exc
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
    """A signing key with its public JWK (and, when it has one, its expiry)."""

    kid: str
    algorithm: str
    private: PrivateKey
    jwk: Mapping[str, Any]
    expires_at: float | None = None  # Unix time


def private_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with ``passphrase`` when given (SM2: as OpenSSL writes it)."""
    if isinstance(key, HardwareKey):
        raise ConfigError([f"{key.uri.text.split('?')[0]}: a token's key never leaves it"])
    if isinstance(key, Sm2PrivateKey):
        return key.private_pem(passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption(),
    )


def _load_private_pem(data: bytes, passphrase: bytes | None) -> PrivateKey:
    """A PEM private key of any supported type; ``ValueError`` when it is none of them."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except UnsupportedAlgorithm as exc:  # an SM2 key (curve 1.2.156.10197.1.301) lands here
        try:
            return Sm2PrivateKey.from_pem(data, passphrase)
        except (ValueError, Sm2Unavailable) as sm2_exc:
            raise ValueError(f"unsupported key ({exc}; {sm2_exc})") from sm2_exc
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    ):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


def write_keypair(
    key: PrivateKey,
    pem_path: Path,
    jwk_path: Path,
    *,
    kid: str | None = None,
    passphrase: bytes | None = None,
) -> KeyPair:
    """Write a PKCS#8 PEM (mode 0600, created so; encrypted with ``passphrase`` if given)
    and its public JWK."""
    pem = private_pem(key, passphrase)
    pem_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(pem_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(pem_path, 0o600)
    jwk = private_to_jwk(key, kid)
    jwk_path.write_text(json.dumps(jwk, indent=2) + "\n", encoding="utf-8")
    return KeyPair(kid=jwk["kid"], algorithm=algorithm_for(key), private=key, jwk=jwk)


def load_keypair(
    pem_path: Path, jwk_path: Path | None = None, *, passphrase: bytes | None = None
) -> KeyPair:
    """Load a private key (decrypting it with ``passphrase`` when it is encrypted); its
    kid comes from the JWK file beside it, which must hold the same key, else the
    thumbprint."""
    check_private_file(pem_path)
    try:
        data = pem_path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{pem_path}: cannot read private key ({exc.strerror})"]) from exc
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    if encrypted and passphrase is None:
        raise ConfigError(
            [
                f"{pem_path}: the private key is encrypted; give its passphrase with "
                "gateway.key_passphrase_env or gateway.key_passphrase_file"
            ]
        )
    try:
        key = _load_private_pem(data, passphrase if encrypted else None)
    except ValueError as exc:
        problem = (
            "cannot decrypt the private key (wrong passphrase?)"
            if encrypted
            else f"not a usable PKCS#8 PEM private key ({exc})"
        )
        raise ConfigError([f"{pem_path}: {problem}"]) from exc
    return _pair(key, jwk_path, str(pem_path))


def _pair(key: PrivateKey, jwk_path: Path | None, where: str) -> KeyPair:
    """The key pair, its kid and expiry (``exp``) from the public JWK file when there is
    one, which must hold the same key."""
    kid, expires_at = None, None
    if jwk_path is not None and jwk_path.exists():
        try:
            beside = json.loads(jwk_path.read_text(encoding="utf-8"))
            same = _required_members(beside) == _required_members(private_to_jwk(key))
        except (OSError, ValueError) as exc:
            raise ConfigError([f"{jwk_path}: not a readable public JWK ({exc})"]) from exc
        if not same:
            raise ConfigError([f"{jwk_path}: this public JWK is not the key in {where}"])
        kid = beside.get("kid")
        exp = beside.get("exp")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
            raise ConfigError([f"{jwk_path}: exp is a Unix time (a number)"])
        expires_at = float(exp) if exp is not None else None
    jwk: dict[str, Any] = private_to_jwk(key, kid)
    if expires_at is not None:
        jwk["exp"] = math.ceil(expires_at)
    return KeyPair(
        kid=jwk["kid"], algorithm=algorithm_for(key), private=key, jwk=jwk, expires_at=expires_at
    )


def load_key(
    source: str | Path,
    jwk_path: Path | None = None,
    *,
    passphrase: bytes | None = None,
    base: Path | None = None,
) -> KeyPair:
    """A signing key from a PEM path or from a token (a ``pkcs11:`` URI, RFC 7512)."""
    if isinstance(source, str) and is_pkcs11_uri(source):
        uri = Pkcs11Uri.parse(source, base)
        return _pair(open_key(uri), jwk_path, uri.text.split("?")[0])
    return load_keypair(Path(source), jwk_path, passphrase=passphrase)


def load_gateway_keypair(gw: GatewayKeySource) -> KeyPair:
    """The gateway's signing key as configured: its PEM or its token, its expiry from the
    config (``gateway.key_expires_at``) or else from its public JWK's ``exp``."""
    if gw.key_uri is not None:
        pair = _pair(open_key(gw.key_uri), gw.jwk_path, gw.key_uri.text.split("?")[0])
    else:
        assert gw.key_path is not None  # the config holds one or the other
        passphrase = read_passphrase(gw.key_passphrase_env, gw.key_passphrase_file)
        pair = load_keypair(gw.key_path, gw.jwk_path, passphrase=passphrase)
    if gw.key_expires_at is None:
        return pair
    jwk = {**pair.jwk, "exp": math.ceil(gw.key_expires_at)}
    return dataclasses.replace(pair, jwk=jwk, expires_at=gw.key_expires_at)


EXPIRY_WARNING_S = 14 * 86400  # /readyz and the console warn this long before a key expires


def expiry_warning(pair: KeyPair, now: float) -> str | None:
    """What operators are told about a signing key that expires soon (or did); else None."""
    if pair.expires_at is None or pair.expires_at - now > EXPIRY_WARNING_S:
        return None
    left = pair.expires_at - now
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pair.expires_at))
    if left <= 0:
        return f"keys: the signing key {pair.kid} expired at {when}; make a new one and rotate"
    days = left / 86400
    return (
        f"keys: the signing key {pair.kid} expires in {days:.1f} days ({when}); "
        "make a new one and rotate"
    )


def ensure_keypair(
    pem_path: Path, jwk_path: Path, kind: KeyType = "ed25519", *, passphrase: bytes | None = None
) -> KeyPair:
    """Load the key pair, creating it first when the PEM is missing."""
    if not pem_path.exists():
        return write_keypair(generate(kind), pem_path, jwk_path, passphrase=passphrase)
    pair = load_keypair(pem_path, jwk_path, passphrase=passphrase)
    if not jwk_path.exists():
        jwk_path.write_text(json.dumps(dict(pair.jwk), indent=2) + "\n", encoding="utf-8")
    return pair


def read_passphrase(env: str | None, file: Path | None) -> bytes | None:
    """An encrypted key's passphrase: from the environment variable ``env`` if named,
    else from ``file`` (mode 0600, one line); ``None`` when neither is configured."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ConfigError([f"the environment variable {env} (the key passphrase) is not set"])
        return value.encode()
    if file is None:
        return None
    check_private_file(file, "passphrase file")
    try:
        secret = file.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read passphrase file ({exc.strerror})"]) from exc
    if not secret:
        raise ConfigError([f"{file}: the passphrase file is empty"])
    return secret


def kind_of(key: PrivateKey) -> KeyType:
    """The ``generate`` kind that makes a key like this one."""
    return KEY_TYPE_NAMES.get(algorithm_for(key), "rsa-pss")


# Rotation ------------------------------------------------------------------------------
#
# ``rotate_keypair`` retires the current key into a JWKS file beside the PEM
# (``gateway.previous.jwks.json``), each retired JWK with an ``exp`` (Unix time) after
# which it is no longer published. Peers that fetched the JWKS before the rotation can
# still verify what the old key signed until then.


def load_rotated_keys(path: Path) -> tuple[dict[str, Any], ...]:
    """Retired public JWKs (with ``exp``); none when the file does not exist."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError([f"{path}: not a readable JWKS ({exc})"]) from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ConfigError([f"{path}: not a JWKS (an object with a keys array)"])
    return tuple(keys)


def jwks_keys(
    current: Mapping[str, Any],
    configured: Sequence[Mapping[str, Any]],
    rotated: Sequence[Mapping[str, Any]],
    now: float,
) -> list[dict[str, Any]]:
    """The published JWKS: the current key, then configured and unexpired retired keys,
    each kid once."""
    seen: set[Any] = set()
    published: list[dict[str, Any]] = []
    for jwk in (current, *configured, *(k for k in rotated if float(k.get("exp", 0)) > now)):
        if jwk.get("kid") not in seen:
            seen.add(jwk.get("kid"))
            published.append(dict(jwk))
    return published


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` beside ``path`` and rename it over: readers see old or new, whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def rotate_keypair(
    pem_path: Path,
    jwk_path: Path,
    rotated_path: Path,
    *,
    grace_s: float,
    passphrase: bytes | None = None,
    kind: KeyType | None = None,
    kid: str | None = None,
    now: float | None = None,
) -> tuple[KeyPair, KeyPair, float]:
    """Make a new key current; the old public JWK stays published until ``now + grace_s``.

    Returns (old, new, expiry). The retired key is written first, so a crash part-way
    leaves the old key current and merely listed twice. The new PEM is encrypted with
    ``passphrase`` when given (the same as the old one's)."""
    now = time.time() if now is None else now
    old = load_keypair(pem_path, jwk_path, passphrase=passphrase)
    expiry = now + grace_s
    kept = [
        k for k in load_rotated_keys(rotated_path)
        if float(k.get("exp", 0)) > now and k.get("kid") != old.kid
    ]  # fmt: skip
    retired = [*kept, {**old.jwk, "exp": math.ceil(expiry)}]
    _replace_file(rotated_path, (json.dumps({"keys": retired}, indent=2) + "\n").encode(), 0o644)
    key = generate(kind or kind_of(old.private))
    pem = private_pem(key, passphrase)
    jwk = private_to_jwk(key, kid)
    if jwk["kid"] == old.kid:
        raise ConfigError([f"the new key's kid {old.kid} is the old one's; choose another"])
    _replace_file(jwk_path, (json.dumps(jwk, indent=2) + "\n").encode(), 0o644)
    _replace_file(pem_path, pem, 0o600)
    new = KeyPair(kid=jwk["kid"], algorithm=algorithm_for(key), private=key, jwk=jwk)
    return old, new, expiry
