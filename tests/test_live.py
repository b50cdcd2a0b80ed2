"""The live configuration across processes: two gateways on one store (a SQLite file, as
two workers share it; a PostgreSQL database, as two instances do), each with its own
store connections and runtime."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.errors import CertificateRevoked
from gateway.exchange.app import LIVE, RUNTIME, STORE
from gateway.exchange.certs import issue, make_ca
from gateway.exchange.mtls import LOCAL_TLS, PeerCertificate
from tests.conftest import (
    CREDIT_EXAMPLE,
    PORTAL_ID,
    TAX_ID,
    Harness,
    HarnessFactory,
    unused_port,
)
from tests.test_admin import _new_member

PINNED = "330000:pinned-desk"  # an mtls member authenticated by a pinned fingerprint


async def _call(h: Harness, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    async with h.admin.request(method, path, data=data, headers=h.auth()) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else None


async def _on(make_harness: HarnessFactory, store_url: str, *, local: bool = False) -> Harness:
    """A harness on ``store_url``; ``local``: credit.query answered by a mock registry here
    (a peer's own query is not the national platform's to relay: it refuses)."""

    def edit(doc: dict[str, Any]) -> None:
        if store_url.startswith("postgresql://"):
            doc["store"]["url"] = store_url
        if local:
            doc["adapters"].append(
                {"name": "registry", "type": "mock",
                 "config": {"responses": {"credit.query": {"body": REGISTRY_RECORD}}}}
            )  # fmt: skip
            doc["routes"] = [
                {**r, "adapter": "registry"} if r["service"] == "credit.query" else r
                for r in doc["routes"]
            ]

    if store_url.startswith("postgresql://"):
        return await make_harness(edit)
    return await make_harness(edit, store=Path(store_url))


async def _pair(make_harness: HarnessFactory, store_url: str) -> tuple[Harness, Harness]:
    return await _on(make_harness, store_url), await _on(make_harness, store_url)


async def test_a_revocation_on_one_gateway_is_refused_by_the_other_within_a_second(
    store_url: str, make_harness: HarnessFactory
) -> None:
    """The other gateway, which took no admin request, refuses the revoked key in < 1 s."""
    one, other = await _pair(make_harness, store_url)
    client = other.client("portal")
    assert (await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    kid = other.keys.pairs["portal"].kid
    assert (await _call(one, "DELETE", f"/admin/v1/members/{PORTAL_ID}/keys/{kid}"))[0] == 204
    revoked_at = time.monotonic()
    while (reply := await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 200:
        assert time.monotonic() - revoked_at < 1.0, "still authenticated after 1 s"
        await asyncio.sleep(0.02)
    assert (reply.status, reply.json()["code"]) == (401, "key_unknown")
    assert other.app[LIVE].version == one.app[LIVE].version


async def test_writes_to_different_resources_at_once_on_two_gateways_both_stay(
    store_url: str, make_harness: HarnessFactory
) -> None:
    """Compare-and-set on the version: the write that loses the race is retried on top of
    the other, so neither is lost, on either gateway, nor after a restart."""
    one, other = await _pair(make_harness, store_url)
    first, second = await asyncio.gather(
        _call(one, "PATCH", "/admin/v1/adapters/national", {"concurrency": 7}),
        _call(other, "PATCH", f"/admin/v1/members/{TAX_ID}", {"enabled": False}),
    )
    assert (first[0], second[0]) == (200, 200), (first, second)
    for h in (one, other):
        await h.wait_for(functools.partial(_both_applied, h), within_s=1.0)
    third = await _on(make_harness, store_url)  # a restart reads the same
    assert await _both_applied(third)


async def _both_applied(h: Harness) -> bool:
    live = h.app[LIVE]
    adapter, member = live.get("adapters", "national"), live.get("members", TAX_ID)
    assert adapter is not None
    assert member is not None
    return adapter.get("concurrency") == 7 and member.get("enabled") is False


async def test_writes_to_one_resource_at_once_on_two_gateways_lose_nothing_silently(
    store_url: str, make_harness: HarnessFactory, tmp_path: Path
) -> None:
    """Two keys added to one member at once: each answered 201 is stored; a write that
    would have overwritten the other's is refused with 409 resource_changed."""
    one, other = await _pair(make_harness, store_url)
    jwks = [_new_member(tmp_path, f"330000:k{i}")[0]["keys"][0] for i in range(2)]
    answers = await asyncio.gather(
        *(
            _call(h, "POST", f"/admin/v1/members/{TAX_ID}/keys", jwk)
            for h, jwk in zip((one, other), jwks, strict=True)
        )
    )
    statuses = sorted(status for status, _ in answers)
    assert statuses in ([201, 201], [201, 409]), answers
    for status, body in answers:
        if status == 409:
            assert body["code"] == "resource_changed"
    added = {jwk["kid"] for (status, _), jwk in zip(answers, jwks, strict=True) if status == 201}
    for h in (one, other):
        await h.wait_for(functools.partial(_kids, h, added), within_s=1.0)


