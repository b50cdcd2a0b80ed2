"""Archives of the message log on real stores (SQLite and PostgreSQL) and a real gateway:
records leave the store only into signed, verified archive files; the archives and the
live store verify as one chain; a removed, reordered or edited archive is named; and an
independent checker (hashlib, json and ``openssl`` only) verifies an archive."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.audit import make_checkpoint, verify_store
from gateway.audit.archive import (
    ARCHIVE_FORMAT,
    check_archive,
    verify_archives,
    write_archives,
)
from gateway.audit.retention import LOCK, Retention
from gateway.cli.log import duration
from gateway.config.model import RetentionConfig, parse_config
from gateway.errors import ConfigError
from gateway.exchange.app import STORE
from gateway.store import Store
from tests.conftest import (
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    HarnessFactory,
    Keys,
    config_document,
    store_at,
)
from tests.test_audit import _answer, _claim_callback, _cli, _deliver, _jwks, _logged, _new

ROOT = Path(__file__).resolve().parent.parent
CHECKER = ROOT / "tests" / "archive_checker.py"


@pytest.fixture
async def any_store(store_url: str) -> AsyncIterator[Store]:
    """A store on each backend: archiving cuts both the same way."""
    s = store_at(store_url)
    await s.open()
    yield s
    await s.close()


async def _finished_sync(store: Store, body: bytes = b'{"uscc": "x"}') -> int:
    msg = await store.insert_message(
        _new(body, mode="sync", state="delivering", next_attempt_at=None)
    )
    await store.finish_message(
        msg.seq,
        state="answered",
        status=200,
        code=None,
        adapter="national",
        response_headers={"Content-Type": "application/json"},
        response_body=b'{"rating": "A"}',
    )
    return msg.seq


async def _answered_async(store: Store) -> int:
    """An async message, delivered, answered by callback, the callback delivered."""
    msg = await store.insert_message(_new())
    await _deliver(store, msg.seq)
    cb = await store.insert_callback(_answer(msg.seq, msg.message_id))
    assert cb is not None
    await _claim_callback(store, cb.seq)
    await store.finish_callback(cb.seq, state="delivered", attempts=1, error=None)
    return msg.seq


async def _archive(store: Store, keys: Keys, to: Path, **kw: Any) -> Any:
    await make_checkpoint(store, keys.pairs["gateway"], GATEWAY_ID)
    return await write_archives(
        store,
        keys.pairs["gateway"],
        _jwks(keys),
        gateway=GATEWAY_ID,
        to=to,
        cutoff=kw.pop("cutoff", time.time() + 1),
        now=time.time(),
        **kw,
    )


async def _independent(jwk: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    """The independent checker, in a process of its own that cannot import the gateway."""
    argv = [sys.executable, "-I", str(CHECKER), str(jwk), *map(str, files)]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, check=False
    )


async def _seqs(store: Store, table: str) -> list[int]:
    async with store.snapshot() as snap:
        return [int(r["seq"]) async for r in snap.data_rows(table)]


async def test_archiving_moves_finished_records_out_and_both_verify_as_one_chain(
    any_store: Store, keys: Keys, tmp_path: Path
) -> None:
    """Finished rows and their records leave the store into a signed file; an open one
    pins everything after it; the store alone and store + archives both verify."""
    store = any_store
    done = [await _finished_sync(store), await _answered_async(store)]
    pinned = await store.insert_message(_new())  # still in the outbox: must stay
    after = await _finished_sync(store)
    run = await _archive(store, keys, tmp_path / "arch")
    assert run.cut, run.reason
    assert len(run.files) == 1
    assert run.rows == 3  # two messages, one callback
    assert await _seqs(store, "messages") == [pinned.seq, after]
    assert await _seqs(store, "callbacks") == []
    raw = run.files[0].read_bytes()
    parsed = check_archive(run.files[0].name, raw, _jwks(keys), GATEWAY_ID)
    assert parsed.problems == []
    assert parsed.header["format"] == ARCHIVE_FORMAT
    assert [int(r["seq"]) for r in parsed.rows["messages"]] == done
    assert (await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)).ok
    report = await verify_archives(store, tmp_path / "arch", _jwks(keys), gateway=GATEWAY_ID)
    assert report.ok, report.findings

    # A second run continues the chain of archives: it names the first file's digest.
    await _deliver(store, pinned.seq)
    cb = await store.insert_callback(_answer(pinned.seq, pinned.message_id))
    assert cb is not None
    await _claim_callback(store, cb.seq)
    await store.finish_callback(cb.seq, state="delivered", attempts=1, error=None)
    newest = await _finished_sync(store)  # its last record is the head, which always stays
    second = await _archive(store, keys, tmp_path / "arch")
    assert second.cut, second.reason
    assert await _seqs(store, "messages") == [newest]
    header = json.loads(second.files[0].read_bytes().split(b"\n", 1)[0])
    assert header["prev_archive"] == parsed.digest
    assert header["first_seq"] == parsed.last_seq + 1
    report = await verify_archives(store, tmp_path / "arch", _jwks(keys), gateway=GATEWAY_ID)
    assert report.ok, report.findings
    assert (await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)).ok


async def test_nothing_leaves_the_store_when_no_record_is_old_enough(
    any_store: Store, keys: Keys, tmp_path: Path
) -> None:
    """A cutoff before every record archives nothing and deletes nothing."""
    store = any_store
    seq = await _finished_sync(store)
    run = await _archive(store, keys, tmp_path / "arch", cutoff=time.time() - 3600)
    assert (run.cut, run.files) == (False, ())
    assert await _seqs(store, "messages") == [seq]


async def _three_archives(store: Store, keys: Keys, to: Path) -> list[Path]:
    files = []
    for _ in range(3):
        await _finished_sync(store)
        await _finished_sync(store)
        run = await _archive(store, keys, to)
        assert run.cut, run.reason
        files.extend(run.files)
    return files


@pytest.mark.parametrize("tamper", ["removed", "reordered", "edited", "last removed", "extra"])
async def test_verify_names_a_removed_reordered_or_edited_archive(
    tmp_path: Path, keys: Keys, tamper: str
) -> None:
    """Each change to the archive directory is reported, naming the archive."""
    store = store_at(str(tmp_path / "db" / "gateway.db"))
    await store.open()
    try:
        to = tmp_path / "arch"
        files = await _three_archives(store, keys, to)
        assert len(files) == 3
        _, middle, last = files
        if tamper == "removed":
            middle.unlink()
            named, kind = middle.name, "deleted"
        elif tamper == "last removed":
            last.unlink()
            named, kind = last.name, "deleted"
        elif tamper == "reordered":
            # The files swapped under each other's names: each is where the other was.
            a, b = middle.read_bytes(), last.read_bytes()
            middle.write_bytes(b)
            last.write_bytes(a)
            named, kind = middle.name, "modified"
        elif tamper == "edited":
            raw = bytearray(middle.read_bytes())
            at = raw.index(b'"status":200')
            raw[at + 11] = ord("1")  # a row's status 200 becomes 201
            middle.write_bytes(bytes(raw))
            named, kind = middle.name, "modified"
        else:
            shutil.copy(middle, to / "20990101-000000000001.gwa")
            named, kind = "20990101-000000000001.gwa", "inserted"
        report = await verify_archives(store, to, _jwks(keys), gateway=GATEWAY_ID)
        assert not report.ok
        found = [f for f in report.findings if named in f.detail]
        assert found, report.findings
        assert kind in {f.kind for f in found}, report.findings
    finally:
        await store.close()


async def test_an_archive_signed_by_another_key_is_forged(tmp_path: Path, keys: Keys) -> None:
    """An archive re-signed by a key the JWKS does not hold is reported as forged."""
    store = store_at(str(tmp_path / "db" / "gateway.db"))
    await store.open()
    try:
        await _finished_sync(store)
        run = await _archive(store, keys, tmp_path / "arch")
        assert run.cut
        other = {"keys": [dict(keys.pairs["peer"].jwk)]}
        parsed = check_archive(run.files[0].name, run.files[0].read_bytes(), other)
        assert any("signature" in p for p in parsed.problems)
    finally:
        await store.close()


def test_durations_read_as_seconds_and_junk_is_refused() -> None:
    """``--older-than`` takes 30d, 12h, 90m, 45s, 2w; anything else is an argument error."""
    assert [duration(x) for x in ("30d", "12h", "90m", "45s", "2w", "1.5d")] == [
        30 * 86400,
        12 * 3600,
        90 * 60,
        45,
        14 * 86400,
        1.5 * 86400,
    ]
    for junk in ("30", "d", "-1d", "1y", "1d;rm"):
        with pytest.raises(Exception, match="not a duration"):
            duration(junk)


async def test_the_cli_archives_a_real_gateways_log_and_an_independent_checker_agrees(
    make_harness: HarnessFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gateway log archive`` after real exchanges and callbacks, with a transfer hook;
    ``audit verify --archives`` passes; the independent checker (no gateway code,
    ``openssl`` for the signature) accepts every file and refuses an edited one."""
    lg = await _logged(make_harness, tmp_path)
    to = tmp_path / "arch"
    copied = tmp_path / "moved"
    copied.mkdir()
    hook = f"cp --target-directory={copied}"
    code, out = _cli(
        capsys,
        "log",
        "archive",
        "--older-than",
        "0s",
        "--to",
        str(to),
        "--hook",
        hook,
        "--config",
        str(lg.config),
    )
    assert code == 0, out
    assert "archived" in out
    files = sorted(to.glob("*.gwa"))
    assert files
    assert sorted(p.name for p in copied.iterdir()) == [p.name for p in files]
    code, out = _cli(capsys, "audit", "verify", "--archives", str(to), "--config", str(lg.config))
    assert code == 0, out
    jwk = json.loads(lg.jwks.read_text())["keys"][0]
    (tmp_path / "gateway.jwk.json").write_text(json.dumps(jwk))
    checked = await _independent(tmp_path / "gateway.jwk.json", *files)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("OK") == len(files)
    raw = bytearray(files[0].read_bytes())
    raw[raw.index(b'"facts"') + 12] ^= 1
    files[0].write_bytes(bytes(raw))
    checked = await _independent(tmp_path / "gateway.jwk.json", files[0])
    assert checked.returncode == 1, checked.stdout
    code, out = _cli(capsys, "audit", "verify", "--archives", str(to), "--config", str(lg.config))
    assert code == 1
    assert files[0].name in out, out


