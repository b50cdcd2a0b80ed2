"""Following the directory: province A, the national platform and province B on loopback.

Real aiohttp servers for all three, real SQLite files, fresh keys per test. B rotates its
key mid-flow and A follows within ``refresh_s``; bad directories are refused with the
last good one kept; A starts with the national platform down and serves from the store.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.cli import main
from gateway.config.model import Config, jwk_path_for, parse_config
from gateway.crypto.keys import KeyPair, generate, load_keypair, write_keypair
from gateway.encoding import iso_utc
from gateway.exchange.app import DIRECTORY, RUNTIME, create_app
from gateway.exchange.client import ExchangeClient
from gateway.federation.directory import Publisher, sign_directory
from gateway.signing import Signer
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import CREDIT_EXAMPLE, SCHEMAS, unused_port

pytestmark = pytest.mark.integration

A_ID, B_ID, PORTAL_ID = "330000:gateway", "440000:gateway", "330000:one-stop-portal"
PLATFORM_ID = "100000:national-platform"
REFRESH_S = 0.3
# Every party runs on loopback over http: allowed explicitly (gateway/config/outbound.py).
LOOPBACK = {"allow_http": True, "allow_networks": ["127.0.0.0/8", "::1/128"]}
RECORD = {
    "uscc": "91350100M000100Y43",
    "name": "广东模拟企业",
    "status": "active",
    "updated_at": "2026-11-26T00:00:00Z",
}
CREDIT = {
    "code": "credit.query",
    "request_schema": str(SCHEMAS / "credit.query" / "request.json"),
    "response_schema": str(SCHEMAS / "credit.query" / "response.json"),
}


def _pair(d: Path, name: str) -> KeyPair:
    return write_keypair(generate("ed25519"), d / f"{name}.pem", jwk_path_for(d / f"{name}.pem"))


@dataclass
class Federation:
    """Three parties, each a real server on its own loopback port."""

    tmp: Path
    session: aiohttp.ClientSession
    pairs: dict[str, KeyPair] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    servers: dict[str, TestServer] = field(default_factory=dict)
    sim: NationalPlatform | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def jwk(self, name: str) -> str:
        return str(jwk_path_for(self.tmp / f"{name}.pem"))

    def directory_block(self, offers: list[str], url: str | None = None) -> dict[str, Any]:
        return {
            "url": url or f"{self.url('national')}/v1/directory",
            "keys": [self.jwk("directory")],
            "refresh_s": REFRESH_S,
            "announce_url": f"{self.url('national')}/v1/directory/announce",
            "offers": offers,
        }

    def a_config(self, directory_url: str | None = None, refresh_s: float = REFRESH_S) -> Config:
        block = self.directory_block([], directory_url) | {"refresh_s": refresh_s}
        doc = {
            "gateway": {
                "member_id": A_ID,
                "key": str(self.tmp / "a.pem"),
                "public_url": self.url("a"),
            },
            "store": {"path": str(self.tmp / "a.db")},
            "directory": block,
            "outbound": LOOPBACK,
            "members": [
                {
                    "id": PORTAL_ID,
                    "kind": "system",
                    "keys": [self.jwk("portal")],
                    "services": ["credit.query"],
                }
            ],
            "services": [CREDIT],
            "adapters": [],
            "routes": [],
        }
        return parse_config(doc, base=self.tmp)

    def b_config(self) -> Config:
        doc = {
            "gateway": {
                "member_id": B_ID,
                "key": str(self.tmp / "b.pem"),
                "public_url": self.url("b"),
            },
            "store": {"path": str(self.tmp / "b.db")},
            "directory": self.directory_block(["credit.query"]),
            "outbound": LOOPBACK,
            "members": [],
            "services": [CREDIT],
            "adapters": [
                {
                    "name": "registry",
                    "type": "mock",
                    "config": {"responses": {"credit.query": {"body": RECORD}}},
                }
            ],
            "routes": [{"service": "credit.query", "adapter": "registry"}],
        }
        return parse_config(copy.deepcopy(doc), base=self.tmp)

    async def serve(self, name: str, app: web.Application) -> web.Application:
        server = TestServer(app, port=self.ports[name])
        await server.start_server()
        self.servers[name] = server
        return app

    async def stop(self, name: str) -> None:
        await self.servers.pop(name).close()

    async def start_national(self) -> None:
        p = self.pairs
        publisher = Publisher(
            keypair=p["directory"],
            national={
                "member_id": PLATFORM_ID,
                "url": self.url("national"),
                "keys": [{"jwk": p["national"].jwk}],
                "vouches_for": ["100000"],
            },
            refresh_s=REFRESH_S,
        )
        for region, member, name in (("330000", A_ID, "a"), ("440000", B_ID, "b")):
            publisher.register(
                region,
                {
                    "member_id": member,
                    "url": self.url(name),
                    "keys": [{"jwk": p[name].jwk}],
                    "vouches_for": [region],
                },
            )
        self.sim = NationalPlatform(
            member_id=PLATFORM_ID,
            keypair=p["national"],
            trusted={},
            callback_base=self.url("a"),
            publisher=publisher,
        )
        await self.serve("national", create_national_app(self.sim))

    @property
    def publisher(self) -> Publisher:
        assert self.sim is not None
        assert self.sim.publisher is not None
        return self.sim.publisher

    def portal(self) -> ExchangeClient:
        return ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(self.pairs["portal"]),
            base_url=self.url("a"),
            session=self.session,
        )

    async def ask_b(self) -> int:
        reply = await self.portal().exchange(
            "credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": "440000:credit-registry"}
        )
        return reply.status

    async def readyz(self, name: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"{self.url(name)}/readyz") as resp:
            body: dict[str, Any] = await resp.json()
            return resp.status, body

    async def metrics(self, name: str) -> str:
        async with self.session.get(f"{self.url(name)}/metrics") as resp:
            return await resp.text()


@pytest.fixture
async def fed(tmp_path: Path) -> AsyncIterator[Federation]:
    async with aiohttp.ClientSession() as session:
        f = Federation(tmp=tmp_path, session=session)
        for name in ("directory", "national", "a", "b", "portal", "stranger"):
            f.pairs[name] = _pair(tmp_path, name)
        f.ports = {name: unused_port() for name in ("national", "a", "b", "fake")}
        yield f
        for name in list(f.servers):
            await f.stop(name)


def _member_kids(app: web.Application, member: str) -> set[str]:
    found = app[RUNTIME].current.members.get(member)
    return set(found.keys) if found is not None else set()


async def _until(check: Any, timeout_s: float) -> float:
    """Seconds until ``check()`` (sync or async) is true; fails after ``timeout_s``."""
    started = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"not within {timeout_s} s")
        await asyncio.sleep(0.02)


async def test_b_rotates_mid_flow_and_a_follows_within_refresh_s(fed: Federation) -> None:
    await fed.start_national()
    await fed.serve("b", create_app(fed.b_config()))
    a = await fed.serve("a", create_app(fed.a_config()))
    old_kid = fed.pairs["b"].kid
    assert _member_kids(a, B_ID) == {old_kid}  # learnt from the directory, not the file
    assert await fed.ask_b() == 200  # A → B directly, on the directory's route
    status, ready = await fed.readyz("a")
    assert status == 200, ready
    assert ready["directory"]["stale"] is False
    assert "gateway_directory_version" in await fed.metrics("a")

    # B rotates with `gateway keys rotate`, which announces the new key signed with the
    # old one (the command runs its own event loop, so in a thread here).
    b_cfg = fed.b_config()
    config_file = fed.tmp / "b.yaml"
    config_file.write_text(yaml.safe_dump(dict(b_cfg.raw)), encoding="utf-8")
    rotated_at = time.monotonic()
    assert await asyncio.to_thread(main, ["keys", "rotate", "--config", str(config_file)]) == 0
    assert b_cfg.gateway.key_path is not None
    new = load_keypair(b_cfg.gateway.key_path, b_cfg.gateway.jwk_path)
    old = fed.pairs["b"]
    assert fed.sim is not None
    assert fed.sim.announcements[-1] == old.kid  # the rotation was announced by the old key
    # A accepts B's new key within one refresh (plus a scheduling margin on a busy VM),
    # and B's previous key stays valid for the overlap the directory states.
    followed = await _until(lambda: new.kid in _member_kids(a, B_ID), REFRESH_S + 2.0)
    assert _member_kids(a, B_ID) == {new.kid, old.kid}
    await fed.stop("b")
    await fed.serve("b", create_app(b_cfg))  # B now signs with the new key
    assert fed.sim.announcements[-1] == new.kid  # B's start-up announcement, new key
    first_ok = await _until(lambda: _ok(fed), 10.0)
    propagation = time.monotonic() - rotated_at
    print(f"rotation → A follows: {followed:.3f} s; → first accepted request: {propagation:.3f} s")
    assert first_ok <= propagation

    # The national operator revokes B's old key: gone from A within one refresh.
    fed.publisher.update(B_ID, {"keys": [{"jwk": new.jwk}]})
    gone = await _until(lambda: old.kid not in _member_kids(a, B_ID), REFRESH_S + 2.0)
    as_b_old = ExchangeClient(
        member_id=B_ID, signer=Signer(old), base_url=fed.url("a"), session=fed.session
    )
    reply = await as_b_old.exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 401
    assert reply.json()["code"] == "key_unknown"
    assert gone <= REFRESH_S + 2.0


async def _ok(fed: Federation) -> bool:
    return await fed.ask_b() == 200


async def test_a_starts_with_the_national_platform_down_and_serves_from_the_store(
    fed: Federation,
) -> None:
    await fed.start_national()
    await fed.serve("b", create_app(fed.b_config()))
    await fed.serve("a", create_app(fed.a_config()))
    assert await fed.ask_b() == 200
    # An auditor checks the published directory against the pinned key, by its URL.
    url = f"{fed.url('national')}/v1/directory"
    verify = ["directory", "verify", url, "--keys", fed.jwk("directory")]
    assert await asyncio.to_thread(main, verify) == 0
    assert await asyncio.to_thread(main, [*verify[:3], "--keys", fed.jwk("stranger")]) == 1
    await fed.stop("a")
    await fed.stop("national")
    a = await fed.serve("a", create_app(fed.a_config()))  # the national platform is down
    assert fed.pairs["b"].kid in _member_kids(a, B_ID)
    assert await fed.ask_b() == 200
    status, ready = await fed.readyz("a")
    assert status == 200, ready
    assert "unreachable" in ready["directory"]
    assert ready["directory"]["version"] >= 1
    assert 'gateway_directory_updates_total{outcome="unreachable"}' in await fed.metrics("a")


@dataclass
class Hostile:
    """A directory server that serves whatever the test puts in it."""

    jws: str = ""


async def test_bad_directories_are_refused_and_the_last_good_one_kept(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = Hostile()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=hostile.jws, content_type="application/jose")

    app = web.Application()
    app.router.add_get("/v1/directory", serve)
    app.router.add_get("/v1/elsewhere", serve)
    await fed.serve("fake", app)
    p = fed.pairs

    def doc(version: int, *, expires_in: float = 3600, issued_ago: float = 5) -> dict[str, Any]:
        now = time.time()
        return {
            "format": "gw-directory/1",
            "issuer": PLATFORM_ID,
            "version": version,
            "issued_at": iso_utc(now - issued_ago),
            "expires_at": iso_utc(now + expires_in),
            "national": {
                "member_id": PLATFORM_ID,
                "url": fed.url("national"),
                "keys": [{"jwk": p["national"].jwk}],
            },
            "regions": [
                {"region": "440000", "gateway": {
                    "member_id": B_ID, "url": fed.url("b"), "keys": [{"jwk": p["b"].jwk}],
                    "services": [{"code": "credit.query"}]}},
            ],
        }  # fmt: skip

    hostile.jws = sign_directory(p["directory"], doc(2))
    a = await fed.serve("a", create_app(fed.a_config(f"{fed.url('fake')}/v1/directory", 60)))
    follower = a[DIRECTORY]
    assert follower.current is not None
    assert follower.current.version == 2
    good = follower.current.jws

    flipped = list(good)
    flipped[len(good) // 2] = "A" if flipped[len(good) // 2] != "A" else "B"
    cases = [
        ("".join(flipped), "signature"),
        (sign_directory(p["stranger"], doc(3)), "key_unknown"),
        (sign_directory(p["directory"], doc(1)), "rollback"),
        (sign_directory(p["directory"], doc(3, expires_in=-10, issued_ago=100)), "expired"),
    ]
    for jws, reason in cases:
        hostile.jws = jws
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gateway.federation.follower"):
            assert await follower.refresh() == "refused"
        assert follower.current.jws == good, reason  # the last good one is kept
        assert any(f"reason {reason}" in r.getMessage() for r in caplog.records), reason
        status, ready = await fed.readyz("a")
        assert status == 200
        assert ready["directory"]["version"] == 2
        assert ready["directory"]["last_refusal"]["reason"] == reason
        text = await fed.metrics("a")
        assert f'gateway_directory_updates_total{{outcome="refused_{reason}"}} 1.0' in text
        assert "gateway_directory_version 2.0" in text
    assert fed.pairs["b"].kid in _member_kids(a, B_ID)

    # A good one that then expires: still served, reported stale, never as fresh.
    hostile.jws = sign_directory(p["directory"], doc(4, expires_in=2.0))
    assert await follower.refresh() == "applied"
    await asyncio.sleep(2.1)
    status, ready = await fed.readyz("a")
    assert status == 200
    assert ready["directory"]["stale"] is True
    assert any("stale" in w for w in ready["warnings"])
    text = await fed.metrics("a")
    assert "gateway_directory_expires_in_seconds -" in text


# Freshness (issue 20): what time alone changes --------------------------------------------


@dataclass
class Served:
    """A directory server answering 304 to the ETag it served, as the publisher does."""

    jws: str = ""
    etag: str = '"0"'
    raw: bytes | None = None  # served as is when set (a body of any size)
    redirect: str | None = None  # answered with a 302 to this path when set
    hits: int = 0


async def _serve_directory(fed: Federation, served: Served) -> None:
    async def serve(request: web.Request) -> web.StreamResponse:
        served.hits += 1
        if served.redirect is not None and request.path == "/v1/directory":
            raise web.HTTPFound(served.redirect)
        if served.raw is not None:  # streamed: no Content-Length to refuse it by
            resp = web.StreamResponse(headers={"Content-Type": "application/jose"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for start in range(0, len(served.raw), 1000):
                await resp.write(served.raw[start : start + 1000])
            await resp.write_eof()
            return resp
        headers = {"ETag": served.etag}
        if request.headers.get("If-None-Match") == served.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(text=served.jws, content_type="application/jose", headers=headers)

    app = web.Application()
    app.router.add_get("/v1/directory", serve)
    await fed.serve("fake", app)


def _document(
    fed: Federation, version: int, *, expires_in: float, b_keys: list[Any]
) -> dict[str, Any]:
    """A directory for A and B as the national platform would sign it."""
    now = time.time()
    p = fed.pairs
    gateway = {"vouches_for": [], "services": [{"code": "credit.query"}]}
    return {
        "format": "gw-directory/1", "issuer": PLATFORM_ID, "version": version,
        "issued_at": iso_utc(now - 1), "expires_at": iso_utc(now + expires_in),
        "national": {"member_id": PLATFORM_ID, "url": fed.url("national"),
                     "keys": [{"jwk": p["national"].jwk}]},
        "regions": [
            {"region": "330000", "gateway": gateway | {
                "member_id": A_ID, "url": fed.url("a"), "keys": [{"jwk": p["a"].jwk}],
                "vouches_for": ["330000"]}},
            {"region": "440000", "gateway": gateway | {
                "member_id": B_ID, "url": fed.url("b"), "keys": b_keys,
                "vouches_for": ["440000"]}},
        ],
    }  # fmt: skip


def _a_following(fed: Federation, **directory: Any) -> Config:
    doc = dict(fed.a_config(f"{fed.url('fake')}/v1/directory").raw)
    doc["directory"] = {**doc["directory"], **directory}
    # A's own registry answers what is not routed to another region (local traffic).
    doc["adapters"] = [
        {
            "name": "registry",
            "type": "mock",
            "config": {"responses": {"credit.query": {"body": RECORD}}},
        }
    ]
    doc["routes"] = [{"service": "credit.query", "adapter": "registry"}]
    return parse_config(copy.deepcopy(doc), base=fed.tmp)


async def _as_b(fed: Federation, key: str = "b") -> tuple[int, str]:
    client = ExchangeClient(
        member_id=B_ID, signer=Signer(fed.pairs[key]), base_url=fed.url("a"), session=fed.session
    )
    reply = await client.exchange("credit.query", CREDIT_EXAMPLE)
    return reply.status, reply.json().get("code", "") if reply.status != 200 else ""


async def test_a_304_never_extends_a_copy_and_past_max_stale_s_cross_region_is_refused(
    fed: Federation,
) -> None:
    """The server answers 304 past expires_at: the copy is stale, and max_stale_s later
    every cross-region request (in from B, out to B) is 503 directory_stale while the
    reason is on /readyz (still ready); a fresh document lifts it."""
    await fed.start_national()
    await fed.serve("b", create_app(fed.b_config()))
    served = Served()
    b_keys = [{"jwk": fed.pairs["b"].jwk}]
    served.jws = sign_directory(fed.pairs["directory"], _document(fed, 5, expires_in=2.0,
                                                                  b_keys=b_keys))  # fmt: skip
    await _serve_directory(fed, served)
    a = await fed.serve("a", create_app(_a_following(fed, refresh_s=0.2, max_stale_s=1.0)))
    follower = a[DIRECTORY]
    assert await fed.ask_b() == 200
    assert await _as_b(fed) == (200, "")
    hits = served.hits
    await _until(lambda: follower.current is not None and follower.current.expired(time.time()),
                 5.0)  # fmt: skip
    assert await follower.refresh() == "unchanged"  # a 304 …
    assert served.hits > hits
    status, ready = await fed.readyz("a")
    assert ready["directory"]["stale"] is True  # … does not make it fresh
    await _until(lambda: follower.too_stale is not None, 3.0)
    reply = await fed.portal().exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"Gw-Target": "440000:credit-registry"}
    )
    assert (reply.status, reply.json()["code"]) == (503, "directory_stale")
    assert "max_stale_s" in reply.json()["detail"]
    assert await _as_b(fed) == (503, "directory_stale")
    assert (await fed.portal().exchange("credit.query", CREDIT_EXAMPLE)).status == 200  # local
    status, ready = await fed.readyz("a")
    assert status == 200, ready  # local traffic goes on: still in the load balancer
    assert "max_stale_s" in ready["directory"]["cross_region"]
    assert any("cross-region traffic refused" in w for w in ready["warnings"])
    served.jws = sign_directory(fed.pairs["directory"], _document(fed, 6, expires_in=600,
                                                                  b_keys=b_keys))  # fmt: skip
    served.etag = '"1"'
    assert await follower.refresh() == "applied"
    assert await _as_b(fed) == (200, "")
    assert await fed.ask_b() == 200


async def test_a_retired_peer_key_stops_at_valid_until_without_a_refresh(
    fed: Federation,
) -> None:
    """With refresh_s 60, B's retired key is refused from its valid_until on (the
    follower wakes then), no new directory version needed."""
    await fed.start_national()
    served = Served()
    until = float(int(time.time()) + 2)
    b_keys = [{"jwk": fed.pairs["stranger"].jwk},
              {"jwk": fed.pairs["b"].jwk, "valid_until": iso_utc(until)}]  # fmt: skip
    served.jws = sign_directory(fed.pairs["directory"], _document(fed, 3, expires_in=600,
                                                                  b_keys=b_keys))  # fmt: skip
    await _serve_directory(fed, served)
    a = await fed.serve("a", create_app(_a_following(fed, refresh_s=60)))
    assert fed.pairs["b"].kid in _member_kids(a, B_ID)
    await _until(lambda: time.time() >= until + 0.5, 5.0)
    assert fed.pairs["b"].kid not in _member_kids(a, B_ID)
    assert await _as_b(fed) == (401, "key_unknown")
    assert await _as_b(fed, "stranger") != (401, "key_unknown")


async def test_a_directory_body_is_read_bounded_and_a_first_copy_has_a_floor(
    fed: Federation,
) -> None:
    """A body over max_bytes is refused (too_large) unread; a follower with no copy
    refuses a version below min_version (floor) and stays not ready."""
    served = Served(raw=b"x" * 5000)
    await _serve_directory(fed, served)
    a = await fed.serve("a", create_app(_a_following(fed, refresh_s=60, max_bytes=4096)))
    follower = a[DIRECTORY]
    assert follower.refusal is not None
    assert follower.refusal.reason == "too_large"
    served.raw = None
    b_keys = [{"jwk": fed.pairs["b"].jwk}]
    served.jws = sign_directory(fed.pairs["directory"], _document(fed, 3, expires_in=600,
                                                                  b_keys=b_keys))  # fmt: skip
    await fed.stop("a")
    a = await fed.serve("a", create_app(_a_following(fed, refresh_s=60, min_version=4)))
    follower = a[DIRECTORY]
    assert follower.current is None
    assert follower.refusal is not None
    assert follower.refusal.reason == "floor"
    status, ready = await fed.readyz("a")
    assert status == 503
    assert any("min_version" in r for r in ready["reasons"])


async def test_a_redirecting_directory_server_is_not_followed(fed: Federation) -> None:
    """A 302 from the directory URL to a valid document elsewhere is a refused fetch
    (outbound requests go only where configured): nothing is applied, not ready."""
    b_keys = [{"jwk": fed.pairs["b"].jwk}]
    served = Served(redirect="/v1/elsewhere")
    served.jws = sign_directory(fed.pairs["directory"], _document(fed, 3, expires_in=600,
                                                                  b_keys=b_keys))  # fmt: skip
    await _serve_directory(fed, served)
    a = await fed.serve("a", create_app(_a_following(fed, refresh_s=60)))
    follower = a[DIRECTORY]
    assert follower.current is None
    assert follower.refusal is not None
    assert "302" in follower.refusal.detail
    assert served.hits == 1  # the redirect target was never asked
