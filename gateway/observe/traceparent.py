"""W3C Trace Context: accept a valid ``traceparent``, otherwise start a new trace."""

from __future__ import annotations

import re
import secrets

__all__ = ["child_traceparent", "ensure_traceparent", "trace_id_of"]

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def ensure_traceparent(value: str | None) -> str:
    """The incoming ``traceparent`` when well formed, else a fresh sampled one."""
    if value:
        m = _TRACEPARENT.match(value.strip())
        if m and m.group(1) != _ZERO_TRACE and m.group(2) != _ZERO_SPAN:
            return value.strip()
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str) -> str:
    """Same trace, a new span id for the next hop."""
    trace_id = trace_id_of(parent)
    flags = parent[-2:]
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


def trace_id_of(traceparent: str) -> str:
    return traceparent.split("-")[1]
