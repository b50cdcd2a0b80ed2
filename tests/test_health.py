"""/healthz and /readyz: ready only with a writable store, keys and healthy adapters."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from gateway.exchange.app import READINESS, STORE
from gateway.store.sqlite import SQLiteStore
from tests.conftest import Harness, HarnessFactory


async def _ready(h: Harness) -> tuple[int, list[str]]:
    resp = await h.gateway.get("/readyz")
    body = await resp.json()
    assert body["status"] == ("ready" if resp.status == 200 else "not ready")
    reasons: list[str] = body["reasons"]
    return resp.status, reasons


async def test_healthz_and_readyz_answer_when_all_is_well(harness: Harness) -> None:
    """A fresh gateway is alive and ready, with no reasons given."""
    alive = await harness.gateway.get("/healthz")
    assert (alive.status, await alive.json()) == (200, {"status": "ok"})
    assert await _ready(harness) == (200, [])


async def test_readyz_503_while_the_store_refuses_writes(harness: Harness) -> None:
    """SQLite refusing writes on the live connection makes the gateway unready, then ready."""
    store = harness.app[STORE]
    assert isinstance(store, SQLiteStore)
    db = store.writer
    db.execute("PRAGMA query_only = ON")  # SQLite itself now refuses every write
    status, reasons = await _ready(harness)
    assert status == 503
    assert reasons == [
        "store: store write failed: the store is read-only (attempt to write a readonly database)"
    ]
    db.execute("PRAGMA query_only = OFF")
    assert await _ready(harness) == (200, [])


@pytest.fixture
def harness_store_url(request: pytest.FixtureRequest) -> str | None:
    """A SQLite file, unless the test asks for ``pg_url``: then its harness keeps its store
    in that PostgreSQL database."""
    if "pg_url" in request.fixturenames:
        url: str = request.getfixturevalue("pg_url")
        return url
    return None


async def _pg_read_only(url: str, on: bool) -> None:
    """Make the database refuse writes (or take them again), and end its sessions so the
    gateway's pool reconnects under the new default."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET default_transaction_read_only = off")  # this session writes
        name = await conn.fetchval("SELECT current_database()")
        change = (
            "SET default_transaction_read_only = on"
            if on
            else "RESET default_transaction_read_only"
        )
        await conn.execute(f'ALTER DATABASE "{name}" {change}')
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()


