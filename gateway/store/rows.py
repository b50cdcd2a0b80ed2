"""Rows to typed records, for every backend: a SQLite row and an asyncpg record are both
read by column name, and both drivers give ``bytes`` for blobs and ``float`` for times."""

from __future__ import annotations

import json
from typing import Any, Protocol

from gateway.store import CallbackRecord, MessageRecord, NewMessage, via_hops

__all__ = ["Row", "accepted_record", "callback_record", "message_record"]


class Row(Protocol):
    """A result row read by column name or position (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str | int, /) -> Any: ...


def message_record(row: Row) -> MessageRecord:
    return MessageRecord(
        seq=row["seq"],
        message_id=row["message_id"],
        client=row["client"],
        service=row["service"],
        mode=row["mode"],
        state=row["state"],
        target=row["target"],
        adapter=row["adapter"],
        request_headers=json.loads(row["request_headers"]),
        request_body=row["request_body"],
        request_digest=row["request_digest"],
        status=row["status"],
        code=row["code"],
        response_headers=json.loads(row["response_headers"]),
        response_body=row["response_body"],
        result=row["result"],
        error=row["error"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        timings=json.loads(row["timings"]),
        trace_id=row["trace_id"],
        receiver=row["receiver"],
    )


def _header(headers_json: str, name: str) -> str | None:
    for key, value in json.loads(headers_json).items():
        if key.lower() == name:
            return str(value)
    return None


def callback_record(row: Row) -> CallbackRecord:
    return CallbackRecord(
        seq=row["seq"],
        message_id=row["message_id"],
        client=row["client"],
        correlation_id=row["correlation_id"],
        original_seq=row["original_seq"],
        original_client=row["original_client"],
        # The relay whose key signed the original's last hop: answers go back there.
        original_via=(via_hops(_header(row["original_headers"], "gw-via")) or (None,))[-1],
        service=row["service"],
        body=row["body"],
        digest=row["digest"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        error=row["error"],
        trace_id=row["trace_id"],
    )


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
