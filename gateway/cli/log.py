"""``gateway log show ID``: one exchange from the store, as the admin API shows it
(``gateway.admin.views.message_view``: personal data masked), its times in ISO 8601."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
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
            from gateway.live import merge

            sensitive = _sensitive(merge(config.raw, await store.load_overlay()))
            for r in records:
                # The admin API's view; its Unix times shown as ISO 8601 for a person.
                out = message_view(r, sensitive.get(r.service, []))
                for key in ("created_at", "updated_at"):
                    out[key] = iso_utc(out[key])
                print(json.dumps(out, ensure_ascii=False, indent=2))
            return 0

    return asyncio.run(run())
