"""The one declaration of what is secret: pointers, placeholders, fingerprints, restore."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.http import HttpAdapter
from adapters.national import NationalPlatformAdapter
from adapters.peer import PeerGatewayAdapter
from gateway.config.secrets import (
    JWK_SECRET_MEMBERS,
    fingerprint,
    is_placeholder,
    placeholder,
    redact,
    redact_document,
    restore,
    schema_secret_pointers,
    secret_pointers,
    secrets_of,
)
from gateway.errors import SchemaInvalid
from tests.conftest import examples

SECRET_TEXT = st.text(min_size=1, max_size=60)
HEADER_NAME = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z")


def _adapter(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": "up", "type": "http", "config": {"url": "http://x/", "headers": headers}}


def test_fingerprint_is_the_first_eight_hex_digits_of_sha256() -> None:
    """A string's fingerprint is sha256(utf-8)[:8]; a placeholder says set and shows it."""
    assert fingerprint("Bearer abc") == hashlib.sha256(b"Bearer abc").hexdigest()[:8]
    assert placeholder("Bearer abc") == "set · " + fingerprint("Bearer abc")
    assert is_placeholder(placeholder("x"))
    assert not is_placeholder("set · xyz")
    assert fingerprint([{"r": "1"}]) == hashlib.sha256(b'[{"r":"1"}]').hexdigest()[:8]


def test_the_http_adapter_marks_every_header_value_write_only_and_others_inherit() -> None:
    """http's header values are writeOnly; national and peer expose no header config."""
    assert schema_secret_pointers(HttpAdapter.config_schema) == ["/headers/*"]
    for derived in (NationalPlatformAdapter, PeerGatewayAdapter):
        # Built on HttpAdapter without a headers field: nothing secret in their config
        # beyond inline JWKs (always checked).
        assert issubclass(derived, HttpAdapter)
        assert schema_secret_pointers(derived.config_schema) == []


def test_schema_walk_follows_combinators_items_and_patterns() -> None:
    """writeOnly is found under properties, items, prefixItems, patterns and oneOf."""
    schema = {
        "type": "object",
        "properties": {
            "password": {"type": "string", "writeOnly": True},
            "tokens": {"type": "array", "items": {"type": "string", "writeOnly": True}},
            "pair": {"prefixItems": [{"type": "string"}, {"writeOnly": True}]},
            "auth": {"oneOf": [{"type": "string"}, {"properties": {"key": {"writeOnly": True}}}]},
            "env": {"patternProperties": {"^S_": {"writeOnly": True}}},
            "plain": {"type": "string"},
        },
    }
    assert schema_secret_pointers(schema) == [
        "/auth/key",
        "/env/*",
        "/pair/1",
        "/password",
        "/tokens/*",
    ]


