"""Bodies at rest (gateway/store/bodies.py) on real stores: no byte of the SQLite file
and WAL, or of PostgreSQL's relation and WAL files, holds a body or a stored header, and
every view still shows them to the roles allowed to see them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.audit import verify_store
from gateway.config.model import SecretsConfig
from gateway.config.secretstore import DataKey, SecretBox
from gateway.errors import StoreError
from gateway.store import NewCallback, NewMessage, Store
from gateway.store.bodies import is_sealed, open_value, seal_blob
from tests.conftest import (
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    NATIONAL_ID,
    PORTAL_ID,
    HarnessFactory,
    Keys,
    store_at,
)
from tests.test_audit import _claim_callback, _cli, _deliver, _jwks, _logged


def _files(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.fixture
async def sealed_store(store_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A store on each backend, opened with a key-encryption key as the gateway opens it."""
    store = store_at(store_url)
    await store.open()
    box = SecretBox(store, SecretsConfig(kek_file=tmp_path / "gateway.kek"), create=True)
    await box.load()
    store.use_secrets(box)
    yield store
    await store.close()


async def _raw_bytes(store: Store, store_url: str) -> bytes:
    """Every byte the backend keeps on disk for this store, after a checkpoint."""
    if not store_url.startswith("postgresql://"):
        await store.checkpoint()  # type: ignore[attr-defined]
        return _files(Path(store_url).parent)  # the database file, its WAL and shm
    import asyncpg

    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute("CHECKPOINT")
        data = Path(await conn.fetchval("SHOW data_directory"))
        oid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
    finally:
        await conn.close()
    return _files(data / "base" / str(oid)) + _files(data / "pg_wal")


async def test_no_body_or_header_is_on_disk_and_the_store_reads_them_back(
    sealed_store: Store, store_url: str, keys: Keys
) -> None:
    """A marker in a request, response, callback and result body and in their headers is
    in no database byte (SQLite file and WAL; PostgreSQL relation and WAL files), the
    store's records show it, and verify checks the bodies against the chain."""
    store = sealed_store
    marker = f"MARKER-{uuid.uuid4().hex}"
    body = json.dumps({"purpose": marker}).encode()
    msg = await store.insert_message(
        NewMessage(
            message_id=str(uuid.uuid4()),
            client=PORTAL_ID,
            service="crossregion.apply",
            mode="async",
            state="accepted",
            request_headers={"Gw-Client": PORTAL_ID, "X-Marker": marker},
            request_body=body,
            request_digest=hashlib.sha256(body).hexdigest(),
            next_attempt_at=time.time(),
        )
    )
    await _deliver(store, msg.seq)
    answer = json.dumps({"decision": marker}).encode()
    cb = await store.insert_callback(
        NewCallback(
            message_id=str(uuid.uuid4()),
            client=NATIONAL_ID,
            correlation_id=msg.message_id,
            original_seq=msg.seq,
            service="crossregion.apply",
            headers={"Gw-Client": NATIONAL_ID, "X-Marker": marker},
            body=answer,
            digest=hashlib.sha256(answer).hexdigest(),
        )
    )
    assert cb is not None
    await _claim_callback(store, cb.seq)
    await store.finish_callback(cb.seq, state="delivered", attempts=1, error=None)
    raw = await _raw_bytes(store, store_url)
    assert raw  # the files were read
    assert marker.encode() not in raw
    assert base64.b64encode(marker.encode())[:20] not in raw
    record = await store.get_message(PORTAL_ID, msg.message_id)
    assert record is not None
    assert (record.request_body, record.result) == (body, answer)
    assert record.request_headers["X-Marker"] == marker
    (callback,) = await store.callbacks_of(msg.seq)
    assert callback.body == answer
    report = await verify_store(store, _jwks(keys), gateway=GATEWAY_ID)
    assert report.ok, report.findings
    assert report.unopened == 0


