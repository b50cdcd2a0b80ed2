"""Limits (gateway/exchange/limits.py and their pipeline stages): each answered as problem+json with
its protocol code, on a real gateway on loopback, and nothing past a limit reaches an
adapter."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from gateway.config.model import MemberConfig, RateLimit, SecurityConfig
from gateway.errors import MalformedRequest, RateLimited
from gateway.exchange.client import ExchangeClient, Reply
from gateway.exchange.limits import (
    IN_FLIGHT,
    RateLimiter,
    TokenBucket,
    _without_strings,
    check_json_shape,
    handler_args,
)
from tests.conftest import (
    CREDIT_EXAMPLE,
    PEER_ID,
    PORTAL_ID,
    GatewayTestServer,
    Harness,
    HarnessFactory,
    examples,
)

PROBLEM = "application/problem+json"


# Raw HTTP on a socket: what a hostile client sends, byte for byte ----------------------


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def problem(self) -> dict[str, Any]:
        assert self.headers["Content-Type"] == PROBLEM
        document: dict[str, Any] = json.loads(self.body)
        assert document["status"] == self.status
        assert {"type", "title", "status", "detail", "code"} <= set(document)
        return document


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return RawResponse(status, headers, body)


async def send_raw(h: Harness, data: bytes) -> RawResponse:
    """Send bytes as they are to the gateway's ingress and read one answer."""
    url = URL(h.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()


def request_bytes(path: str = "/v1/exchange/credit.query", *extra: str, body: bytes = b"") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *extra]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def reached_nothing(h: Harness, before: int) -> None:
    assert len(h.national.received) == before, "a request past a limit reached the adapter"


def member_config(member_id: str = PORTAL_ID, rate_limit: RateLimit | None = None) -> MemberConfig:
    return MemberConfig(id=member_id, kind="system", rate_limit=rate_limit)


def relayed(h: Harness) -> ExchangeClient:
    """440000:gateway relaying for one of its region's members (its own bucket)."""
    return h.client("peer", "440000:back-office")


async def relayed_read(h: Harness) -> Reply:
    """A status read relayed by 440000:gateway: charged to the peer's bucket."""
    path = f"/v1/messages/{uuid.uuid4()}"
    return await relayed(h).request("GET", path, headers={"Gw-Via": PEER_ID})


# Token buckets -----------------------------------------------------------------------


