"""The cost of operational monitoring: gateway CPU per exchange, records on and off.

```
.venv/bin/python -m bench.monitoring            # about 60 s: 3 rounds of on and off
```

Starts the upstream and one ``gateway serve`` (bench/stack.py) with
``monitoring.enabled`` true, then false, and drives each with the same closed-loop
Python load (bench/load.py) for ``--duration`` s per pass, alternating, ``--rounds``
times. The figure is the gateway process tree's CPU time (user + system, from
/proc/PID/stat) over the pass divided by the exchanges answered: what monitoring adds
per exchange, wherever it runs (the record is built on the request path, written by a
background task in the same process). Throughput and p50/p99 latency are printed too.
On a shared machine that A/B figure is noisy, so an in-process part first measures the
two costs directly on a real SQLite store: CPU µs to collect a record on the request path
and to write it in a batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.load import presign, run_python
from bench.rss import _children
from bench.stack import example, running

__all__ = ["main"]

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children (workers), from /proc."""
    pids = [pid]
    for p in pids:
        pids += [c for c in _children(p) if c not in pids]
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (after "pid (comm)")
    return total / TICK


def _pass(monitoring: bool, args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        running(Path(tmp), contenders=False, monitoring=monitoring) as stack,
    ):
        count = int(args.duration * 3000) + 2000
        pool = presign(stack.member, stack.gateway, "credit.query", example("credit.query"), count)
        warm = run_python(
            stack.gateway, pool[:1000], connections=args.connections, processes=1,
            warmup_s=0, duration_s=1,
        )  # fmt: skip
        before = cpu_seconds(stack.gateway_pid)
        result = run_python(
            stack.gateway, pool[1000:], connections=args.connections, processes=1,
            warmup_s=0, duration_s=args.duration,
        )  # fmt: skip
        used = cpu_seconds(stack.gateway_pid) - before
    del warm
    return {
        "monitoring": monitoring,
        "exchanges": result.requests,
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 2),
        "p99_ms": round(result.p99_ms, 2),
        "cpu_s": round(used, 3),
        "cpu_us_per_exchange": round(used / max(result.requests, 1) * 1e6, 1),
        "errors": result.errors,
    }


async def _micro(records: int) -> dict[str, float]:
    """In-process, on a real SQLite store: CPU µs to collect one record on the request
    path (``Monitor.exchange``), and to write one (``flush``, batches of 500)."""
    import time

    from prometheus_client import CollectorRegistry

    from gateway.config.model import MonitoringConfig, StoreConfig
    from gateway.exchange.monitoring import Monitor
    from gateway.store import create_store

    with tempfile.TemporaryDirectory() as tmp:
        store = create_store(StoreConfig(path=Path(tmp) / "m.db"))
        await store.open()
        monitor = Monitor(
            config=MonitoringConfig(queue_limit=records + 1),
            store=store,
            instance="bench",
            registry=CollectorRegistry(),
        )
        headers = {"Gw-Target": "100000:national-platform"}
        steps = {"verified": 0.4, "validated": 0.5, "upstream": 0.6, "answered": 3.0}
        started = time.process_time()
        for _ in range(records):
            monitor.exchange(
                kind="exchange", received_at=time.time(), client="330000:one-stop-portal",
                message_id="5f0c6c1e-0b7e-4a53-9d1c-1f3a2b4c5d6e", service="credit.query",
                headers=headers, verified=True, steps=steps, duration_ms=3.2,
                request_size=180, response_size=420, status=200, code=None, seq=1,
                adapter="upstream", trace_id="0af7651916cd43dd8448eb211c80319c",
            )  # fmt: skip
        collect = time.process_time() - started
        started = time.process_time()
        await monitor.flush()
        write = time.process_time() - started
        await store.close()
    return {
        "collect_us_per_record": round(collect / records * 1e6, 2),
        "write_us_per_record_sqlite": round(write / records * 1e6, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.monitoring", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per pass")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--records", type=int, default=50_000, help="for the in-process part")
    p.add_argument("--out", type=Path, default=Path("bench/results/monitoring.json"))
    args = p.parse_args(argv)
    micro = asyncio.run(_micro(args.records))
    print(json.dumps(micro), flush=True)
    passes = []
    for i in range(args.rounds):
        for monitoring in (True, False) if i % 2 == 0 else (False, True):
            row = _pass(monitoring, args)
            passes.append(row)
            print(json.dumps(row), flush=True)

    def median(on: bool, key: str) -> float:
        return float(statistics.median(r[key] for r in passes if r["monitoring"] is on))

    summary: dict[str, Any] = {
        key: {"on": median(True, key), "off": median(False, key)}
        for key in ("cpu_us_per_exchange", "rps", "p50_ms", "p99_ms")
    }
    on, off = median(True, "cpu_us_per_exchange"), median(False, "cpu_us_per_exchange")
    summary["added_cpu_us_per_exchange"] = round(on - off, 1)
    summary["added_cpu_percent"] = round((on / off - 1) * 100, 1)
    doc = {"in_process": micro, "passes": passes, "summary": summary, "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 1 if any(r["errors"] for r in passes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
