"""``gateway demo``: province A, the national platform and province B, end to end, on loopback.

A Zhejiang enterprise applies, through province A's one-stop portal, for a service
handled in Guangdong (跨省通办):

    A portal → A gateway → national platform → B gateway → B back office
    → decision → B gateway → national platform → A gateway → A portal (callback)

then queries public credit information and submits a review (好差评). Every party is a
real aiohttp server with its own freshly generated key; every hop is signed and
checked. The demo prints each hop with its time and the signature checked there, then
reads each gateway's message log, and exits 0 only if every hop is on record.

Neither gateway is told of its peers by hand: the national platform publishes the
federation directory (``gateway/federation/directory.py``) and both gateways follow it (their
configs hold only the directory's URL and its pinned key). Mid-demo, B rotates its key
(``gateway keys rotate`` announces it, signed with the old key), restarts on the new
one, and a second application goes through with B signing with the new key while A
lists both of B's keys for the overlap.

With ``crypto="sm2"`` (``gateway demo --crypto sm2``) every party's key is SM2 (the
directory's too), every configured member's ``allowed_algs`` is ``["sm2-sm3"]``, every
signature is ``sm2-sm3`` and every Content-Digest ``sm3``; the demo checks each recorded
request for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web

from gateway.admin import create_admin_app
from gateway.config.model import SCHEMA_DIR, jwk_path_for, parse_config
from gateway.crypto.keys import (
    KeyPair,
    KeyType,
    VerificationKey,
    generate,
    rotate_keypair,
    write_keypair,
)
from gateway.exchange.app import RUNTIME, STORE, create_app
from gateway.exchange.client import ExchangeClient, Reply, verify_reply
from gateway.federation.directory import Publisher
from gateway.federation.follower import announce, announcement_of
from gateway.serve.ports import free_port
from gateway.signing import Signer, parse_signature_input
from gateway.states import MessageState
from gateway.store import MessageRecord
from simulators.backoffice import BackOffice, create_backoffice_app
from simulators.national import NationalPlatform, create_national_app
from simulators.portal import Portal, create_portal_app

__all__ = ["DemoReport", "run_demo"]

A_GATEWAY, B_GATEWAY = "330000:gateway", "440000:gateway"
PORTAL, BACK_OFFICE = "330000:one-stop-portal", "440000:back-office"
PLATFORM = "100000:national-platform"
SERVICES = SCHEMA_DIR / "services"
REFRESH_S = 0.5  # how often each gateway asks for the directory
Crypto = Literal["ed25519", "sm2"]


def _example(service: str) -> Any:
    schema = json.loads((SERVICES / service / "request.json").read_text(encoding="utf-8"))
    return schema["examples"][0]


def _service(code: str, mode: str, timeout_s: float = 10) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "code": code,
        "mode": mode,
        "request_schema": str(SERVICES / code / "request.json"),
        "response_schema": str(SERVICES / code / "response.json"),
        "timeout_s": timeout_s,
    }
    if (SERVICES / code / "callback.json").exists():
        entry["callback_schema"] = str(SERVICES / code / "callback.json")
    return entry


@dataclass
class DemoReport:
    """What happened: hops in time order, the answers, and each gateway's message log."""

    hops: list[dict[str, Any]] = field(default_factory=list)
    replies: dict[str, Reply] = field(default_factory=dict)
    logs: dict[str, list[MessageRecord]] = field(default_factory=dict)
    decision: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    rotation: dict[str, Any] | None = None  # how A followed B's new key
    new_kid: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Topology:
    workdir: Path
    keys: dict[str, KeyPair]
    ports: dict[str, int]
    crypto: Crypto = "ed25519"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def jwk(self, name: str) -> str:
        return str(jwk_path_for(self.workdir / f"{name}.pem"))


def _policy(config: dict[str, Any], t: _Topology) -> dict[str, Any]:
    """With SM2, every member must sign with SM2 (the province's algorithm policy)."""
    if t.crypto == "sm2":
        for member in config["members"]:
            member["allowed_algs"] = ["sm2-sm3"]
    return config


