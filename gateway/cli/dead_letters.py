"""``gateway dead-letters list|redeliver``: the outbox's dead letters, straight from the
store (``gateway admin dead-letters`` does the same through the admin API)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from gateway.admin.views import dead_letter_view
from gateway.cli._common import load, open_store, table, with_config

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dl = sub.add_parser("dead-letters", help="list or redeliver dead letters")
    dl_sub = dl.add_subparsers(dest="action", required=True)
    ls = with_config(dl_sub.add_parser("list", help="list dead letters"))
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_dead_letters)
    rd = with_config(dl_sub.add_parser("redeliver", help="put one dead letter back in the outbox"))
    rd.add_argument("kind", choices=["message", "callback"])
    rd.add_argument("seq", type=int)
    rd.set_defaults(func=cmd_dead_letters)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    config = load(args)

    async def run() -> int:
        async with open_store(config) as store:
            if args.action == "list":
                rows = [dead_letter_view(r) for r in await store.dead_letters(limit=args.limit)]
                if args.json:
                    print(json.dumps(rows, ensure_ascii=False, indent=2))
                    return 0
                headers = ("KIND", "SEQ", "MESSAGE ID", "SERVICE", "ATTEMPTS", "ERROR")
                cells = [
                    [r["kind"], str(r["seq"]), r["message_id"], r["service"],
                     str(r["attempts"]), r["error"] or ""]
                    for r in rows
                ]  # fmt: skip
                noun = ("dead letter(s)", "dead letter(s)")
                print(table(headers, cells, noun, right=("SEQ", "ATTEMPTS")))
                return 0
            ok = await store.redeliver(args.kind, args.seq, time.time())
            print("queued for redelivery" if ok else f"no dead {args.kind} {args.seq}")
            return 0 if ok else 1

    return asyncio.run(run())
