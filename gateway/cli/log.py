"""``gateway log show ID``: one exchange from the store, as the admin API shows it
(``gateway.admin.views.message_view``: personal data masked), its times in ISO 8601.
``gateway log archive --older-than DURATION --to DIR``: move the oldest records to signed
archive files (gateway/audit/archive.py, docs/audit.md "Archives")."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.admin.views import message_view
from gateway.cli._common import load, open_store, with_config
from gateway.encoding import iso_utc

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lg = sub.add_parser("log", help="read the message log")
    lg_sub = lg.add_subparsers(dest="action", required=True)
    show = with_config(lg_sub.add_parser("show", help="print one exchange"))
    show.add_argument("id", help="message id")
    show.set_defaults(func=cmd_log_show)

    archive = with_config(
        lg_sub.add_parser(
            "archive",
            help="move records older than DURATION to signed archive files in DIR (one per "
            "day, split past --max-mb); the store keeps them until each file is verified",
        )
    )
    archive.add_argument(
        "--older-than", required=True, type=duration, metavar="DURATION", help="e.g. 30d, 12h"
    )
    archive.add_argument("--to", required=True, metavar="DIR", help="where archive files go")
    archive.add_argument("--max-mb", type=float, default=64.0, help="split files past this size")
    archive.add_argument(
        "--hook",
        metavar="COMMAND",
        help="run COMMAND ARCHIVE_FILE for each new archive (a transfer), retried 3 times",
    )
    archive.set_defaults(func=cmd_log_archive)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w``: seconds (argparse type)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30d or 12h")
    return float(match[1]) * _UNITS[match[2]]


def _sensitive(doc: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each service's sensitive JSON Pointers, in the file with the admin changes."""
    return {s["code"]: list(s.get("sensitive", [])) for s in doc.get("services", [])}


def cmd_log_show(args: argparse.Namespace) -> int:
    config = load(args)

    async def run() -> int:
        async with open_store(config) as store:
            records = await store.find_by_message_id(args.id.lower())
            if not records:
                print(f"no message {args.id}", file=sys.stderr)
                return 1
            from gateway.runtime.live import merge

            sensitive = _sensitive(merge(config.raw, await store.load_overlay()))
            for r in records:
                # The admin API's view; its Unix times shown as ISO 8601 for a person.
                out = message_view(r, sensitive.get(r.service, []))
                for key in ("created_at", "updated_at"):
                    out[key] = iso_utc(out[key])
                print(json.dumps(out, ensure_ascii=False, indent=2))
            return 0

    return asyncio.run(run())


def cmd_log_archive(args: argparse.Namespace) -> int:
    from gateway.audit.retention import archive_now, run_hook
    from gateway.cli.audit import gateway_jwks
    from gateway.crypto.keys import load_gateway_keypair

    config = load(args)
    jwks = gateway_jwks(config)
    keypair = load_gateway_keypair(config.gateway)

    async def run() -> int:
        async with open_store(config) as store:
            done = await archive_now(
                store,
                keypair,
                jwks,
                gateway=config.gateway.member_id,
                to=Path(args.to),
                older_than_s=args.older_than,
                max_bytes=int(args.max_mb * 1024 * 1024),
            )
        if not done.cut:
            print(f"nothing archived: {done.reason}")
            return 0 if not done.files else 1
        print(
            f"archived {done.records} chain records and {done.rows} rows into "
            f"{len(done.files)} file(s), {done.bytes} bytes, in {args.to}"
        )
        failed = 0
        for path in done.files:
            print(f"  {path.name}")
            if args.hook and not run_hook(args.hook, path):
                failed += 1
        if failed:
            print(f"{failed} archive(s) not transferred; they stay in {args.to}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(run())