def test_every_private_or_symmetric_jwk_member_is_secret_wherever_a_jwk_appears() -> None:
    """d, p, q, dp, dq, qi, k, oth of a member's keys and of an adapter's inline keys."""
    private = {"kty": "RSA", "kid": "r", "n": "nn", "e": "AQAB"} | {
        m: f"v-{m}" for m in JWK_SECRET_MEMBERS
    }
    member = {"id": "330000:x", "kind": "system", "keys": [private]}
    assert secret_pointers("members", member) == sorted(f"/keys/0/{m}" for m in JWK_SECRET_MEMBERS)
    shown = redact("members", member)
    assert shown["keys"][0]["n"] == "nn"
    assert shown["keys"][0]["kid"] == "r"
    assert all(is_placeholder(shown["keys"][0][m]) for m in JWK_SECRET_MEMBERS)
    adapter = {
        "name": "a",
        "type": "peer_gateway",
        "config": {"peer_keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]},
    }
    assert secret_pointers("adapters", adapter) == ["/config/peer_keys/0/k"]
    assert secrets_of("adapters", adapter) == [("/config/peer_keys/0/k", "c2VjcmV0")]


@settings(max_examples=examples(200), deadline=None)
@given(headers=st.dictionaries(HEADER_NAME, SECRET_TEXT, min_size=1, max_size=4), k=SECRET_TEXT)
def test_no_written_secret_survives_redaction_and_the_view_restores_to_it(
    headers: dict[str, str], k: str
) -> None:
    """Property: a redacted view holds no secret's text; sending the view back restores it."""
    headers = {name: "s3cret-" + value for name, value in headers.items()}
    adapter = _adapter(headers)
    key = "s3cret-" + k
    member = {"id": "330000:x", "kind": "system", "keys": [{"kty": "oct", "k": key, "kid": "h"}]}
    for kind, item, values in (("adapters", adapter, headers.values()), ("members", member, [key])):
        shown = redact(kind, item)
        text = json.dumps(shown, ensure_ascii=False)
        assert "s3cret-" not in text
        assert all(placeholder(v) in text for v in values)
        assert restore(kind, shown, item) == item
        assert redact(kind, shown) == shown  # a placeholder stays itself


def test_a_placeholder_that_names_no_stored_secret_is_refused_with_its_pointer() -> None:
    """A fingerprint is never stored as if it were the secret: 422 at its pointer."""
    stored = _adapter({"Authorization": "Bearer old"})
    forged = _adapter({"Authorization": placeholder("Bearer something-else")})
    with pytest.raises(SchemaInvalid) as caught:
        restore("adapters", forged, stored)
    assert [e.pointer for e in caught.value.errors] == ["/config/headers/Authorization"]
    with pytest.raises(SchemaInvalid):
        restore("adapters", forged, None)  # a create has nothing stored


def test_a_new_value_replaces_and_an_untouched_placeholder_keeps() -> None:
    """Beside a kept secret (its placeholder), a newly typed one is taken as it is."""
    stored = _adapter({"Authorization": "Bearer old", "X-Api-Key": "key-1"})
    shown = redact("adapters", stored)
    shown["config"]["headers"]["X-Api-Key"] = "key-2"
    assert restore("adapters", shown, stored)["config"]["headers"] == {
        "Authorization": "Bearer old",
        "X-Api-Key": "key-2",
    }


def test_a_whole_document_is_redacted_resource_by_resource() -> None:
    """config export's view: members' and adapters' secrets out, the rest as it was."""
    doc = {
        "gateway": {"member_id": "330000:gateway"},
        "members": [{"id": "330000:x", "kind": "system", "keys": [{"kty": "oct", "k": "s3"}]}],
        "adapters": [_adapter({"Authorization": "Bearer t0ken"})],
    }
    text = json.dumps(redact_document(doc))
    assert "s3" not in text
    assert "t0ken" not in text
    assert "330000:gateway" in text


def test_a_secret_given_by_reference_is_shown_as_the_reference() -> None:
    """{"env": NAME} and {"file": PATH} name where a secret is; views keep them as written."""
    adapter = _adapter({"Authorization": {"env": "UPSTREAM_TOKEN"}, "X-Key": "raw"})
    shown = redact("adapters", adapter)
    assert shown["config"]["headers"]["Authorization"] == {"env": "UPSTREAM_TOKEN"}
    assert is_placeholder(shown["config"]["headers"]["X-Key"])


@settings(max_examples=examples(200), deadline=None)
@given(
    members=st.lists(st.sampled_from(sorted(JWK_SECRET_MEMBERS)), min_size=1, unique=True),
    value=SECRET_TEXT,
    header=HEADER_NAME,
)
def test_every_view_the_admin_api_and_console_build_hides_each_written_secret(
    members: list[str], value: str, header: str
) -> None:
    """Property: resource, audit and role views of members and adapters hold no secret text."""
    from gateway.admin.views import audit_view, resource_view
    from gateway.store import ChangeRecord

    secret = "s3cret-" + value
    jwk = {"kty": "RSA", "kid": "r", "n": "n", "e": "AQAB"} | dict.fromkeys(members, secret)
    member = {"id": "330000:x", "kind": "system", "keys": [jwk]}
    adapter = _adapter({header: secret})
    for kind, item in (("members", member), ("adapters", adapter)):
        entry = ChangeRecord(
            seq=1, at=0.0, actor="a", role="admin", action="update", kind=kind,
            resource_id="x", before=item, after=item,
        )  # fmt: skip
        for view in (resource_view(kind, item), audit_view(entry)):
            assert "s3cret-" not in json.dumps(view, ensure_ascii=False)
