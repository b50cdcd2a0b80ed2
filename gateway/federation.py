"""Following the federation directory (provincial side), and announcing ourselves in it.

``DirectoryFollower`` runs in every gateway process whose config has a ``directory``
block. At start it applies the last directory it accepted (from the store), so a
restart works while the national platform is down, then fetches a fresh one; every
``refresh_s`` it asks again with ``If-None-Match``. A document is applied only when its
signature holds against the pinned keys, its shape is valid, its version does not go
back and it has not expired; anything else is refused with the reason in the log and
the metrics, and the last good one stays in force. Applying it is a configuration
layer (``LiveConfig.set_layer``) between the file and the admin overlay. Past
``expires_at`` the kept one still serves, reported stale on ``/readyz`` and in the
metrics, never as fresh.

``announce`` posts this gateway's keys (the current one, and retired ones within their
overlap) and offered services to the national platform, signed (RFC 9421) with a key
the directory lists for us: at start with the current key, and by ``gateway keys
rotate`` with the old key, so a rotation publishes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from gateway.config import Config, DirectoryConfig
from gateway.directory import Directory, directory_layer, read_directory, verify_directory
from gateway.encoding import iso_utc
from gateway.errors import ConfigError, DirectoryRefused, GatewayError
from gateway.keys import KeyPair, load_rotated_keys
from gateway.live import LiveConfig
from gateway.metrics import Metrics
from gateway.signing import Signer
from gateway.store import Store

__all__ = ["DirectoryFollower", "Refusal", "announce", "announcement_of"]

log = logging.getLogger("gateway.federation")
ANNOUNCE_COVERED = (
    "@method",
    "@target-uri",
    "content-digest",
    "content-type",
    "gw-client",
    "gw-message-id",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    reason: str  # stable word: signature, key_unknown, malformed, rollback, expired, …
    detail: str
    at: float


class DirectoryFollower:
    def __init__(
        self,
        *,
        config: DirectoryConfig,
        own: str,
        store: Store,
        live: LiveConfig,
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.own = own
        self.store = store
        self.live = live
        self._session = session
        self.metrics = metrics
        self._clock = clock
        self.current: Directory | None = None
        self.etag: str | None = None
        self.checked_at: float | None = None  # the last answer from the publisher
        self.refusal: Refusal | None = None
        self.unreachable: str | None = None
        self._applied_keys: object = None  # what the layer's key overlap looked like
        self._task: asyncio.Task[None] | None = None

    # Start and stop ---------------------------------------------------------------

    async def start(self) -> None:
        """The stored directory, then one fetch (bounded), then the refresh loop."""
        stored = await self.store.load_directory()
        if stored is not None:
            try:
                directory = read_directory(stored, self.config.keys)
                await self._apply(directory)
                log.info(
                    "directory version %d from the store%s",
                    directory.version,
                    " (expired: stale)" if directory.expired(self._clock()) else "",
                )
            except (DirectoryRefused, ConfigError) as exc:
                # The pinned keys changed since it was kept, or the file no longer fits it.
                self._refuse(_reason(exc), f"stored directory not used: {exc}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(2.0, min(self.config.refresh_s, 10.0))):
                await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="directory-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.refresh()
            except Exception:  # the loop must outlive any one bad round
                log.exception("directory refresh failed; will retry")

    # One round --------------------------------------------------------------------

    async def refresh(self) -> str:
        """Fetch and apply once: ``applied``, ``unchanged``, ``refused`` or ``unreachable``."""
        outcome = await self._fetch_and_apply()
        # A retired key's overlap may have ended since the layer was built.
        current = self.current
        if (
            outcome != "applied"
            and current is not None
            and self._overlap_state(current) != self._applied_keys
        ):
            with contextlib.suppress(ConfigError):
                await self._apply(current)
        self._gauges()
        return outcome

    async def _fetch_and_apply(self) -> str:
        headers = {"Accept": "application/jose"}
        if self.etag is not None and self.current is not None:
            headers["If-None-Match"] = self.etag
        try:
            async with self._session().get(
                self.config.url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                status = resp.status
                text = await resp.text() if status == 200 else ""
                etag = resp.headers.get("ETag")
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
            detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if self.unreachable is None:
                log.warning("directory: %s unreachable (%s); keeping what we have",
                            self.config.url, detail)  # fmt: skip
            self.unreachable = detail
            self._count("unreachable")
            return "unreachable"
        self.unreachable = None
        now = self._clock()
        if status == 304:
            self.checked_at = now
            return "unchanged"
        if status != 200:
            self._refuse("http", f"directory: {self.config.url} answered {status}")
            return "refused"
        try:
            directory = verify_directory(text, self.config.keys, current=self.current, now=now)
        except DirectoryRefused as exc:
            self._refuse(exc.reason, exc.detail)
            return "refused"
        self.checked_at = now
        if self.current is not None and directory.jws == self.current.jws:
            self.etag = etag
            return "unchanged"
        started = time.perf_counter()
        try:
            await self._apply(directory)
        except ConfigError as exc:
            self._refuse("config", f"directory version {directory.version} does not "
                         f"make a valid configuration here: {exc}")  # fmt: skip
            return "refused"
        self.etag = etag
        await self.store.save_directory(directory.version, directory.jws)
        log.info("directory version %d accepted (issued %s, expires %s), applied in %.0f ms",
                 directory.version, iso_utc(directory.issued_at), iso_utc(directory.expires_at),
                 (time.perf_counter() - started) * 1000)  # fmt: skip
        self._count("applied")
        return "applied"

    async def _apply(self, directory: Directory) -> None:
        def layer(doc: Mapping[str, Any]) -> Sequence[tuple[str, str, Any]]:
            services = [str(s["code"]) for s in doc.get("services", [])]
            routed = [str(r["service"]) for r in doc.get("routes", []) if not r.get("target")]
            return directory_layer(
                directory,
                own=self.own,
                services=services,
                now=self._clock(),
                routed=routed,
                outbound=self.live.config.outbound,
            )

        await self.live.set_layer(layer)
        self.current = directory
        self._applied_keys = self._overlap_state(directory)

    def _overlap_state(self, directory: Directory) -> object:
        now = self._clock()
        parties = [directory.national, *(r.gateway for r in directory.regions)]
        return tuple(tuple(k.valid_at(now) for k in p.keys) for p in parties)

    def _refuse(self, reason: str, detail: str) -> None:
        self.refusal = Refusal(reason=reason, detail=detail, at=self._clock())
        kept = f"version {self.current.version} stays in force" if self.current else "none kept"
        log.warning("%s (reason %s; %s)", detail, reason, kept,
                    extra={"event": "directory_refused", "reason": reason})  # fmt: skip
        self._count(f"refused_{reason}")

    # What operators see ------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.directory_outcome(outcome)

    def _gauges(self) -> None:
        if self.metrics is not None:
            d = self.current
            if d is not None:
                self.metrics.set_directory(
                    version=d.version, issued_at=d.issued_at, expires_at=d.expires_at
                )

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: what is in force and how old it is."""
        now = self._clock()
        d = self.current
        out: dict[str, Any] = {"url": self.config.url}
        if d is not None:
            out |= {
                "version": d.version,
                "issued_at": iso_utc(d.issued_at),
                "expires_at": iso_utc(d.expires_at),
                "age_s": round(now - d.issued_at, 3),
                "stale": d.expired(now),
            }
        if self.checked_at is not None:
            out["checked_s_ago"] = round(now - self.checked_at, 3)
        if self.unreachable is not None:
            out["unreachable"] = self.unreachable
        if self.refusal is not None:
            out["last_refusal"] = {
                "reason": self.refusal.reason,
                "detail": self.refusal.detail,
                "at": iso_utc(self.refusal.at),
            }
        return out

    def warnings(self) -> list[str]:
        now = self._clock()
        d = self.current
        if d is None:
            return []
        if d.expired(now):
            return [
                f"directory: version {d.version} expired at {iso_utc(d.expires_at)}; "
                "serving from it, stale"
            ]
        return []

    def reasons(self) -> list[str]:
        """Not ready: a directory is configured and none was ever accepted."""
        if self.current is None:
            why = self.refusal.detail if self.refusal else self.unreachable or "not fetched yet"
            return [f"directory: none in force ({why})"]
        return []


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, DirectoryRefused) else "config"


