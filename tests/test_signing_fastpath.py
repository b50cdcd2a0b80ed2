"""The fast signature base equals the library's, byte for byte, on generated messages."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import http_sf
import pytest
from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from http_message_signatures import HTTPMessageSigner, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.crypto.keys import KeyPair, VerificationKey, generate, private_to_jwk
from gateway.errors import DigestMismatch
from gateway.signing import (
    RequestView,
    ResponseView,
    Signer,
    Verifier,
    check_content_digest,
    content_digest,
    parse_signature_input,
)
from gateway.signing.algorithms import verify_raw
from gateway.signing.base import fast_base  # the unit under test
from gateway.signing.fields import fast_bytes_member, fast_signature_input  # units under test
from tests.conftest import examples

KEY = generate("ed25519")
PAIR = KeyPair(kid="k1", algorithm="ed25519", private=KEY, jwk=private_to_jwk(KEY, "k1"))
HEADER_NAMES = ["content-type", "x-b", "gw-client", "gw-message-id", "gw-issue", "x-a"]
value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
url = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}{path}{query}",
    st.sampled_from(["http", "https", "HTTP"]),
    st.sampled_from(["example.com", "Gateway.Example", "127.0.0.1"]),
    st.sampled_from(["", ":80", ":443", ":8080"]),
    st.sampled_from(["", "/", "/v1/exchange/credit.query", "/a%20b/c"]),
    st.sampled_from(["", "?x=1", "?a=b&c=d"]),
)


class _Library(HTTPMessageSigner):
    pass


def _library_base(message: Any, components: list[str], created: int) -> tuple[bytes, str]:
    signer = _Library(signature_algorithm=algorithms.ED25519)
    prepared = signer.prepare(
        message,
        key_id="k1",
        created=datetime.datetime.fromtimestamp(created, datetime.UTC),
        include_alg=True,
        covered_component_ids=components,
    )
    return prepared.signature_base, prepared.signature_params


@settings(max_examples=examples(150), deadline=None)
@given(
    method=st.sampled_from(["POST", "GET", "PUT"]),
    target=url,
    headers=st.dictionaries(st.sampled_from(HEADER_NAMES), value.map(str.strip), min_size=1),
    derived=st.lists(
        st.sampled_from(["@method", "@target-uri", "@authority", "@path", "@scheme", "@query"]),
        unique=True,
    ),
    created=st.integers(min_value=1, max_value=2**31),
)
def test_request_base_matches_the_library(
    method: str, target: str, headers: dict[str, str], derived: list[str], created: int
) -> None:
    """For requests, the fast base and params equal the library's for the same components."""
    h: CIMultiDict[str] = CIMultiDict(headers)
    components = [*derived, *sorted(headers)]
    items: list[tuple[str, dict[str, Any]]] = [(c, {}) for c in components]
    params = {"created": created, "keyid": "k1", "alg": "ed25519"}
    ours = fast_base(RequestView(method, target, h), items, params)
    lib = _library_base(_Req(method, target, h), components, created)
    assert ours == lib


@settings(max_examples=examples(60), deadline=None)
@given(status=st.integers(min_value=200, max_value=599), text=value)
def test_response_binding_matches_the_library(status: int, text: str) -> None:
    """A response bound to its request's signature gets the library's exact base."""
    request_headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    Signer(PAIR, label="req").sign_request(
        "POST",
        "http://gw.example/v1/x",
        request_headers,
        text.encode(),
        components=("@method", "@target-uri", "content-type", "content-digest"),
    )
    request = RequestView("POST", "http://gw.example/v1/x", request_headers)
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json", "Gw-X": text})
    components = ["@status", "content-type", "gw-x", '"signature";req;key="req"']
    items: list[tuple[str, dict[str, Any]]] = [(c, {}) for c in components[:3]]
    items.append(("signature", {"req": True, "key": "req"}))
    params = {"created": 1700000000, "keyid": "k1", "alg": "ed25519"}
    ours = fast_base(ResponseView(status, headers, request), items, params)
    lib = _library_base(
        _Resp(status, headers, _Req("POST", request.url, request_headers)), components, 1700000000
    )
    assert ours == lib


def test_fast_signatures_verify_both_ways() -> None:
    """What the fast signer signs, the library-backed path verifies, and the reverse."""
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "application/json", "Gw-Client": "330000:a", "Gw-Message-Id": "m"}
    )
    Signer(PAIR).sign_request("POST", "http://x.example/p", headers, b"{}")
    view = RequestView("POST", "http://x.example/p", headers)
    key = VerificationKey.from_jwk(PAIR.jwk)
    sig = parse_signature_input(headers)
    Verifier().verify(view, sig, key, fresh=False)
    # extra_required forces the library's own verifier over the same message
    Verifier().verify(view, sig, key, fresh=False, extra_required=("gw-client",))


class _Req:
    def __init__(self, method: str, url: str, headers: CIMultiDict[str]) -> None:
        self.method, self.url, self.headers = method, url, headers


class _Resp:
    def __init__(self, status: int, headers: CIMultiDict[str], request: _Req) -> None:
        self.status_code, self.headers, self.request = status, headers, request


