"""The request path, ingress to signed answer, and durable delivery: the ingress
application (``app``) and its TLS, the pipeline (authenticate, authorise, validate,
record, route, answer), adapter dispatch, the outbox and callbacks (``delivery``),
limits, nonces, readiness, the ingress OpenAPI document and a member's client.
"""
