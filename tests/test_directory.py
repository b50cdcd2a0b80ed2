"""The federation directory document: signing, what a follower refuses, the config layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config.model import RouteConfig, jwk_path_for
from gateway.config.outbound import OutboundPolicy
from gateway.crypto.keys import KeyPair, KeyType, generate, write_keypair
from gateway.encoding import iso_utc
from gateway.errors import DirectoryRefused
from gateway.federation.directory import (
    NATIONAL_ADAPTER,
    Directory,
    Publisher,
    check_succession,
    directory_layer,
    national_refusal,
    read_directory,
    region_within,
    screen,
    sign_directory,
    verify_directory,
)
from gateway.runtime.routing import RouteTable
from tests.conftest import make_keys

NOW = 1_800_000_000.0
LOOPBACK = OutboundPolicy.loopback()  # the documents below name http://127.0.0.1 URLs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("directory-keys")
    kinds: list[tuple[str, KeyType]] = [
        ("directory", "ed25519"),
        ("other", "ed25519"),
        ("p256", "ecdsa-p256"),
        ("a", "ed25519"),
        ("b", "ed25519"),
        ("b2", "ed25519"),
    ]
    return make_keys(d, dict(kinds)).pairs


def payload(pairs: dict[str, KeyPair], *, version: int = 2, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": "gw-directory/1",
        "issuer": "100000:national-platform",
        "version": version,
        "issued_at": iso_utc(NOW - 60),
        "expires_at": iso_utc(NOW + 3600),
        "national": {
            "member_id": "100000:national-platform",
            "url": "http://127.0.0.1:9000",
            "keys": [{"jwk": pairs["other"].jwk}],
            "vouches_for": ["100000"],
            "services": [{"code": "credit.query"}],
        },
        "regions": [
            {
                "region": "330000",
                "gateway": {
                    "member_id": "330000:gateway",
                    "url": "http://127.0.0.1:8080",
                    "keys": [{"jwk": pairs["a"].jwk}],
                    "vouches_for": ["330000"],
                    "services": [{"code": "evaluation.submit"}],
                },
            },
            {
                "region": "440000",
                "gateway": {
                    "member_id": "440000:gateway",
                    "url": "http://127.0.0.1:8090",
                    "keys": [
                        {"jwk": pairs["b2"].jwk},
                        {"jwk": pairs["b"].jwk, "valid_until": iso_utc(NOW + 30)},
                    ],
                    "vouches_for": ["440000"],
                    "services": [
                        {"code": "crossregion.apply", "via": "national"},
                        {"code": "credit.query"},
                    ],
                },
            },
        ],
    }
    return doc | over


def pinned(pairs: dict[str, KeyPair]) -> list[dict[str, Any]]:
    return [dict(pairs["directory"].jwk)]


def signed(pairs: dict[str, KeyPair], **kw: Any) -> str:
    return sign_directory(pairs["directory"], payload(pairs, **kw))


def test_a_signed_directory_reads_back_as_frozen_dataclasses(pairs: dict[str, KeyPair]) -> None:
    d = verify_directory(signed(pairs), pinned(pairs), now=NOW)
    assert d.version == 2
    assert d.kid == pairs["directory"].kid
    b = d.region("440000")
    assert b is not None
    assert b.gateway.member_id == "440000:gateway"
    assert [k.kid for k in b.gateway.keys] == [pairs["b2"].kid, pairs["b"].kid]
    assert [k.kid for k in b.gateway.keys if k.valid_at(NOW + 31)] == [pairs["b2"].kid]
    assert b.gateway.services[0].via == "national"
    with pytest.raises(AttributeError):
        d.version = 3  # type: ignore[misc]


def test_an_ecdsa_directory_key_signs_too(pairs: dict[str, KeyPair]) -> None:
    jws = sign_directory(pairs["p256"], payload(pairs))
    assert read_directory(jws, [pairs["p256"].jwk]).version == 2


@pytest.mark.parametrize("position", [5, 40, -3])
def test_a_flipped_byte_is_refused(pairs: dict[str, KeyPair], position: int) -> None:
    jws = signed(pairs)
    chars = list(jws)
    i = position % len(chars)
    while chars[i] == ".":
        i += 1
    chars[i] = "A" if chars[i] != "A" else "B"
    with pytest.raises(DirectoryRefused) as err:
        read_directory("".join(chars), pinned(pairs))
    assert err.value.reason in ("signature", "key_unknown", "malformed")


def test_a_directory_signed_by_another_key_is_refused(pairs: dict[str, KeyPair]) -> None:
    jws = sign_directory(pairs["other"], payload(pairs))
    with pytest.raises(DirectoryRefused) as err:
        read_directory(jws, pinned(pairs))
    assert err.value.reason == "key_unknown"


def test_another_key_claiming_the_pinned_kid_is_refused(pairs: dict[str, KeyPair]) -> None:
    impostor = KeyPair(
        kid=pairs["directory"].kid,
        algorithm=pairs["other"].algorithm,
        private=pairs["other"].private,
        jwk=pairs["other"].jwk,
    )
    with pytest.raises(DirectoryRefused) as err:
        read_directory(sign_directory(impostor, payload(pairs)), pinned(pairs))
    assert err.value.reason == "signature"


def test_a_checkpoint_jws_is_not_a_directory(pairs: dict[str, KeyPair]) -> None:
    from gateway.audit import sign_jws

    with pytest.raises(DirectoryRefused) as err:
        read_directory(sign_jws(pairs["directory"], payload(pairs)), pinned(pairs))
    assert err.value.reason == "signature"


def test_a_lower_version_is_a_rollback(pairs: dict[str, KeyPair]) -> None:
    current = read_directory(signed(pairs, version=5), pinned(pairs))
    with pytest.raises(DirectoryRefused) as err:
        verify_directory(signed(pairs, version=4), pinned(pairs), current=current, now=NOW)
    assert err.value.reason == "rollback"
    other = signed(pairs, version=5, issued_at=iso_utc(NOW - 10))
    with pytest.raises(DirectoryRefused, match="other content"):
        verify_directory(other, pinned(pairs), current=current, now=NOW)
    verify_directory(signed(pairs, version=6), pinned(pairs), current=current, now=NOW)


def test_an_expired_or_future_directory_is_refused(pairs: dict[str, KeyPair]) -> None:
    jws = signed(pairs, expires_at=iso_utc(NOW - 1))
    with pytest.raises(DirectoryRefused) as err:
        verify_directory(jws, pinned(pairs), now=NOW)
    assert err.value.reason == "expired"
    future = read_directory(signed(pairs, issued_at=iso_utc(NOW + 3600)), pinned(pairs))
    with pytest.raises(DirectoryRefused) as err:
        check_succession(future, None, now=NOW)
    assert err.value.reason == "future"


def test_a_private_key_in_the_directory_is_malformed(pairs: dict[str, KeyPair]) -> None:
    doc = payload(pairs)
    doc["national"]["keys"] = [{"jwk": {**pairs["other"].jwk, "d": "c2VjcmV0"}}]
    with pytest.raises(DirectoryRefused) as err:
        sign_directory(pairs["directory"], doc)
    assert err.value.reason == "malformed"


def _layer(d: Directory, now: float = NOW) -> dict[tuple[str, str], Any]:
    services = ["credit.query", "crossregion.apply", "evaluation.submit"]
    return {
        (k, i): b
        for k, i, b in directory_layer(
            d, own="330000:gateway", services=services, now=now, outbound=LOOPBACK
        )
    }


def test_the_layer_makes_peers_adapters_and_routes_by_region(pairs: dict[str, KeyPair]) -> None:
    layer = _layer(read_directory(signed(pairs), pinned(pairs)))
    b = layer[("members", "440000:gateway")]
    assert b["kind"] == "gateway"
    assert b["regions"] == ["440000"]
    assert b["services"] == ["evaluation.submit"]  # what A offers other regions
    assert [k["kid"] for k in b["keys"]] == [pairs["b2"].kid, pairs["b"].kid]
    assert ("members", "330000:gateway") not in layer  # never itself
    peer = layer[("adapters", "directory-440000")]
    assert peer["config"]["url"] == "http://127.0.0.1:8090"
    assert layer[("routes", "credit.query|440000:*")]["adapter"] == "directory-440000"
    assert layer[("routes", "crossregion.apply|440000:*")]["adapter"] == NATIONAL_ADAPTER
    assert layer[("routes", "credit.query|*")]["adapter"] == NATIONAL_ADAPTER


def test_a_retired_key_leaves_the_layer_when_its_overlap_ends(pairs: dict[str, KeyPair]) -> None:
    layer = _layer(read_directory(signed(pairs), pinned(pairs)), now=NOW + 31)
    assert [k["kid"] for k in layer[("members", "440000:gateway")]["keys"]] == [pairs["b2"].kid]


def test_a_region_route_sits_between_exact_and_catch_all() -> None:
    table = RouteTable(
        [
            RouteConfig(service="s.x", adapter="any"),
            RouteConfig(service="s.x", adapter="region", target="440000:*"),
            RouteConfig(service="s.x", adapter="exact", target="440000:tax"),
        ]
    )
    assert table.lookup("s.x", "440000:tax") == "exact"
    assert table.lookup("s.x", "440000:back-office") == "region"
    assert table.lookup("s.x", "330000:portal") == "any"
    assert table.lookup("s.x", None) == "any"


def test_the_publisher_signs_a_new_version_per_change(pairs: dict[str, KeyPair]) -> None:
    clock = [NOW]
    pub = Publisher(
        keypair=pairs["directory"],
        national=payload(pairs)["national"],
        validity_s=600,
        clock=lambda: clock[0],
    )
    pub.register("440000", payload(pairs)["regions"][1]["gateway"])
    first = pub.current()
    assert pub.current() == first  # nothing changed: same document, same version
    v1 = read_directory(first, pinned(pairs)).version
    assert pub.update("440000:gateway", {"keys": [{"jwk": pairs["b2"].jwk}]})
    assert not pub.update("440000:gateway", {"keys": [{"jwk": pairs["b2"].jwk}]})
    second = read_directory(pub.current(), pinned(pairs))
    assert second.version == v1 + 1
    assert [k.kid for k in second.regions[0].gateway.keys] == [pairs["b2"].kid]
    clock[0] += 301  # half the validity: re-signed, so a follower never sees it expire
    assert read_directory(pub.current(), pinned(pairs)).version == v1 + 2
    with pytest.raises(DirectoryRefused):
        pub.update("440000:gateway", {"keys": []})  # keeps the last valid registration
    assert pub.keys_of("440000:gateway") == [pairs["b2"].jwk]
    with pytest.raises(DirectoryRefused):
        pub.update("510000:gateway", {"keys": [{"jwk": pairs["b2"].jwk}]})


def test_the_cli_signs_and_verifies(
    pairs: dict[str, KeyPair], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from gateway.cli import main

    source = tmp_path / "payload.json"
    source.write_text(json.dumps(payload(pairs)), encoding="utf-8")
    key = tmp_path / "dir.pem"
    write_keypair(generate("ed25519"), key, jwk_path_for(key))
    out = tmp_path / "directory.jws"
    assert (
        main(
            [
                "directory",
                "sign",
                "--key",
                str(key),
                "--in",
                str(source),
                "--version",
                "9",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["directory", "verify", str(out), "--keys", str(jwk_path_for(key))]) == 0
    assert '"version": 9' in capsys.readouterr().out
    assert (
        main(
            [
                "directory",
                "verify",
                str(out),
                "--keys",
                str(jwk_path_for(key)),
                "--min-version",
                "10",
            ]
        )
        == 1
    )
    assert "refused (rollback)" in capsys.readouterr().err
    other = tmp_path / "other.jwk.json"
    other.write_text(json.dumps(pairs["other"].jwk), encoding="utf-8")
    assert main(["directory", "verify", str(out), "--keys", str(other)]) == 1
    assert "refused (key_unknown)" in capsys.readouterr().err
    assert main(["directory", "show", str(out)]) == 0
    assert '"440000:gateway"' in capsys.readouterr().out


# Trust rules: the directory only adds what is remote (issue 20, part 2) -----------------


def _entry(region: str, member: str, jwk: Any, **over: Any) -> dict[str, Any]:
    gateway = {
        "member_id": member,
        "url": f"http://127.0.0.1:9{region[:3]}",
        "keys": [{"jwk": jwk}],
        "vouches_for": [region],
        "services": [{"code": "credit.query"}],
    }
    return {"region": region, "gateway": gateway | over}


def _hostile(pairs: dict[str, KeyPair], *entries: dict[str, Any]) -> Directory:
    doc = payload(pairs)
    doc["regions"] = [*doc["regions"], *entries]
    return read_directory(sign_directory(pairs["directory"], doc), pinned(pairs))


def test_gb2260_containment_is_by_prefix_and_100000_contains_only_itself() -> None:
    """330100 and 330102 are within 330000, 440000 is not; 100000 is not every region."""
    assert region_within("330000", "330000")
    assert region_within("330100", "330000")
    assert region_within("330102", "330100")
    assert not region_within("440000", "330000")
    assert not region_within("330000", "330100")
    assert not region_within("330000", "100000")
    assert not region_within("110000", "100000")


def test_an_entry_whose_gateway_is_a_local_id_is_refused_and_adds_nothing(
    pairs: dict[str, KeyPair],
) -> None:
    """A 450000 entry naming 330000:one-stop-portal is refused; the portal is not redefined."""
    d = _hostile(pairs, _entry("450000", "330000:one-stop-portal", pairs["other"].jwk))
    kept, refused = screen(d, own="330000:gateway", local=["330000:one-stop-portal"])
    assert [r.reason for r in refused] == ["foreign_member"]
    assert "450000" not in {e.region for e in kept}
    layer = _layer(d)
    assert ("members", "330000:one-stop-portal") not in layer
    assert not [k for k in layer if k[1].endswith("450000:*") or k[1] == "directory-450000"]


def test_a_sub_region_entry_adds_no_member_and_no_route_for_the_follower(
    pairs: dict[str, KeyPair],
) -> None:
    """A 330100 entry (a city of 330000) routes nothing and defines nothing at 330000."""
    d = _hostile(pairs, _entry("330100", "330100:gateway", pairs["other"].jwk))
    _, refused = screen(d, own="330000:gateway")
    assert refused == ()  # left out, not an error: the city is simply ours to route
    layer = _layer(d)
    assert not [k for k in layer if "330100" in k[1]]


def test_an_entry_vouching_outside_its_region_or_for_a_local_member_is_refused(
    pairs: dict[str, KeyPair],
) -> None:
    """Vouching for 330000 from a 450000 entry, or a 460000 entry for a member defined in
    the file, are refused; the document's other entries still apply."""
    d = _hostile(
        pairs,
        _entry("450000", "450000:gateway", pairs["other"].jwk, vouches_for=["450000", "330000"]),
        _entry("460000", "460000:gateway", pairs["p256"].jwk),
    )
    kept, refused = screen(d, own="330000:gateway", local=["460000:gateway"])
    assert sorted(r.reason for r in refused) == ["foreign_vouch", "local_member"]
    assert [e.region for e in kept] == ["440000"]
    services = ["credit.query"]
    changes = directory_layer(
        d, own="330000:gateway", services=services, now=NOW, outbound=LOOPBACK,
        defined={"members": ["460000:gateway"]},
    )  # fmt: skip
    ids = {(k, i) for k, i, _ in changes}
    assert ("members", "440000:gateway") in ids
    assert ("members", "460000:gateway") not in ids
    assert ("members", "450000:gateway") not in ids


