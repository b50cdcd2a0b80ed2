"""Optional OpenTelemetry spans; W3C trace context is ``gateway/observe/traceparent.py``'s.

Off (``NO_TRACING``, which does nothing) unless ``opentelemetry-sdk`` is installed and an
OTLP endpoint is configured: ``tracing.otlp_endpoint`` in the config, or the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``. When on, each
ingress request is a server span and each outbox attempt a client span, both children of
the caller's ``traceparent``; the ``traceparent`` sent onwards names the new span, so
the upstream's spans hang under the gateway's. The tracer provider is the gateway's own
(the global one is left alone), exporting in batches off the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.config.model import TracingConfig
from gateway.masking import mask_personal

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OtelSpan

__all__ = ["NO_TRACING", "Span", "Tracing", "create_tracing"]

log = logging.getLogger("gateway.observe.tracing")
Attributes = Mapping[str, str | int | float | bool | None]


class Span:
    """A started span; ``traceparent`` is what to send to the next hop."""

    __slots__ = ("_span", "traceparent")

    def __init__(self, span: OtelSpan, traceparent: str) -> None:
        self._span = span
        self.traceparent = traceparent

    def end(self, attributes: Attributes, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        # Spans leave for a collector: an export like the logs, masked like them.
        self._span.set_attributes(
            {
                k: mask_personal(v) if isinstance(v, str) else v
                for k, v in attributes.items()
                if v is not None
            }
        )
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, mask_personal(error)))
        self._span.end()


class Tracing:
    """No spans: ``start`` returns None and callers keep the traceparent they have."""

    enabled = False

    def start(self, name: str, traceparent: str, *, server: bool = True) -> Span | None:
        return None

    def shutdown(self) -> None:
        """Flush what is buffered and stop exporting."""


NO_TRACING = Tracing()


class _OtelTracing(Tracing):
    enabled = True

    def __init__(self, *, service_name: str, exporter: SpanExporter, batch: bool) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("gateway")
        self._propagator = TraceContextTextMapPropagator()

    def start(self, name: str, traceparent: str, *, server: bool = True) -> Span:
        from opentelemetry.trace import SpanKind, set_span_in_context

        parent = self._propagator.extract({"traceparent": traceparent})
        kind = SpanKind.SERVER if server else SpanKind.CLIENT
        span = self._tracer.start_span(name, context=parent, kind=kind)
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        return Span(span, carrier.get("traceparent", traceparent))

    def shutdown(self) -> None:
        self._provider.shutdown()


def create_tracing(
    config: TracingConfig, *, exporter: SpanExporter | None = None, batch: bool = True
) -> Tracing:
    """Spans to ``exporter`` (tests: the SDK's in-memory one) or to the OTLP endpoint
    configured; ``NO_TRACING`` when neither is given or the packages are missing."""
    endpoint = (
        config.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if exporter is None and not endpoint:
        return NO_TRACING
    try:
        if exporter is None:
            exporter = _otlp_exporter(config, endpoint)
        return _OtelTracing(service_name=config.service_name, exporter=exporter, batch=batch)
    except ImportError as exc:
        log.warning(
            "tracing is configured but %s is not installed (pip install .[tracing]); "
            "no spans are exported",
            exc.name,
        )
        return NO_TRACING


def _otlp_exporter(config: TracingConfig, endpoint: Any) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found, unused-ignore]
        OTLPSpanExporter,
    )

    # Only an explicit config endpoint is passed; otherwise the exporter reads the
    # OTEL_* variables itself (and appends /v1/traces to the generic one, as specified).
    exporter: SpanExporter = OTLPSpanExporter(endpoint=config.otlp_endpoint or None)
    log.info("exporting spans over OTLP/HTTP to %s", endpoint)
    return exporter
