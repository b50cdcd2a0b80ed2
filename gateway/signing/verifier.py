"""Verification under the protocol's rules: covered components, freshness, ``alg`` pinned
to the key's type, and the key named by ``keyid``."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from http_message_signatures import HTTPMessageVerifier
from http_message_signatures.exceptions import HTTPMessageSignaturesException, InvalidSignature

from gateway.crypto.keys import VerificationKey
from gateway.errors import SignatureExpired, SignatureInvalid
from gateway.signing.algorithms import ALGORITHM_CLASSES, OneKey, verify_raw
from gateway.signing.base import (
    RequestView,
    ResponseView,
    Unsupported,
    as_library_message,
    fast_base,
)
from gateway.signing.fields import SignatureInput

__all__ = ["VerifiedSignature", "Verifier"]


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedSignature:
    label: str
    keyid: str
    algorithm: str
    created: int
    nonce: str | None
    covered: tuple[str, ...] = field(default=())


class Verifier:
    """Verifies request and response signatures under the protocol's rules."""

    def __init__(self, *, skew_s: int = 300, clock: Callable[[], float] = time.time) -> None:
        self.skew_s = skew_s
        self._clock = clock

    def check_freshness(self, sig: SignatureInput) -> None:
        now = self._clock()
        created = int(sig.params["created"])
        if created > now + self.skew_s:
            raise SignatureExpired("the signature's created time is in the future")
        if created < now - self.skew_s:
            raise SignatureExpired(f"the signature is older than {self.skew_s} s")
        expires = sig.params.get("expires")
        if expires is not None:
            if type(expires) is not int:
                raise SignatureInvalid("the expires parameter must be an integer")
            if expires < now:
                raise SignatureExpired("the signature has expired")

    def verify(
        self,
        message: RequestView | ResponseView,
        sig: SignatureInput,
        key: VerificationKey,
        *,
        required: Iterable[str] = (),
        fresh: bool = True,
        extra_required: Sequence[str] = (),
        allowed_algs: Collection[str] = (),
    ) -> VerifiedSignature:
        """Verify ``sig`` on ``message`` with ``key``; raise the protocol's 401 errors.

        ``allowed_algs``, when not empty, is the signer's algorithm policy (a member's
        ``allowed_algs``): a key of any other algorithm is refused before any crypto."""
        if sig.keyid != key.kid:
            raise SignatureInvalid(f"the signature names key {sig.keyid!r}, not {key.kid!r}")
        if "alg" in sig.params and sig.params["alg"] != key.algorithm:
            raise SignatureInvalid(
                f"alg {sig.params['alg']!r} does not match the key's algorithm {key.algorithm!r}"
            )
        if allowed_algs and key.algorithm not in allowed_algs:
            raise SignatureInvalid(
                f"algorithm {key.algorithm} is not allowed for this member "
                f"(allowed_algs: {', '.join(allowed_algs)})"
            )
        missing = [name for name in required if name not in sig.components]
        if missing:
            raise SignatureInvalid(f"the signature does not cover {', '.join(missing)}")
        if fresh:
            self.check_freshness(sig)
        try:
            if extra_required or not sig.items:
                raise Unsupported
            base, _ = fast_base(message, sig.items, sig.params, sig.serialized)
        except Unsupported:
            self._verify_with_library(message, sig, key, extra_required)
        else:
            try:
                verify_raw(key, sig.signature, base)
            except (CryptoInvalidSignature, HTTPMessageSignaturesException, ValueError) as exc:
                raise SignatureInvalid("the signature does not verify") from exc
        nonce = sig.params.get("nonce")
        return VerifiedSignature(
            label=sig.label,
            keyid=key.kid,
            algorithm=key.algorithm,
            created=int(sig.params["created"]),
            nonce=nonce if isinstance(nonce, str) else None,
            covered=sig.components,
        )

    @staticmethod
    def _verify_with_library(
        message: RequestView | ResponseView,
        sig: SignatureInput,
        key: VerificationKey,
        extra_required: Sequence[str],
    ) -> None:
        verifier = HTTPMessageVerifier(
            signature_algorithm=ALGORITHM_CLASSES[key.algorithm],
            key_resolver=OneKey(key.kid, key.key),
        )
        # Freshness is checked with the protocol's codes before this; the library's own
        # created/expires checks must never be the stricter ones.
        verifier.max_clock_skew = datetime.timedelta(days=365 * 100)
        view = as_library_message(message, sig.label)
        try:
            verifier.verify(view, max_age=None, require_components=tuple(extra_required))
        except (InvalidSignature, HTTPMessageSignaturesException, ValueError) as exc:
            raise SignatureInvalid("the signature does not verify") from exc
