"""``gateway store migrate|import|rekey``: prepare a PostgreSQL store, move a SQLite one
into it, rotate the data key that seals stored secrets (or re-wrap it with a new KEK)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from gateway.audit import verify_store
from gateway.cli._common import load, with_config
from gateway.config.model import Config, SecretsConfig
from gateway.config.secretstore import CIPHERS, KeyEncryptionKey, SecretBox
from gateway.errors import StoreError
from gateway.store import create_store, store_url
from gateway.store.postgres import PostgresStore, migrate

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``store migrate|import`` to the ``gateway`` parser."""
    store = sub.add_parser(
        "store", help="the store: PostgreSQL migrations and moving in; rekeying its secrets"
    )
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
    rekey = with_config(
        actions.add_parser(
            "rekey",
            help="a new data key: stored secrets re-encrypted with it (old ones stay readable); "
            "or, with --new-kek-*, every data key re-wrapped with a new key-encryption key",
        )
    )
    rekey.add_argument("--cipher", choices=CIPHERS, help="the new data key's AEAD")
    new_kek = rekey.add_mutually_exclusive_group()
    new_kek.add_argument(
        "--new-kek-file",
        metavar="PATH",
        help="re-wrap with this KEK file (created, 0600, if missing)",
    )
    new_kek.add_argument("--new-kek-env", metavar="NAME", help="re-wrap with the KEK in $NAME")
    rekey.set_defaults(func=cmd_rekey)


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


def cmd_rekey(args: argparse.Namespace) -> int:
    """Either a new current data key and every stored secret re-encrypted with it (the old
    keys stay, so a record not yet re-encrypted, or written meanwhile by a gateway that
    had not seen the new key, stays readable), or a new KEK wrapping every data key."""
    config = load(args)

    async def run() -> None:
        store = create_store(config.store)
        box = SecretBox(store, config.secrets)  # the configured KEK must exist already
        store.use_secrets(box)
        await store.open()
        try:
            await box.load()
            if args.new_kek_file or args.new_kek_env:
                target = SecretsConfig(
                    kek_file=Path(args.new_kek_file) if args.new_kek_file else None,
                    kek_env=args.new_kek_env,
                )
                kek = KeyEncryptionKey.load(target, create=bool(args.new_kek_file))
                keys = box.rewrapped(kek)
                await store.rewrap_data_keys(keys)
                where = args.new_kek_file or f"env {args.new_kek_env}"
                print(
                    f"re-wrapped {len(keys)} data key(s) with key-encryption key {kek.id}: "
                    f"set secrets.kek to {where} and restart the gateways"
                )
                return
            key = await box.rotate(args.cipher)
            count = await store.reseal()
            print(
                f"data key {key.key_id} (generation {key.generation}, {key.alg}) is current; "
                f"{count} stored value(s) re-encrypted with it"
            )
        finally:
            await store.close()

    asyncio.run(run())
    return 0
