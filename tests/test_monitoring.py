"""Operational monitoring (gateway/exchange/monitoring.py): records, their API, aggregates."""

from __future__ import annotations

import asyncio
import csv
import io
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.model import MonitoringConfig
from gateway.errors import MalformedRequest
from gateway.exchange.app import STORE
from gateway.exchange.client import verify_reply
from gateway.exchange.monitoring import (
    MAX_LIMIT,
    Monitor,
    aggregate,
    csv_safe,
    parse_query,
    record_view,
    records_csv,
)
from gateway.store import MonitoringQuery, MonitoringRecord, MonitoringSample, Store
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    NATIONAL_ID,
    PEER_ID,
    PORTAL_ID,
    TAX_ID,
    Harness,
    HarnessFactory,
    store_at,
)


@pytest.fixture
def harness_store_url(both_backends: str | None) -> str | None:
    """Every harness test here runs on SQLite and on PostgreSQL."""
    return both_backends


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = store_at(store_url)
    await s.open()
    yield s
    await s.close()


def _record(**changes: Any) -> MonitoringRecord:
    fields: dict[str, Any] = {
        "kind": "exchange",
        "received_at": time.time(),
        "client": PORTAL_ID,
        "service": "credit.query",
        "status": 200,
        "duration_ms": 5.0,
        "instance": "test",
    }
    fields.update(changes)
    return MonitoringRecord(**fields)


def _monitor(store: Store, registry: CollectorRegistry | None = None, **config: Any) -> Monitor:
    return Monitor(
        config=MonitoringConfig(**config),
        store=store,
        instance="test",
        registry=registry or CollectorRegistry(),
    )


async def _settle(h: Harness) -> None:
    """Write what the gateway's monitor has queued (the background task would, later)."""
    from gateway.exchange.app import MONITOR

    await h.app[MONITOR].flush()


# Views and queries (no I/O) ----------------------------------------------------------


def test_csv_cells_that_a_spreadsheet_would_run_are_defused() -> None:
    """Text starting =, +, -, @, tab or CR gets a leading ' ; numbers and plain text do not."""
    for bad in ("=HYPERLINK(1)", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "|cmd"):
        assert csv_safe(bad) == "'" + bad
    assert csv_safe("credit.query") == "credit.query"
    assert csv_safe(-5) == "-5"
    assert csv_safe(None) == ""
    assert csv_safe(True) == "true"


def test_csv_is_rfc_4180_with_crlf_and_quoting() -> None:
    """A header line, CRLF line ends, a comma in a value quoted, read back intact."""
    view = record_view(_record(via=("440000:gateway", "100000:national-platform")))
    data = records_csv([view]).decode()
    assert data.endswith("\r\n")
    assert "\n" not in data.replace("\r\n", "")
    rows = list(csv.reader(io.StringIO(data, newline="")))
    assert rows[0][0] == "kind"
    assert len(rows) == 2
    assert rows[1][rows[0].index("via")] == "440000:gateway,100000:national-platform"


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": str(MAX_LIMIT + 1)},
        {"limit": "ten"},
        {"cursor": "-1"},
        {"cursor": "1 OR 1=1"},
        {"status": "abc"},
        {"status": "700"},
        {"since": "yesterday"},
        {"since": "nan"},
        {"since": "2026-12-04T10:00:00"},  # no offset: ambiguous
        {"since": "200", "until": "100"},
        {"service": "Credit Query"},
    ],
)
def test_bad_query_parameters_are_malformed_requests(query: dict[str, str]) -> None:
    """Each malformed parameter is a 400 malformed_request, never a 500 or a silent default."""
    with pytest.raises(MalformedRequest):
        parse_query(query)


def test_the_query_takes_the_client_from_the_caller_never_from_the_url() -> None:
    """A client= in the query string is ignored: the proven caller is the only filter."""
    q = parse_query({"client": TAX_ID, "status": "error", "since": "2026-12-04T10:00:00Z"})
    assert q.client is None
    assert q.ok is False
    assert q.since == 1796378400.0
    assert parse_query({"client": TAX_ID}, client=PORTAL_ID).client == PORTAL_ID


