"""What every command group shares: the ``--config`` option, the store a command opens
and closes, and the one table renderer (wide CJK characters counted as two columns)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import unicodedata
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from gateway.config.model import Config, load_config
from gateway.config.secretstore import SecretBox
from gateway.crypto.keys import KEY_TYPE_NAMES, KeyType
from gateway.store import Store, create_store

__all__ = [
    "add_alg_option",
    "load",
    "open_store",
    "plural",
    "read_json",
    "table",
    "width",
    "with_config",
]

DEFAULT_CONFIG = "config.yaml"


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config`` (default ``config.yaml``) to a command."""
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )
    return parser


class _KeyTypeAction(argparse.Action):
    """Stores the key type an ``--alg`` names (``sm2-sm3`` → ``sm2``)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, KEY_TYPE_NAMES[str(values)])


def add_alg_option(
    parser: argparse.ArgumentParser, help: str, default: KeyType | None = None
) -> None:
    """``--alg`` (alias ``--type``): a key type or the RFC 9421 algorithm of its keys
    (``ed25519``, ``ecdsa-p256[-sha256]``, ``rsa-pss[-sha512]``, ``sm2[-sm3]``), stored
    as the key type in ``args.type``."""
    parser.add_argument(
        "--alg",
        "--type",
        dest="type",
        choices=KEY_TYPE_NAMES,
        default=default,
        action=_KeyTypeAction,
        help=help,
    )


def load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


@contextlib.asynccontextmanager
async def open_store(config: Config, *, readonly: bool = False) -> AsyncIterator[Store]:
    """The configured store (SQLite or PostgreSQL), open for one command and closed after
    it; ``readonly`` (reports): never migrated or created."""
    store = create_store(config.store, readonly=readonly)
    # The key-encryption key is read when a stored secret is first needed, not before.
    store.use_secrets(SecretBox(store, config.secrets))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def read_json(path: str, error: Callable[[str], Exception]) -> Any:
    """A JSON document from a file, or from stdin for ``-``; raises ``error(detail)`` (each
    command group its own kind) when it cannot be read or is not JSON."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        return json.loads(text)
    except OSError as exc:
        raise error(f"{path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not a JSON document ({exc})") from exc


def width(text: str) -> int:
    """Columns on a terminal: CJK wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def plural(n: int, noun: tuple[str, str]) -> str:
    return f"{n} {noun[0] if n == 1 else noun[1]}"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    noun: tuple[str, str] | None = None,
    *,
    right: Collection[str] = (),
) -> str:
    """Columns two spaces apart (left-aligned; those named in ``right`` right-aligned),
    then a count line when ``noun`` (singular, plural) is given."""
    cells = [[" ".join(c.split()) for c in row] for row in (headers, *rows)]
    widths = [max(width(row[i]) for row in cells) for i in range(len(headers))]
    flush = [h in right for h in headers]

    def pad(cell: str, w: int, to_right: bool) -> str:
        fill = " " * (w - width(cell))
        return fill + cell if to_right else cell + fill

    lines = [
        "  ".join(pad(c, w, r) for c, w, r in zip(row, widths, flush, strict=True)).rstrip()
        for row in cells
    ]
    return "\n".join([*lines, plural(len(rows), noun)] if noun else lines)
