"""Content digests (RFC 9530): the ``Content-Digest`` field, written and checked."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any

from gateway.errors import DigestMismatch
from gateway.signing.fields import parse_dictionary

__all__ = ["DIGESTS", "check_content_digest", "content_digest"]

DIGESTS: dict[str, Callable[[bytes], Any]] = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}
_SHA256_RE = re.compile(r"sha-256=:([A-Za-z0-9+/]{43}=):")


def content_digest(body: bytes, algorithm: str = "sha-256") -> str:
    """The RFC 9530 ``Content-Digest`` field value for ``body``."""
    digest = DIGESTS[algorithm](body).digest()
    return f"{algorithm}=:{base64.b64encode(digest).decode('ascii')}:"


def check_content_digest(value: str, body: bytes) -> str:
    """Check every digest in a ``Content-Digest`` value against ``body``; return its sha-256.

    Raises ``DigestMismatch`` for a malformed field, an unsupported algorithm, or a
    digest that does not match.
    """
    m = _SHA256_RE.fullmatch(value)
    if m is not None:  # the usual field: one sha-256 member
        actual = hashlib.sha256(body).digest()
        if not hmac.compare_digest(base64.b64decode(m.group(1)), actual):
            raise DigestMismatch("the sha-256 Content-Digest does not match the body")
        return actual.hex()
    try:
        parsed = parse_dictionary(value)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise DigestMismatch("Content-Digest is not a structured-field dictionary") from exc
    if not isinstance(parsed, dict) or not parsed:
        raise DigestMismatch("Content-Digest holds no digest")
    supported = [name for name in parsed if name in DIGESTS]
    if not supported:
        raise DigestMismatch(
            f"Content-Digest uses no supported algorithm (sha-256, sha-512): {sorted(parsed)}"
        )
    for name in supported:
        member = parsed[name]
        expected = member[0] if isinstance(member, tuple) else None
        if not isinstance(expected, bytes):
            raise DigestMismatch(f"Content-Digest member {name} is not a byte sequence")
        if not hmac.compare_digest(expected, DIGESTS[name](body).digest()):
            raise DigestMismatch(f"the {name} Content-Digest does not match the body")
    return hashlib.sha256(body).hexdigest()