async def _kids(h: Harness, expected: set[str]) -> bool:
    member = h.app[LIVE].get("members", TAX_ID)
    assert member is not None
    kids = {k["kid"] for k in member["keys"]}
    return expected <= kids and not ({k for k in kids if k not in expected} - _file_kids(h))


def _file_kids(h: Harness) -> set[str]:
    return {h.keys.pairs["tax"].kid}


# Admin writes on what the directory defines (issue 20, part 8) ---------------------------

DIRECTORY_PEER = "450000:gateway"
REGISTRY_RECORD = {
    "uscc": "91350100M000100Y43",
    "name": "模拟企业",
    "status": "active",
    "updated_at": "2026-11-26T00:00:00Z",
}


def _directory_peer(h: Harness, *names: str) -> Any:
    """A layer as the directory's would be: one peer gateway with the keys ``names``."""
    body = {
        "id": DIRECTORY_PEER,
        "kind": "gateway",
        "name": "gateway of 450000 (directory)",
        "keys": [dict(h.keys.pairs[n].jwk) for n in names],
        "regions": ["450000"],
        "services": ["credit.query"],
    }
    return lambda doc: [("members", DIRECTORY_PEER, body)]


async def _as_peer(h: Harness, key: str) -> tuple[int, str]:
    reply = await h.client(key, DIRECTORY_PEER).exchange("credit.query", CREDIT_EXAMPLE)
    return reply.status, reply.json().get("code", "") if reply.status != 200 else ""


async def test_an_admin_patch_on_a_directory_member_stores_only_what_it_changed(
    store_url: str, make_harness: HarnessFactory
) -> None:
    """PATCH enabled on a peer the directory defines stores {enabled}; a later directory
    version that revokes one of its keys still applies (the revoked key gets 401)."""
    h = await _on(make_harness, store_url, local=True)
    live = h.app[LIVE]
    await live.set_layer(_directory_peer(h, "peer", "stranger"))
    assert await _as_peer(h, "stranger") == (200, "")
    status, body = await _call(h, "PATCH", f"/admin/v1/members/{DIRECTORY_PEER}", {"enabled": True})
    assert status == 200, body
    assert {k["kid"] for k in body["keys"]} == {h.keys.pairs[n].kid for n in ("peer", "stranger")}
    stored = [b for _, rid, b in await h.app[STORE].load_overlay() if rid == DIRECTORY_PEER]
    assert stored == [{"id": DIRECTORY_PEER, "$patch": {"enabled": True}}]
    await live.set_layer(_directory_peer(h, "peer"))  # the directory revokes "stranger"
    assert await _as_peer(h, "stranger") == (401, "key_unknown")
    assert await _as_peer(h, "peer") == (200, "")
    # The operator's disabling survives the next directory version, on a restart too.
    status, _ = await _call(h, "PATCH", f"/admin/v1/members/{DIRECTORY_PEER}", {"enabled": False})
    assert status == 200
    await live.set_layer(_directory_peer(h, "peer", "tax"))
    assert await _as_peer(h, "peer") == (403, "client_disabled")
    again = await _on(make_harness, store_url, local=True)
    await again.app[LIVE].set_layer(_directory_peer(again, "peer"))
    assert await _as_peer(again, "peer") == (403, "client_disabled")


