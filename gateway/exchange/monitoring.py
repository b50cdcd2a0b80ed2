"""Operational monitoring (issue 25): a record per exchange, callback and outbox attempt.

Collection is off the request path: the pipeline notes times in its per-request
``RequestContext``; when the answer is ready the problem middleware hands the context to
``Monitor.exchange``, which builds one ``MonitoringRecord`` and appends it to a bounded
in-memory queue (no await, no I/O). A background task writes the queue in batches
(``Store.insert_monitoring``) and prunes records past ``monitoring.retention``. When the
queue is full the record is dropped and counted (``gateway_monitoring_dropped_total``):
monitoring never slows or fails an exchange.

Views are built once here and used by the member API (``GET /v1/monitoring/records``),
the admin API, the console and the central monitor (``GET /v1/monitoring/aggregates``):
``record_view``, ``records_csv``, ``aggregate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.config.model import MEMBER_ID_PATTERN, MonitoringConfig
from gateway.encoding import iso_utc
from gateway.errors import GatewayError, MalformedRequest, NotPermitted
from gateway.exchange.pipeline import CTX_KEY, Pipeline, RequestContext
from gateway.observe.traceparent import trace_id_of
from gateway.store import MonitoringQuery, MonitoringRecord, MonitoringSample, Store

__all__ = [
    "CSV_COLUMNS",
    "SELF_SERVICE_COMPONENTS",
    "Monitor",
    "ServiceAggregate",
    "admin_records",
    "aggregate",
    "aggregates_document",
    "central_aggregates",
    "csv_safe",
    "member_records",
    "parse_query",
    "parse_window",
    "record_view",
    "records_csv",
    "records_response",
]

log = logging.getLogger("gateway.exchange.monitoring")

_MEMBER_ID = re.compile(MEMBER_ID_PATTERN)
_SERVICE = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*$")
MAX_LIMIT = 1000
# The aggregate reads at most this many records of its window (newest first); a window
# with more is marked ``truncated`` (docs/decisions.md, "Operational monitoring").
MAX_SAMPLES = 200_000


class Monitor:
    """Collects records into a bounded queue; a background task writes them in batches."""

    def __init__(
        self,
        *,
        config: MonitoringConfig,
        store: Store,
        instance: str,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.instance = instance
        self._clock = clock
        self._queue: deque[MonitoringRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = 0.0
        self.dropped = 0
        self.written = 0
        registry = registry if registry is not None else CollectorRegistry()
        self._dropped = Counter(
            "gateway_monitoring_dropped",
            "Operational monitoring records dropped (queue full or store failure).",
            ("reason",),
            registry=registry,
        )
        for reason in ("queue_full", "store_error"):  # shown as 0 before the first drop
            self._dropped.labels(reason)
        self._depth = Gauge(
            "gateway_monitoring_queue",
            "Operational monitoring records waiting to be written.",
            registry=registry,
            multiprocess_mode="livesum",
        )

    # Collection (the request path: no await, no I/O) ---------------------------------

    def submit(self, record: MonitoringRecord) -> None:
        """Queue ``record``; when the queue is full, drop it and count the drop."""
        if not self.config.enabled:
            return
        if len(self._queue) >= self.config.queue_limit:
            self._drop("queue_full", 1)
            return
        self._queue.append(record)
        if len(self._queue) >= self.config.batch_size:
            self._wake.set()

    def _drop(self, reason: str, count: int) -> None:
        self.dropped += count
        self._dropped.labels(reason).inc(count)

    def request_done(
        self,
        request: web.Request,
        ctx: RequestContext,
        response: web.StreamResponse,
        code: str | None,
        known_services: Mapping[str, object],
        adapter: str | None,
    ) -> None:
        """The record of an answered ``/v1/exchange/…`` or ``/v1/callbacks/…`` request."""
        path = request.path
        if path.startswith("/v1/exchange/"):
            kind = "exchange"
        elif path.startswith("/v1/callbacks/"):
            kind = "callback"
        else:
            return
        body = response.body if isinstance(response, web.Response) else None
        service = ctx.service if ctx.service in known_services else None
        self.exchange(
            kind=kind,
            received_at=ctx.received_at,
            client=ctx.client,
            message_id=ctx.message_id,
            service=service,
            headers=request.headers,
            verified="verified" in ctx.steps,
            steps=ctx.steps,
            duration_ms=(time.perf_counter() - ctx.started) * 1000,
            request_size=ctx.size,
            response_size=len(body) if isinstance(body, bytes) else None,
            status=response.status,
            code=code,
            seq=ctx.seq,
            adapter=ctx.adapter or adapter,
            trace_id=trace_id_of(ctx.traceparent) if ctx.traceparent else None,
        )

    def exchange(
        self,
        *,
        kind: str,
        received_at: float,
        client: str | None,
        message_id: str | None,
        service: str | None,
        headers: Mapping[str, str],
        verified: bool,
        steps: Mapping[str, float],
        duration_ms: float,
        request_size: int,
        response_size: int | None,
        status: int,
        code: str | None,
        seq: int | None,
        adapter: str | None,
        trace_id: str | None,
    ) -> None:
        """One ingress request's record. What the sender claims (``Gw-Client``,
        ``Gw-Via``, ``Gw-Target``, ``Gw-Correlation-Id``) is kept only once its signature
        verified, and only in its valid form: an unproven request is nobody's record."""
        via: tuple[str, ...] = ()
        target = correlation = None
        if verified:
            raw_via = headers.get("Gw-Via", "")
            via = tuple(h.strip() for h in raw_via.split(",") if h.strip())
            target = _member_or_none(headers.get("Gw-Target"))
            correlation = _uuid_or_none(headers.get("Gw-Correlation-Id"))
        self.submit(
            MonitoringRecord(
                kind=kind,
                received_at=received_at,
                message_id=message_id if verified else None,
                seq=seq,
                correlation_id=correlation,
                client=client if verified else None,
                service=service,
                target=target,
                adapter=adapter,
                via=via,
                verified_ms=steps.get("verified"),
                validated_ms=steps.get("validated"),
                upstream_ms=steps.get("upstream"),
                answered_ms=steps.get("answered"),
                duration_ms=duration_ms,
                request_size=request_size,
                response_size=response_size,
                status=status,
                code=code,
                ok=status < 400,
                instance=self.instance,
                trace_id=trace_id,
            )
        )

    def attempt(
        self,
        *,
        kind: str,
        outcome: str,
        message_id: str,
        seq: int,
        correlation_id: str | None,
        client: str,
        service: str,
        target: str | None,
        adapter: str | None,
        attempt: int,
        code: str | None,
        elapsed_ms: float,
        trace_id: str | None,
    ) -> None:
        """One outbox attempt (``delivery`` of a message, ``callback_delivery`` of a
        callback to its member)."""
        now = self._clock()
        self.submit(
            MonitoringRecord(
                kind=kind,
                received_at=now - elapsed_ms / 1000,
                message_id=message_id,
                seq=seq,
                correlation_id=correlation_id,
                client=client,
                service=service,
                target=target,
                adapter=adapter,
                delivered_ms=elapsed_ms if outcome == "delivered" else None,
                duration_ms=elapsed_ms,
                code=code,
                outcome=outcome,
                ok=outcome == "delivered",
                attempt=attempt,
                instance=self.instance,
                trace_id=trace_id,
            )
        )

    # Writing (the background task) ---------------------------------------------------

    async def start(self) -> None:
        if self.config.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="monitoring")

    async def stop(self) -> None:
        """Stop the writer and write what is queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> int:
        """Write everything queued now, in batches; the number written."""
        written = 0
        while self._queue:
            batch = [
                self._queue.popleft() for _ in range(min(self.config.batch_size, len(self._queue)))
            ]
            try:
                await self.store.insert_monitoring(batch)
            except GatewayError as exc:
                log.warning("monitoring records not written: %s", exc.detail)
                self._drop("store_error", len(batch))
                break
            written += len(batch)
        self.written += written
        self._depth.set(len(self._queue))
        return written

    async def prune(self) -> int:
        """Delete the records older than the retention."""
        return await self.store.prune_monitoring(self._clock() - self.config.retention_s)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()
            now = self._clock()
            if now - self._pruned_at >= min(60.0, self.config.retention_s / 10):
                self._pruned_at = now
                try:
                    await self.prune()
                except GatewayError as exc:
                    log.warning("monitoring records not pruned: %s", exc.detail)


def _member_or_none(value: str | None) -> str | None:
    return value if value is not None and _MEMBER_ID.match(value) else None


def _uuid_or_none(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


# Queries -----------------------------------------------------------------------------


def _time(name: str, value: str | None) -> float | None:
    """A query time: Unix seconds or RFC 3339 (``2026-12-04T10:00:00Z``)."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise MalformedRequest(f"{name} is a Unix time or an RFC 3339 date-time") from exc
        if parsed.tzinfo is None:
            raise MalformedRequest(f"{name} must name its UTC offset (e.g. Z)") from None
        return parsed.timestamp()
    if not math.isfinite(number):
        raise MalformedRequest(f"{name} is a Unix time or an RFC 3339 date-time")
    return number


