"""Single-use signature nonces (RFC 9421 §7.2.2): a (key, nonce) pair is accepted once.

A signature is acceptable only while its ``created`` is within the clock skew of now,
so a nonce needs remembering only until ``created + skew``: after that the signature is
stale whatever its nonce. The store holds each nonce until then (it survives a restart;
the message id's own dedupe lives forever in the message table); a dict in front of it
rejects a replay without touching the store. Both are pruned now and then, inline.
Whether a request must carry a nonce at all (relayed and cross-region ones must) is the
pipeline's decision (``Pipeline.admit``); this guard only spends the ones that come.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.errors import SignatureInvalid
from gateway.store import Store

__all__ = ["NonceGuard"]


class NonceGuard:
    PRUNE_EVERY_S = 60.0
    MAX_CACHED = 100_000
    MAX_NONCE_LENGTH = 256

    def __init__(
        self, store: Store, *, skew_s: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._skew_s = skew_s
        self._clock = clock
        self._seen: dict[tuple[str, str, str], float] = {}  # → until when it is remembered
        self._next_prune = 0.0

    async def claim(self, signer: str, keyid: str, nonce: str, created: int) -> None:
        """Accept ``nonce`` for this key once; raise ``SignatureInvalid`` on a replay."""
        if len(nonce) > self.MAX_NONCE_LENGTH:
            raise SignatureInvalid(f"the nonce is longer than {self.MAX_NONCE_LENGTH} characters")
        now = self._clock()
        key = (signer, keyid, nonce)
        until = self._seen.get(key)
        if until is not None and until > now:
            raise SignatureInvalid(f"replayed nonce: key {keyid} already signed with this nonce")
        until = created + self._skew_s
        fresh = await self._store.claim_nonce(signer, keyid, nonce, until, now)
        self._seen[key] = until
        if len(self._seen) > self.MAX_CACHED:
            self._trim(now)
        if now >= self._next_prune:
            self._next_prune = now + self.PRUNE_EVERY_S
            self._trim(now)
            await self._store.prune_nonces(now)
        if not fresh:
            raise SignatureInvalid(f"replayed nonce: key {keyid} already signed with this nonce")

    def _trim(self, now: float) -> None:
        """Forget expired nonces; past the cap, keep the newest half (the store still
        remembers the rest, so forgetting here costs a store lookup, never a replay)."""
        self._seen = {k: until for k, until in self._seen.items() if until > now}
        if len(self._seen) > self.MAX_CACHED // 2:
            self._seen = dict(list(self._seen.items())[-(self.MAX_CACHED // 2) :])

    def cached(self, signer: str, keyid: str, nonce: str) -> bool:
        """Whether the in-memory layer remembers this nonce (for tests and diagnostics)."""
        return (signer, keyid, nonce) in self._seen
