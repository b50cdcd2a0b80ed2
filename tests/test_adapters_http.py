"""The http adapter against a real upstream on loopback: signing, headers, errors, health."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from adapters.base import AdapterContext, Exchange
from adapters.http import HttpAdapter
from gateway.crypto.keys import KeyPair, VerificationKey
from gateway.errors import SignatureInvalid, UpstreamError, UpstreamTimeout
from gateway.signing import (
    REQUEST_COMPONENTS,
    RequestView,
    Signer,
    Verifier,
    check_content_digest,
    parse_signature_input,
)
from tests.conftest import GATEWAY_ID, PEER_ID, PORTAL_ID, Keys, unused_port

BODY = json.dumps({"uscc": "91350100M000100Y43", "purpose": "审核"}, ensure_ascii=False).encode()
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class Received:
    method: str
    url: str
    headers: CIMultiDict[str]
    body: bytes

    def view(self) -> RequestView:
        return RequestView(self.method, self.url, self.headers)


@dataclass
class Upstream:
    """A small upstream: records what arrives and answers as `mode` says."""

    signer: Signer
    url: str = ""
    mode: str = "signed"
    status: int = 200
    healthy: bool = True
    received: list[Received] = field(default_factory=list)
    redirected: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


UPSTREAM = web.AppKey("upstream", Upstream)


def _answer(up: Upstream, request: web.Request, signer: Signer) -> web.Response:
    body = json.dumps({"credit_rating": "A"}).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "application/json", "Gw-Ticket": "NP-1", "X-Internal": "no"}
    )
    label = parse_signature_input(request.headers).label
    view = RequestView(request.method, str(request.url), request.headers)
    signer.sign_response(up.status, headers, body, view, label)
    if up.mode == "tampered":
        body = json.dumps({"credit_rating": "D"}).encode()
    return web.Response(status=up.status, body=body, headers=headers)


async def _exchange(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    body = await request.read()
    up.received.append(
        Received(request.method, str(request.url), CIMultiDict(request.headers), body)
    )
    if up.mode == "slow":
        await asyncio.wait_for(up.release.wait(), timeout=5)
    if up.mode == "redirect":
        return web.Response(status=307, headers={"Location": "/moved"})
    if up.mode == "unsigned" or up.status >= 300:
        return web.json_response({"credit_rating": "A"}, status=up.status)
    return _answer(up, request, up.signer)


async def _moved(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    body = await request.read()
    up.redirected.append(
        Received(request.method, str(request.url), CIMultiDict(request.headers), body)
    )
    return web.json_response({"credit_rating": "A"})


async def _health(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    return web.json_response({}, status=200 if up.healthy else 503)


@pytest.fixture
async def upstream(keys: Keys) -> AsyncIterator[Upstream]:
    up = Upstream(signer=Signer(keys.pairs["national"]))
    app = web.Application()
    app[UPSTREAM] = up
    app.router.add_post("/api/{service}", _exchange)
    app.router.add_get("/health", _health)
    app.router.add_route("*", "/moved", _moved)
    server = TestServer(app)
    await server.start_server()
    up.url = str(server.make_url("")).rstrip("/")
    yield up
    up.release.set()
    await server.close()


def _adapter(context: AdapterContext, url: str, **config: Any) -> HttpAdapter:
    return HttpAdapter("national", {"url": url, **config}, context)


def _exchange_of(**changes: Any) -> Exchange:
    fields: dict[str, Any] = {
        "service": "credit.query",
        "client": PORTAL_ID,
        "message_id": "6f1c2a8e-3b7d-4c55-9a10-2f3e4d5c6b7a",
        "body": BODY,
        "issue": "ZJ2026-0001",
        "traceparent": TRACEPARENT,
        "timeout_s": 5,
    }
    fields.update(changes)
    return Exchange(**fields)


def _verify(received: Received, key: VerificationKey) -> tuple[str, ...]:
    sig = parse_signature_input(received.headers)
    verified = Verifier().verify(received.view(), sig, key, required=REQUEST_COMPONENTS)
    check_content_digest(received.headers["Content-Digest"], received.body)
    return verified.covered


async def test_request_is_signed_with_the_gateway_key(
    upstream: Upstream, context: AdapterContext, keys: Keys
) -> None:
    """The upstream verifies the request with the gateway's public key; another key fails."""
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}")
    await adapter.send(_exchange_of())
    (received,) = upstream.received
    assert received.body == BODY
    covered = _verify(received, VerificationKey.from_jwk(keys.pairs["gateway"].jwk))
    assert {"gw-client", "gw-message-id", "gw-issue", "gw-via"} <= set(covered)
    impostor = VerificationKey.from_jwk(
        {**keys.pairs["peer"].jwk, "kid": keys.pairs["gateway"].kid}
    )
    with pytest.raises(SignatureInvalid):
        _verify(received, impostor)


