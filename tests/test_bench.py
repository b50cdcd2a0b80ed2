"""The benchmark cannot rot: its inline crypto is the protocol's, and its smoke run passes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from multidict import CIMultiDict, CIMultiDictProxy
from pytest_aiohttp import AiohttpServer

from bench.load import Member, PassResult, presign
from bench.run import SM2, Round, Settings, combine, gateway_pool_size, max_throughput, report
from bench.scaleout import layouts
from bench.servers import create_floor_app, create_upstream_app
from gateway.crypto.keys import VerificationKey, private_to_jwk
from gateway.crypto.sm2 import Sm2PrivateKey
from gateway.exchange.client import Reply, verify_reply
from gateway.signing import (
    REQUEST_COMPONENTS,
    RequestView,
    Verifier,
    check_content_digest,
    parse_signature_input,
)
from tests.conftest import CREDIT_EXAMPLE, PORTAL_ID, Keys, unused_port
from tests.pg import PostgresServer

pytestmark = pytest.mark.integration  # starts gateway processes

ROOT = Path(__file__).resolve().parent.parent


def _ed25519(keys: Keys, name: str) -> ed25519.Ed25519PrivateKey:
    private = keys.pairs[name].private
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    return private


def _member(keys: Keys) -> Member:
    return Member(member_id=PORTAL_ID, key=_ed25519(keys, "portal"), kid=keys.pairs["portal"].kid)


def test_presigned_requests_verify_with_the_gateway_verifier(keys: Keys) -> None:
    """The pre-signer's string-joined signature base is RFC 9421's: the gateway accepts it."""
    url = "http://127.0.0.1:8080"
    [request] = presign(_member(keys), url, "credit.query", CREDIT_EXAMPLE, 1)
    headers = CIMultiDictProxy(CIMultiDict(request.headers))
    parsed = parse_signature_input(headers)
    key = keys.verification("portal")[parsed.keyid]
    view = RequestView("POST", url + request.path, headers)
    verified = Verifier().verify(view, parsed, key, required=REQUEST_COMPONENTS)
    check_content_digest(headers["Content-Digest"], request.body)
    assert verified.keyid == key.kid


async def test_floor_verifies_and_answers_signed_like_the_gateway(
    keys: Keys, aiohttp_server: AiohttpServer
) -> None:
    """The floor refuses a tampered request and signs its answer as the gateway client expects."""
    upstream = await aiohttp_server(
        create_upstream_app(
            gateway_url="http://127.0.0.1:1",
            key=_ed25519(keys, "national"),
            kid=keys.pairs["national"].kid,
        )
    )
    port = unused_port()
    base = f"http://127.0.0.1:{port}"
    client_key = _ed25519(keys, "portal").public_key()
    floor = create_floor_app(
        upstream=str(upstream.make_url("/api/exchange/credit.query")),
        base_url=base,
        key=_ed25519(keys, "gateway"),
        kid=keys.pairs["gateway"].kid,
        client_key=client_key,
    )
    await aiohttp_server(floor, port=port)
    good, other = presign(_member(keys), base, "credit.query", CREDIT_EXAMPLE, 2)
    tampered = {**good.headers, "gw-message-id": other.headers["gw-message-id"]}
    async with aiohttp.ClientSession() as session:
        async with session.post(base + good.path, data=good.body, headers=good.headers) as resp:
            sent = RequestView(
                "POST", base + good.path, CIMultiDictProxy(CIMultiDict(good.headers))
            )
            reply = Reply(resp.status, resp.headers, await resp.read(), sent)
        async with session.post(base + good.path, data=good.body, headers=tampered) as refused:
            assert refused.status == 401
    assert reply.status == 200
    assert verify_reply(reply, keys.verification("gateway")) == keys.pairs["gateway"].kid
    assert reply.json()["uscc"] == CREDIT_EXAMPLE["uscc"]


@pytest.mark.parametrize(
    "loader",
    [
        "python",
        pytest.param(
            "wrk",
            marks=pytest.mark.skipif(
                shutil.which("wrk") is None and os.environ.get("CI") != "true",
                reason="wrk is not installed (python3 dev.py test installs it)",
            ),
        ),
    ],
)
def test_smoke_run_measures_every_contender_without_errors(tmp_path: Path, loader: str) -> None:
    """`bench.run --smoke --async` exits 0; every contender has throughput and no errors."""
    out = tmp_path / "latest.json"
    command = [sys.executable, "-m", "bench.run", "--smoke", "--async", f"--loader={loader}"]
    done = subprocess.run(
        [*command, f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    for name in ("bare", "floor", "gateway"):
        assert report[f"{name}_rps"] > 0
        assert report["contenders"][name]["errors"] == 0
        assert report["contenders"][name]["replayed"] == 0
    for key in ("ratio_floor", "ratio_bare", "p50_ms", "p99_ms", "p99_added_ms", "machine"):
        assert key in report
    assert report["settings"]["rounds"] == len(report["rounds"]) == 1
    assert report["ratio_floor_range"] == [report["ratio_floor"]] * 2
    assert report["async"]["complete"]
    # A Python process serving requests has tens of MiB resident, never zero or gigabytes.
    assert 20 < report["gateway_peak_rss_mib"] < 1024
    assert report["settings"]["loop"] == "uvloop"


def _pass(rps: float, p99_ms: float = 50.0) -> PassResult:
    """A hand-made 10 s pass at ``rps``; ``p99_ms`` tells passes of equal rps apart."""
    return PassResult(
        loader="wrk",
        requests=round(rps * 10),
        duration_s=10.0,
        p50_ms=p99_ms / 2,
        p99_ms=p99_ms,
        non2xx=0,
        socket_errors=0,
        replayed=0,
    )


def _round(bare: float, floor: float, gateway: float, gateway_p99: float = 50.0) -> Round:
    return Round(
        passes={"bare": _pass(bare), "floor": _pass(floor), "gateway": _pass(gateway, gateway_p99)}
    )


# Gateway/floor per round: 0.5, 0.3, 0.4 (median 0.4); gateway/bare: 0.25, 0.15, 0.2 (0.2).
# The ratios of the medians differ: gateway 500 / floor 1200 = 0.417, / bare 2400 = 0.208.
ROUNDS = [
    _round(2000, 1000, 500, gateway_p99=11.0),
    _round(4000, 2000, 600, gateway_p99=22.0),
    _round(2400, 1200, 480, gateway_p99=33.0),
]


def test_ratios_are_the_median_of_per_round_ratios_not_a_ratio_of_medians() -> None:
    """Each ratio divides passes of one round; the reported figures are each one's median round."""
    figures = combine(ROUNDS)
    assert figures.ratio_floor == 0.4
    assert figures.ratio_bare == 0.2
    assert figures.ratio_floor_range == (0.3, 0.5)
    assert round(500 / 1200, 3) != figures.ratio_floor  # what a ratio of medians would give
    # Each contender's own median round: gateway's is round 1, floor's and bare's round 3.
    assert figures.median["gateway"] is ROUNDS[0].passes["gateway"]
    assert figures.median["floor"] is ROUNDS[2].passes["floor"]
    assert figures.median["bare"] is ROUNDS[2].passes["bare"]


