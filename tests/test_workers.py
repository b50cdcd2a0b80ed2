"""``gateway serve --workers N``: real processes sharing one port and one store."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.client import ExchangeClient
from gateway.signing import Signer
from tests.conftest import APPLY_EXAMPLE, CREDIT_EXAMPLE, PORTAL_ID, Keys
from tests.test_crash import Deployment
from tests.test_crash import deployment as deployment

pytestmark = pytest.mark.integration  # starts gateway processes


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _states(db: Path) -> dict[str, str]:
    with sqlite3.connect(db, timeout=10) as conn:
        return dict(conn.execute("SELECT message_id, state FROM messages").fetchall())


async def test_two_workers_share_port_and_store(deployment: Deployment, keys: Keys) -> None:
    """Two workers answer on one port; async work from both reaches callback_delivered once."""
    dep = deployment
    await dep.start(workers=2)
    assert dep.process is not None
    workers = _children(dep.process.pid)
    assert len(workers) == 2
    async with aiohttp.ClientSession() as session:
        client = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(keys.pairs["portal"]),
            base_url=dep.url,
            session=session,
        )
        sync = await asyncio.gather(
            *(client.exchange("credit.query", CREDIT_EXAMPLE) for _ in range(40))
        )
        assert {r.status for r in sync} == {200}
        replies = await asyncio.gather(
            *(client.exchange("crossregion.apply", APPLY_EXAMPLE) for _ in range(40))
        )
        assert {r.status for r in replies} == {202}
        ids = {r.json()["message_id"] for r in replies}

        # A worker killed outright is replaced, and the service goes on.
        os.kill(workers[1], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            current = _children(dep.process.pid)
            if len(current) == 2 and workers[1] not in current:
                break
            await asyncio.sleep(0.1)
        assert len(_children(dep.process.pid)) == 2
        again = await asyncio.gather(
            *(client.exchange("credit.query", CREDIT_EXAMPLE) for _ in range(20))
        )
        assert {r.status for r in again} == {200}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = _states(dep.db_path)
        if all(states.get(i) == "callback_delivered" for i in ids):
            break
        await asyncio.sleep(0.2)
    states = _states(dep.db_path)
    assert {states.get(i) for i in ids} == {"callback_delivered"}
    assert all(dep.portal.seen[i] >= 1 for i in ids)
    dep.process.send_signal(signal.SIGTERM)
    assert await asyncio.get_running_loop().run_in_executor(None, dep.process.wait) == 0
