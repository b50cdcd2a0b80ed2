"""/metrics: counters, histograms and gauges move as exchanges succeed and fail."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.exchange.app import METRICS, STORE
from gateway.observe.metrics import BUCKETS, STAGES, Metrics
from gateway.store.sqlite import SQLiteStore
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    PORTAL_ID,
    ROOT,
    Harness,
    HarnessFactory,
)
from tests.factories import until_state

PORTAL = {"client": PORTAL_ID}
CREDIT = {"client": PORTAL_ID, "service": "credit.query", "adapter": "national"}
METRIC = re.compile(r"\bgateway_[a-z_]+")


class Scrape:
    """One parsed exposition: sample values by name and labels (0 when absent)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for (n, labels) in self.samples if n == name}

    def buckets(self, name: str, **labels: str) -> list[float]:
        """Cumulative bucket counts in ``le`` order, +Inf last."""
        bounds = [*(repr(float(b)) for b in BUCKETS), "+Inf"]
        return [self.value(f"{name}_bucket", **labels, le=le) for le in bounds]


async def scrape(h: Harness) -> Scrape:
    resp = await h.gateway.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(await resp.text())


async def test_mixed_exchanges_move_counters_and_histograms(harness: Harness) -> None:
    """Ten exchanges of every kind land in the right series, with bounded labels."""
    h = harness
    portal = h.client("portal")
    mid = str(uuid.uuid4())
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE, message_id=mid)).status == 200
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    replay = await portal.exchange("credit.query", CREDIT_EXAMPLE, message_id=mid)
    assert replay.headers["Gw-Replayed"] == "true"
    assert (await portal.exchange("credit.query", {"uscc": "x"})).status == 422
    forged = h.client("stranger", member_id=PORTAL_ID)  # a key that is not the portal's
    assert (await forged.exchange("credit.query", CREDIT_EXAMPLE)).json()["code"] == "key_unknown"
    url, headers, data = portal.prepare("POST", "/v1/exchange/credit.query", CREDIT_EXAMPLE)
    async with h.gateway.session.post(url, data=data + b" ", headers=headers) as resp:
        assert (await resp.json())["code"] == "digest_mismatch"
    stranger = await h.client("stranger").exchange("credit.query", CREDIT_EXAMPLE)
    assert stranger.json()["code"] == "client_unknown"
    assert (await portal.exchange("no.such.service", {})).json()["code"] == "service_unknown"
    accepted = await portal.exchange("crossregion.apply", APPLY_EXAMPLE)
    assert accepted.status == 202
    await until_state(h, accepted.json()["message_id"], "callback_delivered")
    h.national.mode = "error"
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 502

    m = await scrape(h)
    total = "gateway_exchanges_total"
    assert m.value(total, **CREDIT, code="ok") == 2
    assert m.value(total, **CREDIT, code="replayed") == 1
    assert m.value(total, **CREDIT, code="schema_invalid") == 1
    assert m.value(total, **CREDIT, code="upstream_error") == 1
    unknown = {"client": "unknown", "service": "credit.query", "adapter": "national"}
    assert m.value(total, **unknown, code="key_unknown") == 1  # unauthenticated: no client
    assert m.value(total, **unknown, code="digest_mismatch") == 1
    assert m.value(total, **unknown, code="client_unknown") == 1
    assert m.value(total, **PORTAL, service="unknown", adapter="none", code="service_unknown") == 1
    apply = {"client": PORTAL_ID, "service": "crossregion.apply", "adapter": "national"}
    assert m.value(total, **apply, code="accepted") == 1
    assert m.label_values(total, "client") == {PORTAL_ID, "unknown"}
    assert m.label_values(total, "service") == {"credit.query", "crossregion.apply", "unknown"}

    assert m.value("gateway_signature_failures_total", code="key_unknown") == 1
    assert m.value("gateway_signature_failures_total", code="digest_mismatch") == 1
    assert m.value("gateway_signature_failures_total", code="signature_invalid") == 0

    # verify: all but the three refused before a signature verified; validate and record:
    # the two answered, the accepted and the failed upstream; upstream: the synchronous three.
    expected = {"verify": 7, "validate": 4, "record": 4, "upstream": 3, "total": 10}
    for stage in STAGES:
        buckets = m.buckets("gateway_stage_seconds", stage=stage)
        assert buckets[-1] == expected[stage], stage
        assert m.value("gateway_stage_seconds_count", stage=stage) == expected[stage]
        assert buckets == sorted(buckets), f"{stage} buckets are cumulative"
    # Nothing crosses loopback, signs and verifies in under 100 µs; all is done in 30 s.
    upstream = m.buckets("gateway_stage_seconds", stage="upstream")
    assert upstream[0] == 0
    assert upstream[-2] == 3
    assert m.value("gateway_stage_seconds_sum", stage="total") > 0

    # The upstream histogram also counts the outbox's call for the accepted application.
    assert m.value("gateway_upstream_seconds_count", adapter="national") == 4
    assert m.value("gateway_upstream_errors_total", adapter="national", code="upstream_error") == 1
    delivered = {"outcome": "delivered"}
    assert m.value("gateway_deliveries_total", kind="message", **delivered) == 1
    assert m.value("gateway_deliveries_total", kind="callback", **delivered) == 1
    assert m.value("gateway_outbox_depth") == 0
    assert m.value("gateway_outbox_oldest_age_seconds") == 0
    assert m.value("gateway_circuit_breaker_state", adapter="national") == 0

    # Group commit: every store batch is counted, with the writes it carried (the outbox
    # may commit one more between two reads: the scrape lies between the store's counts).
    store = h.app[STORE]
    assert isinstance(store, SQLiteStore)
    batch = store.batch
    before = (batch.batches, batch.units)
    m = await scrape(h)
    after = (batch.batches, batch.units)
    assert 0 < before[0] <= m.value("gateway_store_batch_units_count") <= after[0]
    assert before[1] <= m.value("gateway_store_batch_units_sum") <= after[1]
    assert m.value("gateway_store_batch_units_sum") >= m.value("gateway_store_batch_units_count")
    assert before[0] <= m.value("gateway_store_commit_seconds_count") <= after[0]
    assert m.value("gateway_store_busy_total") == 0  # one process: nobody else holds the lock


