"""End to end: one trace id from the caller to the upstream and to the member's callback;
one structured log line per exchange and per delivery attempt, personal data masked."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.exchange.app import STORE
from gateway.observe.logs import JsonFormatter, TextFormatter
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    PORTAL_ID,
    Harness,
    Keys,
    config_document,
    unused_port,
)

pytestmark = pytest.mark.integration  # starts gateway processes

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
W3C = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
RESIDENT_ID = "11010519491231002X"


def _parts(traceparent: str) -> tuple[str, str, str]:
    m = W3C.match(traceparent)
    assert m is not None, f"not a W3C traceparent: {traceparent!r}"
    assert m.group(1) != "0" * 32
    assert m.group(2) != "0" * 16
    return m.group(1), m.group(2), m.group(3)


async def _delivered(h: Harness, message_id: str) -> None:
    async def done() -> bool:
        return await h.state_of(message_id) == "callback_delivered"

    await h.wait_for(done)


async def test_traceparent_reaches_upstream_and_callback_with_one_trace_id(
    harness: Harness,
) -> None:
    """The caller's trace id arrives at the platform (sync and async) and at the callback."""
    h = harness
    portal = h.client("portal")
    sync = await portal.exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"traceparent": TRACEPARENT}
    )
    assert sync.status == 200
    assert _parts(sync.headers["traceparent"])[0] == TRACE_ID
    message_id = str(uuid.uuid4())
    reply = await portal.exchange(
        "crossregion.apply",
        APPLY_EXAMPLE,
        message_id=message_id,
        headers={"traceparent": TRACEPARENT},
    )
    assert reply.status == 202
    await _delivered(h, message_id)

    received = dict(zip(h.national.received, h.national.traceparents, strict=True))
    for mid in (sync.headers["Gw-Message-Id"], message_id):
        assert _parts(received[mid])[0] == TRACE_ID
    callback = h.portal.traceparents[message_id]
    trace_id, span_id, flags = _parts(callback)
    assert (trace_id, flags) == (TRACE_ID, "01")
    assert span_id != TRACEPARENT.split("-")[2]  # a hop of its own
    record = await h.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert record.trace_id == TRACE_ID


async def test_a_trace_is_started_when_the_caller_sends_none_or_garbage(harness: Harness) -> None:
    """No or malformed traceparent: a fresh trace, carried to the platform all the same."""
    portal = harness.client("portal")
    for sent in (None, "00-not-a-trace-01", f"00-{'0' * 32}-b7ad6b7169203331-01"):
        headers = {"traceparent": sent} if sent else {}
        reply = await portal.exchange("credit.query", CREDIT_EXAMPLE, headers=headers)
        assert reply.status == 200
        trace_id = _parts(reply.headers["traceparent"])[0]
        received = dict(zip(harness.national.received, harness.national.traceparents, strict=True))
        assert _parts(received[reply.headers["Gw-Message-Id"]])[0] == trace_id