async def test_a_key_revoked_here_stays_revoked_whatever_the_directory_lists(
    store_url: str, make_harness: HarnessFactory
) -> None:
    """DELETE …/keys/{kid} on a directory peer is kept as a revocation over the layer."""
    h = await _on(make_harness, store_url, local=True)
    live = h.app[LIVE]
    await live.set_layer(_directory_peer(h, "peer", "stranger"))
    kid = h.keys.pairs["stranger"].kid
    status, _ = await _call(h, "DELETE", f"/admin/v1/members/{DIRECTORY_PEER}/keys/{kid}")
    assert status == 204
    await live.set_layer(_directory_peer(h, "peer", "stranger", "tax"))  # a new version
    assert await _as_peer(h, "stranger") == (401, "key_unknown")
    assert await _as_peer(h, "tax") == (200, "")


async def test_what_only_the_directory_may_change_is_refused_with_the_fields(
    store_url: str, make_harness: HarnessFactory
) -> None:
    """Adding a key to, re-pointing or deleting a directory peer is 422 naming the field;
    nothing is stored."""
    h = await _on(make_harness, store_url, local=True)
    await h.app[LIVE].set_layer(_directory_peer(h, "peer"))
    path = f"/admin/v1/members/{DIRECTORY_PEER}"
    jwk = dict(h.keys.pairs["stranger"].jwk)
    for method, sub, body, pointer in (
        ("POST", "/keys", jwk, "/keys"),
        ("PATCH", "", {"regions": ["330000"]}, "/regions"),
        ("DELETE", "", None, ""),
    ):
        status, problem = await _call(h, method, path + sub, body)
        assert status == 422, (method, problem)
        assert problem["code"] == "schema_invalid"
        assert "federation directory" in problem["title"] + problem["detail"]
        assert [e["pointer"] for e in problem["errors"]] == [pointer]
    assert not [rid for _, rid, _ in await h.app[STORE].load_overlay() if rid == DIRECTORY_PEER]
    assert await _as_peer(h, "stranger") == (401, "key_unknown")


async def test_a_certificate_revoked_on_one_gateway_is_refused_by_the_other_within_a_second(
    store_url: str, make_harness: HarnessFactory, tmp_path: Path
) -> None:
    """mTLS (issue 26): an admin revoking a pinned certificate on one gateway is in force on
    the other's local listener in < 1 s, through the live path keys use."""
    pki = tmp_path / "pki"
    make_ca(pki / "ca.crt", pki / "ca.key")
    server = issue(pki / "ca.crt", pki / "ca.key", pki / "s.crt", pki / "s.key",
                   hosts=["127.0.0.1"])  # fmt: skip
    pinned = issue(pki / "ca.crt", pki / "ca.key", pki / "p.crt", pki / "p.key", member=PINNED)
    fp = pinned.fingerprint
    tls = {"cert": str(server.cert), "key": str(server.key), "client_ca": str(pki / "ca.crt")}

    def edit(doc: dict[str, Any]) -> None:
        if store_url.startswith("postgresql://"):
            doc["store"]["url"] = store_url
        doc.setdefault("listen", {})["local"] = {"port": unused_port(), "tls": tls}
        doc["members"].append({"id": PINNED, "kind": "system", "auth": ["mtls"],
                               "certificates": [fp], "services": ["credit.query"]})  # fmt: skip

    kw: dict[str, Any] = {} if store_url.startswith("postgresql://") else {"store": Path(store_url)}
    one = await make_harness(edit, **kw)
    other = await make_harness(edit, **kw)
    cert = x509.load_pem_x509_certificate(pinned.cert.read_bytes())
    peer = PeerCertificate(cert, fp)
    local = other.app[LOCAL_TLS]
    assert local.member_of(other.app[RUNTIME].current, peer).id == PINNED
    async with one.admin.delete(
        f"/admin/v1/members/{PINNED}/certificates/{fp}", headers=one.auth()
    ) as resp:
        assert resp.status == 204, await resp.text()
    revoked_at = time.monotonic()
    while True:
        try:
            local.member_of(other.app[RUNTIME].current, peer)
        except CertificateRevoked:
            break
        assert time.monotonic() - revoked_at < 1.0, "still admitted after 1 s"
        await asyncio.sleep(0.02)
