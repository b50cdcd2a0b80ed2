"""``gateway demo``: province A, the national platform and province B, end to end, on loopback.

A Zhejiang enterprise applies, through province A's one-stop portal, for a service
handled in Guangdong (跨省通办):

    A portal → A gateway → national platform → B gateway → B back office
    → decision → B gateway → national platform → A gateway → A portal (callback)

then queries public credit information and submits a review (好差评). Every party is a
real aiohttp server with its own freshly generated key; every hop is signed and
checked. The demo prints each hop with its time and the signature checked there, then
reads each gateway's message log, and exits 0 only if every hop is on record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.admin import create_admin_app
from gateway.app import STORE, create_app
from gateway.client import ExchangeClient, Reply, verify_reply
from gateway.config import SCHEMA_DIR, jwk_path_for, parse_config
from gateway.keys import KeyPair, VerificationKey, generate, write_keypair
from gateway.ports import free_port
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

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Topology:
    workdir: Path
    keys: dict[str, KeyPair]
    ports: dict[str, int]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def jwk(self, name: str) -> str:
        return str(jwk_path_for(self.workdir / f"{name}.pem"))


def _a_config(t: _Topology) -> dict[str, Any]:
    return {
        "gateway": {"member_id": A_GATEWAY, "key": str(t.workdir / "a-gateway.pem")},
        "store": {"path": str(t.workdir / "a-gateway.db")},
        "delivery": {"poll_interval_s": 0.05, "base_delay_s": 0.1, "max_delay_s": 1},
        "members": [
            {
                "id": PORTAL,
                "kind": "system",
                "name": "浙江政务服务网一网通办门户",
                "keys": [t.jwk("a-portal")],
                "services": ["crossregion.apply", "credit.query", "evaluation.submit"],
                "callback_url": f"{t.url('a-portal')}/callbacks",
            },
            {
                "id": PLATFORM,
                "kind": "platform",
                "keys": [t.jwk("national")],
                "regions": ["100000"],
            },
        ],
        "services": [
            _service("crossregion.apply", "async", 30),
            _service("credit.query", "sync"),
            _service("evaluation.submit", "sync"),
        ],
        "adapters": [
            {
                "name": "national",
                "type": "national_platform",
                "config": {"base_url": t.url("national"), "platform_keys": [t.jwk("national")]},
            }
        ],
        "routes": [
            {"service": code, "adapter": "national"}
            for code in ("crossregion.apply", "credit.query", "evaluation.submit")
        ],
    }


def _b_config(t: _Topology) -> dict[str, Any]:
    return {
        "gateway": {"member_id": B_GATEWAY, "key": str(t.workdir / "b-gateway.pem")},
        "store": {"path": str(t.workdir / "b-gateway.db")},
        "delivery": {"poll_interval_s": 0.05, "base_delay_s": 0.1, "max_delay_s": 1},
        "members": [
            {
                "id": PLATFORM,
                "kind": "platform",
                "keys": [t.jwk("national")],
                "regions": ["100000"],
                "services": ["crossregion.apply"],
                "callback_url": f"{t.url('national')}/api/v1/callbacks/{{service}}",
            }
        ],
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


@contextlib.asynccontextmanager
async def _running(
    apps: list[tuple[web.Application, int]],
) -> AsyncIterator[None]:
    runners: list[web.AppRunner] = []
    try:
        for app, port in apps:
            runner = web.AppRunner(app, access_log=None)
            runners.append(runner)  # cleaned up even if set-up or the bind fails
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        yield
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _signing_kid(record: MessageRecord) -> str:
    headers = {k.lower(): v for k, v in record.request_headers.items()}
    try:
        from multidict import CIMultiDict

        return parse_signature_input(CIMultiDict(headers)).keyid
    except Exception:  # a demo print; the record itself is what the test checks
        return "?"


async def run_demo(workdir: Path | None = None, *, verbose: bool = True) -> DemoReport:
    """Run the three-party scenario; the report says what happened and what is missing."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gw-demo-")))
        return await _run(workdir, verbose)


