"""Members that cannot sign (issue 26), on a real ``gateway serve`` process with its local
(mTLS) listener, the national-platform simulator in-process, and the member's own HTTPS
callback receiver that admits only the gateway's client certificate.

Certificates are made for this module with ``cryptography`` (gateway/exchange/certs.py): the
listener's CA and server certificate, the demo member's, one expired, one revoked in the
CRL from the start, one revoked while the gateway runs, one from another CA, one valid
for a different member, one pinned by fingerprint, and the gateway's own client one."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from gateway.audit import verify_store
from gateway.config.model import parse_config
from gateway.crypto.keys import VerificationKey
from gateway.errors import CertificateRevoked, CertificateUnknown
from gateway.exchange.app import STORE, create_app
from gateway.exchange.certs import Issued, issue, load_ca, make_ca, revoke
from gateway.exchange.client import ExchangeClient
from gateway.exchange.limits import GatewayRunner
from gateway.exchange.mtls import LOCAL_TLS, LocalTls, PeerCertificate, fingerprint_of, member_names
from gateway.runtime.registry import Runtime, build_runtime
from gateway.signing import Signer
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import (
    APPLY_EXAMPLE,
    CREDIT_EXAMPLE,
    GATEWAY_ID,
    NATIONAL_ID,
    PORTAL_ID,
    ROOT,
    SCHEMAS,
    Keys,
    config_document,
    unused_port,
    verify_file,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

LEGACY = "330000:legacy-records"
OTHER = "330000:archive-office"  # another mtls member of the same CA
PINNED = "330000:pinned-desk"  # authenticated by a pinned fingerprint only
RECORD = {
    "uscc": "91350100M000100Y43",
    "name": "模拟企业",
    "status": "active",
    "updated_at": "2026-11-26T00:00:00Z",
}


@dataclass
class Receiver:
    """The legacy member's HTTPS callback endpoint: what came, and who presented it."""

    seen: list[tuple[CIMultiDict[str], bytes, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.seen.append((CIMultiDict(request.headers), body, fingerprint_of(der or b"")))
        return web.json_response({"ok": True})


@dataclass
class Site:
    keys: Keys
    pki: dict[str, Issued]
    ca: Path
    crl: Path
    db: Path
    public_url: str
    local_url: str
    admin_url: str
    token: str
    sim: NationalPlatform
    receiver: Receiver
    session: aiohttp.ClientSession

    def context(self, name: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if name is not None:
            context.load_cert_chain(self.pki[name].cert, self.pki[name].key)
        return context

    async def post(
        self,
        cert: str | None,
        service: str,
        document: Any,
        *,
        client: str = LEGACY,
        message_id: str | None = None,
        url: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, CIMultiDict[str], Any]:
        """An unsigned exchange, as a legacy system sends it: its certificate, no signature."""
        sent = {
            "Content-Type": "application/json",
            "Gw-Client": client,
            "Gw-Message-Id": message_id or str(uuid.uuid4()),
            **(headers or {}),
        }
        async with self.session.post(
            f"{url or self.local_url}/v1/exchange/{service}",
            data=json.dumps(document).encode(),
            headers=sent,
            ssl=self.context(cert) if url is None else True,
        ) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.json(content_type=None)

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(
            method,
            f"{self.admin_url}/admin/v1{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None


def _service(code: str, mode: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "code": code,
        "mode": mode,
        "request_schema": str(SCHEMAS / code / "request.json"),
        "response_schema": str(SCHEMAS / code / "response.json"),
        "timeout_s": 5,
    }
    if (SCHEMAS / code / "callback.json").exists():
        entry["callback_schema"] = str(SCHEMAS / code / "callback.json")
    return entry


def _make_pki(d: Path) -> tuple[Path, dict[str, Issued]]:
    ca, ca_key = d / "ca.crt", d / "ca.key"
    make_ca(ca, ca_key)
    rogue_ca, rogue_key = d / "rogue-ca.crt", d / "rogue-ca.key"
    make_ca(rogue_ca, rogue_key, name="Gateway local CA")  # same name, another key

    def cert(name: str, *, by: tuple[Path, Path] = (ca, ca_key), **kw: Any) -> Issued:
        return issue(by[0], by[1], d / f"{name}.crt", d / f"{name}.key", **kw)

    now = datetime.datetime.now(datetime.UTC)
    pki = {
        "server": cert("server", hosts=["127.0.0.1", "localhost"]),
        "legacy": cert("legacy", member=LEGACY),
        "other": cert("other", member=OTHER),
        "portal": cert("portal", member=PORTAL_ID),
        "portal-revoked": cert("portal-revoked", member=PORTAL_ID),
        "pinned": cert("pinned", member="330000:not-a-member"),
        "gateway": cert("gateway", member=GATEWAY_ID),
        "revoked": cert("revoked", member=LEGACY),
        "live": cert("live", member=LEGACY),
        "expired": cert(
            "expired",
            member=LEGACY,
            not_before=now - datetime.timedelta(days=3),
            not_after=now - datetime.timedelta(days=1),
        ),
        "rogue": cert("rogue", by=(rogue_ca, rogue_key), member=LEGACY),
    }
    return ca, pki


def _config(site: dict[str, Any], keys: Keys, pki: dict[str, Issued], tmp: Path) -> dict[str, Any]:
    ca = str(site["ca"])
    return {
        "gateway": {
            "member_id": GATEWAY_ID,
            "key": str(keys.directory / "gateway.pem"),
            "client_tls": {
                "cert": str(pki["gateway"].cert),
                "key": str(pki["gateway"].key),
                "ca": ca,
            },
        },
        "listen": {
            "ingress": {"host": "127.0.0.1", "port": site["public_port"]},
            "admin": {"host": "127.0.0.1", "port": site["admin_port"]},
            "local": {
                "host": "127.0.0.1",
                "port": site["local_port"],
                "tls": {
                    "cert": str(pki["server"].cert),
                    "key": str(pki["server"].key),
                    "client_ca": ca,
                    "crl": str(site["crl"]),
                },
            },
        },
        "store": {"path": str(tmp / "gw.db")},
        "delivery": {"poll_interval_s": 0.05, "base_delay_s": 0.05, "max_delay_s": 0.2},
        "members": [
            {
                "id": LEGACY,
                "kind": "system",
                "auth": ["mtls"],
                "certificate_ca": ca,
                "services": ["credit.query", "crossregion.apply"],
                "callback_url": f"https://127.0.0.1:{site['receiver_port']}/callbacks",
            },
            {
                "id": OTHER,
                "kind": "system",
                "auth": ["mtls"],
                "certificate_ca": ca,
                "services": ["credit.query"],
            },
            {
                "id": PINNED,
                "kind": "system",
                "auth": ["mtls"],
                "certificates": [pki["pinned"].fingerprint],
                "services": ["credit.query"],
            },
            {
                "id": PORTAL_ID,
                "kind": "system",
                "keys": [keys.jwk_file("portal")],
                "certificate_ca": ca,
                "services": ["credit.query"],
            },
            {
                "id": NATIONAL_ID,
                "kind": "platform",
                "keys": [keys.jwk_file("national")],
                "regions": ["100000"],
            },
        ],
        "services": [_service("credit.query", "sync"), _service("crossregion.apply", "async")],
        "adapters": [
            {
                "name": "national",
                "type": "http",
                "config": {
                    "url": f"{site['national_url']}/api/exchange/{{service}}",
                    "verify_response": {"keys": [keys.jwk_file("national")]},
                    "receiver": NATIONAL_ID,
                },
            }
        ],
        "routes": [
            {"service": "credit.query", "adapter": "national"},
            {"service": "crossregion.apply", "adapter": "national"},
        ],
    }


async def _ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, await asyncio.to_thread(log.read_text)
            assert time.monotonic() < deadline, f"{url} never became ready"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    certs: dict[str, Issued]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The module's certificates, made now (nothing committed)."""
    tmp = tmp_path_factory.mktemp("pki")
    ca, certs = _make_pki(tmp)
    return Pki(tmp, ca, certs)


@pytest_asyncio.fixture(scope="module", loop_scope="module", name="s")
async def site(
    keys: Keys, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Site]:
    """One `gateway serve` with its local listener, shared by every test of the module."""
    tmp = tmp_path_factory.mktemp("mtls")
    ca = pki.ca
    certs = pki.certs
    crl = tmp / "ca.crl"
    revoke(
        ca, pki.directory / "ca.key", crl, [certs[n].cert for n in ("revoked", "portal-revoked")]
    )
    ports = {name: unused_port() for name in ("public", "admin", "local", "national", "recv")}
    public_url = f"http://127.0.0.1:{ports['public']}"
    gateway_key = VerificationKey.from_jwk(keys.pairs["gateway"].jwk)
    sim = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted={gateway_key.kid: gateway_key},
        callback_base=public_url,
        callback_member=GATEWAY_ID,
        callback_delay_s=0.2,
    )
    receiver = Receiver()
    recv_app = web.Application()
    recv_app.router.add_post("/callbacks", receiver.handle)
    recv_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    recv_tls.load_cert_chain(certs["server"].cert, certs["server"].key)
    recv_tls.verify_mode = ssl.CERT_REQUIRED  # only a certificate of the CA calls back
    servers = [
        TestServer(create_national_app(sim), port=ports["national"]),
        TestServer(recv_app, port=ports["recv"]),
    ]
    doc = _config(
        {"ca": ca, "crl": crl, "public_port": ports["public"], "admin_port": ports["admin"],
         "local_port": unused_port(), "receiver_port": ports["recv"],
         "national_url": f"http://127.0.0.1:{ports['national']}"},
        keys, certs, tmp,
    )  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    cli = [sys.executable, "-m", "gateway.cli"]
    token = subprocess.run(  # noqa: ASYNC221 - once, before anything is served
        [*cli, "admin", "token", "create", "--name", "t", "--role", "admin", "--config", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()[0].strip()  # fmt: skip
    log = tmp / "gw.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        await servers[0].start_server()
        await servers[1].start_server(ssl=recv_tls)
        with log.open("ab") as out:
            # --local-listen overrides the file's port, as --listen does the ingress's.
            local = f"127.0.0.1:{ports['local']}"
            command = [*cli, "serve", "--config", str(path), "--local-listen", local]
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        await _ready(public_url, process, log)
        async with aiohttp.ClientSession() as session:
            yield Site(
                keys=keys, pki=certs, ca=ca, crl=crl, db=tmp / "gw.db", public_url=public_url,
                local_url=f"https://127.0.0.1:{ports['local']}",
                admin_url=f"http://127.0.0.1:{ports['admin']}", token=token, sim=sim,
                receiver=receiver, session=session,
            )  # fmt: skip
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for server in servers:
            await server.close()


async def _refused_at_tls(s: Site, cert: str | None) -> bool:
    try:
        await s.post(cert, "credit.query", CREDIT_EXAMPLE)
    except (aiohttp.ClientError, ssl.SSLError):
        return True
    return False


# Tests ---------------------------------------------------------------------------------


async def test_an_mtls_members_exchange_reaches_the_platform_signed_by_the_gateway(
    s: Site,
) -> None:
    """Unsigned, with its certificate: the simulator admits it under the gateway's key,
    the answer comes back signed by the gateway, and the log records the fingerprint."""
    message_id = str(uuid.uuid4())
    status, headers, body = await s.post("legacy", "credit.query", CREDIT_EXAMPLE,
                                         message_id=message_id)  # fmt: skip
    assert status == 200, body
    assert body["uscc"] == CREDIT_EXAMPLE["uscc"]
    assert message_id in s.sim.received  # verified there with the gateway's key
    assert "Signature" in headers
    assert "gw=" in headers["Signature-Input"]
    status, view = await s.admin("GET", f"/messages/{message_id}")
    assert status == 200, view
    recorded = {k.lower(): v for k, v in view["request_headers"].items()}
    assert recorded["gw-client-certificate"] == f"sha256:{s.pki['legacy'].fingerprint}"
    report = verify_file(s.db, {"keys": [dict(s.keys.pairs["gateway"].jwk)]})
    assert report.ok, report.first


async def test_a_forged_certificate_header_is_not_recorded_as_evidence(s: Site) -> None:
    """A Gw-Client-Certificate header sent by the member is replaced by the real one."""
    message_id = str(uuid.uuid4())
    forged = {"Gw-Client-Certificate": "sha256:" + "0" * 64}
    status, _, body = await s.post("legacy", "credit.query", CREDIT_EXAMPLE,
                                   message_id=message_id, headers=forged)  # fmt: skip
    assert status == 200, body
    _, view = await s.admin("GET", f"/messages/{message_id}")
    values = [v for k, v in view["request_headers"].items() if k.lower() == "gw-client-certificate"]
    assert values == [f"sha256:{s.pki['legacy'].fingerprint}"]


async def test_certificates_of_another_ca_expired_or_absent_are_refused_at_tls(
    s: Site,
) -> None:
    """No certificate, one from another CA (same CA name), an expired one: no handshake."""
    for cert in (None, "rogue", "expired"):
        assert await _refused_at_tls(s, cert), cert


async def test_a_certificate_revoked_in_the_crl_is_refused(s: Site) -> None:
    """The CRL the gateway started with refuses its certificate: 401 certificate_revoked."""
    status, _, body = await s.post("revoked", "credit.query", CREDIT_EXAMPLE)
    assert (status, body["code"]) == (401, "certificate_revoked"), body


async def test_revoking_in_the_crl_while_the_gateway_runs_takes_effect_at_once(
    s: Site,
) -> None:
    """`gateway certs revoke` rewrites the CRL; the running gateway refuses the next request."""
    status, _, body = await s.post("live", "credit.query", CREDIT_EXAMPLE)
    assert status == 200, body
    stem = str(s.ca.with_suffix(""))
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway.cli", "certs", "revoke", "--ca", stem,
         "--crl", str(s.crl), str(s.pki["live"].cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    status, _, body = await s.post("live", "credit.query", CREDIT_EXAMPLE)
    assert (status, body["code"]) == (401, "certificate_revoked"), body
    status, _, body = await s.post("legacy", "credit.query", CREDIT_EXAMPLE)
    assert status == 200, body  # the member's other certificate is untouched


async def test_an_mtls_member_cannot_pose_as_another_member(s: Site) -> None:
    """Its certificate names it: Gw-Client of another member, or another member's valid
    certificate for it, is 401 certificate_unknown, and nothing reaches the platform."""
    before = len(s.sim.received)
    for cert, client in (("legacy", OTHER), ("legacy", PORTAL_ID), ("other", LEGACY)):
        status, _, body = await s.post(cert, "credit.query", CREDIT_EXAMPLE, client=client)
        assert (status, body["code"]) == (401, "certificate_unknown"), (cert, client, body)
    assert len(s.sim.received) == before


async def test_a_certificate_never_replaces_a_signature_member_signature(s: Site) -> None:
    """The portal (auth: signature) with a valid certificate of its own but no signature
    is 401 signature_missing; signed, on the same listener, it is served."""
    status, _, body = await s.post("portal", "credit.query", CREDIT_EXAMPLE, client=PORTAL_ID)
    assert (status, body["code"]) == (401, "signature_missing"), body
    connector = aiohttp.TCPConnector(ssl=s.context("portal"))
    async with aiohttp.ClientSession(connector=connector) as session:
        portal = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(s.keys.pairs["portal"]),
            base_url=s.local_url,
            session=session,
        )
        reply = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert reply.status == 200, reply.body


async def test_a_revoked_certificate_is_refused_on_the_local_listener_even_when_signed(
    s: Site,
) -> None:
    """The portal signing correctly over a connection with its revoked certificate is
    401 certificate_revoked: a revoked certificate gets nothing on this listener."""
    connector = aiohttp.TCPConnector(ssl=s.context("portal-revoked"))
    async with aiohttp.ClientSession(connector=connector) as session:
        portal = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(s.keys.pairs["portal"]),
            base_url=s.local_url,
            session=session,
        )
        reply = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert (reply.status, reply.json()["code"]) == (401, "certificate_revoked"), reply.body


async def test_an_mtls_only_member_must_sign_on_the_public_listener(s: Site) -> None:
    """On the public (signature) listener the legacy member unsigned is 401 signature_missing."""
    status, _, body = await s.post(None, "credit.query", CREDIT_EXAMPLE, url=s.public_url)
    assert (status, body["code"]) == (401, "signature_missing"), body


async def test_the_rules_after_authentication_still_apply(s: Site) -> None:
    """ACL, schema and idempotency hold for an mtls member as for a signed one."""
    status, _, body = await s.post("other", "crossregion.apply", APPLY_EXAMPLE, client=OTHER)
    assert (status, body["code"]) == (403, "forbidden"), body
    status, _, body = await s.post("legacy", "credit.query", {"uscc": 7})
    assert (status, body["code"]) == (422, "schema_invalid"), body
    message_id = str(uuid.uuid4())
    first = await s.post("legacy", "credit.query", CREDIT_EXAMPLE, message_id=message_id)
    again = await s.post("legacy", "credit.query", CREDIT_EXAMPLE, message_id=message_id)
    assert (first[0], again[0], again[1].get("Gw-Replayed")) == (200, 200, "true")
    other = {**CREDIT_EXAMPLE, "purpose": "another"}
    status, _, body = await s.post("legacy", "credit.query", other, message_id=message_id)
    assert (status, body["code"]) == (409, "message_id_reused"), body


async def test_an_async_answer_is_called_back_over_https_with_the_gateways_certificate(
    s: Site,
) -> None:
    """202, then the platform's decision reaches the member's HTTPS callback URL signed by
    the gateway, over a connection where the gateway presented its client certificate."""
    message_id = str(uuid.uuid4())
    status, _, body = await s.post("legacy", "crossregion.apply", APPLY_EXAMPLE,
                                   message_id=message_id)  # fmt: skip
    assert status == 202, body
    deadline = time.monotonic() + 15
    while not any(h.get("Gw-Correlation-Id") == message_id for h, _, _ in s.receiver.seen):
        assert time.monotonic() < deadline, "the callback never reached the member"
        await asyncio.sleep(0.05)
    headers, _, presented = next(x for x in s.receiver.seen
                                 if x[0].get("Gw-Correlation-Id") == message_id)  # fmt: skip
    assert presented == s.pki["gateway"].fingerprint
    assert headers["Gw-Client"] == GATEWAY_ID
    assert "Signature" in headers
    while True:  # the member may also read it, by its certificate, on the local listener
        async with s.session.get(
            f"{s.local_url}/v1/messages/{message_id}",
            headers={"Gw-Client": LEGACY},
            ssl=s.context("legacy"),
        ) as resp:
            view = await resp.json()
        assert resp.status == 200, view
        if view["state"] == "callback_delivered":
            break
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.05)
    assert view["result"]["decision"]


async def test_an_admin_revokes_a_pinned_certificate_on_the_live_gateway(s: Site) -> None:
    """DELETE …/certificates/{fp} refuses it within a second; re-adding needs ?reinstate."""
    fp = s.pki["pinned"].fingerprint
    status, _, body = await s.post("pinned", "credit.query", CREDIT_EXAMPLE, client=PINNED)
    assert status == 200, body
    status, _ = await s.admin("DELETE", f"/members/{PINNED}/certificates/{fp}")
    assert status == 204
    deadline = time.monotonic() + 1.0
    while True:
        status, _, body = await s.post("pinned", "credit.query", CREDIT_EXAMPLE, client=PINNED)
        if status == 401:
            break
        assert time.monotonic() < deadline, "still admitted a second after the revocation"
        await asyncio.sleep(0.05)
    assert body["code"] == "certificate_revoked"
    status, problem = await s.admin("POST", f"/members/{PINNED}/certificates", {"fingerprint": fp})
    assert status == 422, problem
    status, _ = await s.admin(
        "POST", f"/members/{PINNED}/certificates?reinstate=true", {"fingerprint": fp}
    )
    assert status == 201
    status, _, body = await s.post("pinned", "credit.query", CREDIT_EXAMPLE, client=PINNED)
    assert status == 200, body


# The member's guide, on the shipped config ------------------------------------------


def _guide_commands() -> list[str]:
    """The ```sh blocks of docs/members.md, «Connecting without signing (mTLS)»."""
    text = (ROOT / "docs" / "members.md").read_text(encoding="utf-8")
    section = text.split("## Connecting without signing (mTLS)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


async def test_the_members_guide_runs_on_a_fresh_copy_of_the_shipped_config(
    tmp_path: Path,
) -> None:
    """`gateway up` on config.yaml with no keys makes the CA and certificates, then the
    guide's curl commands (sync, async, the decision read back) work as written."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    ports = {name: unused_port() for name in ("ingress", "admin", "local", "national", "portal")}
    listen = doc["listen"]
    for name in ("ingress", "admin", "local"):
        listen[name]["port"] = ports[name]
    doc["simulators"]["national"].update(port=ports["national"], callback_delay_s=0.1)
    doc["simulators"]["portal"]["port"] = ports["portal"]
    doc["adapters"][0]["config"]["base_url"] = f"http://127.0.0.1:{ports['national']}"
    doc["members"][0]["callback_url"] = f"http://127.0.0.1:{ports['portal']}/callbacks"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), "utf-8")
    commands = _guide_commands()
    assert len(commands) == 3
    assert all("https://127.0.0.1:8443/" in c for c in commands)
    log = tmp_path / "up.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "up", "--config", "config.yaml"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await _ready(f"http://127.0.0.1:{ports['ingress']}", process, log)
        for made in ("local-ca.crt", "local-ca.key", "legacy-records.crt", "legacy-records.key"):
            assert (tmp_path / "keys" / made).exists(), made
        assert (tmp_path / "keys" / "legacy-records.key").stat().st_mode & 0o077 == 0

        async def run(command: str) -> tuple[int, Any]:
            command = command.replace("127.0.0.1:8443", f"127.0.0.1:{ports['local']}")
            command = command.replace("curl ", "curl -sS -w '\\n%{http_code}' ", 1)
            done = await asyncio.to_thread(
                subprocess.run, ["bash", "-c", command], cwd=tmp_path,
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            body, _, status = done.stdout.rpartition("\n")
            return int(status), json.loads(body)

        sync, send, read = commands
        status, answer = await run(sync)
        assert status == 200, answer
        assert answer["uscc"] == "91350100M000100Y43"
        status, accepted = await run(send)
        assert (status, accepted["state"]) == (202, "accepted"), accepted
        deadline = time.monotonic() + 20
        while True:
            status, view = await run(read)
            assert status == 200, view
            if "result" in view:
                break
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.2)
        assert view["message_id"] == accepted["message_id"]
        assert view["result"]["decision"]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_the_fingerprint_is_chained_evidence_on_both_store_backends(
    keys: Keys, pki: Pki, store_url: str, tmp_path: Path
) -> None:
    """In-process, on SQLite and PostgreSQL: the recorded request headers carry the
    certificate's fingerprint and the message log still verifies (audit verify)."""
    port = unused_port()
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    if store_url.startswith("postgresql://"):
        doc["store"] = {"url": store_url}
    else:
        doc["store"] = {"path": store_url}
    doc["listen"] = {"local": {"port": port, "tls": {
        "cert": str(pki.certs["server"].cert), "key": str(pki.certs["server"].key),
        "client_ca": str(pki.ca)}}}  # fmt: skip
    legacy = {"id": LEGACY, "kind": "system", "auth": ["mtls"], "certificate_ca": str(pki.ca)}
    doc["members"].append({**legacy, "services": ["credit.query"]})
    doc["adapters"] = [{"name": "registry", "type": "mock",
                        "config": {"responses": {"credit.query": {"body": RECORD}}}}]  # fmt: skip
    doc["routes"] = [{"service": "credit.query", "adapter": "registry"}]
    app = create_app(parse_config(doc, base=tmp_path), start_delivery=False)
    runner = GatewayRunner(app)
    try:
        await runner.setup()
        local = app[LOCAL_TLS]
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=local.context).start()
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(pki.certs["legacy"].cert, pki.certs["legacy"].key)
        message_id = str(uuid.uuid4())
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"https://127.0.0.1:{port}/v1/exchange/credit.query",
                data=json.dumps(CREDIT_EXAMPLE).encode(),
                headers={"Content-Type": "application/json", "Gw-Client": LEGACY,
                         "Gw-Message-Id": message_id},
                ssl=context,
            ) as resp,
        ):  # fmt: skip
            assert resp.status == 200, await resp.text()
        store = app[STORE]
        record = await store.get_message(LEGACY, message_id)
        assert record is not None
        assert record.request_headers["Gw-Client-Certificate"] == (
            f"sha256:{pki.certs['legacy'].fingerprint}"
        )
        report = await verify_store(store, {"keys": [dict(keys.pairs["gateway"].jwk)]},
                                    gateway=GATEWAY_ID)  # fmt: skip
        assert report.ok, report.first
    finally:
        await runner.cleanup()


# gateway/exchange/mtls.py on its own: mapping and CRL rules an attacker would probe -----------


def _local(keys: Keys, pki: Pki, tmp_path: Path, crl: Path | None = None) -> LocalTls:
    tls = {"cert": str(pki.certs["server"].cert), "key": str(pki.certs["server"].key),
           "client_ca": str(pki.ca), **({"crl": str(crl)} if crl else {})}  # fmt: skip
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    doc["listen"] = {"local": {"port": 1, "tls": tls}}
    return LocalTls(parse_config(doc, base=tmp_path).local)  # type: ignore[arg-type]


def _runtime(keys: Keys, tmp_path: Path, *members: dict[str, Any]) -> Runtime:
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    doc["members"].extend(members)
    return build_runtime(parse_config(doc, base=tmp_path), {})


def _peer(path: Path) -> PeerCertificate:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return PeerCertificate(cert, fingerprint_of(cert.public_bytes(Encoding.DER)))


async def test_a_certificate_naming_two_members_authenticates_neither(
    keys: Keys, pki: Pki, tmp_path: Path
) -> None:
    """SAN URIs for two members of the same CA: ambiguous, 401 certificate_unknown; the
    SAN URI, when there is one, wins over the subject CN."""
    ca, ca_key = load_ca(pki.ca, pki.directory / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    uris = [x509.UniformResourceIdentifier(f"urn:gw:member:{m}") for m in (LEGACY, OTHER)]
    both = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(
            NameOID.COMMON_NAME, PORTAL_ID)])).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(uris), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    path = tmp_path / "both.crt"
    path.write_bytes(both.public_bytes(Encoding.PEM))
    assert member_names(both) == (LEGACY, OTHER)
    member = {"kind": "system", "auth": ["mtls"], "certificate_ca": str(pki.ca)}
    runtime = _runtime(keys, tmp_path, {"id": LEGACY, **member}, {"id": OTHER, **member})
    with pytest.raises(CertificateUnknown):
        _local(keys, pki, tmp_path).member_of(runtime, _peer(path))
    alone = _runtime(keys, tmp_path, {"id": LEGACY, **member})
    assert _local(keys, pki, tmp_path).member_of(alone, _peer(path)).id == LEGACY


