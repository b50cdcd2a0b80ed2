"""The conformance kit (`gateway conformance`) against a real `gateway serve` of the sandbox
config (the shipped config.yaml, keys and ports swapped for the test's), with the national
platform simulated in process and the member's callback endpoint a real server: a
correct one, and one that takes tampered callbacks. The kit runs as a real process, with
the command written in docs/members.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.config.model import jwk_path_for
from gateway.crypto.keys import VerificationKey, generate, write_keypair
from gateway.errors import GatewayError
from gateway.exchange.conformance import CallbackVerifier
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import NATIONAL_ID, PORTAL_ID, ROOT, Keys, unused_port

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

RATE_REFILL_S = 2.5  # the sandbox's burst of 40 at 20/s refills in 2 s


@dataclass
class Sandbox:
    url: str
    tmp: Path
    keys: dict[str, Path]  # key name → its PEM
    good: str  # a callback endpoint that verifies as docs/members.md says
    broken: str  # one that takes anything
    broken_got: list[bytes]


def _sandbox_config(keys: Keys, tmp: Path, ports: dict[str, int], extra: list[str]) -> Any:
    """config.yaml as shipped, with the test's keys, store, ports and absolute paths."""
    doc = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    doc["gateway"]["key"] = str(keys.directory / "gateway.pem")
    # Only what the kit talks to: other listeners and members of the sandbox (their
    # certificates, their keys) are not made here.
    doc["listen"] = {
        "ingress": {"host": "127.0.0.1", "port": ports["gateway"]},
        "admin": {"host": "127.0.0.1", "port": ports["admin"]},
    }
    doc["members"] = [m for m in doc["members"] if m["id"] in (PORTAL_ID, NATIONAL_ID)]
    doc["store"]["path"] = str(tmp / "gateway.db")
    doc["secrets"]["kek"]["file"] = str(tmp / "gateway.kek")
    doc.pop("simulators")
    for member in doc["members"]:
        if member["id"] == PORTAL_ID:
            member["keys"] = [keys.jwk_file("portal"), *extra]
            member["callback_url"] = f"http://127.0.0.1:{ports['receiver']}/callbacks"
        if member["id"] == NATIONAL_ID:
            member["keys"] = [keys.jwk_file("national")]
    national = doc["adapters"][0]
    national["config"]["base_url"] = f"http://127.0.0.1:{ports['national']}"
    national["config"]["platform_keys"] = [keys.jwk_file("national")]
    for service in doc["services"]:
        for key in ("request_schema", "response_schema", "callback_schema"):
            if key in service:
                service[key] = str(ROOT / service[key])
    return doc


class Endpoint:
    """A member's callback endpoint: ``strict`` verifies as docs/members.md says."""

    def __init__(self, public_url: str, keys: dict[str, VerificationKey], *, strict: bool):
        self.public_url = public_url
        self.verifier = CallbackVerifier(keys)
        self.strict = strict
        self.got: list[bytes] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append(body)
        if self.strict:
            try:
                self.verifier.verify(self.public_url, CIMultiDict(request.headers), body)
            except GatewayError as exc:
                return web.json_response({"code": exc.code}, status=401)
        return web.json_response({"ok": True})


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, _tail(log)
            assert time.monotonic() < deadline, f"{url} never became ready"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module", name="s")
async def sandbox(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Sandbox]:
    """One `gateway serve` of the sandbox config, shared by the kit runs of this module."""
    tmp = tmp_path_factory.mktemp("conformance")
    ports = {n: unused_port() for n in ("gateway", "admin", "national", "receiver", "good", "bad")}
    url = f"http://127.0.0.1:{ports['gateway']}"
    sm2 = write_keypair(generate("sm2"), tmp / "sm2.pem", jwk_path_for(tmp / "sm2.pem"))
    assert sm2.algorithm == "sm2-sm3"
    doc = _sandbox_config(
        keys, tmp, ports, [keys.jwk_file("tax"), str(jwk_path_for(tmp / "sm2.pem"))]
    )
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    gateway_keys = keys.verification("gateway")
    national = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted=gateway_keys,
        callback_base=url,
        callback_member="330000:gateway",
        callback_delay_s=0.1,
    )
    public = f"http://127.0.0.1:{ports['receiver']}/callbacks"
    good, bad = (Endpoint(public, gateway_keys, strict=s) for s in (True, False))
    servers = [TestServer(create_national_app(national), port=ports["national"])]
    for endpoint, port in ((good, ports["good"]), (bad, ports["bad"])):
        app = web.Application()
        app.router.add_post("/callbacks", endpoint.handle)
        servers.append(TestServer(app, port=port))
    log = tmp / "gateway.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        for server in servers:
            await server.start_server()
        with log.open("ab") as out:
            command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)]
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        await _ready(url, process, log)
        yield Sandbox(
            url=url,
            tmp=tmp,
            keys={
                "portal": keys.directory / "portal.pem",
                "tax": keys.directory / "tax.pem",
                "sm2": tmp / "sm2.pem",
            },
            good=f"http://127.0.0.1:{ports['good']}/callbacks",
            broken=f"http://127.0.0.1:{ports['bad']}/callbacks",
            broken_got=bad.got,
        )
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for server in servers:
            await server.close()


