"""Archives of the message log: the oldest records leave the store for signed files.

``write_archives`` reads one snapshot of the store, picks the chain prefix older than a
cutoff whose rows are all finished (no event about them after it), writes it as archive
files (one per UTC day, split past a size), fsyncs and verifies each, and only then asks
the store to cut that prefix (``Store.cut_archived``). ``verify_archives`` walks the
archives and the live store as one chain (``verify_chain`` over ``CombinedSnapshot``) and
names a removed, reordered, inserted or edited archive.

The file format, precise enough for a checker in another language: docs/audit.md,
"Archives".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.audit.jws import JwsInvalid, sign_jws, verify_jws
from gateway.audit.timestamping import StampTrust
from gateway.audit.verify import Finding, Report, verify_chain
from gateway.crypto.keys import KeyPair
from gateway.errors import StoreError
from gateway.states import CallbackState, MessageState
from gateway.store import ChainSnapshot, Store
from gateway.store.archived import ArchiveMark
from gateway.store.chain import GENESIS, ChainRow, CheckpointRow, canonical, content_digest, link

__all__ = [
    "ARCHIVE_FORMAT",
    "ARCHIVE_TYPE",
    "ArchiveFile",
    "ArchiveRun",
    "CombinedSnapshot",
    "check_archive",
    "verify_archives",
    "write_archives",
]

ARCHIVE_FORMAT = "gw-archive/1"
ARCHIVE_TYPE = "gw-archive"  # the JWS typ of an archive's signature
SUFFIX = ".gwa"
TABLES = ("messages", "callbacks", "rejections")
BYTES_COLUMNS = frozenset({"request_body", "response_body", "result", "body"})
# States after which no event about a row can follow: only such rows leave the store.
# A dead letter can be put back by an operator, so it stays until it is finished.
_DONE_MESSAGES = frozenset(
    {MessageState.ANSWERED, MessageState.CALLBACK_DELIVERED, MessageState.FAILED}
)
_DONE_CALLBACKS = frozenset({CallbackState.DELIVERED})
_NAME = re.compile(r"^(\d{8})-(\d{12})\.gwa$")


def _line(obj: Mapping[str, Any]) -> bytes:
    return canonical(obj).encode("ascii") + b"\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _day(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y%m%d")


def file_name(day: str, first_seq: int) -> str:
    """``YYYYMMDD-<first seq, 12 digits>.gwa``: names sort in chain order."""
    return f"{day}-{first_seq:012d}{SUFFIX}"


def _encode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (base64.b64encode(v).decode("ascii") if isinstance(v, bytes | memoryview) else v)
        for k, v in row.items()
    }


def _decode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (base64.b64decode(v, validate=True) if k in BYTES_COLUMNS and v is not None else v)
        for k, v in row.items()
    }


def _record(row: ChainRow) -> dict[str, Any]:
    return {
        "t": "record",
        "seq": row.seq,
        "at": row.at,
        "kind": row.kind,
        "ref": row.ref,
        "facts": row.facts,
        "content_digest": row.content_digest,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


# Reading and checking one file -----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchiveFile:
    """One archive file, parsed and checked on its own (``check_archive``)."""

    name: str
    digest: str  # sha256 of the whole file
    size: int
    header: dict[str, Any]
    records: list[ChainRow]
    rows: dict[str, list[dict[str, Any]]]  # bodies as bytes again
    checkpoint: CheckpointRow | None
    problems: list[str] = field(default_factory=list)

    @property
    def first_seq(self) -> int:
        return int(self.header.get("first_seq") or 0)

    @property
    def last_seq(self) -> int:
        return int(self.header.get("last_seq") or 0)


def check_archive(
    name: str, raw: bytes, jwks: Mapping[str, Any], gateway: str | None = None
) -> ArchiveFile:
    """Parse one archive file and check everything it can prove alone: its signature, its
    records' digests and links, the link tail up to the checkpoint, and the checkpoint."""
    problems: list[str] = []
    header: dict[str, Any] = {}
    records: list[ChainRow] = []
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    checkpoint: CheckpointRow | None = None
    links: list[dict[str, Any]] = []

    def done() -> ArchiveFile:
        return ArchiveFile(
            name=name,
            digest=_sha(raw),
            size=len(raw),
            header=header,
            records=records,
            rows=rows,
            checkpoint=checkpoint,
            problems=problems,
        )

    if not raw.endswith(b"\n"):
        problems.append("it does not end with a newline (truncated?)")
        return done()
    cut = raw.rfind(b"\n", 0, len(raw) - 1) + 1
    signed, last_line = raw[:cut], raw[cut:]
    try:
        lines = [json.loads(x) for x in signed.splitlines()]
        signature = json.loads(last_line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        problems.append("a line is not JSON")
        return done()
    if not lines or not isinstance(signature, dict) or signature.get("t") != "signature":
        problems.append("it has no header or no signature line")
        return done()
    try:
        _, payload = verify_jws(str(signature.get("jws")), jwks, typ=ARCHIVE_TYPE)
    except JwsInvalid as exc:
        problems.append(f"its signature does not verify: {exc}")
        payload = {}
    if payload and payload.get("sha256") != _sha(signed):
        problems.append("its content is not what was signed")
    first = lines[0]
    if not isinstance(first, dict) or first.get("t") != "header":
        problems.append("its first line is not the header")
        return done()
    header = first
    if header.get("format") != ARCHIVE_FORMAT:
        problems.append(f"unknown format {header.get('format')!r}")
    if payload and (payload.get("name"), payload.get("gateway")) != (
        header.get("name"),
        header.get("gateway"),
    ):
        problems.append("its signature names another archive or gateway")
    if gateway is not None and header.get("gateway") != gateway:
        problems.append(f"it is another gateway's archive ({header.get('gateway')!r})")
    for obj in lines[1:]:
        t = obj.get("t") if isinstance(obj, dict) else None
        try:
            if t == "record":
                records.append(ChainRow(**{k: obj[k] for k in ChainRow.__slots__}))
            elif t == "row" and obj.get("table") in rows:
                rows[obj["table"]].append(_decode_row(obj["row"]))
            elif t == "link":
                links.append(obj)
            elif t == "checkpoint" and checkpoint is None:
                checkpoint = CheckpointRow(
                    id=obj["id"],
                    seq=obj["seq"],
                    hash=obj["hash"],
                    at=obj["at"],
                    kid=obj["kid"],
                    jws=obj["jws"],
                )
            else:
                problems.append(f"an unexpected line ({t!r})")
        except (KeyError, TypeError, ValueError):
            problems.append(f"a malformed {t} line")
    _check_links(header, records, links, checkpoint, jwks, gateway, problems)
    return done()


def _check_links(
    header: Mapping[str, Any],
    records: Sequence[ChainRow],
    links: Sequence[Mapping[str, Any]],
    checkpoint: CheckpointRow | None,
    jwks: Mapping[str, Any],
    gateway: str | None,
    problems: list[str],
) -> None:
    """Records and link tail consecutive and linked from the header's prev_hash up to the
    checkpoint's (seq, hash), and the checkpoint signed."""
    seq, prev = int(header.get("first_seq") or 0), str(header.get("prev_hash"))
    if not records or records[0].seq != seq or records[-1].seq != header.get("last_seq"):
        problems.append("its records do not span the header's first_seq..last_seq")
    for r in records:
        if r.seq != seq or r.prev_hash != prev:
            problems.append(f"record {r.seq} does not follow record {seq - 1}")
        if content_digest(r.facts) != r.content_digest or link(r.prev_hash, r.content_digest) != (
            r.hash
        ):
            problems.append(f"record {r.seq} does not match its digest or hash")
        seq, prev = r.seq + 1, r.hash
    for lk in links:
        if lk.get("seq") != seq or lk.get("prev_hash") != prev:
            problems.append(f"the link at seq {lk.get('seq')} does not follow seq {seq - 1}")
        if link(str(lk.get("prev_hash")), str(lk.get("content_digest"))) != lk.get("hash"):
            problems.append(f"the link at seq {lk.get('seq')} does not match its hash")
        seq, prev = int(lk.get("seq") or 0) + 1, str(lk.get("hash"))
    if checkpoint is None:
        problems.append("it carries no checkpoint")
        return
    if (checkpoint.seq, checkpoint.hash) != (seq - 1, prev):
        problems.append(f"its chain does not end at checkpoint {checkpoint.id}'s signed seq")
    try:
        _, signed = verify_jws(checkpoint.jws, jwks)
    except JwsInvalid as exc:
        problems.append(f"checkpoint {checkpoint.id}: {exc}")
        return
    expected = {"seq": checkpoint.seq, "hash": checkpoint.hash, "at": checkpoint.at}
    if gateway is not None:
        expected["gateway"] = gateway
    if {k: signed.get(k) for k in expected} != expected:
        problems.append(f"checkpoint {checkpoint.id} differs from what was signed")


# Writing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchiveRun:
    """What one ``write_archives`` did."""

    files: tuple[Path, ...]
    records: int  # chain records archived
    rows: int  # messages + callbacks + rejections moved out of the store
    bytes: int
    cut: bool  # the store let go of them (False: the log moved; run again)
    reason: str = ""  # why nothing was archived, when nothing was


@dataclass(slots=True)
class _Row:
    table: str
    created: int  # the chain record that created it
    last: int  # its latest chain event
    open: bool
    data: dict[str, Any] | None = None


def _touches(row: ChainRow, facts: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The rows a chain record is about: its own, and a callback's message."""
    out: list[tuple[str, int]] = []
    if row.ref is not None:
        if row.kind.startswith("message."):
            out.append(("messages", row.ref))
        elif row.kind.startswith("callback."):
            out.append(("callbacks", row.ref))
        elif row.kind == "rejection":
            out.append(("rejections", row.ref))
    original = facts.get("original_seq")
    if isinstance(original, int):
        out.append(("messages", original))
    return out


async def _plan(
    snap: ChainSnapshot, cutoff: float, start: int
) -> tuple[list[ChainRow], dict[tuple[str, int], _Row], int, int]:
    """The chain prefix to archive: records older than ``cutoff`` (never the head), cut
    back until no row it created is still open or has an event after it."""
    records: list[ChainRow] = []
    rows: dict[tuple[str, int], _Row] = {}
    by_callback: dict[int, int] = {}  # callbacks.seq → its message's seq
    head = start - 1
    young = False
    async for r in snap.chain_rows(start):
        head = r.seq
        facts = json.loads(r.facts)
        if not young and r.at < cutoff:
            records.append(r)
        else:
            young = True
        if r.kind.endswith(".accepted") or r.kind == "rejection":
            table = _touches(r, {})[0][0] if r.ref is not None else ""
            if table and r.ref is not None:
                rows[(table, r.ref)] = _Row(table=table, created=r.seq, last=r.seq, open=False)
                if r.kind == "callback.accepted" and isinstance(facts.get("original_seq"), int):
                    by_callback[r.ref] = facts["original_seq"]
        for key in _touches(r, facts):
            if key in rows:
                rows[key].last = r.seq
        if r.kind.startswith("callback.") and r.ref in by_callback:
            message = rows.get(("messages", by_callback[r.ref]))
            if message is not None:
                message.last = r.seq
    if records and records[-1].seq >= head:
        records.pop()  # the head record always stays: the store reads its head from it
    last = records[-1].seq if records else start - 1
    for table in TABLES:
        async for data in snap.data_rows(table):
            found = rows.get((table, int(data["seq"])))
            if found is None or found.created > last:
                continue
            found.data = data
            state = data.get("state")
            if table == "messages":
                found.open = state not in _DONE_MESSAGES
            elif table == "callbacks":
                found.open = state not in _DONE_CALLBACKS
    while True:
        pinned = [
            r.created - 1
            for r in rows.values()
            if r.created <= last and (r.open or r.last > last or r.data is None)
        ]
        new = min([last, *pinned])
        if new == last:
            break
        last = new
    records = [r for r in records if r.seq <= last]
    return records, rows, last, head


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _persist(path: Path, data: bytes) -> bytes:
    """Write, fsync, rename into place, fsync the directory; the file as read back."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)
    return path.read_bytes()


async def write_archives(
    store: Store,
    keypair: KeyPair,
    jwks: Mapping[str, Any],
    *,
    gateway: str,
    to: Path,
    cutoff: float,
    now: float,
    max_bytes: int = 64 * 1024 * 1024,
) -> ArchiveRun:
    """Archive what is older than ``cutoff`` to ``to``; the store lets go of it only after
    every file is written, fsynced and verified (read back from disk)."""
    async with store.snapshot() as snap:
        marks = await snap.archives()
        start = marks[-1].last_seq + 1 if marks else 1
        prev_hash = marks[-1].last_hash if marks else GENESIS
        prev_digest = marks[-1].digest if marks else None
        before: dict[str, int] = dict(marks[-1].before) if marks else {}
        records, rows, last, head = await _plan(snap, cutoff, start)
        if not records:
            return ArchiveRun(
                files=(), records=0, rows=0, bytes=0, cut=False, reason="nothing old enough"
            )
        cp = await snap.checkpoint_covering(last)
        if cp is None:
            return ArchiveRun(
                files=(), records=0, rows=0, bytes=0, cut=False, reason="no checkpoint covers it"
            )
        for r in records:
            if r.kind == "genesis":
                before.update(json.loads(r.facts).get("before") or {})
        groups = _split(records, rows, max_bytes)
        await asyncio.to_thread(_clear_leftovers, to, start)
        files: list[Path] = []
        new_marks: list[ArchiveMark] = []
        next_id = marks[-1].id + 1 if marks else 1
        total = 0
        for n, (group, group_rows) in enumerate(groups):
            g_last = group[-1].seq
            # The first checkpoint at or after the group's last record, and the links to it.
            g_cp = await snap.checkpoint_covering(g_last) or cp
            links = [row async for row in snap.chain_rows(g_last + 1, g_cp.seq)]
            name = file_name(_day(group[0].at), group[0].seq)
            data = _archive_bytes(
                keypair,
                gateway=gateway,
                name=name,
                group=group,
                rows=group_rows,
                links=links,
                cp=g_cp,
                prev_hash=prev_hash,
                prev_digest=prev_digest,
                part=n + 1,
                now=now,
            )
            path = to / name
            back = check_archive(name, await asyncio.to_thread(_persist, path, data), jwks, gateway)
            if back.problems or back.digest != _sha(data):
                raise OSError(f"{path} does not read back as written: {back.problems}")
            files.append(path)
            new_marks.append(
                ArchiveMark(
                    id=next_id + n,
                    name=name,
                    digest=back.digest,
                    first_seq=group[0].seq,
                    last_seq=g_last,
                    last_hash=group[-1].hash,
                    rows=sum(len(v) for v in group_rows.values()),
                    bytes=len(data),
                    before=before,
                    at=now,
                )
            )
            prev_hash, prev_digest = group[-1].hash, back.digest
            total += len(data)
    moved = {
        t: [key[1] for key, r in rows.items() if r.table == t and r.created <= last] for t in TABLES
    }
    cut = await store.cut_archived(new_marks, moved, head)
    return ArchiveRun(
        files=tuple(files),
        records=len(records),
        rows=sum(len(v) for v in moved.values()),
        bytes=total,
        cut=cut,
        reason="" if cut else "the log moved while archiving; nothing was deleted",
    )


def _split(
    records: Sequence[ChainRow], rows: Mapping[tuple[str, int], _Row], max_bytes: int
) -> list[tuple[list[ChainRow], dict[str, list[dict[str, Any]]]]]:
    """One group per UTC day, a new one when a group passes ``max_bytes`` (estimated)."""
    created = {r.created: r for r in rows.values() if r.data is not None}
    groups: list[tuple[list[ChainRow], dict[str, list[dict[str, Any]]]]] = []
    size = 0
    day = ""
    for rec in records:
        row = created.get(rec.seq)
        cost = (
            len(rec.facts)
            + 400
            + (
                sum(len(v) for v in row.data.values() if isinstance(v, bytes | str)) * 4 // 3
                if row is not None and row.data is not None
                else 0
            )
        )
        if not groups or _day(rec.at) != day or size + cost > max_bytes:
            groups.append(([], {t: [] for t in TABLES}))
            day, size = _day(rec.at), 0
        groups[-1][0].append(rec)
        if row is not None and row.data is not None:
            groups[-1][1][row.table].append(row.data)
        size += cost
    return groups


def _archive_bytes(
    keypair: KeyPair,
    *,
    gateway: str,
    name: str,
    group: Sequence[ChainRow],
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    links: Iterable[ChainRow],
    cp: CheckpointRow,
    prev_hash: str,
    prev_digest: str | None,
    part: int,
    now: float,
) -> bytes:
    header = {
        "t": "header",
        "format": ARCHIVE_FORMAT,
        "gateway": gateway,
        "name": name,
        "first_seq": group[0].seq,
        "last_seq": group[-1].seq,
        "prev_hash": prev_hash,
        "prev_archive": prev_digest,
        "part": part,
        "created_at": now,
        "counts": {t: len(rows.get(t, ())) for t in TABLES},
    }
    out = [_line(header)]
    out.extend(_line(_record(r)) for r in group)
    for table in TABLES:
        out.extend(
            _line({"t": "row", "table": table, "row": _encode_row(r)}) for r in rows.get(table, ())
        )
    out.extend(
        _line(
            {
                "t": "link",
                "seq": r.seq,
                "content_digest": r.content_digest,
                "prev_hash": r.prev_hash,
                "hash": r.hash,
            }
        )
        for r in links
    )
    out.append(
        _line(
            {
                "t": "checkpoint",
                "id": cp.id,
                "seq": cp.seq,
                "hash": cp.hash,
                "at": cp.at,
                "kid": cp.kid,
                "jws": cp.jws,
                # The checkpoint's RFC 3161 stamp (base64 DER TimeStampResp) once the TSA
                # work is merged; null while unstamped.
                "stamp": None,
            }
        )
    )
    body = b"".join(out)
    jws = sign_jws(
        keypair, {"gateway": gateway, "name": name, "sha256": _sha(body)}, typ=ARCHIVE_TYPE
    )
    return body + _line({"t": "signature", "jws": jws})


def _clear_leftovers(to: Path, start: int) -> None:
    """Files of an earlier run that wrote but never cut (its records are still in the
    store and are archived again now): the store never named them, so they go."""
    to.mkdir(parents=True, exist_ok=True)
    for path in to.glob(f"*{SUFFIX}"):
        match = _NAME.match(path.name)
        if match and int(match[2]) >= start:
            with contextlib.suppress(OSError):
                path.unlink()


# Verifying archives and the store as one chain ------------------------------------------


class CombinedSnapshot:
    """``ChainSnapshot`` over archive files followed by the live store: the chain and the
    rows as if nothing had been archived."""

    def __init__(
        self, files: Sequence[ArchiveFile], live: ChainSnapshot, marks: Sequence[ArchiveMark]
    ) -> None:
        self.files = files
        self.live = live
        self.marks = list(marks)

    async def chain_rows(self, first: int = 1, last: int | None = None) -> AsyncIterator[ChainRow]:
        for f in self.files:
            for r in f.records:
                if r.seq >= first and (last is None or r.seq <= last):
                    yield r
        async for r in self.live.chain_rows(first, last):
            yield r

    async def checkpoints(self) -> list[CheckpointRow]:
        return await self.live.checkpoints()

    async def stamps(self) -> dict[int, bytes]:
        return await self.live.stamps()  # the checkpoints kept live are the ones stamped

    async def checkpoint_high_water(self) -> int:
        return await self.live.checkpoint_high_water()

    async def checkpoint_covering(self, seq: int) -> CheckpointRow | None:
        return await self.live.checkpoint_covering(seq)

    async def find_hash(self, value: str) -> int | None:
        for f in self.files:
            for r in f.records:
                if r.hash == value:
                    return r.seq
        return await self.live.find_hash(value)

    async def data_rows(self, table: str) -> AsyncIterator[dict[str, Any]]:
        for f in self.files:
            for row in f.rows.get(table, ()):
                yield row
        async for row in self.live.data_rows(table):
            yield row

    async def messages_by_id(self, message_id: str) -> list[dict[str, Any]]:
        return await self.live.messages_by_id(message_id)

    async def callbacks_of(self, message_seq: int) -> list[dict[str, Any]]:
        return await self.live.callbacks_of(message_seq)

    async def own_events(
        self, message_seq: int, callback_seqs: list[int]
    ) -> tuple[int, int] | None:
        return await self.live.own_events(message_seq, callback_seqs)

    async def archives(self) -> list[ArchiveMark]:
        return self.marks  # verify_chain(whole=True): the walk starts at the genesis


def _order_findings(files: Sequence[ArchiveFile], marks: Sequence[ArchiveMark]) -> list[Finding]:
    """The archive files against each other and against the store's list of them."""
    out: list[Finding] = []
    by_name = {f.name: f for f in files}
    by_digest = {f.digest: f for f in files}
    for f in files:
        for problem in f.problems:
            kind = "forged" if problem.startswith("its signature") else "modified"
            out.append(Finding(f.first_seq or None, kind, f"archive {f.name}: {problem}"))
    named = {m.name for m in marks}
    for m in marks:
        found = by_name.get(m.name)
        if found is None:
            out.append(
                Finding(
                    m.first_seq,
                    "deleted",
                    f"archive {m.name} (records {m.first_seq}..{m.last_seq}) is missing",
                )
            )
        elif found.digest != m.digest:
            out.append(
                Finding(m.first_seq, "modified", f"archive {m.name} is not the file written")
            )
    for f in files:
        if f.name not in named:
            out.append(
                Finding(
                    f.first_seq or None,
                    "inserted",
                    f"archive {f.name} was never written by this store",
                )
            )
    previous: ArchiveFile | None = None
    for f in files:
        want = previous.digest if previous else None
        if f.header.get("prev_archive") != want:
            named_prev = by_digest.get(str(f.header.get("prev_archive")))
            where = (
                f"it follows {named_prev.name}, not {previous.name if previous else 'nothing'}"
                if named_prev is not None
                else "the archive it follows is not here"
            )
            out.append(
                Finding(
                    f.first_seq or None,
                    "reordered" if named_prev else "deleted",
                    f"archive {f.name}: {where}",
                )
            )
        previous = f
    return out


def _read_dir(directory: Path) -> list[tuple[str, bytes]]:
    if not directory.is_dir():
        raise StoreError(f"no archive directory {directory}")
    return [(p.name, p.read_bytes()) for p in sorted(directory.glob(f"*{SUFFIX}"))]


async def verify_archives(
    store: Store,
    directory: Path,
    jwks: Mapping[str, Any],
    *,
    gateway: str | None = None,
    tsa: StampTrust | None = None,
) -> Report:
    """Verify the archive files in ``directory`` and the live store as one chain."""
    files = [
        check_archive(name, raw, jwks, gateway)
        for name, raw in await asyncio.to_thread(_read_dir, directory)
    ]
    async with store.snapshot() as snap:
        marks = await snap.archives()
        report = await verify_chain(
            CombinedSnapshot(files, snap, marks),
            jwks,
            gateway=gateway,
            tsa=tsa,
            whole=True,
            box=store.secrets,
        )
    own = _order_findings(files, marks)
    return Report(
        records=report.records,
        checkpoints=report.checkpoints,
        sealed=report.sealed,
        findings=(*own, *report.findings),
        unopened=report.unopened,
    )