def test_aggregate_counts_errors_and_nearest_rank_percentiles() -> None:
    """Per service and kind: count, errors, p50 and p95 of the durations given."""
    samples = [
        MonitoringSample(
            received_at=0, service="credit.query", kind="exchange", ok=i != 0, duration_ms=i
        )
        for i in range(1, 101)
    ] + [MonitoringSample(received_at=0, service=None, kind="exchange", ok=False, duration_ms=1)]
    result = {a.service: a for a in aggregate(samples)}
    credit = result["credit.query"]
    assert (credit.count, credit.errors, credit.p50_ms, credit.p95_ms) == (100, 0, 50, 95)
    assert result[""].errors == 1


# Store and writer, both backends -----------------------------------------------------


async def test_records_are_paged_newest_first_and_filtered_per_client(store: Store) -> None:
    """Store paging: newest first, a cursor continues, client/service/status filter."""
    now = time.time()
    await store.insert_monitoring(
        [_record(received_at=now + i, message_id=str(i)) for i in range(5)]
        + [_record(client=TAX_ID, status=503, ok=False, received_at=now)]
    )
    first = await store.monitoring_records(MonitoringQuery(client=PORTAL_ID, limit=3))
    assert [r.message_id for r in first] == ["4", "3", "2"]
    rest = await store.monitoring_records(
        MonitoringQuery(client=PORTAL_ID, limit=3, before_id=first[-1].id)
    )
    assert [r.message_id for r in rest] == ["1", "0"]
    errors = await store.monitoring_records(MonitoringQuery(ok=False))
    assert [(r.client, r.status) for r in errors] == [(TAX_ID, 503)]
    assert await store.monitoring_records(MonitoringQuery(client=PORTAL_ID, status=503)) == []
    window = await store.monitoring_records(
        MonitoringQuery(client=PORTAL_ID, since=now + 1, until=now + 3)
    )
    assert [r.message_id for r in window] == ["2", "1"]


async def test_a_full_queue_drops_and_counts_instead_of_waiting(store: Store) -> None:
    """Past queue_limit records are dropped and counted; what was queued is written."""
    registry = CollectorRegistry()
    monitor = _monitor(store, registry, queue_limit=3)
    for i in range(5):
        monitor.submit(_record(message_id=str(i)))
    assert monitor.dropped == 2
    assert await monitor.flush() == 3
    stored = await store.monitoring_records(MonitoringQuery())
    assert sorted(r.message_id or "" for r in stored) == ["0", "1", "2"]
    dropped = registry.get_sample_value(
        "gateway_monitoring_dropped_total", {"reason": "queue_full"}
    )
    assert dropped == 2


async def test_retention_prunes_old_records_only(store: Store) -> None:
    """Records older than the retention are deleted; younger ones stay."""
    monitor = _monitor(store, retention_s=3600)
    now = time.time()
    monitor.submit(_record(received_at=now - 7200, message_id="old"))
    monitor.submit(_record(received_at=now - 60, message_id="young"))
    await monitor.flush()
    assert await monitor.prune() == 1
    assert [r.message_id for r in await store.monitoring_records(MonitoringQuery())] == ["young"]


def test_retention_config_takes_units_and_defaults_on() -> None:
    """monitoring.retention "12h" is 43200 s; monitoring is on by default, 30 days."""
    from gateway.config.model import _monitoring

    assert _monitoring({"retention": "12h"}).retention_s == 43200
    assert _monitoring({"retention": 90}).retention_s == 90
    default = _monitoring({})
    assert default.enabled is True
    assert default.retention_s == 30 * 86400
    assert _monitoring({"central": [NATIONAL_ID]}).central == (NATIONAL_ID,)


# The member API, on a real gateway ---------------------------------------------------


