"""Outbound requests go only where configured; answers are bound to their request.

The attacks run against real servers on loopback: a member endpoint that redirects, an
upstream that answers with a signature bound to nothing (replaying another request's
answer), a peer URL with a ``?`` in it, names that resolve to loopback. The URL policy
(gateway/config/outbound.py) has its unit tests at the end.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from adapters.base import AdapterContext, Exchange
from adapters.peer import PeerGatewayAdapter
from gateway.config.model import AdapterConfig, parse_config
from gateway.config.outbound import GuardedResolver, OutboundPolicy, join, learnt_session
from gateway.errors import ConfigError, GatewayError, OutboundRefused, UpstreamError
from gateway.exchange.app import STORE
from gateway.exchange.client import ExchangeClient, Reply, verify_reply
from gateway.federation.directory import (
    NATIONAL_ADAPTER,
    Directory,
    DirectoryKey,
    Party,
    Region,
    ServiceOffer,
    directory_layer,
)
from gateway.runtime.registry import build_adapter
from gateway.signing import RequestView, Signer
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import (
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    NATIONAL_ID,
    PEER_ID,
    PORTAL_ID,
    Harness,
    HarnessFactory,
    Keys,
    config_document,
)
from tests.factories import send_application

RECORD = {
    "uscc": "91350100M000100Y43",
    "name": "模拟企业",
    "status": "active",
    "updated_at": "2026-11-26T00:00:00Z",
}


@dataclass
class Spy:
    """A real loopback server that answers as told and records what reached it."""

    server: TestServer
    hits: list[tuple[str, str, bytes]] = field(default_factory=list)

    def url(self, path: str = "") -> str:
        return str(self.server.make_url(path))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Spies = Callable[[Handler | None], Awaitable[Spy]]  # starts a spy answering with the handler


@pytest.fixture
async def spies() -> AsyncIterator[Spies]:
    started: list[TestServer] = []

    async def start(handler: Handler | None = None) -> Spy:
        app = web.Application()
        spy: Spy

        async def record(request: web.Request) -> web.StreamResponse:
            spy.hits.append((request.method, request.path_qs, await request.read()))
            if handler is not None:
                return await handler(request)
            return web.json_response({"ok": True})

        app.router.add_route("*", "/{tail:.*}", record)
        server = TestServer(app)
        started.append(server)
        await server.start_server()
        spy = Spy(server)
        return spy

    yield start
    for server in started:
        await server.close()


async def _dead_callback_error(h: Harness) -> str:
    dead = [d for d in await h.app[STORE].dead_letters() if d.kind == "callback"]
    assert len(dead) == 1
    return dead[0].error or ""


# Callbacks never follow redirects ---------------------------------------------------


async def _redirecting(spies: Spies, redirect: type[web.HTTPMove], path: str) -> tuple[Spy, Spy]:
    """A spy, and a second spy that answers every request with ``redirect`` to ``path``
    on the first: (where it points, the one redirecting)."""
    elsewhere = await spies(None)

    async def answer(request: web.Request) -> web.StreamResponse:
        raise redirect(elsewhere.url(path))

    return elsewhere, await spies(answer)


def _callbacks_to(member: Spy) -> Callable[[dict[str, Any]], None]:
    """The portal's callbacks go to ``member``, two attempts each before a dead letter."""

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 2
        doc["members"][0]["callback_url"] = member.url("/callbacks")

    return edit


async def _until_dead_callback_or(h: Harness, happened: Callable[[], Awaitable[bool]]) -> None:
    """Wait until the callback is a dead letter, or until ``happened`` (what must not)."""

    async def settled() -> bool:
        dead = any(d.kind == "callback" for d in await h.app[STORE].dead_letters())
        return dead or await happened()

    await h.wait_for(settled)


@pytest.mark.integration
async def test_a_307_from_a_member_does_not_repost_the_signed_callback(
    make_harness: HarnessFactory, spies: Spies
) -> None:
    """A member's 307 to a loopback service is a failed attempt: nothing is re-posted there."""
    elsewhere, member = await _redirecting(spies, web.HTTPTemporaryRedirect, "/steal")
    h = await make_harness(_callbacks_to(member))
    await send_application(h)

    async def stolen() -> bool:
        return bool(elsewhere.hits)

    await _until_dead_callback_or(h, stolen)
    assert elsewhere.hits == []
    assert [m for m, _, _ in member.hits] == ["POST", "POST"]  # two attempts, both refused
    error = await _dead_callback_error(h)
    assert "307" in error
    assert elsewhere.url("/steal") in error  # logged with its Location


