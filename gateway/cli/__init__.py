"""The ``gateway`` command line: ``main`` assembles one parser from a module per group.

=========================================  ==========================================
command                                    module
=========================================  ==========================================
``serve``, ``up``, ``demo``                :mod:`gateway.cli.serve`
``check``, ``config export``               :mod:`gateway.cli.config`
``keygen``, ``keys rotate``                :mod:`gateway.cli.keys`
``log show``                               :mod:`gateway.cli.log`
``dead-letters list|redeliver``            :mod:`gateway.cli.dead_letters`
``admin token create|list|revoke``         :mod:`gateway.cli.tokens` (store-direct)
``admin adapters|members|keys|services|``  :mod:`gateway.cli.admin` (the admin API)
``routes|acl|messages|dead-letters|``
``audit|tokens …``
``audit verify|export|check|purge``        :mod:`gateway.cli.audit`
``directory sign|show|verify``             :mod:`gateway.cli.directory`
``conformance``                            :mod:`gateway.cli.conformance`
``certs ca|issue|revoke``                  :mod:`gateway.cli.certs`
=========================================  ==========================================

:mod:`gateway.cli._common` holds what they share: ``--config``, the store a command opens
and closes (``open_store``), and the one table renderer (CJK-wide aware).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway.cli import (
    admin,
    audit,
    certs,
    config,
    conformance,
    dead_letters,
    directory,
    keys,
    log,
    serve,
    store,
    tokens,
)
from gateway.errors import ConfigError, GatewayError
from gateway.observe.logs import configure_logging

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Data exchange gateway for cross-regional government service interop.",
    )
    parser.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING (default: the config's logging.level, or INFO)"
    )
    parser.add_argument(
        "--log-format",
        choices=["json", "text"],
        help="default: the config's logging.format, or text",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve.register(sub)
    config.register(sub)
    keys.register(sub)
    log.register(sub)
    dead_letters.register(sub)
    adm = sub.add_parser("admin", help="administer a gateway (tokens here; the rest via the API)")
    adm_sub = adm.add_subparsers(dest="area", required=True)
    tokens.register(adm_sub)
    admin.register(adm_sub)
    audit.register(sub)
    directory.register(sub)
    store.register(sub)
    conformance.register(sub)
    certs.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=args.log_level or "INFO", fmt=args.log_format or "text")
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config: {problem}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    return result
