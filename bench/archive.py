"""The message log's life at scale: store N exchanges, archive them, verify the rest.

    .venv/bin/python -m bench.archive [--exchanges 1000000] [--batch 500] [--dir DIR]

Each exchange is what a synchronous request leaves in the store: ``insert_message`` then
``finish_message`` (two chained records), inserted through the store API ``--batch`` at a
time (group commit batches them as it does under load), not over HTTP. It reports:

- the CPU per exchange (``time.process_time``, this process) for a sample of
  ``--sample`` exchanges on a store of 10,000 exchanges and again on the full store: the
  hot path must not slow as the log grows;
- the store's size (database file + WAL) before and after archiving;
- chain records per second archived (``gateway log archive``'s code path, with fsync and
  the read-back check of every file);
- the time ``audit verify --archives`` takes over the archives and the live store.

SQLite only (the file is what grows); ``--exchanges 100000`` is the shared machine's run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from gateway.audit import make_checkpoint
from gateway.audit.archive import verify_archives, write_archives
from gateway.crypto.keys import KeyPair, algorithm_for, generate, private_to_jwk
from gateway.store import NewMessage, Store
from gateway.store.sqlite import SQLiteStore

BODY = b'{"uscc": "91330000MA27XL0E2K", "name": "bench"}'
ANSWER = b'{"rating": "A", "since": "2019-01-01"}'
GATEWAY = "330000:gateway"
CLIENT = "330000:one-stop-portal"


def _message() -> NewMessage:
    return NewMessage(
        message_id=str(uuid.uuid4()),
        client=CLIENT,
        service="credit.query",
        mode="sync",
        state="delivering",
        request_headers={"Gw-Client": CLIENT, "Signature": "sig1=:AAAA:"},
        request_body=BODY,
        request_digest=hashlib.sha256(BODY).hexdigest(),
    )


async def _exchange(store: Store) -> None:
    record = await store.insert_message(_message())
    await store.finish_message(
        record.seq,
        state="answered",
        status=200,
        code=None,
        adapter="national",
        response_headers={"Content-Type": "application/json"},
        response_body=ANSWER,
    )


async def _fill(store: Store, count: int, batch: int) -> None:
    for start in range(0, count, batch):
        await asyncio.gather(*(_exchange(store) for _ in range(min(batch, count - start))))


async def _cpu_per_exchange(store: Store, sample: int, batch: int) -> float:
    started = time.process_time()
    await _fill(store, sample, batch)
    return (time.process_time() - started) / sample * 1e6


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _keypair() -> KeyPair:
    key = generate("ed25519")
    jwk = private_to_jwk(key)  # the public JWK with its kid (as keys._pair builds it)
    return KeyPair(kid=jwk["kid"], algorithm=algorithm_for(key), private=key, jwk=jwk)


async def run(exchanges: int, batch: int, sample: int, directory: Path) -> list[str]:
    db = directory / "gateway.db"
    store = SQLiteStore(db)
    await store.open()
    keypair = _keypair()
    jwks = {"keys": [dict(keypair.jwk)]}
    out = []
    try:
        small = min(10_000, exchanges)
        await _fill(store, small - sample, batch)
        cpu_small = await _cpu_per_exchange(store, sample, batch)
        started = time.perf_counter()
        await _fill(store, exchanges - small - sample, batch)
        filled = time.perf_counter() - started
        cpu_large = await _cpu_per_exchange(store, sample, batch)
        await store.checkpoint()
        before = _size(db)
        out.append(f"exchanges stored: {exchanges:,} (filled at {exchanges / filled:,.0f}/s)")
        out.append(
            f"CPU per exchange: {cpu_small:.0f} µs at {small:,} exchanges, "
            f"{cpu_large:.0f} µs at {exchanges:,} ({sample:,} each)"
        )
        await make_checkpoint(store, keypair, GATEWAY)
        started = time.perf_counter()
        done = await write_archives(
            store,
            keypair,
            jwks,
            gateway=GATEWAY,
            to=directory / "archives",
            cutoff=time.time() + 1,
            now=time.time(),
        )
        took = time.perf_counter() - started
        assert done.cut, done.reason
        out.append(
            f"archived: {done.records:,} chain records, {done.rows:,} rows, "
            f"{len(done.files)} file(s), {done.bytes / 1e6:,.1f} MB in {took:.1f} s "
            f"({done.records / took:,.0f} records/s)"
        )
        await store.checkpoint()
        vacuum = await asyncio.to_thread(_vacuum, db)
        after = _size(db)
        out.append(
            f"store size: {before / 1e6:,.1f} MB before, {after / 1e6:,.1f} MB after "
            f"(VACUUM {vacuum:.1f} s)"
        )
        started = time.perf_counter()
        report = await verify_archives(store, directory / "archives", jwks, gateway=GATEWAY)
        out.append(
            f"verify store + archives: {report.records:,} records in "
            f"{time.perf_counter() - started:.1f} s, ok={report.ok}"
        )
    finally:
        await store.close()
    return out


def _vacuum(db: Path) -> float:
    import sqlite3

    started = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exchanges", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--sample", type=int, default=2_000)
    parser.add_argument("--dir", type=Path, help="where the store goes (default: a temp dir)")
    args = parser.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-archive-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        for line in asyncio.run(run(args.exchanges, args.batch, args.sample, directory)):
            print(line)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
