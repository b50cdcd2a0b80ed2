"""The benchmark, in one command: an upstream, three contenders, the same load for each.

    .venv/bin/python -m bench.run [--rounds 3] [--duration 8] [--connections 64] [--async] [--smoke]
    .venv/bin/python -m bench.run --store postgres --instances 3 [--async]   # scale-out
    .venv/bin/python -m bench.run --alg sm2   # adds an SM2 gateway beside the Ed25519 one

See bench/README.md for what the contenders are and how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a file: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import chart
from bench.asyncpass import AsyncResult, run_async
from bench.load import PassResult, SignedRequest, presign, run_python, run_wrk
from bench.rss import RssSampler
from bench.scaleout import first_of, layouts, measure_layout, row_line, scaleout_report
from bench.stack import ROOT, Stack, example, running
from gateway.serve import eventloop

__all__ = ["Figures", "Round", "combine", "main", "median_pass"]

CONTENDERS = ("bare", "floor", "gateway")
# With --alg sm2: the same gateway on SM2 keys (sm2-sm3 signatures, sm3 digests), its own
# stack, measured in every round right after the Ed25519 one.
SM2 = "gateway-sm2"
# Issue 7's targets, shown beside the figures (the benchmark itself enforces none).
TARGETS = {
    "ratio_floor_min": 0.7,
    "p99_added_ms_max": 5.0,
    "async_msgs_per_s_min": 1000.0,
    "rss_mib_max": 150.0,
}
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"
SCALEOUT_OUT = ROOT / "bench" / "results" / "scaleout.json"

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    rounds: int  # of bare, floor, gateway back to back at max throughput
    duration_s: int
    warmup_s: int
    connections: int
    processes: int  # of the Python load generator
    loader: str  # "wrk" or "python" for the max-throughput passes
    stateless_pool: int  # pre-signed requests for bare and floor (they may cycle)
    half_load: bool  # the rate-limited pass at half the gateway's throughput
    async_messages: int  # 0: no async pass
    chart: bool
    smoke: bool
    gateway_workers: int = 1
    loop: str = "asyncio"  # every process's event loop (gateway, contenders, upstream)
    alg: str = "ed25519"  # "sm2": also the SM2 gateway, in every round
    monitoring: bool = True  # --monitoring off: no operational records (its cost)


def _settings(args: argparse.Namespace) -> Settings:
    loader = args.loader
    if loader == "auto":
        loader = "wrk" if shutil.which("wrk") else "python"
    elif loader == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--loader wrk: wrk is not installed")
    if args.smoke:
        return Settings(
            rounds=1,
            duration_s=1,
            warmup_s=1,
            connections=8,
            processes=1,
            loader=loader,
            stateless_pool=500,
            half_load=False,
            async_messages=50 if args.async_mode else 0,
            chart=False,
            smoke=True,
            gateway_workers=args.gateway_workers,
            loop=eventloop.resolve(args.loop),
            alg=args.alg,
            monitoring=args.monitoring == "on",
        )
    return Settings(
        rounds=args.rounds,
        duration_s=args.duration,
        warmup_s=args.warmup,
        connections=args.connections,
        processes=args.processes,
        loader=loader,
        stateless_pool=20_000,
        half_load=True,
        async_messages=args.async_messages if args.async_mode else 0,
        chart=True,
        smoke=False,
        gateway_workers=args.gateway_workers,
        loop=eventloop.resolve(args.loop),
        alg=args.alg,
        monitoring=args.monitoring == "on",
    )


def _drive(
    s: Settings, url: str, pool: Sequence[SignedRequest], rate: float | None = None
) -> PassResult:
    if s.loader == "wrk" and rate is None:
        return run_wrk(
            url, pool, connections=s.connections, warmup_s=s.warmup_s, duration_s=s.duration_s
        )
    return run_python(
        url,
        pool,
        connections=s.connections,
        processes=s.processes,
        warmup_s=s.warmup_s,
        duration_s=s.duration_s,
        rate=rate,
    )


def contenders(s: Settings) -> tuple[str, ...]:
    """The passes of one round, in order."""
    return (*CONTENDERS, SM2) if s.alg == "sm2" else CONTENDERS


def _presign(stack: Stack, url: str, count: int) -> list[SignedRequest]:
    return presign(stack.member, url, "credit.query", example("credit.query"), count)


def _row(name: str, r: PassResult, prefix: str = "") -> str:
    flag = ""
    if r.flagged:
        flag = (
            f"  FLAGGED: {r.non2xx} non-2xx, {r.socket_errors} socket errors, {r.replayed} replays"
        )
    return (
        f"  {prefix}{name:<11} {r.rps:>9.1f} req/s   p50 {r.p50_ms:>7.2f} ms"
        f"   p99 {r.p99_ms:>7.2f} ms   errors {r.errors}{flag}"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Round:
    """Each contender's max-throughput pass, run back to back under the machine's same load."""

    passes: Mapping[str, PassResult]  # by contender

    def ratio(self, other: str) -> float:
        """The gateway's throughput over ``other``'s in this round (0 if ``other`` had none)."""
        gateway, base = self.passes["gateway"], self.passes[other]
        return gateway.rps / base.rps if base.rps else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """What the rounds add up to: each contender's median round, the median per-round ratios."""

    median: Mapping[str, PassResult]  # by contender: its pass of median throughput
    ratio_floor: float
    ratio_bare: float
    ratio_floor_range: tuple[float, float]  # the lowest and highest round


