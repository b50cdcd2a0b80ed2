"""Signing keys that live in a PKCS#11 token (an HSM, a smart card, SoftHSM2).

A key is named by a PKCS#11 URI (RFC 7512), e.g.
``pkcs11:token=gw;object=gateway-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:keys/gw.pin``.
``HardwareKey`` is the one small interface the rest of the gateway sees: ``algorithm``,
``public_key()`` (read from the token) and ``sign(data)``, which returns the signature as
RFC 9421 and JWS carry it (Ed25519 raw, ECDSA ``r‖s``, RSA-PSS raw). Nothing exports the
private key: there is no method for it, and a key the token marks extractable or not
sensitive is refused. The PIN is never a literal: ``pin-source=file:PATH`` (mode 0600) or
``pin-source=env:NAME``; ``pin-value`` is refused.

Supported: Ed25519 (``CKK_EC_EDWARDS``, ``CKM_EDDSA``), ECDSA P-256 (``CKM_ECDSA`` over
our SHA-256, which every token has) and RSA-PSS SHA-512 (``CKM_SHA512_RSA_PKCS_PSS``).
SM2 has no PKCS#11 mechanism in the OASIS standard, only vendors' own, and SoftHSM2 has
none: an SM2 key in a token is refused with that reason. The binding is python-pkcs11
(docs/decisions.md, Keys in hardware, has the measurements and why signing stays on the
calling thread).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from gateway.crypto.files import check_private_file
from gateway.errors import ConfigError, InternalError

__all__ = ["HardwareKey", "Pkcs11Uri", "generate_key", "is_pkcs11_uri", "open_key"]

HardwareKind = Literal["ed25519", "ecdsa-p256", "rsa-pss", "sm2"]
_P256_OID = bytes.fromhex("06082a8648ce3d030107")
_ED25519_PARAMS = (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")
_SM2_OID = bytes.fromhex("06082a811ccf5501822d")
SM2_REFUSED = (
    "SM2 keys cannot live in a PKCS#11 token here: PKCS#11 defines no SM2 mechanism "
    "(only vendors do) and SoftHSM2 has none; keep an SM2 key in a PEM"
)


def is_pkcs11_uri(text: str) -> bool:
    return text.startswith("pkcs11:")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that name one key, its module and its PIN."""

    text: str  # as written (it holds no secret: the PIN is only referred to)
    module_path: str
    token: str | None = None
    serial: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    pin_source: str | None = None

    @classmethod
    def parse(cls, text: str, base: Path | None = None) -> Pkcs11Uri:
        """Parse ``text``; a relative ``module-path`` or PIN file is relative to ``base``."""
        if not is_pkcs11_uri(text):
            raise ConfigError([f"{text!r}: not a pkcs11: URI"])
        path_part, _, query = text[len("pkcs11:") :].partition("?")
        attrs: dict[str, bytes] = {}
        for segment, separator in ((path_part, ";"), (query, "&")):
            for item in filter(None, segment.split(separator)):
                name, eq, value = item.partition("=")
                if not eq:
                    raise ConfigError([f"pkcs11 URI: {item!r} is not name=value"])
                if name in attrs:
                    raise ConfigError([f"pkcs11 URI: {name} appears twice"])
                attrs[name] = urllib.parse.unquote_to_bytes(value)
        if "pin-value" in attrs:
            raise ConfigError(
                [
                    "pkcs11 URI: the PIN is never written in the config (pin-value); "
                    "use pin-source=file:PATH (mode 0600) or pin-source=env:NAME"
                ]
            )
        known = {"token", "serial", "slot-id", "object", "id", "type", "module-path", "pin-source"}
        unknown = sorted(set(attrs) - known - {"manufacturer", "model", "library-description"})
        if unknown:
            raise ConfigError([f"pkcs11 URI: unsupported attribute(s) {', '.join(unknown)}"])
        if attrs.get("type", b"private") != b"private":
            raise ConfigError(["pkcs11 URI: a signing key is type=private"])
        if "module-path" not in attrs:
            raise ConfigError(["pkcs11 URI: module-path (the PKCS#11 library) is required"])
        if "object" not in attrs and "id" not in attrs:
            raise ConfigError(["pkcs11 URI: name the key with object= or id="])

        def text_of(name: str) -> str | None:
            return attrs[name].decode() if name in attrs else None

        module = Path(attrs["module-path"].decode())
        pin = text_of("pin-source")
        if base is not None:
            module = module if module.is_absolute() else base / module
            if pin is not None and pin.startswith("file:"):
                pin_path = Path(pin.removeprefix("file:"))
                pin = f"file:{pin_path if pin_path.is_absolute() else base / pin_path}"
        slot = text_of("slot-id")
        if slot is not None and not slot.isdigit():
            raise ConfigError(["pkcs11 URI: slot-id is a number"])
        return cls(
            text=text,
            module_path=str(module),
            token=text_of("token"),
            serial=text_of("serial"),
            slot_id=int(slot) if slot is not None else None,
            object=text_of("object"),
            id=attrs.get("id"),
            pin_source=pin,
        )

    def read_pin(self) -> str:
        """The user PIN from its file (mode 0600, one line) or environment variable."""
        source = self.pin_source
        if source is None:
            raise ConfigError(
                ["pkcs11 URI: pin-source=file:PATH or pin-source=env:NAME is required"]
            )
        if source.startswith("env:"):
            value = os.environ.get(source.removeprefix("env:"))
            if not value:
                raise ConfigError([f"{source}: the PIN's environment variable is not set"])
            return value
        if not source.startswith("file:"):
            raise ConfigError([f"pin-source {source!r}: use file:PATH or env:NAME"])
        path = Path(source.removeprefix("file:"))
        check_private_file(path, "PIN file")
        pin = path.read_text(encoding="utf-8").rstrip("\r\n")
        if not pin:
            raise ConfigError([f"{path}: the PIN file is empty"])
        return pin


