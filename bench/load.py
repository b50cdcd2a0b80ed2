"""Load: pre-signed requests, and two drivers that replay them (wrk, or Python processes).

Every request is signed before the timer starts and carries its own ``Gw-Message-Id``,
because the gateway rejects stale signatures (±300 s) and answers a repeated message id
from its log (``Gw-Replayed``) instead of doing the work. Stateless contenders may see a
pool cycle; the gateway's pool is sized so it does not, and replays are counted.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench import sig
from gateway.crypto.sm2 import Sm2PrivateKey

__all__ = ["Member", "PassResult", "SignedRequest", "presign", "run_python", "run_wrk"]

WRK_SCRIPT = Path(__file__).with_name("wrk.lua")
# One wrk thread outpaces every contender here and leaves the most CPU to the servers.
WRK_THREADS = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """Who signs the load: a member id and its Ed25519 (or SM2) key."""

    member_id: str
    key: ed25519.Ed25519PrivateKey | Sm2PrivateKey
    kid: str


@dataclass(frozen=True, slots=True)
class SignedRequest:
    path: str
    headers: dict[str, str]
    body: bytes

    def raw(self, host: str) -> bytes:
        """The request as HTTP/1.1 bytes, for wrk."""
        lines = [f"POST {self.path} HTTP/1.1", f"host: {host}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        lines.append(f"content-length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def presign(
    member: Member,
    base_url: str,
    service: str,
    document: Any,
    count: int,
    *,
    nonce: bool = False,
) -> list[SignedRequest]:
    """``count`` requests for ``service`` at ``base_url``, each with its own message id
    (and with ``nonce``, its own signature nonce, which the gateway claims in its store)."""
    path = f"/v1/exchange/{service}"
    body = json.dumps(document, ensure_ascii=False).encode()
    digest = sig.content_digest(body, "sm3" if isinstance(member.key, Sm2PrivateKey) else "sha-256")
    created = int(time.time())
    pool = []
    for _ in range(count):
        headers = {
            "content-type": "application/json",
            "content-digest": digest,
            "gw-client": member.member_id,
            "gw-message-id": str(uuid.uuid4()),
        }
        lines = sig.request_lines("POST", base_url + path, headers)
        headers["signature-input"], headers["signature"] = sig.sign(
            member.key, member.kid, "sig1", lines, created, uuid.uuid4().hex if nonce else None
        )
        pool.append(SignedRequest(path, headers, body))
    return pool


@dataclass(frozen=True, slots=True, kw_only=True)
class PassResult:
    """One contender under one load: answers in the measured window and their latency."""

    loader: str
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    replayed: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors

    @property
    def flagged(self) -> bool:
        """Errors or replays: the figures of this pass do not count."""
        return bool(self.errors or self.replayed)


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (0 when there are none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# wrk ------------------------------------------------------------------------------------


def _write_pool(path: Path, pool: Sequence[SignedRequest], host: str) -> None:
    with path.open("wb") as fh:
        for request in pool:
            raw = request.raw(host)
            fh.write(b"%d\n%s" % (len(raw), raw))


def _wrk(url: str, pool_file: Path, threads: int, connections: int, seconds: int) -> Any:
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        str(pool_file),
        str(threads),
    ]
    # Fixed arguments, no shell: wrk from PATH is the point.
    done = subprocess.run(command, capture_output=True, text=True, check=True)  # noqa: S603
    report = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not report:
        raise RuntimeError(f"wrk printed no report:\n{done.stdout}\n{done.stderr}")
    return json.loads(report[-1])


def run_wrk(
    base_url: str,
    pool: Sequence[SignedRequest],
    *,
    connections: int,
    warmup_s: int,
    duration_s: int,
) -> PassResult:
    """Warm up, then measure, with wrk replaying the pool (split between the two runs)."""
    host = base_url.removeprefix("http://")
    threads = min(WRK_THREADS, connections)
    cut = len(pool) * warmup_s // (warmup_s + duration_s)
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        warm, main = Path(tmp) / "warmup.pool", Path(tmp) / "main.pool"
        _write_pool(warm, pool[:cut], host)
        _write_pool(main, pool[cut:], host)
        if warmup_s > 0 and cut >= threads:
            _wrk(base_url, warm, threads, connections, warmup_s)
        report = _wrk(base_url, main, threads, connections, duration_s)
    errors = report["connect"] + report["read"] + report["write"] + report["timeout"]
    return PassResult(
        loader="wrk",
        requests=int(report["requests"]),
        duration_s=report["duration_us"] / 1e6,
        p50_ms=report["p50_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        non2xx=int(report["non2xx"]),
        socket_errors=int(errors),
        replayed=int(report["replayed"]),
    )


# Python ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Job:
    # Where to send; with several (instances of one gateway), connection k goes to the
    # k-th round-robin, as a load balancer spreads connections.
    base_urls: tuple[str, ...]
    requests: Sequence[SignedRequest]
    connections: int
    warmup_s: float
    duration_s: float
    rate: float | None  # requests/s of this process (open loop), None: closed loop
    phase: float = 0.0  # offset of this process's schedule, in intervals


@dataclass(slots=True)
class _Sample:
    latencies: list[float] = field(default_factory=list)
    non2xx: int = 0
    socket_errors: int = 0
    replayed: int = 0


async def _send(session: aiohttp.ClientSession, url: str, req: SignedRequest) -> tuple[int, bool]:
    async with session.post(url + req.path, data=req.body, headers=req.headers) as resp:
        await resp.read()
        return resp.status, "Gw-Replayed" in resp.headers


async def _drive(job: _Job) -> _Sample:
    sample = _Sample()
    connector = aiohttp.TCPConnector(limit=job.connections)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=30),
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        clock = time.perf_counter
        window = clock() + job.warmup_s
        end = window + job.duration_s
        cursor = 0

        urls = job.base_urls

        async def one(req: SignedRequest, due: float, k: int) -> None:
            try:
                status, replayed = await _send(session, urls[k % len(urls)], req)
            except (aiohttp.ClientError, TimeoutError):
                if due >= window:
                    sample.socket_errors += 1
                return
            finished = clock()
            if window <= (due if job.rate else finished) <= end:
                sample.latencies.append(finished - due)
                sample.non2xx += not 200 <= status < 300
                sample.replayed += replayed

        async def worker(k: int) -> None:
            nonlocal cursor
            while clock() < end:
                req = job.requests[cursor % len(job.requests)]
                cursor += 1
                await one(req, clock(), k)

        if job.rate is None:
            await asyncio.gather(*(worker(k) for k in range(job.connections)))
            return sample
        # Open loop: send on schedule; latency counts from the scheduled time.
        tasks: set[asyncio.Task[None]] = set()
        start = clock()
        for k, req in enumerate(job.requests):
            due = start + (k + job.phase) / job.rate
            if due >= end:
                break
            await asyncio.sleep(max(0.0, due - clock()))
            task = asyncio.create_task(one(req, due, k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return sample


def _child(job: _Job, barrier: Barrier, out: Connection) -> None:
    barrier.wait()  # every process starts its clock together
    out.send(asyncio.run(_drive(job)))
    out.close()


def run_python(
    base_url: str | Sequence[str],
    pool: Sequence[SignedRequest],
    *,
    connections: int,
    processes: int,
    warmup_s: float,
    duration_s: float,
    rate: float | None = None,
) -> PassResult:
    """Replay the pool from ``processes`` asyncio processes, closed loop or at ``rate``/s.

    Several ``base_url``s (instances behind one ``public_url`` the pool is signed for)
    share the connections round-robin."""
    urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    children: list[tuple[BaseProcess, Connection]] = []
    for i in range(processes):
        job = _Job(
            base_urls=urls[i % len(urls) :] + urls[: i % len(urls)],
            requests=pool[i::processes],
            connections=max(1, (connections + i) // processes),
            warmup_s=warmup_s,
            duration_s=duration_s,
            rate=rate / processes if rate else None,
            phase=i / processes,
        )
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child, args=(job, barrier, send), daemon=True)
        process.start()
        send.close()
        children.append((process, receive))
    merged = _Sample()
    try:
        barrier.wait(timeout=60)
        for _, receive in children:
            sample: _Sample = receive.recv()
            merged.latencies += sample.latencies
            merged.non2xx += sample.non2xx
            merged.socket_errors += sample.socket_errors
            merged.replayed += sample.replayed
    finally:
        for child, receive in children:
            receive.close()
            child.join(timeout=10)
            if child.is_alive():
                child.terminate()
                child.join()
    ordered = sorted(merged.latencies)
    return PassResult(
        loader="python",
        requests=len(ordered),
        duration_s=duration_s,
        p50_ms=_percentile(ordered, 0.50) * 1000,
        p99_ms=_percentile(ordered, 0.99) * 1000,
        non2xx=merged.non2xx,
        socket_errors=merged.socket_errors,
        replayed=merged.replayed,
    )