async def test_outbox_gauges_read_the_store_at_scrape_time(make_harness: HarnessFactory) -> None:
    """While the platform refuses, accepted messages show as outbox depth and age; then 0."""

    def patient(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 50
        doc["adapters"][0]["breaker"] = {"failure_threshold": 3, "reset_timeout_s": 0.3}

    h = await make_harness(patient)
    h.national.mode = "refuse"
    portal = h.client("portal")
    ids = [(await portal.exchange("crossregion.apply", APPLY_EXAMPLE)).json() for _ in range(2)]
    m = await scrape(h)
    assert m.value("gateway_outbox_depth") == 2
    assert 0 <= m.value("gateway_outbox_oldest_age_seconds") < 60
    assert 59 < await h.app[STORE].oldest_outbox_age(time.time() + 60) < 120
    h.national.mode = "ok"
    for reply in ids:
        await until_state(h, reply["message_id"], "callback_delivered")
    m = await scrape(h)
    assert m.value("gateway_outbox_depth") == 0
    assert m.value("gateway_outbox_oldest_age_seconds") == 0


async def test_retries_and_dead_letters_are_counted(make_harness: HarnessFactory) -> None:
    """A failing platform: one retry then a dead letter; a failing portal: callback retries."""

    def two_attempts(doc: dict[str, Any]) -> None:
        doc["delivery"]["max_attempts"] = 2

    h = await make_harness(two_attempts)
    h.national.mode = "error"
    dead = (await h.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)).json()
    await until_state(h, dead["message_id"], "dead")
    h.national.mode = "ok"
    h.portal.fail_next = 1
    ok = (await h.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)).json()
    await until_state(h, ok["message_id"], "callback_delivered")
    m = await scrape(h)
    deliveries = "gateway_deliveries_total"
    assert m.value(deliveries, kind="message", outcome="retry") == 1
    assert m.value(deliveries, kind="message", outcome="dead") == 1
    assert m.value(deliveries, kind="message", outcome="delivered") == 1
    assert m.value(deliveries, kind="callback", outcome="retry") == 1
    assert m.value(deliveries, kind="callback", outcome="delivered") == 1
    assert m.value(deliveries, kind="callback", outcome="dead") == 0
    assert m.value("gateway_upstream_errors_total", adapter="national", code="upstream_error") == 2


