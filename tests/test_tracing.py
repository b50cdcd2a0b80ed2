"""OpenTelemetry: off unless configured; when on, spans join the caller's W3C trace."""

from __future__ import annotations

import importlib.util
import logging
import uuid

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.config.model import TracingConfig
from gateway.observe.tracing import NO_TRACING, create_tracing
from tests.conftest import APPLY_EXAMPLE, CREDIT_EXAMPLE, HarnessFactory

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
OTEL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def test_no_endpoint_means_no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an endpoint in the config or the environment, tracing is the no-op."""
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    tracing = create_tracing(TracingConfig())
    assert tracing is NO_TRACING
    assert not tracing.enabled
    assert tracing.start("POST /v1/exchange/{service}", TRACEPARENT) is None
    tracing.shutdown()


def test_an_endpoint_without_the_exporter_package_warns_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint set while the OTLP exporter is missing: a warning, and no spans."""
    try:
        installed = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http")
    except ModuleNotFoundError:  # not even the parent package
        installed = None
    if installed is not None:
        pytest.skip("the OTLP exporter is installed here")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    with caplog.at_level(logging.WARNING, logger="gateway.observe.tracing"):
        assert create_tracing(TracingConfig()) is NO_TRACING
    assert "opentelemetry.exporter" in caplog.text


async def test_spans_continue_the_callers_trace(make_harness: HarnessFactory) -> None:
    """Server and outbox spans join the caller's trace and parent the upstream's hop."""
    exporter = InMemorySpanExporter()
    tracing = create_tracing(TracingConfig(), exporter=exporter, batch=False)
    h = await make_harness(tracing=tracing)
    portal = h.client("portal")
    sync = await portal.exchange(
        "credit.query", CREDIT_EXAMPLE, headers={"traceparent": TRACEPARENT}
    )
    assert sync.status == 200
    message_id = str(uuid.uuid4())
    accepted = await portal.exchange(
        "crossregion.apply",
        APPLY_EXAMPLE,
        message_id=message_id,
        headers={"traceparent": TRACEPARENT},
    )
    assert accepted.status == 202

    async def delivered() -> bool:
        return await h.state_of(message_id) == "callback_delivered"

    await h.wait_for(delivered)
    spans = exporter.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in spans if s.context} >= {TRACE_ID}
    server = [s for s in spans if s.kind is SpanKind.SERVER and s.context]
    exchange_spans = [s for s in server if s.name == "POST /v1/exchange/{service}"]
    assert len(exchange_spans) == 2
    for span in exchange_spans:
        assert span.context is not None
        assert span.parent is not None
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert format(span.parent.span_id, "016x") == PARENT_ID
        assert span.attributes is not None
        assert span.attributes["gw.client"] == h.client("portal").member_id
    # The platform saw the gateway's server span as its parent (synchronous call).
    sync_span = next(
        s for s in exchange_spans if s.attributes and s.attributes["gw.service"] == "credit.query"
    )
    assert sync_span.context is not None
    received = dict(zip(h.national.received, h.national.traceparents, strict=True))
    sync_id = sync.headers["Gw-Message-Id"]
    assert received[sync_id] == f"00-{TRACE_ID}-{format(sync_span.context.span_id, '016x')}-01"
    client = {s.name for s in spans if s.kind is SpanKind.CLIENT}
    assert client == {"deliver crossregion.apply", "callback crossregion.apply"}
    for span in spans:
        if span.kind is SpanKind.CLIENT:
            assert span.context is not None
            assert format(span.context.trace_id, "032x") == TRACE_ID
    # The outbox's client span is the parent the platform saw for the asynchronous call.
    deliver = next(s for s in spans if s.name == "deliver crossregion.apply")
    assert deliver.context is not None
    assert received[message_id].split("-")[2] == format(deliver.context.span_id, "016x")
