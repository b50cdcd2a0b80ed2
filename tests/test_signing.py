"""Tests for gateway.signing (RFC 9421 / RFC 9530) and gateway.crypto.keys (JWK, RFC 7638, PEM).

The RFC 9421 Appendix B vectors live in tests/vectors/rfc9421-appendix-b.json; the
B.2.6 vector with the Ed25519 private key is shared with the other implementations in
shared/vectors/rfc9421-b26.json (beside the repository).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPSignatureAlgorithm,
    HTTPSignatureKeyResolver,
    algorithms,
)
from multidict import CIMultiDict

from gateway.crypto.keys import (
    KeyPair,
    PrivateKey,
    PublicKey,
    VerificationKey,
    generate,
    jwk_thumbprint,
    load_keypair,
    private_to_jwk,
    public_from_jwk,
    write_keypair,
)
from gateway.crypto.sm2 import Sm2PublicKey
from gateway.errors import (
    ConfigError,
    DigestMismatch,
    SignatureExpired,
    SignatureInvalid,
    SignatureMissing,
)
from gateway.signing import (
    REQUEST_COMPONENTS,
    RESPONSE_COMPONENTS,
    RequestView,
    ResponseView,
    Signer,
    Verifier,
    check_content_digest,
    content_digest,
    parse_signature_input,
)
from gateway.signing.algorithms import SM2_SM3

VECTORS = Path(__file__).parent / "vectors" / "rfc9421-appendix-b.json"
# The workspace's shared vector when present (CI lays shared/ beside the clone), else our copy.
SHARED_B26 = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "rfc9421-b26.json"
if not SHARED_B26.is_file():
    SHARED_B26 = Path(__file__).resolve().parent / "vectors" / "rfc9421-b26.json"
RFC: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
RFC_EXAMPLES: list[dict[str, Any]] = RFC["examples"]
RFC_KEYS: dict[str, Any] = RFC["keys"]
B26_COMPONENTS = ("date", "@method", "@path", "@authority", "content-type", "content-length")

NOW = 1_750_000_000
SKEW = 300
URL = "https://gw.example.gov.cn/v1/exchange/population.lookup?region=110101"
BODY = b'{"resident_id":"11010519491231002X"}'
ANSWER = b'{"found":true}'
LIBRARY_ALGORITHMS: dict[str, type[HTTPSignatureAlgorithm]] = {
    "ed25519": algorithms.ED25519,
    "ecdsa-p256-sha256": algorithms.ECDSA_P256_SHA256,
    "rsa-pss-sha512": algorithms.RSA_PSS_SHA512,
    "sm2-sm3": SM2_SM3,  # ours (the library has no SM2), driven by the library's signer
    "hmac-sha256": algorithms.HMAC_SHA256,
}
ALGORITHMS = tuple(LIBRARY_ALGORITHMS)


# ---------------------------------------------------------------------------
# helpers


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """A key a member signs with, and the VerificationKey the gateway holds for it."""

    kid: str
    algorithm: str
    private: PrivateKey | bytes
    public: VerificationKey
    keypair: KeyPair | None  # None for a shared secret

    def signer(self, label: str = "gw") -> Signer:
        if self.keypair is None:
            assert isinstance(self.private, bytes)
            return Signer(secret=self.private, kid=self.kid, label=label)
        return Signer(self.keypair, label=label)


def _member(algorithm: str, private: PrivateKey | bytes, kid: str | None = None) -> Member:
    if isinstance(private, bytes):
        name = kid or "hmac-member"
        public = VerificationKey.from_jwk(
            {"kty": "oct", "kid": name, "k": base64.urlsafe_b64encode(private).decode()}
        )
        return Member(kid=name, algorithm=algorithm, private=private, public=public, keypair=None)
    jwk = private_to_jwk(private, kid)
    pair = KeyPair(kid=jwk["kid"], algorithm=algorithm, private=private, jwk=jwk)
    public = VerificationKey.from_jwk(jwk)
    return Member(kid=jwk["kid"], algorithm=algorithm, private=private, public=public, keypair=pair)


def _fresh_members(rsa_bits: int) -> dict[str, Member]:
    return {
        "ed25519": _member("ed25519", generate("ed25519")),
        "ecdsa-p256-sha256": _member("ecdsa-p256-sha256", generate("ecdsa-p256")),
        "rsa-pss-sha512": _member(
            "rsa-pss-sha512",
            rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits),
        ),
        "sm2-sm3": _member("sm2-sm3", generate("sm2")),
        "hmac-sha256": _member("hmac-sha256", os.urandom(32)),
    }


@pytest.fixture(scope="session")
def members() -> dict[str, Member]:
    """One freshly generated key per algorithm (RSA at the gateway's own 3072 bits)."""
    return _fresh_members(rsa_bits=3072)


@pytest.fixture(scope="session")
def impostors() -> dict[str, Member]:
    """A second, unrelated key per algorithm."""
    return _fresh_members(rsa_bits=2048)


@pytest.fixture
def verifier() -> Verifier:
    """A verifier whose clock stands still at NOW."""
    return Verifier(skew_s=SKEW, clock=lambda: float(NOW))


class _PeerKeys(HTTPSignatureKeyResolver):
    def __init__(self, key: PrivateKey | bytes) -> None:
        self._key = key

    def resolve_public_key(self, key_id: str) -> None:
        return None

    def resolve_private_key(self, key_id: str) -> PrivateKey | bytes:
        return self._key


def peer_sign(
    message: RequestView | ResponseView,
    member: Member,
    *,
    components: Sequence[str] = REQUEST_COMPONENTS,
    label: str = "gw",
    created: int = NOW,
    expires: int | None = None,
    nonce: str | None = None,
    include_alg: bool = True,
    append: bool = False,
) -> None:
    """Sign ``message`` in place the way a member's own RFC 9421 client would.

    Signatures made by the library directly, independently of the gateway's Signer, so the
    verifier is tested against a peer's choices (labels, alg or not, expires, nonce).
    """
    signer = HTTPMessageSigner(
        signature_algorithm=LIBRARY_ALGORITHMS[member.algorithm],
        key_resolver=_PeerKeys(member.private),
    )
    utc = datetime.UTC
    signer.sign(
        message,
        key_id=member.kid,
        label=label,
        created=datetime.datetime.fromtimestamp(created, utc),
        expires=datetime.datetime.fromtimestamp(expires, utc) if expires is not None else None,
        nonce=nonce,
        include_alg=include_alg,
        covered_component_ids=tuple(components),
        append_if_signature_exists=append,
        use_existing_digest="Content-Digest" in message.headers,
    )


def gw_headers(body: bytes = BODY) -> CIMultiDict[str]:
    """Header fields of an exchange request as PROTOCOL.md requires them."""
    return CIMultiDict(
        {
            "Content-Type": "application/json",
            "Content-Digest": content_digest(body),
            "Gw-Client": "city-110000",
            "Gw-Target": "province-ga",
            "Gw-Message-Id": "5b0c1c9e-8a55-4d2e-9f4b-1f1b8c3a7d11",
        }
    )


def signed_request(member: Member, **options: Any) -> RequestView:
    request = RequestView("POST", URL, gw_headers())
    peer_sign(request, member, **options)
    return request


def answer_to(request: RequestView) -> ResponseView:
    headers = CIMultiDict(
        {
            "Content-Type": "application/json",
            "Content-Digest": content_digest(ANSWER),
            "Gw-Message-Id": request.headers["Gw-Message-Id"],
        }
    )
    return ResponseView(200, headers, request)


def with_fields(message: RequestView, **fields: str) -> RequestView:
    """A copy of ``message`` with some header fields replaced (underscores become dashes)."""
    headers = CIMultiDict(message.headers)
    for name, value in fields.items():
        headers[name.replace("_", "-")] = value
    return RequestView(message.method, message.url, headers)


def verify(verifier: Verifier, message: RequestView | ResponseView, key: VerificationKey) -> None:
    verifier.verify(message, parse_signature_input(message.headers), key)


def rfc_key(kid: str) -> VerificationKey:
    return VerificationKey.from_jwk(RFC_KEYS[kid]["jwk"])


def rfc_request(extra: Mapping[str, str] = {}) -> RequestView:
    spec = RFC["messages"]["test-request"]
    headers = CIMultiDict((name, value) for name, value in spec["headers"])
    headers.extend(extra)
    return RequestView(spec["method"], spec["url"], headers)


def rfc_message(example: Mapping[str, Any]) -> RequestView | ResponseView:
    """The Appendix B.2 message an example signs, carrying that example's signature."""
    signature = {"Signature-Input": example["signature_input"], "Signature": example["signature"]}
    if example["message"] == "test-request":
        return rfc_request(signature)
    spec = RFC["messages"]["test-response"]
    headers = CIMultiDict((name, value) for name, value in spec["headers"])
    headers.extend(signature)
    return ResponseView(spec["status"], headers, rfc_request())


def shared_b26() -> dict[str, Any]:
    if not SHARED_B26.is_file():
        pytest.fail(f"the shared RFC 9421 B.2.6 vector is missing: {SHARED_B26}")
    vector: dict[str, Any] = json.loads(SHARED_B26.read_text(encoding="utf-8"))
    return vector


def shared_b26_request(vector: Mapping[str, Any], *, signed: bool = True) -> RequestView:
    spec = vector["request"]
    headers: CIMultiDict[str] = CIMultiDict(spec["headers"])
    if not signed:
        for name in ("Signature", "Signature-Input"):
            del headers[name]
    return RequestView(spec["method"], spec["url"], headers)


def rfc_ed25519_private(vector: Mapping[str, Any]) -> ed25519.Ed25519PrivateKey:
    seed = base64.urlsafe_b64decode(vector["key"]["d"] + "==")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def example_id(example: Mapping[str, Any]) -> str:
    return f"{example['section']}-{example['algorithm']}"


# ---------------------------------------------------------------------------
# RFC 9421 Appendix B


def test_vector_file_holds_every_b2_example() -> None:
    """The captured vectors are B.2.1 to B.2.6 and span the four IANA algorithms (sm2-sm3
    has its own vector, tests/test_sm2.py)."""
    assert [example["section"] for example in RFC_EXAMPLES] == [f"B.2.{n}" for n in range(1, 7)]
    assert {example["algorithm"] for example in RFC_EXAMPLES} == set(ALGORITHMS) - {"sm2-sm3"}
    assert set(RFC_KEYS) == {
        "test-key-rsa",
        "test-key-rsa-pss",
        "test-key-ecc-p256",
        "test-key-ed25519",
        "test-shared-secret",
    }


@pytest.mark.parametrize("example", RFC_EXAMPLES, ids=example_id)
def test_rfc_example_verifies(example: dict[str, Any]) -> None:
    """Each RFC 9421 Appendix B.2 example verifies with the Verifier (freshness off)."""
    message = rfc_message(example)
    sig = parse_signature_input(message.headers)
    key = rfc_key(example["keyid"])

    result = Verifier().verify(message, sig, key, fresh=False)

    assert (result.label, result.keyid, result.algorithm) == (
        example["label"],
        example["keyid"],
        example["algorithm"],
    )
    assert result.created == 1618884473


def test_rfc_b21_reports_its_nonce() -> None:
    """B.2.1 (rsa-pss, nothing covered) verifies and yields its nonce for replay checks."""
    example = RFC_EXAMPLES[0]
    message = rfc_message(example)

    result = Verifier().verify(
        message, parse_signature_input(message.headers), rfc_key("test-key-rsa-pss"), fresh=False
    )

    assert result.nonce == "b3k2pp5k7z-50gnwp.yemd"
    assert result.covered == ()


@pytest.mark.parametrize("example", RFC_EXAMPLES, ids=example_id)
def test_rfc_example_with_a_flipped_signature_byte_is_rejected(example: dict[str, Any]) -> None:
    """Changing one byte of an RFC example's signature makes it fail to verify."""
    raw = bytearray(base64.b64decode(example["signature"].split("=:", 1)[1].rstrip(":")))
    raw[len(raw) // 2] ^= 0x01
    forged = {**example, "signature": f"{example['label']}=:{base64.b64encode(raw).decode()}:"}
    message = rfc_message(forged)

    with pytest.raises(SignatureInvalid):
        Verifier().verify(
            message, parse_signature_input(message.headers), rfc_key(example["keyid"]), fresh=False
        )


@pytest.mark.parametrize("example", RFC_EXAMPLES, ids=example_id)
def test_rfc_signature_base_is_what_was_signed(example: dict[str, Any]) -> None:
    """The recorded signature base is exactly the bytes the RFC's signature covers."""
    key = rfc_key(example["keyid"])
    signature = base64.b64decode(example["signature"].split("=:", 1)[1].rstrip(":"))
    algorithm = LIBRARY_ALGORITHMS[example["algorithm"]](public_key=key.key)

    algorithm.verify(signature=signature, message=example["signature_base"].encode())


@pytest.mark.parametrize(
    ("kid", "algorithm"),
    [
        ("test-key-rsa", "rsa-pss-sha512"),
        ("test-key-rsa-pss", "rsa-pss-sha512"),
        ("test-key-ecc-p256", "ecdsa-p256-sha256"),
        ("test-key-ed25519", "ed25519"),
        ("test-shared-secret", "hmac-sha256"),
    ],
)
def test_rfc_jwk_maps_to_algorithm_by_key_type(kid: str, algorithm: str) -> None:
    """Each RFC test key loads from its JWK with the algorithm its key type pins."""
    key = rfc_key(kid)

    assert (key.kid, key.algorithm) == (kid, algorithm)


def test_rfc_shared_secret_jwk_is_the_rfc_secret() -> None:
    """The oct JWK of test-shared-secret yields the RFC's 64 secret bytes."""
    secret = RFC_KEYS["test-shared-secret"]

    assert rfc_key("test-shared-secret").key == base64.b64decode(secret["secret_base64"])


@pytest.mark.parametrize("name", ["test-request", "test-response"])
def test_rfc_content_digests_match_bodies(name: str) -> None:
    """The RFC messages' sha-512 Content-Digest values match their bodies."""
    spec = RFC["messages"][name]
    digest = dict(spec["headers"])["Content-Digest"]
    body = spec["body"].encode()

    assert check_content_digest(digest, body) == hashlib.sha256(body).hexdigest()


def test_shared_b26_vector_verifies_without_freshness() -> None:
    """The shared B.2.6 vector verifies with the RFC Ed25519 key when freshness is off."""
    vector = shared_b26()
    request = shared_b26_request(vector)
    key = VerificationKey.from_jwk({k: v for k, v in vector["key"].items() if k != "d"})

    result = Verifier().verify(request, parse_signature_input(request.headers), key, fresh=False)

    assert (result.keyid, result.algorithm) == ("test-key-ed25519", "ed25519")


def test_shared_b26_vector_is_expired_with_freshness() -> None:
    """The same 2021 B.2.6 vector is rejected as expired when freshness is checked."""
    vector = shared_b26()
    request = shared_b26_request(vector)
    key = VerificationKey.from_jwk({k: v for k, v in vector["key"].items() if k != "d"})

    with pytest.raises(SignatureExpired):
        Verifier().verify(request, parse_signature_input(request.headers), key, fresh=True)


def test_shared_b26_vector_agrees_with_appendix_file() -> None:
    """The shared B.2.6 vector and the Appendix B file hold the same key, base and signature."""
    vector = shared_b26()
    example = RFC_EXAMPLES[5]

    assert vector["key"]["x"] == RFC_KEYS["test-key-ed25519"]["jwk"]["x"]
    assert vector["signature_base"] == example["signature_base"]
    assert vector["request"]["headers"]["Signature"] == example["signature"]
    assert vector["request"]["headers"]["Signature-Input"] == example["signature_input"]


def test_rfc_ed25519_key_reproduces_b26_signature_bytes() -> None:
    """The RFC Ed25519 private key signs the B.2.6 base to the RFC's exact signature."""
    vector = shared_b26()
    request = shared_b26_request(vector, signed=False)
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_PeerKeys(rfc_ed25519_private(vector))
    )

    signer.sign(
        request,
        key_id="test-key-ed25519",
        label="sig-b26",
        created=datetime.datetime.fromtimestamp(1618884473, datetime.UTC),
        include_alg=False,
        covered_component_ids=B26_COMPONENTS,
        use_existing_digest=True,
    )

    assert request.headers["Signature-Input"] == RFC_EXAMPLES[5]["signature_input"]
    assert request.headers["Signature"] == RFC_EXAMPLES[5]["signature"]


def _rfc_pair(key: ed25519.Ed25519PrivateKey) -> KeyPair:
    """The RFC 9421 test key as a gateway key pair, under the RFC's key id."""
    return KeyPair(
        kid="test-key-ed25519",
        algorithm="ed25519",
        private=key,
        jwk=private_to_jwk(key, "test-key-ed25519"),
    )


def test_signer_signs_b26_base_with_alg_deterministically() -> None:
    """Signer with the RFC key gives the B.2.6 base plus alg, Ed25519-signed byte for byte."""
    vector = shared_b26()
    request = shared_b26_request(vector, signed=False)
    key = rfc_ed25519_private(vector)
    pair = _rfc_pair(key)
    headers = CIMultiDict(request.headers)
    base = RFC_EXAMPLES[5]["signature_base"] + ';alg="ed25519"'
    expected = base64.b64encode(key.sign(base.encode())).decode()

    Signer(pair, label="sig-b26", nonces=False).sign_request(
        request.method,
        request.url,
        headers,
        vector["request"]["body"].encode(),
        components=B26_COMPONENTS,
        created=1618884473,
    )

    assert headers["Signature-Input"] == RFC_EXAMPLES[5]["signature_input"] + ';alg="ed25519"'
    assert headers["Signature"] == f"sig-b26=:{expected}:"
    assert headers.getall("Content-Digest") == [
        dict(RFC["messages"]["test-request"]["headers"])["Content-Digest"]
    ]


def test_signer_reproduces_b26_signature_bytes() -> None:
    """The gateway's Signer with the RFC key, created and components gives B.2.6's bytes."""
    vector = shared_b26()
    request = shared_b26_request(vector, signed=False)
    key = rfc_ed25519_private(vector)
    pair = _rfc_pair(key)

    headers = CIMultiDict(request.headers)
    Signer(pair, label="sig-b26", include_alg=False, nonces=False).sign_request(
        request.method,
        request.url,
        headers,
        vector["request"]["body"].encode(),
        components=B26_COMPONENTS,
        created=1618884473,
    )

    assert headers["Signature"] == RFC_EXAMPLES[5]["signature"]
    assert headers["Signature-Input"] == RFC_EXAMPLES[5]["signature_input"]


# ---------------------------------------------------------------------------
# parse_signature_input rejections


def test_missing_both_fields_is_signature_missing() -> None:
    """A message with neither Signature-Input nor Signature is SignatureMissing."""
    with pytest.raises(SignatureMissing):
        parse_signature_input(gw_headers())


@pytest.mark.parametrize("present", ["Signature-Input", "Signature"])
def test_only_one_field_is_signature_missing(present: str, members: dict[str, Member]) -> None:
    """A message with only one of Signature-Input and Signature is SignatureMissing."""
    request = signed_request(members["ed25519"])
    headers = CIMultiDict({present: request.headers[present]})

    with pytest.raises(SignatureMissing):
        parse_signature_input(headers)


@pytest.mark.parametrize(
    ("signature_input", "signature"),
    [
        ('gw=("@method";created=1', "gw=:AAAA:"),  # unterminated inner list
        ('gw=("@method");created=1;keyid="k"', "gw=:AAAA"),  # unterminated byte sequence
        ('gw=("@method");created=1;keyid="k", ', "gw=:AAAA:"),  # trailing comma
        ('gw=("@method");created=1;keyid="密钥"', "gw=:AAAA:"),  # non-ASCII
        ('gw=("@method");created=1;keyid="k"', "other=:AAAA:"),  # no Signature for gw
        ('gw="@method";created=1;keyid="k"', "gw=:AAAA:"),  # member not an inner list
        ("", "gw=:AAAA:"),  # empty dictionary
        ('gw=(@method);created=1;keyid="k"', "gw=:AAAA:"),  # bare @ is no SF item
        ('gw=(method);created=1;keyid="k"', "gw=:AAAA:"),  # component a token
        ('gw=("@method" 1);created=1;keyid="k"', "gw=:AAAA:"),  # component an integer
    ],
)
def test_malformed_fields_are_signature_invalid(signature_input: str, signature: str) -> None:
    """Fields that are not the dictionaries RFC 9421 needs are SignatureInvalid."""
    headers = CIMultiDict({"Signature-Input": signature_input, "Signature": signature})

    with pytest.raises(SignatureInvalid):
        parse_signature_input(headers)


@pytest.mark.parametrize(
    "params",
    [
        "created=1750000000",  # no keyid
        "created=1750000000;keyid=kid",  # keyid a token, not a string
    ],
)
def test_missing_keyid_is_signature_invalid(params: str) -> None:
    """A signature without a string keyid parameter is SignatureInvalid."""
    headers = CIMultiDict({"Signature-Input": f'gw=("@method");{params}', "Signature": "gw=:AA==:"})

    with pytest.raises(SignatureInvalid, match="keyid"):
        parse_signature_input(headers)


@pytest.mark.parametrize(
    "params",
    [
        'keyid="k"',  # no created
        'keyid="k";created="1750000000"',  # a string
        'keyid="k";created=1750000000.5',  # a decimal
        'keyid="k";created=?1',  # a boolean
        'keyid="k";created',  # a bare parameter (boolean true)
    ],
)
def test_missing_or_non_integer_created_is_signature_invalid(params: str) -> None:
    """A signature without an integer created parameter is SignatureInvalid."""
    headers = CIMultiDict({"Signature-Input": f'gw=("@method");{params}', "Signature": "gw=:AA==:"})

    with pytest.raises(SignatureInvalid, match="created"):
        parse_signature_input(headers)


def test_parsed_input_lists_bare_components_and_params(members: dict[str, Member]) -> None:
    """parse_signature_input returns the label, covered names and parameters in order."""
    request = signed_request(members["ed25519"], nonce="n-1")

    sig = parse_signature_input(request.headers)

    assert sig.label == "gw"
    assert sig.components == REQUEST_COMPONENTS
    assert sig.keyid == members["ed25519"].kid
    assert dict(sig.params) == {
        "created": NOW,
        "keyid": members["ed25519"].kid,
        "alg": "ed25519",
        "nonce": "n-1",
    }


# ---------------------------------------------------------------------------
# Verifier rejections


def test_alg_of_another_key_type_is_rejected(
    verifier: Verifier, members: dict[str, Member]
) -> None:
    """alg="ecdsa-p256-sha256" on a signature checked with an Ed25519 key is rejected."""
    request = signed_request(members["ed25519"])
    value = request.headers["Signature-Input"].replace('alg="ed25519"', 'alg="ecdsa-p256-sha256"')
    request = with_fields(request, Signature_Input=value)

    with pytest.raises(SignatureInvalid, match="alg"):
        verify(verifier, request, members["ed25519"].public)


@pytest.mark.parametrize("alg", ["rsa-v1_5-sha256", "hs2019", "none"])
def test_unknown_alg_is_rejected(alg: str, verifier: Verifier, members: dict[str, Member]) -> None:
    """An alg the gateway does not support is rejected before any key is used."""
    request = signed_request(members["ed25519"])
    value = request.headers["Signature-Input"].replace('alg="ed25519"', f'alg="{alg}"')
    request = with_fields(request, Signature_Input=value)

    with pytest.raises(SignatureInvalid, match="alg"):
        verify(verifier, request, members["ed25519"].public)


def test_signature_without_alg_is_accepted(verifier: Verifier, members: dict[str, Member]) -> None:
    """alg is optional: a signature without it verifies with the key's own algorithm."""
    request = signed_request(members["ed25519"], include_alg=False)

    verifier.verify(
        request, parse_signature_input(request.headers), members["ed25519"].public, fresh=True
    )


@pytest.mark.parametrize("left_out", ["gw-message-id", "content-digest", "@target-uri"])
def test_required_component_not_covered_is_rejected(
    left_out: str, verifier: Verifier, members: dict[str, Member]
) -> None:
    """A signature that does not cover a required component is rejected."""
    covered = [name for name in REQUEST_COMPONENTS if name != left_out]
    request = signed_request(members["ed25519"], components=covered)
    sig = parse_signature_input(request.headers)

    with pytest.raises(SignatureInvalid, match=left_out):
        verifier.verify(request, sig, members["ed25519"].public, required=REQUEST_COMPONENTS)


def test_dictionary_member_does_not_satisfy_a_required_field(
    verifier: Verifier, members: dict[str, Member]
) -> None:
    """Covering only "content-digest";key="sha-256" does not count as covering content-digest."""
    covered = [
        '"content-digest";key="sha-256"' if name == "content-digest" else name
        for name in REQUEST_COMPONENTS
    ]
    request = signed_request(members["ed25519"], components=covered)
    sig = parse_signature_input(request.headers)

    with pytest.raises(SignatureInvalid, match="content-digest"):
        verifier.verify(request, sig, members["ed25519"].public, required=REQUEST_COMPONENTS)


def test_non_integer_expires_is_signature_invalid(
    verifier: Verifier, members: dict[str, Member]
) -> None:
    """An expires parameter that is not an integer is SignatureInvalid."""
    request = signed_request(members["ed25519"])
    value = request.headers["Signature-Input"] + ';expires="tomorrow"'
    request = with_fields(request, Signature_Input=value)

    with pytest.raises(SignatureInvalid, match="expires"):
        verify(verifier, request, members["ed25519"].public)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Gw-Client", "city-120000"),
        ("Gw-Message-Id", "00000000-0000-4000-8000-000000000000"),
        ("Content-Type", "text/plain"),
        ("Content-Digest", content_digest(b"{}")),
    ],
)
def test_tampered_covered_header_is_rejected(
    name: str, value: str, verifier: Verifier, members: dict[str, Member]
) -> None:
    """Changing a covered header field after signing makes verification fail."""
    request = with_fields(signed_request(members["ed25519"]), **{name.replace("-", "_"): value})

    with pytest.raises(SignatureInvalid):
        verify(verifier, request, members["ed25519"].public)


