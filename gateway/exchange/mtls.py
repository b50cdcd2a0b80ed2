"""Members that cannot sign: mutual TLS on the local listener (``listen.local``).

A legacy system talks to its own gateway over a local TLS connection with a client
certificate, as an X-Road information system talks to its security server; the gateway
then speaks for it, signing everything it sends on with its own key. The certificate is
the member's credential only here, and only for a member whose ``auth`` names ``mtls``:

    TLS handshake (CERT_REQUIRED, TLS 1.2+, chain to ``client_ca``; expired: refused)
    → exactly one member: a pinned SHA-256 fingerprint, or ``certificate_ca`` issued it
      and it names the member (SAN URI ``urn:gw:member:<id>``, else its subject CN)
    → not revoked (an admin's ``revoked_certificates``; the CRL, re-read when it changes)
    → that member's ``auth`` has ``mtls`` and ``Gw-Client`` is that member.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from gateway.config.model import LocalListen
from gateway.crypto.keys import check_private_file
from gateway.errors import (
    CertificateRevoked,
    CertificateUnknown,
    ConfigError,
    SignatureMissing,
)
from gateway.runtime.registry import Member, Runtime

__all__ = [
    "LOCAL_TLS",
    "MEMBER_URI_PREFIX",
    "LocalTls",
    "PeerCertificate",
    "RevocationList",
    "fingerprint_of",
    "local_context",
    "member_names",
]

log = logging.getLogger("gateway.exchange.mtls")

# A certificate names its member as SAN URI ``urn:gw:member:330000:legacy-records``.
MEMBER_URI_PREFIX = "urn:gw:member:"


def fingerprint_of(der: bytes) -> str:
    """SHA-256 of a certificate's DER, lowercase hex (what config and admin API pin)."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The client certificate a connection to the local listener presented."""

    certificate: x509.Certificate
    fingerprint: str


def member_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The member ids a certificate names: its ``urn:gw:member:`` SAN URIs, else its
    subject common names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = []
    named = tuple(u[len(MEMBER_URI_PREFIX) :] for u in uris if u.startswith(MEMBER_URI_PREFIX))
    if named:
        return named
    return tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))


def local_context(local: LocalListen) -> ssl.SSLContext:
    """The local listener's server context: the ``ssl`` module's secure defaults for a
    server, TLS 1.2 at least, a client certificate required and verified against
    ``client_ca`` only (never the system store)."""
    check_private_file(local.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(local.cert, local.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"/listen/local/tls: cannot load {local.cert} with {local.key} ({exc})"]
        ) from exc
    try:
        context.load_verify_locations(cafile=local.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"/listen/local/tls/client_ca: cannot load {local.client_ca} ({exc})"]
        ) from exc
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: cannot read a PEM certificate ({exc})"]) from exc


class RevocationList:
    """A CRL file (PEM, one or more, or DER), re-read whenever its size or mtime changes.

    Each CRL must be signed by one of the trusted CAs. A file that cannot be read or
    verified fails closed: every certificate is refused until it is fixed."""

    def __init__(self, path: Path, trusted: list[x509.Certificate]) -> None:
        self.path = path
        self._trusted = trusted
        self._stamp: tuple[int, int] | None = None
        self._revoked: frozenset[tuple[bytes, int]] = frozenset()
        self._error: str | None = None

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            data = self.path.read_bytes()
        except OSError as exc:
            self._stamp, self._error = None, f"cannot read {self.path} ({exc.strerror})"
            return
        try:
            self._revoked = frozenset(self._parse(data))
            self._error = None
        except ValueError as exc:
            self._error = f"{self.path}: {exc}"
            log.error("CRL refused, refusing every client certificate: %s", self._error)
        self._stamp = stamp

    def _parse(self, data: bytes) -> set[tuple[bytes, int]]:
        marker = b"-----BEGIN X509 CRL-----"
        if marker in data:
            crls = [x509.load_pem_x509_crl(marker + part) for part in data.split(marker)[1:]]
        else:
            crls = [x509.load_der_x509_crl(data)]
        revoked: set[tuple[bytes, int]] = set()
        for crl in crls:
            issuer = next((ca for ca in self._trusted if ca.subject == crl.issuer), None)
            if issuer is None or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                who = crl.issuer.rfc4514_string()
                raise ValueError(f"a CRL of {who} is not signed by a trusted CA")
            revoked.update((crl.issuer.public_bytes(), r.serial_number) for r in crl)
        return revoked

    def check(self, cert: x509.Certificate) -> None:
        self._reload()
        if self._error is not None:
            raise CertificateRevoked(f"revocation status unknown: {self._error}")
        if (cert.issuer.public_bytes(), cert.serial_number) in self._revoked:
            raise CertificateRevoked("the client certificate is revoked (CRL)")


class LocalTls:
    """The local listener: its TLS context, and who a peer certificate belongs to."""

    def __init__(self, local: LocalListen) -> None:
        self.config = local
        self.context = local_context(local)
        trusted = _load_certificates(local.client_ca)
        self.crl = RevocationList(local.crl, trusted) if local.crl is not None else None
        self._cas: dict[Path, tuple[int, list[x509.Certificate]]] = {}

    def peer(self, request: web.Request) -> PeerCertificate | None:
        """The certificate of a request that came in on this listener (else None)."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(ssl_object, ssl.SSLObject) or ssl_object.context is not self.context:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        if der is None:  # pragma: no cover - CERT_REQUIRED refuses the handshake first
            return None
        return PeerCertificate(x509.load_der_x509_certificate(der), fingerprint_of(der))

    def check_revoked(self, runtime: Runtime, peer: PeerCertificate) -> None:
        """Refuse a certificate an admin revoked (for any member) or the CRL lists; on
        this listener that holds for signed requests too."""
        fp = peer.fingerprint
        if any(fp in m.config.revoked_certificates for m in runtime.members.values()):
            raise CertificateRevoked(f"certificate {fp} is revoked")
        if self.crl is not None:
            self.crl.check(peer.certificate)

    def member_of(self, runtime: Runtime, peer: PeerCertificate) -> Member:
        """The one member this certificate authenticates; refused if revoked, unknown,
        ambiguous, or the member does not authenticate by mtls."""
        self.check_revoked(runtime, peer)
        fp = peer.fingerprint
        names = member_names(peer.certificate)
        found = [
            m
            for m in runtime.members.values()
            if fp in m.config.certificates
            or (m.config.certificate_ca is not None and m.id in names and self._issued(m, peer))
        ]
        if len(found) != 1:
            raise CertificateUnknown(f"certificate {fp} is not the certificate of one member")
        member = found[0]
        if "mtls" not in member.config.auth:
            raise SignatureMissing(
                f"{member.id} authenticates by signature: a certificate does not replace it"
            )
        return member

    def _issued(self, member: Member, peer: PeerCertificate) -> bool:
        path = member.config.certificate_ca
        assert path is not None
        try:
            mtime = path.stat().st_mtime_ns
            cached = self._cas.get(path)
            if cached is None or cached[0] != mtime:
                cached = self._cas[path] = (mtime, _load_certificates(path))
        except (OSError, ConfigError) as exc:
            log.error("certificate_ca of %s cannot be read: %s", member.id, exc)
            return False
        for ca in cached[1]:
            try:
                peer.certificate.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False


LOCAL_TLS = web.AppKey("local_tls", LocalTls)