async def test_protocol_headers_are_forwarded_with_via(
    upstream: Upstream, context: AdapterContext
) -> None:
    """Gw-Client, Gw-Message-Id, Gw-Issue, traceparent and the rest arrive, plus Gw-Via."""
    adapter = _adapter(
        context, f"{upstream.url}/api/{{service}}", headers={"X-Api-Key": "secret-key"}
    )
    exchange = _exchange_of(
        target=PEER_ID,
        user="zhangsan@zj",
        correlation_id="corr-1",
        headers={"tracestate": "vendor=1"},
    )
    await adapter.send(exchange)
    headers = upstream.received[0].headers
    assert headers["Gw-Client"] == PORTAL_ID
    assert headers["Gw-Message-Id"] == exchange.message_id
    assert headers["Gw-Issue"] == "ZJ2026-0001"
    assert headers["Gw-Target"] == PEER_ID
    assert headers["Gw-User"] == "zhangsan@zj"
    assert headers["Gw-Correlation-Id"] == "corr-1"
    assert headers["traceparent"] == TRACEPARENT
    assert headers["tracestate"] == "vendor=1"
    assert headers["Gw-Via"] == GATEWAY_ID
    assert headers["X-Api-Key"] == "secret-key"
    assert headers["Content-Type"] == "application/json"


async def test_the_relay_chain_is_appended_to_never_overwritten(
    upstream: Upstream, context: AdapterContext, keys: Keys
) -> None:
    """A relayed message's Gw-Via arrives with this gateway appended, oldest first, and the
    signature covers it."""
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}")
    chain = f"{PEER_ID}, 100000:national-platform"
    await adapter.send(_exchange_of(headers={"Gw-Via": chain}))
    (received,) = upstream.received
    assert received.headers["Gw-Via"] == f"{chain}, {GATEWAY_ID}"
    covered = _verify(received, VerificationKey.from_jwk(keys.pairs["gateway"].jwk))
    assert "gw-via" in covered


async def test_absent_optional_headers_are_not_sent(
    upstream: Upstream, context: AdapterContext
) -> None:
    """Headers the exchange does not carry are left out rather than sent empty."""
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}")
    await adapter.send(_exchange_of(issue=None, traceparent=None))
    headers = upstream.received[0].headers
    for name in ("Gw-Issue", "Gw-User", "Gw-Target", "Gw-Correlation-Id", "traceparent"):
        assert name not in headers


async def test_service_is_substituted_into_the_url(
    upstream: Upstream, context: AdapterContext
) -> None:
    """`{service}` in the configured URL is replaced by the exchange's service code."""
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}")
    assert adapter.url_for("crossregion.apply") == f"{upstream.url}/api/crossregion.apply"
    await adapter.send(_exchange_of(service="crossregion.apply"))
    assert upstream.received[0].url == f"{upstream.url}/api/crossregion.apply"


