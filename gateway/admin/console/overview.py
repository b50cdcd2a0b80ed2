"""The overview's figures and its chart, from the gateway's own Prometheus metrics.

A sampler reads ``gateway_exchanges_total`` from the metrics exposition (what a scrape
gets, so that with ``--workers`` the figures are merged) every ``every_s`` seconds
and keeps the last ``keep`` samples: enough for exchanges per minute, the error rate and
a bar chart of the last half hour, drawn server-side as inline SVG (no script).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["OK_CODES", "Bar", "Chart", "Sample", "Sampler", "exchange_totals"]

OK_CODES = frozenset({"ok", "accepted", "replayed"})  # gateway_exchanges_total's successes


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    total: float
    errors: float


def exchange_totals(exposition: str) -> tuple[float, float]:
    """All exchanges answered and those that failed, summed over every label set."""
    total = errors = 0.0
    for family in text_string_to_metric_families(exposition):
        if family.name != "gateway_exchanges":
            continue
        for sample in family.samples:
            if sample.name != "gateway_exchanges_total":
                continue
            total += sample.value
            if sample.labels.get("code") not in OK_CODES:
                errors += sample.value
    return total, errors


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    width: float
    y: float  # top of the bar of all exchanges
    height: float
    error_y: float  # top of the bar of failed exchanges (drawn over it)
    error_height: float
    label: str  # for the bar's <title>


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    peak: float  # exchanges per minute at the top of the scale
    bars: tuple[Bar, ...]
    minutes: float  # the time the chart spans
    start: str = ""  # HH:MM:SS UTC of its first and last sample
    end: str = ""


def _hms(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at))


class Sampler:
    def __init__(
        self,
        exposition: Callable[[], str],
        *,
        every_s: float = 10.0,
        keep: int = 180,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.exposition = exposition  # the metrics text a scrape would get
        self.every_s = every_s
        self._clock = clock
        self.samples: deque[Sample] = deque(maxlen=keep)

    def current(self) -> Sample:
        total, errors = exchange_totals(self.exposition())
        return Sample(self._clock(), total, errors)

    def sample(self) -> Sample:
        taken = self.current()
        self.samples.append(taken)
        return taken

    def _since(self, window_s: float) -> tuple[Sample, Sample] | None:
        """The oldest sample within ``window_s`` of now, and now (a fresh reading)."""
        now = self.current()
        first = next((s for s in self.samples if now.at - s.at <= window_s), None)
        if first is None or now.at - first.at <= 0:
            return None
        return first, now

    def per_minute(self, window_s: float = 60.0) -> float | None:
        pair = self._since(window_s)
        if pair is None:
            return None
        first, now = pair
        return (now.total - first.total) / (now.at - first.at) * 60

    def error_rate(self, window_s: float = 300.0) -> float | None:
        """Failed / answered over the window; None when nothing was answered."""
        pair = self._since(window_s)
        if pair is None or pair[1].total == pair[0].total:
            return None
        first, now = pair
        return (now.errors - first.errors) / (now.total - first.total)

    def chart(self, width: int = 600, height: int = 120) -> Chart:
        """One bar per sampling interval: exchanges per minute, failures over them."""
        points = list(self.samples)
        rates = []
        for a, b in itertools.pairwise(points):
            dt = b.at - a.at
            if dt > 0:
                rates.append((b.at, (b.total - a.total) / dt * 60, (b.errors - a.errors) / dt * 60))
        peak = max((r for _, r, _ in rates), default=0.0) or 1.0
        slot = width / max(len(rates), 1)
        bars = []
        for i, (at, rate, failed) in enumerate(rates):
            h = rate / peak * height
            eh = failed / peak * height
            stamp = _hms(at)
            bars.append(
                Bar(
                    x=round(i * slot + slot * 0.1, 1),
                    width=round(slot * 0.8, 1),
                    y=round(height - h, 1),
                    height=round(h, 1),
                    error_y=round(height - eh, 1),
                    error_height=round(eh, 1),
                    label=f"{stamp} UTC: {rate:.0f}/min, {failed:.0f} failed/min",
                )
            )
        span = (points[-1].at - points[0].at) / 60 if len(points) > 1 else 0.0
        start, end = (_hms(points[0].at), _hms(points[-1].at)) if points else ("", "")
        return Chart(
            width=width,
            height=height,
            peak=peak,
            bars=tuple(bars),
            minutes=span,
            start=start,
            end=end,
        )

    def context(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """A cleanup context that samples in the background while the app runs."""

        async def run() -> None:
            while True:
                self.sample()
                await asyncio.sleep(self.every_s)

        async def ctx(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(run(), name="console-sampler")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return ctx
