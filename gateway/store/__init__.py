"""The message store: one interface, SQL only below this package.

``SQLiteStore`` (aiosqlite, WAL) is the embedded backend; a PostgreSQL backend
implements the same ``Store`` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "CallbackRecord",
    "DuplicateMessage",
    "MessageEvent",
    "MessageRecord",
    "NewCallback",
    "NewMessage",
    "Rejection",
    "ResourceChange",
    "Store",
]


class DuplicateMessage(Exception):
    """A (client, message id) pair is already recorded."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NewMessage:
    message_id: str
    client: str
    service: str
    mode: str  # "sync" or "async"
    state: str
    request_headers: Mapping[str, str]
    request_body: bytes
    request_digest: str
    target: str | None = None
    adapter: str | None = None
    trace_id: str | None = None
    next_attempt_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRecord:
    seq: int
    message_id: str
    client: str
    service: str
    mode: str
    state: str
    request_headers: Mapping[str, str]
    request_body: bytes | None
    request_digest: str
    target: str | None
    adapter: str | None
    status: int | None
    code: str | None
    response_headers: Mapping[str, str]
    response_body: bytes | None
    result: bytes | None
    error: str | None
    attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    timings: Mapping[str, float] = field(default_factory=dict)
    trace_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.status is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageEvent:
    """One step of a message's life as the message log chained it (its timeline)."""

    at: float
    kind: str  # message.accepted, message.state, message.finished, callback.accepted …
    state: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewCallback:
    message_id: str  # the callback's own Gw-Message-Id
    client: str  # who called back (platform or peer gateway)
    correlation_id: str  # the original message's id
    original_seq: int
    service: str
    headers: Mapping[str, str]
    body: bytes
    digest: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackRecord:
    seq: int
    message_id: str
    client: str
    correlation_id: str
    original_seq: int
    original_client: str
    # The peer that vouched for the original request (its Gw-Via): answers go back there.
    original_via: str | None
    service: str
    body: bytes
    digest: str
    state: str  # pending → delivered, or dead
    attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    error: str | None
    trace_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    client: str | None
    message_id: str | None
    service: str | None
    status: int
    code: str
    detail: str
    digest: str | None
    size: int
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceChange:
    """One admin write: who did what to which resource, with its state before and after."""

    kind: str  # members, services, adapters, routes, tokens, messages …
    id: str
    action: str  # create, update, delete, revoke, redeliver …
    actor: str  # the admin token's name
    role: str
    before: Any = None
    after: Any = None


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    # Exchanges
    async def insert_message(self, msg: NewMessage) -> MessageRecord: ...
    async def get_message(self, client: str, message_id: str) -> MessageRecord | None: ...
    async def get_message_by_seq(self, seq: int) -> MessageRecord | None: ...
    async def find_by_message_id(self, message_id: str) -> Sequence[MessageRecord]: ...
    async def finish_message(
        self,
        seq: int,
        *,
        state: str,
        status: int,
        code: str | None,
        adapter: str | None,
        response_headers: Mapping[str, str],
        response_body: bytes | None,
        error: str | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> None: ...
    async def record_rejection(self, rejection: Rejection) -> None: ...
    async def message_events(self, seq: int) -> Sequence[MessageEvent]: ...
    async def search_messages(
        self,
        *,
        client: str | None = None,
        service: str | None = None,
        state: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> Sequence[MessageRecord]: ...

    # Outbox (asynchronous exchanges)
    async def outbox_depth(self) -> int: ...
    async def oldest_outbox_age(self, now: float) -> float: ...
    async def claim_due_messages(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[MessageRecord]: ...
    async def reschedule_message(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> None: ...
    async def set_message_state(
        self,
        seq: int,
        state: str,
        *,
        adapter: str | None = None,
        error: str | None = None,
        result: bytes | None = None,
        attempts: int | None = None,
    ) -> None: ...
    async def release_leases(self, owner: int | None = None) -> int: ...
    async def note_attempt(self, seq: int, *, attempts: int, adapter: str | None) -> None: ...

    # Callbacks
    async def insert_callback(self, cb: NewCallback) -> CallbackRecord: ...
    async def get_callback(self, client: str, message_id: str) -> CallbackRecord | None: ...
    async def claim_due_callbacks(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[CallbackRecord]: ...
    async def finish_callback(
        self, seq: int, *, state: str, attempts: int, error: str | None
    ) -> None: ...
    async def reschedule_callback(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> None: ...
    async def dead_letters(self, limit: int = 100) -> Sequence[Mapping[str, Any]]: ...
    async def redeliver(self, kind: str, seq: int, now: float) -> bool: ...

    # Live configuration and administration
    async def load_overlay(self) -> list[tuple[str, str, Any]]: ...
    async def put_resource(self, change: ResourceChange) -> int: ...
    async def audit(self, change: ResourceChange) -> int: ...
    async def audit_trail(
        self, *, kind: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]: ...
    async def add_token(self, name: str, role: str, token_hash: str) -> None: ...
    async def token_by_hash(self, token_hash: str) -> dict[str, Any] | None: ...
    async def list_tokens(self) -> list[dict[str, Any]]: ...
    async def revoke_token(self, name: str) -> bool: ...

    # Signature nonces (gateway/replay.py)
    async def claim_nonce(
        self, signer: str, keyid: str, nonce: str, expires_at: float, now: float
    ) -> bool: ...
    async def prune_nonces(self, now: float) -> int: ...
