"""The suite's own PostgreSQL (tests/pg.py): it starts, and each test gets a fresh database."""

from __future__ import annotations

import asyncpg


async def test_each_test_gets_its_own_empty_database(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        await conn.execute("CREATE TABLE scratch (x int)")
        fsync = await conn.fetchval("SHOW fsync")
    finally:
        await conn.close()
    assert tables == 0
    assert fsync == "off"


async def test_a_second_database_does_not_see_the_first(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        found = await conn.fetchval("SELECT to_regclass('public.scratch') IS NOT NULL")
    finally:
        await conn.close()
    assert found is False