def _documented_command() -> list[str]:
    """The worked example of docs/members.md, as the member would type it."""
    text = (ROOT / "docs" / "members.md").read_text(encoding="utf-8")
    block = re.search(r"```sh conformance-example\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/members.md lost its worked example"
    return shlex.split(block.group(1).replace("\\\n", " "))


def _adapted(s: Sandbox, callback_url: str, report: Path, *extra: str) -> list[str]:
    """The documented command, pointed at this test's sandbox (its URL, key, endpoint)."""
    words = _documented_command()
    assert words[:2] == ["gateway", "conformance"]
    swap = {"--url": s.url, "--key": str(s.keys["portal"]), "--callback-url": callback_url,
            "--report": str(report)}  # fmt: skip
    args = words[2:]
    for i, word in enumerate(args[:-1]):
        if word in swap:
            args[i + 1] = swap[word]
    assert args[args.index("--client") + 1] == PORTAL_ID
    return [sys.executable, "-m", "gateway.cli", "conformance", *args, *extra]


_RUNS: list[float] = []  # when each kit run of this module ended


async def _run(command: list[str], *, spends: bool = True) -> tuple[int, str]:
    if _RUNS:  # the previous run spent the member's burst: let the bucket refill
        await asyncio.sleep(max(0.0, _RUNS[-1] + RATE_REFILL_S - time.monotonic()))
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    if spends:
        _RUNS.append(time.monotonic())
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_a_key_the_gateway_does_not_know_fails_discovery(s: Sandbox) -> None:
    """A key not registered for the member fails at discovery (401 key_unknown) and exits 1."""
    write_keypair(generate(), s.tmp / "stranger.pem", jwk_path_for(s.tmp / "stranger.pem"))
    report = s.tmp / "stranger.json"
    command = _adapted(s, s.good, report)
    command[command.index(str(s.keys["portal"]))] = str(s.tmp / "stranger.pem")
    code, out = await _run(command, spends=False)  # refused before any rate limit
    assert code == 1, out
    checks = json.loads(report.read_text())["checks"]
    assert [c["id"] for c in checks if c["status"] == "fail"] == ["discovery"]


async def test_the_documented_kit_run_passes_every_check_against_the_sandbox(s: Sandbox) -> None:
    """The docs/members.md command, with an ECDSA and an SM2 key added, passes every check
    (none skipped) against a real `gateway serve` of the sandbox and a correct endpoint."""
    report = s.tmp / "good.json"
    command = _adapted(s, s.good, report, "--key", str(s.keys["tax"]), "--key", str(s.keys["sm2"]))
    code, out = await _run(command)
    assert code == 0, out
    data = json.loads(report.read_text())
    assert data["ok"] is True
    assert data["failed"] == 0
    assert data["skipped"] == 0, out
    ids = {c["id"] for c in data["checks"]}
    assert {
        "gateway.crypto.keys", "discovery", "roundtrip.ed25519", "roundtrip.ecdsa-p256-sha256",
        "roundtrip.sm2-sm3", "digest.sha-512", "digest.sm3", "idempotency", "error.401",
        "error.403", "error.409", "error.422", "error.429", "error.503", "async.callback",
        "callback.tampered", "callback.genuine", "callback.replayed",
    } <= ids  # fmt: skip
    assert all("PROTOCOL.md «" in c["clause"] for c in data["checks"])
    assert re.search(r"^PASS  error\.429 .*Retry-After \d+ s$", out, re.MULTILINE), out


async def test_an_endpoint_that_takes_tampered_callbacks_fails_the_kit(s: Sandbox) -> None:
    """Pointed at an endpoint that answers 200 to anything, the kit fails the tampered and
    the replayed callback checks and exits 1; the tampered body did reach that endpoint."""
    report = s.tmp / "broken.json"
    code, out = await _run(_adapted(s, s.broken, report))
    assert code == 1, out
    checks = {c["id"]: c for c in json.loads(report.read_text())["checks"]}
    assert checks["callback.tampered"]["status"] == "fail"
    assert checks["callback.replayed"]["status"] == "fail"
    assert checks["callback.genuine"]["status"] == "pass"
    assert re.search(r"^FAIL  callback\.tampered ", out, re.MULTILINE), out
    assert any(b"-tampered" in body for body in s.broken_got)