def test_token_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    """A full bucket allows `burst` requests at once, then one per 1/rate seconds."""
    bucket = TokenBucket(RateLimit(rate_per_s=2, burst=3), tokens=3.0, stamp=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(100.0) == 0.0  # a long pause saves up at most the burst
    assert bucket.tokens == pytest.approx(2.0)


def test_rate_limiter_uses_the_member_limit_else_the_default_and_says_when_to_retry() -> None:
    """The member's own limit wins; without one the default applies; Retry-After rounds up."""
    now = [0.0]
    limiter = RateLimiter(RateLimit(rate_per_s=0.25, burst=1), clock=lambda: now[0])
    own = member_config(rate_limit=RateLimit(rate_per_s=10, burst=2))
    default = member_config("330000:other")
    limiter.admit(own)
    limiter.admit(own)
    with pytest.raises(RateLimited) as caught:
        limiter.admit(own)
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (
        429,
        "rate_limited",
        1,
    )
    limiter.admit(default)
    with pytest.raises(RateLimited) as caught:
        limiter.admit(default)
    assert caught.value.retry_after == 4
    now[0] = 4.0
    limiter.admit(default)


def test_rate_limiter_without_any_limit_admits_everything() -> None:
    """No default and no member limit: no bucket is kept at all."""
    limiter = RateLimiter(None)
    for _ in range(1000):
        limiter.admit(member_config())
    assert limiter.tracked() == 0
    limiter.admit(member_config(rate_limit=RateLimit(rate_per_s=1, burst=5)))
    assert limiter.tracked() == 1  # the count does see a bucket when one is kept


def test_a_changed_member_limit_takes_effect_at_once() -> None:
    """When an admin changes a member's limit, its bucket follows the new one."""
    limiter = RateLimiter(None, clock=lambda: 0.0)
    limiter.admit(member_config(rate_limit=RateLimit(rate_per_s=1, burst=1)))
    with pytest.raises(RateLimited):
        limiter.admit(member_config(rate_limit=RateLimit(rate_per_s=1, burst=1)))
    limiter.admit(member_config(rate_limit=RateLimit(rate_per_s=1, burst=5)))


async def test_a_member_over_its_rate_gets_429_with_retry_after(
    make_harness: HarnessFactory,
) -> None:
    """Past its burst a member gets a signed 429 rate_limited with Retry-After; others pass."""

    def edit(doc: dict[str, Any]) -> None:
        doc["members"][0]["rate_limit"] = {"rate_per_s": 0.01, "burst": 2}
        doc["security"]["rate_limit"] = {"rate_per_s": 1000, "burst": 1000}

    h = await make_harness(edit)
    portal = h.client("portal")
    assert [(await portal.exchange("credit.query", CREDIT_EXAMPLE)).status for _ in range(2)] == [
        200,
        200,
    ]
    before = len(h.national.received)
    limited = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert limited.status == 429
    assert limited.headers["Content-Type"] == PROBLEM
    assert limited.json()["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert "Signature" in limited.headers
    await reached_nothing(h, before)
    status = await portal.status(str(uuid.uuid4()))
    assert status.status == 429  # every signed request of the member counts
    # The default limit of another member is untouched: a relay's read passes admission
    # (a 440000 client's exchange would go on to the national platform, which takes from
    # this gateway only 330000's clients).
    peer = await relayed_read(h)
    assert (peer.status, peer.json()["code"]) == (404, "message_unknown")


async def test_the_security_default_rate_limits_members_without_their_own(
    make_harness: HarnessFactory,
) -> None:
    """security.rate_limit applies to each member that sets none, bucket by bucket."""

    def edit(doc: dict[str, Any]) -> None:
        doc["security"]["rate_limit"] = {"rate_per_s": 0.01, "burst": 1}

    h = await make_harness(edit)
    portal = h.client("portal")
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 429
    peer = await relayed_read(h)
    assert (peer.status, peer.json()["code"]) == (404, "message_unknown")  # not 429


async def test_a_forged_client_cannot_spend_another_members_tokens(
    make_harness: HarnessFactory,
) -> None:
    """Buckets are charged after the signature verifies, so forgeries cost a member nothing."""

    def edit(doc: dict[str, Any]) -> None:
        doc["members"][0]["rate_limit"] = {"rate_per_s": 0.01, "burst": 1}

    h = await make_harness(edit)
    forger = h.client("stranger", PORTAL_ID)
    for _ in range(5):
        assert (await forger.exchange("credit.query", CREDIT_EXAMPLE)).json()[
            "code"
        ] == "key_unknown"
    assert (await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)).status == 200


# Concurrency ---------------------------------------------------------------------------


async def test_requests_beyond_max_concurrent_get_503_overloaded(
    make_harness: HarnessFactory,
) -> None:
    """With max_concurrent in flight, the next request gets 503 overloaded with Retry-After."""

    def edit(doc: dict[str, Any]) -> None:
        doc["security"]["max_concurrent"] = 1

    h = await make_harness(edit)
    h.national.mode, h.national.delay_s = "slow", 0.5
    portal = h.client("portal")
    first = asyncio.create_task(portal.exchange("credit.query", CREDIT_EXAMPLE))
    gate = h.app[IN_FLIGHT]
    while gate.count == 0:
        await asyncio.sleep(0.01)
    refused = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert refused.status == 503
    assert refused.headers["Content-Type"] == PROBLEM
    assert refused.json()["code"] == "overloaded"
    assert refused.headers["Retry-After"] == "1"
    async with h.gateway.get("/healthz") as health:
        assert health.status == 200  # probes are never refused
    assert (await first).status == 200
    assert gate.count == 0
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 200


# Body size and time ------------------------------------------------------------------


async def test_a_body_over_the_service_limit_is_413_by_length_and_by_chunks(
    harness: Harness,
) -> None:
    """Content-Length over the service's max_body_bytes, or a chunked body over it: 413."""
    big = json.dumps({**CREDIT_EXAMPLE, "padding": "x" * 5000}).encode()
    before = len(harness.national.received)
    declared = await send_raw(harness, request_bytes(body=big))
    assert (declared.status, declared.problem()["code"]) == (413, "payload_too_large")
    chunked = request_bytes("/v1/exchange/credit.query", "Transfer-Encoding: chunked")
    chunked += b"".join(b"%x\r\n%s\r\n" % (len(big[i : i + 1000]), big[i : i + 1000])
                        for i in range(0, len(big), 1000)) + b"0\r\n\r\n"  # fmt: skip
    streamed = await send_raw(harness, chunked)
    assert (streamed.status, streamed.problem()["code"]) == (413, "payload_too_large")
    over_global = await send_raw(
        harness, request_bytes("/v1/exchange/no.such", body=b"x" * 300_000)
    )
    assert (over_global.status, over_global.problem()["code"]) == (413, "payload_too_large")
    await reached_nothing(harness, before)


async def test_a_body_trickled_slower_than_body_timeout_is_cut_off(
    make_harness: HarnessFactory,
) -> None:
    """Headers in, body never finished: 400 malformed_request once body_timeout_s passes."""

    def edit(doc: dict[str, Any]) -> None:
        doc["security"]["body_timeout_s"] = 0.3

    h = await make_harness(edit)
    body = json.dumps(CREDIT_EXAMPLE).encode()
    url = URL(h.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request_bytes(body=body)[: -len(body) + 5])  # headers and 5 bytes
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await asyncio.wait_for(read_response(reader), 5)
        assert 0.25 < loop.time() - started < 3
    finally:
        writer.close()
    problem = answer.problem()
    assert (answer.status, problem["code"]) == (400, "malformed_request")
    assert "did not arrive within 0.3 s" in problem["detail"]


async def test_invalid_chunked_framing_is_400_not_500(harness: Harness) -> None:
    """A chunk size that is not hex is the client's error: 400 malformed_request."""
    data = request_bytes("/v1/exchange/credit.query", "Transfer-Encoding: chunked")
    answer = await send_raw(harness, data + b"zz\r\n{}\r\n0\r\n\r\n")
    assert (answer.status, answer.problem()["code"]) == (400, "malformed_request")


# Headers -------------------------------------------------------------------------------


async def test_too_many_header_fields_get_problem_json(make_harness: HarnessFactory) -> None:
    """More fields than max_header_count: 400 malformed_request as problem+json."""

    def edit(doc: dict[str, Any]) -> None:
        doc["security"]["max_header_count"] = 20

    h = await make_harness(edit)
    answer = await send_raw(h, request_bytes("/v1/exchange/credit.query",
                                             *(f"X-Pad-{i}: 1" for i in range(30))))  # fmt: skip
    problem = answer.problem()
    assert (answer.status, problem["code"]) == (400, "malformed_request")
    assert problem["detail"] == "the request has more than 20 header fields"


async def test_an_overlong_header_field_or_request_line_gets_problem_json(
    harness: Harness,
) -> None:
    """A field or request line past max_header_line_bytes: 400, the bytes never echoed."""
    secret = "110101199003074512"
    field = await send_raw(harness, request_bytes("/v1/exchange/x", f"Gw-User: {secret * 600}"))
    problem = field.problem()
    assert (field.status, problem["code"]) == (400, "malformed_request")
    assert problem["detail"] == "the request line or a header field is longer than 8190 bytes"
    assert secret not in field.body.decode()
    line = await send_raw(harness, request_bytes("/v1/exchange/" + "a" * 9000))
    assert (line.status, line.problem()["code"]) == (400, "malformed_request")


async def test_a_header_section_over_max_header_bytes_is_refused(
    make_harness: HarnessFactory,
) -> None:
    """Fields each under the line limit but over max_header_bytes in total: signed 400."""

    def edit(doc: dict[str, Any]) -> None:
        doc["security"]["max_header_bytes"] = 4096

    h = await make_harness(edit)
    big = {f"X-Pad-{i}": "v" * 1000 for i in range(5)}
    answer = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE, headers=big)
    assert (answer.status, answer.json()["code"]) == (400, "malformed_request")
    assert answer.json()["detail"] == "the header section is larger than 4096 bytes"
    assert answer.headers["Content-Type"] == PROBLEM


