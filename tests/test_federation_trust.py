"""The directory's trust rules against a real ``gateway serve`` process (issue 20, parts 2,
4 and 8): province A runs as a subprocess following the national simulator's directory
(in-process, a real aiohttp server with a ``Publisher`` and its state file). The attacker
holds a key of its own, a peer gateway's key, or a captured announcement. One A process
and one national platform are shared by the module; each test uses its own entries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.admin import create_token
from gateway.config.model import jwk_path_for, parse_config
from gateway.crypto.keys import KeyPair, generate, write_keypair
from gateway.encoding import iso_utc
from gateway.exchange.client import ExchangeClient
from gateway.federation.directory import Publisher
from gateway.federation.follower import ANNOUNCE_COVERED
from gateway.signing import Signer
from gateway.store import create_store
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import CREDIT_EXAMPLE, SCHEMAS, unused_port

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

A_ID, B_ID, C_ID = "330000:gateway", "440000:gateway", "460000:gateway"
PORTAL_ID, PLATFORM_ID = "330000:one-stop-portal", "100000:national-platform"
REFRESH_S = 0.2
RECORD = {"uscc": "91350100M000100Y43", "name": "本省企业", "status": "active",
          "updated_at": "2026-11-26T00:00:00Z"}  # fmt: skip
NAMES = ("directory", "national", "a", "b", "b2", "c", "c2", "portal", "stranger")


@dataclass
class World:
    """A as a process; the national platform, and a recorder for URLs nobody should call."""

    tmp: Path
    pairs: dict[str, KeyPair]
    ports: dict[str, int]
    session: aiohttp.ClientSession
    process: subprocess.Popen[bytes] | None = None
    servers: dict[str, TestServer] = field(default_factory=dict)
    sim: NationalPlatform | None = None
    recorded: list[str] = field(default_factory=list)
    token: str = ""

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def jwk(self, name: str) -> str:
        return str(jwk_path_for(self.tmp / f"{name}.pem"))

    @property
    def publisher(self) -> Publisher:
        assert self.sim is not None
        assert self.sim.publisher is not None
        return self.sim.publisher

    def client(self, key: str, member_id: str) -> ExchangeClient:
        return ExchangeClient(
            member_id=member_id,
            signer=Signer(self.pairs[key]),
            base_url=self.url("a"),
            session=self.session,
        )

    async def ask(self, key: str, member_id: str, **headers: str) -> tuple[int, Any]:
        reply = await self.client(key, member_id).exchange(
            "credit.query", CREDIT_EXAMPLE, headers=headers
        )
        return reply.status, reply.json()

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url("a") + path) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if "json" in resp.content_type else text

    async def admin(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.session.request(
            method, self.url("admin") + path, json=body, headers=headers
        ) as resp:
            raw = await resp.read()
            return resp.status, json.loads(raw) if raw else None

    def log(self) -> str:
        return (self.tmp / "a.log").read_text(errors="replace")[-4000:]


def _publisher(w: World) -> Publisher:
    """The national registry as its operator bootstraps it (the state file wins after)."""
    p = w.pairs
    publisher = Publisher(
        keypair=p["directory"],
        national={"member_id": PLATFORM_ID, "url": w.url("national"),
                  "keys": [{"jwk": p["national"].jwk}], "vouches_for": ["100000"]},
        refresh_s=REFRESH_S,
        state_path=w.tmp / "publisher.json",
    )  # fmt: skip
    offers = [{"code": "credit.query"}]
    entries = [
        ("330000", A_ID, "a", w.url("a"), ["330000"]),
        ("440000", B_ID, "b", w.url("recorder"), ["440000"]),
        ("460000", C_ID, "c", w.url("recorder"), ["460000"]),
        # The attacks of part 2: another region's entry naming a local member, with a
        # stranger's key; a city of A's own province, routed to where nobody configured.
        ("450000", PORTAL_ID, "stranger", w.url("recorder"), ["450000"]),
        ("330100", "330100:gateway", "stranger", w.url("recorder"), ["330100"]),
    ]
    for region, member, key, url, vouches in entries:
        keys = [{"jwk": p[key].jwk}]
        publisher.register(region, {"member_id": member, "url": url, "services": offers,
                                    "keys": keys, "vouches_for": vouches})  # fmt: skip
    return publisher


async def _start_national(w: World) -> None:
    w.sim = NationalPlatform(
        member_id=PLATFORM_ID,
        keypair=w.pairs["national"],
        trusted={},
        callback_base=w.url("a"),
        publisher=_publisher(w),
    )
    server = TestServer(create_national_app(w.sim), port=w.ports["national"])
    await server.start_server()
    w.servers["national"] = server


async def _stop(w: World, name: str) -> None:
    await w.servers.pop(name).close()


def _a_config(w: World) -> dict[str, Any]:
    return {
        "gateway": {"member_id": A_ID, "key": str(w.tmp / "a.pem"), "public_url": w.url("a")},
        "listen": {
            "ingress": {"host": "127.0.0.1", "port": w.ports["a"]},
            "admin": {"host": "127.0.0.1", "port": w.ports["admin"]},
        },
        "store": {"path": str(w.tmp / "a.db")},
        # Every party runs on loopback over http: allowed explicitly (gateway/config/outbound.py).
        "outbound": {"allow_http": True, "allow_networks": ["127.0.0.0/8", "::1/128"]},
        "directory": {
            "url": f"{w.url('national')}/v1/directory",
            "keys": [w.jwk("directory")],
            "refresh_s": REFRESH_S,
            "announce_url": f"{w.url('national')}/v1/directory/announce",
            "offers": ["credit.query"],
        },
        "members": [{"id": PORTAL_ID, "kind": "system", "keys": [w.jwk("portal")],
                     "services": ["credit.query"]}],
        "services": [{"code": "credit.query",
                      "request_schema": str(SCHEMAS / "credit.query" / "request.json"),
                      "response_schema": str(SCHEMAS / "credit.query" / "response.json")}],
        "adapters": [{"name": "registry", "type": "mock",
                      "config": {"responses": {"credit.query": {"body": RECORD}}}}],
        "routes": [{"service": "credit.query", "adapter": "registry"}],
    }  # fmt: skip


async def _until(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("trust")
    pairs = {
        n: write_keypair(generate("ed25519"), tmp / f"{n}.pem", jwk_path_for(tmp / f"{n}.pem"))
        for n in NAMES
    }
    ports = {n: unused_port() for n in ("a", "admin", "national", "recorder")}
    async with aiohttp.ClientSession() as session:
        w = World(tmp=tmp, pairs=pairs, ports=ports, session=session)

        async def record(request: web.Request) -> web.Response:
            w.recorded.append(request.path)
            return web.json_response(RECORD)

        recorder = web.Application()
        recorder.router.add_route("*", "/{tail:.*}", record)
        w.servers["recorder"] = TestServer(recorder, port=ports["recorder"])
        await w.servers["recorder"].start_server()
        await _start_national(w)
        config = tmp / "a.yaml"
        config.write_text(yaml.safe_dump(_a_config(w)), encoding="utf-8")
        with (tmp / "a.log").open("ab") as out:
            w.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:

            async def ready() -> bool:
                assert w.process is not None
                assert w.process.poll() is None, w.log()
                with contextlib.suppress(aiohttp.ClientError):
                    return (await w.get("/readyz"))[0] == 200
                return False

            await _until(ready, 30, "A ready")
            store = create_store(parse_config(_a_config(w), base=tmp).store)
            await store.open()
            try:
                w.token = await create_token(store, "trust-admin", "admin")
            finally:
                await store.close()
            yield w
        finally:
            w.process.terminate()
            try:
                w.process.wait(10)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            for name in list(w.servers):
                await _stop(w, name)


# Part 2: the directory redefines local state ---------------------------------------------


async def test_an_entry_naming_a_local_member_leaves_its_keys_alone(world: World) -> None:
    """A 450000 entry whose gateway is 330000:one-stop-portal with a stranger's key: the
    real portal is still 200, the stranger 401; the refusal is logged and counted."""
    status, body = await world.ask("portal", PORTAL_ID)
    assert status == 200, body
    status, body = await world.ask("stranger", PORTAL_ID)
    assert (status, body["code"]) == (401, "key_unknown")
    _, metrics = await world.get("/metrics")
    assert 'gateway_directory_entries_refused_total{reason="foreign_member"}' in metrics
    _, ready = await world.get("/readyz")
    assert any(PORTAL_ID in r for r in ready["directory"]["refused_entries"])
    assert "refused: 330000:one-stop-portal is not in region 450000" in world.log()


async def test_a_sub_region_entry_does_not_take_local_traffic(world: World) -> None:
    """Gw-Target 330100:… (a city of A's province) stays on A's own catch-all route: the
    directory's URL for 330100 is never called."""
    before = len(world.recorded)
    status, body = await world.ask("portal", PORTAL_ID, **{"Gw-Target": "330100:tax-bureau"})
    assert status == 200, body
    assert body == RECORD
    assert len(world.recorded) == before


# Part 8: admin writes freeze directory members -------------------------------------------


async def test_an_operator_patch_does_not_freeze_a_directory_member(world: World) -> None:
    """PATCH {"enabled": true} on 460000:gateway, then the directory revokes its key: the
    revoked key is refused within a few refreshes, the new one accepted."""
    assert (await world.ask("c", C_ID))[0] == 200
    status, body = await world.admin("PATCH", f"/admin/v1/members/{C_ID}", {"enabled": True})
    assert status == 200, body
    world.publisher.update(C_ID, {"keys": [{"jwk": world.pairs["c2"].jwk}]})

    async def revoked() -> bool:
        return (await world.ask("c", C_ID))[0] == 401

    await _until(revoked, 5.0, "the revoked key refused")
    status, body = await world.ask("c2", C_ID)
    assert status == 200, body


# Part 4: announcements --------------------------------------------------------------------


def _signed_announcement(w: World, key: str, keys: list[Any]) -> tuple[bytes, CIMultiDict[str]]:
    """An announcement for B as ``gateway serve`` would post it, signed with ``key``."""
    url = f"{w.url('national')}/v1/directory/announce"
    body = {"member_id": B_ID, "id": str(uuid.uuid4()),
            "issued_at": iso_utc(time.time(), millis=True), "keys": keys,
            "services": [{"code": "credit.query"}]}  # fmt: skip
    data = json.dumps(body).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "application/json", "Gw-Client": B_ID, "Gw-Message-Id": str(uuid.uuid4())}
    )
    Signer(w.pairs[key]).sign_request("POST", url, headers, data, components=ANNOUNCE_COVERED)
    return data, headers


