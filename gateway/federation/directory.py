"""The federation directory: the national platform's signed list of gateways and services.

The document (``schemas/directory.schema.json``) names, for each region, its gateway
(member id, ingress URL, public keys, the regions it may vouch for) and the services it
offers other regions, and the national platform likewise. It travels as a compact JWS
(``typ: gw-directory``) signed by the national platform's directory key, which every
follower pins in its configuration. Three parts live here:

- reading: ``read_directory`` checks the signature against the pinned keys and the
  schema and gives frozen dataclasses; ``check_succession`` refuses a rollback (lower
  version, or the same version with other content), a document from the future and an
  expired one;
- the configuration layer: ``directory_layer`` turns a directory into (kind, id, body)
  changes over the file's configuration, for ``gateway.runtime.live.merge``;
- publishing: ``Publisher`` keeps the national registry, takes provincial
  announcements (new keys, offered services) and signs a new version on each change.

How this compares with X-Road's global configuration: ``docs/federation.md``.
"""

from __future__ import annotations

import calendar
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema

from gateway.audit import JwsInvalid, sign_jws, verify_jws
from gateway.config.model import SCHEMA_DIR, region_within
from gateway.config.outbound import OutboundPolicy, join
from gateway.crypto.keys import KeyPair
from gateway.encoding import iso_utc
from gateway.errors import DirectoryRefused, OutboundRefused

__all__ = [
    "ANNOUNCE_SKEW_S",
    "FORMAT",
    "JWS_TYPE",
    "NATIONAL_ADAPTER",
    "NATIONAL_REGION",
    "Directory",
    "DirectoryKey",
    "EntryRefusal",
    "Party",
    "Publisher",
    "Region",
    "ServiceOffer",
    "check_succession",
    "directory_layer",
    "etag_of",
    "national_refusal",
    "parse_instant",
    "parse_time",
    "read_directory",
    "region_within",
    "screen",
    "sign_directory",
    "verify_directory",
]

FORMAT = "gw-directory/1"
JWS_TYPE = "gw-directory"
NATIONAL_REGION = "100000"
NATIONAL_ADAPTER = "directory-national"
Via = Literal["direct", "national"]
log = logging.getLogger("gateway.federation.directory")
_STRICT = OutboundPolicy()  # the default: https only, public addresses only

