"""A small local CA for the local (mTLS) listener: ``gateway certs`` and ``gateway up``.

P-256 keys (PKCS#8 PEM, mode 0600) and SHA-256 signatures, with what OpenSSL's strict
verification wants (subject and authority key identifiers, key usage, extended key
usage). A member certificate names its member twice: subject CN and SAN URI
``urn:gw:member:<id>`` (gateway/exchange/mtls.py reads the URI first).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigError
from gateway.exchange.mtls import MEMBER_URI_PREFIX, fingerprint_of

__all__ = [
    "Issued",
    "ensure_local_pki",
    "issue",
    "load_ca",
    "make_ca",
    "revoke",
]

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate written to ``cert`` (and its key to ``key``)."""

    cert: Path
    key: Path
    fingerprint: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return fingerprint_of(cert.public_bytes(serialization.Encoding.DER))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(cert: Path, key: Path, *, name: str = "Gateway local CA", days: int = 3650) -> Issued:
    """A self-signed CA that may sign certificates and CRLs."""
    private = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True,
        crl_sign=True, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    built = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + days * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False
        )
        .sign(private, hashes.SHA256())
    )
    _write_key(private, key)
    return Issued(cert, key, _write_cert(built, cert))


def load_ca(cert: Path, key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca = x509.load_pem_x509_certificate(cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError([f"{cert}: cannot load the CA with {key} ({exc})"]) from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ConfigError([f"{key}: the CA key must be an EC key"])
    return ca, private


def issue(
    ca_cert: Path,
    ca_key: Path,
    cert: Path,
    key: Path,
    *,
    member: str | None = None,
    hosts: Sequence[str] = (),
    days: int = 825,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A member's client certificate (``member``) or a server certificate (``hosts``)."""
    ca, ca_private = load_ca(ca_cert, ca_key)
    private = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    subject = member or (hosts[0] if hosts else "localhost")
    names: list[x509.GeneralName] = []
    if member is not None:
        names.append(x509.UniformResourceIdentifier(MEMBER_URI_PREFIX + member))
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if member else ExtendedKeyUsageOID.SERVER_AUTH
    built = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca.subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or start + days * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()),
            critical=False,
        )
        .sign(ca_private, hashes.SHA256())
    )
    _write_key(private, key)
    return Issued(cert, key, _write_cert(built, cert))


def revoke(ca_cert: Path, ca_key: Path, crl: Path, certs: Sequence[Path]) -> int:
    """Add ``certs`` to the CA's CRL at ``crl`` (made if missing, replaced atomically so a
    gateway re-reading it never sees half a file); the number of entries now."""
    ca, ca_private = load_ca(ca_cert, ca_key)
    serials: dict[int, datetime.datetime] = {}
    if crl.exists():
        try:
            current = x509.load_pem_x509_crl(crl.read_bytes())
        except ValueError as exc:
            raise ConfigError([f"{crl}: not a PEM CRL ({exc})"]) from exc
        for entry in current:
            serials[entry.serial_number] = entry.revocation_date_utc
    now = _now()
    for path in certs:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError([f"{path}: cannot read a PEM certificate ({exc})"]) from exc
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ConfigError([f"{path}: not issued by this CA ({ca_cert})"]) from exc
        serials.setdefault(cert.serial_number, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - datetime.timedelta(minutes=1))
        .next_update(now + 7 * _DAY)
    )
    for serial, when in serials.items():
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    signed = builder.sign(ca_private, hashes.SHA256())
    tmp = crl.with_name(crl.name + ".tmp")
    tmp.write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    tmp.replace(crl)
    return len(serials)


def ensure_local_pki(keys: Path, members: Sequence[tuple[str, str]]) -> list[Path]:
    """What the shipped local listener needs, made when missing (``gateway up``): the CA
    ``local-ca.crt`` (+ ``.key``), the listener's ``local-server.crt`` for 127.0.0.1 and
    localhost, and one client certificate per ``(member id, file stem)``. The files made."""
    made: list[Path] = []
    ca_cert, ca_key = keys / "local-ca.crt", keys / "local-ca.key"
    if not ca_cert.exists() or not ca_key.exists():
        make_ca(ca_cert, ca_key)
        made.append(ca_cert)
    wanted = [("local-server", None), *((stem, member) for member, stem in members)]
    for stem, member in wanted:
        cert, key = keys / f"{stem}.crt", keys / f"{stem}.key"
        if cert.exists() and key.exists() and ca_cert not in made:
            continue
        hosts = () if member else ("127.0.0.1", "localhost")
        issue(ca_cert, ca_key, cert, key, member=member, hosts=hosts)
        made.append(cert)
    return made