async def test_a_member_reads_its_exchange_record_with_every_step(harness: Harness) -> None:
    """After a sync exchange the member's signed GET returns its record: ids, adapter,
    steps in order, sizes, status; the answer is signed by the gateway."""
    portal = harness.client("portal")
    sent = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert sent.status == 200, sent.body
    await _settle(harness)
    reply = await portal.request(
        "GET", "/v1/monitoring/records?service=credit.query", message_id=str(uuid.uuid4())
    )
    assert reply.status == 200, reply.body
    verify_reply(reply, harness.keys.verification("gateway"))
    [record] = reply.json()["records"]
    assert record["kind"] == "exchange"
    assert record["client"] == PORTAL_ID
    assert record["message_id"] == sent.headers["Gw-Message-Id"]
    assert record["adapter"] == "national"
    assert record["status"] == 200
    assert record["ok"]
    assert record["seq"] is not None
    assert record["request_size"] > 0
    assert record["response_size"] > 0
    steps = [record[k] for k in ("verified_ms", "validated_ms", "upstream_ms", "answered_ms")]
    assert all(s is not None for s in steps)
    assert steps == sorted(steps)
    assert steps[-1] <= record["duration_ms"]
    assert reply.json()["next"] is None
    async with harness.gateway.get("/metrics") as resp:
        exposition = await resp.text()
    assert 'gateway_monitoring_dropped_total{reason="queue_full"} 0.0' in exposition


async def test_a_member_never_sees_another_members_records(harness: Harness) -> None:
    """TAX asking (even with client=portal in the query) gets none of PORTAL's records."""
    await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    await _settle(harness)
    tax = harness.client("tax")
    reply = await tax.request(
        "GET", f"/v1/monitoring/records?client={PORTAL_ID}", message_id=str(uuid.uuid4())
    )
    assert reply.status == 200, reply.body
    assert reply.json()["records"] == []


async def test_a_forged_request_in_a_members_name_is_not_its_record(harness: Harness) -> None:
    """A request claiming Gw-Client portal, signed with another key, is recorded with no
    client: portal never sees it; the admin API does."""
    forger = harness.client("stranger", member_id=PORTAL_ID)
    forged = await forger.exchange("credit.query", CREDIT_EXAMPLE)
    assert forged.status == 401
    await _settle(harness)
    mine = await harness.client("portal").request(
        "GET", "/v1/monitoring/records", message_id=str(uuid.uuid4())
    )
    assert mine.json()["records"] == []
    async with harness.admin.get(
        "/admin/v1/monitoring/records", headers=harness.auth("auditor")
    ) as resp:
        assert resp.status == 200
        [seen] = (await resp.json())["records"]
    assert seen["client"] is None
    assert seen["status"] == 401
    assert seen["code"] == "key_unknown"


async def test_unsigned_and_tampered_reads_are_refused(harness: Harness) -> None:
    """No signature is 401; a signed read whose query was changed after signing is 401."""
    async with harness.gateway.get("/v1/monitoring/records", headers={"Gw-Client": PORTAL_ID}) as r:
        assert r.status == 401
        assert (await r.json())["code"] == "signature_missing"
    portal = harness.client("portal")
    url, headers, _ = portal.prepare(
        "GET", "/v1/monitoring/records?service=credit.query", message_id=str(uuid.uuid4())
    )
    async with harness.gateway.session.get(
        url.replace("credit.query", "crossregion.apply"), headers=headers
    ) as r:
        assert r.status == 401


async def test_a_relay_sees_only_what_it_relayed_for_a_member(harness: Harness) -> None:
    """The peer gateway speaking for 440000:back-office sees that member's records that it
    relayed; it may not ask for a local member's; the member's own view has them too."""
    peer = harness.client("peer", member_id="440000:back-office")
    via = {"Gw-Via": PEER_ID}
    await peer.exchange("credit.query", CREDIT_EXAMPLE, headers=via)
    await harness.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    await _settle(harness)
    relayed = await peer.request(
        "GET", "/v1/monitoring/records", message_id=str(uuid.uuid4()), headers=via
    )
    assert relayed.status == 200, relayed.body
    [record] = relayed.json()["records"]
    assert record["client"] == "440000:back-office"
    assert record["via"] == [PEER_ID]
    local = harness.client("peer", member_id=PORTAL_ID)
    refused = await local.request(
        "GET", "/v1/monitoring/records", message_id=str(uuid.uuid4()), headers=via
    )
    assert refused.status == 403
    own = await harness.client("peer").request(
        "GET", "/v1/monitoring/records", message_id=str(uuid.uuid4())
    )
    assert own.json()["records"] == []  # the peer itself sent nothing in its own name