async def _post(w: World, announcement: tuple[bytes, CIMultiDict[str]]) -> int:
    data, headers = announcement
    url = f"{w.url('national')}/v1/directory/announce"
    async with w.session.post(url, data=data, headers=headers) as resp:
        await resp.read()
        return resp.status


async def _b_accepted(w: World, key: str) -> bool:
    return (await w.ask(key, B_ID))[0] == 200


async def test_announcements_are_single_use_and_never_re_key_with_a_retired_key(
    world: World,
) -> None:
    """B rotates b → b2 by announcement. A captured earlier announcement replayed byte for
    byte is refused, also after the publisher restarts; the retired key b cannot re-key
    B; A goes on accepting b2 and never takes the stranger's key for B."""
    w = world
    first = _signed_announcement(w, "b", [{"jwk": w.pairs["b"].jwk}])
    assert await _post(w, first) == 200
    grace = iso_utc(time.time() + 7 * 86400)
    rotation_keys: list[Any] = [
        {"jwk": w.pairs["b2"].jwk},
        {"jwk": w.pairs["b"].jwk, "valid_until": grace},
    ]
    rotation = _signed_announcement(w, "b", rotation_keys)
    assert await _post(w, rotation) == 200
    await _until(lambda: _b_accepted(w, "b2"), 5.0, "A takes b2")

    # The captured first announcement, replayed byte for byte, would undo the rotation.
    assert await _post(w, first) in (401, 409)
    restart = _signed_announcement(w, "b2", [{"jwk": w.pairs["b2"].jwk}, rotation_keys[1]])
    assert await _post(w, restart) == 200  # B restarted on b2 announces itself
    assert await _post(w, restart) == 409  # the same bytes again: seen before
    rekey = _signed_announcement(w, "b", [{"jwk": w.pairs["stranger"].jwk}])
    assert await _post(w, rekey) == 401  # b is retired: it signs exchanges, not announcements
    await asyncio.sleep(REFRESH_S * 4)
    assert await _b_accepted(w, "b2")
    assert (await w.ask("stranger", B_ID))[0] == 401

    # The national platform restarts: its state file remembers what it accepted.
    _, before = await w.get("/readyz")
    await _stop(w, "national")
    await _start_national(w)
    assert await _post(w, restart) == 409
    assert await _post(w, first) in (401, 409)
    assert w.publisher.announcing_keys_of(B_ID) == [w.pairs["b2"].jwk]

    async def newer() -> bool:
        _, ready = await w.get("/readyz")
        return bool(ready["directory"]["version"] > before["directory"]["version"])

    await _until(newer, 5.0, "A follows the restarted publisher's next version")
    assert await _b_accepted(w, "b2")
