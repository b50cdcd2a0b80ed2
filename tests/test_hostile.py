"""Hostile-input battery (issue 6 item 7): each hostile request against a real gateway gets
its protocol status and code as problem+json, leaks nothing, and reaches neither the
adapter nor the store."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.exchange.app import STORE
from gateway.signing import content_digest
from tests.conftest import CREDIT_EXAMPLE, NATIONAL_ID, PORTAL_ID, Harness, HarnessFactory
from tests.test_errors import Req, _add, _body, _set, _without, hand_signed, signed
from tests.test_limits import RawResponse, request_bytes, send_raw

PROBLEM = "application/problem+json"
PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}
LEAKS = ("Traceback", 'File "', "BEGIN", "PRIVATE KEY", '"d":', "sqlite", "/work/")
BODY = json.dumps(CREDIT_EXAMPLE).encode()


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are on a socket (what aiohttp's client refuses to send)."""

    data: bytes


Built = Req | Raw
Build = Callable[[Harness], Awaitable[Built]]
Edit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    """One hostile request: how to build it, what it must get, and its config tweak."""

    name: str
    build: Build
    status: int
    code: str
    edit: Edit | None = None
    marks: tuple[pytest.MarkDecorator, ...] = field(default=())


def sync(make: Callable[[Harness], Built]) -> Build:
    """Lift a plain builder into the async shape the table uses."""

    async def build(h: Harness) -> Built:
        return make(h)

    return build


def now() -> int:
    return int(time.time())


def _sig_input(req: Req, old: str, new: str) -> Req:
    """Rewrite the Signature-Input text (the battery's malformed-parameter variants)."""
    value = req.headers["Signature-Input"]
    assert old in value, (old, value)
    req.headers["Signature-Input"] = value.replace(old, new)
    return req


def _drop_param(req: Req, name: str) -> Req:
    """Remove one ``;name=value`` parameter from Signature-Input."""
    parts = req.headers["Signature-Input"].split(";")
    req.headers["Signature-Input"] = ";".join(p for p in parts if not p.startswith(f"{name}="))
    return req


def _keyid(req: Req) -> str:
    value = req.headers["Signature-Input"]
    return value.split('keyid="', 1)[1].split('"', 1)[0]


def at_path(h: Harness, service: str) -> Req:
    """Signed for a raw (already percent-encoded) service segment, sent exactly as is."""
    return signed(h, service)


def raw_of(req: Req) -> Raw:
    """The request's exact bytes, so that no client adds a header it lacks."""
    url = URL(req.url, encoded=True)
    lines = [f"POST {url.raw_path_qs} HTTP/1.1", f"Host: {url.raw_authority}"]
    lines += [f"{name}: {value}" for name, value in req.headers.items()]
    lines.append(f"Content-Length: {len(req.body)}")
    return Raw(("\r\n".join(lines) + "\r\n\r\n").encode() + req.body)


def retarget(req: Req) -> Req:
    """The same signed request sent to another service than the one it was signed for."""
    return Req(req.url.replace("crossregion.apply", "credit.query"), req.headers, req.body)


def with_nonce(h: Harness, nonce: str, key: str = "portal") -> Req:
    client = h.client(key)
    url = f"{client.base_url}/v1/exchange/credit.query"
    headers: CIMultiDict[str] = CIMultiDict(
        {"Gw-Client": client.member_id, "Gw-Message-Id": str(uuid.uuid4())}
    )
    headers["Content-Type"] = "application/json"
    client.signer.sign_request("POST", url, headers, BODY, nonce=nonce)
    return Req(url, headers, BODY)


async def send(h: Harness, req: Req) -> tuple[int, CIMultiDict[str], bytes]:
    """Send a built request exactly as built (URL not re-encoded)."""
    async with h.gateway.session.post(
        URL(req.url, encoded=True), data=req.body, headers=req.headers
    ) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def nonce_replayed(h: Harness) -> Built:
    """A first request with a nonce passes; the second use of that nonce is the attack."""
    nonce = uuid.uuid4().hex
    status, _, body = await send(h, with_nonce(h, nonce))
    assert status == 200, body
    return with_nonce(h, nonce)