# The library, once per process: a forked worker initialises its own (PKCS#11 sessions
# do not survive fork).
_libraries: dict[str, tuple[int, Any]] = {}
_libraries_lock = threading.Lock()


def _library(module_path: str) -> Any:
    with _libraries_lock:
        loaded = _libraries.get(module_path)
        if loaded is not None and loaded[0] == os.getpid():
            return loaded[1]
        try:
            lib = pkcs11.lib(module_path)
            if loaded is not None:  # inherited from the parent across fork()
                lib.reinitialize()
        except (RuntimeError, OSError) as exc:
            raise ConfigError([f"{module_path}: cannot load the PKCS#11 module ({exc})"]) from exc
        _libraries[module_path] = (os.getpid(), lib)
        return lib


def _token(uri: Pkcs11Uri) -> Any:
    lib = _library(uri.module_path)
    try:
        tokens = [
            slot.get_token()
            for slot in lib.get_slots(token_present=True)
            if uri.slot_id is None or slot.slot_id == uri.slot_id
        ]
    except pkcs11.PKCS11Error as exc:
        raise ConfigError([f"{_shown(uri)}: cannot list the module's tokens ({exc!r})"]) from exc
    found = [
        t
        for t in tokens
        if (uri.token is None or t.label == uri.token)
        and (uri.serial is None or t.serial.decode(errors="replace").strip() == uri.serial)
    ]
    if len(found) != 1:
        what = "no token" if not found else f"{len(found)} tokens"
        raise ConfigError([f"{_shown(uri)}: {what} match(es) token/serial/slot-id"])
    return found[0]


def _shown(uri: Pkcs11Uri) -> str:
    parts = [
        f"token={uri.token}" if uri.token else "",
        f"object={uri.object}" if uri.object else "",
    ]
    return "pkcs11:" + ";".join(p for p in parts if p)