@pytest.mark.integration
async def test_a_302_to_the_admin_listener_is_not_counted_as_delivered(
    make_harness: HarnessFactory, spies: Spies
) -> None:
    """A 302 to the admin console (which answers 200) leaves the callback undelivered."""
    target: list[str] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(target[0])

    member = await spies(redirect)
    h = await make_harness(_callbacks_to(member))
    target.append(str(h.admin.make_url("/")))
    async with h.admin.session.get(h.admin.make_url("/")) as resp:
        assert resp.status == 200  # what a followed redirect would have taken as success
    message_id = await send_application(h)

    async def delivered() -> bool:
        return await h.state_of(message_id) == "callback_delivered"

    await _until_dead_callback_or(h, delivered)
    assert not await delivered()
    assert "302" in await _dead_callback_error(h)


@pytest.mark.integration
async def test_a_redirecting_upstream_is_an_upstream_error_with_its_location(
    make_harness: HarnessFactory, spies: Spies
) -> None:
    """An adapter's upstream answering 307 is a 502 naming the Location; nothing follows it."""
    elsewhere, upstream = await _redirecting(spies, web.HTTPTemporaryRedirect, "/steal")

    def edit(doc: dict[str, Any]) -> None:
        doc["adapters"][0]["config"]["url"] = upstream.url("/api/exchange/{service}")

    h = await make_harness(edit)
    reply = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 502
    assert reply.json()["code"] == "upstream_error"
    assert "307" in reply.json()["detail"]
    assert elsewhere.hits == []


async def test_a_redirecting_health_check_is_unhealthy(keys: Keys, spies: Spies) -> None:
    """A health URL answering 302 reports the 302 and is not followed."""
    elsewhere, upstream = await _redirecting(spies, web.HTTPFound, "/health")
    async with aiohttp.ClientSession() as session:
        context = AdapterContext(
            member_id=GATEWAY_ID, signer=Signer(keys.pairs["gateway"]), session=session
        )
        cfg = _peer_config(upstream.url("/b"), keys)
        health = await build_adapter(cfg, context).health()
    assert (health.healthy, health.detail) == (False, "HTTP 302")
    assert elsewhere.hits == []


# Answers are bound to their request ------------------------------------------------


def _replaying(keys: Keys, *, envelope: bool, bind_message_id: bool = False) -> Handler:
    """A platform with the real key that signs only @status, content-digest, content-type,
    and answers every request with the answer it gave the first one."""
    captured: list[tuple[bytes, CIMultiDict[str]]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not captured:
            data: Any = {"code": "0", "message": "ok", "data": RECORD} if envelope else RECORD
            body = json.dumps(data).encode()
            headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
            if bind_message_id:
                headers["Gw-Message-Id"] = request.headers["Gw-Message-Id"]
            view = RequestView(request.method, str(request.url), request.headers)
            Signer(keys.pairs["national"]).sign_response(200, headers, body, view, None)
            captured.append((body, headers))
        body, headers = captured[0]
        return web.Response(body=body, headers=headers)

    return answer


def _national_adapter(url: str, keys: Keys) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["adapters"] = [
            {
                "name": "national",
                "type": "national_platform",
                "config": {"base_url": url, "platform_keys": [keys.jwk_file("national")]},
            }
        ]

    return edit


@pytest.mark.integration
@pytest.mark.parametrize("adapter_type", ["national_platform", "http"])
async def test_an_answer_signed_for_another_request_is_refused(
    make_harness: HarnessFactory,
    spies: Spies,
    keys: Keys,
    adapter_type: str,
) -> None:
    """The platform's answer to request X, signed over @status and the body only, is not
    accepted as the answer to request Y: 502 upstream_unbound (both bindable adapters)."""
    national = adapter_type == "national_platform"
    platform = await spies(_replaying(keys, envelope=national))

    def edit(doc: dict[str, Any]) -> None:
        if national:
            _national_adapter(platform.url("").rstrip("/"), keys)(doc)
        else:
            doc["adapters"][0]["config"]["url"] = platform.url("/api/exchange/{service}")

    h = await make_harness(edit)
    replies = [await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE) for _ in range(2)]
    for reply in replies:
        assert reply.status == 502, reply.body
        assert reply.json()["code"] == "upstream_unbound"
    assert len(platform.hits) == 2


