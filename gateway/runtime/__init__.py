"""What this gateway is now: the live configuration (the file, admin writes on top),
the immutable ``Runtime`` each request reads (members, services, adapters), the route
table and the circuit breakers. Imports the floor, ``gateway.crypto``,
``gateway.config.model`` and ``gateway.store``.
"""
