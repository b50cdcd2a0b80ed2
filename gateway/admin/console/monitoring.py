"""The console's monitoring page: per-service traffic, latency and error-rate charts.

Drawn server-side as inline SVG (no script, nothing loaded from elsewhere: the console's
CSP holds) from the operational records' aggregates (``gateway.exchange.monitoring.aggregate``,
the same figures the central monitor pulls).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.exchange.monitoring import ServiceAggregate

__all__ = ["BarChart", "HBar", "charts"]

LABEL_W = 200  # room for "service · kind" on the left
BAR_H = 18
GAP = 6


@dataclass(frozen=True, slots=True)
class HBar:
    label: str  # "credit.query · exchange"
    y: float
    width: float
    value: str  # the number shown at the bar's end
    css: str  # bar, bar-p95, bar-error


@dataclass(frozen=True, slots=True)
class BarChart:
    id: str
    title: str
    width: int
    height: int
    label_w: int
    bars: tuple[HBar, ...]


def _label(a: ServiceAggregate) -> str:
    return f"{a.service or '(refused)'} · {a.kind}"


def _chart(
    chart_id: str,
    title: str,
    rows: Sequence[ServiceAggregate],
    series: Sequence[tuple[str, Callable[[ServiceAggregate], float], Callable[[float], str]]],
    width: int = 640,
) -> BarChart:
    """One group of bars per row, one bar per series, scaled to the largest value."""
    span = width - LABEL_W - 110  # room for the value after the bar
    peak = max((get(a) for a in rows for _, get, _ in series), default=0.0) or 1.0
    bars = []
    y = 0.0
    for a in rows:
        for css, get, fmt in series:
            value = get(a)
            bars.append(
                HBar(
                    label=_label(a),
                    y=y,
                    width=round(value / peak * span, 1),
                    value=fmt(value),
                    css=css,
                )
            )
            y += BAR_H
        y += GAP
    return BarChart(
        id=chart_id,
        title=title,
        width=width,
        height=int(y) or BAR_H,
        label_w=LABEL_W,
        bars=tuple(bars),
    )


def charts(rows: Sequence[ServiceAggregate]) -> list[BarChart]:
    """Traffic (exchanges, errors in red), latency (p50, p95) and error rate."""
    return [
        _chart(
            "traffic",
            "Traffic",
            rows,
            [("bar", lambda a: a.count, lambda v: f"{v:.0f}"),
             ("bar-error", lambda a: a.errors, lambda v: f"{v:.0f} failed")],
        ),
        _chart(
            "latency",
            "Latency (ms)",
            rows,
            [("bar", lambda a: a.p50_ms, lambda v: f"p50 {v:.1f} ms"),
             ("bar-p95", lambda a: a.p95_ms, lambda v: f"p95 {v:.1f} ms")],
        ),
        _chart(
            "errors",
            "Error rate",
            rows,
            [("bar-error", lambda a: a.errors / a.count if a.count else 0.0,
              lambda v: f"{v * 100:.1f} %")],
        ),
    ]  # fmt: skip
