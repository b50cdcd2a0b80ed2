"""Prometheus metrics: what operators graph and alert on, cheap on the hot path.

Every label set is bounded: clients are registered members (``unknown`` for anyone not
registered or not yet authenticated), services are configured services (``unknown``
otherwise), adapters are configured adapter names (``none`` when no adapter was
involved), codes are the protocol's stable error codes. No message id is ever a label.

=======================================  =========  ==========================================
name                                     type       labels
=======================================  =========  ==========================================
gateway_exchanges_total                  counter    client, service, adapter, code
gateway_stage_seconds                    histogram  stage (verify, validate, record, upstream,
                                                    total)
gateway_upstream_seconds                 histogram  adapter
gateway_upstream_errors_total            counter    adapter, code
gateway_signature_failures_total         counter    code
gateway_rate_limited_total               counter    client
gateway_deliveries_total                 counter    kind (message, callback), outcome
                                                    (delivered, retry, dead, deferred)
gateway_circuit_breaker_state            gauge      adapter (0 closed, 1 half-open, 2 open)
gateway_outbox_depth                     gauge      (read from the store at scrape time)
gateway_outbox_oldest_age_seconds        gauge      (read from the store at scrape time)
gateway_store_batch_units                histogram  (writes per group commit)
gateway_store_commit_seconds             histogram  (BEGIN to COMMIT of a batch, on the loop)
gateway_store_busy_total                 counter    (batches that waited for another worker)
gateway_directory_version                gauge      (the federation directory in force)
gateway_directory_age_seconds            gauge      (since its issued_at, at scrape time)
gateway_directory_expires_in_seconds     gauge      (negative: expired, served stale)
gateway_directory_updates_total          counter    outcome (applied, unreachable,
                                                    refused_<reason>)
gateway_signing_key_expires_in_seconds   gauge      kid (the gateway's signing key, when it
                                                    has an expiry; negative: expired)
gateway_directory_entries_refused_total  counter    reason (foreign_member, foreign_vouch,
                                                    local_member, duplicate, national)
=======================================  =========  ==========================================

``code`` on ``gateway_exchanges_total`` is ``ok`` (200), ``accepted`` (202), ``replayed``
(an idempotent repeat answered from the log) or the stable error code.

Multiprocess mode (``gateway serve --workers N``): set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory in the environment *before* the processes start (prometheus_client picks
its storage when it is imported). Each worker then writes its samples to files there and
``/metrics``, on whichever worker answers, merges them all; breaker states are the worst
state among live workers. Wipe the directory between runs of the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway.errors import GatewayError
from gateway.runtime.breaker import BreakerState
from gateway.store import Store

if TYPE_CHECKING:
    from gateway.runtime.registry import Runtime, RuntimeHolder

__all__ = [
    "CONTENT_TYPE",
    "STAGES",
    "UNKNOWN",
    "Metrics",
    "breaker_states",
    "multiprocess_dir",
]

log = logging.getLogger("gateway.observe.metrics")
# No *_created series beside every counter and histogram: they double the series count
# and nothing here graphs them (a process-wide prometheus_client switch).
disable_created_metrics()  # type: ignore[no-untyped-call]

# The classic text format, which every Prometheus reads; our names need no escaping.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN = "unknown"
NONE = "none"
STAGES = ("verify", "validate", "record", "upstream", "total")
# Verification takes tens of microseconds, an upstream call up to a service's timeout.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
SIGNATURE_CODES = (
    "signature_missing",
    "signature_invalid",
    "signature_expired",
    "key_unknown",
    "digest_mismatch",
)
UPSTREAM_CODES = frozenset({"upstream_error", "upstream_timeout", "adapter_unavailable"})
DELIVERY_OUTCOMES = ("delivered", "retry", "dead", "deferred")
BREAKER_VALUE = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}


class Observed(Protocol):
    """What the metrics read of a request (``gateway.exchange.pipeline.RequestContext`` is one):
    who it proved to be, which service it named, how long each stage took."""

    @property
    def client(self) -> str | None: ...
    @property
    def service(self) -> str | None: ...
    @property
    def timings(self) -> Mapping[str, float]: ...


def breaker_states(runtime: Runtime) -> dict[str, BreakerState]:
    return {name: slot.breaker.state for name, slot in runtime.adapters.items()}


def multiprocess_dir() -> str | None:
    """The prometheus_client multiprocess directory, when the environment names one."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Outbox(Collector):
    """The outbox gauges, set from the store just before each scrape (any process may
    answer it: the store is shared, so the value is the same from every worker)."""

    def __init__(self) -> None:
        self.depth: int | None = None
        self.oldest_age_s: float | None = None

    def collect(self) -> Iterable[Metric]:
        if self.depth is not None:
            yield GaugeMetricFamily(
                "gateway_outbox_depth",
                "Messages and callbacks waiting in the outbox (due or backing off).",
                value=self.depth,
            )
        if self.oldest_age_s is not None:
            yield GaugeMetricFamily(
                "gateway_outbox_oldest_age_seconds",
                "Age of the oldest message or callback still in the outbox (0 when empty).",
                value=self.oldest_age_s,
            )