def _directory(t: _Topology, offers: list[str]) -> dict[str, Any]:
    """What a gateway knows of the federation: where the directory is, and its key."""
    return {
        "url": f"{t.url('national')}/v1/directory",
        "keys": [t.jwk("directory")],
        "refresh_s": REFRESH_S,
        "announce_url": f"{t.url('national')}/v1/directory/announce",
        "offers": offers,
    }


# Everything runs on loopback over http: the URLs the directory hands out are allowed
# explicitly (gateway/config/outbound.py refuses them by default).
OUTBOUND = {"allow_http": True, "allow_networks": ["127.0.0.0/8", "::1/128"]}


def _a_config(t: _Topology) -> dict[str, Any]:
    return {
        "gateway": {
            "member_id": A_GATEWAY,
            "key": str(t.workdir / "a-gateway.pem"),
            "public_url": t.url("a-gateway"),
        },
        "store": {"path": str(t.workdir / "a-gateway.db")},
        "delivery": {"poll_interval_s": 0.05, "base_delay_s": 0.1, "max_delay_s": 1},
        "directory": _directory(t, []),
        "outbound": OUTBOUND,
        "members": [
            {
                "id": PORTAL,
                "kind": "system",
                "name": "浙江政务服务网一网通办门户",
                "keys": [t.jwk("a-portal")],
                "services": ["crossregion.apply", "credit.query", "evaluation.submit"],
                "callback_url": f"{t.url('a-portal')}/callbacks",
            },
        ],
        "services": [
            _service("crossregion.apply", "async", 30),
            _service("credit.query", "sync"),
            _service("evaluation.submit", "sync"),
        ],
        # Adapters and routes to the platform and to B come from the directory.
        "adapters": [],
        "routes": [],
    }


def _b_config(t: _Topology) -> dict[str, Any]:
    return {
        "gateway": {
            "member_id": B_GATEWAY,
            "key": str(t.workdir / "b-gateway.pem"),
            "public_url": t.url("b-gateway"),
        },
        "store": {"path": str(t.workdir / "b-gateway.db")},
        "delivery": {"poll_interval_s": 0.05, "base_delay_s": 0.1, "max_delay_s": 1},
        "directory": _directory(t, ["crossregion.apply"]),
        "outbound": OUTBOUND,
        "members": [],  # the platform, and A, come from the directory
        "services": [_service("crossregion.apply", "async", 30)],
        "adapters": [
            {
                "name": "back-office",
                "type": "http",
                "config": {
                    "url": f"{t.url('b-office')}/applications/{{service}}",
                    "verify_response": {"keys": [t.jwk("b-office")]},
                },
            }
        ],
        "routes": [{"service": "crossregion.apply", "adapter": "back-office"}],
    }


def _publisher(t: _Topology) -> Publisher:
    """The national registry: the platform itself and each province's gateway."""
    publisher = Publisher(
        keypair=t.keys["directory"],
        national={
            "member_id": PLATFORM,
            "url": t.url("national"),
            "callback_url": f"{t.url('national')}/api/v1/callbacks/{{service}}",
            "keys": [{"jwk": t.keys["national"].jwk}],
            # The platform relays between the provinces: each is granted explicitly (a
            # gateway never accepts it for its own region, and 100000 is not "all").
            "vouches_for": ["100000", "330000", "440000"],
            "services": [
                {"code": code}
                for code in ("crossregion.apply", "credit.query", "evaluation.submit")
            ],
        },
        refresh_s=REFRESH_S,
    )
    for region, member, name in (("330000", A_GATEWAY, "a-gateway"), ("440000", B_GATEWAY,
                                                                      "b-gateway")):  # fmt: skip
        publisher.register(
            region,
            {
                "member_id": member,
                "url": t.url(name),
                "keys": [{"jwk": t.keys[name].jwk}],
                "vouches_for": [region],
            },
        )
    return publisher