# Fast structured-field readers: same answer as http-sf, or no answer ----------------

sf_key = st.from_regex(r"[a-z*][a-z0-9_.*-]{0,8}", fullmatch=True)
sf_string = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
sf_param_value = st.one_of(
    st.integers(min_value=-(10**15) + 1, max_value=10**15 - 1),
    sf_string,
    st.just(True),
    st.booleans(),
)


def _sf_text(draw_params: list[tuple[str, Any]]) -> str:
    return "".join(
        f";{k}" if v is True else f";{k}={http_sf.ser({'x': (v, {})})[2:]}" for k, v in draw_params
    )


@settings(max_examples=examples(300), deadline=None)
@given(
    label=sf_key,
    names=st.lists(sf_string, max_size=6),
    params=st.lists(st.tuples(sf_key, sf_param_value), max_size=5),
    noise=st.sampled_from(["", " ", ", x=1", "  ", ";", "\t"]),
    where=st.integers(min_value=0, max_value=200),
)
def test_fast_signature_input_agrees_with_http_sf(
    label: str, names: list[str], params: list[tuple[str, Any]], noise: str, where: int
) -> None:
    """Any Signature-Input text the fast reader accepts, http-sf reads the same way."""
    members = " ".join(http_sf.ser({"x": (n, {})})[2:] for n in names)
    text = f"{label}=({members}){_sf_text(params)}"
    cut = where % (len(text) + 1)
    text = text[:cut] + noise + text[cut:]
    fast = fast_signature_input(text)
    parsed: Any
    try:
        parsed = http_sf.parse(text.encode("ascii"), tltype="dictionary")
    except ValueError:
        parsed = None
    if fast is None:
        return  # the reference decides
    assert parsed is not None, text
    assert len(parsed) == 1
    reference_label, (inner, reference_params) = next(iter(parsed.items()))
    assert fast == (reference_label, [n for n, _ in inner], dict(reference_params)), text
    # What follows the label is the canonical text: the verifier signs over it as is.
    member = http_sf.ser({reference_label: (inner, reference_params)})
    assert text == member, text


@settings(max_examples=examples(300), deadline=None)
@given(
    label=sf_key,
    raw=st.binary(max_size=70),
    mangle=st.sampled_from(["", "drop-pad", "extra", "space", "bad-bits"]),
)
def test_fast_byte_sequence_agrees_with_http_sf(label: str, raw: bytes, mangle: str) -> None:
    """``label=:base64:`` read fast gives http-sf's bytes and its serialization."""
    b64 = base64.b64encode(raw).decode()
    if mangle == "drop-pad":
        b64 = b64.rstrip("=")
    elif mangle == "extra":
        b64 += "A"
    elif mangle == "space":
        b64 = " " + b64
    elif mangle == "bad-bits" and b64.endswith("=") and len(b64) >= 2:
        b64 = b64[:-3] + "B" + b64[-2:] if b64.endswith("==") else b64[:-2] + "B="
    text = f"{label}=:{b64}:"
    fast = fast_bytes_member(text)
    if fast is None:
        return
    parsed: Any = http_sf.parse(text.encode("ascii"), tltype="dictionary")
    assert fast[0] in parsed
    assert fast[1] == parsed[fast[0]][0]
    assert fast[2] == http_sf.ser({"m": parsed[fast[0]]})[2:]


@settings(max_examples=examples(200), deadline=None)
@given(body=st.binary(max_size=64), other=st.binary(max_size=64))
def test_fast_content_digest_agrees_with_the_general_check(body: bytes, other: bytes) -> None:
    """The one-member sha-256 shortcut accepts and refuses exactly as the general path."""
    value = content_digest(other)
    outcomes = []
    for text in (value, value + ", md5=:AAAA:"):  # the second never takes the fast path
        try:
            outcomes.append(check_content_digest(text, body))
        except DigestMismatch:
            outcomes.append("mismatch")
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] != "mismatch") == (body == other)


@settings(max_examples=examples(50), deadline=None)
@given(message=st.binary(max_size=300), flip=st.integers(min_value=0, max_value=511))
def test_libsodium_and_openssl_agree_on_ed25519(message: bytes, flip: int) -> None:
    """Ed25519 runs through libsodium: OpenSSL's signatures verify there and ours verify in
    OpenSSL, byte for byte the same (Ed25519 is deterministic); a flipped bit fails both."""
    assert isinstance(KEY, ed25519.Ed25519PrivateKey)
    public = VerificationKey(kid="k1", algorithm="ed25519", key=KEY.public_key())
    openssl = KEY.sign(message)
    verify_raw(public, openssl, message)
    signer = Signer(PAIR)
    assert signer._sodium is not None
    assert signer._sodium.sign(message).signature == openssl
    damaged = bytearray(openssl)
    damaged[flip // 8] ^= 1 << (flip % 8)
    with pytest.raises(CryptoInvalidSignature):
        verify_raw(public, bytes(damaged), message)
    with pytest.raises(CryptoInvalidSignature):
        KEY.public_key().verify(bytes(damaged), message)
