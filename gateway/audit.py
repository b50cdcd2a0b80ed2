"""Tamper evidence for the message log: signed checkpoints, verification, evidence bundles.

The store appends one hash-chained record per evidential event (``gateway/store/chain.py``).
This module

- signs the chain head now and then (a *checkpoint*: a compact JWS over
  ``{gateway, seq, hash, at}`` made with the gateway's key, verifiable with its JWKS);
- verifies a store: walks the chain, recomputes every content digest and link, compares
  the chained facts with the rows as they are now, checks every checkpoint signature, and
  names the first break (``modified``, ``deleted``, ``inserted``, ``reordered``,
  ``forged``);
- exports one message as an evidence bundle and checks such a bundle offline with nothing
  but a trusted JWKS.

Formats and the reasoning behind them: ``docs/audit.md``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from gateway.errors import GatewayError, StoreError
from gateway.keys import KeyPair, public_from_jwk
from gateway.sm2 import Sm2PrivateKey, Sm2PublicKey
from gateway.store import chain
from gateway.store.chain import ChainRow, CheckpointRow, canonical, link

__all__ = [
    "BUNDLE_FORMAT",
    "BundleReport",
    "CheckpointSigner",
    "Finding",
    "JwsInvalid",
    "Report",
    "canonical_bundle",
    "check_bundle",
    "export_bundle",
    "jwks_from",
    "make_checkpoint",
    "open_store",
    "sign_jws",
    "verify_chain",
    "verify_jws",
]

log = logging.getLogger("gateway.audit")

BUNDLE_FORMAT = "gw-evidence/1"
CHECKPOINT_TYPE = "gw-checkpoint"
KINDS = ("modified", "deleted", "inserted", "reordered", "forged")

# JWS (RFC 7515/7518/8037) names of the gateway's key algorithms; SM2-SM3 is ours, with an
# r‖s signature as ES256 (docs/decisions.md, National cryptography).
_JWS_ALG = {
    "ed25519": "EdDSA",
    "ecdsa-p256-sha256": "ES256",
    "rsa-pss-sha512": "PS512",
    "sm2-sm3": "SM2-SM3",
}
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64)
_B64U = re.compile(r"^[A-Za-z0-9_-]*$")
_INF = math.inf


# Checkpoints: compact JWS ---------------------------------------------------------------


class JwsInvalid(ValueError):
    """A checkpoint signature that does not hold, or cannot be checked."""


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes:
    """Strict base64url: one spelling per byte string, so no bit can change unnoticed."""
    if not _B64U.match(text):
        raise JwsInvalid("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64u(data) != text:
        raise JwsInvalid("non-canonical base64url")
    return data


def sign_jws(keypair: KeyPair, payload: Mapping[str, Any]) -> str:
    """A compact JWS over ``payload`` (canonical JSON) with the gateway's key."""
    alg = _JWS_ALG.get(keypair.algorithm)
    if alg is None:
        raise StoreError(f"cannot sign checkpoints with a {keypair.algorithm} key")
    header = {"alg": alg, "kid": keypair.kid, "typ": CHECKPOINT_TYPE}
    signing_input = f"{_b64u(canonical(header).encode())}.{_b64u(canonical(payload).encode())}"
    data = signing_input.encode("ascii")
    key = keypair.private
    if isinstance(key, Sm2PrivateKey | ed25519.Ed25519PrivateKey):
        signature = key.sign(data)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = key.sign(data, _PSS, hashes.SHA512())
    return f"{signing_input}.{_b64u(signature)}"