def test_the_layer_never_replaces_a_route_or_adapter_defined_here(
    pairs: dict[str, KeyPair],
) -> None:
    """A file route credit.query|440000:* and an adapter named directory-440000 stay."""
    d = read_directory(signed(pairs), pinned(pairs))
    changes = directory_layer(
        d, own="330000:gateway", services=["credit.query"], now=NOW, outbound=LOOPBACK,
        defined={"routes": ["credit.query|440000:*"], "adapters": ["directory-440000"]},
    )  # fmt: skip
    ids = {(k, i) for k, i, _ in changes}
    assert ("routes", "credit.query|440000:*") not in ids
    assert ("adapters", "directory-440000") not in ids
    assert ("members", "440000:gateway") in ids


def test_a_national_party_outside_100000_is_not_applied(pairs: dict[str, KeyPair]) -> None:
    """A directory whose national party is 330000:one-stop-portal adds no platform."""
    doc = payload(pairs)
    doc["national"]["member_id"] = "330000:one-stop-portal"
    d = read_directory(sign_directory(pairs["directory"], doc), pinned(pairs))
    assert national_refusal(d, own="330000:gateway") is not None
    layer = _layer(d)
    assert ("members", "330000:one-stop-portal") not in layer
    assert ("adapters", NATIONAL_ADAPTER) not in layer
    assert all(b is None or b.get("adapter") != NATIONAL_ADAPTER for b in layer.values())