def test_uncovered_header_may_change(verifier: Verifier, members: dict[str, Member]) -> None:
    """A header the signature does not cover can change without breaking it."""
    request = with_fields(signed_request(members["ed25519"]), traceparent="00-abc-def-01")

    verify(verifier, request, members["ed25519"].public)


@pytest.mark.parametrize(
    "url",
    [
        "https://gw.example.gov.cn/v1/exchange/population.lookup?region=120101",
        "https://gw.example.gov.cn/v1/exchange/tax.lookup?region=110101",
        "https://evil.example/v1/exchange/population.lookup?region=110101",
        "http://gw.example.gov.cn/v1/exchange/population.lookup?region=110101",
    ],
)
def test_tampered_url_is_rejected(url: str, verifier: Verifier, members: dict[str, Member]) -> None:
    """Changing the request's URL (covered as @target-uri) makes verification fail."""
    signed = signed_request(members["ed25519"])
    request = RequestView(signed.method, url, signed.headers)

    with pytest.raises(SignatureInvalid):
        verify(verifier, request, members["ed25519"].public)


def test_tampered_method_is_rejected(verifier: Verifier, members: dict[str, Member]) -> None:
    """Changing the method (covered as @method) makes verification fail."""
    signed = signed_request(members["ed25519"])
    request = RequestView("PUT", signed.url, signed.headers)

    with pytest.raises(SignatureInvalid):
        verify(verifier, request, members["ed25519"].public)


