"""Secrets by reference and encrypted at rest: the gateway's data keys, in one module.

**By reference.** Wherever the configuration takes a secret (a member's JWK ``k``, an
adapter's write-only fields such as the ``http`` adapter's header values), config.yaml and
admin writes may give ``{"env": "NAME"}`` or ``{"file": "path"}`` instead of the value.
The reference is what is stored and shown; ``resolve_document`` (run by ``parse_config``,
so on every start, write and refresh) puts the value in its place for the runtime. A
missing variable or file is a problem with its JSON Pointer. A file is read relative to
config.yaml and refused when group or others may access it (as private keys are).

**At rest.** Secrets the store holds (admin writes in the configuration overlay and in
the change trail) are sealed with an AEAD under a random *data key*: SM4-GCM by default
(``cryptography`` supports it with the OpenSSL it bundles; AES-256-GCM where it does
not, or when ``secrets.cipher`` says so). A sealed value is ``{"$sealed": "v1.<key
id>.<base64url(nonce ‖ ciphertext ‖ tag)>"}`` in place of the value; its additional data
binds it to the resource (kind and id) and the field (JSON Pointer), so a ciphertext moved
elsewhere does not open. Data keys are kept in the store (table ``data_keys``) wrapped by
the *key-encryption key* (KEK) from config: ``secrets.kek`` (``{"file": …}`` or ``{"env":
…}``; default the file ``<gateway key>.kek`` beside the gateway's key, generated with mode
0600 on the first start of a store that has no data key yet). The newest generation is
the current key; older ones stay, so records not yet re-encrypted stay readable.
``gateway store rekey`` adds a generation and re-encrypts; ``--new-kek-*`` re-wraps.

    KeyEncryptionKey   the KEK: 32 bytes, its id, wrap/unwrap of one data key
    SecretBox          the store's sealer: data keys by id, seal/open of resources
    resolve_document   references → values, for the runtime (problems with pointers)

Which fields are secret is declared once, in ``gateway/config/secrets.py`` (``secret_paths``).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import secrets as random
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config.secrets import is_reference
from gateway.config.secrets import secret_paths as _paths
from gateway.errors import ConfigError, StoreError


class SecretsConfig(Protocol):
    """What this module reads of the ``secrets`` block (``gateway.config.model.SecretsConfig``
    is the frozen dataclass config.yaml becomes): where the KEK is, which AEAD."""

    @property
    def kek_file(self) -> Path | None: ...
    @property
    def kek_env(self) -> str | None: ...
    @property
    def cipher(self) -> str | None: ...


__all__ = [
    "AES_256_GCM",
    "CIPHERS",
    "SEALED",
    "SM4_GCM",
    "CipherName",
    "DataKey",
    "KeyEncryptionKey",
    "KeyStore",
    "OwnKeys",
    "SecretBox",
    "decrypt",
    "default_cipher",
    "encrypt",
    "generate_kek_file",
    "is_reference",
    "own_keys",
    "resolve_document",
    "resolve_resource",
    "sm4_gcm_available",
]

log = logging.getLogger("gateway.config.secretstore")

CipherName = Literal["sm4-gcm", "aes-256-gcm"]
SM4_GCM: Final = "sm4-gcm"
AES_256_GCM: Final = "aes-256-gcm"
CIPHERS: tuple[CipherName, ...] = (SM4_GCM, AES_256_GCM)
_KEY_BYTES = {SM4_GCM: 16, AES_256_GCM: 32}
_NONCE_BYTES = 12
_TAG_BYTES = 16
KEK_BYTES = 32
SEALED = "$sealed"
_ENVELOPE = re.compile(r"^v1\.([0-9a-f]{16})\.([A-Za-z0-9_-]+)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# The AEAD ------------------------------------------------------------------------------


def sm4_gcm_available() -> bool:
    """Whether this ``cryptography`` and its OpenSSL do SM4 in GCM mode."""
    try:
        key, nonce = bytes(16), bytes(_NONCE_BYTES)
        encryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
        encryptor.update(b"")
        encryptor.finalize()
    except Exception:  # UnsupportedAlgorithm, or no SM4 attribute in an old release
        return False
    return True


def default_cipher() -> str:
    """SM4-GCM (national commercial cryptography) where available, else AES-256-GCM."""
    return SM4_GCM if sm4_gcm_available() else AES_256_GCM


def _algorithm(alg: str, key: bytes) -> algorithms.SM4 | algorithms.AES:
    if alg == SM4_GCM:
        return algorithms.SM4(key)
    if alg == AES_256_GCM:
        return algorithms.AES(key)
    raise StoreError(f"unknown cipher {alg!r} (known: {', '.join(CIPHERS)})")


def encrypt(alg: str, key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce ‖ ciphertext ‖ tag, under a fresh random 96-bit nonce."""
    nonce = os.urandom(_NONCE_BYTES)
    encryptor = Cipher(_algorithm(alg, key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(aad)
    body = encryptor.update(plaintext) + encryptor.finalize()
    return nonce + body + encryptor.tag


def decrypt(alg: str, key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext; ``InvalidTag`` when the key, the data or the AAD is not the one."""
    if len(sealed) < _NONCE_BYTES + _TAG_BYTES:
        raise InvalidTag
    nonce, body, tag = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:-_TAG_BYTES], sealed[-_TAG_BYTES:]
    decryptor = Cipher(_algorithm(alg, key), modes.GCM(nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(aad)
    return decryptor.update(body) + decryptor.finalize()


# The key-encryption key ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DataKey:
    """One data key as the store keeps it: wrapped, never in clear."""

    generation: int  # 1, 2, …; the highest is the current key
    key_id: str  # 16 hex digits, carried by every ciphertext made with it
    alg: str  # sm4-gcm or aes-256-gcm
    kek_id: str  # which key-encryption key wrapped it
    wrapped: bytes
    created_at: float


def _b64decode(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(
        text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4)
    )


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class KeyEncryptionKey:
    """32 random bytes (base64 text in a file or an environment variable) and where they
    came from. Only ever used to wrap and unwrap data keys."""

    material: bytes = field(repr=False)  # never in a log line or a traceback's locals
    source: str = ""  # "file keys/gateway.kek", "environment variable GATEWAY_KEK"

    @property
    def id(self) -> str:
        """A public name for this KEK (a hash; says which KEK wrapped a data key)."""
        return hashlib.sha256(b"gateway-kek-id:" + self.material).hexdigest()[:16]

    def _wrapping_key(self, alg: str) -> bytes:
        digest = hashes.SM3() if alg == SM4_GCM else hashes.SHA256()
        info = b"gateway data key wrapping " + alg.encode()
        return HKDF(algorithm=digest, length=_KEY_BYTES[alg], salt=None, info=info).derive(
            self.material
        )

    @staticmethod
    def _aad(key_id: str, alg: str) -> bytes:
        return f"gateway-data-key:v1:{key_id}:{alg}".encode()

    def wrap(self, key_id: str, alg: str, key: bytes) -> bytes:
        return encrypt(alg, self._wrapping_key(alg), key, self._aad(key_id, alg))

    def unwrap(self, record: DataKey) -> bytes:
        if record.kek_id != self.id:
            raise ConfigError(
                [f"/secrets/kek: the store's data key {record.key_id} is wrapped by "
                 f"key-encryption key {record.kek_id}, not by the configured one "
                 f"({self.source}, id {self.id})"]
            )  # fmt: skip
        try:
            return decrypt(
                record.alg,
                self._wrapping_key(record.alg),
                record.wrapped,
                self._aad(record.key_id, record.alg),
            )
        except InvalidTag as exc:
            raise StoreError(
                f"secrets: data key {record.key_id} does not unwrap with the configured "
                f"key-encryption key ({self.source}): the stored key was altered"
            ) from exc

    @classmethod
    def from_text(cls, text: str, source: str) -> KeyEncryptionKey:
        try:
            material = _b64decode(text)
        except ValueError as exc:
            raise ConfigError(
                [f"secrets: the key-encryption key ({source}) is not base64"]
            ) from exc
        if len(material) != KEK_BYTES:
            raise ConfigError(
                [f"secrets: the key-encryption key ({source}) must be {KEK_BYTES} bytes, "
                 f"base64-encoded (it is {len(material)})"]
            )  # fmt: skip
        return cls(material, source)

    @classmethod
    def load(cls, config: SecretsConfig, *, create: bool = False) -> KeyEncryptionKey:
        """The configured KEK; with ``create``, a missing KEK *file* is generated (mode
        0600; never an environment variable, which the gateway cannot set)."""
        if config.kek_env is not None:
            value = os.environ.get(config.kek_env)
            source = f"environment variable {config.kek_env}"
            if not value:
                raise ConfigError(
                    [f"/secrets/kek/env: {source} (the key-encryption key) is not set"]
                )
            return cls.from_text(value, source)
        path = config.kek_file
        assert path is not None  # SecretsConfig always names one or the other
        source = f"file {path}"
        if not path.exists():
            if not create:
                raise ConfigError(
                    [f"/secrets/kek/file: {path} (the key-encryption key) does not exist"]
                )
            generate_kek_file(path)
            log.warning("secrets: generated a key-encryption key at %s (mode 0600)", path)
        return cls.from_text(_read_private(path, "/secrets/kek/file", "key-encryption key"), source)


def generate_kek_file(path: Path) -> None:
    """A new random KEK at ``path`` (0600), never replacing one that exists: written to a
    temporary file and linked into place, so two processes starting at once agree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{random.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(_b64encode(random.token_bytes(KEK_BYTES)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: theirs
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_private(path: Path, where: str, what: str) -> str:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                [f"{where}: {path} ({what}) is accessible by group or others (chmod 600)"]
            )
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path} ({what}: {exc.strerror})"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{where}: {path} ({what}) is not UTF-8 text"]) from exc


# What is secret: declared once, in gateway/config/secrets.py -----------------------------------

Path_ = tuple[str, ...]


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _pointer(path: Path_) -> str:
    return "".join("/" + _escape(t) for t in path)


def _get(node: Any, path: Path_) -> Any:
    for token in path:
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def _set(node: Any, path: Path_, value: Any) -> None:
    parent = _get(node, path[:-1])
    if isinstance(parent, list):
        parent[int(path[-1])] = value
    else:
        parent[path[-1]] = value


# References ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnKeys:
    """The gateway's own key material, which no reference may name: otherwise whoever may
    write an adapter could have the signing key or the KEK sent as a header value."""

    files: frozenset[Path] = frozenset()
    env: frozenset[str] = frozenset({"GATEWAY_KEY_PASSPHRASE", "GATEWAY_STORE_URL"})


def own_keys(doc: Any, base: Path) -> OwnKeys:
    """The key files and variables a configuration document names for the gateway itself
    (its signing key, passphrase, TLS key, KEK)."""
    if not isinstance(doc, Mapping):
        return OwnKeys()
    gateway: Mapping[str, Any] = doc.get("gateway") or {}
    kek = (doc.get("secrets") or {}).get("kek") or {}
    tls = ((doc.get("listen") or {}).get("ingress") or {}).get("tls") or {}
    files = [
        gateway.get("key"),
        gateway.get("key_passphrase_file"),
        kek.get("file"),
        tls.get("key"),
    ]
    if isinstance(gateway.get("key"), str):
        files.append(gateway["key"].removesuffix(".pem") + ".kek")
    env = {gateway.get("key_passphrase_env"), kek.get("env")}
    return OwnKeys(
        files=frozenset(_real(base, f) for f in files if isinstance(f, str)),
        env=OwnKeys().env | {e for e in env if isinstance(e, str)},
    )


def _real(base: Path, name: str) -> Path:
    path = Path(name)
    return (path if path.is_absolute() else base / path).resolve()


def _resolve(
    ref: Mapping[str, str], base: Path, where: str, own: OwnKeys
) -> tuple[Any, str | None]:
    if "env" in ref:
        name = ref["env"]
        if not _ENV_NAME.match(name):
            return None, f"{where}/env: {name!r} is not an environment variable name"
        if name in own.env:
            return None, f"{where}/env: {name} holds the gateway's own key material"
        value = os.environ.get(name)
        if value is None:
            return None, f"{where}/env: environment variable {name} is not set"
        return value, None
    target = _real(base, ref["file"])
    if target in own.files:
        return None, f"{where}/file: {ref['file']} is the gateway's own key material"
    try:
        return _read_private(target, f"{where}/file", "a secret").rstrip("\r\n"), None
    except ConfigError as exc:
        return None, exc.problems[0]


def resolve_resource(
    kind: str, item: Any, base: Path, where: str = "", *, own: OwnKeys | None = None
) -> tuple[Any, list[str]]:
    """``item`` with each secret reference replaced by its value (files relative to
    ``base``), and the problems (JSON Pointers prefixed with ``where``). ``own``: the
    gateway's key material, which a reference may not name."""
    paths = [p for p in _paths(kind, item) if is_reference(_get(item, p))]
    if not paths:
        return item, []
    resolved = copy.deepcopy(item)
    problems: list[str] = []
    for path in paths:
        ref = _get(item, path)
        value, problem = _resolve(ref, base, where + _pointer(path), own or OwnKeys())
        if problem is not None:
            problems.append(problem)
        else:
            _set(resolved, path, value)
    return resolved, problems


def resolve_document(doc: Any, base: Path) -> tuple[Any, list[str]]:
    """A configuration document (config.yaml's shape) with every secret reference
    resolved, for the runtime; the document itself (what is stored and shown) keeps them."""
    if not isinstance(doc, Mapping):
        return doc, []
    own = own_keys(doc, base)
    out = dict(doc)
    problems: list[str] = []
    for kind in ("members", "adapters"):
        items = doc.get(kind)
        if isinstance(items, list):
            resolved = []
            for i, item in enumerate(items):
                value, found = resolve_resource(kind, item, base, f"/{kind}/{i}", own=own)
                resolved.append(value)
                problems += found
            out[kind] = resolved
    return out, problems


# Sealing ---------------------------------------------------------------------------------------


def _is_sealed(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and isinstance(value.get(SEALED), str)


class KeyStore(Protocol):
    """What the box needs of the store: its wrapped data keys."""

    async def data_keys(self) -> list[DataKey]: ...
    async def add_data_key(self, key: DataKey) -> bool: ...


class SecretBox:
    """Seals the secrets of resources on their way into the store and opens them on the
    way out, with the store's data keys (unwrapped with the KEK, held in memory).

    ``SecretBox.locked()`` has no KEK: it refuses to store a secret in clear and to open
    a sealed one (a store is never silently plaintext)."""

    def __init__(
        self,
        store: KeyStore | None,
        config: SecretsConfig | None,
        *,
        kek: KeyEncryptionKey | None = None,
        create: bool = False,
    ) -> None:
        self._store = store
        self._config = config
        self._kek = kek
        self.cipher = (config.cipher if config is not None else None) or default_cipher()
        self._create = create  # whether this box may make the KEK file and the first key
        self._keys: dict[str, tuple[DataKey, bytes]] = {}
        self._current: DataKey | None = None

    @classmethod
    def locked(cls) -> SecretBox:
        return cls(None, None)

    # --- archive --- bodies at rest (gateway/store/bodies.py) use the same data keys
    @property
    def can_seal(self) -> bool:
        """Whether this box has a KEK to load data keys with (``locked()`` has none)."""
        return self._store is not None and (self._config is not None or self._kek is not None)

    def key_material(self, key_id: str | None = None) -> tuple[DataKey, bytes] | None:
        """A loaded data key and its material: ``key_id``'s, or the current one; None
        when it is not loaded."""
        if key_id is None:
            if self._current is None:
                return None
            key_id = self._current.key_id
        return self._keys.get(key_id)

    # --- end archive ---

    @property
    def current(self) -> DataKey | None:
        return self._current

    @property
    def keys(self) -> list[DataKey]:
        return sorted((r for r, _ in self._keys.values()), key=lambda r: r.generation)

    def _keystore(self) -> KeyStore:
        if self._store is None or (self._config is None and self._kek is None):
            raise StoreError(
                "secrets: this store keeps no secret in clear, and it was opened without "
                "the key-encryption key (secrets.kek)"
            )
        return self._store

    def _kek_for(self, records: Sequence[DataKey]) -> KeyEncryptionKey:
        if self._kek is None:
            assert self._config is not None
            try:
                self._kek = KeyEncryptionKey.load(self._config, create=self._create and not records)
            except ConfigError as exc:
                if not records:
                    raise
                raise ConfigError(
                    [f"{exc.problems[0]}; the store's data keys are wrapped by "
                     f"key-encryption key {records[0].kek_id}"]
                ) from exc  # fmt: skip
        return self._kek

    async def load(self) -> None:
        """Read and unwrap every data key (a missing or wrong KEK fails here, clearly);
        add the first one when there is none and this box may."""
        store = self._keystore()
        records = await store.data_keys()
        kek = self._kek_for(records)
        if not records and self._create:
            await store.add_data_key(self._new_key(kek, 1, self.cipher))
            records = await store.data_keys()
        keys = {}
        for r in records:
            known = self._keys.get(r.key_id)
            keys[r.key_id] = (r, known[1] if known is not None else kek.unwrap(r))
        self._keys = keys
        self._current = max(keys.values(), key=lambda k: k[0].generation, default=(None,))[0]

    @staticmethod
    def _new_key(kek: KeyEncryptionKey, generation: int, alg: str) -> DataKey:
        key_id = random.token_hex(8)
        material = random.token_bytes(_KEY_BYTES[alg])
        return DataKey(
            generation=generation,
            key_id=key_id,
            alg=alg,
            kek_id=kek.id,
            wrapped=kek.wrap(key_id, alg, material),
            created_at=time.time(),
        )

    async def rotate(self, cipher: str | None = None) -> DataKey:
        """A new current data key (the next generation), stored wrapped."""
        store = self._keystore()
        await self.load()
        while True:
            generation = (self._current.generation if self._current else 0) + 1
            kek = self._kek_for(self.keys)
            if await store.add_data_key(self._new_key(kek, generation, cipher or self.cipher)):
                break
            await self.load()  # another process rotated at the same moment: go past it
        await self.load()
        assert self._current is not None
        return self._current

    def rewrapped(self, new: KeyEncryptionKey) -> list[DataKey]:
        """Every loaded data key wrapped by ``new`` instead (KEK rotation)."""
        return [
            replace(r, kek_id=new.id, wrapped=new.wrap(r.key_id, r.alg, key))
            for r, key in self._keys.values()
        ]

    @staticmethod
    def _aad(key_id: str, kind: str, rid: str, pointer: str) -> bytes:
        return f"gateway-secret:v1:{key_id}:{kind}/{rid}#{pointer}".encode()

    async def seal(self, kind: str, rid: str, item: Any) -> Any:
        """``item`` with each secret value (not a reference) sealed under the current
        data key; the store's newest key is looked up first."""
        paths = [
            p
            for p in _paths(kind, item)
            if not is_reference(v := _get(item, p)) and not _is_sealed(v)
        ]
        if not paths:
            return item
        await self.load()
        if self._current is None:
            raise StoreError("secrets: the store has no data key yet")
        record, key = self._current, self._keys[self._current.key_id][1]
        sealed = copy.deepcopy(item)
        for path in paths:
            aad = self._aad(record.key_id, kind, rid, _pointer(path))
            blob = encrypt(record.alg, key, _json(_get(item, path)), aad)
            _set(sealed, path, {SEALED: f"v1.{record.key_id}.{_b64encode(blob)}"})
        return sealed

    async def open(self, kind: str, rid: str, item: Any) -> Any:
        """``item`` with each sealed value opened (an unknown key id: the keys are read
        again, another process may have added it)."""
        paths = _sealed_paths(item)
        if not paths:
            return item
        opened = copy.deepcopy(item)
        for path in paths:
            where = f"{kind} {rid}{_pointer(path)}"
            match = _ENVELOPE.match(_get(item, path)[SEALED])
            if match is None:
                raise StoreError(f"secrets: {where} holds a malformed sealed value")
            key_id, blob = match[1], match[2]
            if key_id not in self._keys:
                await self.load()
            if key_id not in self._keys:
                raise StoreError(
                    f"secrets: {where} is sealed with data key {key_id}, not in the store"
                )
            record, key = self._keys[key_id]
            try:
                aad = self._aad(key_id, kind, rid, _pointer(path))
                plaintext = decrypt(record.alg, key, _b64decode(blob), aad)
            except (InvalidTag, ValueError) as exc:
                raise StoreError(
                    f"secrets: {where} does not open: it was altered, or moved from another "
                    "resource or field"
                ) from exc
            _set(opened, path, _unjson(plaintext))
        return opened

    async def reseal(self, kind: str, rid: str, item: Any) -> Any:
        """``item`` with every secret sealed under the current key (sealed before under
        another, or kept in clear by a gateway older than this): ``item`` itself when
        there is nothing to change."""
        plain = [
            p
            for p in _paths(kind, item)
            if not is_reference(v := _get(item, p)) and not _is_sealed(v)
        ]
        current = {self._current.key_id} if self._current is not None else set()
        if not plain and self.sealed_with(item) <= current:
            return item
        return await self.seal(kind, rid, await self.open(kind, rid, item))

    @staticmethod
    def sealed_with(item: Any) -> set[str]:
        """The data key ids the sealed values of ``item`` name."""
        found = set()
        for path in _sealed_paths(item):
            match = _ENVELOPE.match(_get(item, path)[SEALED])
            if match:
                found.add(match[1])
        return found


def _sealed_paths(node: Any, at: Path_ = (), depth: int = 0) -> list[Path_]:
    if depth > 64:
        return []
    if _is_sealed(node):
        return [at]
    out: list[Path_] = []
    if isinstance(node, Mapping):
        for name, value in node.items():
            out += _sealed_paths(value, (*at, str(name)), depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _sealed_paths(value, (*at, str(i)), depth + 1)
    return out


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _unjson(data: bytes) -> Any:
    return json.loads(data)