def test_a_relay_never_vouches_for_the_followers_region(pairs: dict[str, KeyPair]) -> None:
    """The national party's vouches_for 330000 is dropped at the 330000 follower."""
    doc = payload(pairs)
    doc["national"]["vouches_for"] = ["100000", "330000", "330100"]
    d = read_directory(sign_directory(pairs["directory"], doc), pinned(pairs))
    assert _layer(d)[("members", "100000:national-platform")]["regions"] == ["100000"]


# Announcements are single use (issue 20, part 4) ------------------------------------------


def _publisher(pairs: dict[str, KeyPair], clock: list[float], **kw: Any) -> Publisher:
    pub = Publisher(
        keypair=pairs["directory"],
        national=payload(pairs)["national"],
        clock=lambda: clock[0],
        **kw,
    )
    pub.register(
        "440000",
        {"member_id": "440000:gateway", "url": "http://127.0.0.1:8090",
         "keys": [{"jwk": pairs["b"].jwk}], "vouches_for": ["440000"]},
    )  # fmt: skip
    return pub


def _said(clock: list[float], keys: list[Any], ident: str) -> dict[str, Any]:
    return {"member_id": "440000:gateway", "id": ident,
            "issued_at": iso_utc(clock[0], millis=True), "keys": keys}  # fmt: skip