@pytest.mark.parametrize("created", [NOW - SKEW, NOW - 1, NOW, NOW + SKEW])
def test_created_within_skew_is_accepted(
    created: int, verifier: Verifier, members: dict[str, Member]
) -> None:
    """A created time within the skew either side of now is fresh."""
    request = signed_request(members["ed25519"], created=created)

    verify(verifier, request, members["ed25519"].public)


def test_created_in_the_future_beyond_skew_is_expired(
    verifier: Verifier, members: dict[str, Member]
) -> None:
    """A created time more than the skew ahead of now is SignatureExpired."""
    request = signed_request(members["ed25519"], created=NOW + SKEW + 1)

    with pytest.raises(SignatureExpired, match="future"):
        verify(verifier, request, members["ed25519"].public)


def test_created_too_old_is_expired(verifier: Verifier, members: dict[str, Member]) -> None:
    """A created time more than the skew before now is SignatureExpired."""
    request = signed_request(members["ed25519"], created=NOW - SKEW - 1)

    with pytest.raises(SignatureExpired, match="older"):
        verify(verifier, request, members["ed25519"].public)


def test_expires_in_the_past_is_expired(verifier: Verifier, members: dict[str, Member]) -> None:
    """A signature whose expires time has passed is SignatureExpired though created is fresh."""
    request = signed_request(members["ed25519"], created=NOW - 10, expires=NOW - 1)

    with pytest.raises(SignatureExpired, match="expired"):
        verify(verifier, request, members["ed25519"].public)


