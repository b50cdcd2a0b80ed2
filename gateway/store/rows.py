"""Rows to typed records, for every backend: a SQLite row and an asyncpg record are both
read by column name, and both drivers give ``bytes`` for blobs and ``float`` for times."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol, TypeVar

from gateway.store.records import CallbackRecord, MessageRecord, NewMessage, via_hops

__all__ = ["Row", "accepted_record", "callback_record", "message_record", "record"]

R = TypeVar("R")


class Row(Protocol):
    """A result row read by column name or position (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str | int, /) -> Any: ...


_NAMES: dict[type[Any], tuple[str, ...]] = {}  # a record class's field names, once


def _names(cls: type[Any]) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def record(cls: type[R], row: Row, *, json_columns: tuple[str, ...] = (), **given: Any) -> R:
    """A ``cls`` (a dataclass) from the columns of ``row`` named as its fields; the
    ``json_columns`` hold JSON text (empty or NULL is None); ``given`` fields are not read."""
    values = dict(given)
    for name in _names(cls):
        if name not in given:
            value = row[name]
            values[name] = (json.loads(value) if value else None) if name in json_columns else value
    return cls(**values)


def message_record(row: Row) -> MessageRecord:
    return record(
        MessageRecord, row, json_columns=("request_headers", "response_headers", "timings")
    )


def _header(headers_json: str, name: str) -> str | None:
    for key, value in json.loads(headers_json).items():
        if key.lower() == name:
            return str(value)
    return None


def callback_record(row: Row) -> CallbackRecord:
    # The relay whose key signed the original's last hop: answers go back there.
    via = (via_hops(_header(row["original_headers"], "gw-via")) or (None,))[-1]
    return record(CallbackRecord, row, original_via=via)


def accepted_record(msg: NewMessage, seq: int, now: float) -> MessageRecord:
    """The record of a message just inserted, without reading it back."""
    return MessageRecord(
        seq=seq,
        message_id=msg.message_id,
        client=msg.client,
        service=msg.service,
        mode=msg.mode,
        state=msg.state,
        request_headers=msg.request_headers,
        request_body=msg.request_body,
        request_digest=msg.request_digest,
        target=msg.target,
        adapter=msg.adapter,
        status=None,
        code=None,
        response_headers={},
        response_body=None,
        result=None,
        error=None,
        attempts=0,
        next_attempt_at=msg.next_attempt_at,
        created_at=now,
        updated_at=now,
        trace_id=msg.trace_id,
    )