async def test_an_unreadable_or_foreign_crl_refuses_every_certificate_until_fixed(
    keys: Keys, pki: Pki, tmp_path: Path
) -> None:
    """Fail closed: a garbled CRL, or one signed by another CA with the same name, refuses
    even an unrevoked certificate (401 certificate_revoked); a good CRL is taken live."""
    crl = tmp_path / "ca.crl"
    crl.write_bytes(b"-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n")
    local = _local(keys, pki, tmp_path, crl)
    member = {"id": LEGACY, "kind": "system", "auth": ["mtls"], "certificate_ca": str(pki.ca)}
    runtime = _runtime(keys, tmp_path, member)
    peer = _peer(pki.certs["legacy"].cert)
    with pytest.raises(CertificateRevoked, match="revocation status unknown"):
        local.member_of(runtime, peer)
    crl.unlink()
    revoke(pki.directory / "rogue-ca.crt", pki.directory / "rogue-ca.key", crl,
           [pki.certs["rogue"].cert])  # fmt: skip
    with pytest.raises(CertificateRevoked, match="not signed by a trusted CA"):
        local.member_of(runtime, peer)
    crl.unlink()
    revoke(pki.ca, pki.directory / "ca.key", crl, [pki.certs["revoked"].cert])
    assert local.member_of(runtime, peer).id == LEGACY
    with pytest.raises(CertificateRevoked):
        local.member_of(runtime, _peer(pki.certs["revoked"].cert))