def _lower_median(ordered: Sequence[T]) -> T:
    """The middle of sorted values; of an even count the lower middle, a value a round had."""
    if not ordered:
        raise ValueError("no rounds")
    return ordered[(len(ordered) - 1) // 2]


def median_pass(passes: Sequence[PassResult]) -> PassResult:
    """The pass of median throughput (the lower middle of an even count)."""
    return _lower_median(sorted(passes, key=lambda r: r.rps))


def combine(rounds: Sequence[Round]) -> Figures:
    """Each contender's median round, and the median of the ratios taken within each round.

    A round's passes run seconds apart and share the machine's conditions; rounds run a
    minute apart and need not. So the ratio is taken within each round, then the median:
    a ratio of the medians could divide a fast round's gateway by a slow round's floor.
    """
    floor = [r.ratio("floor") for r in rounds]
    return Figures(
        median={name: median_pass([r.passes[name] for r in rounds]) for name in CONTENDERS},
        ratio_floor=round(_lower_median(sorted(floor)), 3),
        ratio_bare=round(_lower_median(sorted(r.ratio("bare") for r in rounds)), 3),
        ratio_floor_range=(round(min(floor), 3), round(max(floor), 3)),
    )


def gateway_pool_size(floor_rps: float, seconds: int) -> int:
    """Pre-signed requests enough that the gateway's pool never cycles within a pass.

    The floor's work is a subset of the gateway's, so its rate bounds the gateway's; the
    1.5x margin keeps the gateway's message ids from repeating (a replay is answered from
    the store and would inflate its throughput). ``floor_rps`` is the highest of the run.
    """
    return math.ceil(1.5 * max(floor_rps, 100.0) * seconds) + 100


# Runs one max-throughput pass: contender name, pool size -> its result.
Drive = Callable[[str, int], PassResult]


def max_throughput(s: Settings, drive: Drive) -> list[Round]:
    """``s.rounds`` rounds of bare, floor and gateway, each on a freshly pre-signed pool."""
    rounds: list[Round] = []
    floor_max = 0.0  # over every round so far: one slow floor round must not shrink the pool
    gateway_max = 0.0  # bounds the SM2 gateway's rate as the floor bounds the gateway's
    for number in range(1, s.rounds + 1):
        passes: dict[str, PassResult] = {}
        for name in contenders(s):
            size = s.stateless_pool
            if name in ("gateway", SM2):
                bound = floor_max if name == "gateway" else gateway_max
                size = gateway_pool_size(bound, s.warmup_s + s.duration_s)
            passes[name] = drive(name, size)
            if name == "floor":
                floor_max = max(floor_max, passes[name].rps)
            if name == "gateway":
                gateway_max = max(gateway_max, passes[name].rps)
            print(_row(name, passes[name], prefix=f"{number:>2}  "), flush=True)
        rounds.append(Round(passes=passes))
    return rounds


def measure(
    stack: Stack, s: Settings, sm2: Stack | None = None
) -> tuple[list[Round], dict[str, PassResult]]:
    """Max throughput in rounds, then bare and gateway at half the gateway's median round."""
    urls = {"bare": stack.bare, "floor": stack.floor, "gateway": stack.gateway}
    stacks = dict.fromkeys(urls, stack)
    if sm2 is not None:
        urls[SM2], stacks[SM2] = sm2.gateway, sm2
    seconds = s.warmup_s + s.duration_s
    print(
        f"max throughput ({s.loader}, {s.connections} connections, {s.duration_s} s each;"
        f" {s.rounds} round{'s' if s.rounds != 1 else ''} of {', '.join(contenders(s))}):"
    )
    rounds = max_throughput(
        s, lambda name, size: _drive(s, urls[name], _presign(stacks[name], urls[name], size))
    )
    half: dict[str, PassResult] = {}
    rate = median_pass([r.passes["gateway"] for r in rounds]).rps / 2
    if s.half_load and rate > 0:
        print(f"half load (python, open loop at {rate:.0f} req/s):")
        for name in ("bare", "gateway"):
            pool = _presign(stack, urls[name], math.ceil(1.1 * rate * seconds) + 50)
            half[name] = _drive(s, urls[name], pool, rate)
            print(_row(name, half[name]), flush=True)
    return rounds, half


def _stats(r: PassResult) -> dict[str, Any]:
    return {
        "rps": round(r.rps, 1),
        "p50_ms": round(r.p50_ms, 3),
        "p99_ms": round(r.p99_ms, 3),
        "requests": r.requests,
        "errors": r.errors,
        "non2xx": r.non2xx,
        "socket_errors": r.socket_errors,
        "replayed": r.replayed,
        "flagged": r.flagged,
        "loader": r.loader,
    }


def _machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else ""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        # Anything else running skews every figure: read this before the results.
        "load_average_1m": round(os.getloadavg()[0], 2),
        "note": "load generator, upstream and contender share these CPUs",
    }