def test_a_retired_key_may_not_sign_an_announcement(pairs: dict[str, KeyPair]) -> None:
    """After a rotation the old key still signs exchanges in its overlap, not announcements."""
    clock = [NOW]
    pub = _publisher(pairs, clock)
    rotated = [{"jwk": pairs["b2"].jwk}, {"jwk": pairs["b"].jwk, "valid_until": iso_utc(NOW + 600)}]
    assert pub.announce("440000:gateway", _said(clock, rotated, "r1"))
    assert pairs["b"].jwk in pub.keys_of("440000:gateway")
    assert pub.announcing_keys_of("440000:gateway") == [pairs["b2"].jwk]


def test_a_replayed_or_older_announcement_is_refused(pairs: dict[str, KeyPair]) -> None:
    """The same id again, or an issue time before the last accepted, changes nothing."""
    clock = [NOW]
    pub = _publisher(pairs, clock)
    first = _said(clock, [{"jwk": pairs["b"].jwk}], "one")
    assert not pub.announce("440000:gateway", first)
    clock[0] += 1
    rotated = [{"jwk": pairs["b2"].jwk}, {"jwk": pairs["b"].jwk, "valid_until": iso_utc(NOW + 600)}]
    assert pub.announce("440000:gateway", _said(clock, rotated, "two"))
    for replay, reason in ((first, "replayed"), ({**first, "id": "three"}, "older")):
        with pytest.raises(DirectoryRefused) as err:
            pub.announce("440000:gateway", replay)
        assert err.value.reason == reason
    assert pub.announcing_keys_of("440000:gateway") == [pairs["b2"].jwk]
    with pytest.raises(DirectoryRefused) as err:
        pub.announce("440000:gateway", {k: v for k, v in first.items() if k != "id"})
    assert err.value.reason == "malformed"
    clock[0] += 1000
    with pytest.raises(DirectoryRefused) as err:  # captured, never delivered, used late
        pub.announce("440000:gateway", _said([NOW + 2], rotated, "four"))
    assert err.value.reason == "stale"