async def test_breaker_state_and_deferred_deliveries(make_harness: HarnessFactory) -> None:
    """An open circuit shows as 2; the refused calls count as adapter_unavailable."""

    def fragile(doc: dict[str, Any]) -> None:
        doc["adapters"][0]["breaker"] = {"failure_threshold": 1, "reset_timeout_s": 60}

    h = await make_harness(fragile)
    h.national.mode = "refuse"
    portal = h.client("portal")
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 502
    refused = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert refused.json()["code"] == "adapter_unavailable"
    m = await scrape(h)
    assert m.value("gateway_circuit_breaker_state", adapter="national") == 2
    errors = "gateway_upstream_errors_total"
    assert m.value(errors, adapter="national", code="upstream_error") == 1
    assert m.value(errors, adapter="national", code="adapter_unavailable") == 1
    # A refusal made no call: only the failed call has a latency.
    assert m.value("gateway_upstream_seconds_count", adapter="national") == 1


async def test_rate_limited_requests_are_counted_by_client(make_harness: HarnessFactory) -> None:
    """Past its burst a member gets 429 rate_limited, counted under its member id."""

    def one_a_while(doc: dict[str, Any]) -> None:
        doc["security"]["rate_limit"] = {"rate_per_s": 0.001, "burst": 1}

    h = await make_harness(one_a_while)
    portal = h.client("portal")
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    limited = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert limited.json()["code"] == "rate_limited"
    m = await scrape(h)
    assert m.value("gateway_rate_limited_total", client=PORTAL_ID) == 1
    assert m.value("gateway_exchanges_total", **CREDIT, code="rate_limited") == 1


async def test_probes_and_scrapes_are_not_exchanges(harness: Harness) -> None:
    """/healthz, /readyz and /metrics leave the exchange counters alone."""
    for path in ("/healthz", "/readyz", "/metrics", "/metrics"):
        assert (await harness.gateway.get(path)).status == 200
    m = await scrape(harness)
    assert m.label_values("gateway_exchanges_total", "client") == set()
    assert m.value("gateway_stage_seconds_count", stage="total") == 0


def test_an_app_keeps_its_own_registry(harness: Harness) -> None:
    """Two gateways in one process (the demo) do not mix their counts."""
    other = Metrics()
    assert other.registry is not harness.app[METRICS].registry
    other.observe_delivery("message", "delivered")
    assert b'gateway_deliveries_total{kind="message",outcome="delivered"} 1.0' in other.render()
    assert b'outcome="delivered"} 1.0' not in harness.app[METRICS].render()


_WORKER = """
import sys
from gateway.runtime.breaker import BreakerState
from gateway.observe.metrics import Metrics

metrics = Metrics()
assert metrics.multiprocess
metrics.observe_delivery("message", "delivered")
metrics.observe_upstream("national", 0.02, None)
metrics.set_breakers({"national": BreakerState[sys.argv[1]]})
if sys.argv[2] == "render":
    sys.stdout.write(metrics.render().decode())
"""


@pytest.mark.integration
def test_multiprocess_mode_merges_every_worker(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, a scrape sums counters and shows the worst breaker."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for state in ("OPEN", "CLOSED"):
        subprocess.run([sys.executable, "-c", _WORKER, state, "-"], env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, "HALF_OPEN", "render"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    m = Scrape(out)
    assert m.value("gateway_deliveries_total", kind="message", outcome="delivered") == 3
    assert m.value("gateway_upstream_seconds_count", adapter="national") == 3
    assert m.value("gateway_circuit_breaker_state", adapter="national") == 2


async def test_the_grafana_dashboard_graphs_only_exported_metrics(harness: Harness) -> None:
    """Every metric docs/grafana-dashboard.json queries is one /metrics exports."""
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text("utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    queried = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in METRIC.findall(e)}
    m = await scrape(harness)
    exported = set(re.findall(r"^# TYPE (\S+)", m.text, re.MULTILINE))
    assert queried, "the dashboard queries nothing"
    assert queried <= exported, queried - exported