def verify_jws(jws: str, jwks: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a checkpoint JWS against a JWKS; return its header and payload."""
    parts = jws.split(".")
    if len(parts) != 3:
        raise JwsInvalid("not a compact JWS")
    try:
        header = json.loads(_unb64u(parts[0]))
        payload = json.loads(_unb64u(parts[1]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JwsInvalid("the JWS header or payload is not JSON") from exc
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise JwsInvalid("the JWS header or payload is not an object")
    if header.get("typ") != CHECKPOINT_TYPE:
        raise JwsInvalid("not a checkpoint")
    kid = header.get("kid")
    found = [k for k in jwks.get("keys", []) if isinstance(k, dict) and k.get("kid") == kid]
    if not found:
        raise JwsInvalid(f"signed by key {kid!r}, which the JWKS does not hold")
    try:
        key = public_from_jwk(found[0])
    except ValueError as exc:
        raise JwsInvalid(f"the JWKS key {kid!r} is unusable: {exc}") from exc
    signature = _unb64u(parts[2])
    data = f"{parts[0]}.{parts[1]}".encode("ascii")
    alg = header.get("alg")
    try:
        if (isinstance(key, ed25519.Ed25519PublicKey) and alg == "EdDSA") or (
            isinstance(key, Sm2PublicKey) and alg == "SM2-SM3"
        ):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey) and alg == "ES256":
            if len(signature) != 64:
                raise InvalidSignature
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            key.verify(der, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey) and alg == "PS512":
            key.verify(signature, data, _PSS, hashes.SHA512())
        else:
            raise JwsInvalid(f"alg {alg!r} does not fit key {kid!r}")
    except InvalidSignature as exc:
        raise JwsInvalid(f"the signature by key {kid!r} does not verify") from exc
    return header, payload


def make_checkpoint(
    db: sqlite3.Connection, keypair: KeyPair, gateway: str, now: float | None = None
) -> CheckpointRow | None:
    """Sign the chain head and store the checkpoint; ``None`` when it is signed already."""
    try:
        head = chain.read_head(db)
        last = chain.latest_checkpoint(db)
        signed = chain.hash_at(db, last.seq) if last is not None else None
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the chain head: {exc}") from exc
    if head.seq == 0 or (last is not None and last.seq >= head.seq):
        return None
    if last is not None and signed != last.hash:
        # Never bless a chain whose signed part changed: that is for `audit verify` to name.
        raise StoreError(
            f"the chain no longer matches checkpoint {last.id} at seq {last.seq}; not signing "
            "(run gateway audit verify)"
        )
    at = time.time() if now is None else now
    jws = sign_jws(keypair, {"gateway": gateway, "seq": head.seq, "hash": head.hash, "at": at})
    chain.add_checkpoint(db, seq=head.seq, hash=head.hash, at=at, kid=keypair.kid, jws=jws)
    return chain.latest_checkpoint(db)


_T = TypeVar("_T")


class Connected(Protocol):
    """Whatever writes to the open store (``SQLiteStore.write``: a group-commit unit)."""

    async def write(self, unit: Callable[[sqlite3.Connection], _T]) -> _T: ...


class CheckpointSigner:
    """Signs the chain head every ``interval_s`` when it moved, and once more at shutdown."""

    def __init__(
        self, *, store: Connected, keypair: KeyPair, gateway: str, interval_s: float
    ) -> None:
        self.store = store
        self.keypair = keypair
        self.gateway = gateway
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def checkpoint(self) -> CheckpointRow | None:
        """Sign under the write lock: two workers never sign the same head twice."""
        return await self.store.write(lambda db: make_checkpoint(db, self.keypair, self.gateway))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-checkpoints")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.checkpoint()
            except GatewayError:
                log.warning("could not sign a checkpoint; will retry", exc_info=True)

    async def stop(self) -> None:
        """Stop the timer and sign what the last requests appended."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.checkpoint()
        except GatewayError:
            log.warning("could not sign the final checkpoint", exc_info=True)


# Verification of a store ----------------------------------------------------------------


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


def _matches(body: bytes, digest: str | None) -> bool:
    return hashlib.sha256(body).hexdigest() == digest or (body == b"" and digest == "")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Verifier:
    LOOKUPS = 20  # broken links we trace back (a scan each) before classifying coarsely

    def __init__(self, db: sqlite3.Connection, jwks: Mapping[str, Any], gateway: str | None):
        self.db = db
        self.jwks = jwks
        self.gateway = gateway
        self.found: list[tuple[float, int, Finding]] = []
        self.messages: dict[int, _Expected] = {}
        self.callbacks: dict[int, _Expected] = {}
        self.rejections: dict[int, _Expected] = {}
        self.before = {"messages": 0, "callbacks": 0, "rejections": 0}
        self.purges: list[tuple[int, float]] = []  # (chain seq, cutoff) of each purge
        self.lookups = 0

    def add(self, seq: int | None, kind: str, detail: str, priority: int = 1) -> None:
        """Priority 0 and 1: the chain and its checkpoints; 2: a row that disagrees with it.

        Breaks in the chain come first: rows are judged against the chain, so a break in it
        explains row disagreements (a deleted outcome record leaves its row unexplained)."""
        self.found.append(
            (_INF if seq is None else seq, priority, Finding(seq=seq, kind=kind, detail=detail))
        )

    def run(self) -> Report:
        cps = chain.checkpoints(self.db)
        wanted = {cp.seq for cp in cps}
        hash_at: dict[int, str] = {}
        count = last = 0
        prev: ChainRow | None = None
        prev2: ChainRow | None = None
        for row in chain.chain_rows(self.db):
            count += 1
            last = row.seq
            if row.seq in wanted:
                hash_at[row.seq] = row.hash
            facts = self.record(row)
            self.position(row, prev, prev2, facts)
            if facts is not None:
                self.apply(row, facts)
            prev2, prev = prev, row
        self.rows()
        sealed = self.seals(cps, hash_at, last)
        self.found.sort(key=lambda f: (f[1] == 2, f[0], f[1]))
        return Report(
            records=count,
            checkpoints=len(cps),
            sealed=sealed,
            findings=tuple(f for _, _, f in self.found),
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

    def position(
        self,
        row: ChainRow,
        prev: ChainRow | None,
        prev2: ChainRow | None,
        facts: dict[str, Any] | None,
    ) -> None:
        """The record's place: no gap before it, and a link to the record before it."""
        expected_seq = prev.seq + 1 if prev else 1
        if row.seq != expected_seq:
            missing = (
                f"record {expected_seq} is"
                if row.seq == expected_seq + 1
                else f"records {expected_seq}..{row.seq - 1} are"
            )
            self.add(expected_seq, "deleted", f"{missing} missing from the chain", 0)
            return
        expected = prev.hash if prev else chain.GENESIS
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
        where = self.locate(row.prev_hash)
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

    def locate(self, value: str) -> int | None:
        if self.lookups >= self.LOOKUPS:
            return None
        self.lookups += 1
        return chain.find_hash(self.db, value)

    def apply(self, row: ChainRow, facts: dict[str, Any]) -> None:
        """Fold one event into what the rows should hold now."""
        kind, ref, at, seq = facts.get("kind"), facts.get("ref"), facts.get("at"), row.seq
        if kind == "genesis":
            self.before.update(facts.get("before") or {})
        elif kind == "purge":
            self.purges.append((seq, float(facts.get("cutoff") or -_INF)))
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

    # The rows as they are now

    def rows(self) -> None:
        self.table("messages", self.messages, self.message)
        self.table("callbacks", self.callbacks, self.callback)
        self.table("rejections", self.rejections, self.rejection)

    def table(self, name: str, expected: dict[int, _Expected], compare: Any) -> None:
        identity = {
            (e.facts.get("client"), e.facts.get("message_id")): ref for ref, e in expected.items()
        }
        seen: set[int] = set()
        for row in chain.data_rows(self.db, name):
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

    def body(
        self, what: str, label: str, body: bytes | None, digest: Any, at: int, exp: _Expected
    ) -> None:
        if body is None:
            if digest is not None and not self.purged(exp):
                self.differ(at, what, f"its {label} is gone, and no purge covers it")
        elif digest is None:
            self.differ(at, what, f"it holds a {label} the chain never recorded")
        elif not _matches(body, digest):
            self.differ(at, what, f"its {label} does not match its chained digest")

    def message(self, seq: int, row: Mapping[str, Any], exp: _Expected) -> None:
        what = f"messages.seq {seq}"
        self.fields(what, row, exp, ("service", "mode", "target", "request_digest"))
        if _sha(row["request_headers"]) != exp.facts.get("headers_digest"):
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
        if _sha(row["headers"]) != exp.facts.get("headers_digest"):
            self.differ(exp.seq, what, "its headers differ from the chain")
        # A purged callback body is the empty blob (the column is NOT NULL).
        body = row["body"] or None
        self.body(what, "body", body, exp.facts.get("body_digest"), exp.seq, exp)
        if row["created_at"] != exp.values.get("created_at"):
            self.differ(exp.by("created_at"), what, "its creation time differs from the chain")
        if row["state"] != exp.values.get("state"):
            self.differ(exp.by("state"), what, "its state differs from the chain")

    def rejection(self, seq: int, row: Mapping[str, Any], exp: _Expected) -> None:
        what = f"rejections.seq {seq}"
        self.fields(what, row, exp, ("service", "status", "code", "digest", "size", "at"))

    # Checkpoints

    def seals(self, cps: list[CheckpointRow], hash_at: Mapping[int, str], last: int) -> int:
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
        high = chain.checkpoint_high_water(self.db)
        if high > previous_id:
            self.add(
                (cps[-1].seq if cps else 0) + 1,
                "deleted",
                f"checkpoints {previous_id + 1}..{high} are missing",
                0,
            )
        return sealed


def verify_chain(
    db: sqlite3.Connection, jwks: Mapping[str, Any], *, gateway: str | None = None
) -> Report:
    """Walk the whole log in one read snapshot; findings come first break first."""
    if not chain.schema_has_chain(db):
        raise StoreError("this store has no message log chain yet (start the gateway once)")
    db.execute("BEGIN")
    try:
        return _Verifier(db, jwks, gateway).run()
    finally:
        db.execute("ROLLBACK")


def open_store(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A plain connection for the audit commands (read-only ones never write)."""
    if not path.exists():
        raise StoreError(f"no store at {path}")
    try:
        uri = path.resolve().as_uri() + ("?mode=ro" if readonly else "")
        return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the store at {path}: {exc}") from exc


# Evidence bundles ------------------------------------------------------------------------


def canonical_bundle(bundle: Mapping[str, Any]) -> bytes:
    """The one byte sequence a bundle is written as (``check`` insists on it)."""
    return (json.dumps(bundle, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def export_bundle(
    db: sqlite3.Connection, message: Mapping[str, Any], jwks: Mapping[str, Any]
) -> dict[str, Any]:
    """One message's records and the chain from its first record to a signed checkpoint.

    The records of other messages in that stretch appear only as digests and hashes.
    ``message`` is a row from ``chain.messages_by_id``. The caller makes sure a checkpoint
    covers the message (``make_checkpoint``) before calling.
    """
    seq = int(message["seq"])
    callbacks = chain.callbacks_of(db, seq)
    span = chain.own_events(db, seq, [int(c["seq"]) for c in callbacks])
    if span is None:
        raise StoreError(f"message {message['message_id']} predates the chain")
    cp = chain.checkpoint_covering(db, span[1])
    if cp is None:
        raise StoreError("no signed checkpoint covers this message yet")
    own_callbacks = {int(c["seq"]) for c in callbacks}
    rows = []
    for r in chain.chain_rows(db, span[0], cp.seq):
        entry: dict[str, Any] = {
            "seq": r.seq,
            "content_digest": r.content_digest,
            "prev_hash": r.prev_hash,
            "hash": r.hash,
        }
        if (r.kind.startswith("message.") and r.ref == seq) or (
            r.kind.startswith("callback.") and r.ref in own_callbacks
        ):
            entry["facts"] = r.facts
        rows.append(entry)
    header, payload = verify_jws(cp.jws, jwks)
    key = [k for k in jwks["keys"] if k.get("kid") == header["kid"]]
    return {
        "format": BUNDLE_FORMAT,
        "gateway": payload.get("gateway"),
        "message": {
            "seq": seq,
            "request_headers": message["request_headers"],
            "request_body": _b64(message["request_body"]),
            "response_body": _b64(message["response_body"]),
            "result": _b64(message["result"]),
        },
        "callbacks": [
            {"seq": int(c["seq"]), "headers": c["headers"], "body": _b64(c["body"] or None)}
            for c in callbacks
        ],
        "chain": rows,
        "checkpoint": {"seq": cp.seq, "hash": cp.hash, "at": cp.at, "kid": cp.kid, "jws": cp.jws},
        "jwks": {"keys": key},
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleReport:
    ok: bool
    trusted: bool  # verified against a JWKS given by the caller, not the bundle's own
    problem: str | None
    summary: tuple[str, ...]


class _Bad(Exception):
    """The first thing wrong with a bundle."""


def _object(
    value: Any, keys: set[str], where: str, optional: set[str] | None = None
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} is not an object")
    allowed = keys | (optional or set())
    if not keys <= set(value) <= allowed:
        raise _Bad(f"{where} has fields {sorted(value)}, expected {sorted(allowed)}")
    return value


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f"{where} is not an integer")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} is not a string")
    return value


def _body(value: Any, where: str) -> bytes | None:
    if value is None:
        return None
    text = _str(value, where)
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise _Bad(f"{where} is not base64") from exc
    if base64.b64encode(data).decode("ascii") != text:
        raise _Bad(f"{where} is not canonical base64")
    return data


def _iso(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def check_bundle(raw: bytes, trusted: Mapping[str, Any] | None) -> BundleReport:
    """Check an evidence bundle offline; ``trusted`` is the JWKS to believe (else its own)."""
    summary: list[str] = []
    try:
        _check(raw, trusted, summary)
    except _Bad as exc:
        return BundleReport(ok=False, trusted=False, problem=str(exc), summary=tuple(summary))
    return BundleReport(ok=True, trusted=trusted is not None, problem=None, summary=tuple(summary))


def _check(raw: bytes, trusted: Mapping[str, Any] | None, summary: list[str]) -> None:
    try:
        data = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Bad(f"not a JSON bundle: {exc}") from exc
    doc = _object(
        data, {"format", "gateway", "message", "callbacks", "chain", "checkpoint", "jwks"}, "bundle"
    )
    if canonical_bundle(doc) != raw:
        raise _Bad("the file is not byte for byte what export writes (it was edited)")
    if doc["format"] != BUNDLE_FORMAT:
        raise _Bad(f"unknown format {doc['format']!r}")
    gateway = _str(doc["gateway"], "gateway")

    # The signed checkpoint, against the trusted key.
    cp = _object(doc["checkpoint"], {"seq", "hash", "at", "kid", "jws"}, "checkpoint")
    embedded = _object(doc["jwks"], {"keys"}, "jwks")["keys"]
    if not isinstance(embedded, list) or len(embedded) != 1 or not isinstance(embedded[0], dict):
        raise _Bad("jwks must hold exactly the checkpoint's key")
    key = embedded[0]
    if trusted is not None:
        mine = [k for k in trusted.get("keys", []) if k.get("kid") == cp["kid"]]
        if not mine:
            raise _Bad(f"the trusted JWKS has no key {cp['kid']!r}")
        if mine[0] != key:
            raise _Bad("the bundle's key differs from the trusted key with the same kid")
    try:
        header, payload = verify_jws(_str(cp["jws"], "checkpoint.jws"), {"keys": [key]})
    except JwsInvalid as exc:
        raise _Bad(f"checkpoint: {exc}") from exc
    signed = {"gateway": gateway, "seq": cp["seq"], "hash": cp["hash"], "at": cp["at"]}
    if payload != signed or header.get("kid") != cp["kid"]:
        raise _Bad("the checkpoint fields differ from what was signed")

    # The chain: consecutive, linked, ending at the signed hash.
    rows = doc["chain"]
    if not isinstance(rows, list) or not rows:
        raise _Bad("chain is empty")
    full = {"seq", "content_digest", "prev_hash", "hash"}
    own: list[dict[str, Any]] = []
    first = _int(_object(rows[0], full, "chain[0]", {"facts"})["seq"], "chain[0].seq")
    for i, entry in enumerate(rows):
        where = f"chain record {first + i}"
        e = _object(entry, full, where, {"facts"})
        if _int(e["seq"], where) != first + i:
            raise _Bad(f"{where}: out of sequence")
        digest = _str(e["content_digest"], where)
        if i and e["prev_hash"] != rows[i - 1]["hash"]:
            raise _Bad(f"{where}: does not link to the record before it")
        if link(_str(e["prev_hash"], where), digest) != e["hash"]:
            raise _Bad(f"{where}: its hash does not hold")
        if "facts" in e:
            text = _str(e["facts"], where)
            if chain.content_digest(text) != digest:
                raise _Bad(f"{where}: its facts do not match its content digest")
            facts = json.loads(text)
            if not isinstance(facts, dict) or facts.get("seq") != e["seq"]:
                raise _Bad(f"{where}: its facts name another place in the chain")
            own.append(facts)
    if rows[-1]["seq"] != cp["seq"] or rows[-1]["hash"] != cp["hash"]:
        raise _Bad("the chain does not end at the signed checkpoint")

    # The message's own records: every one about this message, bodies matching digests.
    message = _object(
        doc["message"],
        {"seq", "request_headers", "request_body", "response_body", "result"},
        "message",
    )
    mseq = _int(message["seq"], "message.seq")
    if not own or own[0].get("kind") != "message.accepted" or own[0].get("ref") != mseq:
        raise _Bad("the chain does not start with the message's acceptance")
    if own[0].get("seq") != first:
        raise _Bad("the chain does not start with the message's acceptance")
    accepted = own[0]
    callbacks = doc["callbacks"]
    if not isinstance(callbacks, list):
        raise _Bad("callbacks is not a list")
    cb_docs = {}
    for i, c in enumerate(callbacks):
        cbd = _object(c, {"seq", "headers", "body"}, f"callbacks[{i}]")
        cb_docs[_int(cbd["seq"], f"callbacks[{i}].seq")] = cbd
    cb_facts: dict[int, dict[str, Any]] = {}
    response: str | None = None
    result: str | None = None
    timeline = []
    for facts in own:
        kind, ref = facts.get("kind"), facts.get("ref")
        if kind == "callback.accepted" and facts.get("original_seq") == mseq and ref in cb_docs:
            cb_facts[ref] = facts
            result = facts.get("body_digest")
        elif kind in ("callback.finished", "callback.redelivered") and ref in cb_facts:
            pass
        elif str(kind).startswith("message.") and ref == mseq:
            if kind == "message.finished":
                response = facts.get("response_digest")
            if "result_digest" in facts:
                result = facts["result_digest"]
            if kind == "message.accepted" and facts is not accepted:
                raise _Bad(f"chain record {facts.get('seq')}: a second acceptance")
        else:
            raise _Bad(f"chain record {facts.get('seq')} is not about this message")
        timeline.append(
            f"  seq {facts.get('seq')}  {_iso(facts.get('at'))}  {kind}  "
            f"{facts.get('state') or ''}".rstrip()
        )
    if set(cb_facts) != set(cb_docs):
        raise _Bad("the callbacks and their chain records do not correspond")
    if _sha(_str(message["request_headers"], "message.request_headers")) != accepted.get(
        "headers_digest"
    ):
        raise _Bad("the request headers do not match their chained digest")
    _match(
        _body(message["request_body"], "message.request_body"),
        accepted.get("request_digest"),
        "request body",
    )
    _match(_body(message["response_body"], "message.response_body"), response, "response body")
    _match(_body(message["result"], "message.result"), result, "result")
    for cseq, cbd in cb_docs.items():
        if _sha(_str(cbd["headers"], "callback headers")) != cb_facts[cseq].get("headers_digest"):
            raise _Bad(f"callback {cseq}: its headers do not match their chained digest")
        _match(
            _body(cbd["body"], "callback body"),
            cb_facts[cseq].get("body_digest"),
            f"callback {cseq} body",
        )

    summary.append(
        f"message {accepted.get('message_id')} from {accepted.get('client')} "
        f"({accepted.get('service')}), accepted {_iso(accepted.get('at'))} by {gateway}"
    )
    summary.extend(timeline)
    summary.append(
        f"sealed by checkpoint at seq {cp['seq']} ({_iso(cp['at'])}), key {cp['kid']}, "
        f"{len(rows)} chain records"
    )


def _match(body: bytes | None, digest: Any, what: str) -> None:
    if body is None:
        return  # purged, or never there: the digest alone is the evidence
    if digest is None or not _matches(body, digest):
        raise _Bad(f"the {what} does not match its chained digest")


def jwks_from(config_jwk: Path, previous: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The gateway's public keys as its JWKS endpoint serves them."""
    keys: list[dict[str, Any]] = [json.loads(config_jwk.read_text(encoding="utf-8"))]
    keys.extend(dict(k) for k in previous)
    return {"keys": keys}