async def test_answer_keeps_status_body_and_only_gw_headers(
    upstream: Upstream, context: AdapterContext
) -> None:
    """The answer carries the upstream's status and body and only its Gw-* headers."""
    upstream.status = 202
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}")
    answer = await adapter.send(_exchange_of())
    assert answer.status == 202
    assert json.loads(answer.body) == {"credit_rating": "A"}
    assert answer.content_type == "application/json"
    assert answer.headers == {"Gw-Ticket": "NP-1"}


async def test_user_is_not_forwarded_when_disabled(
    upstream: Upstream, context: AdapterContext
) -> None:
    """With forward_user false the end user's identity stays inside the gateway."""
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}", forward_user=False)
    await adapter.send(_exchange_of(user="zhangsan@zj"))
    assert "Gw-User" not in upstream.received[0].headers


async def test_user_in_extra_headers_is_not_forwarded_when_disabled(
    upstream: Upstream, context: AdapterContext
) -> None:
    """forward_user false also holds back a Gw-User carried in the exchange's extra headers."""
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}", forward_user=False)
    await adapter.send(_exchange_of(user="zhangsan@zj", headers={"Gw-User": "zhangsan@zj"}))
    assert "Gw-User" not in upstream.received[0].headers


@pytest.mark.parametrize("status", [400, 404, 500, 503])
async def test_non_2xx_answer_is_an_upstream_error(
    status: int, upstream: Upstream, context: AdapterContext
) -> None:
    """Any answer of 300 or more raises UpstreamError naming the status."""
    upstream.status = status
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}")
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(_exchange_of())
    assert caught.value.detail == f"national: upstream answered {status}"
    assert caught.value.status == 502


async def test_redirect_is_an_upstream_error_and_is_not_followed(
    upstream: Upstream, context: AdapterContext
) -> None:
    """A 3xx answer is an UpstreamError; the signed request is not re-sent elsewhere."""
    upstream.mode = "redirect"
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}")
    try:
        with pytest.raises(UpstreamError):
            await adapter.send(_exchange_of(user="zhangsan@zj"))
    finally:
        assert upstream.redirected == []


@pytest.mark.parametrize(("adapter_s", "exchange_s"), [(0.2, 10.0), (30.0, 0.2)])
async def test_slow_upstream_times_out(
    adapter_s: float, exchange_s: float, upstream: Upstream, context: AdapterContext
) -> None:
    """The shorter of the adapter's and the service's timeouts applies: UpstreamTimeout."""
    upstream.mode = "slow"
    adapter = _adapter(context, f"{upstream.url}/api/{{service}}", timeout_s=adapter_s)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout) as caught:
        await adapter.send(_exchange_of(timeout_s=exchange_s))
    assert loop.time() - started < 2
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.status == 504
    assert "0.2 s" in caught.value.detail


async def test_connection_refused_is_an_upstream_error(context: AdapterContext) -> None:
    """Nobody listening on the port gives UpstreamError, not a raw aiohttp exception."""
    adapter = _adapter(context, f"http://127.0.0.1:{unused_port()}/api/{{service}}")
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(_exchange_of())
    assert caught.value.detail.startswith("national: ClientConnector")
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)


def _verifying(context: AdapterContext, upstream: Upstream, ref: Any) -> HttpAdapter:
    return _adapter(context, f"{upstream.url}/api/{{service}}", verify_response={"keys": [ref]})


async def test_correctly_signed_answer_passes_verification(
    upstream: Upstream, context: AdapterContext, keys: Keys, tmp_path: Path
) -> None:
    """An answer signed by a configured key verifies, whether given by path, relative or inline."""
    (tmp_path / "nat.jwk.json").write_text(json.dumps(dict(keys.pairs["national"].jwk)))
    refs: list[Any] = [keys.jwk_file("national"), "nat.jwk.json", dict(keys.pairs["national"].jwk)]
    for ref in refs:
        answer = await _verifying(context, upstream, ref).send(_exchange_of())
        assert answer.status == 200
    assert len(upstream.received) == 3