def test_expires_in_the_future_is_accepted(verifier: Verifier, members: dict[str, Member]) -> None:
    """A signature with a future expires time is accepted."""
    request = signed_request(members["ed25519"], created=NOW - 10, expires=NOW + 60)

    verify(verifier, request, members["ed25519"].public)


def test_stale_signature_verifies_with_freshness_off(
    verifier: Verifier, members: dict[str, Member]
) -> None:
    """fresh=False skips the created/expires policy but still checks the signature."""
    request = signed_request(members["ed25519"], created=NOW - 86_400, expires=NOW - 3_600)

    verifier.verify(
        request, parse_signature_input(request.headers), members["ed25519"].public, fresh=False
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signature_by_another_key_is_rejected(
    algorithm: str,
    verifier: Verifier,
    members: dict[str, Member],
    impostors: dict[str, Member],
) -> None:
    """A signature made with another key of the same type, under the same kid, is rejected."""
    real = members[algorithm]
    impostor = Member(
        kid=real.kid,
        algorithm=algorithm,
        private=impostors[algorithm].private,
        public=impostors[algorithm].public,
        keypair=None,
    )
    request = signed_request(impostor)

    with pytest.raises(SignatureInvalid):
        verify(verifier, request, real.public)


def test_keyid_of_another_key_is_rejected(verifier: Verifier, members: dict[str, Member]) -> None:
    """A signature whose keyid names another key than the one given is rejected."""
    request = signed_request(members["ed25519"])
    other = VerificationKey(
        kid="someone-else", algorithm="ed25519", key=members["ed25519"].public.key
    )

    with pytest.raises(SignatureInvalid):
        verify(verifier, request, other)


def test_first_of_several_labels_is_chosen(
    verifier: Verifier, members: dict[str, Member], impostors: dict[str, Member]
) -> None:
    """With several signatures the first label is verified, and a later one is ignored."""
    request = RequestView("POST", URL, gw_headers())
    peer_sign(request, members["ed25519"], label="first")
    peer_sign(request, impostors["ecdsa-p256-sha256"], label="second", append=True)

    sig = parse_signature_input(request.headers)
    result = verifier.verify(request, sig, members["ed25519"].public)

    assert (sig.label, result.label) == ("first", "first")
    with pytest.raises(SignatureInvalid):
        verifier.verify(request, sig, impostors["ecdsa-p256-sha256"].public)


def test_bad_first_label_is_not_rescued_by_a_good_second(
    verifier: Verifier, members: dict[str, Member], impostors: dict[str, Member]
) -> None:
    """A failing first signature is rejected even when a later label would verify."""
    request = RequestView("POST", URL, gw_headers())
    peer_sign(request, impostors["ed25519"], label="first")
    peer_sign(request, members["ed25519"], label="second", append=True)
    request = with_fields(
        request,
        Signature_Input=request.headers["Signature-Input"].replace(
            impostors["ed25519"].kid, members["ed25519"].kid
        ),
    )

    sig = parse_signature_input(request.headers)

    assert sig.label == "first"
    with pytest.raises(SignatureInvalid):
        verifier.verify(request, sig, members["ed25519"].public)


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_member_signed_request_verifies(
    algorithm: str, verifier: Verifier, members: dict[str, Member]
) -> None:
    """A request signed per PROTOCOL.md verifies with the member's key, for each algorithm."""
    member = members[algorithm]
    request = signed_request(member, nonce="nonce-1")
    sig = parse_signature_input(request.headers)

    result = verifier.verify(request, sig, member.public, required=REQUEST_COMPONENTS)

    assert (result.keyid, result.algorithm, result.created) == (member.kid, algorithm, NOW)
    assert result.nonce == "nonce-1"
    assert result.covered == REQUEST_COMPONENTS


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_response_is_bound_to_the_request_signature(
    algorithm: str, verifier: Verifier, members: dict[str, Member]
) -> None:
    """A response covering "signature";req fails once the request's Signature changes."""
    request = signed_request(members["ed25519"])
    response = answer_to(request)
    peer_sign(
        response,
        members[algorithm],
        components=(*RESPONSE_COMPONENTS, '"signature";req;key="gw"'),
    )
    sig = parse_signature_input(response.headers)
    verifier.verify(response, sig, members[algorithm].public, required=RESPONSE_COMPONENTS)

    other = signed_request(members["ed25519"], nonce="another request")
    rebound = ResponseView(response.status_code, response.headers, other)

    with pytest.raises(SignatureInvalid):
        verifier.verify(rebound, sig, members[algorithm].public)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signer_request_round_trip(
    algorithm: str, verifier: Verifier, members: dict[str, Member]
) -> None:
    """A request signed by Signer verifies with the matching key, for each algorithm."""
    member = members[algorithm]
    headers = gw_headers()
    del headers["Content-Digest"]

    member.signer().sign_request("POST", URL, headers, BODY, created=NOW, nonce="n-2")

    request = RequestView("POST", URL, headers)
    sig = parse_signature_input(headers)
    result = verifier.verify(request, sig, member.public, required=REQUEST_COMPONENTS)
    assert check_content_digest(headers["Content-Digest"], BODY)
    assert "gw-target" in result.covered
    assert result.nonce == "n-2"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signer_response_round_trip_binds_request(
    algorithm: str, members: dict[str, Member]
) -> None:
    """Signer.sign_response verifies, and fails once the request's Signature changes."""
    verifier = Verifier(skew_s=SKEW)  # sign_response stamps the real time
    request = signed_request(members["ed25519"])
    headers = CIMultiDict(
        {"Content-Type": "application/json", "Gw-Message-Id": request.headers["Gw-Message-Id"]}
    )

    members[algorithm].signer().sign_response(200, headers, ANSWER, request, "gw")

    response = ResponseView(200, headers, request)
    sig = parse_signature_input(headers)
    verifier.verify(response, sig, members[algorithm].public, required=RESPONSE_COMPONENTS)
    tampered = with_fields(request, Signature="gw=:" + base64.b64encode(b"x" * 64).decode() + ":")
    with pytest.raises(SignatureInvalid):
        verifier.verify(ResponseView(200, headers, tampered), sig, members[algorithm].public)


# ---------------------------------------------------------------------------
# Content-Digest (RFC 9530)


@pytest.mark.parametrize("algorithm", ["sha-256", "sha-512", "sm3"])
def test_content_digest_is_accepted(algorithm: str) -> None:
    """A sha-256, sha-512 or sm3 Content-Digest of the body is accepted; its sha-256 is returned."""
    value = content_digest(BODY, algorithm)

    assert value.startswith(f"{algorithm}=:")
    assert check_content_digest(value, BODY) == hashlib.sha256(BODY).hexdigest()


@pytest.mark.parametrize("algorithm", ["sha-256", "sha-512", "sm3"])
def test_content_digest_mismatch_is_rejected(algorithm: str) -> None:
    """A digest of another body is DigestMismatch."""
    with pytest.raises(DigestMismatch, match="does not match"):
        check_content_digest(content_digest(b"{}", algorithm), BODY)


def test_content_digest_of_unsupported_algorithm_only_is_rejected() -> None:
    """A field with only algorithms the gateway does not support (md5) is DigestMismatch."""
    md5 = base64.b64encode(b"\x00" * 16).decode()

    with pytest.raises(DigestMismatch, match="no supported algorithm"):
        check_content_digest(f"md5=:{md5}:", BODY)


def test_content_digest_ignores_unsupported_beside_supported() -> None:
    """An unsupported algorithm beside a matching sha-256 is ignored (RFC 9530 §2)."""
    md5 = base64.b64encode(b"\x00" * 16).decode()

    check_content_digest(f"md5=:{md5}:, {content_digest(BODY)}", BODY)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha-256",  # boolean member, no digest
        "sha-256=abc",  # token, not a byte sequence
        'sha-256="abc"',  # string, not a byte sequence
        "sha-256=:not base64!:",
        "sha-256=:AAAA",  # unterminated byte sequence
        "SHA-256=:AAAA:",  # keys are lowercase
        "sha-256=:4Y6Ij3bRfCmWPpM=:, =",
        "sha-256=:AAAA:;é",
        "摘要=:AAAA:",  # non-ASCII
    ],
)
def test_malformed_content_digest_is_rejected(value: str) -> None:
    """A Content-Digest that is not a dictionary of byte sequences is DigestMismatch."""
    with pytest.raises(DigestMismatch):
        check_content_digest(value, BODY)


