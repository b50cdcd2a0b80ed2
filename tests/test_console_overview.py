"""The overview's figures from the gateway's own metrics exposition."""

from __future__ import annotations

from gateway.admin.console.overview import Sampler, exchange_totals
from gateway.observe.metrics import Metrics

EXPOSITION = """# HELP gateway_exchanges_total Exchanges answered.
# TYPE gateway_exchanges_total counter
gateway_exchanges_total{client="a",service="s",adapter="n",code="ok"} 7.0
gateway_exchanges_total{client="a",service="s",adapter="n",code="accepted"} 2.0
gateway_exchanges_total{client="a",service="s",adapter="n",code="replayed"} 1.0
gateway_exchanges_total{client="unknown",service="s",adapter="none",code="key_unknown"} 3.0
gateway_exchanges_total{client="a",service="s",adapter="n",code="upstream_error"} 1.0
# HELP gateway_rate_limited_total Refused.
# TYPE gateway_rate_limited_total counter
gateway_rate_limited_total{client="a"} 40.0
"""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Exposition:
    """Metrics text as a scrape would read it, written by the test."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self) -> str:
        return self.text


def test_totals_count_every_label_set_and_errors_are_every_code_but_success() -> None:
    """ok, accepted and replayed are successes; every other code is a failure."""
    assert exchange_totals(EXPOSITION) == (14.0, 4.0)
    assert exchange_totals("") == (0.0, 0.0)


def _totals(total: float, errors: float) -> str:
    ok = total - errors
    return (
        "# TYPE gateway_exchanges_total counter\n"
        f'gateway_exchanges_total{{client="a",service="s",adapter="n",code="ok"}} {ok}\n'
        f'gateway_exchanges_total{{client="a",service="s",adapter="n",code="internal"}} {errors}\n'
    )


def test_rates_and_the_chart_come_from_samples_over_time() -> None:
    """Per minute over the last minute, error rate over five, one bar per interval."""
    clock = Clock()
    metrics = Exposition()
    sampler = Sampler(metrics, every_s=10, clock=clock)
    assert sampler.per_minute() is None
    assert sampler.error_rate() is None
    assert sampler.chart().bars == ()
    for t, total, errors in ((0, 0, 0), (10, 10, 0), (20, 30, 5), (30, 30, 5)):
        clock.now = t
        metrics.text = _totals(total, errors)
        sampler.sample()
    clock.now = 40
    metrics.text = _totals(60, 5)
    # Samples within 60 s of now (t=0 is 40 s ago): 60 exchanges in 40 s.
    assert sampler.per_minute() == 90.0
    assert sampler.error_rate() == 5 / 60
    chart = sampler.chart(width=300, height=100)
    assert [round(b.height) for b in chart.bars] == [50, 100, 0]  # 60, 120, 0 per minute
    assert [round(b.error_height) for b in chart.bars] == [0, 25, 0]
    assert chart.peak == 120
    assert chart.minutes == 0.5
    assert chart.bars[1].label.endswith("120/min, 30 failed/min")


def test_nothing_answered_means_no_error_rate_rather_than_zero() -> None:
    """An idle gateway shows "—", not 0 %."""
    clock = Clock()
    metrics = Exposition()
    metrics.text = _totals(5, 1)
    sampler = Sampler(metrics, clock=clock)
    sampler.sample()
    clock.now = 30
    assert sampler.per_minute() == 0.0
    assert sampler.error_rate() is None


def test_the_real_metrics_exposition_is_read() -> None:
    """Against the gateway's own Metrics: nothing answered yet reads as zero."""
    metrics = Metrics()
    assert exchange_totals(metrics.render().decode()) == (0.0, 0.0)
