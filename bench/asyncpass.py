"""Async mode: messages/s from ``202 Accepted`` to the callback delivered to the member.

The member sends N pre-signed ``crossregion.apply`` requests; the gateway answers 202
and delivers each through its outbox to the upstream, which acknowledges with 202 and
calls back at once, signed as the national platform; the gateway records the callback
and delivers it, signed, to the member's ``callback_url`` (the upstream's receiver).
The clock stops when every accepted message is ``callback_delivered`` in the store.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from bench.load import presign
from bench.stack import Stack, example
from gateway.config.model import StoreConfig
from gateway.store import create_store

__all__ = ["AsyncResult", "run_async"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncResult:
    messages: int  # sent
    accepted: int  # answered 202
    accept_s: float  # until the last 202
    callbacks: int  # distinct callbacks the member received
    callback_delivered: int  # messages in that state in the store
    seconds: float  # from the first request to the last callback_delivered

    @property
    def msgs_per_s(self) -> float:
        return self.callback_delivered / self.seconds if self.seconds else 0.0

    @property
    def complete(self) -> bool:
        return self.accepted == self.messages == self.callback_delivered


async def _callbacks(session: aiohttp.ClientSession, upstream: str) -> int:
    async with session.get(f"{upstream}/stats") as resp:
        count: int = (await resp.json())["callbacks"]
        return count


async def run_async(stack: Stack, *, messages: int, connections: int) -> AsyncResult:
    """Send ``messages`` requests, then wait (bounded) until all are ``callback_delivered``."""
    service = "crossregion.apply"
    # Signed for the public URL (the first instance), sent round-robin to every instance.
    pool = presign(stack.member, stack.gateway, service, example(service), messages)
    gateways = stack.gateways or (stack.gateway,)
    # Counted in the store the gateways share (a SQLite file, or the PostgreSQL database).
    store = create_store(StoreConfig(path=stack.store, url=stack.store_url))
    await store.open()
    connector = aiohttp.TCPConnector(limit=connections)
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        ) as session:

            async def send(url: str, path: str, headers: dict[str, str], body: bytes) -> int:
                async with session.post(url + path, data=body, headers=headers) as r:
                    await r.read()
                    return r.status

            start = time.perf_counter()
            statuses = await asyncio.gather(
                *(
                    send(gateways[k % len(gateways)], r.path, r.headers, r.body)
                    for k, r in enumerate(pool)
                )
            )
            accept_s = time.perf_counter() - start
            accepted = statuses.count(202)
            deadline = start + 60 + messages / 100
            callbacks = done = 0
            while done < accepted and time.perf_counter() < deadline:
                await asyncio.sleep(0.02)
                callbacks = await _callbacks(session, stack.upstream)
                # The store is read only once the receiver has them all (a count scans).
                if callbacks >= accepted:
                    done = await store.count_messages("callback_delivered")
            seconds = time.perf_counter() - start
    finally:
        await store.close()
    return AsyncResult(
        messages=messages,
        accepted=accepted,
        accept_s=accept_s,
        callbacks=callbacks,
        callback_delivered=done,
        seconds=seconds,
    )
