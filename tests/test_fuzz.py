"""Property-based fuzzing (hypothesis) of header and digest parsing, the JSON depth scan, and
a live gateway fed randomly mutated signed requests."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.errors import GatewayError, MalformedRequest
from gateway.exchange.limits import check_json_shape
from gateway.signing import check_content_digest, content_digest, parse_signature_input
from tests.conftest import CREDIT_EXAMPLE, Harness, examples

# Structured-field-ish alphabet: what a parser's edge cases are made of.
SF_TEXT = st.text(
    alphabet=st.sampled_from('sig1=();:,"\\ *?-_.@/+=0123456789abcXYZ\t\x7fé'), max_size=60
)
ANY_TEXT = st.text(max_size=80)
HEADER_TEXT = SF_TEXT | ANY_TEXT | st.binary(max_size=60).map(lambda b: b.decode("latin-1"))


@settings(max_examples=examples(400), deadline=None)
@given(sig_input=HEADER_TEXT, signature=HEADER_TEXT | st.none(), twice=st.booleans())
def test_parse_signature_input_raises_only_gateway_errors(
    sig_input: str, signature: str | None, twice: bool
) -> None:
    """Arbitrary Signature-Input and Signature values parse or raise a GatewayError."""
    headers: CIMultiDict[str] = CIMultiDict({"Signature-Input": sig_input})
    if twice:
        headers.add("Signature-Input", sig_input)
    if signature is not None:
        headers["Signature"] = signature
    try:
        parsed = parse_signature_input(headers)
    except GatewayError as exc:
        status = exc.status
    else:
        status = 0
        assert isinstance(parsed.keyid, str)
        assert type(parsed.params["created"]) is int
    assert status in (0, 401)


@settings(max_examples=examples(200), deadline=None)
@given(
    components=st.lists(
        st.sampled_from(['"@method"', '"gw-client"', "tok", "1", "?1", '"a";x']), max_size=5
    ),
    keyid=st.sampled_from(['"k"', "k", "1", "?0", ":YQ==:", '""']),
    created=st.sampled_from(["1", "-1", "1.5", '"1"', "?1", "99999999999999999"]),
    signature=st.sampled_from(["sig1=:YQ==:", 'sig1="a"', "sig1=1", "sig2=:YQ==:", "sig1=(a)"]),
)
def test_near_valid_signature_inputs_raise_only_gateway_errors(
    components: list[str], keyid: str, created: str, signature: str
) -> None:
    """Well-formed dictionaries with wrong parameter and member types: GatewayError only."""
    value = f"sig1=({' '.join(components)});created={created};keyid={keyid}"
    headers: CIMultiDict[str] = CIMultiDict({"Signature-Input": value, "Signature": signature})
    code = ""
    try:
        parse_signature_input(headers)
    except GatewayError as exc:
        code = exc.code
    assert code in ("", "signature_invalid", "signature_missing")


@settings(max_examples=examples(400), deadline=None)
@given(value=HEADER_TEXT, body=st.binary(max_size=64))
def test_check_content_digest_raises_only_gateway_errors(value: str, body: bytes) -> None:
    """Arbitrary Content-Digest values either match the body or raise a GatewayError."""
    try:
        digest = check_content_digest(value, body)
    except GatewayError as exc:
        digest = exc.code
    assert digest == "digest_mismatch" or len(digest) == 64


@settings(max_examples=examples(200), deadline=None)
@given(
    body=st.binary(max_size=64),
    algorithm=st.sampled_from(["sha-256", "sha-512"]),
    flip=st.integers(min_value=0, max_value=200),
)
def test_a_right_digest_passes_and_a_changed_body_fails(
    body: bytes, algorithm: str, flip: int
) -> None:
    """The digest of a body verifies it; any one flipped bit is a digest_mismatch."""
    value = content_digest(body, algorithm)
    check_content_digest(value, body)
    if body:
        at = flip % len(body)
        changed = body[:at] + bytes([body[at] ^ (1 << flip % 8)]) + body[at + 1 :]
    else:
        changed = b"x"
    assert changed != body
    with pytest.raises(GatewayError, match="does not match") as caught:
        check_content_digest(value, changed)
    assert caught.value.code == "digest_mismatch"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=40,
)


def depth_of(value: Any) -> int:
    """Nesting depth as json.loads builds it: containers count, scalars do not."""
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=examples(300), deadline=None)
@given(value=JSON_VALUES, limit=st.integers(min_value=1, max_value=12), ascii_only=st.booleans())
def test_json_depth_scan_agrees_with_json_loads(value: Any, limit: int, ascii_only: bool) -> None:
    """The depth scan refuses a document exactly when json.loads finds it deeper than the limit."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    depth = depth_of(json.loads(text))
    if depth > limit:
        with pytest.raises(MalformedRequest, match="nests deeper"):
            check_json_shape(text, max_depth=limit, max_items=1_000_000)
    else:
        check_json_shape(text, max_depth=limit, max_items=1_000_000)


PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
TARGETS = (
    "body",
    "Content-Type",
    "Content-Digest",
    "Gw-Client",
    "Gw-Message-Id",
    "Signature-Input",
    "Signature",
    "X-Extra",
)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str, int]:
    """Which part to change, the printable text to put in, and where (for the body)."""
    return draw(st.sampled_from(TARGETS)), draw(PRINTABLE), draw(st.integers(0, 400))


async def test_mutated_signed_requests_never_get_a_server_error(harness: Harness) -> None:
    """A signed request with one random printable mutation is accepted or refused with a 4xx
    problem, never a 5xx (hypothesis runs in a thread; requests go through this loop)."""
    loop = asyncio.get_running_loop()
    client = harness.client("portal")
    url = f"{client.base_url}/v1/exchange/credit.query"
    body = json.dumps(CREDIT_EXAMPLE).encode()

    async def send(headers: CIMultiDict[str], data: bytes) -> tuple[int, str, bytes]:
        async with harness.gateway.session.post(url, data=data, headers=headers) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.read()

    @settings(max_examples=examples(40), deadline=None, suppress_health_check=list(HealthCheck))
    @given(mutation=mutations())
    def check(mutation: tuple[str, str, int]) -> None:
        target, text, where = mutation
        headers: CIMultiDict[str] = CIMultiDict(
            {
                "Content-Type": "application/json",
                "Gw-Client": client.member_id,
                "Gw-Message-Id": str(uuid.uuid4()),
            }
        )
        client.signer.sign_request("POST", url, headers, body)
        data = body
        if target == "body":
            data = body[:where] + text.encode() + body[where:]
        else:
            headers[target] = text.strip()
        future = asyncio.run_coroutine_threadsafe(send(headers, data), loop)
        status, ctype, answer = future.result(30)
        assert status < 500, (mutation, answer)
        if status != 200:
            assert 400 <= status < 500, (mutation, answer)
            assert ctype == "application/problem+json", (mutation, answer)
            assert json.loads(answer)["status"] == status

    await asyncio.to_thread(check)