async def test_garbage_instead_of_http_gets_problem_json_without_an_echo(
    harness: Harness,
) -> None:
    """Bytes that are not HTTP/1.1 get 400 malformed_request; the garbage is not quoted."""
    answer = await send_raw(harness, b"\x16\x03\x01 NOT-HTTP 330102199003074512\r\n\r\n")
    problem = answer.problem()
    assert (answer.status, problem["code"]) == (400, "malformed_request")
    assert problem["detail"] == "the request is not valid HTTP/1.1"
    assert b"NOT-HTTP" not in answer.body


async def test_an_idle_connection_and_a_header_trickle_are_closed(
    make_harness: HarnessFactory,
) -> None:
    """No request (or headers never finished) within idle_timeout_s: the connection closes."""

    def edit(doc: dict[str, Any]) -> None:
        doc["security"]["idle_timeout_s"] = 0.3

    h = await make_harness(edit)
    url = URL(h.url)
    loop = asyncio.get_running_loop()
    for opening in (b"", b"POST /v1/exchange/credit.query HTTP/1.1\r\nHost: x\r\n"):
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(opening)
            started = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert loop.time() - started < 3
        finally:
            writer.close()


def test_handler_args_carry_the_configured_parser_limits() -> None:
    """The aiohttp parser gets the header limits and the idle timeout from security."""
    security = SecurityConfig(max_header_count=40, max_header_line_bytes=4096, idle_timeout_s=9)
    assert handler_args(security) == {
        "max_headers": 40,
        "max_line_size": 4096,
        "max_field_size": 4096,
        "keepalive_timeout": 9,
    }