@pytest.mark.integration
async def test_an_answer_bound_by_its_message_id_is_accepted_once(
    make_harness: HarnessFactory,
    spies: Spies,
    keys: Keys,
) -> None:
    """An answer covering gw-message-id binds to that message: accepted for it, refused
    when replayed as the answer to another message."""
    platform = await spies(_replaying(keys, envelope=True, bind_message_id=True))
    h = await make_harness(_national_adapter(platform.url("").rstrip("/"), keys))
    first = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert first.status == 200, first.body
    assert first.json()["uscc"] == RECORD["uscc"]
    second = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert second.status == 502
    assert second.json()["code"] == "upstream_unbound"


async def test_the_national_simulator_binds_its_answers(harness: Harness) -> None:
    """The bundled simulator's answers pass the binding rule (the demo keeps working)."""
    reply = await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200, reply.body
    assert harness.national.received == [reply.headers["Gw-Message-Id"]]


# URLs are joined, not concatenated ---------------------------------------------------


def _peer_config(url: str, keys: Keys) -> AdapterConfig:
    return AdapterConfig(
        name="guangdong",
        type="peer_gateway",
        config={"url": url, "peer_id": PEER_ID, "peer_keys": [keys.jwk_file("peer")]},
    )


def _exchange() -> Exchange:
    return Exchange(
        service="credit.query",
        client=PORTAL_ID,
        message_id="6f1c2c1e-4b8a-4f7e-9a51-0c6d2b1e7a10",
        body=json.dumps(CREDIT_EXAMPLE).encode(),
    )


@pytest.mark.parametrize("suffix", ["/gw?x=", "/gw#", "/gw?"])
async def test_a_query_or_fragment_in_a_peer_url_is_refused(
    keys: Keys, spies: Spies, suffix: str
) -> None:
    """A peer URL with ``?`` or ``#`` is refused as config, so no request path can move
    into its query (string concatenation posted to ``/gw`` instead)."""
    peer = await spies(None)
    async with aiohttp.ClientSession() as session:
        context = AdapterContext(
            member_id=GATEWAY_ID, signer=Signer(keys.pairs["gateway"]), session=session
        )
        cfg = _peer_config(peer.url("").rstrip("/") + suffix, keys)
        with pytest.raises(ConfigError, match="url"):
            build_adapter(cfg, context)
    with pytest.raises(ValueError, match="query or a fragment"):
        join(peer.url("").rstrip("/") + suffix, "v1", "exchange")
    assert peer.hits == []


async def test_a_peer_url_with_a_path_keeps_it(keys: Keys, spies: Spies) -> None:
    """A peer base URL's path stays in front of the joined ``/v1/exchange/{service}``."""
    peer = await spies(None)
    async with aiohttp.ClientSession() as session:
        context = AdapterContext(
            member_id=GATEWAY_ID, signer=Signer(keys.pairs["gateway"]), session=session
        )
        adapter = build_adapter(_peer_config(peer.url("/province/b/"), keys), context)
        assert isinstance(adapter, PeerGatewayAdapter)
        with pytest.raises(UpstreamError):  # the spy does not sign: refused, but it was hit
            await adapter.send(_exchange())
    assert [p for _, p, _ in peer.hits] == ["/province/b/v1/exchange/credit.query"]


# Learnt URLs: checked when learnt and at connect time -----------------------------------


