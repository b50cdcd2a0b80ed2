"""Crash safety with real processes: SIGKILL at random moments loses nothing; SIGTERM drains."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler, Middleware

from gateway.exchange.client import ExchangeClient
from gateway.signing import Signer
from simulators.national import NationalPlatform, create_national_app
from simulators.portal import Portal, create_portal_app
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    NATIONAL_ID,
    PORTAL_ID,
    Keys,
    config_document,
    unused_port,
)

pytestmark = pytest.mark.integration  # starts gateway processes


@dataclass
class Deployment:
    """A gateway subprocess beside an in-process national platform and portal."""

    config_path: Path
    db_path: Path
    url: str
    national: NationalPlatform
    portal: Portal
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    accepted: set[str] = field(default_factory=set)

    async def start(self, workers: int = 1) -> None:
        self.starts += 1
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*command, "--workers", str(workers)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log.read_text()[-2000:]
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.url}/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError("the gateway did not become ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def states(self) -> dict[str, str]:
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as db:
            rows = db.execute("SELECT message_id, state FROM messages").fetchall()
        return dict(rows)


@contextlib.asynccontextmanager
async def deployed(
    keys: Keys,
    tmp_path: Path,
    edit: Callable[[dict[str, Any]], None] | None = None,
    upstream_middleware: Middleware | None = None,
) -> AsyncIterator[Deployment]:
    """A gateway config on disk for a subprocess, with the platform and portal in-process
    (``upstream_middleware`` wraps the platform's handlers, to act when it is hit)."""
    gw_port, nat_port, portal_port = unused_port(), unused_port(), unused_port()
    url = f"http://127.0.0.1:{gw_port}"
    doc = config_document(
        keys, store=tmp_path / "gw.db", national_url=f"http://127.0.0.1:{nat_port}"
    )
    doc["listen"] = {
        "ingress": {"host": "127.0.0.1", "port": gw_port},
        "admin": {"host": "127.0.0.1", "port": unused_port()},
    }
    doc["members"][0]["callback_url"] = f"http://127.0.0.1:{portal_port}/callbacks"
    doc["delivery"].update({"max_attempts": 100, "shutdown_grace_s": 3})
    if edit is not None:
        edit(doc)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    gateway_keys = keys.verification("gateway")
    national = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted=gateway_keys,
        callback_base=url,
        callback_delay_s=0.05,
    )
    portal = Portal(
        member_id=PORTAL_ID,
        keypair=keys.pairs["portal"],
        gateway_keys=gateway_keys,
        gateway_url=url,
    )
    national_app = create_national_app(national)
    if upstream_middleware is not None:
        national_app.middlewares.append(upstream_middleware)
    servers = [
        TestServer(national_app, port=nat_port),
        TestServer(create_portal_app(portal), port=portal_port),
    ]
    try:
        for server in servers:  # all closed below, even if one fails to start
            await server.start_server()
        dep = Deployment(
            config_path, tmp_path / "gw.db", url, national, portal, tmp_path / "gw.log"
        )
        try:
            yield dep
        finally:
            dep.stop()
    finally:
        for server in servers:
            await server.close()


@pytest.fixture
async def deployment(keys: Keys, tmp_path: Path) -> AsyncIterator[Deployment]:
    async with deployed(keys, tmp_path) as dep:
        yield dep


async def _send_until_accepted(
    dep: Deployment, client: ExchangeClient, stop: asyncio.Event
) -> None:
    """Keep sending new applications; retry each (same id) until it is acknowledged 202."""
    while not stop.is_set():
        message_id = str(uuid.uuid4())
        while True:
            try:
                reply = await client.exchange(
                    "crossregion.apply", APPLY_EXAMPLE, message_id=message_id
                )
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.05)
                continue
            if reply.status == 202:
                dep.accepted.add(message_id)
                break
            assert reply.status >= 500, reply.body  # only unavailability may interrupt
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.01)