def parse_window(query: Mapping[str, str]) -> tuple[float | None, float | None]:
    since, until = _time("since", query.get("since")), _time("until", query.get("until"))
    if since is not None and until is not None and until < since:
        raise MalformedRequest("until is before since")
    return since, until


def parse_query(
    query: Mapping[str, str], *, client: str | None = None, relay: str | None = None
) -> MonitoringQuery:
    """``since, until, service, status, limit, cursor`` as a store query. ``status`` is
    an HTTP status, ``ok`` or ``error``; ``cursor`` is the ``next`` of the page before.
    ``client``/``relay`` come from the caller's proven identity, never from the query."""
    since, until = parse_window(query)
    service = query.get("service") or None
    if service is not None and (len(service) > 100 or not _SERVICE.match(service)):
        raise MalformedRequest("service is a service code such as credit.query")
    status: int | None = None
    ok: bool | None = None
    raw_status = query.get("status") or None
    if raw_status in ("ok", "error"):
        ok = raw_status == "ok"
    elif raw_status is not None:
        if not re.fullmatch(r"[1-5][0-9]{2}", raw_status):
            raise MalformedRequest("status is an HTTP status, ok or error")
        status = int(raw_status)
    try:
        limit = int(query.get("limit", "100"))
    except ValueError as exc:
        raise MalformedRequest("limit is an integer") from exc
    if not 1 <= limit <= MAX_LIMIT:
        raise MalformedRequest(f"limit is between 1 and {MAX_LIMIT}")
    before: int | None = None
    cursor = query.get("cursor") or None
    if cursor is not None:
        if not re.fullmatch(r"[0-9]{1,18}", cursor):
            raise MalformedRequest("cursor is the next value of a previous page")
        before = int(cursor)
    return MonitoringQuery(
        since=since,
        until=until,
        service=service,
        status=status,
        ok=ok,
        client=client,
        relay=relay,
        before_id=before,
        limit=limit,
    )