def _records(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [
        json.loads(JsonFormatter().format(r))
        for r in caplog.records
        if getattr(r, "event", None) == event
    ]


async def test_one_log_line_per_exchange_and_delivery_attempt(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Exchange lines carry adapter, trace id and latency; delivery lines each attempt."""
    caplog.set_level(logging.DEBUG)
    h = harness
    h.portal.fail_next = 1  # the first callback attempt fails: two attempts logged
    message_id = str(uuid.uuid4())
    reply = await h.client("portal").exchange(
        "crossregion.apply",
        APPLY_EXAMPLE,
        message_id=message_id,
        headers={"traceparent": TRACEPARENT},
    )
    assert reply.status == 202
    await _delivered(h, message_id)

    exchanges = [r for r in _records(caplog, "exchange") if r["message_id"] == message_id]
    assert len(exchanges) == 1
    line = exchanges[0]
    assert line["client"] == PORTAL_ID
    assert (line["service"], line["adapter"], line["status"]) == (
        "crossregion.apply",
        "national",
        202,
    )
    assert line["trace_id"] == TRACE_ID
    assert line["latency_ms"] > 0
    attempts = [r for r in _records(caplog, "delivery") if r["message_id"] == message_id]
    summary = [(r["kind"], r["outcome"], r["attempt"]) for r in attempts]
    assert summary == [
        ("message", "delivered", 1),
        ("callback", "retry", 1),
        ("callback", "delivered", 2),
    ]
    for r in attempts:
        assert (r["trace_id"], r["client"], r["service"]) == (
            TRACE_ID,
            PORTAL_ID,
            "crossregion.apply",
        )
        assert r["latency_ms"] >= 0
    assert attempts[0]["adapter"] == "national"
    assert attempts[1]["level"] == "warning"
    assert attempts[1]["code"] == "upstream_error"


async def test_no_log_line_holds_an_unmasked_resident_id(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A resident ID in Gw-User and in the body never reaches a log line unmasked."""
    caplog.set_level(logging.DEBUG)
    h = harness
    portal = h.client("portal")
    personal = {**CREDIT_EXAMPLE, "purpose": f"核验申请人 {RESIDENT_ID} 的企业信用"}
    headers = {"Gw-User": RESIDENT_ID}
    assert (await portal.exchange("credit.query", personal, headers=headers)).status == 200
    bad = await portal.exchange("credit.query", {**personal, "uscc": RESIDENT_ID}, headers=headers)
    assert bad.status == 422
    message_id = str(uuid.uuid4())
    accepted = await portal.exchange(
        "crossregion.apply", APPLY_EXAMPLE, message_id=message_id, headers=headers
    )
    assert accepted.status == 202
    await _delivered(h, message_id)
    h.national.mode = "error"
    assert (await portal.exchange("credit.query", personal, headers=headers)).status == 502

    lines = _records(caplog, "exchange")
    assert len([r for r in lines if r["path"].startswith("/v1/exchange/")]) == 4
    assert [r["path"] for r in lines if r["path"].startswith("/v1/callbacks/")] == [
        "/v1/callbacks/crossregion.apply"
    ]
    assert _records(caplog, "delivery")
    for record in caplog.records:
        for formatter in (JsonFormatter(), TextFormatter("%(message)s")):
            assert RESIDENT_ID not in formatter.format(record)
        # Nor does any record carry it raw, for a handler with another formatter.
        raw = record.getMessage() + repr(vars(record))
        assert RESIDENT_ID not in raw, record.getMessage()


def _serve_config(keys: Keys, tmp_path: Path, logging_section: dict[str, str]) -> int:
    """A config.yaml in ``tmp_path`` with this ``logging`` section; its ingress port."""
    tmp_path.mkdir()
    port = unused_port()
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:1")
    doc["listen"] = {
        "ingress": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": unused_port()},
    }
    doc["logging"] = logging_section
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    return port


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


async def until_healthy(
    session: aiohttp.ClientSession,
    process: subprocess.Popen[bytes],
    port: int,
    log_path: Path,
    timeout_s: float = 20,
) -> None:
    """Wait for a started ``gateway serve`` to answer /healthz (its log if it dies)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, _read(log_path)
        assert time.monotonic() < deadline, "gateway serve did not come up"
        try:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)


async def _serve_and_log(
    keys: Keys, tmp_path: Path, logging_section: dict[str, str], *flags: str
) -> list[str]:
    """Run ``gateway serve``, send one bad exchange, stop it; its log lines (stderr)."""
    port = _serve_config(keys, tmp_path, logging_section)
    config_path = tmp_path / "config.yaml"
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *flags, "serve", "--config", str(config_path)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        async with aiohttp.ClientSession() as session:
            await until_healthy(session, process, port, log_path)
            url = f"http://127.0.0.1:{port}/v1/exchange/credit.query"
            async with session.post(url, json={}, headers={"Gw-User": RESIDENT_ID}) as resp:
                assert resp.status == 401
    finally:
        process.terminate()
        process.wait(10)
    return log_path.read_text(encoding="utf-8").splitlines()


async def test_serve_logs_as_configured_and_flags_override(keys: Keys, tmp_path: Path) -> None:
    """``logging`` in the config sets JSON at INFO; --log-format/--log-level win over it."""
    lines = await _serve_and_log(keys, tmp_path / "a", {"level": "info", "format": "json"})
    exchanges = [json.loads(x) for x in lines if '"event": "exchange"' in x]
    assert len(exchanges) == 1
    assert exchanges[0]["code"] == "signature_missing"
    assert exchanges[0]["level"] == "info"
    assert all(RESIDENT_ID not in x for x in lines)
    lines = await _serve_and_log(
        keys,
        tmp_path / "b",
        {"level": "info", "format": "json"},
        "--log-format",
        "text",
        "--log-level",
        "WARNING",
    )
    assert not [x for x in lines if "exchange" in x]  # INFO is below the flag's WARNING
    assert not [x for x in lines if x.startswith("{")]
