"""A circuit breaker per adapter: closed → open after repeated failures → half-open probe."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable

from gateway.errors import AdapterUnavailable

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls flow; consecutive failures are counted
    OPEN = "open"  # calls are refused until the reset timeout passes
    HALF_OPEN = "half_open"  # one probe call is let through; its outcome decides


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout_s
        ):
            self._state = BreakerState.HALF_OPEN
        return self._state

    def retry_after(self) -> int:
        left = self.reset_timeout_s - (self._clock() - self._opened_at)
        return max(1, math.ceil(left))

    def allows(self) -> bool:
        """Whether a call may go out now (without raising)."""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probing
        )

    def before_call(self, name: str) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            return
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return
        raise AdapterUnavailable(
            f"adapter {name} is failing; circuit open", retry_after=self.retry_after()
        )

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probing = False

    def record_failure(self) -> None:
        self._probing = False
        if self._state is BreakerState.HALF_OPEN:
            self._trip()
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._trip()

    def _trip(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
