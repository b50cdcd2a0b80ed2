"""Readiness: may a load balancer send this process traffic?

``/healthz`` says only that the process answers. ``/readyz`` answers 503 with the
reasons when any of these fails:

- the store takes a write (``Store.ping``: the write lock and a write statement);
- the keys are loaded: the gateway's private key signs and its published JWK verifies
  that signature (a stale ``.jwk.json`` beside a new key fails here), and members have
  keys to verify requests with;
- the outbox delivery is running;
- every enabled adapter that counts for readiness (``readiness: true``, the default) is
  healthy by its own ``health()``, asked with a short timeout, and its circuit is not
  open. Answers are cached for ``ttl_s`` so that frequent probes stay cheap and a slow
  upstream cannot pile probes up; concurrent probes share one round of checks.

- with a federation directory configured, one is in force (from the store or fetched).

The answer also carries ``directory`` (version, issued/expiry times, age, ``stale``, the
last refusal, the entries not applied, and ``cross_region`` when cross-region traffic is
refused) and ``warnings``: a directory past its ``expires_at`` is served from, and said to
be stale here, but does not make the process unready (the national platform being down
must not take every province's gateway out of rotation); past ``max_stale_s`` more,
cross-region traffic is refused (``directory_stale``) and this says why, still ready,
as local traffic goes on.
A signing key that expires within 14 days (or has expired) is a warning too, never a
reason: a province must not drop out of rotation because its operator is late with a
rotation. So are checkpoints left without a TSA stamp past ``timestamping.warn_after``: a
TSA outage never takes a gateway out of rotation (gateway/audit/timestamping.py).

An adapter whose outage should not take the gateway out of rotation (asynchronous
services queue in the outbox meanwhile) is configured with ``readiness: false``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from adapters.base import Adapter, Health
from gateway.crypto.keys import KeyPair, VerificationKey, expiry_warning
from gateway.errors import GatewayError
from gateway.signing import RequestView, Signer, Verifier, parse_signature_input
from gateway.store import Store

if TYPE_CHECKING:
    from gateway.audit.timestamping import Stamper
    from gateway.exchange.delivery import Delivery
    from gateway.federation.follower import DirectoryFollower
    from gateway.runtime.registry import RuntimeHolder

__all__ = ["Readiness"]


@dataclass(frozen=True, slots=True)
class _Checked:
    adapter: Adapter  # the instance asked: a replaced adapter is asked again
    at: float
    health: Health


class Readiness:
    def __init__(
        self,
        *,
        store: Store,
        runtime: RuntimeHolder,
        keypair: KeyPair,
        delivery: Callable[[], Delivery | None],
        ttl_s: float = 2.0,
        timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        directory: Callable[[], DirectoryFollower | None] = lambda: None,
        stamper: Callable[[], Stamper | None] = lambda: None,
    ) -> None:
        self.directory = directory
        self.stamper = stamper
        self.store = store
        self.runtime = runtime
        self.keypair = keypair
        self.delivery = delivery
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._checked: dict[str, _Checked] = {}
        self._lock = asyncio.Lock()
        self._key_problem: str | bool | None = False  # False: not checked yet

    async def reasons(self) -> list[str]:
        """Everything that keeps this process from being ready (empty: ready)."""
        reasons: list[str] = []
        try:
            await self.store.ping()
        except GatewayError as exc:
            reasons.append(f"store: {exc.detail}")
        except Exception as exc:  # any failure of the store means not ready
            reasons.append(f"store: {type(exc).__name__}")
        reasons += self._keys()
        delivery = self.delivery()
        if delivery is not None and delivery.state.value != "running":
            reasons.append(f"delivery: {delivery.state.value}")
        runtime = self.runtime.current
        for name, health in (await self.adapters()).items():
            if not health.healthy:
                reasons.append(f"adapter {name}: unhealthy ({health.detail})")
        for name, slot in runtime.adapters.items():
            if slot.config.enabled and not slot.breaker.allows():
                reasons.append(f"adapter {name}: circuit open")
        follower = self.directory()
        if follower is not None:
            reasons += follower.reasons()
        return reasons

    def _keys(self) -> list[str]:
        if self._key_problem is False:  # the key pair never changes: check it once
            self._key_problem = _check_keypair(self.keypair)
        problems = [self._key_problem] if isinstance(self._key_problem, str) else []
        if not any(m.keys for m in self.runtime.current.members.values()):
            problems.append("keys: no member key is loaded; no request can be verified")
        return problems

    async def adapters(self) -> dict[str, Health]:
        """Health of the adapters that count for readiness, at most ``ttl_s`` old."""
        slots = {
            name: slot
            for name, slot in self.runtime.current.adapters.items()
            if slot.config.enabled and slot.config.readiness
        }
        async with self._lock:  # one round of checks at a time; the others reuse it
            now = self._clock()
            stale = [
                name
                for name, slot in slots.items()
                if (c := self._checked.get(name)) is None
                or c.adapter is not slot.adapter
                or now - c.at >= self.ttl_s
            ]
            if stale:
                answers = await asyncio.gather(*(self._ask(slots[n].adapter) for n in stale))
                now = self._clock()
                for name, health in zip(stale, answers, strict=True):
                    self._checked[name] = _Checked(slots[name].adapter, now, health)
            for gone in self._checked.keys() - slots.keys():
                del self._checked[gone]
        return {name: self._checked[name].health for name in slots}

    async def _ask(self, adapter: Adapter) -> Health:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await adapter.health()
        except TimeoutError:
            return Health(healthy=False, detail=f"no answer within {self.timeout_s:g} s")
        except Exception as exc:  # a health check that fails is an unhealthy adapter
            return Health(healthy=False, detail=type(exc).__name__)

    async def handler(self, request: web.Request) -> web.Response:
        """``GET /readyz``: 200 ready, or 503 with the reasons."""
        reasons = await self.reasons()
        body: dict[str, object] = {
            "status": "not ready" if reasons else "ready",
            "reasons": reasons,
        }
        warnings = self.warnings()
        follower = self.directory()
        if follower is not None:
            body["directory"] = follower.status()
            warnings += follower.warnings()
        body["warnings"] = warnings
        return web.json_response(body, status=503 if reasons else 200)

    def warnings(self) -> list[str]:
        """What an operator should act on that does not make the process unready."""
        key = expiry_warning(self.keypair, time.time())
        warnings = [key] if key is not None else []
        stamper = self.stamper()
        stamps = stamper.warning() if stamper is not None else None
        return warnings + ([stamps] if stamps is not None else [])


def _check_keypair(keypair: KeyPair) -> str | None:
    """None when the private key signs and the public JWK verifies it, else the problem."""
    url, covered = "http://readiness.invalid/", ("@method", "@target-uri", "content-digest")
    headers: CIMultiDict[str] = CIMultiDict()
    try:
        Signer(keypair).sign_request("POST", url, headers, b"", components=covered)
        Verifier().verify(
            RequestView("POST", url, headers),
            parse_signature_input(headers),
            VerificationKey.from_jwk(keypair.jwk),
            required=covered,
        )
    except (GatewayError, ValueError, TypeError) as exc:
        detail = exc.detail if isinstance(exc, GatewayError) else str(exc)
        return f"keys: the gateway key {keypair.kid} does not match its JWK ({detail})"
    return None
