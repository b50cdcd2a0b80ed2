"""RFC 9421 signatures by plain string joining: the floor's crypto, and the pre-signer.

No structured-field parser and no signature library: the covered components are known
in advance, so the signature base (RFC 9421 §2.5) is joined from strings and signed or
verified with one Ed25519 call. ``tests/test_bench.py`` checks the output against the
gateway's own verifier, so the floor does exactly the cryptography the gateway must do,
with the same implementation: libsodium through PyNaCl, as gateway/signing/algorithms.py.
The pre-signer also signs ``sm2-sm3`` (over an ``sm3`` digest) for ``bench.run --alg sm2``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gateway.crypto.sm2 import Sm2PrivateKey

__all__ = [
    "REQUEST_HEADERS",
    "answer_lines",
    "content_digest",
    "request_lines",
    "sign",
    "verify",
]

# The headers a member's exchange request covers, after @method and @target-uri.
REQUEST_HEADERS = ("content-digest", "content-type", "gw-client", "gw-message-id")
Line = tuple[str, str]  # (serialised component identifier, value)


def content_digest(body: bytes, algorithm: str = "sha-256") -> str:
    """The RFC 9530 ``Content-Digest`` value (sha-256, or sm3) of ``body``."""
    if algorithm == "sm3":
        h = hashes.Hash(hashes.SM3())
        h.update(body)
        return f"sm3=:{base64.b64encode(h.finalize()).decode()}:"
    return f"sha-256=:{base64.b64encode(hashlib.sha256(body).digest()).decode()}:"


def request_lines(
    method: str, url: str, headers: Mapping[str, str], names: Sequence[str] = REQUEST_HEADERS
) -> list[Line]:
    """The covered components of a request: method, target URI, then ``names``."""
    lines = [('"@method"', method), ('"@target-uri"', url)]
    lines += [(f'"{name}"', headers[name]) for name in names]
    return lines


def answer_lines(
    status: int, headers: Mapping[str, str], request_label: str, request_signature: str
) -> list[Line]:
    """An answer's components, bound to the request's signature with ``;req``."""
    return [
        ('"@status"', str(status)),
        ('"content-digest"', headers["content-digest"]),
        ('"content-type"', headers["content-type"]),
        ('"gw-message-id"', headers["gw-message-id"]),
        (f'"signature";req;key="{request_label}"', request_signature),
    ]


@functools.cache
def _signing(key: ed25519.Ed25519PrivateKey) -> SigningKey:
    return SigningKey(key.private_bytes_raw())


@functools.cache
def _verifying(raw: bytes) -> VerifyKey:
    return VerifyKey(raw)


def _base(lines: Sequence[Line], params: str) -> bytes:
    body = "".join(f"{name}: {value}\n" for name, value in lines)
    return f'{body}"@signature-params": {params}'.encode()


def sign(
    key: ed25519.Ed25519PrivateKey | Sm2PrivateKey,
    kid: str,
    label: str,
    lines: Sequence[Line],
    created: int | None = None,
    nonce: str | None = None,
) -> tuple[str, str]:
    """``(Signature-Input, Signature)`` values for ``lines`` signed with ``key``; with a
    ``nonce`` parameter when given (cross-region senders, such as the platform, need one)."""
    covered = " ".join(name for name, _ in lines)
    when = int(time.time()) if created is None else created
    alg = "sm2-sm3" if isinstance(key, Sm2PrivateKey) else "ed25519"
    once = f';nonce="{nonce}"' if nonce else ""
    params = f'({covered});created={when}{once};keyid="{kid}";alg="{alg}"'
    base = _base(lines, params)
    raw = key.sign(base) if isinstance(key, Sm2PrivateKey) else _signing(key).sign(base).signature
    value = base64.b64encode(raw).decode()
    return f"{label}={params}", f"{label}=:{value}:"


def verify(
    key: ed25519.Ed25519PublicKey, signature_input: str, signature: str, lines: Sequence[Line]
) -> bool:
    """Whether ``signature`` covers exactly ``lines`` (a one-member dictionary each)."""
    label, _, params = signature_input.partition("=")
    sig_label, _, value = signature.partition("=")
    if label != sig_label or not params.startswith("("):
        return False
    try:
        raw = base64.b64decode(value.strip(":"), validate=True)
        _verifying(key.public_bytes_raw()).verify(_base(lines, params), raw)
    except (BadSignatureError, ValueError):
        return False
    return True