@pytest.mark.parametrize("wrong", ["sha-256", "sha-512"])
def test_content_digest_with_one_mismatching_member_is_rejected(wrong: str) -> None:
    """With both sha-256 and sha-512 present, one that does not match is DigestMismatch."""
    members = {
        name: content_digest(b"{}" if name == wrong else BODY, name)
        for name in ("sha-256", "sha-512")
    }

    with pytest.raises(DigestMismatch, match=wrong):
        check_content_digest(", ".join(members.values()), BODY)


def test_content_digest_with_both_members_matching_is_accepted() -> None:
    """With both sha-256 and sha-512 present and matching, the field is accepted."""
    value = f"{content_digest(BODY, 'sha-256')}, {content_digest(BODY, 'sha-512')}"

    assert check_content_digest(value, BODY) == hashlib.sha256(BODY).hexdigest()


# ---------------------------------------------------------------------------
# keys


RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
        "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
        "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWh"
        "AI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_jwk_thumbprint_matches_rfc7638_example() -> None:
    """The thumbprint of the RFC 7638 §3.1 RSA key is the RFC's value (optional members ignored)."""
    assert jwk_thumbprint(RFC7638_JWK) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def _public_bytes(key: PublicKey | bytes) -> bytes:
    assert not isinstance(key, bytes)
    if isinstance(key, Sm2PublicKey):
        x, y = key.point()
        return x.to_bytes(32, "big") + y.to_bytes(32, "big")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("kind", "algorithm", "jwk_alg"),
    [
        ("ed25519", "ed25519", "EdDSA"),
        ("ecdsa-p256", "ecdsa-p256-sha256", "ES256"),
        ("rsa-pss", "rsa-pss-sha512", "PS512"),
        ("sm2", "sm2-sm3", "SM2-SM3"),
    ],
)
def test_public_jwk_round_trip(kind: str, algorithm: str, jwk_alg: str) -> None:
    """A generated key's public JWK loads back to the same public key, kid and algorithm."""
    private = generate("ed25519") if kind == "ed25519" else None
    if kind == "ecdsa-p256":
        private = generate("ecdsa-p256")
    if kind == "rsa-pss":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "sm2":
        private = generate("sm2")
    assert private is not None

    jwk = private_to_jwk(private)
    loaded = VerificationKey.from_jwk(jwk)

    assert (jwk["alg"], jwk["use"]) == (jwk_alg, "sig")
    assert jwk["kid"] == jwk_thumbprint(jwk)
    assert (loaded.kid, loaded.algorithm) == (jwk["kid"], algorithm)
    assert _public_bytes(loaded.key) == _public_bytes(private.public_key())


