"""``gateway check`` (validate a configuration) and ``gateway config export`` (the live
configuration: the file with the admin API's changes, as YAML)."""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
from pathlib import Path
from typing import Any

from gateway.cli._common import load, open_store, with_config
from gateway.config.model import warnings_of
from gateway.config.secrets import redact_document
from gateway.errors import ConfigError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    with_config(sub.add_parser("check", help="validate the configuration")).set_defaults(
        func=cmd_check
    )
    cfg = sub.add_parser("config", help="the live configuration")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    ex = with_config(cfg_sub.add_parser("export", help="print file + admin changes as YAML"))
    ex.add_argument(
        "--out",
        help="write to this file (mode 0600, secrets included) instead of stdout (secrets as "
        "placeholders)",
    )
    ex.set_defaults(func=cmd_config_export)


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.config.secretstore import KeyEncryptionKey
    from gateway.runtime.registry import check_adapter_config

    try:
        config = load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.config}:{problem}")
        print(f"{len(exc.problems)} problem(s)")
        return 1
    problems: list[str] = []
    for i, adapter in enumerate(config.adapters):
        problems += check_adapter_config(adapter.type, adapter.config, f"/adapters/{i}")
    key_path = config.gateway.key_path
    if key_path is not None and not key_path.exists():
        problems.append(f"/gateway/key: {key_path} does not exist (gateway keygen)")
    # A KEK file not there yet is made by the first start of a fresh store; one that is
    # there must be usable, and a KEK in the environment must be set.
    if config.secrets.kek_file is None or config.secrets.kek_file.exists():
        try:
            KeyEncryptionKey.load(config.secrets)
        except ConfigError as exc:
            problems += exc.problems
    for problem in problems:
        print(f"{args.config}:{problem}")
    for warning in warnings_of(config):
        print(f"{args.config}:{warning} [warning]")
    if problems:
        print(f"{len(problems)} problem(s)")
        return 1
    print(
        f"{args.config}: OK ({len(config.members)} members, {len(config.services)} services, "
        f"{len(config.adapters)} adapters, {len(config.routes)} routes)"
    )
    return 0


def cmd_config_export(args: argparse.Namespace) -> int:
    """The live configuration (file + admin changes) as YAML that `gateway serve` accepts."""
    import yaml

    from gateway.config.model import parse_config
    from gateway.runtime.live import merge

    config = load(args)

    async def run() -> dict[str, Any]:
        async with open_store(config) as store:
            return merge(config.raw, await store.load_overlay())

    doc = asyncio.run(run())
    parse_config(copy.deepcopy(doc), base=config.base, path=config.path)  # it must load
    if args.out:
        # A file the gateway can run from holds the secrets it needs, readable by its owner
        # only; what goes to a terminal (or a pipe, a CI log) never does.
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
        out = Path(args.out)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        out.chmod(0o600)
    else:
        shown = redact_document(doc)
        if shown != doc:
            print("# secrets are shown as placeholders (set · fingerprint); --out writes them")
        print(yaml.safe_dump(shown, allow_unicode=True, sort_keys=False), end="")
    return 0
