"""Every protocol error code the core can reach: status, code, problem+json, nothing sent on."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.errors import GatewayError
from gateway.exchange.app import STORE
from gateway.store.sqlite import SQLiteStore
from tests.conftest import APPLY_EXAMPLE, CREDIT_EXAMPLE, PORTAL_ID, Harness, HarnessFactory

PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}


@dataclass
class Req:
    """A request being built: URL, headers and body, mutable before and after signing."""

    url: str
    headers: CIMultiDict[str]
    body: bytes


Mutation = Callable[[Harness], Req]


def signed(
    h: Harness,
    service: str = "credit.query",
    document: Any = None,
    *,
    key: str = "portal",
    member: str | None = None,
    components: tuple[str, ...] | None = None,
    headers: dict[str, str] | None = None,
    created: int | None = None,
    expires: int | None = None,
    body: bytes | None = None,
) -> Req:
    client = h.client(key, member)
    h_ = CIMultiDict(headers or {})
    data = (
        body
        if body is not None
        else json.dumps(CREDIT_EXAMPLE if document is None else document).encode()
    )
    url = f"{client.base_url}/v1/exchange/{service}"
    h_.setdefault("Gw-Client", client.member_id)
    h_.setdefault("Gw-Message-Id", str(uuid.uuid4()))
    h_.setdefault("Content-Type", "application/json")
    client.signer.sign_request(
        "POST", url, h_, data, components=components, created=created, expires=expires
    )
    return Req(url, h_, data)


def hand_signed(h: Harness, digest_header: str) -> Req:
    """Signed by hand (the library refuses to sign an unsupported digest algorithm)."""
    import base64

    pair = h.keys.pairs["portal"]
    url = f"{h.url}/v1/exchange/credit.query"
    headers = CIMultiDict(
        {
            "Content-Type": "application/json",
            "Content-Digest": digest_header,
            "Gw-Client": PORTAL_ID,
            "Gw-Message-Id": str(uuid.uuid4()),
        }
    )
    names = ("content-digest", "content-type", "gw-client", "gw-message-id")
    params = (
        '("@method" "@target-uri" ' + " ".join(f'"{n}"' for n in names) + ")"
        f';created={int(time.time())};keyid="{pair.kid}"'
    )
    lines = ['"@method": POST', f'"@target-uri": {url}']
    lines += [f'"{n}": {headers[n]}' for n in names]
    lines.append(f'"@signature-params": {params}')
    signature = pair.private.sign("\n".join(lines).encode())  # type: ignore[call-arg]
    headers["Signature-Input"] = f"sig1={params}"
    headers["Signature"] = f"sig1=:{base64.b64encode(signature).decode()}:"
    return Req(url, headers, json.dumps(CREDIT_EXAMPLE).encode())


def _without(req: Req, *names: str) -> Req:
    for name in names:
        req.headers.popall(name, None)
    return req


def _set(req: Req, name: str, value: str) -> Req:
    req.headers[name] = value
    return req


def _add(req: Req, name: str, value: str) -> Req:
    req.headers.add(name, value)
    return req


def _body(req: Req, body: bytes) -> Req:
    req.body = body
    return req


NO_ID = ("@method", "@target-uri", "content-digest", "content-type", "gw-client")
OLD = int(time.time()) - 3600

CASES: list[tuple[str, Mutation, int, str]] = [
    (
        "no signature at all",
        lambda h: _without(signed(h), "Signature", "Signature-Input"),
        401,
        "signature_missing",
    ),
    (
        "Signature without Signature-Input",
        lambda h: _without(signed(h), "Signature-Input"),
        401,
        "signature_missing",
    ),
    (
        "malformed Signature-Input",
        lambda h: _set(signed(h), "Signature-Input", "sig1=(((;"),
        401,
        "signature_invalid",
    ),
    (
        "covered header changed after signing",
        lambda h: _set(signed(h, headers={"Gw-Issue": "A-1"}), "Gw-Issue", "A-2"),
        401,
        "signature_invalid",
    ),
    ("gw-message-id not covered", lambda h: signed(h, components=NO_ID), 401, "signature_invalid"),
    (
        "gw-user present but not covered",
        lambda h: _set(signed(h), "Gw-User", "inspector-7"),
        401,
        "signature_invalid",
    ),
    (
        "alg says ecdsa for an ed25519 key",
        lambda h: _set(
            signed(h),
            "Signature-Input",
            signed(h).headers["Signature-Input"].replace('"ed25519"', '"ecdsa-p256-sha256"'),
        ),
        401,
        "signature_invalid",
    ),
    ("created an hour ago", lambda h: signed(h, created=OLD), 401, "signature_expired"),
    (
        "created an hour ahead",
        lambda h: signed(h, created=int(time.time()) + 3600),
        401,
        "signature_expired",
    ),
    (
        "expires in the past",
        lambda h: signed(h, created=int(time.time()) - 20, expires=int(time.time()) - 10),
        401,
        "signature_expired",
    ),
    ("key of nobody", lambda h: signed(h, key="stranger", member=PORTAL_ID), 401, "key_unknown"),
    ("key of another member", lambda h: signed(h, key="tax", member=PORTAL_ID), 401, "key_unknown"),
    ("unknown member", lambda h: signed(h, key="stranger"), 403, "client_unknown"),
    ("disabled member", lambda h: signed(h, key="disabled"), 403, "client_disabled"),
    ("member not allowed the service", lambda h: signed(h, key="tax"), 403, "forbidden"),
    (
        "system pretending to relay",
        lambda h: signed(h, headers={"Gw-Via": PORTAL_ID}, member="330000:other"),
        403,
        "forbidden",
    ),
    (
        "no Gw-Message-Id",
        lambda h: _without(signed(h, components=NO_ID), "Gw-Message-Id"),
        400,
        "missing_header",
    ),
    ("no Content-Digest", lambda h: _without(signed(h), "Content-Digest"), 400, "missing_header"),
    ("no Gw-Client", lambda h: _without(signed(h), "Gw-Client"), 400, "missing_header"),
    (
        "message id not a UUID",
        lambda h: signed(h, headers={"Gw-Message-Id": "12345"}),
        400,
        "malformed_request",
    ),
    (
        "Gw-Client twice",
        lambda h: _add(signed(h), "Gw-Client", PORTAL_ID),
        400,
        "malformed_request",
    ),
    ("Gw-Client not a member id", lambda h: signed(h, member="portal"), 400, "malformed_request"),
    ("body not JSON", lambda h: signed(h, body=b"{not json"), 400, "malformed_request"),
    (
        "body swapped after signing",
        lambda h: _body(signed(h), b'{"uscc": "x"}'),
        400,
        "digest_mismatch",
    ),
    (
        "only an unsupported digest algorithm",
        lambda h: hand_signed(h, "md5=:1B2M2Y8AsgTpgAmY7PhCfg==:"),
        400,
        "digest_mismatch",
    ),
    (
        "text/plain body",
        lambda h: signed(h, headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    ),
    (
        "body over the service limit",
        lambda h: signed(h, body=b'{"p": "' + b"x" * 5000 + b'"}'),
        413,
        "payload_too_large",
    ),
    ("unknown service", lambda h: signed(h, "no.such.service"), 404, "service_unknown"),
    ("schema violation", lambda h: signed(h, document={"uscc": "bad"}), 422, "schema_invalid"),
]


@pytest.mark.parametrize(("name", "mutate", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_rejected_before_anything_is_sent_on(
    harness: Harness, name: str, mutate: Mutation, status: int, code: str
) -> None:
    """Each bad request gets its protocol code as problem+json and never reaches upstream."""
    req = mutate(harness)
    async with harness.gateway.session.post(req.url, data=req.body, headers=req.headers) as resp:
        body = await resp.read()
        assert resp.status == status, body
        assert resp.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(body)
    assert set(problem) >= PROBLEM_KEYS
    assert problem["code"] == code
    assert problem["status"] == status
    assert "Traceback" not in problem["detail"]
    assert harness.national.received == []
    assert await harness.app[STORE].count_messages() == 0


async def test_message_id_reused_with_another_body(harness: Harness) -> None:
    """The same message id with a different body is 409 and the first answer stands."""
    client = harness.client("portal")
    message_id = str(uuid.uuid4())
    first = await client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
    other = dict(CREDIT_EXAMPLE, purpose="另一个目的")
    second = await client.exchange("credit.query", other, message_id=message_id)
    assert first.status == 200
    assert second.status == 409
    assert second.json()["code"] == "message_id_reused"
    assert harness.national.received == [message_id]


async def test_unknown_message_is_404(harness: Harness) -> None:
    """Asking for a message nobody sent is 404 message_unknown."""
    reply = await harness.client("portal").status(str(uuid.uuid4()))
    assert reply.status == 404
    assert reply.json()["code"] == "message_unknown"


async def test_upstream_5xx_is_502_and_recorded(harness: Harness) -> None:
    """An upstream 5xx becomes 502 upstream_error; the log keeps the failure."""
    harness.national.mode = "error"
    reply = await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 502
    assert reply.json()["code"] == "upstream_error"
    record = await harness.app[STORE].get_message(PORTAL_ID, reply.headers["Gw-Message-Id"])
    assert record is not None
    assert (record.state, record.code) == ("failed", "upstream_error")


async def test_upstream_hang_is_504(harness: Harness) -> None:
    """An upstream that never answers becomes 504 upstream_timeout after the service timeout."""
    harness.national.mode = "hang"
    started = time.monotonic()
    reply = await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 504
    assert reply.json()["code"] == "upstream_timeout"
    assert time.monotonic() - started < 4


async def test_open_breaker_is_503_with_retry_after(harness: Harness) -> None:
    """After repeated upstream failures the breaker opens: 503 with Retry-After, no call out."""
    harness.national.mode = "error"
    client = harness.client("portal")
    for _ in range(5):
        assert (await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 502
    calls = len(harness.national.received)
    reply = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 503
    assert reply.json()["code"] == "adapter_unavailable"
    assert int(reply.headers["Retry-After"]) >= 1
    assert len(harness.national.received) == calls


async def test_disabled_adapter_is_503(make_harness: HarnessFactory) -> None:
    """A route to a disabled adapter answers 503 adapter_unavailable."""

    def edit(doc: dict[str, Any]) -> None:
        doc["adapters"][0]["enabled"] = False

    h = await make_harness(edit)
    reply = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 503
    assert reply.json()["code"] == "adapter_unavailable"
    assert "Retry-After" in reply.headers


async def test_async_refused_when_outbox_not_accepting(make_harness: HarnessFactory) -> None:
    """With delivery not running, async work is refused 503 overloaded, nothing stored."""
    h = await make_harness(start_delivery=False)
    reply = await h.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    assert reply.status == 503
    assert reply.json()["code"] == "overloaded"
    assert await h.app[STORE].count_messages() == 0


async def test_store_failure_is_500_internal_without_details(harness: Harness) -> None:
    """A broken store gives 500 internal; the detail names no SQL, path or stack."""
    await harness.app[STORE].close()
    reply = await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 500
    problem = reply.json()
    assert problem["code"] == "internal"
    assert "sqlite" not in json.dumps(problem).lower()
    await harness.app[STORE].open()


async def test_a_store_refusing_writes_is_500_internal_without_details(harness: Harness) -> None:
    """A read-only store gives 500 internal whose detail is the store's own words
    (StoreReadOnly), naming no driver, exception class, SQL or file."""
    store = harness.app[STORE]
    assert isinstance(store, SQLiteStore)
    store.writer.execute("PRAGMA query_only = ON")
    try:
        reply = await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    finally:
        store.writer.execute("PRAGMA query_only = OFF")
    assert reply.status == 500
    problem = reply.json()
    assert problem["code"] == "internal"
    assert "the store is read-only" in problem["detail"]
    text = json.dumps(problem).lower()
    for leak in ("sqlite", "readonlysql", "operationalerror", "insert", "gateway.db"):
        assert leak not in text


async def test_rejections_are_recorded_without_bodies(harness: Harness) -> None:
    """A rejected request leaves a rejection row (code, digest, size), not its body."""
    client = harness.client("disabled")
    reply = await client.exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 403
    rows = await harness.app[STORE].rejections()
    assert rows[0].code == "client_disabled"
    assert rows[0].size > 0
    assert not hasattr(rows[0], "body")


def test_every_error_class_has_a_protocol_code() -> None:
    """Each concrete error carries one of PROTOCOL.md's codes and a matching status."""
    codes = {
        "malformed_request": 400, "missing_header": 400, "digest_mismatch": 400,
        "signature_missing": 401, "signature_invalid": 401, "signature_expired": 401,
        "key_unknown": 401, "client_unknown": 403, "client_disabled": 403, "forbidden": 403,
        "service_unknown": 404, "message_unknown": 404, "message_id_reused": 409,
        "callback_conflict": 409,
        "payload_too_large": 413, "unsupported_media_type": 415, "schema_invalid": 422,
        "rate_limited": 429, "upstream_error": 502, "upstream_unbound": 502,
        "adapter_unavailable": 503,
        "overloaded": 503, "upstream_timeout": 504, "internal": 500,
        # The admin API's own (docs/decisions.md, docs/deployment.md).
        "resource_unknown": 404, "resource_exists": 409, "resource_changed": 409,
        # Cross-region traffic on a directory past max_stale_s (docs/federation.md).
        "directory_stale": 503,
        "secret_unresolved": 422,
        # The local listener's client certificates (docs/decisions.md, "mTLS onboarding").
        "certificate_unknown": 401, "certificate_revoked": 401,
    }  # fmt: skip

    def walk(cls: type[GatewayError]) -> list[type[GatewayError]]:
        return [cls] + [c for sub in cls.__subclasses__() for c in walk(sub)]

    seen = set()
    for cls in walk(GatewayError):
        assert codes[cls.code] == cls.status, cls
        seen.add(cls.code)
    assert seen == set(codes)
