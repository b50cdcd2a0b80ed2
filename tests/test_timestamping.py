"""Third-party time: every checkpoint stamped by a real RFC 3161 TSA (``openssl ts -reply``
behind a loopback server, tests/tsa.py), on both store backends; a TSA outage never stops
exchanges; audit verify and evidence bundles check the stamps, the latter with openssl."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import hashlib
import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.audit import canonical_bundle, check_bundle, make_checkpoint, verify_store
from gateway.audit.timestamping import (
    StampTrust,
    check_stamp,
    request_stamp,
    stamp_checkpoints,
    stamped_data,
)
from gateway.cli import main
from gateway.config.model import TimestampingConfig, parse_config
from gateway.errors import ConfigError, TimestampError
from gateway.exchange.app import STAMPER, STORE
from gateway.store import NewMessage, Store
from tests.conftest import (
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    PORTAL_ID,
    Harness,
    HarnessFactory,
    Keys,
    config_document,
    store_at,
)
from tests.tsa import TsaPki, TsaServer, make_pki, openssl

pytestmark = pytest.mark.integration  # a real TSA: openssl runs for every stamp


@pytest.fixture(scope="session")
def tsa_pki(tmp_path_factory: pytest.TempPathFactory) -> TsaPki:
    """The TSA's CA, key and certificate (critical EKU timeStamping), made per session."""
    return make_pki(tmp_path_factory.mktemp("tsa"))


@pytest.fixture(scope="session")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> TsaPki:
    """Another TSA, under a CA the gateway does not trust: an attacker's stamps."""
    return make_pki(tmp_path_factory.mktemp("rogue"), "Rogue TSA")


@asynccontextmanager
async def _serving(pki: TsaPki) -> AsyncIterator[tuple[TsaServer, str]]:
    tsa = TsaServer(pki)
    server = TestServer(tsa.app())
    await server.start_server()
    try:
        yield tsa, str(server.make_url("/"))
    finally:
        await server.close()


@pytest.fixture
async def tsa(tsa_pki: TsaPki) -> AsyncIterator[tuple[TsaServer, str]]:
    """A running TSA and its URL."""
    async with _serving(tsa_pki) as served:
        yield served


@pytest.fixture
async def any_store(store_url: str) -> AsyncIterator[Store]:
    s = store_at(store_url)
    await s.open()
    yield s
    await s.close()


def _config(pki: TsaPki, url: str) -> TimestampingConfig:
    return TimestampingConfig(url=url, ca=pki.ca, cert=pki.cert, timeout_s=5.0)


async def _checkpoint(store: Store, keys: Keys) -> None:
    body = b'{"uscc": "x"}'
    await store.insert_message(
        NewMessage(
            message_id=str(uuid.uuid4()),
            client=PORTAL_ID,
            service="credit.query",
            mode="sync",
            state="accepted",
            request_headers={"Gw-Client": PORTAL_ID},
            request_body=body,
            request_digest=hashlib.sha256(body).hexdigest(),
        )
    )
    assert await make_checkpoint(store, keys.pairs["gateway"], GATEWAY_ID) is not None


def _jwks(keys: Keys) -> dict[str, Any]:
    return {"keys": [dict(keys.pairs["gateway"].jwk)]}


async def _replace_stamp(url: str, checkpoint_id: int, tsr: bytes) -> None:
    """Write a stamp behind the gateway's back, as an operator with database access could."""
    if url.startswith("postgresql://"):
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "UPDATE checkpoint_stamps SET tsr = $1 WHERE checkpoint_id = $2", tsr, checkpoint_id
            )
        finally:
            await conn.close()
        return
    with sqlite3.connect(url) as db:
        db.execute(
            "UPDATE checkpoint_stamps SET tsr = ? WHERE checkpoint_id = ?", (tsr, checkpoint_id)
        )


# The stamp itself ------------------------------------------------------------------------


