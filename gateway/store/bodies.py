"""The message log's bodies and stored headers, sealed at rest under the store's data keys.

Request, response, callback and result bodies and the stored header JSON are written
through the same AEAD and key hierarchy as the secrets of admin writes
(gateway/config/secretstore.py): the current data key (SM4-GCM by default, AES-256-GCM
selectable), itself wrapped by the key-encryption key from ``secrets.kek``. One key
hierarchy: a data key seals secrets and bodies alike; ``gateway store rekey`` adds a
generation (new writes use it, old ones stay readable under theirs) or re-wraps every
generation under a new KEK.

    blob column:  b"GWB1" ‖ key id (16 ASCII hex digits) ‖ nonce ‖ ciphertext ‖ tag
    text column:  "gwb1." key id "." base64url(nonce ‖ ciphertext ‖ tag)
    AAD:          "gateway-body:v1:" key id ":" column name

A value without the prefix is plaintext from before (it stays readable). The AAD binds
a ciphertext to its column, not to its row: the hash chain already binds every body to
its row by digest, so a ciphertext moved to another row is named by ``audit verify``.
The chain covers plaintext digests, so the chain verifies without any key.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag

from gateway.config.secretstore import DataKey, SecretBox, decrypt, encrypt
from gateway.errors import GatewayError, StoreError

__all__ = [
    "SEALED_COLUMNS",
    "Opened",
    "is_sealed",
    "key_ids",
    "open_value",
    "opened_dict",
    "ready",
    "seal_blob",
    "seal_text",
]

MAGIC = b"GWB1"
TEXT = "gwb1."
_TEXT = re.compile(r"^gwb1\.([0-9a-f]{16})\.([A-Za-z0-9_-]+)$")
# The columns that hold bodies or stored headers (``original_headers`` is a callback
# query's name for its message's ``request_headers``).
SEALED_COLUMNS = frozenset(
    {"request_headers", "request_body", "response_headers", "response_body", "result",
     "headers", "body", "original_headers"}
)  # fmt: skip
_ALIAS = {"original_headers": "request_headers"}

Key = tuple[DataKey, bytes]


def _aad(key_id: str, column: str) -> bytes:
    return f"gateway-body:v1:{key_id}:{_ALIAS.get(column, column)}".encode()


def seal_blob(key: Key | None, column: str, data: bytes | None) -> bytes | None:
    if key is None or data is None:
        return data
    record, material = key
    return (
        MAGIC
        + record.key_id.encode()
        + encrypt(record.alg, material, data, _aad(record.key_id, column))
    )


def seal_text(key: Key | None, column: str, text: str) -> str:
    if key is None:
        return text
    record, material = key
    blob = encrypt(record.alg, material, text.encode(), _aad(record.key_id, column))
    return f"{TEXT}{record.key_id}.{base64.urlsafe_b64encode(blob).rstrip(b'=').decode()}"


def is_sealed(value: Any) -> bool:
    if isinstance(value, bytes | memoryview):
        return bytes(value[:4]) == MAGIC
    return isinstance(value, str) and value.startswith(TEXT)


def key_ids(values: Iterable[Any]) -> set[str]:
    """The data keys the sealed ones of ``values`` name."""
    out = set()
    for v in values:
        if isinstance(v, bytes | memoryview) and bytes(v[:4]) == MAGIC:
            out.add(bytes(v[4:20]).decode("ascii", "replace"))
        elif isinstance(v, str) and (m := _TEXT.match(v)):
            out.add(m[1])
    return out


def open_value(box: SecretBox, column: str, value: Any) -> Any:
    """The plaintext of a sealed value (a plaintext one as it is); StoreError when its key
    is not loaded or it does not open (altered, or moved to another column)."""
    if not is_sealed(value):
        return value
    if isinstance(value, str):
        match = _TEXT.match(value)
        if match is None:
            raise StoreError(f"a sealed {column} is malformed")
        key_id, blob = match[1], base64.urlsafe_b64decode(match[2] + "=" * (-len(match[2]) % 4))
    else:
        raw = bytes(value)
        key_id, blob = raw[4:20].decode("ascii", "replace"), raw[20:]
    key = box.key_material(key_id)
    if key is None:
        raise StoreError(f"{column} is sealed with data key {key_id}, which is not loaded")
    try:
        plain = decrypt(key[0].alg, key[1], blob, _aad(key_id, column))
    except (InvalidTag, ValueError) as exc:
        raise StoreError(f"a sealed {column} does not open: it was altered or moved") from exc
    return plain.decode() if isinstance(value, str) else plain


class Opened:
    """A row whose sealed columns read as plaintext (``rows.py`` reads it as a row)."""

    __slots__ = ("box", "row")

    def __init__(self, row: Any, box: SecretBox) -> None:
        self.row, self.box = row, box

    def __getitem__(self, key: str | int, /) -> Any:
        value = self.row[key]
        if isinstance(key, str) and key in SEALED_COLUMNS:
            return open_value(self.box, key, value)
        return value


async def ready(box: SecretBox | None, values: Iterable[Any]) -> bool:
    """Load the data keys ``values`` need; False when they cannot be (no KEK here)."""
    wanted = key_ids(values)
    if not wanted:
        return True
    if box is None or not box.can_seal:
        return False
    if any(box.key_material(k) is None for k in wanted):
        try:
            await box.load()
        except GatewayError:
            return False
    return all(box.key_material(k) is not None for k in wanted)


async def opened_dict(box: SecretBox | None, row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` (a snapshot's dict) with its sealed columns opened; StoreError when one
    cannot be (no key, or it does not open)."""
    sealed = {k: v for k, v in row.items() if k in SEALED_COLUMNS and is_sealed(v)}
    if not sealed:
        return dict(row)
    if not await ready(box, sealed.values()) or box is None:
        raise StoreError("sealed bodies, and no key-encryption key to open them with")
    return {k: open_value(box, k, v) if k in sealed else v for k, v in row.items()}
