"""The store's records and its interface: what every backend takes and hands back
(``NewMessage`` in, ``MessageRecord`` out, …), the ``Store`` Protocol they implement,
and the SQL fragments of the states. Imports no backend: the backends import it."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.states import (
    ANSWERED_STATES,
    AWAITING_CALLBACK,
    IN_DELIVERY,
    CallbackState,
    MessageState,
)
from gateway.store.archived import ArchiveMark
from gateway.store.batch import BatchObserver
from gateway.store.chain import ChainRow, CheckpointRow, Head
from gateway.store.oprecords import MonitoringQuery, MonitoringRecord, MonitoringSample

if TYPE_CHECKING:
    from gateway.config.secretstore import DataKey, SecretBox

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
    "instance_id",
    "sql_state",
    "sql_states",
    "via_hops",
]

STORE_URL_ENV = "GATEWAY_STORE_URL"


def sql_states(*states: MessageState | CallbackState) -> str:
    """An SQL list of states, ``('accepted', 'delivering')``, for ``state IN …``."""
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


def sql_state(state: MessageState | CallbackState) -> str:
    """One state as an SQL literal, ``'answered'``: every literal in the store's SQL is one
    of gateway/states.py, never typed by hand."""
    return f"'{state.value}'"


_OUTBOX = IN_DELIVERY
# Message states move forward only: each state set this way, and the states it may follow.
# A message answered by the upstream at once skips DELIVERED (answer_message); one answered
# by a callback leaves DELIVERED only (insert_callback).
FORWARD: dict[str, str] = {
    MessageState.DELIVERED: sql_states(*_OUTBOX),
    MessageState.DEAD: sql_states(*_OUTBOX),
    MessageState.FAILED: sql_states(*_OUTBOX),
}
IN_OUTBOX = sql_states(*_OUTBOX)
# The states a callback answers: awaited, or (a service with supersede) answered already.
TAKES_CALLBACK = sql_states(*AWAITING_CALLBACK)
TAKES_LATER_DECISION = sql_states(*AWAITING_CALLBACK, *ANSWERED_STATES)
INSTANCE_ENV = "GATEWAY_INSTANCE_ID"


def via_hops(value: str | None) -> tuple[str, ...]:
    """A ``Gw-Via`` value as its hops, oldest first (the pipeline checks their syntax)."""
    return tuple(h.strip() for h in value.split(",")) if value and value.strip() else ()


class DuplicateMessage(Exception):
    """A (client, message id) pair is already recorded."""


class ConfigConflict(Exception):
    """The configuration version moved past the one an admin write was based on (another
    process wrote meanwhile): nothing was written."""


class TokenNameTaken(Exception):
    """An admin token of that name exists already."""


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


# --- lean ---
@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How a synchronous exchange ended: recorded with the message, in the same commit
    (``Store.record_exchange``), so a sync exchange commits once."""

    state: str  # answered or failed
    status: int
    code: str | None
    adapter: str | None
    response_headers: Mapping[str, str]
    response_body: bytes | None
    error: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)


# --- end lean ---


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
    # The member the message was delivered to (recorded with the upstream's 202 or answer):
    # the one party whose callback is taken for it.
    receiver: str | None = None

    @property
    def finished(self) -> bool:
        return self.status is not None

    @property
    def via(self) -> tuple[str, ...]:
        """The relay chain it came through (its ``Gw-Via`` as received, oldest first;
        the last hop signed it), recorded with its headers. () when sent directly."""
        return via_hops(
            next((v for k, v in self.request_headers.items() if k.lower() == "gw-via"), None)
        )


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
    # What the audit trail keeps of (before, after) when it must differ from the states
    # themselves: write-only secrets as their fingerprints (gateway/config/secrets.py). ``after``
    # stays the resource's stored body; None records before and after as they are.
    recorded: tuple[Any, Any] | None = None

    def trail(self) -> tuple[Any, Any]:
        """(before, after) as the audit trail records them."""
        return self.recorded if self.recorded is not None else (self.before, self.after)


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectionRecord(Rejection):
    """A rejection as recorded: its number and when."""

    seq: int
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeRecord:
    """One entry of the admin change trail (``GET /admin/v1/audit``)."""

    seq: int
    at: float
    actor: str
    role: str
    action: str
    kind: str
    resource_id: str
    before: Any
    after: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRecord:
    name: str
    role: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """An active admin token as authentication sees it: its stored hash, who, which role."""

    name: str
    role: str
    hash: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    kind: str  # "message" or "callback"
    seq: int
    message_id: str
    client: str
    service: str
    attempts: int
    error: str | None
    updated_at: float