async def test_each_checkpoint_gets_one_stamp_of_its_signed_jws_with_nonce_and_cert(
    any_store: Store, keys: Keys, tsa: tuple[TsaServer, str], tsa_pki: TsaPki
) -> None:
    """One request per checkpoint: SHA-256 imprint of the JWS, nonce and certReq on; kept."""
    server, url = tsa
    config, trust = _config(tsa_pki, url), StampTrust.load(tsa_pki.ca, tsa_pki.cert)
    await _checkpoint(any_store, keys)
    await _checkpoint(any_store, keys)
    count, oldest = await any_store.stamp_backlog()
    assert count == 2
    assert oldest is not None
    assert time.time() - 30 < oldest <= time.time()
    async with aiohttp.ClientSession() as session:
        assert await stamp_checkpoints(any_store, session, config, trust, lease_s=30) == 2
        assert await stamp_checkpoints(any_store, session, config, trust, lease_s=30) == 0
    assert server.stamped == 2
    assert await any_store.stamp_backlog() == (2 - 2, None)
    async with any_store.snapshot() as snap:
        cps, kept = await snap.checkpoints(), await snap.stamps()
    assert sorted(kept) == [cp.id for cp in cps]
    for cp in cps:
        stamp = check_stamp(kept[cp.id], stamped_data(cp), trust, not_before=cp.at)
        assert cp.at - 5 <= stamp.gen_time <= time.time() + 5
    # The query as the TSA received it, read by openssl (an independent parser).
    query = server.queries[-1]
    text = _run([openssl, "ts", "-query", "-in", str(query), "-text"]).stdout
    assert "Hash Algorithm: sha256" in text
    assert "Nonce: 0x" in text
    assert "Certificate required: yes" in text


async def test_a_stamp_from_an_untrusted_tsa_is_refused_and_nothing_is_kept(
    any_store: Store, keys: Keys, rogue_pki: TsaPki, tsa_pki: TsaPki
) -> None:
    """A TSA whose certificate does not chain to timestamping.ca: forged, never stored."""
    await _checkpoint(any_store, keys)
    trust = StampTrust.load(tsa_pki.ca, tsa_pki.cert)
    async with _serving(rogue_pki) as (rogue, url), aiohttp.ClientSession() as session:
        with pytest.raises(TimestampError) as caught:
            await stamp_checkpoints(any_store, session, _config(tsa_pki, url), trust, lease_s=30)
    assert caught.value.reason == "forged"
    assert rogue.stamped == 1
    assert (await any_store.stamp_backlog())[0] == 1
    async with any_store.snapshot() as snap:
        assert await snap.stamps() == {}


async def test_a_reply_for_other_data_is_refused_as_mismatched(
    tsa: tuple[TsaServer, str], tsa_pki: TsaPki
) -> None:
    """A genuine stamp replayed: of other bytes, for another nonce, or dated before the
    checkpoint, it does not pass."""
    _, url = tsa
    trust = StampTrust.load(tsa_pki.ca)
    async with aiohttp.ClientSession() as session:
        tsr, _ = await request_stamp(session, url, b"checkpoint one", trust, timeout_s=5)
    with pytest.raises(TimestampError) as caught:
        check_stamp(tsr, b"checkpoint two", trust)
    assert caught.value.reason == "mismatched"
    with pytest.raises(TimestampError) as caught:
        check_stamp(tsr, b"checkpoint one", trust, nonce=12345)  # the answer to another query
    assert caught.value.reason == "forged"
    assert "Nonce mismatch" in caught.value.detail
    with pytest.raises(TimestampError) as caught:
        check_stamp(tsr, b"checkpoint one", trust, not_before=time.time() + 3600)
    assert caught.value.reason == "untimely"
    with pytest.raises(TimestampError) as caught:
        check_stamp(b"\x30\x03\x02\x01\x00", b"checkpoint one", trust)
    assert caught.value.reason == "malformed"


