"""``gateway store migrate|import``: prepare a PostgreSQL store, move a SQLite one into it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from gateway.audit import verify_store
from gateway.cli._common import load, with_config
from gateway.config import Config
from gateway.errors import StoreError
from gateway.store import store_url
from gateway.store.postgres import PostgresStore, migrate

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``store migrate|import`` to the ``gateway`` parser."""
    store = sub.add_parser("store", help="the PostgreSQL store: migrations, moving in")
    actions = store.add_subparsers(dest="action", required=True)

    with_config(
        actions.add_parser(
            "migrate", help="apply the schema migrations (the gateway also does at start)"
        )
    ).set_defaults(func=cmd_migrate)
    imp = with_config(
        actions.add_parser(
            "import", help="copy a SQLite store into the (empty) configured PostgreSQL store"
        )
    )
    imp.add_argument("--from", dest="source", required=True, metavar="PATH", help="SQLite file")
    imp.set_defaults(func=cmd_import)


def _postgres(config: Config) -> str:
    url = store_url(config.store)
    if url is None:
        raise StoreError(
            "no PostgreSQL store configured: set store.url or GATEWAY_STORE_URL "
            "(the SQLite store migrates itself when opened)"
        )
    return url


def cmd_migrate(args: argparse.Namespace) -> int:
    config = load(args)
    url = _postgres(config)

    async def run() -> list[int]:
        store = PostgresStore(url, instance="migrate", migrate=False)
        try:
            pool = await store.open_pool()
            async with pool.acquire() as conn:
                return await migrate(conn)
        finally:
            await store.close()

    applied = asyncio.run(run())
    print(f"applied migrations {applied}" if applied else "the schema is up to date")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from gateway.cli.audit import gateway_jwks
    from gateway.store.importer import import_sqlite

    config = load(args)
    url = _postgres(config)
    jwks = gateway_jwks(config)

    async def run() -> int:
        store = PostgresStore(url, instance="import")
        await store.open()
        try:
            counts = await import_sqlite(Path(args.source), store)
            report = await verify_store(store, jwks, gateway=config.gateway.member_id)
        finally:
            await store.close()
        print(", ".join(f"{table} {n}" for table, n in counts.items()))
        if report.ok:
            print(f"OK: the chain verifies in PostgreSQL ({report.records} records)")
            return 0
        print(f"BROKEN after import: {report.first}", file=sys.stderr)
        return 1

    return asyncio.run(run())