class FixedResolver(AbstractResolver):
    """DNS as a test needs it: every name resolves to ``address`` (a rebinding server)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            ResolveResult(
                hostname=host, host=self.address, port=port, family=socket.AF_INET,
                proto=0, flags=socket.AI_NUMERICHOST,
            )
        ]  # fmt: skip

    async def close(self) -> None:
        return None


async def _send_learnt(
    keys: Keys, policy: OutboundPolicy, url: str, resolver: AbstractResolver
) -> None:
    guarded_session = learnt_session(policy, resolver=resolver)
    async with guarded_session as guarded, aiohttp.ClientSession() as plain:
        context = AdapterContext(
            member_id=GATEWAY_ID,
            signer=Signer(keys.pairs["gateway"]),
            session=plain,
            learnt_session=guarded,
        )
        cfg = dataclasses.replace(_peer_config(url, keys), learnt=True)
        await build_adapter(cfg, context).send(_exchange())


async def test_a_learnt_name_that_resolves_to_loopback_is_never_connected_to(
    keys: Keys, spies: Spies
) -> None:
    """DNS rebinding: a learnt peer whose name resolves to 127.0.0.1 is refused at connect
    time, although the name itself passed the policy; nothing reaches the server."""
    peer = await spies(None)
    port = peer.server.port
    resolver = FixedResolver("127.0.0.1")
    with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1"):
        await _send_learnt(
            keys, OutboundPolicy(allow_http=True), f"http://peer.example:{port}", resolver
        )
    assert resolver.asked == ["peer.example"]
    assert peer.hits == []


async def test_a_learnt_name_in_an_allowed_network_is_connected_to(
    keys: Keys, spies: Spies
) -> None:
    """With loopback allowed by config, the same learnt name reaches the server."""
    peer = await spies(None)
    url = f"http://peer.example:{peer.server.port}"
    with pytest.raises(UpstreamError, match="signature"):  # the spy signs nothing
        await _send_learnt(keys, OutboundPolicy.loopback(), url, FixedResolver("127.0.0.1"))
    assert [p for _, p, _ in peer.hits] == ["/v1/exchange/credit.query"]


async def test_the_guarded_session_checks_literal_addresses_too(keys: Keys, spies: Spies) -> None:
    """A literal 127.0.0.1 skips DNS; the guarded session's own check still refuses it."""
    peer = await spies(None)
    with pytest.raises(OutboundRefused, match="not a public address"):
        await _send_learnt(
            keys,
            OutboundPolicy(allow_http=True),
            peer.url("").rstrip("/"),
            FixedResolver("8.8.8.8"),
        )
    assert peer.hits == []


async def test_a_learnt_adapter_without_the_guarded_session_is_not_built(keys: Keys) -> None:
    """A learnt adapter is never built on the unguarded session."""
    async with aiohttp.ClientSession() as plain:
        context = AdapterContext(
            member_id=GATEWAY_ID, signer=Signer(keys.pairs["gateway"]), session=plain
        )
        cfg = dataclasses.replace(_peer_config("https://peer.example", keys), learnt=True)
        with pytest.raises(ConfigError, match="guarded session"):
            build_adapter(cfg, context)