def report(
    s: Settings,
    machine: dict[str, Any],
    rounds: Sequence[Round],
    half: dict[str, PassResult],
    async_result: AsyncResult | None,
    rss_mib: float | None = None,
) -> dict[str, Any]:
    """The ``latest.json`` document: the median rounds' figures first, then every round."""
    figures = combine(rounds)
    median = figures.median
    gateway = median["gateway"]
    added = round(half["gateway"].p99_ms - half["bare"].p99_ms, 3) if half else None
    return {
        "gateway_rps": round(gateway.rps, 1),
        "floor_rps": round(median["floor"].rps, 1),
        "bare_rps": round(median["bare"].rps, 1),
        "ratio_floor": figures.ratio_floor,
        "ratio_bare": figures.ratio_bare,
        "ratio_floor_range": list(figures.ratio_floor_range),
        "p50_ms": round(gateway.p50_ms, 3),
        "p99_ms": round(gateway.p99_ms, 3),
        "p99_added_ms": added,
        # The largest resident set of any gateway process (each worker) during the run.
        "gateway_peak_rss_mib": rss_mib,
        "contenders": {name: _stats(median[name]) for name in CONTENDERS},
        "rounds": [
            {name: _stats(r.passes[name]) for name in CONTENDERS}
            | {"ratio_floor": round(r.ratio("floor"), 3), "ratio_bare": round(r.ratio("bare"), 3)}
            for r in rounds
        ],
        "half_load": (
            {"rate_rps": round(gateway.rps / 2, 1)} | {n: _stats(r) for n, r in half.items()}
            if half
            else None
        ),
        "async": (
            {
                **asdict(async_result),
                "accept_s": round(async_result.accept_s, 3),
                "seconds": round(async_result.seconds, 3),
                "msgs_per_s": round(async_result.msgs_per_s, 1),
                "complete": async_result.complete,
            }
            if async_result
            else None
        ),
        "sm2": _sm2_figures(rounds),
        "targets": TARGETS,
        "machine": machine,
        "settings": asdict(s),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _sm2_figures(rounds: Sequence[Round]) -> dict[str, Any] | None:
    """The SM2 gateway beside the Ed25519 one: each one's median round, the median ratio."""
    if not rounds or SM2 not in rounds[0].passes:
        return None
    ratios = sorted(
        r.passes[SM2].rps / r.passes["gateway"].rps if r.passes["gateway"].rps else 0.0
        for r in rounds
    )
    return {
        "ed25519": _stats(median_pass([r.passes["gateway"] for r in rounds])),
        "sm2_sm3": _stats(median_pass([r.passes[SM2] for r in rounds])),
        "ratio_sm2_ed25519": round(_lower_median(ratios), 3),
        "rounds": [_stats(r.passes[SM2]) for r in rounds],
    }


def _summary(doc: dict[str, Any]) -> list[str]:
    t = doc["targets"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def spread(key: str) -> str:
        ratios = [r[key] for r in doc["rounds"]]
        if len(ratios) == 1:
            return "(1 round)"
        listed = ", ".join(f"{x:.3f}" for x in ratios)
        return (
            f"(median of {len(ratios)} rounds: {listed}; range {min(ratios):.3f}–{max(ratios):.3f})"
        )

    ok = doc["ratio_floor"] >= t["ratio_floor_min"]
    lines = [
        f"gateway/floor = {doc['ratio_floor']:.3f}   {spread('ratio_floor')}"
        f"   (target >= {t['ratio_floor_min']}: {met(ok)})",
        f"gateway/bare  = {doc['ratio_bare']:.3f}   {spread('ratio_bare')}",
    ]
    if doc["p99_added_ms"] is not None:
        ok = doc["p99_added_ms"] <= t["p99_added_ms_max"]
        lines.append(
            f"p99 added over bare at {doc['half_load']['rate_rps']:.0f} req/s"
            f" = {doc['p99_added_ms']:.2f} ms   (target <= {t['p99_added_ms_max']}: {met(ok)})"
        )
    rss = doc.get("gateway_peak_rss_mib")
    if rss is not None:
        ok = rss < t["rss_mib_max"]
        lines.append(
            f"gateway peak RSS = {rss:.1f} MiB per process"
            f"   (target < {t['rss_mib_max']:.0f}: {met(ok)})"
        )
    sm2 = doc.get("sm2")
    if sm2 is not None:
        ed, sm = sm2["ed25519"], sm2["sm2_sm3"]
        lines.append(
            f"sm2-sm3 gateway = {sm['rps']:.1f} req/s (p99 {sm['p99_ms']:.2f} ms) beside"
            f" ed25519 = {ed['rps']:.1f} req/s (p99 {ed['p99_ms']:.2f} ms):"
            f" sm2/ed25519 = {sm2['ratio_sm2_ed25519']:.3f}"
        )
    a = doc["async"]
    if a is not None:
        ok = a["complete"] and a["msgs_per_s"] >= t["async_msgs_per_s_min"]
        lines.append(
            f"async: {a['callback_delivered']}/{a['messages']} callback_delivered in"
            f" {a['seconds']:.2f} s = {a['msgs_per_s']:.1f} msg/s (202s in {a['accept_s']:.2f} s)"
            f"   (target >= {t['async_msgs_per_s_min']:.0f}: {met(ok)})"
        )
    return lines


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    def bounded(low: int, high: int) -> Any:
        def parse(text: str) -> int:
            value = int(text)
            if not low <= value <= high:
                raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
            return value

        return parse

    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Signatures are fresh for 300 s, and each pass is signed just before it runs.
    p.add_argument(
        "--rounds", type=bounded(1, 20), default=3, help="of bare, floor, gateway; medians reported"
    )
    p.add_argument("--duration", type=bounded(1, 240), default=8, help="seconds per pass")
    p.add_argument("--warmup", type=bounded(0, 30), default=2, help="seconds before each pass")
    p.add_argument("--connections", type=bounded(1, 1024), default=64, help="concurrent requests")
    p.add_argument("--processes", type=bounded(1, 64), default=2, help="Python load processes")
    p.add_argument(
        "--loader", choices=["auto", "wrk", "python"], default="auto", help="auto: wrk if installed"
    )
    p.add_argument("--async", dest="async_mode", action="store_true", help="add the async pass")
    p.add_argument("--async-messages", type=bounded(1, 100_000), default=3000, help="its size")
    p.add_argument("--smoke", action="store_true", help="a seconds-long check, 1 round, no chart")
    p.add_argument(
        "--gateway-workers", type=bounded(1, 64), default=1, help="gateway serve --workers N"
    )
    p.add_argument(
        "--loop",
        choices=eventloop.LOOPS,
        default="auto",
        help="event loop of every process (auto: uvloop when installed)",
    )
    p.add_argument(
        "--alg",
        choices=["ed25519", "sm2"],
        default="ed25519",
        help="sm2: also an SM2 gateway (sm2-sm3, sm3 digests) in every round",
    )
    p.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="postgres: the scale-out run, SQLite workers beside PostgreSQL instances",
    )
    p.add_argument(
        "--instances",
        type=bounded(1, 8),
        default=1,
        help="scale-out run: 1..N processes of each store (SQLite workers, PG instances)",
    )
    p.add_argument(
        "--store-url",
        help="a PostgreSQL server (a role that may create databases) instead of starting one",
    )
    p.add_argument(
        "--monitoring",
        choices=("on", "off"),
        default="on",
        help="operational monitoring records (off: measure without them)",
    )
    p.add_argument("--out", type=Path, default=None, help="the JSON report (PNG beside)")
    return p.parse_args(argv)


def scaleout(args: argparse.Namespace, s: Settings) -> int:
    """The scale-out run (bench/scaleout.py): each layout deployed afresh, then measured."""
    out: Path = args.out or SCALEOUT_OUT
    chosen = layouts(args.store, args.instances)
    print(
        f"scale-out (python load, {s.connections} connections, {s.duration_s} s per pass,"
        f" median of {s.rounds}; async {s.async_messages or 'off'}):",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        server = None
        if args.store == "postgres":
            from tests.pg import PostgresServer  # the suite's own initdb'd server

            given = args.store_url
            server = PostgresServer(url=given) if given else PostgresServer.start()
            stack.callback(server.stop)
        rows = []
        for layout in chosen:
            with contextlib.ExitStack() as database:
                pg_url = None
                if layout.store == "postgres":
                    assert server is not None
                    pg_url = database.enter_context(server.database())
                row = measure_layout(
                    layout,
                    pg_url=pg_url,
                    loop=s.loop,
                    rounds=s.rounds,
                    connections=s.connections,
                    processes=s.processes,
                    warmup_s=s.warmup_s,
                    duration_s=s.duration_s,
                    async_messages=s.async_messages,
                )
            rows.append(row)
            print(row_line(row, first_of(rows, layout.store)), flush=True)
    doc = scaleout_report(rows, asdict(s) | {"store": args.store, "instances": args.instances})
    doc["machine"] = _machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    for store, ratio in doc["two_over_one"].items():
        if ratio is not None:
            met = "met" if ratio >= doc["target_two_over_one"] else "NOT met"
            print(f"{store}: 2 over 1 = {ratio:.2f}x   (target >= 1.3: {met})")
    print(f"report: {out}")
    bad = any(r.sync.flagged or (r.async_result and not r.async_result.complete) for r in rows)
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    s = _settings(args)
    # SIGTERM unwinds like Ctrl-C: every server started (PostgreSQL too) is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.store == "postgres" or args.instances > 1:
        return scaleout(args, s)
    args.out = args.out or DEFAULT_OUT
    started = time.monotonic()
    machine = _machine()
    print(
        f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), Python {machine['python']},"
        f" load average {machine['load_average_1m']}"
    )
    print("load generator, upstream and each contender share them: figures are relative")
    print(f"event loop of every process: {s.loop}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        running(
            Path(tmp), gateway_workers=s.gateway_workers, loop=s.loop, monitoring=s.monitoring
        ) as stack,
        contextlib.ExitStack() as more,
    ):
        sm2 = None
        if s.alg == "sm2":
            (Path(tmp) / "sm2").mkdir()
            sm2 = more.enter_context(
                running(
                    Path(tmp) / "sm2", gateway_workers=s.gateway_workers, loop=s.loop, alg="sm2"
                )
            )
        with RssSampler(stack.gateway_pid) as rss:
            rounds, half = measure(stack, s, sm2)
            async_result = None
            if s.async_messages:
                print(f"async: {s.async_messages} crossregion.apply messages ...", flush=True)
                async_result = asyncio.run(
                    run_async(stack, messages=s.async_messages, connections=s.connections)
                )
        peak = rss.peak_mib if rss.available else None
    doc = report(s, machine, rounds, half, async_result, peak)
    passes = [*(p for r in rounds for p in r.passes.values()), *half.values()]
    flagged = any(p.flagged for p in passes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print("\n".join(_summary(doc)))
    print(f"report: {args.out}")
    if s.chart:
        png = args.out.with_suffix(".png")
        print(f"chart: {png}" if chart.draw(doc, png) else "chart skipped: matplotlib missing")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 1 if flagged or (async_result is not None and not async_result.complete) else 0


if __name__ == "__main__":
    sys.exit(main())