# Announcing ----------------------------------------------------------------------


def announcement_of(
    config: Config, keypair: KeyPair, *, now: float | None = None
) -> dict[str, Any]:
    """What this gateway says about itself: its keys (retired ones with their end of
    overlap), its ingress URL when it has a public one, the services it offers."""
    now = time.time() if now is None else now
    gw = config.gateway
    keys: list[dict[str, Any]] = [{"jwk": dict(keypair.jwk)}]
    for jwk in load_rotated_keys(gw.rotated_keys_path):
        exp = float(jwk.get("exp", 0))
        if exp > now and jwk.get("kid") != keypair.kid:
            public = {k: v for k, v in jwk.items() if k != "exp"}
            keys.append({"jwk": public, "valid_until": iso_utc(exp)})
    body: dict[str, Any] = {"member_id": gw.member_id, "keys": keys}
    if gw.public_url:
        body["url"] = gw.public_url
    directory = config.directory
    if directory is not None:
        body["services"] = [{"code": code} for code in directory.offers]
    return body


async def announce(
    session: aiohttp.ClientSession,
    url: str,
    signer_key: KeyPair,
    member_id: str,
    body: Mapping[str, Any],
) -> int:
    """POST the announcement, signed with ``signer_key``; the publisher's status."""
    data = json.dumps(body, ensure_ascii=False).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        {
            "Content-Type": "application/json",
            "Gw-Client": member_id,
            "Gw-Message-Id": str(uuid.uuid4()),
        }
    )
    Signer(signer_key).sign_request("POST", url, headers, data, components=ANNOUNCE_COVERED)
    try:
        async with session.post(
            url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=5)
        ) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise GatewayError(f"announcement to {url} failed: {exc}") from exc
