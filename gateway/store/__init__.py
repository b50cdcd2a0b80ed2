"""The message store: one interface, SQL only below this package.

``SQLiteStore`` (sqlite.py, WAL) is the embedded default; ``PostgresStore`` (postgres.py,
asyncpg) lets several instances share one database. Both implement ``Store`` and hand
back the typed records below; ``create_store`` opens whichever the configuration names.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gateway.errors import ConfigError
from gateway.store.records import (
    FORWARD,
    IN_OUTBOX,
    INSTANCE_ENV,
    STORE_URL_ENV,
    TAKES_CALLBACK,
    TAKES_LATER_DECISION,
    CallbackRecord,
    ChainSnapshot,
    ChangeRecord,
    ConfigConflict,
    Credential,
    DeadLetter,
    DuplicateMessage,
    MessageEvent,
    MessageRecord,
    MonitoringQuery,
    MonitoringRecord,
    MonitoringSample,
    NewCallback,
    NewMessage,
    Outcome,
    Rejection,
    RejectionRecord,
    ResourceChange,
    Signer,
    Store,
    TokenNameTaken,
    TokenRecord,
    instance_id,
    sql_state,
    sql_states,
    via_hops,
)

if TYPE_CHECKING:
    from gateway.config.model import StoreConfig

__all__ = [
    "FORWARD",
    "INSTANCE_ENV",
    "IN_OUTBOX",
    "STORE_URL_ENV",
    "TAKES_CALLBACK",
    "TAKES_LATER_DECISION",
    "CallbackRecord",
    "ChainSnapshot",
    "ChangeRecord",
    "ConfigConflict",
    "Credential",
    "DeadLetter",
    "DuplicateMessage",
    "MessageEvent",
    "MessageRecord",
    "MonitoringQuery",
    "MonitoringRecord",
    "MonitoringSample",
    "NewCallback",
    "NewMessage",
    "Outcome",
    "Rejection",
    "RejectionRecord",
    "ResourceChange",
    "Signer",
    "Store",
    "TokenNameTaken",
    "TokenRecord",
    "create_store",
    "instance_id",
    "sql_state",
    "sql_states",
    "store_url",
    "via_hops",
]


def store_url(config: StoreConfig) -> str | None:
    """The PostgreSQL URL the store lives at, or None for the SQLite file."""
    url = os.environ.get(STORE_URL_ENV) or config.url
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError([f"/store/url: {url!r} is not a postgresql:// URL"])
    return url


def create_store(
    config: StoreConfig, *, instance: str | None = None, readonly: bool = False
) -> Store:
    """The configured store, not yet opened: PostgreSQL when a URL is configured
    (``store.url`` or ``GATEWAY_STORE_URL``), else SQLite at ``store.path``.

    ``readonly``: for reports (``audit verify``): opening neither migrates nor creates."""
    owner = instance or instance_id()
    url = store_url(config)
    if url is not None:
        from gateway.store.postgres import PostgresStore

        return PostgresStore(url, instance=owner, migrate=not readonly)
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(
        config.path, synchronous=config.synchronous, instance=owner, readonly=readonly
    )
