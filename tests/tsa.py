"""A real RFC 3161 time-stamping authority for the tests: ``openssl ts -reply`` behind a
small aiohttp server, with a CA and a TSA certificate (critical extendedKeyUsage
timeStamping) made per session, never committed.

``TsaServer.down`` makes it answer 503 (an outage); ``requests`` counts what it was asked,
``stamped`` what it stamped, ``queries`` keeps each query as received.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TsaPki", "TsaServer", "make_pki", "openssl"]

openssl = shutil.which("openssl") or "openssl"


@dataclass(frozen=True, slots=True)
class TsaPki:
    directory: Path
    ca: Path  # the CA certificate a verifier trusts
    cert: Path  # the TSA's certificate
    key: Path
    config: Path  # openssl's [tsa] section for `openssl ts -reply`


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(directory: Path, name: str = "Test TSA") -> TsaPki:
    """A CA and a TSA certificate it issued, and an openssl config that signs with it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} CA"))
        .issuer_name(_name(f"{name} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    tsa_key = ec.generate_private_key(ec.SECP256R1())
    tsa = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(tsa_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = TsaPki(
        directory=directory,
        ca=directory / "ca.pem",
        cert=directory / "tsa.pem",
        key=directory / "tsa.key",
        config=directory / "tsa.cnf",
    )
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(tsa.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        tsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "serial").write_text("01\n")
    pki.config.write_text(
        "[ tsa ]\n"
        "default_tsa = tsa_config\n"
        "[ tsa_config ]\n"
        f"serial = {directory / 'serial'}\n"
        "crypto_device = builtin\n"
        f"signer_cert = {pki.cert}\n"
        f"signer_key = {pki.key}\n"
        "signer_digest = sha256\n"
        "default_policy = 1.2.3.4.1\n"
        "digests = sha256, sha384, sha512\n"
        "accuracy = secs:1\n"
        "ordering = yes\n"
        "tsa_name = yes\n"
        "ess_cert_id_alg = sha256\n",
        encoding="utf-8",
    )
    return pki


class TsaServer:
    """``openssl ts -reply`` over HTTP (RFC 3161 section 3.4): a query in, a reply out."""

    def __init__(self, pki: TsaPki) -> None:
        self.pki = pki
        self.down = False
        self.requests = 0
        self.stamped = 0
        self.queries: list[Path] = []  # every query received, in order
        self._n = itertools.count()
        self._work = Path(tempfile.mkdtemp(prefix="tsa-", dir=pki.directory))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.down:
            return web.Response(status=503, text="down for maintenance")
        if request.content_type != "application/timestamp-query":
            return web.Response(status=415)
        n = next(self._n)
        query, reply = self._work / f"{n}.tsq", self._work / f"{n}.tsr"
        query.write_bytes(await request.read())
        self.queries.append(query)
        proc = await asyncio.create_subprocess_exec(
            openssl,
            "ts",
            "-reply",
            "-config",
            str(self.pki.config),
            "-queryfile",
            str(query),
            "-out",
            str(reply),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            return web.Response(status=500, text=err.decode(errors="replace"))
        self.stamped += 1
        return web.Response(body=reply.read_bytes(), content_type="application/timestamp-reply")
