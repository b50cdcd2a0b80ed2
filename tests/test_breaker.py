"""The circuit breaker, driven by an injected clock: closed → open → half-open → closed."""

from __future__ import annotations

import pytest

from gateway.errors import AdapterUnavailable
from gateway.runtime.breaker import BreakerState, CircuitBreaker


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, threshold: int = 3, reset_s: float = 10.0) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset_s, clock=clock)


def _state(breaker: CircuitBreaker) -> BreakerState:
    """Read the state afresh (a call, so the type checker does not carry a narrowed value)."""
    return breaker.state


def _trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.before_call("up")
        breaker.record_failure()


def test_starts_closed_and_lets_calls_through() -> None:
    """A fresh breaker is closed and allows calls."""
    breaker = _breaker(Clock())
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.allows()
    breaker.before_call("up")


def test_opens_after_threshold_consecutive_failures() -> None:
    """Failures below the threshold keep it closed; reaching it opens the circuit."""
    breaker = _breaker(Clock(), threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert not breaker.allows()


def test_success_resets_the_failure_count() -> None:
    """Only consecutive failures count: a success in between starts the count again."""
    breaker = _breaker(Clock(), threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED


def test_open_circuit_refuses_with_retry_after() -> None:
    """While open, before_call raises AdapterUnavailable with the seconds left."""
    clock = Clock()
    breaker = _breaker(clock, reset_s=10.0)
    _trip(breaker)
    clock.now += 3.5
    with pytest.raises(AdapterUnavailable) as caught:
        breaker.before_call("national")
    assert caught.value.retry_after == 7
    assert caught.value.code == "adapter_unavailable"
    assert "national" in caught.value.detail
    assert breaker.retry_after() == 7


def test_half_open_after_reset_timeout_lets_one_probe_through() -> None:
    """Once the timeout passes exactly one probe goes out; a second caller is refused."""
    clock = Clock()
    breaker = _breaker(clock, reset_s=10.0)
    _trip(breaker)
    clock.now += 9.99
    assert _state(breaker) is BreakerState.OPEN
    clock.now += 0.01
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allows()
    breaker.before_call("up")  # the probe
    assert not breaker.allows()
    with pytest.raises(AdapterUnavailable) as caught:
        breaker.before_call("up")
    assert caught.value.retry_after == 1


def test_successful_probe_closes_the_circuit() -> None:
    """A probe that succeeds closes the circuit and clears the failure count."""
    clock = Clock()
    breaker = _breaker(clock, threshold=2, reset_s=5.0)
    _trip(breaker)
    clock.now += 5
    breaker.before_call("up")
    breaker.record_success()
    assert _state(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED


def test_failed_probe_reopens_for_a_full_timeout() -> None:
    """A probe that fails opens the circuit again, timed from the probe's failure."""
    clock = Clock()
    breaker = _breaker(clock, threshold=5, reset_s=10.0)
    _trip(breaker)
    clock.now += 12
    breaker.before_call("up")
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert breaker.retry_after() == 10
    clock.now += 9
    assert _state(breaker) is BreakerState.OPEN
    clock.now += 1
    assert _state(breaker) is BreakerState.HALF_OPEN


def test_default_clock_is_monotonic_time() -> None:
    """Without an injected clock the breaker still works on real time."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=60)
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert 59 <= breaker.retry_after() <= 60