class _Servers:
    """The demo's servers by name, so that one can be restarted (B, after its rotation)."""

    def __init__(self) -> None:
        self.runners: dict[str, web.AppRunner] = {}

    async def start(self, name: str, app: web.Application, port: int) -> None:
        runner = self.runners[name] = web.AppRunner(app, access_log=None)
        # Registered first: cleaned up by aclose even if set-up or the bind fails.
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    async def stop(self, name: str) -> None:
        await self.runners.pop(name).cleanup()

    async def aclose(self) -> None:
        for name in reversed(list(self.runners)):
            await self.stop(name)


def _signing_kid(record: MessageRecord) -> str:
    headers = {k.lower(): v for k, v in record.request_headers.items()}
    try:
        from multidict import CIMultiDict

        return parse_signature_input(CIMultiDict(headers)).keyid
    except Exception:  # a demo print; the record itself is what the test checks
        return "?"


async def run_demo(
    workdir: Path | None = None, *, verbose: bool = True, crypto: Crypto = "ed25519"
) -> DemoReport:
    """Run the three-party scenario; the report says what happened and what is missing."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gw-demo-")))
        return await _run(workdir, verbose, crypto)


async def _run(workdir: Path, verbose: bool, crypto: Crypto) -> DemoReport:
    names = ("a-gateway", "a-admin", "a-portal", "national", "b-gateway", "b-admin", "b-office")
    kind: KeyType = "sm2" if crypto == "sm2" else "ed25519"
    keys = {
        name: write_keypair(
            generate(kind), workdir / f"{name}.pem", jwk_path_for(workdir / f"{name}.pem")
        )
        for name in ("a-gateway", "a-portal", "national", "directory", "b-gateway", "b-office")
    }
    t = _Topology(workdir, keys, {name: free_port() for name in names}, crypto)
    a_conf = parse_config(_policy(_a_config(t), t), base=workdir)

    def trusted(*who: str) -> dict[str, VerificationKey]:
        found = (VerificationKey.from_jwk(keys[w].jwk) for w in who)
        return {k.kid: k for k in found}

    national = NationalPlatform(
        member_id=PLATFORM,
        keypair=keys["national"],
        trusted={},  # the gateways' keys come from the directory it publishes
        callback_base=t.url("a-gateway"),
        callback_delay_s=0.05,
        provinces={"330000": t.url("a-gateway"), "440000": t.url("b-gateway")},
        publisher=_publisher(t),
    )
    portal = Portal(
        member_id=PORTAL,
        keypair=keys["a-portal"],
        gateway_keys=trusted("a-gateway"),
        gateway_url=t.url("a-gateway"),
    )
    office = BackOffice(
        member_id=BACK_OFFICE,
        region="440000",
        keypair=keys["b-office"],
        gateway_keys=trusted("b-gateway"),
    )
    report = DemoReport()
    started = time.monotonic()
    servers = _Servers()
    try:
        await servers.start("national", create_national_app(national), t.ports["national"])
        await servers.start("a-portal", create_portal_app(portal), t.ports["a-portal"])
        await servers.start("b-office", create_backoffice_app(office), t.ports["b-office"])
        b_app = create_app(parse_config(_policy(_b_config(t), t), base=workdir))
        await servers.start("b-gateway", b_app, t.ports["b-gateway"])
        await servers.start("b-admin", create_admin_app(b_app), t.ports["b-admin"])
        a_app = create_app(a_conf)
        await servers.start("a-gateway", a_app, t.ports["a-gateway"])
        await servers.start("a-admin", create_admin_app(a_app), t.ports["a-admin"])
        async with aiohttp.ClientSession() as session:
            client = ExchangeClient(
                member_id=PORTAL,
                signer=Signer(keys["a-portal"]),
                base_url=t.url("a-gateway"),
                session=session,
            )
            a_keys = trusted("a-gateway")
            hops = report.hops

            async def send(service: str) -> Reply:
                sent = time.monotonic()
                reply = await client.exchange(service, _example(service))
                kid = verify_reply(reply, a_keys)
                portal_kid = keys["a-portal"].kid
                checked = (
                    f"A checked the portal's (kid {portal_kid[:8]}…); {reply.status} signed by A"
                )
                hops.append(
                    {
                        "at": sent,
                        "hop": f"{PORTAL} → {A_GATEWAY} ({service})",
                        "checked": f"{checked} (kid {kid[:8]}…), portal checked it",
                    }
                )
                report.replies[service] = reply
                return reply

            async def apply() -> str:
                applied = await send("crossregion.apply")
                message_id: str = applied.json()["message_id"]
                deadline = time.monotonic() + 30
                # The portal is another party: watched as its operator would, by polling.
                while message_id not in portal.processed and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                report.decision = portal.processed.get(message_id)
                if report.decision is None:
                    report.problems.append(f"the decision on {message_id} never reached the portal")
                return message_id

            message_ids = [await apply()]
            await send("credit.query")
            await send("evaluation.submit")
            # B rotates its key mid-demo, as `gateway keys rotate` does, and restarts on it.
            b_conf = parse_config(_policy(_b_config(t), t), base=workdir)
            gw = b_conf.gateway
            assert gw.key_path is not None  # the demo's keys are PEM files
            rotated_at = time.monotonic()
            old, new, _ = rotate_keypair(
                gw.key_path, gw.jwk_path, gw.rotated_keys_path, grace_s=3600
            )
            status = await announce(
                session,
                f"{t.url('national')}/v1/directory/announce",
                old,
                B_GATEWAY,
                announcement_of(b_conf, new),
            )
            hops.append(
                {
                    "at": rotated_at,
                    "hop": f"{B_GATEWAY} rotates its key ({old.kid[:8]}… → {new.kid[:8]}…)",
                    "checked": f"announced, signed with the old key: HTTP {status}",
                }
            )
            report.rotation = await _follow(a_app, new.kid, old.kid, rotated_at)
            if report.rotation is None:
                report.problems.append(f"A did not list B's new key within {2 * REFRESH_S} s")
            await servers.stop("b-admin")
            await servers.stop("b-gateway")
            b_app = create_app(b_conf)
            await servers.start("b-gateway", b_app, t.ports["b-gateway"])
            await servers.start("b-admin", create_admin_app(b_app), t.ports["b-admin"])
            # B's own systems learn its new key as they would: from B's JWKS.
            async with session.get(f"{t.url('b-gateway')}/.well-known/jwks.json") as resp:
                published = [VerificationKey.from_jwk(k) for k in (await resp.json())["keys"]]
            office.gateway_keys = {k.kid: k for k in published}
            message_ids.append(await apply())
            report.new_kid = new.kid
            for trail in (national.trail, office.trail, portal.trail):
                hops.extend(trail)
            hops.sort(key=lambda h: float(h["at"]))
            # The portal has the decision; A records callback_delivered once the portal's
            # 2xx is back, a moment later: wait for that (bounded) before reading the logs.
            await _settled(a_app, message_ids)
            report.logs = {
                A_GATEWAY: list(await a_app[STORE].search_messages(limit=50)),
                B_GATEWAY: list(await b_app[STORE].search_messages(limit=50)),
            }
            _check(report, message_ids)
            if crypto == "sm2":
                _check_sm2(report)
    finally:
        await servers.aclose()
    if verbose:
        _print(report, started)
    return report


async def _settled(app: web.Application, message_ids: list[str], wait_s: float = 10) -> None:
    """Until each application's record at A says callback_delivered, or ``wait_s`` passed."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        records = [await app[STORE].get_message(PORTAL, m) for m in message_ids]
        if all(r is not None and r.state == MessageState.CALLBACK_DELIVERED for r in records):
            return
        await asyncio.sleep(0.02)