async def test_without_the_key_verify_checks_the_chain_and_says_what_it_could_not_open(
    sealed_store: Store, store_url: str, keys: Keys
) -> None:
    """A store read without its KEK still verifies its chain; the sealed rows are counted
    as not opened, never reported as broken nor passed as checked."""
    body = b'{"uscc": "x"}'
    await sealed_store.insert_message(
        NewMessage(
            message_id=str(uuid.uuid4()),
            client=PORTAL_ID,
            service="credit.query",
            mode="sync",
            state="delivering",
            request_headers={"Gw-Client": PORTAL_ID},
            request_body=body,
            request_digest=hashlib.sha256(body).hexdigest(),
        )
    )
    keyless = store_at(store_url)
    await keyless.open()
    try:
        report = await verify_store(keyless, _jwks(keys), gateway=GATEWAY_ID)
    finally:
        await keyless.close()
    assert report.ok, report.findings
    assert report.unopened == 1


class _Keys:
    """The box's key store, in memory (the unit under test is the AEAD, not the store)."""

    def __init__(self) -> None:
        self.keys: list[DataKey] = []

    async def data_keys(self) -> list[DataKey]:
        return self.keys

    async def add_data_key(self, key: DataKey) -> bool:
        self.keys.append(key)
        return True


def test_a_sealed_body_opens_only_in_its_own_column_and_unaltered(tmp_path: Path) -> None:
    """The AEAD binds a ciphertext to its column and refuses one flipped bit."""
    assert not SecretBox.locked().can_seal
    real = SecretBox(_Keys(), SecretsConfig(kek_file=tmp_path / "k.kek"), create=True)
    asyncio.run(real.load())
    sealed = seal_blob(real.key_material(), "request_body", b"secret")
    assert sealed is not None
    assert is_sealed(sealed)
    assert open_value(real, "request_body", sealed) == b"secret"
    with pytest.raises(StoreError, match="does not open"):
        open_value(real, "response_body", sealed)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(StoreError, match="does not open"):
        open_value(real, "request_body", flipped)


async def test_a_real_gateways_database_holds_no_body_and_every_view_shows_it(
    make_harness: HarnessFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After real exchanges (and a callback) carrying a marker, no byte of the SQLite file
    or WAL holds it; the admin API (operator), ``gateway log show`` and an evidence bundle
    show it, and an auditor still sees no body."""
    lg = await _logged(make_harness, tmp_path)
    marker = f"MARKER{uuid.uuid4().hex[:12]}"
    reply = await lg.harness.client("portal").exchange(
        "credit.query", {**CREDIT_EXAMPLE, "purpose": marker}
    )
    assert reply.status == 200, reply.body
    message_id = reply.headers["Gw-Message-Id"]
    async with lg.harness.admin.get(
        f"/admin/v1/messages/{message_id}", headers=lg.harness.auth("operator")
    ) as resp:
        assert resp.status == 200
        shown = await resp.json()
    assert marker in json.dumps(shown, ensure_ascii=False)
    async with lg.harness.admin.get(
        f"/admin/v1/messages/{message_id}", headers=lg.harness.auth("auditor")
    ) as resp:
        assert marker not in await resp.text()
    code, out = _cli(capsys, "log", "show", message_id, "--config", str(lg.config))
    assert code == 0, out
    assert marker in out
    bundle = tmp_path / "bundle.json"
    code, out = _cli(
        capsys, "audit", "export", message_id, "--out", str(bundle), "--config", str(lg.config)
    )
    assert code == 0, out
    request = json.loads(bundle.read_bytes())["message"]["request_body"]
    assert marker.encode() in base64.b64decode(request)
    raw = b"".join(p.read_bytes() for p in lg.db.parent.glob(lg.db.name + "*") if p.is_file())
    assert lg.db.read_bytes()[:16] == b"SQLite format 3\x00"
    assert marker.encode() not in raw  # neither the file nor its WAL