async def test_unsigned_answer_fails_verification(
    upstream: Upstream, context: AdapterContext, keys: Keys
) -> None:
    """When verify_response is set, an answer without a signature is an UpstreamError."""
    upstream.mode = "unsigned"
    adapter = _verifying(context, upstream, keys.jwk_file("national"))
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(_exchange_of())
    assert "signature" in caught.value.detail


async def test_unsigned_answer_is_accepted_without_verify_response(
    upstream: Upstream, context: AdapterContext
) -> None:
    """Without verify_response the adapter takes an unsigned answer as it is."""
    upstream.mode = "unsigned"
    answer = await _adapter(context, f"{upstream.url}/api/{{service}}").send(_exchange_of())
    assert json.loads(answer.body) == {"credit_rating": "A"}


async def test_answer_signed_by_another_key_fails_verification(
    upstream: Upstream, context: AdapterContext, keys: Keys
) -> None:
    """A signature under the trusted kid made with a different private key is refused."""
    stranger = keys.pairs["stranger"]
    national = keys.pairs["national"]
    upstream.signer = Signer(
        KeyPair(
            kid=national.kid,
            algorithm=stranger.algorithm,
            private=stranger.private,
            jwk=stranger.jwk,
        )
    )
    adapter = _verifying(context, upstream, keys.jwk_file("national"))
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(_exchange_of())
    assert caught.value.detail == (
        "national: the answer's signature: the signature does not verify"
    )
    assert isinstance(caught.value.__cause__, SignatureInvalid)


async def test_answer_signed_by_an_unknown_kid_fails_verification(
    upstream: Upstream, context: AdapterContext, keys: Keys
) -> None:
    """An answer signed by a key not in verify_response is refused, naming the kid."""
    upstream.signer = Signer(keys.pairs["stranger"])
    adapter = _verifying(context, upstream, keys.jwk_file("national"))
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(_exchange_of())
    assert keys.pairs["stranger"].kid in caught.value.detail


async def test_answer_body_swapped_after_signing_fails(
    upstream: Upstream, context: AdapterContext, keys: Keys
) -> None:
    """A body that does not match the signed Content-Digest is refused."""
    upstream.mode = "tampered"
    adapter = _verifying(context, upstream, keys.jwk_file("national"))
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(_exchange_of())
    assert "Content-Digest" in caught.value.detail


async def test_health_without_health_url_is_healthy(context: AdapterContext) -> None:
    """No health_url means the adapter reports healthy without calling anything."""
    health = await _adapter(context, f"http://127.0.0.1:{unused_port()}/x").health()
    assert health.healthy
    assert health.detail == "no health_url configured"


async def test_health_follows_the_health_url(upstream: Upstream, context: AdapterContext) -> None:
    """health() is healthy on 2xx from health_url and unhealthy on 503."""
    adapter = _adapter(
        context, f"{upstream.url}/api/{{service}}", health_url=f"{upstream.url}/health"
    )
    up = await adapter.health()
    assert (up.healthy, up.detail) == (True, "HTTP 200")
    upstream.healthy = False
    down = await adapter.health()
    assert (down.healthy, down.detail) == (False, "HTTP 503")


async def test_health_of_an_unreachable_upstream_is_unhealthy(context: AdapterContext) -> None:
    """A health_url nobody listens on reports unhealthy with the error's name."""
    port = unused_port()
    adapter = _adapter(
        context, f"http://127.0.0.1:{port}/x", health_url=f"http://127.0.0.1:{port}/h"
    )
    health = await adapter.health()
    assert not health.healthy
    assert health.detail.startswith("ClientConnector")


async def test_aclose_leaves_the_shared_session_open(context: AdapterContext) -> None:
    """The session belongs to the core: closing the adapter does not close it."""
    adapter = _adapter(context, "http://127.0.0.1:1/x")
    await adapter.aclose()
    assert not context.session.closed


# HTTPS to a local back office: client certificate, CA or pinned certificate (issue 26) --