def test_a_rotation_never_brings_a_retired_key_back(pairs: dict[str, KeyPair]) -> None:
    """A retired key listed as current again, or with a longer overlap, is refused."""
    clock = [NOW]
    pub = _publisher(pairs, clock)
    retired = {"jwk": pairs["b"].jwk, "valid_until": iso_utc(NOW + 600)}
    assert pub.announce("440000:gateway", _said(clock, [{"jwk": pairs["b2"].jwk}, retired], "1"))
    clock[0] += 1
    for keys in (
        [{"jwk": pairs["b2"].jwk}, {"jwk": pairs["b"].jwk}],
        [{"jwk": pairs["b2"].jwk}, {**retired, "valid_until": iso_utc(NOW + 6000)}],
    ):
        with pytest.raises(DirectoryRefused) as err:
            pub.announce("440000:gateway", _said(clock, keys, f"x{len(str(keys))}"))
        assert err.value.reason == "retired_key"
    # The same overlap again is fine (a restart re-announces what the rotation said).
    assert not pub.announce(
        "440000:gateway", _said(clock, [{"jwk": pairs["b2"].jwk}, retired], "2")
    )


def test_the_publishers_memory_survives_a_restart(
    pairs: dict[str, KeyPair], tmp_path: Path
) -> None:
    """With a state file, a restarted publisher refuses a replay, keeps the announced keys
    and signs a higher version than before."""
    clock = [NOW]
    state = tmp_path / "publisher.json"
    pub = _publisher(pairs, clock, state_path=state)
    said = _said(clock, [{"jwk": pairs["b2"].jwk}], "once")
    assert pub.announce("440000:gateway", said)
    before = read_directory(pub.current(), pinned(pairs)).version
    again = _publisher(pairs, clock, state_path=state)  # registers B's first key again
    assert again.announcing_keys_of("440000:gateway") == [pairs["b2"].jwk]
    with pytest.raises(DirectoryRefused) as err:
        again.announce("440000:gateway", said)
    assert err.value.reason == "replayed"
    assert read_directory(again.current(), pinned(pairs)).version > before
