"""Small encodings several modules share: base64url without padding, UTC timestamps."""

from __future__ import annotations

import base64
import time

__all__ = ["b64u", "iso_utc", "unb64u"]


def b64u(data: bytes) -> str:
    """base64url without ``=`` padding (RFC 7515 §2), as JWK and JWS spell bytes."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: str) -> bytes:
    """The inverse of ``b64u``, lenient about padding (strict readers check ``b64u`` back)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def iso_utc(ts: float, *, millis: bool = False) -> str:
    """A Unix time as RFC 3339 UTC: ``2026-12-01T19:55:06Z`` or ``…06.123Z``."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{whole}.{int(ts % 1 * 1000):03d}Z" if millis else f"{whole}Z"