def test_an_even_count_of_rounds_takes_the_lower_middle() -> None:
    """Two rounds: the lower of each pair, a figure one round really had."""
    figures = combine(ROUNDS[:2])
    assert figures.ratio_floor == 0.3
    assert figures.ratio_floor_range == (0.3, 0.5)
    assert figures.median["gateway"] is ROUNDS[0].passes["gateway"]
    assert figures.median["floor"] is ROUNDS[0].passes["floor"]


def _settings(rounds: int) -> Settings:
    return Settings(
        rounds=rounds,
        duration_s=8,
        warmup_s=2,
        connections=64,
        processes=2,
        loader="wrk",
        stateless_pool=20_000,
        half_load=False,
        async_messages=0,
        chart=False,
        smoke=False,
    )


def test_report_keeps_its_keys_and_adds_every_round() -> None:
    """latest.json: the median figures under the old keys, the gateway's median latency, rounds."""
    doc = report(_settings(3), {}, ROUNDS, {}, None)
    assert (doc["gateway_rps"], doc["floor_rps"], doc["bare_rps"]) == (500.0, 1200.0, 2400.0)
    assert (doc["ratio_floor"], doc["ratio_bare"]) == (0.4, 0.2)
    assert doc["ratio_floor_range"] == [0.3, 0.5]
    assert doc["p99_ms"] == 11.0
    assert doc["contenders"]["gateway"]["rps"] == 500.0
    assert [r["ratio_floor"] for r in doc["rounds"]] == [0.5, 0.3, 0.4]
    assert [r["floor"]["rps"] for r in doc["rounds"]] == [1000.0, 2000.0, 1200.0]
    assert doc["settings"]["rounds"] == 3
    assert json.loads(json.dumps(doc)) == doc


