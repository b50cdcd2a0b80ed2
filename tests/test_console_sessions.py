"""Console sessions: random cookies, hashed at rest, CSRF per session, expiry, bounded."""

from __future__ import annotations

import pytest

from gateway.admin.console import sessions as sessions_module
from gateway.admin.console.sessions import Sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_is_found_by_its_cookie_and_keeps_no_cookie_in_memory() -> None:
    """The store is keyed by the cookie's hash; a wrong cookie finds nothing."""
    sessions = Sessions()
    cookie, session = sessions.open("hash-of-token")
    assert sessions.get(cookie) is session
    assert sessions.get(cookie + "x") is None
    assert sessions.get(None) is None
    assert cookie not in repr(vars(sessions))
    assert len(cookie) >= 40
    assert session.csrf != cookie


def test_csrf_tokens_are_per_session_and_compared_exactly() -> None:
    """One session's CSRF token does not pass for another's; a missing one never passes."""
    sessions = Sessions()
    _, one = sessions.open("a")
    _, two = sessions.open("a")
    assert one.csrf_ok(one.csrf)
    assert not one.csrf_ok(two.csrf)
    assert not one.csrf_ok(None)
    assert not one.csrf_ok("")


def test_sessions_expire_and_are_pruned() -> None:
    """After the TTL a session is gone, and opening another prunes the expired."""
    clock = Clock()
    sessions = Sessions(ttl_s=60, clock=clock)
    cookie, session = sessions.open("a")
    assert session.expires_at == 1060
    clock.now = 1059.9
    assert sessions.get(cookie) is session
    clock.now = 1060
    assert sessions.get(cookie) is None
    stale, _ = sessions.open("b")
    clock.now = 2000
    sessions.open("c")
    assert len(sessions) == 1
    assert sessions.get(stale) is None


def test_closing_one_or_every_session_of_a_token() -> None:
    """Sign-out ends one session; a revoked token ends all of its own, no others."""
    sessions = Sessions()
    a1, _ = sessions.open("token-a")
    a2, _ = sessions.open("token-a")
    b, _ = sessions.open("token-b")
    sessions.close(a1)
    assert sessions.get(a1) is None
    assert sessions.get(a2) is not None
    assert sessions.close_token("token-a") == 1
    assert sessions.get(a2) is None
    assert sessions.get(b) is not None


def test_memory_is_bounded_by_dropping_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_SESSIONS the oldest session goes first."""
    monkeypatch.setattr(sessions_module, "MAX_SESSIONS", 3)
    sessions = Sessions()
    first, _ = sessions.open("t")
    rest = [sessions.open("t")[0] for _ in range(3)]
    assert len(sessions) == 3
    assert sessions.get(first) is None
    assert all(sessions.get(c) is not None for c in rest)
