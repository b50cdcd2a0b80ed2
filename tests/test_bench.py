"""The benchmark cannot rot: its inline crypto is the protocol's, and its smoke run passes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from multidict import CIMultiDict, CIMultiDictProxy
from pytest_aiohttp import AiohttpServer

from bench.load import Member, presign
from bench.servers import create_floor_app, create_upstream_app
from gateway.client import Reply, verify_reply
from gateway.signing import (
    REQUEST_COMPONENTS,
    RequestView,
    Verifier,
    check_content_digest,
    parse_signature_input,
)
from tests.conftest import CREDIT_EXAMPLE, PORTAL_ID, Keys, unused_port

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
            marks=pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"),
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
    assert report["async"]["complete"]