# Signs a chain head: (head, at) → (kid, compact JWS). The store calls it under its lock.
Signer = Callable[[Head, float], tuple[str, str]]


class ChainSnapshot(Protocol):
    """One consistent read of the message log and the rows it describes (audit verify,
    audit export): nothing committed after it began is seen."""

    def chain_rows(self, first: int = 1, last: int | None = None) -> AsyncIterator[ChainRow]: ...
    async def checkpoints(self) -> list[CheckpointRow]: ...
    async def checkpoint_high_water(self) -> int: ...
    async def checkpoint_covering(self, seq: int) -> CheckpointRow | None: ...
    async def find_hash(self, value: str) -> int | None: ...
    def data_rows(self, table: str) -> AsyncIterator[dict[str, Any]]: ...
    async def messages_by_id(self, message_id: str) -> list[dict[str, Any]]: ...
    async def callbacks_of(self, message_seq: int) -> list[dict[str, Any]]: ...
    async def own_events(
        self, message_seq: int, callback_seqs: list[int]
    ) -> tuple[int, int] | None: ...
    # --- tsa ---
    # The RFC 3161 stamps kept with their checkpoints: checkpoint id → DER TimeStampResp.
    async def stamps(self) -> dict[int, bytes]: ...

    # --- end tsa ---

    # --- archive ---
    # The archive files the store handed its oldest records to, in chain order: the
    # live chain starts after the last one's last_seq (gateway/audit/archive.py).
    async def archives(self) -> list[ArchiveMark]: ...

    # --- end archive ---