def _der_octets(value: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING (some tokens give the bare point)."""
    if len(value) >= 2 and value[0] == 0x04:
        length, offset = value[1], 2
        if length & 0x80:
            n = length & 0x7F
            length, offset = int.from_bytes(value[2 : 2 + n], "big"), 2 + n
        if offset + length == len(value):
            return value[offset:]
    return value


@dataclass(eq=False, slots=True, kw_only=True)
class HardwareKey:
    """A private key held by a PKCS#11 token; it signs there and never leaves it."""

    uri: Pkcs11Uri
    algorithm: str  # the RFC 9421 name, as gateway.crypto.keys.algorithm_for gives it
    public: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    label: str
    key_id: bytes
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _session: tuple[int, Any, Any] | None = None  # (pid, session, private key object)

    def public_key(self) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        return self.public

    def sign(self, data: bytes) -> bytes:
        """The signature over ``data``, as RFC 9421 and JWS carry it."""
        # python-pkcs11 runs one operation at a time per session; this lock guards the
        # session itself, reopened after a failure, as threads may sign at once.
        with self._lock:
            try:
                key = self._private()
                if self.algorithm == "ed25519":
                    return bytes(key.sign(data, mechanism=Mechanism.EDDSA))
                if self.algorithm == "ecdsa-p256-sha256":
                    digest = hashlib.sha256(data).digest()
                    return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))
                return bytes(
                    key.sign(
                        data,
                        mechanism=Mechanism.SHA512_RSA_PKCS_PSS,
                        mechanism_param=(Mechanism.SHA512, MGF.SHA512, 64),
                    )
                )
            except (pkcs11.PKCS11Error, ConfigError) as exc:
                self._session = None  # a lost session is opened again on the next call
                raise InternalError(f"the token did not sign ({type(exc).__name__})") from exc

    def _private(self) -> Any:
        if self._session is not None and self._session[0] == os.getpid():
            return self._session[2]
        session, private = _open_private(self.uri, self.label, self.key_id)
        self._session = (os.getpid(), session, private)
        return private

    def close(self) -> None:
        with self._lock:
            if self._session is not None and self._session[0] == os.getpid():
                self._session[1].close()
            self._session = None


def _login(token: Any, uri: Pkcs11Uri, *, rw: bool) -> Any:
    """A session logged in as the user (login is per token and process: a second session
    shares it)."""
    pin = uri.read_pin()
    try:
        return token.open(rw=rw, user_pin=pin)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return token.open(rw=rw)
    except pkcs11.PKCS11Error as exc:
        raise ConfigError([f"{_shown(uri)}: cannot log in to the token ({exc!r})"]) from exc


def _open_private(uri: Pkcs11Uri, label: str | None, key_id: bytes | None) -> tuple[Any, Any]:

    session = _login(_token(uri), uri, rw=False)
    try:
        private = session.get_key(ObjectClass.PRIVATE_KEY, label=label, id=key_id)
    except pkcs11.NoSuchKey as exc:
        session.close()
        raise ConfigError([f"{_shown(uri)}: the token holds no such private key"]) from exc
    except pkcs11.MultipleObjectsReturned as exc:
        session.close()
        raise ConfigError([f"{_shown(uri)}: several private keys match; add id="]) from exc
    return session, private