# JSON shape ----------------------------------------------------------------------------


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


@pytest.mark.parametrize(
    "body",
    [
        nested(64),
        b'{"a": "' + b"[" * 500 + b'"}',  # brackets inside a string do not nest
        b'{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',
        json.dumps([{"k": i} for i in range(200)]).encode(),  # wide, not deep
        json.dumps(CREDIT_EXAMPLE).encode(),
    ],
)
def test_json_within_the_limits_passes(body: bytes) -> None:
    """Deep to the limit, brackets in strings (escaped quotes too), wide documents: accepted."""
    check_json_shape(body, max_depth=64, max_items=1000)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (nested(65), "nests deeper than 64 levels"),
        (b'{"a":' * 65 + b"1" + b"}" * 65, "nests deeper than 64 levels"),
        (b"[" * 100_000, "nests deeper than 64 levels"),  # refused without being parsed
        (b"[" * 70_000 + b"]" * 70_000, "nests deeper than 64 levels"),
        (b"[" + b"0," * 1000 + b"0]", "more than 1000 members and items"),
        (json.dumps({f"k{i}": i for i in range(1001)}).encode(), "more than 1000 members"),
    ],
)
def test_json_past_the_limits_is_malformed(body: bytes, message: str) -> None:
    """Too deep (objects or arrays) or too many members and items: MalformedRequest."""
    with pytest.raises(MalformedRequest, match=message):
        check_json_shape(body, max_depth=64, max_items=1000)