class _Directory(Collector):
    """The directory gauges: its age is computed when scraped, not when last fetched."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.issued_at: float | None = None
        self.expires_at: float | None = None

    def collect(self) -> Iterable[Metric]:
        if self.version is None or self.issued_at is None or self.expires_at is None:
            return
        now = time.time()
        yield GaugeMetricFamily(
            "gateway_directory_version",
            "Version of the federation directory in force.",
            value=self.version,
        )
        yield GaugeMetricFamily(
            "gateway_directory_age_seconds",
            "Seconds since the directory in force was issued.",
            value=now - self.issued_at,
        )
        yield GaugeMetricFamily(
            "gateway_directory_expires_in_seconds",
            "Seconds until the directory in force expires (negative: expired, stale).",
            value=self.expires_at - now,
        )


# --- tsa ---
class _Stamps(Collector):
    """The unstamped span of the message log (gateway/audit/timestamping.py); the oldest's age
    is computed when scraped."""

    def __init__(self) -> None:
        self.unstamped: int | None = None
        self.oldest_at: float | None = None

    def collect(self) -> Iterable[Metric]:
        if self.unstamped is None:
            return
        yield GaugeMetricFamily(
            "gateway_checkpoints_unstamped",
            "Signed checkpoints still without an RFC 3161 time stamp from the TSA.",
            value=self.unstamped,
        )
        yield GaugeMetricFamily(
            "gateway_checkpoint_unstamped_age_seconds",
            "Seconds since the oldest checkpoint without a time stamp was signed (0: none).",
            value=0.0 if self.oldest_at is None else max(0.0, time.time() - self.oldest_at),
        )


# --- end tsa ---


class _SigningKey(Collector):
    """Seconds left before the signing key expires, computed when scraped."""

    def __init__(self) -> None:
        self.kid: str | None = None
        self.expires_at: float | None = None

    def collect(self) -> Iterable[Metric]:
        if self.kid is None or self.expires_at is None:
            return
        family = GaugeMetricFamily(
            "gateway_signing_key_expires_in_seconds",
            "Seconds until the gateway's signing key expires (negative: expired).",
            labels=("kid",),
        )
        family.add_metric((self.kid,), self.expires_at - time.time())
        yield family


class Metrics:
    """The gateway's metrics in their own registry (one ``Metrics`` per gateway app).

    Hot-path methods use children bound once: static label sets at construction,
    dynamic ones (client, service, adapter, code) on first use, then a dict lookup.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._exchanges = Counter(
            "gateway_exchanges_total",
            "Exchanges answered, by client, service, adapter and outcome code.",
            ("client", "service", "adapter", "code"),
            registry=r,
        )
        stage = Histogram(
            "gateway_stage_seconds",
            "Time spent in each stage of an exchange (total: the whole request).",
            ("stage",),
            buckets=BUCKETS,
            registry=r,
        )
        self._upstream_seconds = Histogram(
            "gateway_upstream_seconds",
            "Time an adapter took to answer (synchronous calls and outbox deliveries).",
            ("adapter",),
            buckets=BUCKETS,
            registry=r,
        )
        self._upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Adapter calls that failed, by adapter and error code.",
            ("adapter", "code"),
            registry=r,
        )
        signature = Counter(
            "gateway_signature_failures_total",
            "Requests refused by signature or digest verification, by reason.",
            ("code",),
            registry=r,
        )
        self._rate_limited = Counter(
            "gateway_rate_limited_total",
            "Requests refused with rate_limited, by client.",
            ("client",),
            registry=r,
        )
        deliveries = Counter(
            "gateway_deliveries_total",
            "Outbox delivery attempts by kind and outcome "
            "(retry: rescheduled; dead: dead-lettered; deferred: adapter unavailable).",
            ("kind", "outcome"),
            registry=r,
        )
        self._breaker = Gauge(
            "gateway_circuit_breaker_state",
            "Circuit breaker per adapter: 0 closed, 1 half-open, 2 open.",
            ("adapter",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self._outbox = _Outbox()
        r.register(self._outbox)
        self._directory = _Directory()
        r.register(self._directory)
        self._signing_key = _SigningKey()
        r.register(self._signing_key)
        self._stamps = _Stamps()  # --- tsa ---
        r.register(self._stamps)
        self._directory_updates = Counter(
            "gateway_directory_updates_total",
            "Federation directory fetches by outcome (applied, unreachable, refused_<reason>).",
            ("outcome",),
            registry=r,
        )
        self._directory_entries = Counter(
            "gateway_directory_entries_refused_total",
            "Directory entries not applied here, by reason (once per directory version).",
            ("reason",),
            registry=r,
        )
        self._batch_units = Histogram(
            "gateway_store_batch_units",
            "Writes committed together in one store transaction (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self._batch_seconds = Histogram(
            "gateway_store_commit_seconds",
            "Time from BEGIN to COMMIT of a store batch (the event loop waits for it).",
            buckets=BUCKETS,
            registry=r,
        )
        self._busy = Counter(
            "gateway_store_busy_total",
            "Store batches put off because another process held the write lock.",
            registry=r,
        )

        self._stage = {name: stage.labels(name) for name in STAGES}
        self._timed = {name: child for name, child in self._stage.items() if name != "total"}
        self._total = self._stage["total"]
        self._signature = {code: signature.labels(code) for code in SIGNATURE_CODES}
        self._deliveries = {
            (kind, outcome): deliveries.labels(kind, outcome)
            for kind in ("message", "callback")
            for outcome in DELIVERY_OUTCOMES
        }
        self._exchange_children: dict[tuple[str, str, str, str], Counter] = {}
        self._upstream_children: dict[str, Histogram] = {}
        self._error_children: dict[tuple[str, str], Counter] = {}
        self._limited_children: dict[str, Counter] = {}
        self._breaker_names: set[str] = set()

        self.multiprocess = multiprocess_dir() is not None
        if self.multiprocess:
            self._exposed = CollectorRegistry()
            # Reads every worker's files at each scrape (unannotated upstream).
            MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]
            self._exposed.register(self._outbox)
            self._exposed.register(self._directory)
            self._exposed.register(self._signing_key)
            self._exposed.register(self._stamps)  # --- tsa ---
        else:
            self._exposed = r

    # Hot path --------------------------------------------------------------------------

    def observe_request(
        self,
        runtime: Runtime,
        ctx: Observed,
        *,
        exchange: bool,
        adapter: str | None,
        status: int,
        code: str | None,
        replayed: bool,
        elapsed_s: float,
    ) -> None:
        """Account for one ``/v1`` request after its handler ran (from ``ctx.timings``)."""
        # "verify" is timed only once the signature verified: the client is proven.
        client = ctx.client if "verify" in ctx.timings and ctx.client in runtime.members else None
        if code is not None:
            failure = self._signature.get(code)
            if failure is not None:
                failure.inc()
            elif code == "rate_limited":
                self._limited(client or UNKNOWN).inc()
        if not exchange:
            return
        service = ctx.service if ctx.service in runtime.services else None
        outcome = code or ("replayed" if replayed else "accepted" if status == 202 else "ok")
        key = (client or UNKNOWN, service or UNKNOWN, adapter or NONE, outcome)
        child = self._exchange_children.get(key)
        if child is None:
            child = self._exchange_children[key] = self._exchanges.labels(*key)
        child.inc()
        timed = self._timed
        timings = ctx.timings
        for name, ms in timings.items():
            histogram = timed.get(name)
            if histogram is not None:
                histogram.observe(ms / 1000)
        self._total.observe(elapsed_s)
        upstream_ms = timings.get("upstream")
        if upstream_ms is not None and adapter is not None:
            self.observe_upstream(adapter, upstream_ms / 1000, code)

    def observe_upstream(self, adapter: str, seconds: float, code: str | None) -> None:
        """One adapter call; ``code`` is the error code when it failed (else None)."""
        if code is not None:
            if code not in UPSTREAM_CODES:
                return  # the call succeeded; something after it failed
            key = (adapter, code)
            errors = self._error_children.get(key)
            if errors is None:
                errors = self._error_children[key] = self._upstream_errors.labels(*key)
            errors.inc()
            if code == "adapter_unavailable":
                return  # refused before any call: no latency to speak of
        histogram = self._upstream_children.get(adapter)
        if histogram is None:
            histogram = self._upstream_children[adapter] = self._upstream_seconds.labels(adapter)
        histogram.observe(seconds)

    def committed(self, units: int, seconds: float) -> None:
        """A store batch committed (``GroupCommit``'s observer)."""
        self._batch_units.observe(units)
        self._batch_seconds.observe(seconds)

    def busy(self) -> None:
        """A store batch waited for another process's write lock."""
        self._busy.inc()

    def observe_delivery(self, kind: str, outcome: str) -> None:
        """One outbox attempt: ``kind`` message or callback; ``outcome`` as documented."""
        self._deliveries[(kind, outcome)].inc()

    def _limited(self, client: str) -> Counter:
        child = self._limited_children.get(client)
        if child is None:
            child = self._limited_children[client] = self._rate_limited.labels(client)
        return child

    # Scrape time -----------------------------------------------------------------------

    def set_breakers(self, adapters: Mapping[str, BreakerState]) -> None:
        """Publish each adapter's breaker state; adapters that are gone are dropped."""
        for name, state in adapters.items():
            self._breaker.labels(name).set(BREAKER_VALUE[state])
        for gone in self._breaker_names - adapters.keys():
            self._breaker.remove(gone)
        self._breaker_names = set(adapters)

    def set_outbox(self, depth: int | None, oldest_age_s: float | None) -> None:
        """The outbox gauges for the next scrape (None: unknown, the gauge is left out)."""
        self._outbox.depth = depth
        self._outbox.oldest_age_s = oldest_age_s

    def set_directory(self, *, version: int, issued_at: float, expires_at: float) -> None:
        self._directory.version = version
        self._directory.issued_at = issued_at
        self._directory.expires_at = expires_at

    def set_signing_key(self, kid: str, expires_at: float | None) -> None:
        """The signing key whose expiry the gauge counts down to (None: it has none)."""
        self._signing_key.kid = kid
        self._signing_key.expires_at = expires_at

    def set_stamp_backlog(self, unstamped: int, oldest_at: float | None) -> None:
        """The unstamped span: how many checkpoints, when the oldest was signed."""
        self._stamps.unstamped = unstamped
        self._stamps.oldest_at = oldest_at

    def directory_outcome(self, outcome: str) -> None:
        self._directory_updates.labels(outcome).inc()

    def directory_entry_refused(self, reason: str) -> None:
        self._directory_entries.labels(reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition (merged across workers in multiprocess mode)."""
        return generate_latest(self._exposed)

    # Wiring --------------------------------------------------------------------------

    def endpoint(
        self, store: Store, runtime: RuntimeHolder
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """``GET /metrics``: outbox and breaker gauges refreshed, then the exposition."""

        async def handler(request: web.Request) -> web.Response:
            try:
                depth = await store.outbox_depth()
                age = await store.oldest_outbox_age(time.time())
            except GatewayError as exc:  # the scrape still answers; the gauges go missing
                log.warning("outbox gauges unavailable: %s", exc.detail)
                depth, age = None, None
            self.set_outbox(depth, age)
            self.set_breakers(breaker_states(runtime.current))
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE})

        return handler

    def breaker_publisher(
        self, runtime: RuntimeHolder, every_s: float = 5.0
    ) -> Callable[[web.Application], AsyncIterator[None]]:
        """A cleanup context that publishes this worker's breakers now and then, so that
        in multiprocess mode a scrape answered by another worker still sees them."""

        async def publish() -> None:
            while True:
                self.set_breakers(breaker_states(runtime.current))
                await asyncio.sleep(every_s)

        async def ctx(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(publish(), name="breaker-metrics")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return ctx
