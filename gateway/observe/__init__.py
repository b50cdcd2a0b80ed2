"""What operators see of a running gateway: JSON logs, Prometheus metrics,
OpenTelemetry spans, W3C trace context. Imports up to ``gateway.runtime``; never the
exchange (the exchange reports to it).
"""