async def test_records_page_with_a_cursor_and_come_as_csv(harness: Harness) -> None:
    """limit=1 pages through with next; Accept: text/csv gives RFC 4180 CSV with a Link."""
    portal = harness.client("portal")
    for _ in range(2):
        await portal.exchange("credit.query", CREDIT_EXAMPLE)
    await _settle(harness)
    first = await portal.request(
        "GET", "/v1/monitoring/records?limit=1", message_id=str(uuid.uuid4())
    )
    cursor = first.json()["next"]
    assert cursor is not None
    second = await portal.request(
        "GET", f"/v1/monitoring/records?limit=1&cursor={cursor}", message_id=str(uuid.uuid4())
    )
    assert second.json()["records"][0]["message_id"] != first.json()["records"][0]["message_id"]
    as_csv = await portal.request(
        "GET",
        "/v1/monitoring/records?limit=1",
        message_id=str(uuid.uuid4()),
        headers={"Accept": "text/csv"},
    )
    assert as_csv.status == 200
    assert as_csv.headers["Content-Type"].startswith("text/csv")
    assert 'rel="next"' in as_csv.headers["Link"]
    rows = list(csv.reader(io.StringIO(as_csv.body.decode(), newline="")))
    assert rows[0][:3] == ["kind", "received_at", "message_id"]
    assert len(rows) == 2


async def test_bad_parameters_are_a_problem_not_a_500(harness: Harness) -> None:
    """limit=0 on a signed read is 400 malformed_request as problem+json."""
    reply = await harness.client("portal").request(
        "GET", "/v1/monitoring/records?limit=0", message_id=str(uuid.uuid4())
    )
    assert reply.status == 400
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert reply.json()["code"] == "malformed_request"


async def test_async_exchange_records_each_delivery_and_callback_attempt(
    harness: Harness,
) -> None:
    """An async exchange gives the member an exchange record (202), a delivery attempt
    and the callback's delivery to it; the platform's callback is the platform's record."""
    sent = await harness.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    assert sent.status == 202
    message_id = sent.headers["Gw-Message-Id"]
    await harness.wait_for(
        lambda: _has_state(harness, message_id, "callback_delivered"), within_s=15
    )
    await _settle(harness)
    reply = await harness.client("portal").request(
        "GET", "/v1/monitoring/records", message_id=str(uuid.uuid4())
    )
    kinds = {(r["kind"], r["outcome"]) for r in reply.json()["records"]}
    assert {("exchange", None), ("delivery", "delivered"), ("callback_delivery", "delivered")} <= (
        kinds
    )
    callback = next(r for r in reply.json()["records"] if r["kind"] == "callback_delivery")
    assert callback["correlation_id"] == message_id
    assert callback["attempt"] == 1
    platform = await harness.client("national").request(
        "GET", "/v1/monitoring/records", message_id=str(uuid.uuid4())
    )
    [incoming] = platform.json()["records"]
    assert incoming["kind"] == "callback"
    assert incoming["correlation_id"] == message_id


async def _has_state(h: Harness, message_id: str, state: str) -> bool:
    return await h.state_of(message_id) == state


# Central monitoring ------------------------------------------------------------------


