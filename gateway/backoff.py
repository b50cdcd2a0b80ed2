"""When to try again: the retry timing the outbox (gateway/exchange/delivery.py) and the
time-stamping of checkpoints (gateway/audit/timestamping.py) share."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base·2^(n-1))]."""
    return rng.uniform(0, min(max_s, base_s * 2 ** max(0, attempt - 1)))
