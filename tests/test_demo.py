"""The three-party cross-province scenario: every hop signed, checked and on record."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.serve.demo import A_GATEWAY, B_GATEWAY, PORTAL, REFRESH_S, run_demo

pytestmark = pytest.mark.integration  # starts gateway processes


async def test_scenario_records_each_hop_in_each_gateway(tmp_path: Path) -> None:
    """A portal → A → national → B → back office → decision back to the portal, logged;
    on the directory alone, through B's key rotation."""
    report = await run_demo(tmp_path, verbose=False)
    assert report.problems == []
    assert report.decision is not None
    assert report.decision["decision"] == "approved"
    assert report.decision["handling_region"] == "440000"
    # Records newest first: the dicts keep the first application (before the rotation).
    a = {r.service: r for r in sorted(report.logs[A_GATEWAY], key=lambda r: -r.seq)}
    b = {r.service: r for r in sorted(report.logs[B_GATEWAY], key=lambda r: -r.seq)}
    assert a["crossregion.apply"].state == "callback_delivered"
    assert a["crossregion.apply"].adapter == "directory-national"  # a route the directory made
    assert a["credit.query"].state == "answered"
    assert a["evaluation.submit"].state == "answered"
    relayed = b["crossregion.apply"]
    assert relayed.client == PORTAL  # vouched for by the platform, not B's own member
    assert relayed.message_id == a["crossregion.apply"].message_id
    assert relayed.state == "callback_delivered"
    assert relayed.adapter == "back-office"
    assert relayed.attempts == 1
    # The relay chain, oldest first: A's gateway, then the platform whose key signed.
    assert relayed.via == (A_GATEWAY, "100000:national-platform")
    hops = [h["hop"] for h in report.hops]
    for expected in (
        f"{PORTAL} → {A_GATEWAY} (crossregion.apply)",
        f"{A_GATEWAY} → national platform",
        f"national platform → {B_GATEWAY}",
        f"{B_GATEWAY} → 440000:back-office",
        f"{B_GATEWAY} → national platform",
        f"national platform → {A_GATEWAY} (callback)",
        f"{A_GATEWAY} → {PORTAL} (callback)",
    ):
        assert expected in hops, (expected, hops)
    order = [hops.index(h) for h in (f"{A_GATEWAY} → national platform",
                                     f"{B_GATEWAY} → 440000:back-office",
                                     f"{A_GATEWAY} → {PORTAL} (callback)")]  # fmt: skip
    assert order == sorted(order)
    assert report.replies["credit.query"].json()["uscc"] == "91350100M000100Y43"
    # B rotated mid-demo: A listed the new key beside the old one within two refreshes,
    # and the second application went through with B signing with the new key.
    assert report.rotation is not None
    assert report.rotation["old_kept"] is True
    assert report.rotation["after_s"] < 2 * REFRESH_S + 2.0
    applications = [r for r in report.logs[B_GATEWAY] if r.service == "crossregion.apply"]
    assert len(applications) == 2
    assert all(r.state == "callback_delivered" for r in applications)
    assert "evaluation_id" in report.replies["evaluation.submit"].json()


async def test_the_demo_runs_on_sm2_with_sm3_digests_on_every_hop(tmp_path: Path) -> None:
    """--crypto sm2: the same scenario with every key SM2; each recorded request is sm2-sm3
    over an sm3 digest, under every member's allowed_algs ["sm2-sm3"]."""
    report = await run_demo(tmp_path, verbose=False, crypto="sm2")
    assert report.problems == []
    assert report.decision is not None
    # A: two applications (one on each side of B's rotation), a query, an evaluation; B: the
    # two applications it handled — each signed with SM2, B's before and after its rotation.
    records = [r for log in report.logs.values() for r in log]
    assert len(records) == 6
    assert report.rotation is not None
    assert report.rotation["old_kept"] is True
    for record in records:
        headers = {k.lower(): v for k, v in record.request_headers.items()}
        assert headers["content-digest"].startswith("sm3=:")
        assert 'alg="sm2-sm3"' in headers["signature-input"]
    assert report.replies["credit.query"].headers["Content-Digest"].startswith("sm3=:")


def test_gateway_demo_command_exits_zero() -> None:
    """`gateway demo` runs the scenario as a user would and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: every hop signed, checked and on record" in done.stdout
    assert "national platform → 440000:gateway" in done.stdout


def test_gateway_demo_crypto_sm2_command_exits_zero() -> None:
    """`gateway demo --crypto sm2` runs the whole three-party flow on SM2 and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "demo", "--crypto", "sm2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: every hop signed, checked and on record" in done.stdout