class Store(Protocol):
    instance_id: str  # who holds this store's outbox leases (opaque; unique per process)

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    def observe(self, observer: BatchObserver) -> None: ...

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
    ) -> bool: ...
    # --- lean ---
    async def record_exchange(
        self, msg: NewMessage, outcome: Outcome, *, received_at: float
    ) -> int:
        """Record a synchronous exchange once it has ended, accepted and finished in one
        commit (its two chain events, ``message.accepted`` at ``received_at`` and
        ``message.finished``); its seq. ``DuplicateMessage`` when its id is taken."""
        ...

    # --- end lean ---
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
    # Every state change below is conditional on the state it leaves (and, for the outbox,
    # on this process holding the row's lease): True when it happened, False when the row
    # had moved on meanwhile and nothing changed.
    async def reschedule_message(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> bool: ...
    async def set_message_state(
        self,
        seq: int,
        state: str,
        *,
        adapter: str | None = None,
        error: str | None = None,
        result: bytes | None = None,
        attempts: int | None = None,
        receiver: str | None = None,
    ) -> bool: ...
    async def answer_message(
        self, seq: int, answer: NewCallback, *, attempts: int, adapter: str, receiver: str | None
    ) -> bool: ...
    async def release_leases(self, owner: str | None = None) -> int: ...
    async def renew_leases(
        self, messages: Sequence[int], callbacks: Sequence[int], until: float
    ) -> int: ...
    async def note_attempt(self, seq: int, *, attempts: int, adapter: str | None) -> bool: ...
    async def watch_outbox(self, wake: Callable[[], None]) -> None: ...

    # Callbacks
    # A callback from the message's receiver, while the message awaits it (or, with
    # ``supersede``, after its answer): None when the guard refused it.
    async def insert_callback(
        self, cb: NewCallback, *, supersede: bool = False
    ) -> CallbackRecord | None: ...
    async def get_callback(self, client: str, message_id: str) -> CallbackRecord | None: ...
    async def callbacks_of(self, original_seq: int) -> Sequence[CallbackRecord]: ...
    async def claim_due_callbacks(
        self, now: float, limit: int, lease_s: float
    ) -> Sequence[CallbackRecord]: ...
    async def finish_callback(
        self, seq: int, *, state: str, attempts: int, error: str | None
    ) -> bool: ...
    async def reschedule_callback(
        self, seq: int, *, attempts: int, next_attempt_at: float, error: str
    ) -> bool: ...
    async def dead_letters(self, limit: int = 100) -> Sequence[DeadLetter]: ...
    async def redeliver(self, kind: str, seq: int, now: float) -> bool: ...

    # Live configuration and administration. Every admin write bumps one configuration
    # version in its own transaction; put_resource returns the new version and, given
    # expected_version, writes only while the version is still that (else
    # ConfigConflict); load_overlay lists changes in version order.
    # wait_for_config_change returns when the version may have moved (a notification)
    # or after timeout_s, whichever comes first; the caller then reads config_version().
    async def load_overlay(self) -> list[tuple[str, str, Any]]: ...
    async def put_resource(
        self, change: ResourceChange, *, expected_version: int | None = None
    ) -> int: ...
    async def config_version(self) -> int: ...
    async def wait_for_config_change(self, timeout_s: float) -> None: ...
    # The last accepted federation directory (gateway/federation/follower.py): kept unless one of
    # a higher version already is; True when this one is now kept.
    async def save_directory(self, version: int, jws: str) -> bool: ...
    async def load_directory(self) -> str | None: ...
    async def record_change(self, change: ResourceChange) -> int: ...
    async def changes(
        self, *, kind: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[ChangeRecord]: ...
    async def add_token(self, name: str, role: str, token_hash: str) -> None: ...
    async def token_by_hash(self, token_hash: str) -> Credential | None: ...
    async def list_tokens(self) -> list[TokenRecord]: ...
    async def revoke_token(self, name: str) -> bool: ...

    # Secrets at rest (gateway/config/secretstore.py). The store seals the secrets of resource
    # bodies and change records with its box on the way in and opens them on the way out
    # (a store without one refuses to keep a secret in clear). Data keys are kept wrapped
    # by the key-encryption key; add_data_key is False when that generation exists.
    def use_secrets(self, box: SecretBox) -> None: ...
    @property
    def secrets(self) -> SecretBox: ...
    async def data_keys(self) -> list[DataKey]: ...
    async def add_data_key(self, key: DataKey) -> bool: ...
    async def rewrap_data_keys(self, keys: Sequence[DataKey]) -> None: ...
    # Every stored resource body and change record sealed again with the box's current
    # key (gateway store rekey); rows a concurrent write replaced are left to it.
    async def reseal(self) -> int: ...

    # Signature nonces (gateway/replay.py)
    async def claim_nonce(
        self, signer: str, keyid: str, nonce: str, expires_at: float, now: float
    ) -> bool: ...
    async def prune_nonces(self, now: float) -> int: ...

    # Operational monitoring (gateway/exchange/monitoring.py): apart from the evidence log.
    async def insert_monitoring(self, records: Sequence[MonitoringRecord]) -> None: ...
    async def monitoring_records(self, query: MonitoringQuery) -> list[MonitoringRecord]: ...
    async def monitoring_samples(
        self, since: float, until: float, limit: int
    ) -> list[MonitoringSample]: ...
    async def prune_monitoring(self, cutoff: float) -> int: ...

    # Reports
    async def rejections(self, limit: int = 100) -> list[RejectionRecord]: ...
    async def count_messages(self, state: str | None = None) -> int: ...

    # The tamper-evident message log (gateway/audit)
    async def sign_checkpoint(self, sign: Signer) -> CheckpointRow | None: ...
    def snapshot(self) -> AbstractAsyncContextManager[ChainSnapshot]: ...
    async def purge_bodies(self, cutoff: float, now: float) -> tuple[int, int]: ...
    async def chain_head(self) -> Head: ...
    # --- archive ---
    # Delete the rows and chain records ``marks`` archived, and add the marks, in one
    # transaction; False (nothing deleted) when the log moved past what was archived.
    async def cut_archived(
        self, marks: Sequence[ArchiveMark], rows: Mapping[str, Sequence[int]], seen_head: int
    ) -> bool: ...
    # Whether this process holds the store-wide lock ``name`` for the block (one holder at
    # a time across every instance on the store; released when the holder dies). Today's
    # only leadership: the background archiver runs only in the instance that holds it.
    def exclusive(self, name: str) -> AbstractAsyncContextManager[bool]: ...

    # --- end archive ---

    # --- tsa ---
    # Third-party time (gateway/audit/timestamping.py). claim_unstamped leases the checkpoints
    # without a stamp to this instance until now + lease_s (those it holds already, those
    # never claimed, those whose lease ran out), oldest first; save_stamp keeps a stamp
    # only while this instance holds the claim and none is kept yet (True when kept);
    # stamp_backlog is (checkpoints without a stamp, when the oldest of them was signed).
    async def claim_unstamped(
        self, now: float, lease_s: float, limit: int = 20
    ) -> list[CheckpointRow]: ...
    async def save_stamp(
        self, checkpoint_id: int, tsr: bytes, gen_time: float, now: float
    ) -> bool: ...
    async def stamp_backlog(self) -> tuple[int, float | None]: ...

    # --- end tsa ---


def instance_id() -> str:
    """This process's lease owner: ``GATEWAY_INSTANCE_ID`` (set by the supervisor for its
    workers), else a fresh random id; never a pid (pids repeat, and across machines)."""
    return os.environ.get(INSTANCE_ENV) or uuid.uuid4().hex