async def _ready_within(h: Harness, wanted: list[str], seconds: float = 10.0) -> list[str]:
    """Poll /readyz until its reasons are ``wanted`` (a pool reconnects in its own time)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        _, reasons = await _ready(h)
        if reasons == wanted or asyncio.get_running_loop().time() > deadline:
            return reasons
        await asyncio.sleep(0.05)


@pytest.mark.integration
async def test_readyz_names_a_read_only_postgresql_store_by_the_store_s_own_error(
    pg_url: str, harness: Harness
) -> None:
    """A PostgreSQL database turned read-only is reported as the store's StoreReadOnly
    (never a driver's class name such as ReadOnlySQLTransactionError), then ready again."""
    assert type(harness.app[STORE]).__name__ == "PostgresStore"
    assert await _ready(harness) == (200, [])
    await _pg_read_only(pg_url, on=True)
    reasons = await _ready_within(
        harness,
        [
            "store: store write failed: the store is read-only (cannot execute DELETE in a "
            "read-only transaction)"
        ],
    )
    assert reasons == [
        "store: store write failed: the store is read-only (cannot execute DELETE in a "
        "read-only transaction)"
    ]
    await _pg_read_only(pg_url, on=False)
    assert await _ready_within(harness, []) == []


async def test_readyz_503_while_the_store_is_closed(harness: Harness) -> None:
    """A closed store is not ready; reopened, the same file serves again."""
    store = harness.app[STORE]
    await store.close()
    status, reasons = await _ready(harness)
    assert (status, reasons) == (503, ["store: the store is not open"])
    await store.open()
    assert await _ready(harness) == (200, [])


async def test_readyz_follows_adapter_health_through_its_cache(harness: Harness) -> None:
    """An unhealthy platform turns readiness 503 once the cached answer expires, and back."""
    readiness = harness.app[READINESS]
    assert await _ready(harness) == (200, [])
    harness.national.mode = "error"  # its /health now answers 503
    assert await _ready(harness) == (200, [])  # the cached answer stands for ttl_s
    readiness.ttl_s = 0.0
    status, reasons = await _ready(harness)
    assert (status, reasons) == (503, ["adapter national: unhealthy (HTTP 503)"])
    harness.national.mode = "ok"
    assert await _ready(harness) == (200, [])


async def test_probes_share_one_round_of_health_checks(harness: Harness) -> None:
    """Within the cache's lifetime the platform's /health is asked once, however many probes."""
    readiness = harness.app[READINESS]
    readiness.ttl_s = 60.0
    first = await readiness.adapters()
    harness.national.mode = "error"
    for _ in range(5):
        assert await readiness.adapters() == first
    assert first["national"].healthy


async def test_an_adapter_outside_readiness_does_not_count(make_harness: HarnessFactory) -> None:
    """``readiness: false`` keeps a gateway ready (its outbox queues) while the platform is down."""

    def optional(doc: dict[str, Any]) -> None:
        doc["adapters"][0]["readiness"] = False

    h = await make_harness(optional)
    h.app[READINESS].ttl_s = 0.0
    h.national.mode = "error"
    assert await _ready(h) == (200, [])
    assert await h.app[READINESS].adapters() == {}


async def test_readyz_503_without_member_keys(make_harness: HarnessFactory) -> None:
    """A gateway that can verify no one is not ready."""

    def keyless(doc: dict[str, Any]) -> None:
        for member in doc["members"]:
            member["keys"] = []

    h = await make_harness(keyless)
    status, reasons = await _ready(h)
    assert (status, reasons) == (503, ["keys: no member key is loaded; no request can be verified"])


async def test_a_silent_health_endpoint_times_out(make_harness: HarnessFactory) -> None:
    """A health endpoint that accepts and never answers counts as unhealthy after the timeout."""
    stalled: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # keep the connection open, say nothing

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def silent(doc: dict[str, Any]) -> None:
        doc["adapters"][0]["config"]["health_url"] = f"http://127.0.0.1:{port}/health"

    try:
        h = await make_harness(silent)
        h.app[READINESS].timeout_s = 0.2
        status, reasons = await _ready(h)
        assert (status, reasons) == (503, ["adapter national: unhealthy (no answer within 0.2 s)"])
    finally:
        for writer in stalled:
            writer.close()
        server.close()
        await server.wait_closed()


async def _on_database(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET default_transaction_read_only = off")  # this session may write
        await conn.execute(sql)
        # Sessions take the database's defaults when they start: end the gateway's.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()


def _read_only(reason: str) -> bool:
    # SQLSTATE 25006, as asyncpg names it or as PostgreSQL words it
    return "ReadOnlySQLTransaction" in reason or "read-only transaction" in reason


async def test_readyz_503_while_postgresql_is_read_only_then_ready_again(
    make_harness: HarnessFactory, pg_url: str
) -> None:
    """A read-only PostgreSQL (a replica, a server in recovery: every transaction read-only)
    takes the instance out of rotation; once writable again, it is ready again."""

    def on_postgres(doc: dict[str, Any]) -> None:
        doc["store"]["url"] = pg_url

    h = await make_harness(on_postgres)
    assert await _ready(h) == (200, [])
    database = pg_url.rsplit("/", 1)[1]
    await _on_database(
        pg_url, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'
    )
    reasons: list[str] = []
    for _ in range(50):  # the first probe may meet a connection that was just ended
        status, reasons = await _ready(h)
        if status == 503 and any(_read_only(r) for r in reasons):
            break
        await asyncio.sleep(0.1)
    assert any(r.startswith("store: ") and _read_only(r) for r in reasons), reasons
    await _on_database(
        pg_url, f'ALTER DATABASE "{database}" SET default_transaction_read_only = off'
    )
    for _ in range(50):
        if await _ready(h) == (200, []):
            break
        await asyncio.sleep(0.1)
    assert await _ready(h) == (200, [])