@pytest.mark.integration
async def test_a_learnt_callback_url_on_loopback_is_refused_by_delivery(
    make_harness: HarnessFactory, spies: Spies
) -> None:
    """A member whose callback URL was learnt (no outbound allowance) never gets a
    callback posted to loopback: the attempts fail with the policy's reason."""
    member = await spies(None)

    def edit(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 2
        doc["members"][0]["callback_url"] = member.url("/callbacks")
        doc["members"][0]["learnt"] = True

    h = await make_harness(edit)
    await send_application(h)

    async def dead() -> bool:
        return any(d.kind == "callback" for d in await h.app[STORE].dead_letters())

    await h.wait_for(dead)
    assert member.hits == []
    assert "is refused: only https" in await _dead_callback_error(h)


def _party(member_id: str, url: str, keys: Keys, name: str) -> Party:
    return Party(
        member_id=member_id,
        url=url,
        keys=(DirectoryKey(jwk=keys.pairs[name].jwk),),
        services=(ServiceOffer(code="credit.query"),),
    )


def _directory(keys: Keys, national_url: str, peer_url: str) -> Directory:
    return Directory(
        issuer="100000:national-platform",
        version=1,
        issued_at=0.0,
        expires_at=1e12,
        national=_party("100000:national-platform", national_url, keys, "national"),
        regions=(Region(region="440000", gateway=_party(PEER_ID, peer_url, keys, "peer")),),
        jws="",
        kid="k",
    )


def _layer(d: Directory, policy: OutboundPolicy) -> dict[tuple[str, str], Any]:
    changes = directory_layer(
        d, own=GATEWAY_ID, services=["credit.query"], now=1.0, outbound=policy
    )
    return {(kind, rid): body for kind, rid, body in changes}


def test_the_directory_layer_leaves_out_parties_the_policy_refuses(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """By default, http and loopback URLs from the directory make no member, adapter or
    route; each refused entry is logged with its reason."""
    d = _directory(keys, "http://127.0.0.1:9000", "https://10.1.2.3")
    with caplog.at_level(logging.WARNING, logger="gateway.federation.directory"):
        layer = _layer(d, OutboundPolicy())
    assert layer == {}
    refused = [r for r in caplog.records if getattr(r, "event", "") == "directory_entry_refused"]
    assert sorted(getattr(r, "member", "") for r in refused) == [
        "100000:national-platform",
        PEER_ID,
    ]


def test_the_directory_layer_marks_what_it_learnt(keys: Keys) -> None:
    """Parties whose URLs pass the policy come in marked ``learnt``, with their routes."""
    d = _directory(keys, "https://np.example.cn", "https://gd.example.cn/gateway")
    layer = _layer(d, OutboundPolicy())
    assert layer[("members", PEER_ID)]["learnt"] is True
    assert layer[("members", "100000:national-platform")]["learnt"] is True
    assert layer[("adapters", "directory-440000")]["learnt"] is True
    assert layer[("adapters", NATIONAL_ADAPTER)]["learnt"] is True
    assert layer[("routes", "credit.query|440000:*")]["adapter"] == "directory-440000"


def test_a_refused_national_platform_takes_its_routes_along(keys: Keys) -> None:
    """A national URL the policy refuses leaves no route pointing at a missing adapter."""
    d = _directory(keys, "http://np.example.cn", "https://gd.example.cn")
    layer = _layer(d, OutboundPolicy())
    assert ("adapters", NATIONAL_ADAPTER) not in layer
    assert all(b["adapter"] != NATIONAL_ADAPTER for (k, _), b in layer.items() if k == "routes")
    assert ("members", PEER_ID) in layer


# The policy itself -----------------------------------------------------------------------

REFUSED_HOSTS = [
    "127.0.0.1",  # loopback
    "127.8.9.10",
    "[::1]",
    "10.0.0.1",  # private
    "172.16.5.4",
    "192.168.1.1",
    "[fc00::1]",
    "[fd12:3456::1]",
    "169.254.169.254",  # link-local (cloud metadata)
    "[fe80::1]",
    "100.64.0.1",  # shared (carrier-grade NAT)
    "0.0.0.0",  # unspecified
    "[::]",
    "224.0.0.1",  # multicast
    "[ff02::1]",
    "192.0.2.1",  # documentation
    "255.255.255.255",
    "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
    "[::ffff:10.0.0.1]",
    "[::ffff:169.254.169.254]",
    "[2002:7f00:1::]",  # 6to4 around 127.0.0.1
    "[64:ff9b::a00:1]",  # NAT64 around 10.0.0.1
]


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_non_public_addresses_are_refused(host: str) -> None:
    """Loopback, private, link-local, shared, reserved, multicast (v4, v6, mapped) are refused."""
    with pytest.raises(OutboundRefused, match="not a public address"):
        OutboundPolicy().check_url(f"https://{host}/v1")


@pytest.mark.parametrize(
    "url",
    ["https://8.8.8.8/", "https://[2001:4860:4860::8888]/", "https://[::ffff:8.8.8.8]/",
     "https://gateway.gd.gov.cn/v1", "https://gateway.gd.gov.cn:8443"],
)  # fmt: skip
def test_public_https_urls_pass(url: str) -> None:
    """Public addresses and names over https pass the default policy."""
    assert str(OutboundPolicy().check_url(url)).startswith("https://")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://gateway.gd.gov.cn", "only https"),
        ("ftp://gateway.gd.gov.cn", "only https"),
        ("https://user:pw@gateway.gd.gov.cn", "user information"),
        ("https://gateway.gd.gov.cn/gw?x=", "query or a fragment"),
        ("https://gateway.gd.gov.cn/gw?", "query or a fragment"),
        ("https://gateway.gd.gov.cn/gw#", "query or a fragment"),
        ("https:///nohost", "no host"),
    ],
)
def test_urls_breaking_the_rules_are_refused(url: str, reason: str) -> None:
    """Scheme, user info, query, fragment, host: each rule refuses with its reason."""
    with pytest.raises(OutboundRefused, match=reason):
        OutboundPolicy().check_url(url)


def test_allowed_networks_and_http_are_explicit() -> None:
    """``allow_http`` and ``allow_networks`` allow exactly what they name."""
    policy = OutboundPolicy(allow_http=True, allow_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    assert policy.check_url("http://127.0.0.1:8080/v1").port == 8080
    assert policy.check_url("http://[::ffff:127.0.0.1]/").host == "::ffff:7f00:1"
    with pytest.raises(OutboundRefused):
        policy.check_url("http://[::1]/")  # only the network named
    with pytest.raises(OutboundRefused):
        policy.check_url("http://10.0.0.1/")
    assert OutboundPolicy.loopback().check_url("http://[::1]:1/").port == 1


async def test_the_resolver_keeps_only_allowed_addresses() -> None:
    """A name resolving to a private and a public address connects only to the public one;
    one resolving only to private addresses is refused."""

    class Two(AbstractResolver):
        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            return [
                ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET,
                              proto=0, flags=0)
                for a in ("10.0.0.7", "93.184.216.34")
            ]  # fmt: skip

        async def close(self) -> None:
            return None

    guarded = GuardedResolver(OutboundPolicy(), Two())
    assert [r["host"] for r in await guarded.resolve("mixed.example", 443)] == ["93.184.216.34"]
    with pytest.raises(OutboundRefused, match=r"10\.0\.0\.1"):
        await GuardedResolver(OutboundPolicy(), FixedResolver("10.0.0.1")).resolve("x.example")


