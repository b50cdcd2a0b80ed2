"""TLS on the ingress and mutual TLS for peers (gateway/exchange/tls.py), with a CA, a server
certificate and client certificates generated at test time, on real TLS listeners."""

from __future__ import annotations

import copy
import datetime
import http.client
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config.model import parse_config
from gateway.errors import ConfigError
from gateway.exchange.app import create_app
from gateway.exchange.client import ExchangeClient, verify_reply
from gateway.exchange.limits import GatewayRunner
from gateway.exchange.tls import TLS_CONTEXT
from gateway.signing import Signer
from tests.conftest import PORTAL_ID, Keys, config_document, unused_port

# Certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA, the gateway's certificate, a client certificate from the CA, and a rogue one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client: tuple[Path, Path]
    rogue: tuple[Path, Path]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        purpose = usage or ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def _pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates made now for this module; nothing is committed."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_cert = _issue("Test Exchange CA", ca_key, None, ca=True)
    rogue_ca = _issue("Rogue CA", rogue_ca_key, None, ca=True)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    server = _issue(
        "127.0.0.1", server_key, (ca_cert.subject, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client = _issue("440000:gateway", client_key, (ca_cert.subject, ca_key))
    rogue = _issue("440000:gateway", rogue_key, (rogue_ca.subject, rogue_ca_key))
    return Pki(
        ca=_pem(ca_cert, d / "ca.pem"),
        server_cert=_pem(server, d / "server.pem"),
        server_key=_write_key(server_key, d / "server.key"),
        client=(_pem(client, d / "client.pem"), _write_key(client_key, d / "client.key")),
        rogue=(_pem(rogue, d / "rogue.pem"), _write_key(rogue_key, d / "rogue.key")),
    )


def client_context(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """What a peer uses: trusts the test CA, presents ``cert`` if given."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(cert[0], cert[1])
    return context


# A real TLS listener -----------------------------------------------------------------


def tls_document(keys: Keys, pki: Pki, tmp_path: Path, **tls: Any) -> dict[str, Any]:
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    doc["listen"] = {
        "ingress": {
            "host": "127.0.0.1",
            "port": unused_port(),
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), **tls},
        },
        "admin": {"port": unused_port()},
    }
    return doc


Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve_tls(keys: Keys, pki: Pki, tmp_path: Path) -> AsyncIterator[Serve]:
    """Start the ingress as `gateway serve` does (GatewayRunner, TLS site); give its URL."""
    runners: list[web.AppRunner] = []

    async def start(**tls: Any) -> str:
        doc = tls_document(keys, pki, tmp_path, **tls)
        config = parse_config(copy.deepcopy(doc), base=tmp_path)
        app = create_app(config, start_delivery=False)
        runner = GatewayRunner(app)
        runners.append(runner)  # cleaned up even if set-up or bind fails half-way
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", config.ingress.port, ssl_context=app[TLS_CONTEXT])
        await site.start()
        return f"https://127.0.0.1:{config.ingress.port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def get(url: str, context: ssl.SSLContext | bool) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=context, timeout=aiohttp.ClientTimeout(total=10)) as resp,
    ):
        return resp.status


# Tests ---------------------------------------------------------------------------------


async def test_the_ingress_speaks_https_and_only_https(serve_tls: Serve, pki: Pki) -> None:
    """TLS configured: https works for a client trusting the CA; plain http and an
    untrusting client fail."""
    url = await serve_tls()
    assert await get(f"{url}/healthz", client_context(pki)) == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get(f"{url}/healthz", ssl.create_default_context())
    with pytest.raises(aiohttp.ClientError):
        await get(url.replace("https", "http") + "/healthz", False)


async def test_required_client_certificates_admit_only_the_cas_clients(
    serve_tls: Serve, pki: Pki
) -> None:
    """require_client_cert: a certificate from client_ca passes; none, or a rogue one, fails."""
    url = await serve_tls(client_ca=str(pki.ca), require_client_cert=True)
    assert await get(f"{url}/healthz", client_context(pki, pki.client)) == 200
    with pytest.raises(aiohttp.ClientError):
        await get(f"{url}/healthz", client_context(pki))
    with pytest.raises(aiohttp.ClientError):
        await get(f"{url}/healthz", client_context(pki, pki.rogue))


async def test_optional_client_certificates_are_verified_when_presented(
    serve_tls: Serve, pki: Pki
) -> None:
    """client_ca without require: no certificate passes, a good one passes, a rogue one fails."""
    url = await serve_tls(client_ca=str(pki.ca))
    assert await get(f"{url}/healthz", client_context(pki)) == 200
    assert await get(f"{url}/healthz", client_context(pki, pki.client)) == 200
    with pytest.raises(aiohttp.ClientError):
        await get(f"{url}/healthz", client_context(pki, pki.rogue))


async def test_a_signed_exchange_over_mutual_tls_verifies_with_the_https_uri(
    serve_tls: Serve, pki: Pki, keys: Keys
) -> None:
    """Over mTLS the request's @target-uri is https://…; it verifies and the answer is signed."""
    url = await serve_tls(client_ca=str(pki.ca), require_client_cert=True)
    connector = aiohttp.TCPConnector(ssl=client_context(pki, pki.client))
    async with aiohttp.ClientSession(connector=connector) as session:
        client = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(keys.pairs["portal"], label="sig1"),
            base_url=url,
            session=session,
        )
        reply = await client.status(str(uuid.uuid4()))
    assert (reply.status, reply.json()["code"]) == (404, "message_unknown")
    assert reply.request.url.startswith("https://")
    assert verify_reply(reply, keys.verification("gateway")) == keys.pairs["gateway"].kid


def test_tls_configuration_problems_are_reported(keys: Keys, pki: Pki, tmp_path: Path) -> None:
    """require_client_cert without client_ca, an unreadable certificate, an open key file:
    each a ConfigError naming the place."""
    doc = tls_document(keys, pki, tmp_path, require_client_cert=True)
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, base=tmp_path)
    assert caught.value.problems == ("/listen/ingress/tls: require_client_cert needs a client_ca",)
    missing = parse_config(tls_document(keys, pki, tmp_path, cert="absent.pem"), base=tmp_path)
    with pytest.raises(ConfigError, match="/listen/ingress/tls: cannot load"):
        create_app(missing, start_delivery=False)
    bad_ca = parse_config(tls_document(keys, pki, tmp_path, client_ca="none.pem"), base=tmp_path)
    with pytest.raises(ConfigError, match="/listen/ingress/tls/client_ca: cannot load"):
        create_app(bad_ca, start_delivery=False)
    open_key = tmp_path / "open.key"
    open_key.write_bytes(pki.server_key.read_bytes())
    open_key.chmod(0o644)
    loose = parse_config(tls_document(keys, pki, tmp_path, key=str(open_key)), base=tmp_path)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        create_app(loose, start_delivery=False)


@pytest.mark.integration
def test_gateway_serve_listens_with_mutual_tls(keys: Keys, pki: Pki, tmp_path: Path) -> None:
    """`gateway serve` (a real process) announces https, admits the CA's client, refuses
    a client without a certificate, and stops cleanly on SIGTERM."""
    doc = tls_document(keys, pki, tmp_path, client_ca=str(pki.ca), require_client_cert=True)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    port = doc["listen"]["ingress"]["port"]
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Ready"):
                break
        assert f"https://127.0.0.1:{port}" in "".join(lines), "".join(lines)

        def fetch(context: ssl.SSLContext) -> int:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status
            finally:
                conn.close()

        assert fetch(client_context(pki, pki.client)) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            fetch(client_context(pki))
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
