"""SM2 with SM3 (GB/T 32918, GM/T 0009): keys and signatures, through the system's libcrypto.

``cryptography`` has no SM2 (pyca/cryptography #6857); OpenSSL 3 does, with the signer ID
the standard needs. This module reaches it through ``ctypes`` and is the one small
interface the rest of the gateway sees: ``Sm2PrivateKey`` (generate, PEM in and out,
``sign``) and ``Sm2PublicKey`` (from and to the curve point, ``verify``). Signatures are
``r‖s`` (32 bytes each); only canonical ones verify (64 bytes, ``0 < r, s < n``). A
failed operation leaves nothing in OpenSSL's error queue (the system libcrypto is shared
with Python's ``ssl`` and ``hashlib``) and prints nothing. docs/decisions.md says why this
backend and gives its measurements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

__all__ = [
    "SIGNER_ID",
    "Sm2PrivateKey",
    "Sm2PublicKey",
    "Sm2Unavailable",
    "available",
]

SIGNER_ID = b"1234567812345678"  # GM/T 0009's default distinguishing ID
# The order n of the curve sm2p256v1 (GB/T 32918.5).
ORDER = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
# SubjectPublicKeyInfo of an SM2 key up to its uncompressed point: id-ecPublicKey with the
# curve OID 1.2.156.10197.1.301, as OpenSSL writes it.
_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a811ccf5501822d03420004")


class Sm2Unavailable(RuntimeError):
    """The system's libcrypto is missing, older than OpenSSL 3, or built without SM2."""