async def test_a_redirecting_or_oversized_tsa_answer_gives_no_stamp(
    tsa: tuple[TsaServer, str], tsa_pki: TsaPki
) -> None:
    """A redirect is never followed (the real TSA behind it is not asked), and an answer
    past 64 KiB is not read in full: neither is a stamp."""
    server, url = tsa
    app = web.Application()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(url)

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"\x30" * (1 << 20), content_type="application/timestamp-reply")

    app.router.add_post("/redirect", redirect)
    app.router.add_post("/huge", huge)
    trust = StampTrust.load(tsa_pki.ca)
    async with TestServer(app) as other, aiohttp.ClientSession() as session:
        for path, reason, detail in (
            ("/redirect", "unavailable", "HTTP 302"),
            ("/huge", "malformed", "exceeds 65536 bytes"),
        ):
            with pytest.raises(TimestampError) as caught:
                await request_stamp(session, str(other.make_url(path)), b"x", trust, timeout_s=5)
            assert caught.value.reason == reason
            assert detail in caught.value.detail
    assert server.requests == 0


async def test_two_instances_on_one_store_ask_the_tsa_once_per_checkpoint(
    store_url: str, keys: Keys, tsa: tuple[TsaServer, str], tsa_pki: TsaPki
) -> None:
    """Claims are leases: concurrent stampers never both stamp one checkpoint; a dead
    instance's claim is taken over once its lease ran out."""
    server, url = tsa
    config, trust = _config(tsa_pki, url), StampTrust.load(tsa_pki.ca)
    first, second, third = (store_at(store_url, instance=name) for name in "abc")
    for s in (first, second, third):
        await s.open()
    try:
        for _ in range(4):
            await _checkpoint(first, keys)
        async with aiohttp.ClientSession() as session:
            done = await asyncio.gather(
                *(
                    stamp_checkpoints(s, session, config, trust, lease_s=30)
                    for s in (first, second, third)
                )
            )
            assert sum(done) == 4
            assert server.requests == 4
            # Instance a claims a fifth checkpoint and dies before asking the TSA.
            await _checkpoint(first, keys)
            assert len(await first.claim_unstamped(time.time(), 0.2, 20)) == 1
            assert await stamp_checkpoints(second, session, config, trust, lease_s=30) == 0
            await asyncio.sleep(0.3)
            assert await stamp_checkpoints(second, session, config, trust, lease_s=30) == 1
        assert server.requests == 5
        assert await first.stamp_backlog() == (0, None)
    finally:
        for s in (first, second, third):
            await s.close()


# audit verify ----------------------------------------------------------------------------


async def test_audit_verify_names_a_forged_and_a_mismatched_stamp(
    store_url: str, keys: Keys, tsa: tuple[TsaServer, str], tsa_pki: TsaPki, rogue_pki: TsaPki
) -> None:
    """Stamps swapped between checkpoints, or replaced by another TSA's, are named."""
    _, url = tsa
    config, trust = _config(tsa_pki, url), StampTrust.load(tsa_pki.ca, tsa_pki.cert)
    store = store_at(store_url)
    await store.open()
    try:
        for _ in range(3):
            await _checkpoint(store, keys)
        async with aiohttp.ClientSession() as session:
            assert await stamp_checkpoints(store, session, config, trust, lease_s=30) == 3
            report = await verify_store(store, _jwks(keys), gateway=GATEWAY_ID, tsa=trust)
            assert report.ok, report.findings
            assert (report.stamped, report.unstamped) == (3, 0)
            async with store.snapshot() as snap:
                cps, kept = await snap.checkpoints(), await snap.stamps()
            # Checkpoint 2 gets checkpoint 1's (genuine) stamp; 3 gets a rogue TSA's stamp.
            async with _serving(rogue_pki) as (_, rogue_url):
                rogue, _ = await request_stamp(
                    session, rogue_url, stamped_data(cps[2]), StampTrust.load(rogue_pki.ca),
                    timeout_s=5,
                )  # fmt: skip
        await _replace_stamp(store_url, cps[1].id, kept[cps[0].id])
        await _replace_stamp(store_url, cps[2].id, rogue)
        report = await verify_store(store, _jwks(keys), gateway=GATEWAY_ID, tsa=trust)
    finally:
        await store.close()
    named = {f.seq: (f.kind, f.detail) for f in report.findings}
    assert report.stamped == 1
    assert named[cps[1].seq][0] == "forged"
    assert f"checkpoint {cps[1].id}: its time stamp is mismatched" in named[cps[1].seq][1]
    assert f"checkpoint {cps[2].id}: its time stamp is forged" in named[cps[2].seq][1]
    assert len(report.findings) == 2


