"""Durable delivery: the outbox of asynchronous exchanges and of callbacks to members.

A message answered ``202`` is already committed. Workers claim due rows with a lease,
send them, and either move them on or reschedule them with exponential backoff and full
jitter; past the attempt or age limit they become dead letters. A lease lasts ``LEASE_S``
and is renewed while its delivery runs, so a crashed process's work is taken over once
its leases expire (at once, on SQLite, where ``release_leases`` voids them at start-up):
delivery is at least once and receivers dedupe on ``Gw-Message-Id``. Updates from a
process whose lease was taken over change nothing (the store fences them by owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import random
import ssl
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict

from gateway.backoff import backoff_delay
from gateway.config.model import DeliveryConfig, GatewayIdentity
from gateway.config.outbound import client_context, location_of
from gateway.errors import AdapterUnavailable, GatewayError, OutboundRefused, UpstreamError
from gateway.exchange.dispatch import call_adapter, exchange_of, receiver_for
from gateway.observe.metrics import Metrics
from gateway.observe.traceparent import child_traceparent, ensure_traceparent
from gateway.observe.tracing import NO_TRACING, Span, Tracing
from gateway.signing import Signer
from gateway.states import CallbackState, MessageState
from gateway.store import CallbackRecord, MessageRecord, NewCallback, Store

if TYPE_CHECKING:
    from gateway.exchange.monitoring import Monitor
    from gateway.runtime.registry import RuntimeHolder

__all__ = ["Delivery", "DeliveryState"]

log = logging.getLogger("gateway.exchange.delivery")
LEASE_S = 30.0  # renewed every RENEW_S while a delivery runs; expired, another takes over
RENEW_S = 10.0


class DeliveryState(enum.Enum):
    CREATED = "created"  # constructed, not yet started
    RUNNING = "running"  # claiming and delivering
    DRAINING = "draining"  # stopped claiming; in-flight work finishing
    STOPPED = "stopped"  # no task left


class Delivery:
    def __init__(
        self,
        *,
        config: DeliveryConfig,
        identity: GatewayIdentity,
        store: Store,
        runtime: RuntimeHolder,
        signer: Signer,
        session: aiohttp.ClientSession,
        learnt_session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.runtime = runtime
        self.signer = signer
        self.session = session
        # HTTPS callbacks present the gateway's client certificate when one is configured.
        tls = identity.client_tls
        self._client_tls: ssl.SSLContext | bool = (
            client_context(tls.cert, tls.key, tls.ca) if tls is not None else True
        )
        # Callback URLs learnt from the directory go through the guarded session.
        self.learnt_session = learnt_session
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self.metrics = metrics if metrics is not None else Metrics()
        self.tracing = tracing
        self._event = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._depth = 0
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._leased: dict[str, set[int]] = {"message": set(), "callback": set()}
        self.state = DeliveryState.CREATED
        self.delivered = 0
        self.monitor: Monitor | None = None  # operational records of each attempt

    # Control -------------------------------------------------------------------------

    def wake(self) -> None:
        self._depth += 1
        self._event.set()

    def accepting(self) -> bool:
        return self.state is DeliveryState.RUNNING and self._depth < self.config.outbox_limit

    async def start(self, *, release_leases: bool = True) -> None:
        """Start claiming. A lone process voids the leases an earlier run left; with
        several workers the supervisor does that once, before any worker starts."""
        if release_leases:
            released = await self.store.release_leases()
            if released:
                log.info("voided %d leases left by an earlier run", released)
        self._depth = await self.store.outbox_depth()
        # Other instances' new work wakes this loop (PostgreSQL NOTIFY); polling stays.
        await self.store.watch_outbox(self._event.set)
        self.state = DeliveryState.RUNNING
        self._loop_task = asyncio.create_task(self._run(), name="delivery")
        self._renew_task = asyncio.create_task(self._renew(), name="delivery-leases")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming, let in-flight deliveries finish up to the grace, leave the rest."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.state = DeliveryState.DRAINING
        self._event.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._renew_task is not None:
            self._renew_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renew_task
        self.state = DeliveryState.STOPPED

    # Loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while self.state is DeliveryState.RUNNING:
            self._event.clear()
            try:
                claimed = await self._claim()
                self._depth = await self.store.outbox_depth()
            except Exception:  # the loop must outlive any one failure
                log.exception("the outbox could not be read; retrying")
                claimed = 0
            if claimed and len(self._tasks) < self.config.workers:
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), self.config.poll_interval_s)

    async def _renew(self) -> None:
        """Keep the leases of what is being delivered from expiring under it."""
        while True:
            await asyncio.sleep(RENEW_S)
            messages, callbacks = self._leased["message"], self._leased["callback"]
            if not messages and not callbacks:
                continue
            try:
                await self.store.renew_leases(
                    sorted(messages), sorted(callbacks), self._clock() + LEASE_S
                )
            except GatewayError:
                log.warning("could not renew delivery leases; will retry", exc_info=True)

    async def _claim(self) -> int:
        free = self.config.workers - len(self._tasks)
        if free <= 0:
            return 0
        now = self._clock()
        messages = await self.store.claim_due_messages(now, free, LEASE_S)
        for record in messages:
            self._spawn(self._deliver_message(record), ("message", record.seq))
        free -= len(messages)
        callbacks = await self.store.claim_due_callbacks(now, free, LEASE_S) if free > 0 else []
        for cb in callbacks:
            self._spawn(self._deliver_callback(cb), ("callback", cb.seq))
        return len(messages) + len(callbacks)

    def _spawn(self, work: Coroutine[Any, Any, None], lease: tuple[str, int]) -> None:
        kind, seq = lease
        self._leased[kind].add(seq)

        async def guarded() -> None:
            try:
                await work
            except Exception:  # a failed attempt stays leased and is retried after restart
                log.exception("a delivery attempt failed unexpectedly")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._leased[kind].discard(seq)
            self._event.set()  # a worker slot is free

        task.add_done_callback(done)

    def _limit(self, adapter: str, size: int) -> asyncio.Semaphore:
        if adapter not in self._limits:
            self._limits[adapter] = asyncio.Semaphore(size)
        return self._limits[adapter]

    def _give_up(self, attempts: int, created_at: float, max_attempts: int, max_age: float) -> bool:
        return attempts >= max_attempts or self._clock() - created_at >= max_age

    # Messages to adapters ------------------------------------------------------------

    async def _deliver_message(self, record: MessageRecord) -> None:
        runtime = self.runtime.current
        service = runtime.services.get(record.service)
        started = time.perf_counter()
        attempts = record.attempts + 1
        if service is None:
            error = f"service {record.service} no longer exists"
            await self.store.set_message_state(record.seq, MessageState.DEAD, error=error)
            self._account("message", "dead", record, None, attempts, started, None, error=error)
            return
        max_attempts = service.config.max_attempts or self.config.max_attempts
        max_age = service.config.max_age_s or self.config.max_age_s
        traceparent = ensure_traceparent(
            f"00-{record.trace_id}-{uuid.uuid4().hex[:16]}-01" if record.trace_id else None
        )
        span = self._span(f"deliver {record.service}", traceparent)
        if span is not None:
            traceparent = span.traceparent
        exchange = exchange_of(record, service, traceparent)
        name = runtime.routes.lookup(record.service, record.target) or ""
        slot = runtime.adapters.get(name)
        called = started
        try:
            async with self._limit(name, slot.config.concurrency if slot else 1):
                called = time.perf_counter()  # the wait for a slot is not the upstream's
                adapter, answer = await call_adapter(runtime, service, exchange)
        except AdapterUnavailable as exc:
            # The breaker is open or the adapter is off: wait in the outbox, spend no attempt.
            self.metrics.observe_upstream(name or "none", 0.0, exc.code)
            delay = float(exc.retry_after or self.config.base_delay_s)
            await self.store.reschedule_message(
                record.seq,
                attempts=record.attempts,
                next_attempt_at=self._clock() + delay,
                error=exc.detail,
            )
            spent = record.attempts  # none spent: the count stays where it was
            self._account(
                "message", "deferred", record, name, spent, started, span, exc.code, exc.detail
            )
            return
        except GatewayError as exc:
            self.metrics.observe_upstream(name, time.perf_counter() - called, exc.code)
            outcome = await self._retry_message(record, attempts, max_attempts, max_age, exc.detail)
            self._account(
                "message", outcome, record, name, attempts, started, span, exc.code, exc.detail
            )
            return
        self.metrics.observe_upstream(adapter, time.perf_counter() - called, None)
        # Who it went to: the one party whose callback is taken for this message.
        receiver = receiver_for(runtime, adapter)
        if answer.status == 202:
            # Acknowledged: the decision comes later by callback.
            moved = await self.store.set_message_state(
                record.seq,
                MessageState.DELIVERED,
                adapter=adapter,
                attempts=attempts,
                error=None,
                receiver=receiver,
            )
            self._unmoved(moved, record, MessageState.DELIVERED)
            self._account("message", "delivered", record, adapter, attempts, started, span)
            return
        # A final answer right away: it is the result, delivered to the member as a callback.
        moved = await self.store.answer_message(
            record.seq,
            NewCallback(
                message_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"answer:{record.message_id}")),
                client=self.identity.member_id,
                correlation_id=record.message_id,
                original_seq=record.seq,
                service=record.service,
                headers={"Content-Type": answer.content_type},
                body=answer.body,
                digest=hashlib.sha256(answer.body).hexdigest(),
            ),
            attempts=attempts,
            adapter=adapter,
            receiver=receiver,
        )
        self._unmoved(moved, record, MessageState.ANSWERED)
        self._account("message", "delivered", record, adapter, attempts, started, span)
        self._event.set()

    @staticmethod
    def _unmoved(moved: bool, record: MessageRecord, state: MessageState) -> None:
        """A guarded transition that found the message moved on (its lease taken over or
        voided, or another transition first): nothing was written; say so."""
        if not moved:
            log.warning(
                "message %s was not moved to %s: it is no longer this process's to move",
                record.message_id,
                state.value,
            )

    async def _retry_message(
        self, record: MessageRecord, attempts: int, max_attempts: int, max_age: float, error: str
    ) -> str:
        """Reschedule with backoff, or dead-letter past the limits; the outcome."""
        if self._give_up(attempts, record.created_at, max_attempts, max_age):
            await self.store.set_message_state(
                record.seq, MessageState.DEAD, error=error, attempts=attempts
            )
            return "dead"
        delay = backoff_delay(
            attempts, self.config.base_delay_s, self.config.max_delay_s, self._rng
        )
        await self.store.reschedule_message(
            record.seq, attempts=attempts, next_attempt_at=self._clock() + delay, error=error
        )
        return "retry"

    # Callbacks to members ------------------------------------------------------------

    async def _deliver_callback(self, cb: CallbackRecord) -> None:
        runtime = self.runtime.current
        attempts = cb.attempts + 1
        service = runtime.services.get(cb.service)
        max_attempts = (
            service.config.max_attempts if service else None
        ) or self.config.max_attempts
        max_age = (service.config.max_age_s if service else None) or self.config.max_age_s
        # A message a peer relayed for one of its members is answered to that peer.
        member = runtime.members.get(cb.original_via or cb.original_client)
        url = member.config.callback_url if member else None
        if url:
            url = url.replace("{service}", cb.service)
        started = time.perf_counter()
        if not url:
            error = "the member has no callback_url"
            await self.store.finish_callback(
                cb.seq, state=CallbackState.DEAD, attempts=attempts, error=error
            )
            self._account("callback", "dead", cb, None, attempts, started, None, error=error)
            return
        # Same trace as the original message, a fresh span id for this hop (W3C).
        traceparent = child_traceparent(f"00-{cb.trace_id}-{'0' * 15}1-01") if cb.trace_id else None
        span = self._span(f"callback {cb.service}", traceparent) if traceparent else None
        if span is not None:
            traceparent = span.traceparent
        try:
            await self._post_callback(
                url, cb, traceparent, learnt=member is not None and member.config.learnt
            )
        except GatewayError as exc:
            if self._give_up(attempts, cb.created_at, max_attempts, max_age):
                await self.store.finish_callback(
                    cb.seq, state=CallbackState.DEAD, attempts=attempts, error=exc.detail
                )
                self._account(
                    "callback", "dead", cb, None, attempts, started, span, exc.code, exc.detail
                )
                return
            delay = backoff_delay(
                attempts, self.config.base_delay_s, self.config.max_delay_s, self._rng
            )
            await self.store.reschedule_callback(
                cb.seq, attempts=attempts, next_attempt_at=self._clock() + delay, error=exc.detail
            )
            self._account(
                "callback", "retry", cb, None, attempts, started, span, exc.code, exc.detail
            )
            return
        await self.store.finish_callback(
            cb.seq, state=CallbackState.DELIVERED, attempts=attempts, error=None
        )
        self.delivered += 1
        self._account("callback", "delivered", cb, None, attempts, started, span)

    async def _post_callback(
        self, url: str, cb: CallbackRecord, traceparent: str | None, *, learnt: bool = False
    ) -> None:
        """POST one callback; anything but a 2xx (a redirect included: never followed, it
        would re-post the signed body where nobody configured) is a failed attempt."""
        session = self.session
        if learnt:
            if self.learnt_session is None:
                raise OutboundRefused(f"callback to {url}: a learnt URL needs the guarded session")
            session = self.learnt_session
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Content-Type"] = "application/json"
        headers["Gw-Client"] = self.identity.member_id
        headers["Gw-Message-Id"] = cb.message_id
        headers["Gw-Correlation-Id"] = cb.correlation_id
        if traceparent:
            headers["traceparent"] = traceparent
        self.signer.sign_request("POST", url, headers, cb.body)
        try:
            async with session.post(
                url,
                data=cb.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=30),
                allow_redirects=False,
                ssl=self._client_tls,
            ) as resp:
                await resp.read()
                status = resp.status
                location = location_of(resp.headers)
        except TimeoutError as exc:
            raise UpstreamError(f"callback to {url} timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"callback to {url} failed: {type(exc).__name__}") from exc
        if 300 <= status < 400:
            raise UpstreamError(
                f"callback to {url} answered {status} (redirect to {location}, not followed)"
            )
        if not 200 <= status < 300:
            raise UpstreamError(f"callback to {url} answered {status}")

    # Accounting ----------------------------------------------------------------------

    def _span(self, name: str, traceparent: str) -> Span | None:
        return self.tracing.start(name, traceparent, server=False) if self.tracing.enabled else None

    def _account(
        self,
        kind: str,
        outcome: str,
        item: MessageRecord | CallbackRecord,
        adapter: str | None,
        attempt: int,
        started: float,
        span: Span | None,
        code: str | None = None,
        error: str | None = None,
    ) -> None:
        """One outbox attempt: its JSON log line, its count and its span.

        For a callback, ``message_id`` is the original message's id (what the member
        knows) and ``callback_id`` the callback's own ``Gw-Message-Id``."""
        self.metrics.observe_delivery(kind, outcome)
        if isinstance(item, MessageRecord):
            message_id, callback_id, client = item.message_id, None, item.client
        else:
            message_id, callback_id = item.correlation_id, item.message_id
            client = item.original_client
        fields = {
            "event": "delivery",
            "kind": kind,
            "message_id": message_id,
            "callback_id": callback_id,
            "trace_id": item.trace_id,
            "client": client,
            "service": item.service,
            "adapter": adapter or None,
            "outcome": outcome,
            "attempt": attempt,
            "code": code,
            "error": error,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        level = logging.INFO if outcome == "delivered" else logging.WARNING
        log.log(level, "delivery", extra=fields)
        if self.monitor is not None:
            self.monitor.attempt(
                kind="delivery" if kind == "message" else "callback_delivery",
                outcome=outcome,
                message_id=callback_id or message_id,
                seq=item.seq if isinstance(item, MessageRecord) else item.original_seq,
                correlation_id=message_id if callback_id else None,
                client=client,
                service=item.service,
                target=item.target if isinstance(item, MessageRecord) else None,
                adapter=adapter or None,
                attempt=attempt,
                code=code,
                elapsed_ms=(time.perf_counter() - started) * 1000,
                trace_id=item.trace_id,
            )
        if span is not None:
            span.end(
                {f"gw.{k}": v for k, v in fields.items() if k not in ("event", "latency_ms")},
                error=error if outcome in ("retry", "dead") else None,
            )