def test_the_gateway_pool_is_sized_from_the_fastest_floor_of_the_run() -> None:
    """A slow floor round after a fast one must not shrink the gateway's pool into cycling."""
    floors = iter([2000.0, 800.0, 1500.0])
    sizes: list[tuple[str, int]] = []

    def drive(name: str, size: int) -> PassResult:
        sizes.append((name, size))
        return _pass(next(floors) if name == "floor" else 300.0)

    rounds = max_throughput(_settings(3), drive)
    assert len(rounds) == 3
    assert [name for name, _ in sizes] == ["bare", "floor", "gateway"] * 3
    gateway = [size for name, size in sizes if name == "gateway"]
    assert gateway == [gateway_pool_size(2000.0, 10)] * 3
    assert gateway[0] == 30_100


def test_layouts_put_postgresql_instances_beside_sqlite_workers() -> None:
    """--store postgres --instances 3: SQLite 1..3 workers, then PostgreSQL 1..3 instances."""
    assert [(x.store, x.processes) for x in layouts("postgres", 3)] == [
        ("sqlite", 1), ("sqlite", 2), ("sqlite", 3),
        ("postgres", 1), ("postgres", 2), ("postgres", 3),
    ]  # fmt: skip
    assert [(x.store, x.processes) for x in layouts("sqlite", 2)] == [("sqlite", 1), ("sqlite", 2)]


def test_scale_out_smoke_run_measures_every_layout(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    """`bench.run --store postgres --instances 2 --smoke --async` exits 0: req/s and async
    msg/s for 1 and 2 processes of each store, every async message delivered."""
    out = tmp_path / "scaleout.json"
    command = [sys.executable, "-m", "bench.run", "--store=postgres", "--instances=2"]
    done = subprocess.run(
        [*command, "--smoke", "--async", f"--store-url={pg_server.url}", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    rows = [(r["store"], r["processes"]) for r in doc["layouts"]]
    assert rows == [("sqlite", 1), ("sqlite", 2), ("postgres", 1), ("postgres", 2)]
    for row in doc["layouts"]:
        assert row["rps"] > 0
        assert row["errors"] == 0
        assert row["async_complete"] is True
        assert row["async_msgs_per_s"] > 0
    assert set(doc["two_over_one"]) == {"sqlite", "postgres"}
    assert all(ratio > 0 for ratio in doc["two_over_one"].values())


def test_sm2_presigned_requests_verify_with_the_gateway_verifier() -> None:
    """`--alg sm2`'s pre-signer: sm2-sm3 over an sm3 digest, accepted by the gateway's verifier."""
    private = Sm2PrivateKey.generate()
    jwk = private_to_jwk(private)
    url = "http://127.0.0.1:8080"
    member = Member(member_id=PORTAL_ID, key=private, kid=jwk["kid"])
    [request] = presign(member, url, "credit.query", CREDIT_EXAMPLE, 1)
    headers = CIMultiDictProxy(CIMultiDict(request.headers))
    assert headers["Content-Digest"].startswith("sm3=:")
    parsed = parse_signature_input(headers)
    assert parsed.params["alg"] == "sm2-sm3"
    view = RequestView("POST", url + request.path, headers)
    key = VerificationKey.from_jwk(jwk)
    assert Verifier().verify(view, parsed, key, required=REQUEST_COMPONENTS).keyid == key.kid
    check_content_digest(headers["Content-Digest"], request.body)


def test_the_report_puts_the_sm2_gateway_beside_the_ed25519_one() -> None:
    """With SM2 passes in each round: both gateways' median rounds and the median ratio."""
    rounds = [
        Round(passes={**r.passes, SM2: _pass(sm2, 80.0)})
        for r, sm2 in zip(ROUNDS, (100.0, 300.0, 240.0), strict=True)
    ]  # sm2/ed25519 per round: 0.2, 0.5, 0.5
    doc = report(_settings(3), {}, rounds, {}, None)
    assert doc["sm2"]["ratio_sm2_ed25519"] == 0.5
    assert doc["sm2"]["sm2_sm3"]["rps"] == 240.0
    assert doc["sm2"]["ed25519"]["rps"] == 500.0
    assert [r["rps"] for r in doc["sm2"]["rounds"]] == [100.0, 300.0, 240.0]
    assert report(_settings(3), {}, ROUNDS, {}, None)["sm2"] is None


def test_the_sealing_benchmark_measures_both_ciphers(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench.sealing` runs on a real store and prints SM4-GCM and AES-256-GCM."""
    from bench.sealing import main

    assert main(["--n", "5", "--size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["sm4-gcm", "aes-256-gcm"]