with (SCHEMA_DIR / "directory.schema.json").open(encoding="utf-8") as _fh:
    _VALIDATOR = jsonschema.Draft202012Validator(
        json.load(_fh), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def parse_time(text: str) -> float:
    """``2026-12-01T20:00:00Z`` → Unix time (the schema allows only this spelling)."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectoryKey:
    jwk: Mapping[str, Any]
    valid_until: float | None = None  # a retired key's end of overlap; None: current

    @property
    def kid(self) -> str:
        return str(self.jwk["kid"])

    def valid_at(self, now: float) -> bool:
        return self.valid_until is None or now < self.valid_until


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceOffer:
    code: str
    via: Via = "direct"  # "national": other regions reach it through the national platform


@dataclass(frozen=True, slots=True, kw_only=True)
class Party:
    """A gateway (or the national platform) as the directory describes it."""

    member_id: str
    url: str
    keys: tuple[DirectoryKey, ...]
    vouches_for: tuple[str, ...] = ()
    services: tuple[ServiceOffer, ...] = ()
    callback_url: str | None = None

    @property
    def callbacks(self) -> str:
        """Where this party takes callbacks (``{service}`` filled in by delivery)."""
        if self.callback_url:
            return self.callback_url
        return join(self.url, "v1", "callbacks") + "/{service}"

    @property
    def region(self) -> str:
        return self.member_id.split(":", 1)[0]

    def jwks_at(self, now: float) -> list[dict[str, Any]]:
        return [dict(k.jwk) for k in self.keys if k.valid_at(now)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    region: str
    gateway: Party
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Directory:
    issuer: str
    version: int
    issued_at: float
    expires_at: float
    national: Party
    regions: tuple[Region, ...]
    refresh_s: float | None = None
    jws: str = field(repr=False)
    kid: str  # the directory key that signed it

    def region(self, code: str) -> Region | None:
        return next((r for r in self.regions if r.region == code), None)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    @property
    def digest(self) -> str:
        return etag_of(self.jws)


def etag_of(jws: str) -> str:
    """The strong ETag the publisher serves for one signed document."""
    return '"' + hashlib.sha256(jws.encode("ascii")).hexdigest()[:32] + '"'


def _party(data: Mapping[str, Any]) -> Party:
    return Party(
        member_id=data["member_id"],
        url=str(data["url"]).rstrip("/"),
        keys=tuple(
            DirectoryKey(
                jwk=k["jwk"],
                valid_until=parse_time(k["valid_until"]) if "valid_until" in k else None,
            )
            for k in data["keys"]
        ),
        vouches_for=tuple(data.get("vouches_for", ())),
        callback_url=data.get("callback_url"),
        services=tuple(
            ServiceOffer(code=s["code"], via=s.get("via", "direct"))
            for s in data.get("services", ())
        ),
    )


def _schema_problems(payload: Any) -> list[str]:
    return [
        "/" + "/".join(map(str, e.absolute_path)) + f": {e.message}"
        for e in sorted(_VALIDATOR.iter_errors(payload), key=lambda e: list(map(str, e.path)))
    ]


def read_directory(jws: str, pinned: Sequence[Mapping[str, Any]]) -> Directory:
    """Signature (against the pinned keys) and shape; no time policy (``check_succession``)."""
    try:
        header, payload = verify_jws(jws.strip(), {"keys": list(pinned)}, typ=JWS_TYPE)
    except JwsInvalid as exc:
        reason = "key_unknown" if "does not hold" in str(exc) else "signature"
        raise DirectoryRefused(reason, f"directory refused: {exc}") from exc
    except (ValueError, UnicodeError) as exc:  # base64 that does not decode at all
        raise DirectoryRefused("signature", f"directory refused: {exc}") from exc
    problems = _schema_problems(payload)
    if problems:
        raise DirectoryRefused("malformed", "directory refused: " + "; ".join(problems[:5]))
    return Directory(
        issuer=payload["issuer"],
        version=int(payload["version"]),
        issued_at=parse_time(payload["issued_at"]),
        expires_at=parse_time(payload["expires_at"]),
        refresh_s=payload.get("refresh_s"),
        national=_party(payload["national"]),
        regions=tuple(
            Region(region=r["region"], name=r.get("name", ""), gateway=_party(r["gateway"]))
            for r in payload["regions"]
        ),
        jws=jws.strip(),
        kid=str(header["kid"]),
    )


def check_succession(
    new: Directory, current: Directory | None, *, now: float, skew_s: float = 300.0
) -> None:
    """Refuse what must not replace ``current``: a rollback, the future, an expired one."""
    if current is not None:
        if new.version < current.version:
            raise DirectoryRefused(
                "rollback",
                f"directory refused: version {new.version} is lower than the "
                f"version {current.version} in force (no rollback)",
            )
        if new.version == current.version and new.jws != current.jws:
            raise DirectoryRefused(
                "rollback",
                f"directory refused: version {new.version} again with other content",
            )
    if new.issued_at > now + skew_s:
        raise DirectoryRefused(
            "future", f"directory refused: issued at {iso_utc(new.issued_at)}, in the future"
        )
    if new.expired(now):
        raise DirectoryRefused(
            "expired", f"directory refused: version {new.version} expired at "
            f"{iso_utc(new.expires_at)}"
        )  # fmt: skip


def verify_directory(
    jws: str,
    pinned: Sequence[Mapping[str, Any]],
    *,
    current: Directory | None = None,
    now: float | None = None,
) -> Directory:
    """``read_directory`` then ``check_succession``: what a follower applies."""
    directory = read_directory(jws, pinned)
    check_succession(directory, current, now=time.time() if now is None else now)
    return directory


def sign_directory(keypair: KeyPair, payload: Mapping[str, Any]) -> str:
    """A compact JWS over a schema-valid directory payload."""
    problems = _schema_problems(payload)
    if problems:
        raise DirectoryRefused("malformed", "not a directory: " + "; ".join(problems[:5]))
    return sign_jws(keypair, payload, typ=JWS_TYPE)


# The configuration layer ---------------------------------------------------------------


def _adapter_name(region: str) -> str:
    return f"directory-{region}"


def _reachable(party: Party, outbound: OutboundPolicy) -> bool:
    """Whether the outbound policy lets us call this party's URLs; logged when not."""
    try:
        outbound.check_url(party.url, what=f"{party.member_id}'s url")
        outbound.check_url(party.callbacks, what=f"{party.member_id}'s callback_url")
    except OutboundRefused as exc:
        log.warning(
            "directory entry %s left out: %s", party.member_id, exc.detail,
            extra={"event": "directory_entry_refused", "member": party.member_id,
                   "reason": "outbound"},
        )  # fmt: skip
        return False
    return True


def _region_of(member_id: str) -> str:
    return member_id.split(":", 1)[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryRefusal:
    """A directory entry the follower does not apply (the rest of the document does)."""

    region: str  # the entry's region, or ``100000`` for the national party
    member_id: str
    reason: str  # stable word: foreign_member, foreign_vouch, local_member, duplicate
    detail: str


def screen(
    directory: Directory, *, own: str, local: Iterable[str] = ()
) -> tuple[tuple[Region, ...], tuple[EntryRefusal, ...]]:
    """The region entries that may add to the follower ``own``'s configuration, and the
    ones refused, with why. ``local`` are the member ids defined here (file or admin).

    Entries for the follower's own region or its sub-regions are left out without a
    refusal (a city gateway 330100 may well be listed; a 330000 follower routes its own
    region itself). Refused: an entry whose gateway id or vouched-for regions are not
    within its own region, one whose gateway id is a member defined here, and a second
    entry for a region or gateway already listed."""
    own_region = _region_of(own)
    defined = set(local) | {own}
    kept: list[Region] = []
    refused: list[EntryRefusal] = []
    seen_regions: set[str] = set()
    seen_members = {directory.national.member_id}

    def refuse(entry: Region, reason: str, detail: str) -> None:
        refused.append(
            EntryRefusal(
                region=entry.region, member_id=entry.gateway.member_id, reason=reason,
                detail=f"directory entry {entry.region} ({entry.gateway.member_id}) "
                f"refused: {detail}",
            )
        )  # fmt: skip

    for entry in directory.regions:
        gw = entry.gateway
        if not region_within(_region_of(gw.member_id), entry.region):
            refuse(entry, "foreign_member", f"{gw.member_id} is not in region {entry.region}")
            continue
        if region_within(entry.region, own_region):
            continue  # our own region: never the directory's to define or route
        foreign = [r for r in gw.vouches_for if not region_within(r, entry.region)]
        if foreign:
            refuse(
                entry, "foreign_vouch",
                f"vouches for {', '.join(foreign)}, outside region {entry.region}",
            )  # fmt: skip
            continue
        if gw.member_id in defined:
            refuse(entry, "local_member", f"{gw.member_id} is defined locally")
            continue
        if entry.region in seen_regions or gw.member_id in seen_members:
            refuse(entry, "duplicate", "its region or gateway is listed twice")
            continue
        seen_regions.add(entry.region)
        seen_members.add(gw.member_id)
        kept.append(entry)
    return tuple(kept), tuple(refused)


def national_refusal(directory: Directory, *, own: str, local: Iterable[str] = ()) -> str | None:
    """Why the document's national party may not be applied here, or None."""
    national = directory.national
    if national.member_id == own:
        return None  # the national platform following its own directory
    if _region_of(national.member_id) != NATIONAL_REGION:
        return f"the national party {national.member_id} is not in region {NATIONAL_REGION}"
    if national.member_id in set(local):
        return f"the national party {national.member_id} is defined locally"
    return None


def directory_layer(
    directory: Directory,
    *,
    own: str,
    services: Iterable[str],
    now: float,
    routed: Iterable[str] = (),
    outbound: OutboundPolicy = _STRICT,
    defined: Mapping[str, Iterable[str]] | None = None,
) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Changes over the file for gateway ``own``: peer members with the keys valid at
    ``now``, one adapter per peer that is called directly (and one for the national
    platform), and a route per service another region offers (target ``<region>:*``).

    ``services`` are the codes this gateway has configured: a peer may call the ones
    this gateway's own entry offers; routes are made only for configured services.
    ``routed`` are services that already have a catch-all route here: the national
    platform's offer does not take them over (a province serves its own first).
    ``outbound`` is the policy for the URLs learnt here (``gateway/config/outbound.py``): a
    party whose URL or callback URL it refuses is left out, as if absent; what is added
    is marked ``learnt``, so its addresses are checked again at connect time.
    ``defined`` are the resource ids, by kind, defined here (the file and the admin
    overlay): the layer only adds, it never replaces or shadows one of them, and never
    defines or routes the follower's own region or its sub-regions (``screen``)."""
    known = set(services)
    local = set(routed)
    mine_ids = {kind: set(ids) for kind, ids in (defined or {}).items()}
    local_members = mine_ids.get("members", set())
    own_region = own.split(":", 1)[0]
    mine = directory.region(own_region)
    offered_here = sorted(
        {s.code for s in mine.gateway.services} & known if mine is not None else set()
    )
    changes: list[tuple[str, str, dict[str, Any] | None]] = []
    national = directory.national
    national_ok = (
        national.member_id != own
        and national_refusal(directory, own=own, local=local_members) is None
        and _reachable(national, outbound)
    )
    if national_ok:
        changes.append(
            (
                "members",
                national.member_id,
                {
                    "id": national.member_id,
                    "kind": "platform",
                    "name": "national platform (directory)",
                    "keys": national.jwks_at(now),
                    "regions": _vouched(national.vouches_for or (NATIONAL_REGION,), own_region),
                    "services": offered_here,
                    "callback_url": national.callbacks,
                    "learnt": True,
                },
            )
        )
        changes.append(
            (
                "adapters",
                NATIONAL_ADAPTER,
                {
                    "name": NATIONAL_ADAPTER,
                    "type": "national_platform",
                    "readiness": False,
                    "learnt": True,
                    "config": {
                        "base_url": national.url,
                        "platform_keys": national.jwks_at(now),
                        "receiver": national.member_id,  # its callbacks are the ones taken
                    },
                },
            )
        )
        for offer in national.services:
            if offer.code in known and offer.code not in local:
                route = {"service": offer.code, "adapter": NATIONAL_ADAPTER}
                changes.append(("routes", f"{offer.code}|*", route))
    national_usable = national.member_id != own and any(
        kind == "adapters" and rid == NATIONAL_ADAPTER for kind, rid, _ in changes
    )
    entries, _ = screen(directory, own=own, local=local_members)
    for entry in entries:
        gw = entry.gateway
        if entry.region == own_region or gw.member_id == own:
            continue
        if not _reachable(gw, outbound):
            continue
        keys = gw.jwks_at(now)
        changes.append(
            (
                "members",
                gw.member_id,
                {
                    "id": gw.member_id,
                    "kind": "gateway",
                    "name": entry.name or f"gateway of {entry.region} (directory)",
                    "keys": keys,
                    "regions": _vouched(gw.vouches_for or (entry.region,), own_region),
                    "services": offered_here,
                    "callback_url": gw.callbacks,
                    "learnt": True,
                    **({} if keys else {"enabled": False}),
                },
            )
        )
        direct = [o for o in gw.services if o.via == "direct" and o.code in known]
        if direct and keys:
            changes.append(
                (
                    "adapters",
                    _adapter_name(entry.region),
                    {
                        "name": _adapter_name(entry.region),
                        "type": "peer_gateway",
                        "readiness": False,
                        "learnt": True,
                        "config": {"url": gw.url, "peer_id": gw.member_id, "peer_keys": keys},
                    },
                )
            )
        for offer in gw.services:
            if offer.code not in known:
                continue
            adapter = (
                _adapter_name(entry.region) if offer.via == "direct" and keys else NATIONAL_ADAPTER
            )
            if adapter == NATIONAL_ADAPTER and not national_usable:
                continue
            target = f"{entry.region}:*"
            changes.append(
                (
                    "routes",
                    f"{offer.code}|{target}",
                    {"service": offer.code, "adapter": adapter, "target": target},
                )
            )
    # Only adds: nothing defined here is replaced (a route, an adapter of the same name).
    return [c for c in changes if c[1] not in mine_ids.get(c[0], set())]


def _vouched(regions: Iterable[str], own_region: str) -> list[str]:
    """A relay never vouches for the follower's own region or its sub-regions."""
    kept = [r for r in regions if not region_within(r, own_region)]
    return kept or [NATIONAL_REGION]


# Publishing (the national side) --------------------------------------------------------


ANNOUNCE_SKEW_S = 300.0  # an announcement's issued_at must be this close to now
SEEN_IDS = 256  # ids remembered per gateway (older ones are refused by issued_at anyway)


def parse_instant(text: str) -> float:
    """RFC 3339 UTC with optional milliseconds (``…T20:00:00.123Z``) → Unix time."""
    whole, _, fraction = text.removesuffix("Z").partition(".")
    if not text.endswith("Z") or (fraction and not (fraction.isdigit() and len(fraction) <= 6)):
        raise ValueError(f"not an RFC 3339 UTC time: {text!r}")
    return parse_time(whole + "Z") + (float("0." + fraction) if fraction else 0.0)


@dataclass(slots=True, kw_only=True)
class _Announced:
    """What the publisher remembers of one gateway's announcements (persisted)."""

    last_issued_at: float = 0.0
    seen: list[str] = field(default_factory=list)  # the last SEEN_IDS ids accepted
    retired: dict[str, float] = field(default_factory=dict)  # kid → end of its overlap


class Publisher:
    """The national registry and its signed publication.

    The national operator registers each region's gateway (member id, URL, first key,
    the regions it may vouch for); a registered gateway then announces its own keys,
    URL and offered services, signed with a key the directory lists for it as current
    (never a retired one within its overlap), so a rotation publishes itself. Every
    change is a new version, signed at once.

    An announcement carries a unique ``id`` and its ``issued_at``: one seen before, one
    older than the last accepted from that gateway, or one not within
    ``ANNOUNCE_SKEW_S`` of now is refused, and a key once retired (listed with a
    ``valid_until``, or dropped) never comes back as current nor gets a longer overlap.
    With a ``state_path`` the registry, the version and this memory survive a restart
    (written atomically at each change); the operator's ``register`` of a region the
    state already holds keeps the state's (the announced keys are newer)."""

    def __init__(
        self,
        *,
        keypair: KeyPair,
        national: Mapping[str, Any],
        validity_s: float = 86400.0,
        refresh_s: float | None = None,
        clock: Callable[[], float] = time.time,
        version: int = 0,
        state_path: Path | None = None,
    ) -> None:
        self.keypair = keypair
        self.national = copy.deepcopy(dict(national))
        self.validity_s = validity_s
        self.refresh_s = refresh_s
        self._clock = clock
        self.version = version
        self.regions: dict[str, dict[str, Any]] = {}
        self._signed: tuple[str, float] | None = None  # (jws, issued_at)
        self._announced: dict[str, _Announced] = {}
        self.state_path = state_path
        self._restored: set[str] = set()
        if state_path is not None and state_path.exists():
            self._load(state_path)

    # State across restarts ---------------------------------------------------------

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text(encoding="utf-8"))
        self.version = max(self.version, int(state.get("version", 0)))
        self.regions = {str(k): v for k, v in state.get("regions", {}).items()}
        self._restored = set(self.regions)
        self._announced = {
            member: _Announced(
                last_issued_at=float(a.get("last_issued_at", 0.0)),
                seen=[str(i) for i in a.get("seen", [])],
                retired={str(k): float(v) for k, v in a.get("retired", {}).items()},
            )
            for member, a in state.get("announced", {}).items()
        }

    def _save(self) -> None:
        if self.state_path is None:
            return
        state = {
            "version": self.version,
            "regions": self.regions,
            "announced": {
                m: {"last_issued_at": a.last_issued_at, "seen": a.seen,
                    "retired": a.retired}
                for m, a in self._announced.items()
            },
        }  # fmt: skip
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, self.state_path)

    # The registry --------------------------------------------------------------------

    def register(self, region: str, gateway: Mapping[str, Any], *, name: str = "") -> None:
        held = self.regions.get(region)
        if (
            region in self._restored
            and held is not None
            and held["gateway"]["member_id"] == gateway.get("member_id")
        ):
            return  # the state file's entry is newer than the operator's bootstrap
        self.regions[region] = {
            "region": region,
            **({"name": name} if name else {}),
            "gateway": copy.deepcopy(dict(gateway)),
        }
        self._signed = None
        self._save()

    def gateway_of(self, member_id: str) -> dict[str, Any] | None:
        for entry in self.regions.values():
            if entry["gateway"]["member_id"] == member_id:
                gateway: dict[str, Any] = entry["gateway"]
                return gateway
        return None

    def keys_of(self, member_id: str) -> list[dict[str, Any]]:
        """The keys a member may sign exchanges with now (current, and retired within
        their overlap)."""
        gw = self.gateway_of(member_id)
        if gw is None:
            return []
        now = self._clock()
        return [
            dict(k["jwk"])
            for k in gw["keys"]
            if "valid_until" not in k or now < parse_time(k["valid_until"])
        ]

    def announcing_keys_of(self, member_id: str) -> list[dict[str, Any]]:
        """The keys that may sign an announcement: the current ones only. A retired key
        within its overlap still signs exchanges, but may not re-key the gateway."""
        gw = self.gateway_of(member_id)
        if gw is None:
            return []
        return [dict(k["jwk"]) for k in gw["keys"] if "valid_until" not in k]

    def announce(self, member_id: str, announcement: Mapping[str, Any]) -> bool:
        """Apply a gateway's verified announcement (``id``, ``issued_at``, ``keys``,
        optional ``url``, ``services``); True when it changed the directory. Refused
        (``DirectoryRefused``): a replay, an older one, a retired key brought back."""
        gw = self.gateway_of(member_id)
        if gw is None:
            raise DirectoryRefused("issuer", f"{member_id} is not registered in the directory")
        ident, issued_at = announcement.get("id"), announcement.get("issued_at")
        if not isinstance(ident, str) or not ident or not isinstance(issued_at, str):
            raise DirectoryRefused(
                "malformed", "announcement refused: an id and an issued_at are required"
            )
        try:
            at = parse_instant(issued_at)
        except ValueError as exc:
            raise DirectoryRefused("malformed", f"announcement refused: {exc}") from exc
        now = self._clock()
        memory = self._announced.setdefault(member_id, _Announced())
        if ident in memory.seen:
            raise DirectoryRefused("replayed", f"announcement refused: {ident} was seen before")
        if at < memory.last_issued_at:
            raise DirectoryRefused(
                "older", f"announcement refused: issued {issued_at}, before the last one "
                f"accepted from {member_id} ({iso_utc(memory.last_issued_at, millis=True)})"
            )  # fmt: skip
        if abs(now - at) > ANNOUNCE_SKEW_S:
            raise DirectoryRefused(
                "stale", f"announcement refused: issued {issued_at}, not within "
                f"{ANNOUNCE_SKEW_S:g} s of now"
            )  # fmt: skip
        if "keys" in announcement:
            self._check_no_comeback(memory, announcement["keys"])
        changed = self._change(gw, announcement, memory)
        memory.seen = [*memory.seen, ident][-SEEN_IDS:]
        memory.last_issued_at = at
        self._save()
        return changed

    def update(self, member_id: str, changes: Mapping[str, Any]) -> bool:
        """The national operator's own change of a registered gateway (``keys``, ``url``,
        ``services``): a revocation is dropping a key. No announcement rules: the
        operator may reinstate a key explicitly."""
        gw = self.gateway_of(member_id)
        if gw is None:
            raise DirectoryRefused("issuer", f"{member_id} is not registered in the directory")
        memory = self._announced.setdefault(member_id, _Announced())
        for kid in _kids_of(changes.get("keys", [])):
            memory.retired.pop(kid, None)
        changed = self._change(gw, changes, memory)
        self._save()
        return changed

    @staticmethod
    def _check_no_comeback(memory: _Announced, keys: Any) -> None:
        if not isinstance(keys, list):
            return  # the schema check names the problem
        for key in keys:
            if not isinstance(key, Mapping) or not isinstance(key.get("jwk"), Mapping):
                continue
            kid = str(key["jwk"].get("kid"))
            if kid not in memory.retired:
                continue
            until = key.get("valid_until")
            try:
                later = until is None or parse_time(str(until)) > memory.retired[kid]
            except ValueError:
                later = True
            if later:
                raise DirectoryRefused(
                    "retired_key", f"announcement refused: key {kid} was retired (until "
                    f"{iso_utc(memory.retired[kid])}); a rotation never brings it back"
                )  # fmt: skip

    def _change(self, gw: dict[str, Any], changes: Mapping[str, Any], memory: _Announced) -> bool:
        before = copy.deepcopy(gw)
        if "url" in changes:
            gw["url"] = str(changes["url"])
        if "keys" in changes:
            gw["keys"] = copy.deepcopy(list(changes["keys"]))
        if "services" in changes:
            gw["services"] = copy.deepcopy(list(changes["services"]))
        payload_check = self._payload(self._clock())
        problems = _schema_problems(payload_check)
        if problems:
            gw.clear()
            gw.update(before)
            raise DirectoryRefused("malformed", "announcement refused: " + "; ".join(problems[:3]))
        if gw == before:
            return False
        # Remember what this change retired: listed with an end, or dropped (ended now).
        now = self._clock()
        for key in gw["keys"]:
            if "valid_until" in key:
                kid = str(key["jwk"]["kid"])
                end = parse_time(key["valid_until"])
                memory.retired[kid] = min(end, memory.retired.get(kid, end))
        listed = _kids_of(gw["keys"])
        for kid in _kids_of(before.get("keys", [])) - listed:
            memory.retired[kid] = min(now, memory.retired.get(kid, now))
        self._signed = None
        return True

    def _payload(self, now: float) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "issuer": self.national["member_id"],
            "version": max(self.version, 1),
            "issued_at": iso_utc(now),
            "expires_at": iso_utc(now + self.validity_s),
            **({"refresh_s": self.refresh_s} if self.refresh_s else {}),
            "national": copy.deepcopy(self.national),
            "regions": [copy.deepcopy(self.regions[r]) for r in sorted(self.regions)],
        }

    def current(self) -> str:
        """The signed document in force; a new version after a change, or once half of
        the validity has passed (so followers never see it expire while all is well)."""
        now = self._clock()
        if self._signed is None or now - self._signed[1] >= self.validity_s / 2:
            self.version += 1
            self._signed = (sign_directory(self.keypair, self._payload(now)), now)
            self._save()  # a restarted publisher never signs a lower version
        return self._signed[0]


def _kids_of(keys: Any) -> set[str]:
    if not isinstance(keys, list):
        return set()
    return {
        str(k["jwk"].get("kid"))
        for k in keys
        if isinstance(k, Mapping) and isinstance(k.get("jwk"), Mapping)
    }
