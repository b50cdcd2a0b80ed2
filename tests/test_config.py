"""Configuration: schema checks, cross checks, file references, all problems located at once."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.model import (
    Config,
    jwk_path_for,
    listen_address,
    load_config,
    parse_config,
    region_within,
    warnings_of,
    with_listeners,
)
from gateway.errors import ConfigError
from tests.conftest import GATEWAY_ID, PEER_ID, PORTAL_ID, ROOT, SCHEMAS, Keys, config_document


def _doc(keys: Keys, tmp_path: Path) -> dict[str, Any]:
    return config_document(keys, store=tmp_path / "gateway.db", national_url="http://127.0.0.1:9")


def _problems(doc: Any, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, base=tmp_path)
    return list(caught.value.problems)


def test_full_document_parses_into_frozen_config(keys: Keys, tmp_path: Path) -> None:
    """The test config parses; key files and schema files are read into plain data."""
    config = parse_config(_doc(keys, tmp_path), base=tmp_path)
    assert config.gateway.member_id == GATEWAY_ID
    assert config.gateway.region == "330000"
    assert config.gateway.jwk_path == keys.directory / "gateway.jwk.json"
    assert config.members[0].id == PORTAL_ID
    assert config.members[0].keys[0]["kid"] == keys.pairs["portal"].kid
    assert config.members[2].enabled is False
    credit = config.services[0]
    assert isinstance(credit.request_schema, dict)
    assert credit.request_schema["title"].startswith("credit.query request")
    assert credit.max_body_bytes == 4096
    assert config.adapters[0].type == "http"
    assert [(r.service, r.adapter) for r in config.routes] == [
        ("credit.query", "national"),
        ("crossregion.apply", "national"),
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gateway.member_id = "x"  # type: ignore[misc]


def test_defaults_apply_when_sections_are_absent(keys: Keys, tmp_path: Path) -> None:
    """Without listen/store/security/delivery the documented defaults are used."""
    doc = _doc(keys, tmp_path)
    for section in ("store", "security", "delivery"):
        del doc[section]
    config = parse_config(doc, base=tmp_path)
    assert (config.ingress.host, config.ingress.port) == ("127.0.0.1", 8080)
    assert config.admin.port == 8081
    assert config.store.path == tmp_path / "var" / "gateway.db"
    assert config.store.synchronous == "normal"
    assert config.security.clock_skew_s == 300
    assert config.delivery.max_attempts == 10


def test_load_config_resolves_paths_relative_to_the_file(keys: Keys, tmp_path: Path) -> None:
    """Relative key, schema and store paths in a YAML file are read next to that file."""
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    shutil.copy(keys.jwk_file("portal"), tmp_path / "portal.jwk.json")
    doc = {
        "gateway": {"member_id": GATEWAY_ID, "key": "keys/gateway.pem"},
        "store": {"path": "data/gw.db"},
        "members": [
            {
                "id": PORTAL_ID,
                "kind": "system",
                "keys": ["portal.jwk.json"],
                "services": ["credit.query"],
            }
        ],
        "services": [
            {
                "code": "credit.query",
                "request_schema": "schemas/services/credit.query/request.json",
                "response_schema": "schemas/services/credit.query/response.json",
            }
        ],
        "adapters": [{"name": "canned", "type": "mock"}],
        "routes": [{"service": "credit.query", "adapter": "canned"}],
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    config = load_config(path)
    assert config.path == path.resolve()
    assert config.gateway.key_path == tmp_path.resolve() / "keys" / "gateway.pem"
    assert config.gateway.jwk_path == tmp_path.resolve() / "keys" / "gateway.jwk.json"
    assert config.store.path == tmp_path.resolve() / "data" / "gw.db"
    assert config.members[0].keys[0]["kid"] == keys.pairs["portal"].kid
    assert isinstance(config.services[0].request_schema, dict)
    assert config.services[0].request_schema["required"] == ["uscc", "scope", "purpose"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config file that cannot be read gives one problem naming the file."""
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert len(caught.value.problems) == 1
    assert "absent.yaml: cannot read" in caught.value.problems[0]


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    """Broken YAML is reported with the line and column where parsing failed."""
    path = tmp_path / "bad.yaml"
    path.write_text("gateway:\n  member_id: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert "not valid YAML at line" in problem
    assert "column" in problem


def test_non_mapping_document_is_rejected_at_the_root(tmp_path: Path) -> None:
    """A document that is not an object is reported at the root pointer."""
    problems = _problems(["not", "a", "mapping"], tmp_path)
    assert problems == ["/: ['not', 'a', 'mapping'] is not of type 'object'"]


def test_schema_violations_are_all_reported_with_their_pointers(keys: Keys, tmp_path: Path) -> None:
    """Several schema violations come back together, each prefixed by its JSON Pointer."""
    doc = _doc(keys, tmp_path)
    doc["members"][1]["id"] = "not-a-member-id"
    doc["services"][1]["mode"] = "later"
    doc["adapters"][0]["name"] = "Bad Name"
    doc["delivery"]["workers"] = 0
    doc["surprise"] = True
    problems = _problems(doc, tmp_path)
    prefixes = {p.split(": ", 1)[0] for p in problems}
    assert {
        "/members/1/id",
        "/services/1/mode",
        "/adapters/0/name",
        "/delivery/workers",
        "/",
    } <= prefixes
    assert all(p.startswith("/") for p in problems)


def test_missing_required_sections_are_reported(tmp_path: Path) -> None:
    """An empty document names every required top-level section."""
    problems = _problems({}, tmp_path)
    for section in ("gateway", "members", "services", "adapters", "routes"):
        assert any(p.startswith("/: ") and repr(section) in p for p in problems), section


def test_duplicate_ids_are_reported_per_section(keys: Keys, tmp_path: Path) -> None:
    """Members, services, adapters and routes defined twice each give a located problem."""
    doc = _doc(keys, tmp_path)
    doc["members"].append(dict(doc["members"][1]))
    doc["services"].append(dict(doc["services"][0]))
    doc["adapters"].append(dict(doc["adapters"][0]))
    doc["routes"].append(dict(doc["routes"][0]))
    problems = _problems(doc, tmp_path)
    assert "/members: member 330000:tax-system is defined twice" in problems
    assert "/services: service credit.query is defined twice" in problems
    assert "/adapters: adapter national is defined twice" in problems
    assert "/routes: route credit.query (target None) is defined twice" in problems


def test_routes_to_unknown_service_or_adapter_are_reported(keys: Keys, tmp_path: Path) -> None:
    """A route naming an undefined service or adapter is reported at that field."""
    doc = _doc(keys, tmp_path)
    doc["routes"].append({"service": "ghost.service", "adapter": "national"})
    doc["routes"].append({"service": "credit.query", "adapter": "nowhere", "target": PEER_ID})
    problems = _problems(doc, tmp_path)
    assert problems == [
        "/routes/2/service: unknown service ghost.service",
        "/routes/3/adapter: unknown adapter nowhere",
    ]


def test_service_without_route_is_a_warning_not_a_problem(keys: Keys, tmp_path: Path) -> None:
    """A service no route serves still loads; warnings_of names it at its location."""
    doc = _doc(keys, tmp_path)
    assert warnings_of(parse_config(doc, base=tmp_path)) == []
    doc["routes"] = doc["routes"][:1]
    config = parse_config(doc, base=tmp_path)
    assert warnings_of(config) == [
        "/services/1: service crossregion.apply has no route (answers 503)"
    ]


def test_an_async_route_to_an_adapter_without_a_receiver_is_a_warning(
    keys: Keys, tmp_path: Path
) -> None:
    """Callbacks are taken only from the receiver an adapter names: an async service routed
    to an http adapter without one loads, and warnings_of says its callbacks are 404."""
    doc = _doc(keys, tmp_path)
    del doc["adapters"][0]["config"]["receiver"]
    assert warnings_of(parse_config(doc, base=tmp_path)) == [
        f"/adapters/0/config: adapter national serves async {code} but names no "
        "receiver: every callback for it answers 404"
        for code in ("credit.query", "crossregion.apply")  # credit.query allows async
    ]


def test_member_granted_an_unknown_service_is_reported(keys: Keys, tmp_path: Path) -> None:
    """A member's services list may only name services that exist."""
    doc = _doc(keys, tmp_path)
    doc["members"][1]["services"] = ["credit.query", "ghost.lookup"]
    assert _problems(doc, tmp_path) == ["/members/1/services/1: unknown service ghost.lookup"]


def test_bad_inline_jwk_is_reported_at_the_key(keys: Keys, tmp_path: Path) -> None:
    """An inline JWK missing its public value is a problem at /members/i/keys/j."""
    doc = _doc(keys, tmp_path)
    doc["members"][1]["keys"].append({"kty": "OKP", "crv": "Ed25519"})
    doc["members"][3]["keys"] = [{"kty": "RSA", "n": "AQAB"}]
    problems = _problems(doc, tmp_path)
    assert problems == [
        "/members/1/keys/1: JWK lacks member 'x'",
        "/members/3/keys/0: JWK lacks member 'e'",
    ]


def test_private_jwk_is_refused_as_a_member_key(keys: Keys, tmp_path: Path) -> None:
    """A JWK carrying a private part is refused where a public key is expected."""
    doc = _doc(keys, tmp_path)
    jwk = dict(keys.pairs["portal"].jwk)
    jwk["d"] = "c2VjcmV0"
    doc["members"][0]["keys"] = [jwk]
    (problem,) = _problems(doc, tmp_path)
    assert problem.startswith("/members/0/keys/0: ")
    assert "private" in problem


def test_same_key_twice_in_a_member_is_reported(keys: Keys, tmp_path: Path) -> None:
    """Two keys with the same kid in one member are ambiguous and reported."""
    doc = _doc(keys, tmp_path)
    doc["members"][0]["keys"] = [keys.jwk_file("portal"), keys.jwk_file("portal")]
    assert _problems(doc, tmp_path) == [
        f"/members/0/keys: kid {keys.pairs['portal'].kid} appears twice"
    ]


def test_unreadable_and_non_json_references_are_reported(keys: Keys, tmp_path: Path) -> None:
    """A missing key file and a schema file that is not JSON are both located problems."""
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    doc = _doc(keys, tmp_path)
    doc["members"][0]["keys"] = ["missing.jwk.json"]
    doc["services"][0]["response_schema"] = "broken.json"
    problems = _problems(doc, tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("/members/0/keys/0: cannot read missing.jwk.json")
    assert problems[1].startswith("/services/0/response_schema: broken.json is not JSON")
    assert "line 1" in problems[1]


def test_invalid_service_schema_is_reported_with_inner_location(keys: Keys, tmp_path: Path) -> None:
    """A service schema that is not valid Draft 2020-12 names the part and the spot inside."""
    doc = _doc(keys, tmp_path)
    doc["services"][1]["request_schema"] = {"type": "object", "properties": {"a": {"type": 5}}}
    assert _problems(doc, tmp_path) == [
        "/services/1/request_schema: not a valid Draft 2020-12 schema at /properties/a/type"
    ]


def test_async_service_needs_a_callback_schema(keys: Keys, tmp_path: Path) -> None:
    """An async service without callback_schema is a problem at that field."""
    doc = _doc(keys, tmp_path)
    del doc["services"][1]["callback_schema"]
    assert _problems(doc, tmp_path) == ["/services/1/callback_schema: an async service needs one"]


def test_peer_gateway_needs_regions(keys: Keys, tmp_path: Path) -> None:
    """A member of kind gateway without regions is reported at its regions."""
    doc = _doc(keys, tmp_path)
    del doc["members"][4]["regions"]
    assert _problems(doc, tmp_path) == [
        "/members/4/regions: a peer gateway needs the regions it serves"
    ]


def test_every_cross_check_problem_is_reported_at_once(keys: Keys, tmp_path: Path) -> None:
    """Unrelated problems in different sections are all listed in one ConfigError."""
    doc = _doc(keys, tmp_path)
    del doc["members"][4]["regions"]
    del doc["services"][1]["callback_schema"]
    doc["routes"][0]["adapter"] = "nowhere"
    doc["members"][3]["keys"] = ["nope.json"]
    problems = _problems(doc, tmp_path)
    assert len(problems) == 4
    assert {p.split(":", 1)[0] for p in problems} == {
        "/members/3/keys/0",
        "/members/4/regions",
        "/services/1/callback_schema",
        "/routes/0/adapter",
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, base=tmp_path)
    assert str(caught.value) == "; ".join(problems)


def test_inline_schemas_and_keys_are_used_as_given(keys: Keys, tmp_path: Path) -> None:
    """Inline JWKs and schema objects pass through without touching the filesystem."""
    doc = _doc(keys, tmp_path)
    doc["members"][0]["keys"] = [dict(keys.pairs["portal"].jwk)]
    inline = json.loads((SCHEMAS / "credit.query" / "request.json").read_text(encoding="utf-8"))
    doc["services"][0]["request_schema"] = inline
    config = parse_config(doc, base=tmp_path / "elsewhere")
    assert config.members[0].keys[0] == keys.pairs["portal"].jwk
    assert config.services[0].request_schema == inline


def test_boolean_false_schema_is_kept(keys: Keys, tmp_path: Path) -> None:
    """A `false` request schema (the schema allows booleans) stays `false`, not `{}`."""
    doc = _doc(keys, tmp_path)
    doc["services"][0]["request_schema"] = False
    config: Config = parse_config(doc, base=tmp_path)
    assert config.services[0].request_schema is False


def test_jwk_path_sits_beside_the_pem() -> None:
    """keys/x.pem maps to keys/x.jwk.json."""
    assert jwk_path_for(Path("keys/gateway.pem")) == Path("keys/gateway.jwk.json")
    assert jwk_path_for(Path("/a/b/member")) == Path("/a/b/member.jwk.json")


@pytest.mark.parametrize(
    ("text", "address"),
    [("0.0.0.0:8080", ("0.0.0.0", 8080)), ("[::1]:81", ("::1", 81)), ("gw-2:0", ("gw-2", 0))],
)
def test_listen_address_reads_host_and_port(text: str, address: tuple[str, int]) -> None:
    """HOST:PORT, IPv6 in brackets, as --listen takes them."""
    assert listen_address(text) == address


@pytest.mark.parametrize("text", ["8080", ":8080", "host:", "host:http", "host:65536"])
def test_listen_address_refuses_what_is_not_host_and_port(text: str) -> None:
    """Anything else is refused with a message naming the value."""
    with pytest.raises(ValueError, match="HOST:PORT"):
        listen_address(text)


def test_with_listeners_overrides_the_listeners_and_the_document_alike(
    keys: Keys, tmp_path: Path
) -> None:
    """The override survives a re-parse of the raw document (each admin write does one);
    a listener not given keeps the file's, TLS included."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:1")
    doc["listen"] = {"admin": {"host": "127.0.0.1", "port": 9999}}
    doc["gateway"]["public_url"] = "https://gw.example"  # listening beyond loopback needs it
    config = with_listeners(parse_config(doc, base=tmp_path), ingress=("0.0.0.0", 8181))
    assert (config.ingress.host, config.ingress.port) == ("0.0.0.0", 8181)
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 9999)
    again = parse_config(dict(config.raw), base=tmp_path)
    assert (again.ingress.host, again.ingress.port, again.admin.port) == ("0.0.0.0", 8181, 9999)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "gw.internal"])
def test_listening_beyond_loopback_without_a_public_url_is_a_config_error(
    keys: Keys, tmp_path: Path, host: str
) -> None:
    """Without public_url the target would come from the Host header: refused, in the
    file and in a --listen override alike, naming /gateway/public_url."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:1")
    doc["listen"] = {"ingress": {"host": host, "port": 8080}}
    with pytest.raises(ConfigError, match=r"/gateway/public_url: .* beyond loopback"):
        parse_config(copy.deepcopy(doc), base=tmp_path)
    del doc["listen"]
    with pytest.raises(ConfigError, match="/gateway/public_url"):
        with_listeners(parse_config(copy.deepcopy(doc), base=tmp_path), ingress=(host, 8080))
    doc["gateway"]["public_url"] = ["https://gw.example/", "https://gw-2.example:8443"]
    config = with_listeners(parse_config(doc, base=tmp_path), ingress=(host, 8080))
    assert config.gateway.public_urls == ("https://gw.example", "https://gw-2.example:8443")
    assert config.gateway.public_url == "https://gw.example"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_listener_needs_no_public_url(keys: Keys, tmp_path: Path, host: str) -> None:
    """On loopback the target is the listener's bound address; no public_url is needed."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:1")
    doc["listen"] = {"ingress": {"host": host, "port": 8080}}
    assert parse_config(doc, base=tmp_path).gateway.public_urls == ()


def test_a_public_url_with_a_query_is_refused(keys: Keys, tmp_path: Path) -> None:
    """A public URL is scheme://host[:port][/path]; a query would change every target."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:1")
    doc["gateway"]["public_url"] = "https://gw.example/?x=1"
    with pytest.raises(ConfigError, match="without query or fragment"):
        parse_config(doc, base=tmp_path)


@pytest.mark.parametrize(
    ("region", "area", "within"),
    [
        ("330000", "330000", True),
        ("330100", "330000", True),
        ("330102", "330000", True),
        ("330102", "330100", True),
        ("330200", "330100", False),
        ("440000", "330000", False),
        ("330000", "100000", False),
        ("100000", "100000", True),
        ("330102", "330102", True),
        ("330103", "330102", False),
    ],
)
def test_region_within_follows_gb2260_levels(region: str, area: str, within: bool) -> None:
    """A province holds its cities and counties, a city its counties; 100000 only itself."""
    assert region_within(region, area) is within


def test_the_local_listener_and_mtls_members_parse(keys: Keys, tmp_path: Path) -> None:
    """listen.local and a member's auth/certificates/certificate_ca reach the frozen config;
    members without auth stay signature-only."""
    doc = _doc(keys, tmp_path)
    tls = {"cert": "s.crt", "key": "s.key", "client_ca": "ca.crt", "crl": "ca.crl"}
    doc["listen"] = {"local": {"port": 8443, "tls": tls}}
    doc["members"].append({"id": "330000:legacy", "kind": "system", "auth": ["mtls"],
                           "certificates": ["ab" * 32], "certificate_ca": "ca.crt"})  # fmt: skip
    config = parse_config(doc, base=tmp_path)
    assert config.local is not None
    assert (config.local.host, config.local.port) == ("127.0.0.1", 8443)
    assert config.local.crl == tmp_path / "ca.crl"
    legacy = config.members[-1]
    assert (legacy.auth, legacy.certificates) == (("mtls",), ("ab" * 32,))
    assert legacy.certificate_ca == tmp_path / "ca.crt"
    assert config.members[0].auth == ("signature",)


def test_mtls_rules_the_schema_cannot_see_are_reported(keys: Keys, tmp_path: Path) -> None:
    """A relay may not be mtls, a pinned fingerprint may not be revoked too, a local
    listener needs its client CA; an mtls member without certificates is a warning."""
    doc = _doc(keys, tmp_path)
    doc["members"][3]["auth"] = ["mtls"]  # the national platform
    doc["members"][0].update(certificates=["ab" * 32], revoked_certificates=["ab" * 32])
    problems = _problems(doc, tmp_path)
    assert "/members/3/auth: only a system may authenticate by mtls" in problems
    assert f"/members/0/certificates: {'ab' * 32} is revoked for this member" in problems
    doc = _doc(keys, tmp_path)
    doc["listen"] = {"local": {"port": 8443, "tls": {"cert": "s.crt", "key": "s.key"}}}
    assert any("client_ca" in p for p in _problems(doc, tmp_path))
    doc = _doc(keys, tmp_path)
    doc["members"][1]["auth"] = ["mtls"]
    assert warnings_of(parse_config(doc, base=tmp_path)) == [
        "/members/1: mtls member 330000:tax-system has no certificate (none admitted)",
        "/members/1: mtls member 330000:tax-system but no listen.local to come in",
    ]