async def _follow(
    a_app: web.Application, new_kid: str, old_kid: str, since: float
) -> dict[str, Any] | None:
    """How long A took to list B's new key (next to the old one, for the overlap)."""
    deadline = since + 2 * REFRESH_S + 2.0
    while time.monotonic() < deadline:
        member = a_app[RUNTIME].current.members.get(B_GATEWAY)
        kids = set(member.keys) if member is not None else set()
        if new_kid in kids:
            return {
                "after_s": time.monotonic() - since,
                "kids": sorted(kids),
                "old_kept": old_kid in kids,
            }
        await asyncio.sleep(0.02)
    return None


def _check_sm2(report: DemoReport) -> None:
    """Each request a gateway recorded was signed with sm2-sm3 over an sm3 digest."""
    from multidict import CIMultiDict

    for gateway, records in report.logs.items():
        for r in records:
            headers = CIMultiDict({k.lower(): v for k, v in r.request_headers.items()})
            alg = parse_signature_input(headers).params.get("alg")
            digest = headers.get("content-digest", "")
            if alg != "sm2-sm3" or not digest.startswith("sm3=:"):
                report.problems.append(
                    f"{gateway}: {r.service} from {r.client} signed {alg}, digest {digest[:8]}"
                )


def _check(report: DemoReport, message_ids: list[str]) -> None:
    """Each hop must be on record in each gateway's message log, both applications."""
    a = {r.message_id: r for r in report.logs[A_GATEWAY]}
    b = {r.message_id: r for r in report.logs[B_GATEWAY]}
    for n, message_id in enumerate(message_ids, 1):
        for gateway, log in ((A_GATEWAY, a), (B_GATEWAY, b)):
            record = log.get(message_id)
            if record is None or record.state != MessageState.CALLBACK_DELIVERED:
                found = record.state if record else "no record"
                report.problems.append(
                    f"{gateway}: application {n} expected callback_delivered, found {found}"
                )
    by_service = {(r.service, r.client): r for r in report.logs[A_GATEWAY]}
    for service in ("credit.query", "evaluation.submit"):
        record = by_service.get((service, PORTAL))
        if record is None or record.state != MessageState.ANSWERED:
            report.problems.append(f"A: {service} expected answered")
    last = b.get(message_ids[-1])
    if last is not None and report.new_kid is not None:
        callbacks = [h for h in report.hops if h["hop"] == f"{B_GATEWAY} → national platform"]
        if not any(report.new_kid in str(h["checked"]) for h in callbacks):
            report.problems.append("B's callback after the rotation was not signed by the new key")