# Views (one shape for the API, the admin API, the console and CSV) -------------------

CSV_COLUMNS = (
    "kind",
    "received_at",
    "message_id",
    "seq",
    "correlation_id",
    "client",
    "service",
    "target",
    "adapter",
    "via",
    "verified_ms",
    "validated_ms",
    "upstream_ms",
    "answered_ms",
    "delivered_ms",
    "duration_ms",
    "request_size",
    "response_size",
    "status",
    "code",
    "outcome",
    "ok",
    "attempt",
    "instance",
    "trace_id",
)


def record_view(r: MonitoringRecord) -> dict[str, Any]:
    """A record as members, admins and the console see it (no bodies are in records)."""
    return {
        "kind": r.kind,
        "received_at": iso_utc(r.received_at, millis=True),
        "message_id": r.message_id,
        "seq": r.seq,
        "correlation_id": r.correlation_id,
        "client": r.client,
        "service": r.service,
        "target": r.target,
        "adapter": r.adapter,
        "via": list(r.via),
        "verified_ms": _ms(r.verified_ms),
        "validated_ms": _ms(r.validated_ms),
        "upstream_ms": _ms(r.upstream_ms),
        "answered_ms": _ms(r.answered_ms),
        "delivered_ms": _ms(r.delivered_ms),
        "duration_ms": _ms(r.duration_ms),
        "request_size": r.request_size,
        "response_size": r.response_size,
        "status": r.status,
        "code": r.code,
        "outcome": r.outcome,
        "ok": r.ok,
        "attempt": r.attempt,
        "instance": r.instance,
        "trace_id": r.trace_id,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# A cell starting with one of these is a formula to a spreadsheet (OWASP, CSV injection).
_FORMULA = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%")


def csv_safe(value: Any) -> str:
    """A CSV cell: text that a spreadsheet would run as a formula is prefixed with ``'``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def records_csv(views: Iterable[Mapping[str, Any]]) -> bytes:
    """RFC 4180: a header line, CRLF line ends, fields quoted where they must be."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for view in views:
        writer.writerow([csv_safe(view[c]) for c in CSV_COLUMNS])
    return out.getvalue().encode("utf-8")


def records_response(
    request: web.Request, records: Sequence[MonitoringRecord], query: MonitoringQuery
) -> web.Response:
    """A page of records as JSON ``{"records", "next"}``, or CSV for ``Accept: text/csv``
    (the next page's cursor then in a ``Link: <…>; rel="next"`` header)."""
    views = [record_view(r) for r in records]
    following = None
    if len(records) == query.limit and records[-1].id is not None:
        following = str(records[-1].id)
    if _wants_csv(request.headers.get("Accept", "")):
        headers = {"Content-Type": "text/csv; charset=utf-8; header=present"}
        if following is not None:
            url = request.rel_url.update_query(cursor=following)
            headers["Link"] = f'<{url}>; rel="next"'
        return web.Response(body=records_csv(views), headers=headers)
    return web.json_response({"records": views, "next": following})


def _wants_csv(accept: str) -> bool:
    types = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    return "text/csv" in types and "application/json" not in types


# Aggregates (central monitoring, the console's charts) -------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAggregate:
    service: str
    kind: str
    count: int
    errors: int
    p50_ms: float
    p95_ms: float

    def view(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "kind": self.kind,
            "count": self.count,
            "errors": self.errors,
            "error_rate": round(self.errors / self.count, 4) if self.count else 0.0,
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
        }


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ascending values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def aggregate(samples: Iterable[MonitoringSample]) -> list[ServiceAggregate]:
    """Per service and kind: count, errors, p50 and p95 of the duration. Records with
    no known service (refused before the service was known) group under ``""``."""
    groups: dict[tuple[str, str], tuple[list[float], list[int]]] = {}
    for s in samples:
        durations, errors = groups.setdefault((s.service or "", s.kind), ([], [0]))
        durations.append(s.duration_ms)
        if not s.ok:
            errors[0] += 1
    result = []
    for (service, kind), (durations, errors) in sorted(groups.items()):
        durations.sort()
        result.append(
            ServiceAggregate(
                service=service,
                kind=kind,
                count=len(durations),
                errors=errors[0],
                p50_ms=percentile(durations, 50),
                p95_ms=percentile(durations, 95),
            )
        )
    return result


async def aggregates_document(
    store: Store, gateway: str, since: float | None, until: float | None, now: float
) -> dict[str, Any]:
    """``GET /v1/monitoring/aggregates``: per-service figures of a window (default: the
    last hour), no member ids beyond the gateway's own."""
    until = now if until is None else until
    since = until - 3600 if since is None else since
    samples = await store.monitoring_samples(since, until, MAX_SAMPLES)
    return {
        "gateway": gateway,
        "since": iso_utc(since, millis=True),
        "until": iso_utc(until, millis=True),
        "truncated": len(samples) >= MAX_SAMPLES,
        "services": [a.view() for a in aggregate(samples)],
    }


# The member API ------------------------------------------------------------------------

# PROTOCOL.md § Member self-service: a signed GET covers these (no body, no digest).
SELF_SERVICE_COMPONENTS = ("@method", "@target-uri", "gw-client", "gw-message-id")


async def member_records(pipeline: Pipeline, request: web.Request) -> web.Response:
    """``GET /v1/monitoring/records``: the caller's own records, verified as an exchange
    is. A member speaking for itself sees the records whose client it is; a relay
    speaking for a member sees only those it relayed itself (its hop last in Gw-Via).
    No query parameter names another client."""
    ctx: RequestContext = request[CTX_KEY]
    auth = pipeline.authenticate(
        request, None, pipeline.runtime.current, ctx, required=SELF_SERVICE_COMPONENTS
    )
    await pipeline.admit(auth)
    query = parse_query(
        request.query, client=auth.client, relay=auth.signer.id if auth.via else None
    )
    records = await pipeline.store.monitoring_records(query)
    return records_response(request, records, query)


async def central_aggregates(
    pipeline: Pipeline, config: MonitoringConfig, request: web.Request
) -> web.Response:
    """``GET /v1/monitoring/aggregates``: per-service counts, errors and latency
    percentiles, for the configured monitoring parties only (``monitoring.central``),
    each speaking for itself."""
    ctx: RequestContext = request[CTX_KEY]
    auth = pipeline.authenticate(
        request, None, pipeline.runtime.current, ctx, required=SELF_SERVICE_COMPONENTS
    )
    await pipeline.admit(auth)
    if auth.via or auth.client not in config.central:
        raise NotPermitted(f"{auth.client} is not a monitoring party of this gateway")
    since, until = parse_window(request.query)
    document = await aggregates_document(
        pipeline.store, pipeline.identity.member_id, since, until, time.time()
    )
    return web.json_response(document)


async def admin_records(store: Store, request: web.Request) -> web.Response:
    """``GET /admin/v1/monitoring/records``: every member's records (``client=`` to pick
    one), in the member API's shape."""
    client = request.query.get("client") or None
    if client is not None and not _MEMBER_ID.match(client):
        raise MalformedRequest("client is a member id <region>:<system>")
    query = parse_query(request.query, client=client)
    return records_response(request, await store.monitoring_records(query), query)