_vp = ctypes.c_void_p
_size = ctypes.c_size_t
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "OpenSSL_version_num": (ctypes.c_ulong, []),
    "ERR_clear_error": (None, []),
    "ERR_peek_error": (ctypes.c_ulong, []),
    "BIO_new_mem_buf": (_vp, [ctypes.c_char_p, ctypes.c_int]),
    "BIO_new": (_vp, [_vp]),
    "BIO_s_mem": (_vp, []),
    "BIO_ctrl": (ctypes.c_long, [_vp, ctypes.c_int, ctypes.c_long, _vp]),
    "BIO_free": (ctypes.c_int, [_vp]),
    "PEM_read_bio_PrivateKey": (_vp, [_vp, _vp, _vp, ctypes.c_char_p]),
    "PEM_write_bio_PrivateKey": (ctypes.c_int, [_vp, _vp, _vp, _vp, ctypes.c_int, _vp, _vp]),
    "PEM_write_bio_PKCS8PrivateKey": (
        ctypes.c_int,
        [_vp, _vp, _vp, ctypes.c_char_p, ctypes.c_int, _vp, ctypes.c_char_p],
    ),
    "EVP_aes_256_cbc": (_vp, []),
    "EVP_sm3": (_vp, []),
    "EVP_PKEY_free": (None, [_vp]),
    "EVP_PKEY_is_a": (ctypes.c_int, [_vp, ctypes.c_char_p]),
    "d2i_PUBKEY": (_vp, [_vp, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
    "i2d_PUBKEY": (ctypes.c_int, [_vp, ctypes.POINTER(ctypes.c_char_p)]),
    "EVP_PKEY_CTX_new": (_vp, [_vp, _vp]),
    "EVP_PKEY_CTX_new_from_name": (_vp, [_vp, ctypes.c_char_p, _vp]),
    "EVP_PKEY_CTX_free": (None, [_vp]),
    "EVP_PKEY_CTX_set1_id": (ctypes.c_int, [_vp, ctypes.c_char_p, ctypes.c_int]),
    "EVP_PKEY_keygen_init": (ctypes.c_int, [_vp]),
    "EVP_PKEY_generate": (ctypes.c_int, [_vp, ctypes.POINTER(_vp)]),
    "EVP_MD_CTX_new": (_vp, []),
    "EVP_MD_CTX_free": (None, [_vp]),
    "EVP_MD_CTX_set_pkey_ctx": (None, [_vp, _vp]),
    "EVP_DigestSignInit": (ctypes.c_int, [_vp, _vp, _vp, _vp, _vp]),
    "EVP_DigestSign": (
        ctypes.c_int,
        [_vp, ctypes.c_char_p, ctypes.POINTER(_size), ctypes.c_char_p, _size],
    ),
    "EVP_DigestVerifyInit": (ctypes.c_int, [_vp, _vp, _vp, _vp, _vp]),
    "EVP_DigestVerify": (ctypes.c_int, [_vp, ctypes.c_char_p, _size, ctypes.c_char_p, _size]),
}
_BIO_CTRL_INFO = 3  # BIO_get_mem_data


@functools.cache
def _lib() -> Any:
    """libcrypto with the prototypes this module uses; raises ``Sm2Unavailable``."""
    names = ["libcrypto.so.3", ctypes.util.find_library("crypto")]
    lib = None
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise Sm2Unavailable("SM2 needs OpenSSL 3's libcrypto, which this system lacks")
    try:
        for function, (restype, argtypes) in _SIGNATURES.items():
            getattr(lib, function).restype = restype
            getattr(lib, function).argtypes = argtypes
    except AttributeError as exc:
        raise Sm2Unavailable(f"this system's libcrypto is not OpenSSL 3 ({exc})") from exc
    if lib.OpenSSL_version_num() < 0x30000000:
        raise Sm2Unavailable("SM2 needs OpenSSL 3's libcrypto; this system has an older one")
    probe = lib.EVP_PKEY_CTX_new_from_name(None, b"SM2", None)
    lib.ERR_clear_error()
    if not probe:
        raise Sm2Unavailable("this system's OpenSSL was built without SM2")
    lib.EVP_PKEY_CTX_free(probe)
    return lib


def available() -> bool:
    """Whether SM2 can be used here."""
    try:
        _lib()
    except Sm2Unavailable:
        return False
    return True


class _Pkey:
    """Owns one ``EVP_PKEY`` of type SM2."""

    __slots__ = ("_pkey",)

    def __init__(self, pkey: int | None) -> None:
        lib = _lib()
        if not pkey:
            lib.ERR_clear_error()
            raise ValueError("not an SM2 key")
        if lib.EVP_PKEY_is_a(pkey, b"SM2") != 1:
            # An EC key on another curve (or one OpenSSL did not mark SM2) must never reach
            # the SM2 signature code: it would be plain ECDSA.
            lib.EVP_PKEY_free(pkey)
            lib.ERR_clear_error()
            raise ValueError("not an SM2 key")
        if lib.i2d_PUBKEY(pkey, None) != len(_SPKI_PREFIX) + 64:
            lib.EVP_PKEY_free(pkey)
            lib.ERR_clear_error()
            raise ValueError("an SM2 key must name its curve (explicit parameters are refused)")
        self._pkey = pkey

    def __del__(self) -> None:
        pkey = getattr(self, "_pkey", None)
        if pkey:
            _lib().EVP_PKEY_free(pkey)

    def _point(self) -> tuple[int, int]:
        lib = _lib()
        size = lib.i2d_PUBKEY(self._pkey, None)  # asked first: i2d writes unchecked
        if size != len(_SPKI_PREFIX) + 64:
            lib.ERR_clear_error()
            raise ValueError("unexpected SM2 public key encoding")
        buffer = ctypes.create_string_buffer(size)
        cursor = ctypes.c_char_p(ctypes.addressof(buffer))
        written = lib.i2d_PUBKEY(self._pkey, ctypes.byref(cursor))
        der = buffer.raw[:written]
        if written != size or not der.startswith(_SPKI_PREFIX):
            raise ValueError("unexpected SM2 public key encoding")
        point = der[len(_SPKI_PREFIX) :]
        return int.from_bytes(point[:32], "big"), int.from_bytes(point[32:], "big")

    def _md_ctx(self, init: str) -> tuple[int, int]:
        """A digest context set up for SM2 with SM3 and the signer ID (Z hashed in)."""
        lib = _lib()
        md_ctx = lib.EVP_MD_CTX_new()
        pkey_ctx = lib.EVP_PKEY_CTX_new(self._pkey, None)
        if not md_ctx or not pkey_ctx:
            lib.EVP_MD_CTX_free(md_ctx)
            lib.EVP_PKEY_CTX_free(pkey_ctx)
            raise MemoryError("libcrypto could not allocate a context")
        if lib.EVP_PKEY_CTX_set1_id(pkey_ctx, SIGNER_ID, len(SIGNER_ID)) != 1:
            self._free(md_ctx, pkey_ctx)
            raise Sm2Unavailable("libcrypto refused the SM2 signer ID")
        lib.EVP_MD_CTX_set_pkey_ctx(md_ctx, pkey_ctx)
        if getattr(lib, init)(md_ctx, None, lib.EVP_sm3(), None, self._pkey) != 1:
            self._free(md_ctx, pkey_ctx)
            raise ValueError("libcrypto could not start an SM2 operation with this key")
        return md_ctx, pkey_ctx

    @staticmethod
    def _free(md_ctx: int, pkey_ctx: int) -> None:
        lib = _lib()
        lib.EVP_MD_CTX_free(md_ctx)
        lib.EVP_PKEY_CTX_free(pkey_ctx)
        lib.ERR_clear_error()


class Sm2PublicKey(_Pkey):
    """An SM2 public key: a point on sm2p256v1."""

    __slots__ = ()

    @classmethod
    def from_point(cls, x: int, y: int) -> Sm2PublicKey:
        """The key at (x, y); ``ValueError`` when that is not a point of the curve."""
        if not (0 <= x < 2**256 and 0 <= y < 2**256):
            raise ValueError("SM2 coordinates are 32 bytes")
        der = _SPKI_PREFIX + x.to_bytes(32, "big") + y.to_bytes(32, "big")
        cursor = ctypes.c_char_p(der)
        return cls(_lib().d2i_PUBKEY(None, ctypes.byref(cursor), len(der)))

    def point(self) -> tuple[int, int]:
        return self._point()

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise ``InvalidSignature`` unless ``signature`` (r‖s) is canonical and valid."""
        if len(signature) != 64:
            raise InvalidSignature("an SM2 signature is 64 bytes (r‖s)")
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        if not (0 < r < ORDER and 0 < s < ORDER):
            raise InvalidSignature("SM2 signature r or s out of range")
        der = encode_dss_signature(r, s)
        lib = _lib()
        md_ctx, pkey_ctx = self._md_ctx("EVP_DigestVerifyInit")
        try:
            ok = lib.EVP_DigestVerify(md_ctx, der, len(der), data, len(data))
        finally:
            self._free(md_ctx, pkey_ctx)
        if ok != 1:
            raise InvalidSignature("the SM2 signature does not verify")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sm2PublicKey) and self.point() == other.point()

    def __hash__(self) -> int:
        return hash(self.point())


class Sm2PrivateKey(_Pkey):
    """An SM2 private key."""

    __slots__ = ()

    @classmethod
    def generate(cls) -> Sm2PrivateKey:
        lib = _lib()
        ctx = lib.EVP_PKEY_CTX_new_from_name(None, b"SM2", None)
        pkey = _vp()
        try:
            if lib.EVP_PKEY_keygen_init(ctx) != 1 or lib.EVP_PKEY_generate(ctx, pkey) != 1:
                lib.ERR_clear_error()
                raise Sm2Unavailable("libcrypto could not generate an SM2 key")
        finally:
            lib.EVP_PKEY_CTX_free(ctx)
        return cls(pkey.value)

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None) -> Sm2PrivateKey:
        """A PEM private key (PKCS#8, encrypted PKCS#8, or SEC1 ``EC PRIVATE KEY``).

        ``ValueError`` when it is not an SM2 key or cannot be decrypted."""
        lib = _lib()
        bio = lib.BIO_new_mem_buf(data, len(data))
        try:
            # A passphrase is always given (empty if none) so OpenSSL never prompts.
            pkey = lib.PEM_read_bio_PrivateKey(bio, None, None, passphrase or b"")
        finally:
            lib.BIO_free(bio)
        return cls(pkey)

    def private_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#8 PEM as ``openssl genpkey -algorithm SM2`` writes it; encrypted with
        AES-256-CBC (PBES2, PBKDF2) when ``passphrase`` is given."""
        lib = _lib()
        bio = lib.BIO_new(lib.BIO_s_mem())
        try:
            if passphrase:
                ok = lib.PEM_write_bio_PKCS8PrivateKey(
                    bio, self._pkey, lib.EVP_aes_256_cbc(), None, 0, None, passphrase
                )
            else:
                ok = lib.PEM_write_bio_PrivateKey(bio, self._pkey, None, None, 0, None, None)
            if ok != 1:
                lib.ERR_clear_error()
                raise ValueError("libcrypto could not write the SM2 key")
            start = ctypes.c_char_p()
            length = lib.BIO_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.byref(start))
            return ctypes.string_at(start, length)
        finally:
            lib.BIO_free(bio)

    def public_key(self) -> Sm2PublicKey:
        x, y = self._point()
        return Sm2PublicKey.from_point(x, y)

    def sign(self, data: bytes) -> bytes:
        """SM2 over ``data`` with SM3 and the signer ID: ``r‖s``, 64 bytes."""
        lib = _lib()
        md_ctx, pkey_ctx = self._md_ctx("EVP_DigestSignInit")
        try:
            der = ctypes.create_string_buffer(80)
            length = _size(len(der))
            if lib.EVP_DigestSign(md_ctx, der, ctypes.byref(length), data, len(data)) != 1:
                raise ValueError("libcrypto could not sign with this SM2 key")
        finally:
            self._free(md_ctx, pkey_ctx)
        r, s = decode_dss_signature(der.raw[: length.value])
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
