"""A lean exchange (issue 23): CPU per request, statements and commits per exchange, side by side.

    .venv/bin/python -m bench.lean                 # the table in README and docs/decisions.md
    .venv/bin/python -m bench.lean --profile DIR   # also py-spy samples of each gateway

One run starts, on loopback, the bench's usual processes (bench/stack.py): an upstream,
the bare proxy, the floor, and two real ``gateway serve``, one on SQLite and one on the
suite's own PostgreSQL (tests/pg.py, with ``pg_stat_statements`` loaded). Each round
drives every contender with wrk (one thread, ``--connections``, pre-signed unique
requests) one after another, and reads from /proc the CPU seconds each one's processes
spent in the measured window (the PostgreSQL server's apart), divided by the answers:

- **CPU per request** of bare, floor, the gateway on SQLite, the same with a signature
  nonce on every request (the trust checks' cost: one nonce claim each), and the
  gateway on PostgreSQL (its own process, then the server's share);
- **statements and commits per exchange**: on PostgreSQL from ``pg_stat_statements`` and
  ``pg_stat_database`` (commits), on SQLite from the gateway's group-commit histograms
  (``/metrics``: batches, writes);
- **p99 added** over bare at half the gateway's saturating rate (Python loader, open loop);
- **async**: ``--async-messages`` ``crossregion.apply`` from 202 to callback delivered, on
  each store, with every message counted (bench/asyncpass.py), and the statements and
  commits per message (202, delivery, callback in, callback delivered).

Ratios are per round (the same round's floor or SQLite), then the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.asyncpass import run_async
from bench.load import SignedRequest, _write_pool, _wrk, presign, run_python
from bench.stack import Stack, example, running

__all__ = ["main"]

OUT = Path(__file__).with_name("results") / "lean.json"
PROC = Path("/proc")
TICK = os.sysconf("SC_CLK_TCK")
SERVICE = "credit.query"


# CPU from /proc -------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for p in pids:  # grows as children are found
        for task in (PROC / str(p) / "task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(c) for c in task.read_text().split() if int(c) not in pids]
    return pids


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of ``pid`` and every live descendant (and reaped children's)."""
    if pid is None:
        return 0.0
    total = 0
    for p in _tree(pid):
        try:
            fields = (PROC / str(p) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICK


# PostgreSQL's own counts ----------------------------------------------------------------


async def _pg(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class PgCounts:
    statements: dict[str, int]
    commits: int

    def minus(self, earlier: PgCounts) -> PgCounts:
        keys = set(self.statements) | set(earlier.statements)
        diff = {k: self.statements.get(k, 0) - earlier.statements.get(k, 0) for k in keys}
        return PgCounts({k: v for k, v in diff.items() if v}, self.commits - earlier.commits)


def pg_counts(admin_url: str, database: str) -> PgCounts:
    """Statement calls by text, and commits, of ``database`` so far (stats flushed first)."""
    time.sleep(1.2)  # backends flush their statistics at most once a second
    rows = asyncio.run(
        _pg(
            admin_url,
            "SELECT s.query, s.calls FROM pg_stat_statements s JOIN pg_database d ON "
            "d.oid = s.dbid WHERE d.datname = $1",
            database,
        )
    )
    commits = asyncio.run(
        _pg(admin_url, "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database)
    )
    statements: dict[str, int] = {}
    for r in rows:
        text = " ".join(str(r["query"]).split())[:110]
        statements[text] = statements.get(text, 0) + int(r["calls"])
    return PgCounts(statements, int(commits[0]["xact_commit"]) if commits else 0)


def sqlite_counts(gateway: str) -> tuple[float, float]:
    """(batches committed, writes in them) from the gateway's /metrics."""
    with urllib.request.urlopen(f"{gateway}/metrics", timeout=10) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    found = {}
    for name in ("count", "sum"):
        m = re.search(rf"^gateway_store_batch_units_{name}\S* (\S+)$", text, re.M)
        found[name] = float(m.group(1)) if m else 0.0
    return found["count"], found["sum"]


# One pass -------------------------------------------------------------------------------


@dataclass(slots=True)
class Pass:
    name: str
    requests: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0  # the contender's own processes
    server_cpu_s: float = 0.0  # PostgreSQL's (0 for the others)
    upstream_cpu_s: float = 0.0
    errors: int = 0
    p99_ms: float = 0.0
    per_exchange: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def ms_per_request(self, server: bool = True) -> float:
        cpu = self.cpu_s + (self.server_cpu_s if server else 0.0)
        return 1000 * cpu / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Contender:
    name: str
    url: str
    pid: int
    upstream_pid: int
    stack: Stack
    nonce: bool = False
    pg: tuple[str, str, int | None] | None = None  # admin url, database, server pid


def drive(
    c: Contender, pool: Sequence[SignedRequest], connections: int, warmup_s: int, duration_s: int
) -> Pass:
    host = c.url.removeprefix("http://")
    cut = len(pool) * warmup_s // (warmup_s + duration_s)
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp:
        warm, main = Path(tmp) / "warm.pool", Path(tmp) / "main.pool"
        _write_pool(warm, pool[:cut], host)
        _write_pool(main, pool[cut:], host)
        _wrk(c.url, warm, 1, connections, warmup_s)
        before_pg = pg_counts(c.pg[0], c.pg[1]) if c.pg else None
        before_sq = sqlite_counts(c.url) if c.pg is None and c.name.startswith("gw") else None
        server_pid = c.pg[2] if c.pg else None
        cpu0, srv0, up0 = cpu_seconds(c.pid), cpu_seconds(server_pid), cpu_seconds(c.upstream_pid)
        report = _wrk(c.url, main, 1, connections, duration_s)
        cpu1, srv1, up1 = cpu_seconds(c.pid), cpu_seconds(server_pid), cpu_seconds(c.upstream_pid)
    done = Pass(
        name=c.name,
        requests=int(report["requests"]),
        seconds=report["duration_us"] / 1e6,
        cpu_s=cpu1 - cpu0,
        server_cpu_s=srv1 - srv0,
        upstream_cpu_s=up1 - up0,
        errors=int(report["non2xx"] + report["connect"] + report["read"] + report["timeout"])
        + int(report["replayed"]),
        p99_ms=report["p99_us"] / 1000,
    )
    n = max(done.requests, 1)
    if c.pg is not None and before_pg is not None:
        after = pg_counts(c.pg[0], c.pg[1]).minus(before_pg)
        done.per_exchange = {
            "statements": sum(after.statements.values()) / n,
            "commits": after.commits / n,
        }
        done.per_exchange |= {
            f"  {k}": v / n
            for k, v in sorted(after.statements.items(), key=lambda kv: -kv[1])
            if v / n >= 0.05
        }
    elif before_sq is not None:
        batches, writes = sqlite_counts(c.url)
        done.per_exchange = {
            "commits": (batches - before_sq[0]) / n,
            "writes": (writes - before_sq[1]) / n,
        }
    return done


# py-spy ---------------------------------------------------------------------------------


def profile(
    c: Contender, pool: Sequence[SignedRequest], connections: int, seconds: int, out: Path
) -> list[str]:
    """py-spy samples of the gateway under wrk load; the top functions by inclusive share."""
    spy = Path(sys.executable).with_name("py-spy")
    raw = out / f"{c.name}.txt"
    host = c.url.removeprefix("http://")
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp:
        pool_file = Path(tmp) / "pool"
        _write_pool(pool_file, pool, host)
        # Fixed arguments, no shell.
        sampler = subprocess.Popen(  # noqa: S603
            [
                str(spy),
                "record",
                "--pid",
                str(c.pid),
                "--duration",
                str(seconds),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wrk(c.url, pool_file, 1, connections, seconds)
        sampler.wait(timeout=seconds + 30)
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        # One function, whatever the line: "name (path)" with the checkout's prefix cut.
        frames = [
            re.sub(r":\d+\)$", ")", re.sub(r" \(.*?/(site-packages|lean)/", " (", f))
            for f in stack.split(";")
        ]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
        own[frames[-1]] = own.get(frames[-1], 0) + samples
    share = max(total, 1) / 100

    def top(table: dict[str, int], n: int) -> list[str]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:n]
        return [f"{v / share:5.1f}%  {k}" for k, v in ranked]

    return ["inclusive:", *top(inclusive, 45), "self:", *top(own, 30)]


# The run --------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


@contextlib.contextmanager
def deployed(tmp: Path, async_instances: int) -> Iterator[tuple[Stack, Stack, Any, str, str]]:
    from tests.pg import PostgresServer  # the suite's own initdb'd server

    server = PostgresServer.start()
    try:
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(server.database())
            database = url.rsplit("/", 1)[1]
            asyncio.run(_pg(url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
            (tmp / "sqlite").mkdir()
            (tmp / "pg").mkdir()
            sq = stack.enter_context(running(tmp / "sqlite"))
            pg = stack.enter_context(running(tmp / "pg", contenders=False, store_url=url))
            yield sq, pg, server, url, database
    finally:
        server.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Pass]] = []
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp_name:
        tmp = Path(tmp_name)
        with deployed(tmp, args.pg_instances) as (sq, pg, server, url, database):
            upstream_pid = _upstream_pid(sq)
            contenders = [
                Contender(
                    name="bare",
                    url=sq.bare,
                    pid=_pid_of(sq, "bare"),
                    upstream_pid=upstream_pid,
                    stack=sq,
                ),
                Contender(
                    name="floor",
                    url=sq.floor,
                    pid=_pid_of(sq, "floor"),
                    upstream_pid=upstream_pid,
                    stack=sq,
                ),
                Contender(
                    name="gw-sqlite",
                    url=sq.gateway,
                    pid=sq.gateway_pid,
                    upstream_pid=upstream_pid,
                    stack=sq,
                ),
                Contender(
                    name="gw-sqlite+nonce",
                    url=sq.gateway,
                    pid=sq.gateway_pid,
                    upstream_pid=upstream_pid,
                    stack=sq,
                    nonce=True,
                ),
                Contender(
                    name="gw-pg",
                    url=pg.gateway,
                    pid=pg.gateway_pid,
                    upstream_pid=_upstream_pid(pg),
                    stack=pg,
                    pg=(url, database, server.server_pid()),
                ),
            ]
            per_pass = 300 * (args.warmup + args.duration) * 4
            for n in range(args.rounds):
                this: dict[str, Pass] = {}
                for c in contenders:
                    pool = presign(
                        c.stack.member, c.url, SERVICE, example(SERVICE), per_pass, nonce=c.nonce
                    )
                    this[c.name] = p = drive(c, pool, args.connections, args.warmup, args.duration)
                    print(_line(n + 1, p), flush=True)
                rounds.append(this)
            half = _half_load(args, contenders, rounds)
            spy: dict[str, list[str]] = {}
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                for c in contenders[2:5:2]:
                    pool = presign(c.stack.member, c.url, SERVICE, example(SERVICE), 300 * 12)
                    spy[c.name] = profile(c, pool, args.connections, 10, args.profile)
                    (args.profile / f"{c.name}.top.txt").write_text("\n".join(spy[c.name]))
            asynchronous = {}
            if args.async_messages:
                for name, st, pg_ in (("gw-sqlite", sq, None), ("gw-pg", pg, (url, database))):
                    before = pg_counts(*pg_) if pg_ else None
                    before_sq = sqlite_counts(st.gateway) if pg_ is None else None
                    cpu0 = cpu_seconds(st.gateway_pid)
                    result = asyncio.run(
                        run_async(st, messages=args.async_messages, connections=args.connections)
                    )
                    entry: dict[str, Any] = {
                        "messages": result.messages,
                        "callback_delivered": result.callback_delivered,
                        "msgs_per_s": round(result.msgs_per_s, 1),
                        "complete": result.complete,
                        "gateway_cpu_ms_per_msg": round(
                            1000 * (cpu_seconds(st.gateway_pid) - cpu0) / result.messages, 3
                        ),
                    }
                    n = max(result.messages, 1)
                    if before is not None and pg_ is not None:
                        after = pg_counts(*pg_).minus(before)
                        entry["statements_per_msg"] = sum(after.statements.values()) / n
                        entry["commits_per_msg"] = after.commits / n
                        entry["top"] = {
                            k: round(v / n, 2)
                            for k, v in sorted(after.statements.items(), key=lambda kv: -kv[1])[:12]
                        }
                    elif before_sq is not None:
                        batches, writes = sqlite_counts(st.gateway)
                        entry["commits_per_msg"] = (batches - before_sq[0]) / n
                        entry["writes_per_msg"] = (writes - before_sq[1]) / n
                    asynchronous[name] = entry
                    print(f"async {name}: {json.dumps(entry)}", flush=True)
    return _report(args, rounds, half, spy, asynchronous)


def _pid_of(stack: Stack, name: str) -> int:
    """The pid listening on the contender's port (bare and floor are not in Stack)."""
    port = int((stack.bare if name == "bare" else stack.floor).rsplit(":", 1)[1])
    return _listener_pid(port)


def _upstream_pid(stack: Stack) -> int:
    return _listener_pid(int(stack.upstream.rsplit(":", 1)[1]))


def _listener_pid(port: int) -> int:
    inode = None
    for table in ("tcp", "tcp6"):
        for line in (PROC / "net" / table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inode = parts[9]
    for fd in PROC.glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
    raise RuntimeError(f"nothing listens on port {port}")


def _half_load(
    args: argparse.Namespace, contenders: Sequence[Contender], rounds: Sequence[dict[str, Pass]]
) -> dict[str, Any]:
    """Bare, then each gateway, open loop at half the SQLite gateway's median rate."""
    rate = 0.5 * _median([r["gw-sqlite"].rps for r in rounds])
    found: dict[str, Any] = {"rate": round(rate, 1)}
    for c in contenders:
        if c.name not in ("bare", "gw-sqlite", "gw-pg"):
            continue
        seconds = args.duration
        pool = presign(
            c.stack.member, c.url, SERVICE, example(SERVICE), int(rate * (seconds + 3)) + 50
        )
        r = run_python(
            c.url,
            pool,
            connections=args.connections,
            processes=2,
            warmup_s=2,
            duration_s=seconds,
            rate=rate,
        )
        found[c.name] = {
            "p50_ms": round(r.p50_ms, 2),
            "p99_ms": round(r.p99_ms, 2),
            "errors": r.errors,
        }
        print(f"half load {c.name}: {found[c.name]}", flush=True)
    for name in ("gw-sqlite", "gw-pg"):
        found[f"p99_added_{name}_ms"] = round(found[name]["p99_ms"] - found["bare"]["p99_ms"], 2)
    return found


def _line(n: int, p: Pass) -> str:
    srv = f" + server {1000 * p.server_cpu_s / max(p.requests, 1):.3f}" if p.server_cpu_s else ""
    return (
        f"{n:>3}  {p.name:<16} {p.rps:8.1f} req/s  cpu {p.ms_per_request(False):.3f} ms/req"
        f"{srv}  upstream {1000 * p.upstream_cpu_s / max(p.requests, 1):.3f}  p99 "
        f"{p.p99_ms:7.2f} ms  errors {p.errors}  {json.dumps(p.per_exchange)}"
    )


def _ratio(rounds: Sequence[dict[str, Pass]], f: Callable[[dict[str, Pass]], float]) -> list[float]:
    return [round(f(r), 3) for r in rounds]


def _report(
    args: argparse.Namespace,
    rounds: Sequence[dict[str, Pass]],
    half: dict[str, Any],
    spy: dict[str, list[str]],
    asynchronous: dict[str, Any],
) -> dict[str, Any]:
    def cpu(name: str, server: bool = True) -> Callable[[dict[str, Pass]], float]:
        return lambda r: r[name].ms_per_request(server)

    floor = _ratio(rounds, lambda r: cpu("gw-sqlite")(r) / cpu("floor")(r))
    nonce = _ratio(rounds, lambda r: cpu("gw-sqlite+nonce")(r) / cpu("floor")(r))
    pg_total = _ratio(rounds, lambda r: cpu("gw-pg")(r) / cpu("gw-sqlite")(r))
    pg_own = _ratio(rounds, lambda r: cpu("gw-pg", False)(r) / cpu("gw-sqlite")(r))
    names = rounds[0].keys()
    doc: dict[str, Any] = {
        "cpu_ms_per_request": {
            n: round(_median([r[n].ms_per_request(False) for r in rounds]), 3) for n in names
        },
        "pg_server_cpu_ms_per_request": round(
            _median([r["gw-pg"].server_cpu_s * 1000 / max(r["gw-pg"].requests, 1) for r in rounds]),
            3,
        ),
        "rps": {n: round(_median([r[n].rps for r in rounds]), 1) for n in names},
        "gateway_over_floor_cpu": {"median": _median(floor), "rounds": floor, "target": 2.0},
        "gateway_nonce_over_floor_cpu": {"median": _median(nonce), "rounds": nonce},
        "pg_over_sqlite_cpu": {"median": _median(pg_total), "rounds": pg_total, "target": 1.3},
        "pg_own_process_over_sqlite_cpu": {"median": _median(pg_own), "rounds": pg_own},
        "per_exchange": {
            n: rounds[-1][n].per_exchange for n in ("gw-sqlite", "gw-sqlite+nonce", "gw-pg")
        },
        "half_load": half,
        "async": asynchronous,
        "profile_top": spy,
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "connections": args.connections,
            "async_messages": args.async_messages,
        },
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "rounds": [
            {
                n: {
                    "rps": round(p.rps, 1),
                    "cpu_ms": round(p.ms_per_request(False), 3),
                    "server_cpu_ms": round(1000 * p.server_cpu_s / max(p.requests, 1), 3),
                    "errors": p.errors,
                }
                for n, p in r.items()
            }
            for r in rounds
        ],
    }
    return doc


def _summary(doc: dict[str, Any]) -> list[str]:
    cpu = doc["cpu_ms_per_request"]
    f, pg = doc["gateway_over_floor_cpu"], doc["pg_over_sqlite_cpu"]
    half = doc["half_load"]
    return [
        "CPU ms per request (median round; the contender's own processes):",
        *(f"  {n:<16} {v:.3f}   {doc['rps'][n]:8.1f} req/s" for n, v in cpu.items()),
        f"  PostgreSQL server per gw-pg request: {doc['pg_server_cpu_ms_per_request']:.3f}",
        f"gateway/floor CPU = {f['median']:.2f}x  (rounds {f['rounds']}; target <= 2.0)",
        f"gateway+nonce/floor CPU = {doc['gateway_nonce_over_floor_cpu']['median']:.2f}x",
        f"pg/sqlite CPU (gateway + server) = {pg['median']:.2f}x  (rounds {pg['rounds']}; "
        f"own process {doc['pg_own_process_over_sqlite_cpu']['median']:.2f}x; target <= 1.3)",
        f"p99 added over bare at {half['rate']} req/s: sqlite "
        f"{half['p99_added_gw-sqlite_ms']} ms, pg {half['p99_added_gw-pg_ms']} ms (target <= 5)",
        *(
            f"per sync exchange {n}: {json.dumps({k: round(v, 2) for k, v in e.items()})}"
            for n, e in doc["per_exchange"].items()
        ),
        *(
            f"async {n}: {e['msgs_per_s']} msg/s, {e['callback_delivered']}/{e['messages']} "
            f"delivered, commits/msg {e.get('commits_per_msg', 0):.2f}"
            for n, e in doc["async"].items()
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lean", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8, help="seconds measured per pass")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--async-messages", type=int, default=3000, help="0: no async pass")
    p.add_argument("--pg-instances", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--profile", type=Path, default=None, help="py-spy samples into this dir")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    doc = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print("\n".join(_summary(doc)))
    print(f"report: {args.out}")
    bad = any(v["errors"] for r in doc["rounds"] for v in r.values()) or any(
        not e["complete"] for e in doc["async"].values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