async def _run(workdir: Path, verbose: bool) -> DemoReport:
    names = ("a-gateway", "a-admin", "a-portal", "national", "b-gateway", "b-admin", "b-office")
    keys = {
        name: write_keypair(
            generate(), workdir / f"{name}.pem", jwk_path_for(workdir / f"{name}.pem")
        )
        for name in ("a-gateway", "a-portal", "national", "b-gateway", "b-office")
    }
    t = _Topology(workdir, keys, {name: free_port() for name in names})
    a_conf = parse_config(_a_config(t), base=workdir)
    b_conf = parse_config(_b_config(t), base=workdir)

    def trusted(*who: str) -> dict[str, VerificationKey]:
        found = (VerificationKey.from_jwk(keys[w].jwk) for w in who)
        return {k.kid: k for k in found}

    national = NationalPlatform(
        member_id=PLATFORM,
        keypair=keys["national"],
        trusted=trusted("a-gateway", "b-gateway"),
        callback_base=t.url("a-gateway"),
        callback_delay_s=0.05,
        provinces={"330000": t.url("a-gateway"), "440000": t.url("b-gateway")},
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
    a_app, b_app = create_app(a_conf), create_app(b_conf)
    apps = [
        (create_national_app(national), t.ports["national"]),
        (create_portal_app(portal), t.ports["a-portal"]),
        (create_backoffice_app(office), t.ports["b-office"]),
        (a_app, t.ports["a-gateway"]),
        (create_admin_app(a_app), t.ports["a-admin"]),
        (b_app, t.ports["b-gateway"]),
        (create_admin_app(b_app), t.ports["b-admin"]),
    ]
    report = DemoReport()
    started = time.monotonic()
    async with _running(apps), aiohttp.ClientSession() as session:
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
            checked = f"A checked the portal's (kid {portal_kid[:8]}…); {reply.status} signed by A"
            hops.append(
                {
                    "at": sent,
                    "hop": f"{PORTAL} → {A_GATEWAY} ({service})",
                    "checked": f"{checked} (kid {kid[:8]}…), portal checked it",
                }
            )
            report.replies[service] = reply
            return reply

        applied = await send("crossregion.apply")
        message_id = applied.json()["message_id"]
        deadline = time.monotonic() + 30
        # The portal is another party: it is watched as its operator would, by polling.
        while message_id not in portal.processed and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        report.decision = portal.processed.get(message_id)
        if report.decision is None:
            report.problems.append("the decision never reached the portal")
        await send("credit.query")
        await send("evaluation.submit")
        for trail in (national.trail, office.trail, portal.trail):
            hops.extend(trail)
        hops.sort(key=lambda h: float(h["at"]))
        report.logs = {
            A_GATEWAY: list(await a_app[STORE].search_messages(limit=50)),
            B_GATEWAY: list(await b_app[STORE].search_messages(limit=50)),
        }
        _check(report, message_id)
    if verbose:
        _print(report, started)
    return report


def _check(report: DemoReport, message_id: str) -> None:
    """Each hop must be on record in each gateway's message log."""
    a = {(r.service, r.client): r for r in report.logs[A_GATEWAY]}
    b = {(r.service, r.client): r for r in report.logs[B_GATEWAY]}
    expected: Mapping[str, tuple[dict[Any, MessageRecord], tuple[str, str], str]] = {
        "A: the application, answered and called back": (
            a, ("crossregion.apply", PORTAL), MessageState.CALLBACK_DELIVERED),
        "B: the relayed application, decided and called back": (
            b, ("crossregion.apply", PORTAL), MessageState.CALLBACK_DELIVERED),
        "A: the credit query": (a, ("credit.query", PORTAL), MessageState.ANSWERED),
        "A: the evaluation": (a, ("evaluation.submit", PORTAL), MessageState.ANSWERED),
    }  # fmt: skip
    for what, (log, key, state) in expected.items():
        record = log.get(key)
        if record is None or record.state != state:
            found = record.state if record else "no record"
            report.problems.append(f"{what}: expected {state}, found {found}")
    b_record = b.get(("crossregion.apply", PORTAL))
    if b_record is not None and b_record.message_id != message_id:
        report.problems.append("B recorded the application under another message id")


def _print(report: DemoReport, started: float) -> None:
    print("跨省通办 demo: a Zhejiang enterprise applies for a service handled in Guangdong\n")
    print(f"{'#':>2} {'t (ms)':>8}  {'hop':<58} signature checked")
    for n, hop in enumerate(report.hops, 1):
        t = (float(hop["at"]) - started) * 1000
        print(f"{n:>2} {t:>8.1f}  {hop['hop']:<58} {hop['checked']}")
    if report.decision:
        print(f"\ndecision: {report.decision['decision']} ({report.decision['case_number']})")
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


def main() -> int:
    report = asyncio.run(run_demo())
    return 0 if report.ok else 1
