"""Signing requests and answers with one key (or a member's shared secret)."""

from __future__ import annotations

import base64
import datetime
import secrets
import time
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from http_message_signatures import HTTPMessageSigner
from http_message_signatures.exceptions import HTTPMessageSignaturesException
from multidict import CIMultiDict
from nacl.signing import SigningKey

from gateway.crypto.hsm import HardwareKey
from gateway.crypto.keys import KeyPair, PrivateKey
from gateway.errors import InternalError, SignatureInvalid
from gateway.signing.algorithms import ALGORITHM_CLASSES, OneKey, hardware_class
from gateway.signing.base import (
    RESPONSE_COMPONENTS,
    RequestView,
    ResponseView,
    Unsupported,
    as_library_message,
    component_item,
    fast_base,
    request_components,
)
from gateway.signing.digest import DIGESTS, content_digest

__all__ = ["Signer"]


class Signer:
    """Signs requests and responses with one key pair.

    ``digest`` names the Content-Digest algorithm written when a message has none; by
    default ``sm3`` for an SM2 key (national cryptography on every hop), else ``sha-256``.
    ``nonces``: every signed request carries a fresh random ``nonce`` parameter unless
    the caller passes one (relayed and cross-region requests must have one; see
    docs/decisions.md); ``False`` only for fixed test vectors and byte-identical retries.
    """

    def __init__(
        self,
        keypair: KeyPair | None = None,
        *,
        label: str = "gw",
        include_alg: bool = True,
        digest: str | None = None,
        nonces: bool = True,
        **hmac: Any,
    ) -> None:
        if keypair is None:
            secret: bytes = hmac["secret"]
            self.kid: str = hmac["kid"]
            self.algorithm = "hmac-sha256"
            private: PrivateKey | bytes = secret
        else:
            self.kid = keypair.kid
            self.algorithm = keypair.algorithm
            private = keypair.private
        self.label = label
        self.nonces = nonces
        self.include_alg = include_alg
        if digest is not None and digest not in DIGESTS:
            raise ValueError(f"unsupported Content-Digest algorithm {digest!r}")
        self.digest = digest or ("sm3" if self.algorithm == "sm2-sm3" else "sha-256")
        # A key in a token signs there (gateway/crypto/hsm.py), on the calling thread: measured
        # in docs/decisions.md (Keys in hardware), a thread would not make it cheaper.
        algorithm_class = (
            hardware_class(self.algorithm)
            if isinstance(private, HardwareKey)
            else ALGORITHM_CLASSES[self.algorithm]
        )
        self._algorithm = algorithm_class(private_key=private)
        self._sodium = (
            SigningKey(private.private_bytes_raw())
            if isinstance(private, ed25519.Ed25519PrivateKey)
            else None
        )
        self._signer = HTTPMessageSigner(
            signature_algorithm=algorithm_class,
            key_resolver=OneKey(self.kid, None, private),
        )

    def sign_request(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        components: Sequence[str] | None = None,
        created: int | None = None,
        expires: int | None = None,
        nonce: str | None = None,
    ) -> None:
        """Add Content-Digest (if absent), Signature-Input and Signature to ``headers``."""
        if "Content-Digest" not in headers:
            headers["Content-Digest"] = content_digest(body, self.digest)
        if nonce is None and self.nonces:
            nonce = secrets.token_urlsafe(16)
        self._sign(
            RequestView(method, url, headers),
            components if components is not None else request_components(headers),
            created,
            expires,
            nonce,
        )

    def sign_response(
        self,
        status: int,
        headers: CIMultiDict[str],
        body: bytes,
        request: RequestView,
        request_label: str | None,
    ) -> None:
        """Sign an answer, bound to the request's signature with ``"signature";req``."""
        if "Content-Digest" not in headers:
            headers["Content-Digest"] = content_digest(body, self.digest)
        components = [name for name in RESPONSE_COMPONENTS if name in headers or name == "@status"]
        if request_label is not None:
            components.append(f'"signature";req;key="{request_label}"')
        self._sign(ResponseView(status, headers, request), components, None, None, None)

    def _sign(
        self,
        message: RequestView | ResponseView,
        components: Sequence[str],
        created: int | None,
        expires: int | None,
        nonce: str | None,
    ) -> None:
        params: dict[str, Any] = {"created": created or int(time.time())}
        if expires:
            params["expires"] = expires
        if nonce:
            params["nonce"] = nonce
        params["keyid"] = self.kid
        if self.include_alg:
            params["alg"] = self.algorithm
        try:
            items = [component_item(c) for c in components]
            base, params_text = fast_base(message, items, params)
        except Unsupported:
            self._sign_with_library(message, components, created, expires, nonce)
            return
        except SignatureInvalid as exc:
            raise InternalError(f"cannot sign: {exc.detail}") from exc
        raw = self._sodium.sign(base).signature if self._sodium else self._algorithm.sign(base)
        signature = base64.b64encode(raw).decode("ascii")
        headers = message.headers
        assert isinstance(headers, CIMultiDict)  # we sign messages we are building
        headers.popall("Signature-Input", None)
        headers.popall("Signature", None)
        headers["Signature-Input"] = f"{self.label}={params_text}"
        headers["Signature"] = f"{self.label}=:{signature}:"

    def _sign_with_library(
        self,
        message: RequestView | ResponseView,
        components: Sequence[str],
        created: int | None,
        expires: int | None,
        nonce: str | None,
    ) -> None:
        utc = datetime.UTC
        try:
            self._signer.sign(
                as_library_message(message, None),
                key_id=self.kid,
                label=self.label,
                created=datetime.datetime.fromtimestamp(created, utc) if created else None,
                expires=datetime.datetime.fromtimestamp(expires, utc) if expires else None,
                nonce=nonce,
                include_alg=self.include_alg,
                covered_component_ids=tuple(components),
                # The digest was computed (or checked) by us; the library only reuses it.
                use_existing_digest="Content-Digest" in message.headers,
            )
        except HTTPMessageSignaturesException as exc:
            raise InternalError(f"cannot sign: {exc}") from exc
