"""Content digests (RFC 9530): the ``Content-Digest`` field, written and checked.

Algorithms: ``sha-256`` and ``sha-512`` (IANA), and ``sm3`` (GB/T 32905, national
commercial cryptography; PROTOCOL.md accepts it). Whatever a sender used, the message is
recorded under its sha-256, so idempotency and the audit chain see one digest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes

from gateway.errors import DigestMismatch
from gateway.signing.fields import parse_dictionary

__all__ = ["DIGESTS", "check_content_digest", "content_digest"]


def _sm3(body: bytes) -> bytes:
    # cryptography's SM3 (its wheels always have it; hashlib's depends on the system).
    h = hashes.Hash(hashes.SM3())
    h.update(body)
    return h.finalize()


DIGESTS: dict[str, Callable[[bytes], bytes]] = {
    "sha-256": lambda body: hashlib.sha256(body).digest(),
    "sha-512": lambda body: hashlib.sha512(body).digest(),
    "sm3": _sm3,
}
# The usual field: one 32-byte digest, canonical base64.
_SINGLE_RE = re.compile(r"(sha-256|sm3)=:([A-Za-z0-9+/]{43}=):")


def content_digest(body: bytes, algorithm: str = "sha-256") -> str:
    """The RFC 9530 ``Content-Digest`` field value for ``body``."""
    digest = DIGESTS[algorithm](body)
    return f"{algorithm}=:{base64.b64encode(digest).decode('ascii')}:"


def check_content_digest(value: str, body: bytes) -> str:
    """Check every digest in a ``Content-Digest`` value against ``body``; return its sha-256.

    Raises ``DigestMismatch`` for a malformed field, an unsupported algorithm, or a
    digest that does not match.
    """
    m = _SINGLE_RE.fullmatch(value)
    if m is not None:
        name = m.group(1)
        actual = DIGESTS[name](body)
        if not hmac.compare_digest(base64.b64decode(m.group(2)), actual):
            raise DigestMismatch(f"the {name} Content-Digest does not match the body")
        return actual.hex() if name == "sha-256" else hashlib.sha256(body).hexdigest()
    try:
        parsed = parse_dictionary(value)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise DigestMismatch("Content-Digest is not a structured-field dictionary") from exc
    if not isinstance(parsed, dict) or not parsed:
        raise DigestMismatch("Content-Digest holds no digest")
    supported = [name for name in parsed if name in DIGESTS]
    if not supported:
        raise DigestMismatch(
            f"Content-Digest uses no supported algorithm (sha-256, sha-512, sm3): {sorted(parsed)}"
        )
    for name in supported:
        member = parsed[name]
        expected = member[0] if isinstance(member, tuple) else None
        if not isinstance(expected, bytes):
            raise DigestMismatch(f"Content-Digest member {name} is not a byte sequence")
        if not hmac.compare_digest(expected, DIGESTS[name](body)):
            raise DigestMismatch(f"the {name} Content-Digest does not match the body")
    return hashlib.sha256(body).hexdigest()