def _public_of(session: Any, private: Any, shown: str) -> tuple[str, Any]:
    """The algorithm and ``cryptography`` public key of a token's private key."""

    key_type = private[Attribute.KEY_TYPE]
    try:
        label, key_id = private[Attribute.LABEL], private[Attribute.ID]
        public = session.get_key(ObjectClass.PUBLIC_KEY, label=label or None, id=key_id or None)
    except pkcs11.PKCS11Error as exc:
        raise ConfigError([f"{shown}: the token holds no public key beside it ({exc!r})"]) from exc
    if key_type == KeyType.RSA:
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(public[Attribute.MODULUS], "big"),
        )
        if numbers.n.bit_length() < 2048:
            raise ConfigError([f"{shown}: an RSA key of {numbers.n.bit_length()} bits is too weak"])
        return "rsa-pss-sha512", numbers.public_key()
    params = bytes(public[Attribute.EC_PARAMS])
    if key_type == KeyType.EC_EDWARDS and params in _ED25519_PARAMS:
        raw = _der_octets(bytes(public[Attribute.EC_POINT]))
        return "ed25519", ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if key_type == KeyType.EC and params == _P256_OID:
        point = _der_octets(bytes(public[Attribute.EC_POINT]))
        return "ecdsa-p256-sha256", ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), point
        )
    if params == _SM2_OID or int(key_type) >= 0x80000000:
        raise ConfigError([f"{shown}: {SM2_REFUSED}"])
    raise ConfigError([f"{shown}: unsupported key type {key_type!r} (curve {params.hex()})"])


def open_key(uri: Pkcs11Uri) -> HardwareKey:
    """The token's key named by ``uri``; refused when the token would let it out."""

    shown = _shown(uri)
    session, private = _open_private(uri, uri.object, uri.id)
    try:
        try:
            extractable = bool(private[Attribute.EXTRACTABLE])
            sensitive = bool(private[Attribute.SENSITIVE])
        except pkcs11.PKCS11Error as exc:
            raise ConfigError([f"{shown}: cannot read the key's attributes ({exc!r})"]) from exc
        if extractable or not sensitive:
            raise ConfigError(
                [
                    f"{shown}: the token would let this private key out (CKA_EXTRACTABLE "
                    f"{extractable}, CKA_SENSITIVE {sensitive}); make one with "
                    "`gateway keygen --pkcs11`, which it keeps"
                ]
            )
        algorithm, public = _public_of(session, private, shown)
        key = HardwareKey(
            uri=uri,
            algorithm=algorithm,
            public=public,
            label=private[Attribute.LABEL],
            key_id=bytes(private[Attribute.ID]),
        )
    except BaseException:
        session.close()
        raise
    key._session = (os.getpid(), session, private)
    return key


def generate_key(uri: Pkcs11Uri, kind: HardwareKind, *, key_id: bytes) -> HardwareKey:
    """Make a key pair IN the token (sensitive, never extractable) labelled ``object=``."""

    if kind == "sm2":
        raise ConfigError([f"{_shown(uri)}: {SM2_REFUSED}"])
    if uri.object is None:
        raise ConfigError(["pkcs11 URI: object= names the new key"])
    token = _token(uri)
    private_template = {
        Attribute.EXTRACTABLE: False,
        Attribute.SENSITIVE: True,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SIGN: True,
    }
    with _login(token, uri, rw=True) as session:
        try:
            session.get_key(ObjectClass.PRIVATE_KEY, label=uri.object)
        except pkcs11.NoSuchKey:
            pass
        else:
            raise ConfigError([f"{_shown(uri)}: the token holds this key already"])
        common: dict[str, Any] = {
            "label": uri.object,
            "id": key_id,
            "store": True,
            "private_template": private_template,
            "public_template": {Attribute.TOKEN: True, Attribute.VERIFY: True},
        }
        try:
            if kind == "rsa-pss":
                session.generate_keypair(KeyType.RSA, 3072, **common)
            else:
                curve = "1.3.101.112" if kind == "ed25519" else "secp256r1"
                params = session.create_domain_parameters(
                    KeyType.EC_EDWARDS if kind == "ed25519" else KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
                    local=True,
                )
                mechanism = Mechanism.EC_EDWARDS_KEY_PAIR_GEN if kind == "ed25519" else None
                params.generate_keypair(mechanism=mechanism, **common)
        except pkcs11.PKCS11Error as exc:
            raise ConfigError(
                [f"{_shown(uri)}: the token cannot make a {kind} key ({exc!r})"]
            ) from exc
    return open_key(dataclasses.replace(uri, id=key_id))