async def over_rate(h: Harness) -> Built:
    """The member's one-request burst is spent first; the next request is the attack."""
    status, _, body = await send(h, signed(h))
    assert status == 200, body
    return signed(h)


def rate_limited_member(doc: dict[str, Any]) -> None:
    doc["members"][0]["rate_limit"] = {"rate_per_s": 0.01, "burst": 1}


def few_headers(doc: dict[str, Any]) -> None:
    doc["security"]["max_header_count"] = 30


def small_header_section(doc: dict[str, Any]) -> None:
    doc["security"]["max_header_bytes"] = 4096


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


def digest_of(body: bytes, name: str, algorithm: Any) -> str:
    return f"{name}=:{base64.b64encode(algorithm(body).digest()).decode()}:"


REQUIRED = (
    "@method",
    "@target-uri",
    "content-digest",
    "content-type",
    "gw-client",
    "gw-message-id",
)
OPTIONAL = {"gw-user": "inspector-7", "gw-target": NATIONAL_ID, "gw-issue": "ZJ-2024-0001"}


def omitting(component: str) -> Build:
    """Signed over every component the request needs except ``component``."""
    extra = {component.title(): OPTIONAL[component]} if component in OPTIONAL else {}
    names = (*REQUIRED, *(n for n in OPTIONAL if n.title() in extra))
    return sync(
        lambda h: signed(h, headers=extra, components=tuple(n for n in names if n != component))
    )


def C(name: str, build: Callable[[Harness], Built], status: int, code: str, **kw: Any) -> Case:
    return Case(name, sync(build), status, code, **kw)


