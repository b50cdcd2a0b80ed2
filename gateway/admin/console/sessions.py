"""Console sessions: an admin token exchanged for a server-side session.

The browser holds only a random session id in an ``HttpOnly``, ``SameSite=Strict`` cookie
(``Secure`` under TLS). The server keeps, per session, the *hash* of the token it was
opened with, a CSRF token and an absolute expiry; never the token itself. Every request
looks the token hash up in the store again, so revoking the token (on any instance) ends
its sessions at their next request, and a changed role takes effect at once.

Sessions live in the admin listener's process (only worker 0 serves it): a restart signs
everyone out, and several instances behind one address need sticky sessions for the
console (docs/decisions.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["COOKIE", "DEFAULT_TTL_S", "Session", "Sessions"]

COOKIE = "gw_console"
DEFAULT_TTL_S = 8 * 3600.0  # one working day, then sign in again
MAX_SESSIONS = 1000  # past this the oldest go first: memory stays bounded


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(slots=True, kw_only=True)
class Session:
    token_hash: str  # the admin token's hash, looked up again on every request
    csrf: str  # sent back in every form that writes
    expires_at: float
    notices: list[str] = field(default_factory=list)  # shown once, on the next page

    def csrf_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(self.csrf, value)


class Sessions:
    """Open sessions by the SHA-256 of their cookie value (a memory dump holds no cookie)."""

    def __init__(
        self, ttl_s: float = DEFAULT_TTL_S, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._open: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, token_hash: str) -> tuple[str, Session]:
        """A new session for a token that just authenticated: its cookie value and itself."""
        self._prune()
        while len(self._open) >= MAX_SESSIONS:
            del self._open[next(iter(self._open))]  # dicts keep insertion order
        cookie = secrets.token_urlsafe(32)
        session = Session(
            token_hash=token_hash,
            csrf=secrets.token_urlsafe(32),
            expires_at=self._clock() + self.ttl_s,
        )
        self._open[_digest(cookie)] = session
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        """The live session a cookie names, or None (unknown or expired: then gone)."""
        if not cookie:
            return None
        key = _digest(cookie)
        session = self._open.get(key)
        if session is not None and session.expires_at <= self._clock():
            del self._open[key]
            return None
        return session

    def close(self, cookie: str | None) -> None:
        if cookie:
            self._open.pop(_digest(cookie), None)

    def close_token(self, token_hash: str) -> int:
        """End every session opened with one token; how many."""
        gone = [k for k, s in self._open.items() if s.token_hash == token_hash]
        for key in gone:
            del self._open[key]
        return len(gone)

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._open.items() if s.expires_at <= now]:
            del self._open[key]
