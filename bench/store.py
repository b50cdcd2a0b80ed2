"""Chained writes per second through the store alone, SQLite beside PostgreSQL.

    .venv/bin/python -m bench.store [--seconds 5] [--concurrency 64] [--writers 1]

Each of ``--concurrency`` coroutines per writer inserts messages back to back (an
``insert_message`` is one row and one hash-chain record, the write every request makes),
so group commit batches them as it does under load. ``--writers N`` opens N stores on
the same file or database, as N workers or instances would (all in this one process:
the figure is the store's, not the machine's). PostgreSQL is the suite's own throwaway
server (tests/pg.py); its fsync is off, so the PostgreSQL figure is an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
import uuid
from pathlib import Path

from gateway.audit import verify_store
from gateway.store import NewMessage, Store
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore

BODY = b'{"uscc": "91330000MA27XL0E2K"}'


def _message() -> NewMessage:
    return NewMessage(
        message_id=str(uuid.uuid4()),
        client="330000:one-stop-portal",
        service="credit.query",
        mode="sync",
        state="received",
        request_headers={"Gw-Client": "330000:one-stop-portal"},
        request_body=BODY,
        request_digest=hashlib.sha256(BODY).hexdigest(),
    )


async def _run(stores: list[Store], seconds: float, concurrency: int) -> tuple[int, float]:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(store: Store) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await store.insert_message(_message())
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in stores for _ in range(concurrency)))
    return done, time.perf_counter() - started


async def measure(kind: str, url: str, writers: int, seconds: float, concurrency: int) -> str:
    stores: list[Store] = [
        SQLiteStore(url) if kind == "sqlite" else PostgresStore(url, instance=f"bench-{n}")
        for n in range(writers)
    ]
    for store in stores:
        await store.open()
    try:
        await _run(stores, 0.5, concurrency)  # warm up
        batches = [getattr(s, "batch").batches for s in stores]  # noqa: B009
        count, elapsed = await _run(stores, seconds, concurrency)
        made = sum(getattr(s, "batch").batches for s in stores) - sum(batches)  # noqa: B009
        report = await verify_store(stores[0], {"keys": []})
        assert report.ok, report.first
    finally:
        for store in stores:
            await store.close()
    return (
        f"{kind:<9} writers={writers} concurrency={concurrency}: {count / elapsed:7.0f} chained "
        f"writes/s, {count / max(made, 1):5.1f} writes per batch"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--writers", type=int, default=1)
    args = parser.parse_args()
    from tests.pg import PostgresServer

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.db")
        print(asyncio.run(measure("sqlite", path, args.writers, args.seconds, args.concurrency)))
    server = PostgresServer.start()
    try:
        with server.database() as url:
            line = asyncio.run(
                measure("postgres", url, args.writers, args.seconds, args.concurrency)
            )
            print(line)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
