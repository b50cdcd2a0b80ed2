"""Operational monitoring records as the store keeps them (issue 25).

One row per exchange, incoming callback, and outbox delivery or callback attempt, in
the ``monitoring_records`` table: apart from the evidence log (no hash chain, no
bodies), with a retention of its own. Both backends share the column list and the row
mapping below; each writes its own SQL dialect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "INSERT_COLUMNS",
    "MONITORING_CHUNK",
    "MONITORING_COLUMNS",
    "PRUNE_SQL",
    "SAMPLES_SQL",
    "MonitoringQuery",
    "MonitoringRecord",
    "MonitoringSample",
    "monitoring_row",
    "query_sql",
    "record_from_row",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitoringRecord:
    """One operational record. Times: ``received_at`` (Unix seconds) and each later step
    as milliseconds after it, None where the request never got there."""

    kind: str  # exchange | callback | delivery | callback_delivery
    received_at: float
    message_id: str | None = None
    seq: int | None = None  # the message's row in the evidence log
    correlation_id: str | None = None
    client: str | None = None  # None: the sender was never proven (the signature failed)
    service: str | None = None
    target: str | None = None
    adapter: str | None = None
    via: tuple[str, ...] = ()
    verified_ms: float | None = None
    validated_ms: float | None = None
    upstream_ms: float | None = None  # sent upstream
    answered_ms: float | None = None  # the upstream's answer came back
    delivered_ms: float | None = None  # an outbox attempt's delivery (or its end)
    duration_ms: float = 0.0  # until the answer left, or the attempt ended
    request_size: int | None = None
    response_size: int | None = None
    status: int | None = None  # HTTP status answered (exchanges, callbacks)
    code: str | None = None  # the problem code, if any
    outcome: str | None = None  # outbox attempts: delivered | retry | dead | deferred
    ok: bool = True
    attempt: int | None = None
    instance: str = ""
    trace_id: str | None = None
    id: int | None = None  # the row id once stored (the paging cursor)

    @property
    def relay(self) -> str | None:
        """The hop that vouched for the client (the last of the chain), if relayed."""
        return self.via[-1] if self.via else None


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitoringQuery:
    """A page of records, newest first. ``client``/``relay`` None means any (admin)."""

    since: float | None = None
    until: float | None = None
    service: str | None = None
    status: int | None = None
    ok: bool | None = None
    client: str | None = None
    relay: str | None = None
    before_id: int | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitoringSample:
    """What an aggregate needs of one record: no ids of anyone."""

    received_at: float
    service: str | None
    kind: str
    ok: bool
    duration_ms: float


# The table's columns after ``id``, in the order monitoring_row gives them.
MONITORING_COLUMNS = (
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
    "relay",
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


def monitoring_row(r: MonitoringRecord) -> tuple[Any, ...]:
    """A record as the values of MONITORING_COLUMNS."""
    return (
        r.kind,
        r.received_at,
        r.message_id,
        r.seq,
        r.correlation_id,
        r.client,
        r.service,
        r.target,
        r.adapter,
        ",".join(r.via) if r.via else None,
        r.relay,
        r.verified_ms,
        r.validated_ms,
        r.upstream_ms,
        r.answered_ms,
        r.delivered_ms,
        r.duration_ms,
        r.request_size,
        r.response_size,
        r.status,
        r.code,
        r.outcome,
        1 if r.ok else 0,
        r.attempt,
        r.instance,
        r.trace_id,
    )


def record_from_row(row: Mapping[str, Any]) -> MonitoringRecord:
    """A stored row (``id`` and MONITORING_COLUMNS by name) as a record."""
    values = dict(row)
    via = values.pop("via")
    values.pop("relay")
    values["ok"] = bool(values["ok"])
    return MonitoringRecord(via=tuple(via.split(",")) if via else (), **values)


def query_sql(q: MonitoringQuery, placeholder: Callable[[int], str]) -> tuple[str, list[Any]]:
    """``SELECT`` for a page of ``q``, newest first, with its parameters; ``placeholder``
    gives the dialect's n-th parameter (``?`` or ``$n``)."""
    where: list[str] = []
    params: list[Any] = []

    def add(clause: str, value: Any) -> None:
        params.append(value)
        where.append(clause.format(placeholder(len(params))))

    if q.since is not None:
        add("received_at >= {}", q.since)
    if q.until is not None:
        add("received_at < {}", q.until)
    if q.service is not None:
        add("service = {}", q.service)
    if q.status is not None:
        add("status = {}", q.status)
    if q.ok is not None:
        add("ok = {}", 1 if q.ok else 0)
    if q.client is not None:
        add("client = {}", q.client)
    if q.relay is not None:
        add("relay = {}", q.relay)
    if q.before_id is not None:
        add("id < {}", q.before_id)
    params.append(q.limit)
    sql = (
        f"SELECT id, {', '.join(MONITORING_COLUMNS)} FROM monitoring_records"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY id DESC LIMIT {placeholder(len(params))}"
    )
    return sql, params


INSERT_COLUMNS = ", ".join(MONITORING_COLUMNS)
SAMPLES_SQL = (
    "SELECT received_at, service, kind, ok, duration_ms FROM monitoring_records"
    " WHERE received_at >= {} AND received_at < {} ORDER BY id DESC LIMIT {}"
)
PRUNE_SQL = "DELETE FROM monitoring_records WHERE received_at < {}"
# Rows per INSERT statement: 26 parameters each, well under SQLite's 32766 and
# PostgreSQL's 32767 bind parameters.
MONITORING_CHUNK = 250
