"""Several instances on one PostgreSQL database (PROTOCOL.md § Several instances): three
real ``gateway serve`` processes sharing one config file (each its own ``--listen``
ports), the national platform and the portal in-process, the suite's own PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestServer

from gateway.admin import create_token
from gateway.config.model import parse_config
from gateway.exchange.client import ExchangeClient
from gateway.signing import Signer
from gateway.store import create_store
from simulators.national import NationalPlatform, create_national_app
from simulators.portal import Portal, create_portal_app
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    NATIONAL_ID,
    PORTAL_ID,
    TAX_ID,
    Keys,
    config_document,
    unused_port,
)
from tests.pg import PostgresServer

MIGRATIONS = Path(__file__).resolve().parent.parent / "gateway" / "store" / "migrations"


@dataclass
class Instances:
    """N gateway processes on one database, started and stopped together."""

    config_path: Path
    db_url: str
    urls: list[str]
    admin_urls: list[str]
    national: NationalPlatform
    portal: Portal
    logs: list[Path]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def launch(self) -> None:
        """Start every instance at the same moment (no waiting for one another)."""
        for url, admin, log in zip(self.urls, self.admin_urls, self.logs, strict=True):
            with log.open("ab") as out:
                command = [sys.executable, "-m", "gateway.cli", "serve"]
                listen = ["--listen", url.removeprefix("http://")]
                listen += ["--admin-listen", admin.removeprefix("http://")]
                self.processes.append(
                    subprocess.Popen(
                        [*command, "--config", str(self.config_path), *listen],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    async def ready(self) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            for i, url in enumerate(self.urls):
                while True:
                    assert self.processes[i].poll() is None, self.logs[i].read_text()[-3000:]
                    assert time.monotonic() < deadline, f"instance {i} never became ready"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{url}/readyz") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.05)

    def kill(self, i: int) -> None:
        self.processes[i].send_signal(signal.SIGKILL)
        self.processes[i].wait()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def client(self, i: int, session: aiohttp.ClientSession, keys: Keys) -> ExchangeClient:
        return ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(keys.pairs["portal"]),
            base_url=self.urls[i],
            session=session,
        )

    async def fetch(self, sql: str) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.db_url)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    async def states(self) -> dict[str, str]:
        rows = await self.fetch("SELECT message_id, state FROM messages")
        return {r["message_id"]: r["state"] for r in rows}

    async def admin_token(self) -> str:
        doc = yaml.safe_load(self.config_path.read_text())
        store = create_store(parse_config(doc, base=self.config_path.parent).store)
        await store.open()
        try:
            return await create_token(store, f"admin-{uuid.uuid4().hex[:8]}", "admin")
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def instances(
    keys: Keys, tmp_path: Path, db_url: str, count: int = 3
) -> AsyncIterator[Instances]:
    nat_port, portal_port = unused_port(), unused_port()
    urls = [f"http://127.0.0.1:{unused_port()}" for _ in range(count)]
    doc = config_document(
        keys, store=tmp_path / "unused.db", national_url=f"http://127.0.0.1:{nat_port}"
    )
    doc["store"]["url"] = db_url
    # The file's listeners are nobody's: each instance is told its own (--listen).
    doc["listen"] = {
        "ingress": {"host": "127.0.0.1", "port": unused_port()},
        "admin": {"host": "127.0.0.1", "port": unused_port()},
    }
    doc["members"][0]["callback_url"] = f"http://127.0.0.1:{portal_port}/callbacks"
    doc["delivery"].update({"max_attempts": 100, "shutdown_grace_s": 3})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    gateway_keys = keys.verification("gateway")
    # Callbacks go to instance 0 (the platform knows one gateway URL); never kill it.
    national = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted=gateway_keys,
        callback_base=urls[0],
        callback_delay_s=0.05,
    )
    portal = Portal(
        member_id=PORTAL_ID,
        keypair=keys.pairs["portal"],
        gateway_keys=gateway_keys,
        gateway_url=urls[0],
    )
    servers = [
        TestServer(create_national_app(national), port=nat_port),
        TestServer(create_portal_app(portal), port=portal_port),
    ]
    for server in servers:
        await server.start_server()
    group = Instances(
        config_path=config_path,
        db_url=db_url,
        urls=urls,
        admin_urls=[f"http://127.0.0.1:{unused_port()}" for _ in range(count)],
        national=national,
        portal=portal,
        logs=[tmp_path / f"gw{i}.log" for i in range(count)],
    )
    try:
        group.launch()
        await group.ready()
        yield group
    finally:
        group.stop()
        for server in servers:
            await server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trio(
    keys: Keys, tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresServer
) -> AsyncIterator[Instances]:
    """Three instances started at once on a fresh database, shared by the tests that leave
    them running (starting three processes costs seconds on a loaded machine)."""
    with pg_server.database() as url:
        async with instances(keys, tmp_path_factory.mktemp("trio"), url) as group:
            yield group


@pytest.fixture
async def doomed_trio(
    keys: Keys, tmp_path: Path, pg_server: PostgresServer
) -> AsyncIterator[Instances]:
    """Three instances of which the test kills one."""
    with pg_server.database() as url:
        async with instances(keys, tmp_path, url) as group:
            yield group


shared_trio = pytest.mark.asyncio(loop_scope="module")


@shared_trio
async def test_three_instances_started_at_once_migrate_once_and_begin_one_chain(
    trio: Instances,
) -> None:
    """Started in the same instant on an empty database: each migration applied once, one
    genesis record in the message log, and all three ready."""
    applied = await trio.fetch("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in applied] == list(
        range(1, len(list(MIGRATIONS.glob("*.sql"))) + 1)
    )
    genesis = await trio.fetch("SELECT seq FROM log_chain WHERE kind = 'genesis'")
    assert len(genesis) == 1


@shared_trio
async def test_one_id_sent_to_all_three_at_once_is_one_row(trio: Instances, keys: Keys) -> None:
    """100 ids, each sent to the three instances at the same moment: one row per id; each
    twin gets the stored outcome (Gw-Replayed) or 409 in flight, never a 5xx."""
    async with aiohttp.ClientSession() as session:
        clients = [trio.client(i, session, keys) for i in range(3)]
        ids = [str(uuid.uuid4()) for _ in range(100)]
        replies = await asyncio.gather(
            *(
                c.exchange("credit.query", CREDIT_EXAMPLE, message_id=i)
                for i in ids
                for c in clients
            )
        )
    statuses = [r.status for r in replies]
    assert set(statuses) <= {200, 409}, sorted(set(statuses))
    for k in range(0, len(replies), 3):
        assert (
            sum(r.status == 200 and "Gw-Replayed" not in r.headers for r in replies[k : k + 3]) == 1
        )
    rows = await trio.fetch("SELECT message_id FROM messages")
    assert sorted(r["message_id"] for r in rows) == sorted(ids)


@shared_trio
async def test_a_key_revoked_on_one_instance_is_refused_by_the_others_within_a_second(
    trio: Instances, keys: Keys
) -> None:
    """The revocation is written through instance 0; instances 1 and 2, which took no admin
    request, refuse the key (401 key_unknown, where it was 403 before) within 1 s."""
    token = await trio.admin_token()
    kid = keys.pairs["tax"].kid
    async with aiohttp.ClientSession() as session:
        others = [
            ExchangeClient(
                member_id=TAX_ID,
                signer=Signer(keys.pairs["tax"]),
                base_url=trio.urls[i],
                session=session,
            )
            for i in (1, 2)
        ]
        before = [await c.exchange("credit.query", CREDIT_EXAMPLE) for c in others]
        assert [r.status for r in before] == [403, 403]  # known, but not allowed the service
        url = f"{trio.admin_urls[0]}/admin/v1/members/{TAX_ID}/keys/{kid}"
        async with session.delete(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 204, await resp.text()
        revoked_at = time.monotonic()
        for client in others:
            while (reply := await client.exchange("credit.query", CREDIT_EXAMPLE)).status == 403:
                assert time.monotonic() - revoked_at < 1.0, "the key still worked after 1 s"
                await asyncio.sleep(0.02)
            assert (reply.status, reply.json()["code"]) == (401, "key_unknown")
        print(f"instances 1 and 2 refused the key {time.monotonic() - revoked_at:.3f} s after")
        later = await asyncio.gather(
            *(c.exchange("credit.query", CREDIT_EXAMPLE) for c in others for _ in range(20))
        )
        assert {r.status for r in later} == {401}


async def _accept(client: ExchangeClient, accepted: set[str]) -> None:
    """Send one application until it is acknowledged (the same id each time)."""
    message_id = str(uuid.uuid4())
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            reply = await client.exchange("crossregion.apply", APPLY_EXAMPLE, message_id=message_id)
            if reply.status == 202:
                accepted.add(message_id)
                return
            assert reply.status >= 500 or reply.status == 409, reply.body
        await asyncio.sleep(0.05)


async def test_an_instance_killed_mid_delivery_loses_nothing(
    doomed_trio: Instances, keys: Keys
) -> None:
    """Round-robin load on three instances, one SIGKILLed while its deliveries are in
    flight and left dead: every 202 ends callback_delivered and reached the national
    platform at least once; the message log verifies."""
    trio = doomed_trio
    trio.national.mode = "slow"
    trio.national.delay_s = 1.0
    accepted: set[str] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        clients = [trio.client(i, session, keys) for i in range(3)]
        await asyncio.gather(*(_accept(clients[k % 3], accepted) for k in range(45)))
        # Deliveries are in flight at the slow platform: wait (bounded) until each instance
        # holds leases, as a loaded machine may start one instance's outbox later.
        deadline = time.monotonic() + 10
        owners: list[asyncpg.Record] = []
        while len(owners) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            owners = await trio.fetch(
                "SELECT DISTINCT lease_owner FROM messages WHERE state = 'delivering'"
            )
        # Every instance holds leases, the one about to die included.
        assert len(owners) == 3, "not every instance was delivering: the kill proves little"
        trio.kill(2)
        await asyncio.gather(*(_accept(clients[k % 2], accepted) for k in range(20)))
    trio.national.mode = "ok"
    assert len(accepted) == 65
    # A dead instance's leases expire (30 s) and another instance takes its messages over.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = await trio.states()
        if all(states.get(i) == "callback_delivered" for i in accepted):
            break
        await asyncio.sleep(0.5)
    states = await trio.states()
    lost = {i: states.get(i) for i in accepted if states.get(i) != "callback_delivered"}
    assert lost == {}, f"{len(lost)} of {len(accepted)} not delivered: {list(lost.items())[:5]}"
    assert accepted <= set(trio.national.received)
    assert all(trio.portal.seen[i] >= 1 for i in accepted)
    verify = await asyncio.create_subprocess_exec(
        *(
            sys.executable,
            "-m",
            "gateway.cli",
            "audit",
            "verify",
            "--config",
            str(trio.config_path),
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await verify.communicate()
    assert verify.returncode == 0, output.decode()
