"""Scale-out: the gateway alone, as 1…N processes, on SQLite and on PostgreSQL, in one run.

    .venv/bin/python -m bench.run --store postgres --instances 3 [--async]

SQLite scales on one machine with ``gateway serve --workers n`` (one port, one file);
PostgreSQL with ``n`` separate ``gateway serve`` instances on one database, each on its
own port (``--listen``), the load spread over them connection by connection, as a load
balancer does. Each row is a fresh deployment (a fresh database) measured with the same
load: the max-throughput pass (Python load generator, closed loop, ``--rounds`` passes,
median) and, with ``--async``, the outbox pass. Every process shares the machine's
cores, the load generator and upstream included: the ratios are what matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.asyncpass import AsyncResult, run_async
from bench.load import PassResult, presign, run_python
from bench.stack import Stack, example, running

__all__ = ["Layout", "Row", "layouts", "measure_layout", "scaleout_report"]

TARGET_TWO_OVER_ONE = 1.3  # issue 12: two instances reach at least 1.3x one


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    store: str  # "sqlite" or "postgres"
    processes: int  # SQLite: workers of one serve; PostgreSQL: instances

    @property
    def label(self) -> str:
        if self.store == "sqlite":
            return f"sqlite    {self.processes} worker{'s' if self.processes > 1 else ''}"
        return f"postgres  {self.processes} instance{'s' if self.processes > 1 else ''}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    layout: Layout
    sync: PassResult  # the median pass
    passes: tuple[PassResult, ...]
    async_result: AsyncResult | None


def layouts(store: str, instances: int) -> list[Layout]:
    """SQLite with 1…N workers always (the embedded baseline); PostgreSQL 1…N instances."""
    rows = [Layout(store="sqlite", processes=n) for n in range(1, instances + 1)]
    if store == "postgres":
        rows += [Layout(store="postgres", processes=n) for n in range(1, instances + 1)]
    return rows


@contextlib.contextmanager
def _deployed(layout: Layout, pg_url: str | None, loop: str) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        if layout.store == "sqlite":
            with running(
                Path(tmp), gateway_workers=layout.processes, loop=loop, contenders=False
            ) as stack:
                yield stack
            return
        assert pg_url is not None
        with running(
            Path(tmp),
            loop=loop,
            instances=layout.processes,
            store_url=pg_url,
            contenders=False,
        ) as stack:
            yield stack


def measure_layout(
    layout: Layout,
    *,
    pg_url: str | None,
    loop: str,
    rounds: int,
    connections: int,
    processes: int,
    warmup_s: int,
    duration_s: int,
    async_messages: int,
    pool_rps: float = 3000.0,
) -> Row:
    """Deploy ``layout``, run its passes, tear it down."""
    with _deployed(layout, pg_url, loop) as stack:
        urls = stack.gateways or (stack.gateway,)
        passes = []
        for _ in range(rounds):
            size = int(pool_rps * (warmup_s + duration_s)) + 100
            document = example("credit.query")
            pool = presign(stack.member, stack.gateway, "credit.query", document, size)
            passes.append(
                run_python(
                    urls,
                    pool,
                    connections=connections,
                    processes=processes,
                    warmup_s=warmup_s,
                    duration_s=duration_s,
                )
            )
        async_result = None
        if async_messages:
            async_result = asyncio.run(
                run_async(stack, messages=async_messages, connections=connections)
            )
    ordered = sorted(passes, key=lambda p: p.rps)
    return Row(
        layout=layout,
        sync=ordered[(len(ordered) - 1) // 2],
        passes=tuple(passes),
        async_result=async_result,
    )


def row_line(row: Row, one: Row | None) -> str:
    """One printed line: req/s (and × the same store's one process), async msg/s."""
    scale = f"  ({row.sync.rps / one.sync.rps:.2f}x one)" if one and one.sync.rps else ""
    text = (
        f"  {row.layout.label:<22} {row.sync.rps:>8.1f} req/s  p99 {row.sync.p99_ms:>7.2f} ms"
        f"  errors {row.sync.errors}{scale}"
    )
    if row.async_result is not None:
        a = row.async_result
        done = "" if a.complete else f"  INCOMPLETE {a.callback_delivered}/{a.messages}"
        text += f"   async {a.msgs_per_s:>7.1f} msg/s{done}"
    return text


def first_of(rows: Sequence[Row], store: str) -> Row | None:
    return next((r for r in rows if r.layout.store == store and r.layout.processes == 1), None)


def scaleout_report(rows: Sequence[Row], settings: dict[str, Any]) -> dict[str, Any]:
    """``scaleout.json``: per layout req/s and msg/s, and each store's 2-over-1 ratio."""

    def entry(r: Row) -> dict[str, Any]:
        a = r.async_result
        return {
            "store": r.layout.store,
            "processes": r.layout.processes,
            "rps": round(r.sync.rps, 1),
            "p50_ms": round(r.sync.p50_ms, 3),
            "p99_ms": round(r.sync.p99_ms, 3),
            "errors": r.sync.errors,
            "passes_rps": [round(p.rps, 1) for p in r.passes],
            "async_msgs_per_s": round(a.msgs_per_s, 1) if a else None,
            "async_complete": a.complete if a else None,
        }

    ratios: dict[str, float | None] = {}
    for store in ("sqlite", "postgres"):
        one = first_of(rows, store)
        two = next((r for r in rows if r.layout.store == store and r.layout.processes == 2), None)
        ratios[store] = (
            round(two.sync.rps / one.sync.rps, 3) if one and two and one.sync.rps else None
        )
    return {
        "layouts": [entry(r) for r in rows],
        "two_over_one": ratios,
        "target_two_over_one": TARGET_TWO_OVER_ONE,
        "settings": settings,
    }