async def test_deep_json_is_refused_before_validation(harness: Harness) -> None:
    """A signed body nested 65 deep: 400 malformed_request; 64 deep reaches the schema."""
    portal = harness.client("portal")
    before = len(harness.national.received)
    deep = await portal.exchange("credit.query", None, body=nested(65))
    assert (deep.status, deep.json()["code"]) == (400, "malformed_request")
    assert deep.json()["detail"] == "the JSON document nests deeper than 64 levels"
    limit = await portal.exchange("credit.query", None, body=nested(64))
    assert (limit.status, limit.json()["code"]) == (422, "schema_invalid")
    await reached_nothing(harness, before)


async def test_json_item_cap_is_configurable(make_harness: HarnessFactory) -> None:
    """security.max_json_items bounds members plus items of one document: 400 past it."""

    def edit(doc: dict[str, Any]) -> None:
        doc["security"]["max_json_items"] = 50
        doc["security"]["max_json_depth"] = 8

    h = await make_harness(edit)
    portal = h.client("portal")
    wide = await portal.exchange("credit.query", {**CREDIT_EXAMPLE, "x": list(range(60))})
    assert (wide.status, wide.json()["code"]) == (400, "malformed_request")
    deep = await portal.exchange("credit.query", None, body=nested(9))
    assert deep.json()["detail"] == "the JSON document nests deeper than 8 levels"


async def test_deep_json_in_a_callback_is_refused(harness: Harness) -> None:
    """Callbacks get the same shape check before their schema runs."""
    national = harness.client("national")
    answer = await national.request(
        "POST",
        "/v1/callbacks/crossregion.apply",
        None,
        body=nested(100),
        headers={"Gw-Correlation-Id": str(uuid.uuid4())},
    )
    assert (answer.status, answer.json()["code"]) == (400, "malformed_request")


async def test_errors_escaping_any_app_are_problem_json_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Served by GatewayRunner, an app without our middleware still answers problem+json:
    an exception → 500 internal, a timeout → 504 upstream_timeout; details stay in the log."""

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail 110105194912310021")

    async def late(request: web.Request) -> web.Response:
        raise TimeoutError

    app = web.Application()
    app.router.add_get("/boom", boom)
    app.router.add_get("/late", late)
    async with TestClient(GatewayTestServer(app)) as client:
        with caplog.at_level(logging.ERROR):
            async with client.get("/boom") as resp:
                body = await resp.json(content_type=PROBLEM)
                assert (resp.status, body["code"]) == (500, "internal")
                assert "secret" not in json.dumps(body)
        assert "secret detail" in caplog.text
        async with client.get("/late") as resp:
            assert (resp.status, (await resp.json(content_type=PROBLEM))["code"]) == (
                504,
                "upstream_timeout",
            )


JSON_TEXT = st.text(alphabet=st.sampled_from('ab"\\[]{},:/ \n\u00e9\u6a21\U0001f600'), max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_TEXT, inner, max_size=4),
    max_leaves=30,
)


def _plain(value: Any) -> Any:
    """The same structure with every string (keys too) free of JSON delimiters."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {f"k{i}": _plain(v) for i, v in enumerate(value.values())}
    return "s" if isinstance(value, str) else value


def _depth(value: Any) -> int:
    if isinstance(value, list | dict):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((_depth(c) for c in children), default=0)
    return 0


@settings(max_examples=examples(300), deadline=None)
@given(value=JSON_VALUES, ascii_only=st.booleans())
def test_the_byte_scan_sees_exactly_the_structure_outside_strings(
    value: Any, ascii_only: bool
) -> None:
    """Brackets, commas, quotes and backslashes inside strings never change what the scan
    sees: it finds the same brackets and commas as the document with plain strings."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    plain = json.dumps(_plain(value)).encode()
    assert _without_strings(text) == bytes(c for c in plain if c in b"[]{},")
    depth = _depth(value)
    check_json_shape(text, max_depth=max(depth, 1), max_items=10_000)
    if depth > 1:
        with pytest.raises(MalformedRequest, match="nests deeper"):
            check_json_shape(text, max_depth=depth - 1, max_items=10_000)
