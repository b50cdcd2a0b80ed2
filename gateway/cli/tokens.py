"""``gateway admin token create|list|revoke``: admin API tokens, straight in the store,
so that the first token needs no API (the other ``gateway admin`` areas go through the
API: :mod:`gateway.cli.admin`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from gateway.cli._common import load, open_store, table, with_config
from gateway.encoding import iso_utc
from gateway.store import ResourceChange

__all__ = ["register"]


def register(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``token …`` to ``gateway admin``."""
    tok = admin.add_parser("token", help="admin API tokens (stored as hashes)")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    tc = with_config(tok_sub.add_parser("create", help="create a token and print it once"))
    tc.add_argument("--name", required=True)
    tc.add_argument("--role", required=True, choices=["admin", "operator", "auditor"])
    tc.set_defaults(func=cmd_token)
    tl = with_config(tok_sub.add_parser("list", help="list tokens (never their values)"))
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(func=cmd_token)
    tr = with_config(tok_sub.add_parser("revoke", help="revoke a token"))
    tr.add_argument("name")
    tr.set_defaults(func=cmd_token)


def _change(
    action: str,
    name: str,
    *,
    before: dict[str, str] | None = None,
    after: dict[str, str] | None = None,
) -> ResourceChange:
    return ResourceChange(
        kind="tokens", id=name, action=action, actor="cli", role="local", before=before, after=after
    )


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.admin.auth import create_token

    config = load(args)

    async def run() -> int:
        async with open_store(config) as store:
            if args.action == "create":
                token = await create_token(store, args.name, args.role)
                await store.record_change(
                    _change("create", args.name, after={"name": args.name, "role": args.role})
                )
                print(token)
                print(
                    f"token {args.name!r} ({args.role}) created; it is shown only once",
                    file=sys.stderr,
                )
                return 0
            if args.action == "revoke":
                if not await store.revoke_token(args.name):
                    print(f"no active token {args.name}", file=sys.stderr)
                    return 1
                await store.record_change(_change("revoke", args.name, before={"name": args.name}))
                print(f"token {args.name!r} revoked")
                return 0
            rows = await store.list_tokens()
            if args.json:
                print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
                return 0
            cells = [
                [r.name, r.role, iso_utc(r.created_at),
                 iso_utc(r.revoked_at) if r.revoked_at else "-"]
                for r in rows
            ]  # fmt: skip
            print(table(("NAME", "ROLE", "CREATED", "REVOKED"), cells))
            return 0

    return asyncio.run(run())