# A gateway with a TSA --------------------------------------------------------------------


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    return both_backends


def _timestamped(
    pki: TsaPki, url: str, warn_after: float = 30.0
) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["store"]["checkpoint_interval_s"] = 0.1
        doc["timestamping"] = {
            "url": url,
            "ca": str(pki.ca),
            "cert": str(pki.cert),
            "warn_after": warn_after,
            "retry_base_s": 0.05,
            "retry_max_s": 0.2,
        }

    return edit


async def _readyz(h: Harness) -> tuple[int, dict[str, Any]]:
    async with h.gateway.session.get(f"{h.url}/readyz") as resp:
        return resp.status, await resp.json()


async def _metric(h: Harness, name: str) -> float | None:
    async with h.gateway.session.get(f"{h.url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_a_tsa_outage_never_stops_exchanges_and_the_backlog_is_stamped_after(
    make_harness: HarnessFactory, tsa: tuple[TsaServer, str], tsa_pki: TsaPki
) -> None:
    """TSA down: exchanges 200, the unstamped span in metrics, a /readyz warning past
    warn_after (still ready); TSA back: every checkpoint stamped, the warning gone."""
    server, url = tsa
    server.down = True
    h = await make_harness(_timestamped(tsa_pki, url, warn_after=0.5))
    portal = h.client("portal")
    for _ in range(3):
        reply = await portal.exchange("credit.query", CREDIT_EXAMPLE)
        assert reply.status == 200, reply.body
        await asyncio.sleep(0.15)  # a checkpoint each

    async def warned() -> bool:
        status, body = await _readyz(h)
        assert status == 200, body  # never a reason
        return any(w.startswith("timestamping:") for w in body["warnings"])

    await h.wait_for(warned)
    assert (await _metric(h, "gateway_checkpoints_unstamped") or 0) >= 1
    assert (await _metric(h, "gateway_checkpoint_unstamped_age_seconds") or 0) > 0.5
    assert server.requests >= 2  # it kept retrying
    assert server.stamped == 0

    async def long_out() -> bool:  # past the TSA's 1 s resolution, for the lag below
        return (await _metric(h, "gateway_checkpoint_unstamped_age_seconds") or 0) > 1.6

    await h.wait_for(long_out)

    server.down = False
    store = h.app[STORE]

    async def caught_up() -> bool:
        return (await store.stamp_backlog())[0] == 0

    await h.wait_for(caught_up)
    stamper = h.app[STAMPER]
    await stamper.refresh()
    status, body = await _readyz(h)
    assert status == 200
    assert not any(w.startswith("timestamping:") for w in body["warnings"])
    assert await _metric(h, "gateway_checkpoints_unstamped") == 0
    trust = StampTrust.load(tsa_pki.ca, tsa_pki.cert)
    report = await verify_store(store, _jwks(h.keys), gateway=GATEWAY_ID, tsa=trust)
    assert report.ok, report.findings
    assert report.stamped == report.checkpoints >= 3
    assert report.stamp_lag is not None
    assert report.stamp_lag[1] > 0.5  # the outage shows: the first stamp came late
    assert report.stamp_lag[0] == 1


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _edit(path: Path, old: bytes, new: bytes) -> bytes:
    """Replace the first ``old`` in the file with ``new``; the bytes it held before."""
    before = path.read_bytes()
    path.write_bytes(before.replace(old, new, 1))
    return before


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``gateway …`` in-process, in a thread of its own: the command runs its own loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        code = pool.submit(main, list(argv)).result()
    captured = capsys.readouterr()
    return code, captured.out + captured.err