@dataclass
class Office:
    """An HTTPS back office that requires a client certificate of its CA."""

    url: str
    server_fingerprint: str
    pki: Path
    presented: list[str] = field(default_factory=list)


@pytest.fixture
async def office(tmp_path: Path) -> AsyncIterator[Office]:
    from gateway.exchange.certs import issue, make_ca
    from gateway.exchange.mtls import fingerprint_of

    pki = tmp_path / "pki"
    make_ca(pki / "ca.crt", pki / "ca.key")
    server = issue(pki / "ca.crt", pki / "ca.key", pki / "server.crt", pki / "server.key",
                   hosts=["127.0.0.1"])  # fmt: skip
    issue(pki / "ca.crt", pki / "ca.key", pki / "gw.crt", pki / "gw.key", member=GATEWAY_ID)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    tls.load_cert_chain(server.cert, server.key)
    tls.verify_mode = ssl.CERT_REQUIRED
    found = Office(url="", server_fingerprint=server.fingerprint, pki=pki)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        ssl_object = request.transport.get_extra_info("ssl_object")
        found.presented.append(fingerprint_of(ssl_object.getpeercert(binary_form=True)))
        return web.json_response({"credit_rating": "A"})

    app = web.Application()
    app.router.add_post("/api/{service}", handle)
    test_server = TestServer(app)
    await test_server.start_server(ssl=tls)
    found.url = f"https://127.0.0.1:{test_server.port}"
    yield found
    await test_server.close()


async def test_https_upstream_gets_the_client_certificate_and_is_checked_against_its_ca(
    office: Office, context: AdapterContext
) -> None:
    """tls.cert/key are presented, tls.ca verifies the office: the exchange goes through."""
    from gateway.exchange.certs import load_ca
    from gateway.exchange.mtls import fingerprint_of

    tls = {"cert": str(office.pki / "gw.crt"), "key": str(office.pki / "gw.key"),
           "ca": str(office.pki / "ca.crt")}  # fmt: skip
    adapter = _adapter(context, f"{office.url}/api/{{service}}", tls=tls)
    answer = await adapter.send(_exchange_of())
    assert answer.status == 200
    gw_cert, _ = load_ca(office.pki / "gw.crt", office.pki / "gw.key")
    from cryptography.hazmat.primitives.serialization import Encoding

    assert office.presented == [fingerprint_of(gw_cert.public_bytes(Encoding.DER))]


async def test_https_upstream_without_our_certificate_or_of_an_untrusted_ca_fails(
    office: Office, context: AdapterContext
) -> None:
    """No client certificate (the office refuses), or the system CAs only (we refuse the
    office): an upstream error, nothing handled."""
    client = {"cert": str(office.pki / "gw.crt"), "key": str(office.pki / "gw.key")}
    for tls in ({"ca": str(office.pki / "ca.crt")}, client):
        adapter = _adapter(context, f"{office.url}/api/{{service}}", tls=tls)
        with pytest.raises(UpstreamError):
            await adapter.send(_exchange_of())
    assert office.presented == []


async def test_a_pinned_upstream_certificate_is_checked_before_anything_is_sent(
    office: Office, context: AdapterContext
) -> None:
    """server_fingerprint equal to the office's: served (no CA needed); another: refused
    after the handshake, before the request, so the office never sees it."""
    client = {"cert": str(office.pki / "gw.crt"), "key": str(office.pki / "gw.key")}
    pinned = _adapter(context, f"{office.url}/api/{{service}}",
                      tls={**client, "server_fingerprint": office.server_fingerprint})  # fmt: skip
    assert (await pinned.send(_exchange_of())).status == 200
    await pinned.aclose()
    wrong = _adapter(context, f"{office.url}/api/{{service}}",
                     tls={**client, "server_fingerprint": "0" * 64})  # fmt: skip
    with pytest.raises(UpstreamError):
        await wrong.send(_exchange_of())
    await wrong.aclose()
    assert len(office.presented) == 1
