"""Following the federation directory (provincial side), and announcing ourselves in it.

``DirectoryFollower`` runs in every gateway process whose config has a ``directory``
block. At start it applies the last directory it accepted (from the store), so a
restart works while the national platform is down, then fetches a fresh one; every
``refresh_s`` it asks again with ``If-None-Match``. A document is applied only when its
signature holds against the pinned keys, its shape is valid, its version does not go
back and it has not expired; anything else is refused with the reason in the log and
the metrics, and the last good one stays in force. Applying it is a configuration
layer (``LiveConfig.set_layer``) between the file and the admin overlay, which only
adds what is remote (``gateway.federation.directory.screen``: entries that would define a local
member or this region are not applied, logged and counted once per version). Past
``expires_at`` the kept one still serves, reported stale on ``/readyz`` and in the
metrics, never as fresh; past ``max_stale_s`` more, every member and adapter it defined
is refused (``DirectoryStale``, via ``LiveConfig.set_refused``) until a fresh one comes.
The follower wakes at each retired key's ``valid_until`` and at that moment too.

``announce`` posts this gateway's keys (the current one, and retired ones within their
overlap) and offered services to the national platform, signed (RFC 9421) with a key
the directory lists for us as current: at start with the current key, and by ``gateway
keys rotate`` with the old key, so a rotation publishes itself. Each announcement has a
unique ``id`` and its ``issued_at``: the publisher takes it once.
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

from gateway.config.model import Config, DirectoryConfig
from gateway.crypto.keys import KeyPair, load_rotated_keys
from gateway.encoding import iso_utc
from gateway.errors import ConfigError, DirectoryRefused, GatewayError
from gateway.federation.directory import (
    Directory,
    directory_layer,
    national_refusal,
    read_directory,
    screen,
    verify_directory,
)
from gateway.observe.metrics import Metrics
from gateway.runtime.live import LiveConfig, resource_id
from gateway.signing import Signer
from gateway.store import Store

__all__ = ["DirectoryFollower", "Refusal", "announce", "announcement_of"]

log = logging.getLogger("gateway.federation.follower")
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
        self.refused_entries: tuple[str, ...] = ()  # entries of the one in force not applied
        self._screened: tuple[int, str] | None = None  # (version, jws digest) counted once
        self.too_stale: str | None = None  # why cross-region traffic is refused, if it is
        self._refused_map: dict[str, str] = {}

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
            await asyncio.sleep(self._next_wait())
            try:
                await self.refresh()
            except Exception:  # the loop must outlive any one bad round
                log.exception("directory refresh failed; will retry")

    # One round --------------------------------------------------------------------

    def _next_wait(self) -> float:
        """Until the next refresh, or sooner: the moment a retired key's overlap ends or
        the copy passes ``max_stale_s`` takes effect then, not a refresh later."""
        wait = self.config.refresh_s
        d = self.current
        if d is not None:
            now = self._clock()
            moments = [d.expires_at + self.config.max_stale_s]
            parties = [d.national, *(r.gateway for r in d.regions)]
            moments += [k.valid_until for p in parties for k in p.keys if k.valid_until]
            ahead = [m - now for m in moments if m > now]
            if ahead:
                wait = min(wait, max(0.01, min(ahead) + 0.001))
        return wait

    async def refresh(self) -> str:
        """Fetch and apply once: ``applied``, ``unchanged``, ``refused`` or ``unreachable``."""
        outcome = await self._fetch_and_apply()
        await self.enforce()
        self._gauges()
        return outcome

    async def enforce(self) -> None:
        """What time alone changes: a retired key whose overlap ended leaves the layer, and
        past ``max_stale_s`` every member and adapter the directory defines is refused."""
        current = self.current
        if current is not None and self._overlap_state(current) != self._applied_keys:
            with contextlib.suppress(ConfigError):
                await self._apply(current)
        self._stale_check()

    def _stale_check(self) -> None:
        d = self.current
        now = self._clock()
        why: str | None = None
        if d is not None and now >= d.expires_at + self.config.max_stale_s:
            why = (
                f"cross-region traffic refused: the federation directory in force (version "
                f"{d.version}) expired at {iso_utc(d.expires_at)}, more than "
                f"{self.config.max_stale_s:g} s ago (directory.max_stale_s); a fresh one "
                "is needed"
            )
        refused: dict[str, str] = {}
        if why is not None:
            refused = {r: why for kind in ("members", "adapters") for r in self.live.layered(kind)}
        if why != self.too_stale:
            if why is not None:
                log.warning("%s", why, extra={"event": "directory_too_stale"})
            else:
                log.info("directory fresh again: cross-region traffic resumes")
        if why != self.too_stale or (why is not None and refused != self._refused_map):
            self.live.set_refused(refused)
        self.too_stale = why
        self._refused_map = refused

    async def _fetch_and_apply(self) -> str:
        headers = {"Accept": "application/jose"}
        if self.etag is not None and self.current is not None:
            headers["If-None-Match"] = self.etag
        try:
            async with self._session().get(
                self.config.url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=5),
                allow_redirects=False,  # a 3xx is a failed fetch, never followed
            ) as resp:
                status = resp.status
                etag = resp.headers.get("ETag")
                text = await self._bounded_text(resp) if status == 200 else ""
        except DirectoryRefused as exc:
            self._refuse(exc.reason, exc.detail)
            return "refused"
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
            if self.current is None and directory.version < self.config.min_version:
                raise DirectoryRefused(
                    "floor",
                    f"directory refused: version {directory.version} is below "
                    f"directory.min_version {self.config.min_version} (no copy kept here)",
                )
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

    async def _bounded_text(self, resp: aiohttp.ClientResponse) -> str:
        """The body, read up to ``max_bytes``: a larger one is refused unread."""
        limit = self.config.max_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise DirectoryRefused(
                "too_large", f"directory refused: {resp.content_length} bytes, over {limit}"
            )
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
            if total > limit:  # a chunked body says no length up front
                raise DirectoryRefused("too_large", f"directory refused: over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8")

    async def _apply(self, directory: Directory) -> None:
        def layer(doc: Mapping[str, Any]) -> Sequence[tuple[str, str, Any]]:
            services = [str(s["code"]) for s in doc.get("services", [])]
            routed = [str(r["service"]) for r in doc.get("routes", []) if not r.get("target")]
            defined = {
                "members": [str(m["id"]) for m in doc.get("members", [])],
                "adapters": [str(a["name"]) for a in doc.get("adapters", [])],
                "routes": [resource_id("routes", r) for r in doc.get("routes", [])],
            }
            self._screen(directory, defined["members"])
            return directory_layer(
                directory,
                own=self.own,
                services=services,
                now=self._clock(),
                routed=routed,
                outbound=self.live.config.outbound,
                defined=defined,
            )

        await self.live.set_layer(layer)
        self.current = directory
        self._applied_keys = self._overlap_state(directory)
        self._stale_check()

    def _screen(self, directory: Directory, local: Sequence[str]) -> None:
        """Log and count, once per document, the entries that are not applied here."""
        _, refused = screen(directory, own=self.own, local=local)
        details = [r.detail for r in refused]
        reasons = [r.reason for r in refused]
        national = national_refusal(directory, own=self.own, local=local)
        if national is not None:
            details.append(f"directory national entry refused: {national}")
            reasons.append("national")
        self.refused_entries = tuple(details)
        seen = (directory.version, directory.digest)
        if self._screened == seen:
            return
        self._screened = seen
        for detail, reason in zip(details, reasons, strict=True):
            log.warning("%s (reason %s; the rest of version %d applies)", detail, reason,
                        directory.version,
                        extra={"event": "directory_entry_refused", "reason": reason})  # fmt: skip
            if self.metrics is not None:
                self.metrics.directory_entry_refused(reason)

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
        if self.refused_entries:
            out["refused_entries"] = list(self.refused_entries)
        if self.too_stale is not None:
            out["cross_region"] = self.too_stale
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
        if self.too_stale is not None:
            return [f"directory: {self.too_stale}"]
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
    # Single use: a unique id and the issue time (the publisher refuses a replay and
    # anything older than the last one it took from us).
    body: dict[str, Any] = {
        "member_id": gw.member_id,
        "id": str(uuid.uuid4()),
        "issued_at": iso_utc(now, millis=True),
        "keys": keys,
    }
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
            url,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=5),
            allow_redirects=False,  # a signed announcement is never re-posted elsewhere
        ) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise GatewayError(f"announcement to {url} failed: {exc}") from exc