async def test_only_a_configured_monitoring_party_pulls_aggregates(
    make_harness: HarnessFactory,
) -> None:
    """The national platform (monitoring.central) gets per-service counts and percentiles
    with no member ids; a member, or a relay speaking for the platform, gets 403."""

    def central(doc: dict[str, Any]) -> None:
        doc["monitoring"] = {"central": [NATIONAL_ID]}

    h = await make_harness(central)
    for _ in range(3):
        await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)
    await h.client("portal").exchange("credit.query", {"nonsense": True})
    await _settle(h)
    reply = await h.client("national").request(
        "GET", "/v1/monitoring/aggregates", message_id=str(uuid.uuid4())
    )
    assert reply.status == 200, reply.body
    verify_reply(reply, h.keys.verification("gateway"))
    document = reply.json()
    [credit] = [s for s in document["services"] if s["service"] == "credit.query"]
    assert (credit["count"], credit["errors"]) == (4, 1)
    assert credit["p95_ms"] >= credit["p50_ms"] > 0
    assert PORTAL_ID not in reply.body.decode()
    member = await h.client("portal").request(
        "GET", "/v1/monitoring/aggregates", message_id=str(uuid.uuid4())
    )
    assert member.status == 403
    assert member.json()["code"] == "forbidden"


async def test_monitoring_off_writes_nothing(make_harness: HarnessFactory) -> None:
    """monitoring.enabled false: exchanges still answer, no record is kept."""

    def off(doc: dict[str, Any]) -> None:
        doc["monitoring"] = {"enabled": False}

    h = await make_harness(off)
    assert (await h.client("portal").exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    await _settle(h)
    assert await h.app[STORE].monitoring_records(MonitoringQuery()) == []


# Real processes: `gateway up` and the national simulator's central monitoring ------------


@pytest.mark.integration  # starts gateway processes
async def test_the_national_simulator_pulls_aggregates_from_a_real_gateway(
    tmp_path: Path,
) -> None:
    """`gateway up` on the shipped config (ports moved): after two real exchanges the
    national simulator's timer pulls the gateway's signed aggregates and serves them at
    GET /monitoring, credit.query counted."""
    import shutil
    import subprocess
    import sys

    import aiohttp
    import yaml

    from gateway.crypto.keys import load_keypair
    from gateway.exchange.client import ExchangeClient
    from gateway.signing import Signer
    from tests.conftest import ROOT, unused_port
    from tests.test_observability import until_healthy

    doc = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    ports = {name: unused_port() for name in ("ingress", "admin", "national", "portal")}
    doc["listen"]["ingress"]["port"] = ports["ingress"]
    doc["listen"]["admin"]["port"] = ports["admin"]
    doc["listen"]["local"]["port"] = unused_port()  # the mTLS listener, off 8443
    doc["simulators"]["national"]["port"] = ports["national"]
    doc["simulators"]["national"]["monitor_every_s"] = 0.2
    doc["simulators"]["portal"]["port"] = ports["portal"]
    doc["adapters"][0]["config"]["base_url"] = f"http://127.0.0.1:{ports['national']}"
    doc["members"][0]["callback_url"] = f"http://127.0.0.1:{ports['portal']}/callbacks"
    doc["monitoring"]["flush_interval_s"] = 0.1
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gateway"), "up", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as session:
            await until_healthy(session, process, ports["ingress"], log_path)
            portal = ExchangeClient(
                member_id=PORTAL_ID,
                signer=Signer(load_keypair(tmp_path / "keys" / "one-stop-portal.pem")),
                base_url=f"http://127.0.0.1:{ports['ingress']}",
                session=session,
            )
            for _ in range(2):
                reply = await portal.exchange("credit.query", CREDIT_EXAMPLE)
                assert reply.status == 200, reply.body
            deadline = time.monotonic() + 15
            credit: dict[str, Any] = {}
            while not credit or credit["count"] < 2:
                assert time.monotonic() < deadline, "no aggregates pulled"
                await asyncio.sleep(0.1)
                url = f"http://127.0.0.1:{ports['national']}/monitoring"
                async with session.get(url) as resp:
                    pulled = (await resp.json())["gateways"].get("330000:gateway", {})
                services = pulled.get("aggregates", {}).get("services", [])
                credit = next((s for s in services if s["service"] == "credit.query"), {})
            assert pulled["status"] == 200
            assert credit["errors"] == 0
            assert credit["p95_ms"] >= credit["p50_ms"] > 0
    finally:
        process.terminate()
        assert process.wait(15) == 0, log_path.read_text(errors="replace")