async def test_an_evidence_bundle_lets_openssl_alone_check_the_time(
    make_harness: HarnessFactory,
    tsa: tuple[TsaServer, str],
    tsa_pki: TsaPki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """audit export writes the stamp, the bytes it covers and the TSA's certificate;
    `openssl ts -verify` accepts them, and refuses the same stamp over edited bytes."""
    _, url = tsa
    h = await make_harness(_timestamped(tsa_pki, url))
    reply = await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200, reply.body
    store = h.app[STORE]

    async def stamped() -> bool:
        head = await store.chain_head()
        async with store.snapshot() as snap:
            cps, kept = await snap.checkpoints(), await snap.stamps()
        return bool(cps) and cps[-1].seq == head.seq and cps[-1].id in kept

    await h.wait_for(stamped)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(h.config.raw), encoding="utf-8")
    code, out = _cli(capsys, "audit", "verify", "--config", str(config))
    assert code == 0, out
    assert "checkpoints stamped by the TSA and verified against its certificate" in out
    bundle = tmp_path / "evidence.json"
    message_id = reply.headers["Gw-Message-Id"]
    code, out = _cli(
        capsys, "audit", "export", message_id, "--out", str(bundle), "--config", str(config)
    )
    assert code == 0, out
    assert "time-stamped by a TSA at" in out
    doc = json.loads(bundle.read_bytes())
    assert set(doc["timestamp"]) == {"tsr", "tsa_cert"}
    assert check_bundle(bundle.read_bytes(), _jwks(h.keys)).ok
    command = [
        openssl, "ts", "-verify",
        "-in", f"{bundle}.tsr",
        "-data", f"{bundle}.stamped",
        "-CAfile", str(tsa_pki.ca),
        "-untrusted", f"{bundle}.tsa.pem",
    ]  # fmt: skip
    done = _run(command)
    assert done.returncode == 0, done.stderr
    assert "Verification: OK" in done.stdout
    stamped_bytes = _edit(Path(f"{bundle}.stamped"), b".", b"!")
    assert stamped_bytes == doc["checkpoint"]["jws"].encode("ascii")
    done = _run(command)
    assert done.returncode != 0
    assert "Verification: FAILED" in done.stdout
    # A bundle whose stamp was swapped for one of other data is broken, named.
    other = copy.deepcopy(doc)
    async with aiohttp.ClientSession() as session:
        tsr, _ = await request_stamp(
            session, url, b"other", StampTrust.load(tsa_pki.ca), timeout_s=5
        )
    other["timestamp"]["tsr"] = base64.b64encode(tsr).decode("ascii")
    report = check_bundle(canonical_bundle(other), _jwks(h.keys))
    assert not report.ok
    assert report.problem == "timestamp: the stamp covers other data than the checkpoint"


# Configuration ---------------------------------------------------------------------------


def test_timestamping_needs_the_tsa_ca_to_check_stamps_against(keys: Keys, tmp_path: Path) -> None:
    """A TSA URL without the CA its stamps are verified against is refused by the schema."""
    doc = config_document(keys, store=tmp_path / "g.db", national_url="http://127.0.0.1:1")
    doc["timestamping"] = {"url": "http://127.0.0.1:2/"}
    with pytest.raises(ConfigError) as caught:
        parse_config(copy.deepcopy(doc), base=tmp_path)
    assert "ca" in str(caught.value)
    doc["timestamping"]["ca"] = str(tmp_path / "missing.pem")
    config = parse_config(copy.deepcopy(doc), base=tmp_path)
    assert config.timestamping is not None
    with pytest.raises(ConfigError):
        StampTrust.of(config.timestamping)