def test_generated_keys_have_the_expected_types() -> None:
    """generate() gives Ed25519, P-256 and 3072-bit RSA keys."""
    p256 = generate("ecdsa-p256")
    rsa_key = generate("rsa-pss")

    assert isinstance(generate("ed25519"), ed25519.Ed25519PrivateKey)
    assert isinstance(p256, ec.EllipticCurvePrivateKey)
    assert p256.curve.name == "secp256r1"
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert rsa_key.key_size == 3072


def test_oct_jwk_round_trip() -> None:
    """An oct JWK loads to its secret bytes with hmac-sha256."""
    secret = os.urandom(32)
    jwk = {"kty": "oct", "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode()}

    key = VerificationKey.from_jwk(jwk)

    assert (key.key, key.algorithm, key.kid) == (secret, "hmac-sha256", jwk_thumbprint(jwk))


@pytest.mark.parametrize("member", ["d", "p"])
def test_private_jwk_is_refused_as_public(member: str) -> None:
    """A JWK carrying private members is refused where a public key is expected."""
    jwk = {**RFC_KEYS["test-key-ed25519"]["jwk"], member: "AAAA"}

    with pytest.raises(ValueError, match="private JWK"):
        public_from_jwk(jwk)


@pytest.mark.parametrize("kid", ["test-key-ed25519", "test-key-ecc-p256", "test-key-rsa-pss"])
def test_jwk_alg_hs256_on_an_asymmetric_key_is_refused(kid: str) -> None:
    """An asymmetric JWK declaring the HMAC alg HS256 is refused like any other misfit alg."""
    jwk = {**RFC_KEYS[kid]["jwk"], "alg": "HS256"}

    with pytest.raises(ValueError, match="does not fit"):
        VerificationKey.from_jwk(jwk)


def test_jwk_alg_that_does_not_fit_the_key_is_refused() -> None:
    """A JWK declaring an alg of another key type is refused (no algorithm confusion)."""
    jwk = {**RFC_KEYS["test-key-ed25519"]["jwk"], "alg": "ES256"}

    with pytest.raises(ValueError, match="does not fit"):
        VerificationKey.from_jwk(jwk)


def test_write_keypair_writes_a_0600_pem(tmp_path: Path) -> None:
    """write_keypair writes an owner-only PEM and a JWK that load_keypair reads back."""
    pem, jwk_file = tmp_path / "keys" / "gw.pem", tmp_path / "keys" / "gw.jwk.json"

    pair = write_keypair(generate("ed25519"), pem, jwk_file, kid="gw-2025")
    loaded = load_keypair(pem, jwk_file)

    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert json.loads(jwk_file.read_text(encoding="utf-8"))["kid"] == "gw-2025"
    assert (loaded.kid, loaded.algorithm, dict(loaded.jwk)) == ("gw-2025", "ed25519", pair.jwk)


def test_write_keypair_tightens_an_existing_pem(tmp_path: Path) -> None:
    """Overwriting a group-readable PEM leaves it 0600."""
    pem = tmp_path / "gw.pem"
    pem.write_bytes(b"old")
    pem.chmod(0o644)

    write_keypair(generate("ecdsa-p256"), pem, tmp_path / "gw.jwk.json")

    assert stat.S_IMODE(pem.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_load_keypair_refuses_a_pem_others_can_read(tmp_path: Path, mode: int) -> None:
    """load_keypair refuses a PEM that group or others can access (ConfigError)."""
    pem = tmp_path / "gw.pem"
    write_keypair(generate("ed25519"), pem, tmp_path / "gw.jwk.json")
    pem.chmod(mode)

    with pytest.raises(ConfigError):
        load_keypair(pem)


def test_load_keypair_without_jwk_uses_the_thumbprint(tmp_path: Path) -> None:
    """Without a JWK file beside the PEM, the kid is the RFC 7638 thumbprint."""
    pem = tmp_path / "gw.pem"
    write_keypair(generate("ed25519"), pem, tmp_path / "gw.jwk.json", kid="named")

    pair = load_keypair(pem)

    assert pair.kid == jwk_thumbprint(pair.jwk)


def test_the_signer_puts_a_fresh_nonce_on_every_request(tmp_path: Path) -> None:
    """Relayed and cross-region requests need a nonce: each signed request carries a new
    one, that verifies; ``nonces=False`` signs without (for fixed vectors only)."""
    HEADERS = {"Content-Type": "application/json", "Gw-Client": "330000:a", "Gw-Message-Id": "m"}
    pair = write_keypair(generate("ed25519"), tmp_path / "k.pem", tmp_path / "k.jwk.json")
    seen = set()
    for _ in range(3):
        headers: CIMultiDict[str] = CIMultiDict(HEADERS)
        Signer(pair).sign_request("POST", URL, headers, BODY)
        sig = parse_signature_input(headers)
        verified = Verifier().verify(
            RequestView("POST", URL, headers), sig, VerificationKey.from_jwk(pair.jwk), fresh=False
        )
        assert verified.nonce is not None
        assert len(verified.nonce) >= 16
        seen.add(verified.nonce)
    assert len(seen) == 3
    headers = CIMultiDict(HEADERS)
    Signer(pair, nonces=False).sign_request("POST", URL, headers, BODY)
    assert "nonce=" not in headers["Signature-Input"]
    headers = CIMultiDict(HEADERS)
    Signer(pair).sign_request("POST", URL, headers, BODY, nonce="chosen")
    assert ';nonce="chosen"' in headers["Signature-Input"]
