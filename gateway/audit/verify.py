"""Verification of a store: walk the message log and name the first break.

It recomputes every content digest and link, compares the chained facts with the rows as
they are now, checks every checkpoint signature, and names the first break
(``modified``, ``deleted``, ``inserted``, ``reordered``, ``forged``; a checkpoint's TSA
stamp that does not hold is ``forged``, its reason named). It reads through
the store, in one consistent snapshot (``Store.snapshot``), on either backend.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.audit.jws import JwsInvalid, verify_jws
from gateway.audit.timestamping import StampTrust, check_stamp, stamped_data
from gateway.config.secretstore import SecretBox
from gateway.errors import GatewayError, StoreError, TimestampError
from gateway.store import ChainSnapshot, Store, chain
from gateway.store.archived import ArchiveMark
from gateway.store.bodies import SEALED_COLUMNS, is_sealed, open_value, ready
from gateway.store.chain import ChainRow, CheckpointRow, link

__all__ = [
    "KINDS",
    "Finding",
    "Report",
    "body_matches",
    "text_sha",
    "verify_chain",
    "verify_store",
]

KINDS = ("modified", "deleted", "inserted", "reordered", "forged")
UNOPENED: Any = object()  # a sealed body there was no key for: not judged
_BROKEN = b"\x00a sealed body that does not open"  # matches no digest
_BROKEN_TEXT = _BROKEN.decode()
_INF = math.inf


@dataclass(frozen=True, slots=True)
class Finding:
    """One break in the log: where (a chain seq, or ``None`` for a row outside the chain)."""

    seq: int | None
    kind: str  # one of KINDS
    detail: str

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "outside the chain"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    records: int  # chain records
    checkpoints: int
    sealed: int  # the highest chain seq a valid checkpoint covers
    findings: tuple[Finding, ...]
    # Third-party time: checkpoints whose TSA stamp verified (None: stamps not checked, no
    # TSA trust given), and checkpoints without a stamp.
    stamped: int | None = None
    unstamped: int = 0
    # The longest a verified stamp came after its checkpoint was signed: (checkpoint id,
    # seconds). A long lag is an outage's backlog, or stamps deleted and made again later.
    stamp_lag: tuple[int, float] | None = None
    unopened: int = 0  # rows whose sealed bodies were not checked: no key to open them

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first(self) -> Finding | None:
        return self.findings[0] if self.findings else None


@dataclass(slots=True)
class _Expected:
    """What the chain says a row holds: facts fixed at creation, values as last set."""

    seq: int  # the chain record that created the row
    facts: dict[str, Any]
    values: dict[str, Any]
    set_by: dict[str, int] = field(default_factory=dict)

    def set(self, name: str, value: Any, seq: int) -> None:
        self.values[name] = value
        self.set_by[name] = seq

    def by(self, name: str) -> int:
        return self.set_by.get(name, self.seq)


def body_matches(body: bytes, digest: str | None) -> bool:
    return hashlib.sha256(body).hexdigest() == digest or (body == b"" and digest == "")


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Verifier:
    LOOKUPS = 20  # broken links we trace back (a scan each) before classifying coarsely

    def __init__(
        self,
        snap: ChainSnapshot,
        jwks: Mapping[str, Any],
        gateway: str | None,
        tsa: StampTrust | None = None,
        whole: bool = False,
        box: SecretBox | None = None,
    ):
        self.snap = snap
        self.tsa = tsa
        self.box = box  # opens bodies sealed at rest; without it only the chain is judged
        self.unopened = 0
        self._keys: bool | None = None  # whether the box has the store's data keys
        self.whole = whole  # the snapshot holds the archived records too: start at seq 1
        self.chained_archives: list[tuple[int, dict[str, Any]]] = []  # (seq, facts)
        self.jwks = jwks
        self.gateway = gateway
        self.found: list[tuple[float, int, Finding]] = []
        self.messages: dict[int, _Expected] = {}
        self.callbacks: dict[int, _Expected] = {}
        self.rejections: dict[int, _Expected] = {}
        self.before = {"messages": 0, "callbacks": 0, "rejections": 0}
        self.purges: list[tuple[int, float]] = []  # (chain seq, cutoff) of each purge
        self.lookups = 0
        self.start = 1, chain.GENESIS  # where the walk begins: seq and the hash it links to

    def add(self, seq: int | None, kind: str, detail: str, priority: int = 1) -> None:
        """Priority 0 and 1: the chain and its checkpoints; 2: a row that disagrees with it.

        Breaks in the chain come first: rows are judged against the chain, so a break in it
        explains row disagreements (a deleted outcome record leaves its row unexplained)."""
        self.found.append(
            (_INF if seq is None else seq, priority, Finding(seq=seq, kind=kind, detail=detail))
        )

    async def run(self) -> Report:
        # --- archive ---
        # Records archived out of the store (gateway/audit/archive.py): the live chain
        # starts after the last archive, linked to its last hash.
        marks = await self.snap.archives()
        if marks and not self.whole:
            self.start = marks[-1].last_seq + 1, marks[-1].last_hash
            self.before.update(marks[-1].before)
        # --- end archive ---
        cps = await self.snap.checkpoints()
        wanted = {cp.seq for cp in cps}
        hash_at: dict[int, str] = {}
        count = last = 0
        prev: ChainRow | None = None
        prev2: ChainRow | None = None
        async for row in self.snap.chain_rows():
            count += 1
            last = row.seq
            if row.seq in wanted:
                hash_at[row.seq] = row.hash
            facts = self.record(row)
            await self.position(row, prev, prev2, facts)
            if facts is not None:
                self.apply(row, facts)
            prev2, prev = prev, row
        await self.rows()
        self.archived_as_chained(marks)  # archive
        sealed = await self.seals(cps, hash_at, last)
        stamped, unstamped, lag = await self.stamps(cps)
        self.found.sort(key=lambda f: (f[1] == 2, f[0], f[1]))
        return Report(
            records=count,
            checkpoints=len(cps),
            sealed=sealed,
            findings=tuple(f for _, _, f in self.found),
            stamped=stamped,
            unstamped=unstamped,
            stamp_lag=lag,
            unopened=self.unopened,
        )

    # The chain itself

    def record(self, row: ChainRow) -> dict[str, Any] | None:
        """The record's own consistency: its facts, content digest and hash."""
        if chain.content_digest(row.facts) != row.content_digest:
            self.add(row.seq, "modified", "its facts no longer match its content digest")
        if link(row.prev_hash, row.content_digest) != row.hash:
            self.add(row.seq, "modified", "its hash does not cover its content digest")
        try:
            facts = json.loads(row.facts)
        except json.JSONDecodeError:
            facts = None
        if not isinstance(facts, dict):
            self.add(row.seq, "modified", "its facts are not a JSON object")
            return None
        if facts.get("seq") != row.seq and isinstance(facts.get("seq"), int):
            self.add(
                row.seq,
                "reordered",
                f"the record written as seq {facts['seq']} sits at seq {row.seq}",
            )
        elif (facts.get("kind"), facts.get("ref"), facts.get("at")) != (row.kind, row.ref, row.at):
            self.add(row.seq, "modified", "its kind, ref or time columns differ from its facts")
        return facts

    async def position(
        self,
        row: ChainRow,
        prev: ChainRow | None,
        prev2: ChainRow | None,
        facts: dict[str, Any] | None,
    ) -> None:
        """The record's place: no gap before it, and a link to the record before it."""
        expected_seq = prev.seq + 1 if prev else self.start[0]
        if row.seq != expected_seq:
            missing = (
                f"record {expected_seq} is"
                if row.seq == expected_seq + 1
                else f"records {expected_seq}..{row.seq - 1} are"
            )
            self.add(expected_seq, "deleted", f"{missing} missing from the chain", 0)
            return
        expected = prev.hash if prev else self.start[1]
        if row.prev_hash == expected:
            return
        if prev is not None and prev2 is not None and row.prev_hash == prev2.hash:
            self.add(
                prev.seq,
                "inserted",
                f"record {prev.seq} is not in the chain: record {row.seq} links to {prev2.seq}",
                0,
            )
            return
        where = await self.locate(row.prev_hash)
        written = facts.get("seq") if facts else None
        if where is not None:
            self.add(
                row.seq,
                "reordered",
                f"record {row.seq} links to record {where}, not to {expected_seq - 1}",
                0,
            )
        elif isinstance(written, int) and written > row.seq:
            self.add(
                row.seq,
                "deleted",
                f"records before seq {row.seq} were deleted and the rest renumbered",
                0,
            )
        elif prev is not None:
            self.add(
                prev.seq,
                "modified",
                f"record {prev.seq} was rewritten: record {row.seq} links to a hash no record has",
                0,
            )
        else:
            self.add(row.seq, "inserted", "the first record does not start the chain", 0)

    async def locate(self, value: str) -> int | None:
        if self.lookups >= self.LOOKUPS:
            return None
        self.lookups += 1
        return await self.snap.find_hash(value)

    def apply(self, row: ChainRow, facts: dict[str, Any]) -> None:
        """Fold one event into what the rows should hold now."""
        kind, ref, at, seq = facts.get("kind"), facts.get("ref"), facts.get("at"), row.seq
        if kind == "genesis":
            self.before.update(facts.get("before") or {})
        elif kind == "purge":
            self.purges.append((seq, float(facts.get("cutoff") or -_INF)))
        elif kind == "archive":
            self.chained_archives.append((seq, facts))
        elif kind == "message.accepted":
            created = self.create(self.messages, "messages", seq, ref, facts)
            if created is not None:
                created.values.update(
                    created_at=at,
                    state=facts.get("state"),
                    status=None,
                    code=None,
                    response_digest=None,
                    result_digest=None,
                )
        elif kind == "callback.accepted":
            created = self.create(self.callbacks, "callbacks", seq, ref, facts)
            if created is not None:
                created.values.update(created_at=at, state=facts.get("state"))
            message = self.message_of(facts)
            if message is not None:
                message.set("state", facts.get("message_state"), seq)
                message.set("result_digest", facts.get("body_digest"), seq)
        elif kind == "rejection":
            self.create(self.rejections, "rejections", seq, ref, facts)
        elif kind in ("message.finished", "message.state", "message.redelivered"):
            target = self.existing(self.messages, "messages", seq, ref)
            if target is None:
                return
            target.set("state", facts.get("state"), seq)
            if kind == "message.finished":
                for name in ("status", "code", "response_digest"):
                    target.set(name, facts.get(name), seq)
            elif kind == "message.redelivered":
                target.set("created_at", at, seq)
            elif "result_digest" in facts:
                target.set("result_digest", facts["result_digest"], seq)
        elif kind in ("callback.finished", "callback.redelivered"):
            cb = self.existing(self.callbacks, "callbacks", seq, ref)
            if cb is None:
                return
            cb.set("state", facts.get("state"), seq)
            if kind == "callback.redelivered":
                cb.set("created_at", at, seq)
            message = self.message_of(cb.facts)
            if facts.get("message_state") and message is not None:
                message.set("state", facts["message_state"], seq)
        else:
            self.add(seq, "modified", f"unknown record kind {kind!r}")

    def create(
        self,
        table: dict[int, _Expected],
        name: str,
        seq: int,
        ref: Any,
        facts: dict[str, Any],
    ) -> _Expected | None:
        if not isinstance(ref, int):
            self.add(seq, "modified", f"its {name} reference is not a number")
            return None
        if ref in table:
            self.add(seq, "inserted", f"{name}.seq {ref} was already chained at {table[ref].seq}")
            return None
        table[ref] = _Expected(seq=seq, facts=facts, values={})
        return table[ref]

    def message_of(self, facts: Mapping[str, Any]) -> _Expected | None:
        original = facts.get("original_seq")
        return self.messages.get(original) if isinstance(original, int) else None

    def existing(
        self, table: dict[int, _Expected], name: str, seq: int, ref: Any
    ) -> _Expected | None:
        found = table.get(ref) if isinstance(ref, int) else None
        if found is None and not (isinstance(ref, int) and ref <= self.before[name]):
            self.add(seq, "inserted", f"an event for {name}.seq {ref}, which was never chained")
        return found

    # --- archive ---
    def archived_as_chained(self, marks: Sequence[ArchiveMark]) -> None:
        """The store's list of archives agrees with the ``archive`` events the walk saw
        (all of them, when the archives were walked too)."""
        listed = {m.name: m for m in marks}
        seen = set()
        for seq, facts in self.chained_archives:
            name = str(facts.get("name"))
            seen.add(name)
            mark = listed.get(name)
            if mark is None:
                self.add(seq, "deleted", f"archive {name} is chained but not in log_archives", 2)
            elif mark.chained() != {k: facts.get(k) for k in mark.chained()}:
                self.add(seq, "modified", f"log_archives differs from the chain for {name}", 2)
        for m in marks if self.whole else ():
            if m.name not in seen:
                self.add(m.first_seq, "inserted", f"archive {m.name} was never chained", 2)

    # --- end archive ---

    # The rows as they are now

    async def rows(self) -> None:
        await self.table("messages", self.messages, self.message)
        await self.table("callbacks", self.callbacks, self.callback)
        await self.table("rejections", self.rejections, self.rejection)

    async def table(self, name: str, expected: dict[int, _Expected], compare: Any) -> None:
        identity = {
            (e.facts.get("client"), e.facts.get("message_id")): ref for ref, e in expected.items()
        }
        seen: set[int] = set()
        async for stored in self.snap.data_rows(name):
            row = await self.opened(name, stored)
            seq = int(row["seq"])
            exp = expected.get(seq)
            if exp is None:
                if seq > int(self.before.get(name, 0)):
                    self.add(
                        None,
                        "inserted",
                        f"{name}.seq {seq} ({row.get('message_id')}) has no chain record",
                    )
                continue
            seen.add(seq)
            if (row.get("client"), row.get("message_id")) != (
                exp.facts.get("client"),
                exp.facts.get("message_id"),
            ):
                other = identity.get((row.get("client"), row.get("message_id")))
                if other is not None:
                    self.add(
                        min(exp.seq, expected[other].seq),
                        "reordered",
                        f"{name}.seq {seq} holds the record chained as {name}.seq {other}",
                        2,
                    )
                else:
                    self.add(exp.seq, "modified", f"{name}.seq {seq}: its identity changed", 2)
                continue
            compare(seq, row, exp)
        for seq, exp in expected.items():
            if seq not in seen:
                self.add(
                    exp.seq,
                    "deleted",
                    f"{name}.seq {seq} ({exp.facts.get('message_id')}) is missing",
                    2,
                )

    # --- archive ---
    async def opened(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        """The row with its sealed bodies opened when the store's keys are at hand (else
        they read as UNOPENED: not judged). One that does not open (altered, an unknown
        key, moved from another column) reads as bytes no digest matches: modified."""
        sealed = [k for k, v in row.items() if k in SEALED_COLUMNS and is_sealed(v)]
        if not sealed:
            return row
        out = dict(row)
        if not await self.keys_at_hand():
            self.unopened += 1
            for k in sealed:
                out[k] = UNOPENED
            return out
        assert self.box is not None
        await ready(self.box, [row[k] for k in sealed])  # a key added since we loaded
        for k in sealed:
            try:
                out[k] = open_value(self.box, k, row[k])
            except StoreError:
                out[k] = _BROKEN_TEXT if isinstance(row[k], str) else _BROKEN
        return out

    async def keys_at_hand(self) -> bool:
        if self._keys is None:
            box = self.box
            self._keys = box is not None and await ready(box, []) and box.can_seal
            if self._keys and box is not None and box.current is None:
                try:
                    await box.load()
                except GatewayError:
                    self._keys = False
                self._keys = self._keys and box.current is not None
        return self._keys

    # --- end archive ---

    def differ(self, at: int, what: str, detail: str) -> None:
        self.add(at, "modified", f"{what}: {detail}", 2)

    def fields(
        self, what: str, row: Mapping[str, Any], exp: _Expected, names: Iterable[str]
    ) -> None:
        for name in names:
            if row[name] != exp.facts.get(name):
                self.differ(exp.seq, what, f"{name} differs from the chain")

    def purged(self, exp: _Expected) -> bool:
        """Whether a purge logged after the row (re)started covers its creation time."""
        created, since = float(exp.values.get("created_at") or _INF), exp.by("created_at")
        return any(seq > since and created < cutoff for seq, cutoff in self.purges)

    def body(self, what: str, label: str, body: Any, digest: Any, at: int, exp: _Expected) -> None:
        if body is UNOPENED:
            return
        if body is None:
            if digest is not None and not self.purged(exp):
                self.differ(at, what, f"its {label} is gone, and no purge covers it")
        elif digest is None:
            self.differ(at, what, f"it holds a {label} the chain never recorded")
        elif not body_matches(body, digest):
            self.differ(at, what, f"its {label} does not match its chained digest")

    def message(self, seq: int, row: Mapping[str, Any], exp: _Expected) -> None:
        what = f"messages.seq {seq}"
        self.fields(what, row, exp, ("service", "mode", "target", "request_digest"))
        headers = row["request_headers"]
        if headers is not UNOPENED and text_sha(headers) != exp.facts.get("headers_digest"):
            self.differ(exp.seq, what, "its request headers differ from the chain")
        self.body(
            what, "request body", row["request_body"], exp.facts.get("request_digest"), exp.seq, exp
        )
        v = exp.values
        if row["created_at"] != v.get("created_at"):
            self.differ(exp.by("created_at"), what, "its creation time differs from the chain")
        state = row["state"]
        if state != v.get("state") and not (
            state == "delivering" and v.get("state") in ("accepted", "delivering")
        ):
            self.differ(
                exp.by("state"), what, f"state {state!r}, the chain says {v.get('state')!r}"
            )
        for name in ("status", "code"):
            if row[name] != v.get(name):
                self.differ(exp.by(name), what, f"{name} differs from the chain")
        self.body(
            what,
            "response body",
            row["response_body"],
            v.get("response_digest"),
            exp.by("response_digest"),
            exp,
        )
        self.body(
            what, "result", row["result"], v.get("result_digest"), exp.by("result_digest"), exp
        )

    def callback(self, seq: int, row: Mapping[str, Any], exp: _Expected) -> None:
        what = f"callbacks.seq {seq}"
        self.fields(what, row, exp, ("correlation_id", "original_seq", "service", "digest"))
        headers = row["headers"]
        if headers is not UNOPENED and text_sha(headers) != exp.facts.get("headers_digest"):
            self.differ(exp.seq, what, "its headers differ from the chain")
        # A purged callback body is the empty blob (the column is NOT NULL).
        body = row["body"] if row["body"] is UNOPENED else row["body"] or None
        self.body(what, "body", body, exp.facts.get("body_digest"), exp.seq, exp)
        if row["created_at"] != exp.values.get("created_at"):
            self.differ(exp.by("created_at"), what, "its creation time differs from the chain")
        if row["state"] != exp.values.get("state"):
            self.differ(exp.by("state"), what, "its state differs from the chain")

    def rejection(self, seq: int, row: Mapping[str, Any], exp: _Expected) -> None:
        what = f"rejections.seq {seq}"
        self.fields(what, row, exp, ("service", "status", "code", "digest", "size", "at"))

    # Checkpoints

    async def seals(self, cps: list[CheckpointRow], hash_at: Mapping[int, str], last: int) -> int:
        sealed = 0
        previous_id = 0
        for cp in cps:
            if cp.id != previous_id + 1:
                self.add(
                    cp.seq, "deleted", f"checkpoints {previous_id + 1}..{cp.id - 1} are missing", 0
                )
            previous_id = cp.id
            try:
                header, payload = verify_jws(cp.jws, self.jwks)
            except JwsInvalid as exc:
                self.add(cp.seq, "forged", f"checkpoint {cp.id}: {exc}", 0)
                continue
            signed = {"seq": cp.seq, "hash": cp.hash, "at": cp.at}
            if self.gateway is not None:
                signed["gateway"] = self.gateway
            if {k: payload.get(k) for k in signed} != signed or header.get("kid") != cp.kid:
                self.add(cp.seq, "forged", f"checkpoint {cp.id} differs from what was signed", 0)
                continue
            found = hash_at.get(cp.seq)
            if found is None:
                if cp.seq > last:
                    self.add(
                        last + 1,
                        "deleted",
                        f"the chain ends at seq {last}, but checkpoint {cp.id} signed seq {cp.seq}",
                        0,
                    )
                continue
            if found != cp.hash:
                explained = [
                    f.seq
                    for _, priority, f in self.found
                    if priority < 2 and f.seq is not None and sealed < f.seq <= cp.seq
                ]
                if explained:  # the walk already found where; this only confirms it
                    self.add(
                        cp.seq,
                        "modified",
                        f"checkpoint {cp.id} no longer matches seq {cp.seq} (see seq "
                        f"{min(explained)})",
                    )
                else:  # a consistent rewrite: only the signature can tell, and only roughly
                    self.add(
                        sealed + 1,
                        "modified",
                        f"records {sealed + 1}..{cp.seq} were rewritten: the hash at seq "
                        f"{cp.seq} is not the one checkpoint {cp.id} signed",
                    )
                continue
            sealed = max(sealed, cp.seq)
        high = await self.snap.checkpoint_high_water()
        if high > previous_id:
            self.add(
                (cps[-1].seq if cps else 0) + 1,
                "deleted",
                f"checkpoints {previous_id + 1}..{high} are missing",
                0,
            )
        return sealed

    # Third-party time

    async def stamps(
        self, cps: list[CheckpointRow]
    ) -> tuple[int | None, int, tuple[int, float] | None]:
        """Each kept stamp: it covers its checkpoint as signed, verifies against the TSA's
        certificates and is dated after the checkpoint was signed (and not in the future);
        (stamps that hold, or None when not checked; checkpoints without a stamp; the
        longest lag of a stamp after its checkpoint)."""
        kept = await self.snap.stamps()
        by_id = {cp.id: cp for cp in cps}
        unstamped = sum(1 for cp in cps if cp.id not in kept)
        if self.tsa is None:
            return None, unstamped, None
        good = 0
        lag: tuple[int, float] | None = None
        now = time.time()
        for number, tsr in kept.items():
            cp = by_id.get(number)
            if cp is None:
                continue  # its checkpoint is gone: the checkpoint walk names the gap
            try:
                stamp = check_stamp(
                    tsr, stamped_data(cp), self.tsa, not_before=cp.at, not_after=now
                )
            except TimestampError as exc:
                self.add(
                    cp.seq,
                    "forged",
                    f"checkpoint {cp.id}: its time stamp is {exc.reason}: {exc.detail}",
                    0,
                )
                continue
            good += 1
            if lag is None or stamp.gen_time - cp.at > lag[1]:
                lag = (cp.id, stamp.gen_time - cp.at)
        return good, unstamped, lag


async def verify_chain(
    snap: ChainSnapshot,
    jwks: Mapping[str, Any],
    *,
    gateway: str | None = None,
    tsa: StampTrust | None = None,
    whole: bool = False,
    box: SecretBox | None = None,
) -> Report:
    """Walk the whole log in ``snap``; findings come first break first. With ``tsa``,
    each checkpoint's RFC 3161 stamp is checked against the TSA's certificates too.
    ``whole``: the snapshot holds the archived records too (``gateway.audit.archive``).
    ``box``: the store's data keys, to check bodies sealed at rest (the chain needs no key)."""
    return await _Verifier(snap, jwks, gateway, tsa, whole, box).run()


async def verify_store(
    store: Store,
    jwks: Mapping[str, Any],
    *,
    gateway: str | None = None,
    tsa: StampTrust | None = None,
) -> Report:
    """``verify_chain`` over one snapshot of ``store`` (open, or opened read-only)."""
    async with store.snapshot() as snap:
        return await verify_chain(snap, jwks, gateway=gateway, tsa=tsa, box=store.secrets)
