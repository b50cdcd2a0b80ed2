"""W3C Trace Context: keep a valid traceparent, replace anything else, derive child spans."""

from __future__ import annotations

import re

import pytest

from gateway.observe.traceparent import child_traceparent, ensure_traceparent, trace_id_of

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SHAPE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def test_valid_traceparent_is_kept() -> None:
    """A well-formed traceparent is returned unchanged (surrounding spaces removed)."""
    assert ensure_traceparent(VALID) == VALID
    assert ensure_traceparent(f"  {VALID} ") == VALID
    unsampled = VALID[:-2] + "00"
    assert ensure_traceparent(unsampled) == unsampled


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        VALID + "-extra",
    ],
)
def test_invalid_traceparent_starts_a_new_sampled_trace(value: str | None) -> None:
    """Anything malformed is replaced by a fresh, sampled, well-formed traceparent."""
    fresh = ensure_traceparent(value)
    assert SHAPE.match(fresh)
    assert fresh.endswith("-01")
    assert fresh != value
    assert trace_id_of(fresh) != "0" * 32


def test_fresh_traces_are_distinct() -> None:
    """Two new traces never share a trace id."""
    assert trace_id_of(ensure_traceparent(None)) != trace_id_of(ensure_traceparent(None))


def test_child_keeps_trace_and_flags_with_a_new_span() -> None:
    """The next hop shares the trace id and flags but gets its own span id."""
    child = child_traceparent(VALID)
    assert SHAPE.match(child)
    assert trace_id_of(child) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert child.split("-")[2] != "00f067aa0ba902b7"
    assert child.endswith("-01")
    assert child_traceparent(VALID[:-2] + "00").endswith("-00")


def test_trace_id_of_reads_the_second_field() -> None:
    """trace_id_of returns the 32-hex trace id."""
    assert trace_id_of(VALID) == "4bf92f3577b34da6a3ce929d0e0e4736"