def _print(report: DemoReport, started: float) -> None:
    print("跨省通办 demo: a Zhejiang enterprise applies for a service handled in Guangdong\n")
    print(f"{'#':>2} {'t (ms)':>8}  {'hop':<58} signature checked")
    for n, hop in enumerate(report.hops, 1):
        t = (float(hop["at"]) - started) * 1000
        print(f"{n:>2} {t:>8.1f}  {hop['hop']:<58} {hop['checked']}")
    if report.decision:
        print(f"\ndecision: {report.decision['decision']} ({report.decision['case_number']})")
    if report.rotation:
        print(
            f"B's rotation: A listed the new key after {report.rotation['after_s'] * 1000:.0f} ms "
            f"(directory refresh {REFRESH_S:g} s); old key kept for the overlap: "
            f"{report.rotation['old_kept']}"
        )
    print("\nmessage logs:")
    for gateway, records in report.logs.items():
        for r in sorted(records, key=lambda r: r.seq):
            kid = _signing_kid(r)
            print(
                f"  {gateway:<16} {r.service:<20} {r.client:<26} {r.state:<20} "
                f"attempts {r.attempts}  signed by kid {kid[:12]}…"
            )
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print("\nOK: every hop signed, checked and on record" if report.ok else "\nFAILED")


def main(crypto: Crypto = "ed25519") -> int:
    report = asyncio.run(run_demo(crypto=crypto))
    return 0 if report.ok else 1