# Retention in the background -------------------------------------------------------------


def _retention(store: Store, keys: Keys, to: Path, registry: Any) -> Retention:
    return Retention(
        store=store,
        keypair=keys.pairs["gateway"],
        jwks=_jwks(keys),
        gateway=GATEWAY_ID,
        config=RetentionConfig(older_than_s=0, to=to, interval_s=3600),
        registry=registry,
    )


async def test_only_the_instance_holding_the_lock_archives(
    store_url: str, keys: Keys, tmp_path: Path
) -> None:
    """Two instances on one store: while one holds the retention lock the other archives
    nothing; once it lets go, the other archives, and its metrics count what it did."""
    first, second = store_at(store_url, instance="a"), store_at(store_url, instance="b")
    await first.open()
    await second.open()
    try:
        await _finished_sync(first)
        await _finished_sync(first)
        registry = CollectorRegistry()
        retention = _retention(second, keys, tmp_path / "arch", registry)
        async with first.exclusive(LOCK) as held:
            assert held
            assert await retention.run_once() is None
            assert list((tmp_path / "arch").glob("*.gwa")) == []
        done = await retention.run_once()
        assert done is not None
        assert done.cut, done.reason
        assert registry.get_sample_value("gateway_log_archived_records_total") == done.records
        assert registry.get_sample_value("gateway_log_archive_bytes_total") == done.bytes
        assert (
            registry.get_sample_value("gateway_log_archive_last_run_timestamp_seconds") or 0
        ) > 0
        async with first.exclusive(LOCK) as held:
            assert held  # released after the run
    finally:
        await first.close()
        await second.close()