def test_outbound_config_is_parsed_and_validated(keys: Keys, tmp_path: Any) -> None:
    """The ``outbound`` block becomes the policy; a bad network is a config problem."""
    doc = config_document(keys, store=tmp_path / "g.db", national_url="http://127.0.0.1:9")
    assert parse_config(copy.deepcopy(doc), base=tmp_path).outbound == OutboundPolicy()
    doc["outbound"] = {"allow_http": True, "allow_networks": ["127.0.0.0/8", "::1/128"]}
    assert parse_config(copy.deepcopy(doc), base=tmp_path).outbound == OutboundPolicy.loopback()
    doc["outbound"] = {"allow_networks": ["not-a-net"]}
    with pytest.raises(ConfigError, match="/outbound/allow_networks"):
        parse_config(copy.deepcopy(doc), base=tmp_path)


# The member-side client (gateway/exchange/client.py) ----------------------------------------------


def _portal_client(keys: Keys, base_url: str, session: aiohttp.ClientSession) -> ExchangeClient:
    return ExchangeClient(
        member_id=PORTAL_ID, signer=Signer(keys.pairs["portal"]), base_url=base_url, session=session
    )


async def test_the_exchange_client_joins_paths_and_keeps_queries(keys: Keys, spies: Spies) -> None:
    """A base URL's path stays in front; a query in the path stays a query."""
    server = await spies(None)
    async with aiohttp.ClientSession() as session:
        client = _portal_client(keys, server.url("/gw/"), session)
        assert client.url_for("/v1/messages/abc") == server.url("/gw/v1/messages/abc")
        await client.request("GET", "/v1/monitoring/records?service=credit.query")
    assert [p for _, p, _ in server.hits] == ["/gw/v1/monitoring/records?service=credit.query"]


async def test_the_exchange_client_does_not_follow_redirects(keys: Keys, spies: Spies) -> None:
    """A gateway answering 307 gets the 307 back; the signed request goes nowhere else."""
    elsewhere, gateway = await _redirecting(spies, web.HTTPTemporaryRedirect, "/steal")
    async with aiohttp.ClientSession() as session:
        client = _portal_client(keys, gateway.url(""), session)
        reply = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 307
    assert elsewhere.hits == []


async def test_verify_reply_requires_the_binding(harness: Harness) -> None:
    """The gateway's replies pass verify_reply; the same reply taken for another request
    (a replay) does not."""
    gateway_keys = harness.keys.verification("gateway")
    client = harness.client("portal")
    first = await client.exchange("credit.query", CREDIT_EXAMPLE)
    second = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert verify_reply(first, gateway_keys) == harness.keys.pairs["gateway"].kid
    swapped = Reply(first.status, first.headers, first.body, second.request)
    with pytest.raises(GatewayError):
        verify_reply(swapped, gateway_keys)


async def test_the_simulator_does_not_follow_a_redirecting_gateway(
    keys: Keys, spies: Spies
) -> None:
    """The national simulator's callback to a gateway answering 307 is not re-posted."""
    elsewhere = await spies(None)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(elsewhere.url("/steal"))

    gateway = await spies(redirect)
    sim = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted=keys.verification("gateway"),
        callback_base=gateway.url("/gw"),
        callback_delay_s=0,
    )
    server = TestServer(create_national_app(sim))
    await server.start_server()
    try:
        client = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(keys.pairs["gateway"]),
            base_url=str(server.make_url("")),
            session=aiohttp.ClientSession(),
        )
        async with client.session:
            reply = await client.request("POST", "/api/exchange/supervision.report", {"r": 1})
            assert reply.status == 202, reply.body

            for _ in range(100):
                if gateway.hits:
                    break
                await asyncio.sleep(0.02)
    finally:
        await server.close()
    assert [p for _, p, _ in gateway.hits][:1] == ["/gw/v1/callbacks/supervision.report"]
    assert elsewhere.hits == []
