"""``gateway serve --workers N``: one supervisor, N worker processes on one port.

The supervisor prepares the store once (migrations, and voiding the leases a previous
run left behind), then forks the workers. Each worker is a complete gateway (its own
event loop, SQLite connection, HTTP pool and delivery loop) listening on the same
address with ``SO_REUSEPORT``; the kernel spreads connections across them. They share
one SQLite file in WAL mode: SQLite serialises their writes, outbox claims are single
``UPDATE … RETURNING`` statements with leases, so no message is delivered by two workers
at once. Only worker 0 serves the admin listener.

SIGTERM or SIGINT to the supervisor is passed on to every worker, which drains as a
single process does. A worker that dies unexpectedly is started again.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType

from gateway.config.model import Config
from gateway.store import INSTANCE_ENV, create_store

__all__ = ["prepare_store", "supervise"]

RESTART_DELAY_S = 1.0


async def _release(config: Config, owner: str | None) -> int:
    store = create_store(config.store)
    await store.open()
    try:
        return await store.release_leases(owner)
    finally:
        await store.close()


def prepare_store(config: Config) -> int:
    """Migrate the store and void stale leases, before any worker starts."""
    return asyncio.run(_release(config, None))


def _forget_metrics(pid: int | None) -> None:
    """A dead worker's live gauges must not linger in the merged multiprocess metrics."""
    if pid is None or "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped upstream


def supervise(config: Config, workers: int, run_worker: Callable[[int], None]) -> int:
    """Run ``run_worker(i)`` in ``workers`` processes until asked to stop; exit status."""
    prepare_store(config)
    ctx = multiprocessing.get_context("fork")
    stopping = False
    procs: dict[int, BaseProcess] = {}
    owners: dict[int, str] = {}  # worker → the instance id its leases carry
    base = uuid.uuid4().hex[:12]

    def start(i: int) -> None:
        owners[i] = f"{base}-{i}-{uuid.uuid4().hex[:6]}"
        os.environ[INSTANCE_ENV] = owners[i]  # the forked worker's store reads it
        try:
            proc = ctx.Process(target=run_worker, args=(i,), name=f"gateway-worker-{i}")
            proc.start()
        finally:
            del os.environ[INSTANCE_ENV]
        procs[i] = proc

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(workers):
        start(i)
    print(f"supervisor {os.getpid()}: {workers} workers", flush=True)
    failed = False
    while procs:
        for i, proc in list(procs.items()):
            proc.join(timeout=0.2)
            if proc.is_alive():
                continue
            del procs[i]
            _forget_metrics(proc.pid)
            if not stopping and proc.pid is not None:
                # What it was delivering is due again at once, not when its lease ends.
                asyncio.run(_release(config, owners[i]))
            if stopping:
                # The exit status tells whether the shutdown itself was clean.
                failed = failed or proc.exitcode not in (0, None)
                continue
            print(f"worker {i} exited with {proc.exitcode}; starting it again", file=sys.stderr)
            time.sleep(RESTART_DELAY_S)
            start(i)
    return 0 if not failed else 1
