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
  changes over the file's configuration, for ``gateway.live.merge``;
- publishing: ``Publisher`` keeps the national registry, takes provincial
  announcements (new keys, offered services) and signs a new version on each change.

How this compares with X-Road's global configuration: ``docs/federation.md``.
"""

from __future__ import annotations

import calendar
import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from gateway.audit import JwsInvalid, sign_jws, verify_jws
from gateway.config import SCHEMA_DIR
from gateway.encoding import iso_utc
from gateway.errors import DirectoryRefused
from gateway.keys import KeyPair

__all__ = [
    "FORMAT",
    "JWS_TYPE",
    "NATIONAL_ADAPTER",
    "NATIONAL_REGION",
    "Directory",
    "DirectoryKey",
    "Party",
    "Publisher",
    "Region",
    "ServiceOffer",
    "check_succession",
    "directory_layer",
    "etag_of",
    "parse_time",
    "read_directory",
    "sign_directory",
    "verify_directory",
]

FORMAT = "gw-directory/1"
JWS_TYPE = "gw-directory"
NATIONAL_REGION = "100000"
NATIONAL_ADAPTER = "directory-national"
Via = Literal["direct", "national"]

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
        return self.callback_url or f"{self.url}/v1/callbacks/{{service}}"

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


def directory_layer(
    directory: Directory,
    *,
    own: str,
    services: Iterable[str],
    now: float,
    routed: Iterable[str] = (),
) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Changes over the file for gateway ``own``: peer members with the keys valid at
    ``now``, one adapter per peer that is called directly (and one for the national
    platform), and a route per service another region offers (target ``<region>:*``).

    ``services`` are the codes this gateway has configured: a peer may call the ones
    this gateway's own entry offers; routes are made only for configured services.
    ``routed`` are services that already have a catch-all route here: the national
    platform's offer does not take them over (a province serves its own first)."""
    known = set(services)
    local = set(routed)
    own_region = own.split(":", 1)[0]
    mine = directory.region(own_region)
    offered_here = sorted(
        {s.code for s in mine.gateway.services} & known if mine is not None else set()
    )
    changes: list[tuple[str, str, dict[str, Any] | None]] = []
    national = directory.national
    if national.member_id != own:
        changes.append(
            (
                "members",
                national.member_id,
                {
                    "id": national.member_id,
                    "kind": "platform",
                    "name": "national platform (directory)",
                    "keys": national.jwks_at(now),
                    "regions": list(national.vouches_for or (NATIONAL_REGION,)),
                    "services": offered_here,
                    "callback_url": national.callbacks,
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
    for entry in directory.regions:
        gw = entry.gateway
        if entry.region == own_region or gw.member_id == own:
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
                    "regions": list(gw.vouches_for or (entry.region,)),
                    "services": offered_here,
                    "callback_url": gw.callbacks,
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
            if adapter == NATIONAL_ADAPTER and national.member_id == own:
                continue
            target = f"{entry.region}:*"
            changes.append(
                (
                    "routes",
                    f"{offer.code}|{target}",
                    {"service": offer.code, "adapter": adapter, "target": target},
                )
            )
    return changes


# Publishing (the national side) --------------------------------------------------------


class Publisher:
    """The national registry and its signed publication.

    The national operator registers each region's gateway (member id, URL, first key,
    the regions it may vouch for); a registered gateway then announces its own keys,
    URL and offered services, signed with a key the directory already lists for it, so
    a rotation publishes itself. Every change is a new version, signed at once."""

    def __init__(
        self,
        *,
        keypair: KeyPair,
        national: Mapping[str, Any],
        validity_s: float = 86400.0,
        refresh_s: float | None = None,
        clock: Callable[[], float] = time.time,
        version: int = 0,
    ) -> None:
        self.keypair = keypair
        self.national = copy.deepcopy(dict(national))
        self.validity_s = validity_s
        self.refresh_s = refresh_s
        self._clock = clock
        self.version = version
        self.regions: dict[str, dict[str, Any]] = {}
        self._signed: tuple[str, float] | None = None  # (jws, issued_at)

    def register(self, region: str, gateway: Mapping[str, Any], *, name: str = "") -> None:
        self.regions[region] = {
            "region": region,
            **({"name": name} if name else {}),
            "gateway": copy.deepcopy(dict(gateway)),
        }
        self._signed = None

    def gateway_of(self, member_id: str) -> dict[str, Any] | None:
        for entry in self.regions.values():
            if entry["gateway"]["member_id"] == member_id:
                gateway: dict[str, Any] = entry["gateway"]
                return gateway
        return None

    def keys_of(self, member_id: str) -> list[dict[str, Any]]:
        """The keys a member may sign with now (current, and retired within overlap)."""
        gw = self.gateway_of(member_id)
        if gw is None:
            return []
        now = self._clock()
        return [
            dict(k["jwk"])
            for k in gw["keys"]
            if "valid_until" not in k or now < parse_time(k["valid_until"])
        ]

    def announce(self, member_id: str, announcement: Mapping[str, Any]) -> bool:
        """Apply a verified announcement (``keys``, optional ``url``, ``services``);
        True when it changed the directory. Registration fields stay the operator's."""
        gw = self.gateway_of(member_id)
        if gw is None:
            raise DirectoryRefused("issuer", f"{member_id} is not registered in the directory")
        before = copy.deepcopy(gw)
        if "url" in announcement:
            gw["url"] = str(announcement["url"])
        if "keys" in announcement:
            gw["keys"] = copy.deepcopy(list(announcement["keys"]))
        if "services" in announcement:
            gw["services"] = copy.deepcopy(list(announcement["services"]))
        payload_check = self._payload(self._clock())
        problems = _schema_problems(payload_check)
        if problems:
            gw.clear()
            gw.update(before)
            raise DirectoryRefused("malformed", "announcement refused: " + "; ".join(problems[:3]))
        if gw == before:
            return False
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
        return self._signed[0]