SIG = "signature_invalid"
MAL = "malformed_request"
CASES: list[Case] = [
    # JSON bodies --------------------------------------------------------------------
    C("body not JSON", lambda h: signed(h, body=b"{not json"), 400, MAL),
    C("body truncated JSON", lambda h: signed(h, body=b'{"uscc": "91'), 400, MAL),
    C("empty body", lambda h: signed(h, body=b""), 400, MAL),
    C("body invalid UTF-8", lambda h: signed(h, body=b'{"uscc": "\xff\xfe"}'), 400, MAL),
    C("body UTF-16", lambda h: signed(h, body=BODY.decode().encode("utf-16")), 400, MAL),
    C("JSON nested 65 deep", lambda h: signed(h, body=nested(65)), 400, MAL),
    C("JSON nested 2000 deep", lambda h: signed(h, body=b"[" * 2000), 400, MAL),
    C(
        "objects nested 65 deep",
        lambda h: signed(h, body=b'{"a":' * 65 + b"1" + b"}" * 65),
        400,
        MAL,
    ),
    C(
        "JSON array, not an object",
        lambda h: signed(h, document=[CREDIT_EXAMPLE]),
        422,
        "schema_invalid",
    ),
    C("JSON NaN literal", lambda h: signed(h, body=b'{"uscc": NaN}'), 400, MAL),
    C("JSON Infinity literal", lambda h: signed(h, body=b'{"grade": -Infinity}'), 400, MAL),
    C("schema violation", lambda h: signed(h, document={"uscc": "bad"}), 422, "schema_invalid"),
    # Content type ---------------------------------------------------------------------
    C(
        "no Content-Type (raw)",
        lambda h: raw_of(
            _without(signed(h, components=REQUIRED[:3] + REQUIRED[4:]), "Content-Type")
        ),
        400,
        "missing_header",
    ),
    C(
        "text/plain body",
        lambda h: signed(h, headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    ),
    C(
        "application/xml body",
        lambda h: signed(h, headers={"Content-Type": "application/xml"}),
        415,
        "unsupported_media_type",
    ),
    C(
        "form body",
        lambda h: signed(h, headers={"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        "unsupported_media_type",
    ),
    C(
        "application/jsonx body",
        lambda h: signed(h, headers={"Content-Type": "application/jsonx"}),
        415,
        "unsupported_media_type",
    ),
    # Missing and duplicate headers ----------------------------------------------------
    C(
        "no signature at all",
        lambda h: _without(signed(h), "Signature", "Signature-Input"),
        401,
        "signature_missing",
    ),
    C(
        "no Signature-Input",
        lambda h: _without(signed(h), "Signature-Input"),
        401,
        "signature_missing",
    ),
    C("no Signature", lambda h: _without(signed(h), "Signature"), 401, "signature_missing"),
    C("no Gw-Client", lambda h: _without(signed(h), "Gw-Client"), 400, "missing_header"),
    C("no Gw-Message-Id", lambda h: _without(signed(h), "Gw-Message-Id"), 400, "missing_header"),
    C("no Content-Digest", lambda h: _without(signed(h), "Content-Digest"), 400, "missing_header"),
    C("Gw-Client twice", lambda h: _add(signed(h), "Gw-Client", PORTAL_ID), 400, MAL),
    C(
        "Gw-Message-Id twice",
        lambda h: _add(signed(h), "Gw-Message-Id", str(uuid.uuid4())),
        400,
        MAL,
    ),
    C(
        "Content-Type twice",
        lambda h: _add(signed(h), "Content-Type", "application/json"),
        400,
        MAL,
    ),
    C(
        "Content-Digest twice",
        lambda h: _add(signed(h), "Content-Digest", content_digest(b"x")),
        400,
        MAL,
    ),
    C(
        "Gw-User twice",
        lambda h: _add(signed(h, headers={"Gw-User": "a"}), "Gw-User", "b"),
        400,
        MAL,
    ),
    C(
        "second Signature-Input garbage",
        lambda h: _add(signed(h), "Signature-Input", "sig2=((("),
        401,
        SIG,
    ),
    # Malformed Signature-Input ---------------------------------------------------------
    C(
        "Signature-Input bad syntax",
        lambda h: _set(signed(h), "Signature-Input", "sig1=(((;"),
        401,
        SIG,
    ),
    C(
        "Signature-Input unterminated list",
        lambda h: _set(signed(h), "Signature-Input", 'sig1=("@method" "gw-client";created=1'),
        401,
        SIG,
    ),
    C("Signature-Input empty", lambda h: _set(signed(h), "Signature-Input", ""), 401, SIG),
    C(
        "Signature-Input non-ASCII",
        lambda h: _set(signed(h), "Signature-Input", 'sig1=("gw-clïent");created=1;keyid="k"'),
        401,
        SIG,
    ),
    C("Signature-Input without keyid", lambda h: _drop_param(signed(h), "keyid"), 401, SIG),
    C("Signature-Input without created", lambda h: _drop_param(signed(h), "created"), 401, SIG),
    C(
        "keyid not a string",
        lambda h: _sig_input(r := signed(h), f'keyid="{_keyid(r)}"', "keyid=42"),
        401,
        SIG,
    ),
    C(
        "keyid a token",
        lambda h: _sig_input(r := signed(h), f'keyid="{_keyid(r)}"', "keyid=k1"),
        401,
        SIG,
    ),
    C(
        "created a string",
        lambda h: _sig_input(signed(h, created=now()), f"created={now()}", f'created="{now()}"'),
        401,
        SIG,
    ),
    C(
        "created a decimal",
        lambda h: _sig_input(signed(h, created=now()), f"created={now()}", f"created={now()}.5"),
        401,
        SIG,
    ),
    C(
        "created a boolean",
        lambda h: _sig_input(signed(h, created=now()), f"created={now()}", "created"),
        401,
        SIG,
    ),
    C(
        "expires not an integer",
        lambda h: _sig_input(
            signed(h, created=now()), f"created={now()}", f'created={now()};expires="soon"'
        ),
        401,
        SIG,
    ),
    C(
        "components not an inner list",
        lambda h: _sig_input(
            r := signed(h), r.headers["Signature-Input"][5:].split(")", 1)[0] + ")", '"@method"'
        ),
        401,
        SIG,
    ),
    C(
        "component names not strings",
        lambda h: _sig_input(signed(h), '"@method"', "method"),
        401,
        SIG,
    ),
    C("component name an integer", lambda h: _sig_input(signed(h), '"@method"', "1"), 401, SIG),
    C(
        "Signature label differs",
        lambda h: _set(
            r := signed(h), "Signature", r.headers["Signature"].replace("sig1=", "sig2=")
        ),
        401,
        SIG,
    ),
    C(
        "Signature not a byte sequence",
        lambda h: _set(signed(h), "Signature", 'sig1="abc"'),
        401,
        SIG,
    ),
    C(
        "Signature bytes truncated",
        lambda h: _set(r := signed(h), "Signature", r.headers["Signature"][:20] + ":"),
        401,
        SIG,
    ),
    # Algorithms and keys --------------------------------------------------------------
    C("alg unknown", lambda h: _sig_input(signed(h), '"ed25519"', '"rsa-v1_5-sha256"'), 401, SIG),
    C(
        "alg ecdsa for an ed25519 key",
        lambda h: _sig_input(signed(h), '"ed25519"', '"ecdsa-p256-sha256"'),
        401,
        SIG,
    ),
    C(
        "alg hmac for an ed25519 key",
        lambda h: _sig_input(signed(h), '"ed25519"', '"hmac-sha256"'),
        401,
        SIG,
    ),
    C("alg none", lambda h: _sig_input(signed(h), '"ed25519"', '"none"'), 401, SIG),
    C(
        "key of another member",
        lambda h: signed(h, key="tax", member=PORTAL_ID),
        401,
        "key_unknown",
    ),
    C(
        "key of the national platform",
        lambda h: signed(h, key="national", member=PORTAL_ID),
        401,
        "key_unknown",
    ),
    C("key of nobody", lambda h: signed(h, key="stranger", member=PORTAL_ID), 401, "key_unknown"),
    C(
        "keyid of nobody",
        lambda h: _sig_input(r := signed(h), _keyid(r), "no-such-key"),
        401,
        "key_unknown",
    ),
    C("unknown member", lambda h: signed(h, key="stranger"), 403, "client_unknown"),
    C("disabled member", lambda h: signed(h, key="disabled"), 403, "client_disabled"),
    # Freshness ---------------------------------------------------------------------------
    C("created an hour ago", lambda h: signed(h, created=now() - 3600), 401, "signature_expired"),
    C(
        "created just past the skew",
        lambda h: signed(h, created=now() - 330),
        401,
        "signature_expired",
    ),
    C("created an hour ahead", lambda h: signed(h, created=now() + 3600), 401, "signature_expired"),
    C("created at the epoch", lambda h: signed(h, created=1), 401, "signature_expired"),
    C("created far future", lambda h: signed(h, created=2**40), 401, "signature_expired"),
    C("created negative", lambda h: signed(h, created=-1), 401, "signature_expired"),
    C(
        "expires in the past",
        lambda h: signed(h, created=now() - 20, expires=now() - 10),
        401,
        "signature_expired",
    ),
    # Digests -----------------------------------------------------------------------------
    C(
        "body swapped after signing",
        lambda h: _body(signed(h), b'{"uscc": "x"}'),
        400,
        "digest_mismatch",
    ),
    C(
        "signed digest of another body",
        lambda h: signed(h, headers={"Content-Digest": content_digest(b"{}")}),
        400,
        "digest_mismatch",
    ),
    C(
        "sha-512 digest mismatch",
        lambda h: signed(h, headers={"Content-Digest": content_digest(b"{}", "sha-512")}),
        400,
        "digest_mismatch",
    ),
    C(
        "good sha-256, bad sha-512",
        lambda h: hand_signed(
            h,
            digest_of(BODY, "sha-256", hashlib.sha256)
            + ", "
            + digest_of(b"{}", "sha-512", hashlib.sha512),
        ),
        400,
        "digest_mismatch",
    ),
    C(
        "only md5",
        lambda h: hand_signed(h, "md5=:1B2M2Y8AsgTpgAmY7PhCfg==:"),
        400,
        "digest_mismatch",
    ),
    C(
        "only sha (sha-1)",
        lambda h: hand_signed(h, digest_of(BODY, "sha", hashlib.sha1)),
        400,
        "digest_mismatch",
    ),
    C("SHA-256 in uppercase", lambda h: hand_signed(h, "SHA-256=:AAAA:"), 400, "digest_mismatch"),
    C(
        "digest not a dictionary",
        lambda h: hand_signed(h, "sha-256 = (((("),
        400,
        "digest_mismatch",
    ),
    C("digest a string", lambda h: hand_signed(h, 'sha-256="abc"'), 400, "digest_mismatch"),
    C(
        "digest of sha-256 hex",
        lambda h: hand_signed(h, "sha-256=" + hashlib.sha256(BODY).hexdigest()),
        400,
        "digest_mismatch",
    ),
    # A signature that omits a required component ----------------------------------------
    *(Case(f"signature omits {n}", omitting(n), 401, SIG) for n in (*REQUIRED, *OPTIONAL)),
    C("gw-user added after signing", lambda h: _set(signed(h), "Gw-User", "inspector-7"), 401, SIG),
    C(
        "covered header changed",
        lambda h: _set(signed(h, headers={"Gw-Issue": "A-1"}), "Gw-Issue", "A-2"),
        401,
        SIG,
    ),
    C("signed for another service", lambda h: retarget(signed(h, "crossregion.apply")), 401, SIG),
    # Path tricks in the service code (signed for the path as sent) ---------------------
    C("service ..%2f", lambda h: at_path(h, "..%2fcredit.query"), 404, "service_unknown"),
    C("service encoded slash", lambda h: at_path(h, "credit%2Fquery"), 404, "service_unknown"),
    C("service %2e%2e%2fadmin", lambda h: at_path(h, "%2e%2e%2fadmin"), 404, "service_unknown"),
    C("service uppercase", lambda h: at_path(h, "CREDIT.QUERY"), 404, "service_unknown"),
    C(
        "service Cyrillic e",
        lambda h: at_path(h, quote("credit.qu\u0435ry")),
        404,
        "service_unknown",
    ),
    C(
        "service full-width c",
        lambda h: at_path(h, quote("\uff43redit.query")),
        404,
        "service_unknown",
    ),
    C("service NUL byte", lambda h: at_path(h, "credit.query%00"), 404, "service_unknown"),
    C("service with ;params", lambda h: at_path(h, "credit.query;v=1"), 404, "service_unknown"),
    C("service 4000 chars", lambda h: at_path(h, "a" * 4000), 404, "service_unknown"),
    C(
        "service past the line limit",
        lambda h: Raw(request_bytes("/v1/exchange/" + "a" * 9000)),
        400,
        MAL,
    ),
    # Odd Unicode in identifiers ---------------------------------------------------------
    C(
        "Gw-Client full-width digits",
        lambda h: _set(signed(h), "Gw-Client", "３３００００:one-stop-portal"),
        400,
        MAL,
    ),
    C(
        "Gw-Client with RTL mark",
        lambda h: _set(signed(h), "Gw-Client", "330000:\u200fone-stop-portal"),
        400,
        MAL,
    ),
    C(
        "Gw-Client with ZWJ",
        lambda h: _set(signed(h), "Gw-Client", "330000:one\u200d-stop-portal"),
        400,
        MAL,
    ),
    C(
        "Gw-Client Arabic-Indic digits",
        lambda h: _set(signed(h), "Gw-Client", "٣٣٠٠٠٠:one-stop-portal"),
        400,
        MAL,
    ),
    C("Gw-Client uppercase", lambda h: signed(h, member="330000:ONE-STOP-PORTAL"), 400, MAL),
    C("Gw-Client with two colons", lambda h: signed(h, member="330000:one:stop"), 400, MAL),
    C("message id not a UUID", lambda h: signed(h, headers={"Gw-Message-Id": "12345"}), 400, MAL),
    # Non-ASCII cannot enter an RFC 9421 signature base, so such an id cannot verify: 401.
    C(
        "message id full-width digits",
        lambda h: _set(
            signed(h),
            "Gw-Message-Id",
            str(uuid.uuid4()).translate(str.maketrans("0123456789", "０１２３４５６７８９")),
        ),
        401,
        SIG,
    ),
    C("message id Cyrillic", lambda h: _set(signed(h), "Gw-Message-Id", "уuid-" * 7), 401, SIG),
    C(
        "message id in braces",
        lambda h: signed(h, headers={"Gw-Message-Id": "{" + str(uuid.uuid4()) + "}"}),
        400,
        MAL,
    ),
    C(
        "message id urn form",
        lambda h: signed(h, headers={"Gw-Message-Id": uuid.uuid4().urn}),
        400,
        MAL,
    ),
    C(
        "message id with ZWJ",
        lambda h: _set(signed(h), "Gw-Message-Id", str(uuid.uuid4()) + "\u200d"),
        401,
        SIG,
    ),
    # Oversized headers and bodies ---------------------------------------------------------
    C(
        "body over the service limit",
        lambda h: signed(h, body=b'{"p": "' + b"x" * 5000 + b'"}'),
        413,
        "payload_too_large",
    ),
    C(
        "body over the global limit (raw)",
        lambda h: Raw(request_bytes("/v1/exchange/no.such", body=b"x" * 300_000)),
        413,
        "payload_too_large",
    ),
    C(
        "header field over the line limit",
        lambda h: Raw(request_bytes("/v1/exchange/credit.query", "Gw-User: " + "1" * 9000)),
        400,
        MAL,
    ),
    C(
        "too many header fields",
        lambda h: Raw(
            request_bytes("/v1/exchange/credit.query", *(f"X-Pad-{i}: 1" for i in range(40)))
        ),
        400,
        MAL,
        edit=few_headers,
    ),
    C(
        "header section too large",
        lambda h: signed(h, headers={f"X-Pad-{i}": "v" * 1000 for i in range(5)}),
        400,
        MAL,
        edit=small_header_section,
    ),
    C("not HTTP at all", lambda h: Raw(b"\x16\x03\x01\x00 garbage\r\n\r\n"), 400, MAL),
    C(
        "bad chunk framing",
        lambda h: Raw(
            request_bytes("/v1/exchange/credit.query", "Transfer-Encoding: chunked")
            + b"zz\r\n{}\r\n0\r\n\r\n"
        ),
        400,
        MAL,
    ),
    # Replay and rate -------------------------------------------------------------------
    Case("nonce replayed", nonce_replayed, 401, SIG),
    C("nonce 300 characters", lambda h: with_nonce(h, "n" * 300), 401, SIG),
    Case("over the member rate", over_rate, 429, "rate_limited", edit=rate_limited_member),
]


def _params() -> list[Any]:
    return [pytest.param(c, id=c.name, marks=c.marks) for c in CASES]


def _no_leak(body: bytes) -> None:
    text = body.decode("utf-8", "replace")
    for needle in LEAKS:
        assert needle not in text, needle


@pytest.mark.parametrize("case", _params())
async def test_hostile_request_is_refused_as_problem_json(
    make_harness: HarnessFactory, case: Case
) -> None:
    """The request gets its status and code as problem+json, leaks nothing, stores nothing."""
    h = await make_harness(case.edit)
    req = await case.build(h)
    received, stored = len(h.national.received), await h.app[STORE].count_messages()
    if isinstance(req, Raw):
        raw: RawResponse = await send_raw(h, req.data)
        status, headers, body = raw.status, raw.headers, raw.body
    else:
        status, headers, body = await send(h, req)
    assert status == case.status, body
    assert headers["Content-Type"] == PROBLEM
    problem = json.loads(body)
    assert set(problem) >= PROBLEM_KEYS
    assert (problem["status"], problem["code"]) == (case.status, case.code), problem
    _no_leak(body)
    if case.code in ("rate_limited",):
        assert int(headers["Retry-After"]) >= 1
    assert len(h.national.received) == received
    assert await h.app[STORE].count_messages() == stored


def test_the_battery_is_at_least_fifty_cases() -> None:
    """Issue 6 asks for at least 50 distinct hostile requests."""
    assert len(CASES) >= 50
    assert len({c.name for c in CASES}) == len(CASES)
