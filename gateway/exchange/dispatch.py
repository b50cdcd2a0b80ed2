"""Adapter dispatch: a recorded message to an adapter and back, for both delivery paths.

The pipeline (synchronous exchanges) and the outbox (``gateway/exchange/delivery.py``) both turn a
stored message into an ``Exchange``, route it, send it through the adapter's circuit
breaker and check the answer against the service's response schema. That lives here so
that neither path calls into the other.
"""

from __future__ import annotations

import asyncio
import json
import logging

from adapters.base import Answer, Exchange, receiver_of
from gateway.config.model import region_within
from gateway.errors import (
    AdapterUnavailable,
    DirectoryStale,
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.runtime.registry import Runtime, Service
from gateway.store import MessageRecord

__all__ = ["call_adapter", "exchange_of", "intended_receiver", "receiver_for", "validate_answer"]

log = logging.getLogger("gateway.exchange")


def exchange_of(record: MessageRecord, service: Service, traceparent: str) -> Exchange:
    """The ``Exchange`` an adapter is handed for a stored message."""
    lowered = {k.lower(): v for k, v in record.request_headers.items()}
    return Exchange(
        service=record.service,
        client=record.client,
        message_id=record.message_id,
        body=record.request_body or b"",
        target=record.target,
        user=lowered.get("gw-user"),
        issue=lowered.get("gw-issue"),
        traceparent=traceparent,
        timeout_s=service.config.timeout_s,
        asynchronous=record.mode == "async",
        # The relay chain it came through: the adapter appends this gateway to it.
        headers={"Gw-Via": ", ".join(record.via)} if record.via else {},
    )


def receiver_for(runtime: Runtime, adapter: str) -> str | None:
    """The member that adapter ``adapter`` delivers to (``receiver``), recorded with the
    message it delivered: the one party whose callback is then taken for it."""
    slot = runtime.adapters.get(adapter)
    return receiver_of(slot.adapter) if slot is not None else None


def intended_receiver(runtime: Runtime, record: MessageRecord) -> str | None:
    """The member a message still on its way would be delivered to, as routed now."""
    name = runtime.routes.lookup(record.service, record.target)
    return receiver_for(runtime, name) if name is not None else None


async def call_adapter(
    runtime: Runtime, service: Service, exchange: Exchange
) -> tuple[str, Answer]:
    """Route and send; the breaker and the adapter's concurrency limit apply."""
    name = runtime.routes.lookup(service.code, exchange.target)
    if name is None or name not in runtime.adapters:
        raise AdapterUnavailable(f"no route for {service.code}", retry_after=30)
    slot = runtime.adapters[name]
    if not slot.config.enabled:
        raise AdapterUnavailable(f"adapter {name} is disabled", retry_after=30)
    if name in runtime.refused:
        raise DirectoryStale(runtime.refused[name], retry_after=60)
    target = exchange.target
    if slot.config.learnt and target and region_within(target.split(":", 1)[0], runtime.region):
        # A route the directory added (a national catch-all) never takes a target in this
        # gateway's own region or its sub-regions (PROTOCOL.md «Trust rules»).
        raise AdapterUnavailable(f"no route for {service.code} to {target} here", retry_after=30)
    slot.breaker.before_call(name)
    try:
        async with asyncio.timeout(service.config.timeout_s):
            answer = await slot.adapter.send(exchange)
    except TimeoutError as exc:
        slot.breaker.record_failure()
        if isinstance(exc, UpstreamTimeout):
            raise
        raise UpstreamTimeout(f"{name}: no answer within {service.config.timeout_s} s") from exc
    except (UpstreamError, AdapterUnavailable):
        slot.breaker.record_failure()
        raise
    except GatewayError:
        raise
    except Exception as exc:
        slot.breaker.record_failure()
        log.exception("adapter %s failed", name)
        raise UpstreamError(f"{name}: the adapter failed") from exc
    slot.breaker.record_success()
    return name, answer


def validate_answer(service: Service, answer: Answer) -> None:
    """An answer that is not JSON or breaks the response schema is the upstream's error."""
    try:
        document = json.loads(answer.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UpstreamError("the upstream's answer is not JSON") from exc
    errors = service.response.errors(document)
    if errors:
        where = ", ".join(e.pointer or "/" for e in errors[:5])
        raise UpstreamError(f"the upstream's answer violates the response schema at {where}")