def test_log_retention_is_read_from_config_and_bad_durations_are_refused(
    keys: Keys, tmp_path: Path
) -> None:
    """``log.retention`` becomes a RetentionConfig; a duration such as ``30`` is a problem."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:1")
    doc["log"] = {"retention": {"older_than": "30d", "to": "archives", "every": "2h"}}
    config = parse_config(doc, base=tmp_path)
    assert config.log.retention == RetentionConfig(
        older_than_s=30 * 86400, to=tmp_path / "archives", interval_s=7200
    )
    doc["log"]["retention"]["older_than"] = "30"
    with pytest.raises(ConfigError, match="/log/retention/older_than"):
        parse_config(doc, base=tmp_path)


async def test_a_gateway_with_log_retention_archives_in_the_background(
    make_harness: HarnessFactory, tmp_path: Path
) -> None:
    """A real gateway with ``log.retention`` archives its own exchanges, the files verify
    with the store as one chain, and /metrics counts the archived records."""
    to = tmp_path / "bg"

    def retained(doc: dict[str, Any]) -> None:
        doc["store"]["checkpoint_interval_s"] = 0.1
        doc["log"] = {"retention": {"older_than": "0s", "to": str(to), "every": "0.2s"}}

    h = await make_harness(retained)
    portal = h.client("portal")
    for _ in range(3):
        reply = await portal.exchange("credit.query", CREDIT_EXAMPLE)
        assert reply.status == 200, reply.body

    async def archived() -> bool:
        return len(await _seqs(h.app[STORE], "messages")) < 3

    await h.wait_for(archived)
    report = await verify_archives(h.app[STORE], to, _jwks(h.keys), gateway=GATEWAY_ID)
    assert report.ok, report.findings
    resp = await h.gateway.get("/metrics")
    text = await resp.text()
    counted = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("gateway_log_archived_records_total ")
    ]
    assert counted
    assert counted[0] > 0


async def test_a_tampered_list_of_archives_in_the_store_is_caught(
    tmp_path: Path, keys: Keys
) -> None:
    """Each cut is chained: a log_archives row edited or deleted behind the gateway's back
    makes the live verify fail, though no archive file is touched."""
    path = tmp_path / "db" / "gateway.db"
    store = store_at(str(path))
    await store.open()
    try:
        await _finished_sync(store)
        await _finished_sync(store)
        assert (await _archive(store, keys, tmp_path / "arch")).cut
        await _finished_sync(store)
        assert (await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)).ok
        with sqlite3.connect(path) as db:
            db.execute("UPDATE log_archives SET digest = ?", ("0" * 64,))
        report = await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)
        assert any("log_archives differs" in f.detail for f in report.findings), report.findings
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM log_archives")
        report = await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)
        assert {f.kind for f in report.findings} >= {"deleted"}, report.findings
    finally:
        await store.close()


async def test_archives_split_past_the_size_limit_and_chain_to_each_other(
    tmp_path: Path, keys: Keys
) -> None:
    """A small ``max_bytes`` gives several files in one run, each naming the one before,
    each verifying alone and all together."""
    store = store_at(str(tmp_path / "db" / "gateway.db"))
    await store.open()
    try:
        for _ in range(12):
            await _finished_sync(store, b'{"uscc": "' + b"x" * 2000 + b'"}')
        run = await _archive(store, keys, tmp_path / "arch", max_bytes=8000)
        assert run.cut, run.reason
        assert len(run.files) >= 3
        previous = None
        for path in run.files:
            parsed = check_archive(path.name, path.read_bytes(), _jwks(keys), GATEWAY_ID)
            assert parsed.problems == []
            assert parsed.header["prev_archive"] == previous
            previous = parsed.digest
        report = await verify_archives(store, tmp_path / "arch", _jwks(keys), gateway=GATEWAY_ID)
        assert report.ok, report.findings
    finally:
        await store.close()