async def test_sigkill_at_random_moments_loses_no_accepted_message(
    deployment: Deployment, keys: Keys
) -> None:
    """Six SIGKILLs under a steady stream: every 202 ends callback_delivered, processed once."""
    dep = deployment
    # The kill timings vary run to run; a failure names its seed so it can be replayed.
    seed = int(os.environ.get("GATEWAY_TEST_SEED") or os.getpid())
    print(f"kill timings: GATEWAY_TEST_SEED={seed}")  # pytest shows it on failure
    rng = random.Random(seed)
    await dep.start()
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        client = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(keys.pairs["portal"]),
            base_url=dep.url,
            session=session,
        )
        senders = [asyncio.create_task(_send_until_accepted(dep, client, stop)) for _ in range(3)]
        for _ in range(6):
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            dep.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await dep.start()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*senders)

    assert dep.starts == 7, f"seed {seed}"
    assert len(dep.accepted) >= 20, f"the stream was too thin to prove anything (seed {seed})"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        states = dep.states()
        if all(states.get(i) == "callback_delivered" for i in dep.accepted):
            break
        await asyncio.sleep(0.2)
    states = dep.states()
    lost = {i: states.get(i) for i in dep.accepted if states.get(i) != "callback_delivered"}
    assert lost == {}, (
        f"{len(lost)} of {len(dep.accepted)} not delivered (seed {seed}): {list(lost.items())[:5]}"
    )
    assert set(dep.portal.processed) >= dep.accepted
    assert all(dep.portal.seen[i] >= 1 for i in dep.accepted)


async def test_sigterm_drains_in_flight_and_keeps_the_rest_queued(
    deployment: Deployment, keys: Keys
) -> None:
    """SIGTERM: the process exits 0 within its grace, refuses new work, and loses nothing."""
    dep = deployment
    dep.national.mode = "slow"
    dep.national.delay_s = 1.0
    await dep.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        client = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(keys.pairs["portal"]),
            base_url=dep.url,
            session=session,
        )
        for _ in range(12):
            reply = await client.exchange("crossregion.apply", APPLY_EXAMPLE)
            assert reply.status == 202
            dep.accepted.add(reply.json()["message_id"])
        await asyncio.sleep(0.3)  # deliveries are now in flight at the slow platform
        assert dep.process is not None
        started = time.monotonic()
        dep.process.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, dep.process.wait)
        assert code == 0, dep.log.read_text()[-2000:]
        assert time.monotonic() - started < 10
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.exchange("crossregion.apply", APPLY_EXAMPLE)
    states = dep.states()
    assert set(states) == dep.accepted  # every accepted message is in the store
    dep.national.mode = "ok"
    await dep.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        s != "callback_delivered" for s in dep.states().values()
    ):
        await asyncio.sleep(0.1)
    assert set(dep.states().values()) == {"callback_delivered"}


async def test_sigkill_between_upstream_answer_and_commit_delivers_again_and_answers_once(
    keys: Keys, tmp_path: Path
) -> None:
    """SIGKILL once the upstream has answered a sync exchange but before the gateway's one
    commit: nothing is recorded; the client's retry of the same message id reaches the
    upstream again under that id, gets one answer, and a later retry is its replay."""
    message_id = str(uuid.uuid4())
    answered, release = asyncio.Event(), asyncio.Event()

    @web.middleware
    async def hold_first_answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.headers.get("Gw-Message-Id") == message_id and not answered.is_set():
            answered.set()  # the upstream has done the work; its answer waits here
            await release.wait()
        return response

    async with deployed(keys, tmp_path, upstream_middleware=hold_first_answer) as dep:
        await dep.start()
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            client = ExchangeClient(
                member_id=PORTAL_ID,
                signer=Signer(keys.pairs["portal"]),
                base_url=dep.url,
                session=session,
            )
            first = asyncio.create_task(
                client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
            )
            await asyncio.wait_for(answered.wait(), 10)
            dep.kill()
            release.set()
            with pytest.raises(aiohttp.ClientError):
                await first
            assert message_id not in dep.states()  # the crash window: no trace of it
            await dep.start()
            retry = await client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
            assert retry.status == 200, retry.body
            assert "Gw-Replayed" not in retry.headers
            assert dep.national.received == [message_id, message_id]  # seen again, same id
            again = await client.exchange("credit.query", CREDIT_EXAMPLE, message_id=message_id)
            assert (again.status, again.headers.get("Gw-Replayed")) == (200, "true")
            assert again.body == retry.body
        assert dep.national.received == [message_id, message_id]
        assert dep.states() == {message_id: "answered"}
