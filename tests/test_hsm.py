"""Signing keys in a PKCS#11 token (gateway/crypto/hsm.py), against a real SoftHSM2 token made
per test session; OpenSC's pkcs11-tool and ``http-message-signatures`` are the
independent parties that read the token and check what the gateway signed.

Under ``CI=true`` these tests never skip: a missing SoftHSM2 or pkcs11-tool fails them
(``python3 dev.py test`` installs both, as it does PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pkcs11
import pytest
import yaml
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver
from multidict import CIMultiDict
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from gateway.cli import main
from gateway.config.model import parse_config
from gateway.crypto.hsm import HardwareKey, Pkcs11Uri
from gateway.crypto.keys import KeyPair, VerificationKey, load_key, private_pem, public_to_jwk
from gateway.errors import ConfigError, InternalError
from gateway.exchange.client import ExchangeClient, Reply, verify_reply
from gateway.federation.directory import Publisher, read_directory, sign_directory
from gateway.signing import Signer
from gateway.signing.algorithms import ALGORITHM_CLASSES
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import (
    CREDIT_EXAMPLE,
    NATIONAL_ID,
    PORTAL_ID,
    Keys,
    config_document,
    unused_port,
)

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
LABEL = "gw-test"


@dataclass(frozen=True)
class Token:
    """A SoftHSM2 token in a temp dir: its config, its PIN file (0600), its label."""

    conf: Path
    pin_file: Path
    pin: str

    def uri(self, obj: str, **extra: str) -> str:
        query = "&".join(
            [f"module-path={MODULE}", f"pin-source=file:{self.pin_file}"]
            + [f"{k}={v}" for k, v in extra.items()]
        )
        return f"pkcs11:token={LABEL};object={obj}?{query}"

    def tool(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """OpenSC's pkcs11-tool on this token: a reader that is not our code."""
        return subprocess.run(
            [
                shutil.which("pkcs11-tool") or "pkcs11-tool",
                "--module",
                MODULE,
                "--token-label",
                LABEL,
                "--pin",
                self.pin,
                *args,
            ],
            capture_output=True,
            timeout=60,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            check=False,
        )

    def session(self, *, rw: bool = False) -> Any:
        """A session of our own on the token (logged in once per process, as PKCS#11 has it)."""
        token = pkcs11.lib(MODULE).get_token(token_label=LABEL)
        try:
            return token.open(rw=rw, user_pin=self.pin)
        except pkcs11.UserAlreadyLoggedIn:
            return token.open(rw=rw)

    def public_key(self, obj: str) -> Any:
        """The public key as pkcs11-tool reads it from the token (SubjectPublicKeyInfo)."""
        read = self.tool("--read-object", "--type", "pubkey", "--label", obj)
        assert read.returncode == 0, read.stderr
        if read.stdout.startswith(b"-----BEGIN"):  # OpenSC writes EdDSA keys as PEM
            return serialization.load_pem_public_key(read.stdout)
        return serialization.load_der_public_key(read.stdout)


def _missing() -> str | None:
    if not Path(MODULE).exists() or shutil.which("softhsm2-util") is None:
        return "SoftHSM2 is not installed (apt-get install softhsm2)"
    if shutil.which("pkcs11-tool") is None:
        return "pkcs11-tool is not installed (apt-get install opensc)"
    return None


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """A fresh SoftHSM2 token for this session (SOFTHSM2_CONF points at a temp config)."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}: python3 dev.py test installs it")
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n",
        encoding="utf-8",
    )
    pin = secrets.token_hex(8)
    pin_file = directory / "user.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(pin + "\n")
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # before the module is first loaded here
    subprocess.run(
        [
            shutil.which("softhsm2-util") or "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            LABEL,
            "--pin",
            pin,
            "--so-pin",
            secrets.token_hex(8),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    yield Token(conf, pin_file, pin)
    if before is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = before


@pytest.fixture(scope="session")
def token_keys(token: Token, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One key of each kind made in the token by `gateway keygen --pkcs11`; their JWKs."""
    directory = tmp_path_factory.mktemp("token-jwks")
    made = {}
    for kind in ("ed25519", "ecdsa-p256", "rsa-pss"):
        jwk = directory / f"{kind}.jwk.json"
        args = ["keygen", "--pkcs11", token.uri(f"gw-{kind}"), "--alg", kind, "--jwk", str(jwk)]
        assert main(args) == 0
        made[kind] = jwk
    return made


class _Resolver(HTTPSignatureKeyResolver):
    def __init__(self, key: Any) -> None:
        self.key = key

    def resolve_public_key(self, key_id: str) -> Any:
        return self.key


def independent_verify(reply: Reply, public: Any) -> None:
    """The reference library checks the gateway's answer with the key pkcs11-tool read."""
    algorithm = "ed25519" if isinstance(public, ed25519.Ed25519PublicKey) else "ecdsa-p256-sha256"
    verifier = HTTPMessageVerifier(
        signature_algorithm=ALGORITHM_CLASSES[algorithm], key_resolver=_Resolver(public)
    )

    @dataclass
    class Request:
        method: str
        url: str
        headers: CIMultiDict[str]

    @dataclass
    class Response:
        status_code: int
        headers: CIMultiDict[str]
        request: Request

    req = Request(reply.request.method, reply.request.url, CIMultiDict(reply.request.headers))
    results = verifier.verify(Response(reply.status, CIMultiDict(reply.headers), req))
    assert results
    assert results[0].covered_components['"@status"'] == str(reply.status)
    assert any(c.startswith('"signature";req') for c in results[0].covered_components)


# The URI and the PIN -------------------------------------------------------------------


def test_a_pin_written_into_the_config_is_refused(keys: Keys, tmp_path: Path) -> None:
    """pin-value in gateway.key: the config is refused and told where the PIN goes."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    doc["gateway"]["key"] = f"pkcs11:token=gw;object=k?module-path={MODULE}&pin-value=1234"
    with pytest.raises(ConfigError, match="pin-source=file:PATH") as refused:
        parse_config(doc, base=tmp_path)
    assert "1234" not in str(refused.value)
    assert refused.value.problems[0].startswith("/gateway/key: ")


def test_the_uri_names_module_key_and_pin_source_relative_to_the_config(tmp_path: Path) -> None:
    """Relative module and PIN paths are the config's; a URI without a PIN source, a
    module or a key name is refused before any token is touched."""
    uri = Pkcs11Uri.parse(
        "pkcs11:token=gw;object=gateway%20key?module-path=lib/p11.so&pin-source=file:keys/pin",
        tmp_path,
    )
    assert (uri.token, uri.object) == ("gw", "gateway key")
    assert uri.module_path == str(tmp_path / "lib/p11.so")
    assert uri.pin_source == f"file:{tmp_path / 'keys/pin'}"
    for bad, why in [
        ("pkcs11:token=gw;object=k", "module-path"),
        (f"pkcs11:token=gw?module-path={MODULE}", "object= or id="),
        (f"pkcs11:token=gw;object=k;type=cert?module-path={MODULE}", "type=private"),
    ]:
        with pytest.raises(ConfigError, match=why):
            Pkcs11Uri.parse(bad)
    with pytest.raises(ConfigError, match="pin-source"):
        Pkcs11Uri.parse(f"pkcs11:token=gw;object=k?module-path={MODULE}").read_pin()


def test_a_pin_file_others_can_read_is_refused(token: Token, tmp_path: Path) -> None:
    """The PIN file is a secret like a private key: mode 0600 or the key is not opened."""
    loose = tmp_path / "pin"
    loose.write_text(token.pin, encoding="utf-8")
    loose.chmod(0o644)
    uri = token.uri("gw-ed25519").replace(str(token.pin_file), str(loose))
    with pytest.raises(ConfigError, match="accessible by group or others"):
        load_key(uri)


# Keys made in the token stay there -----------------------------------------------------


def test_keygen_makes_the_key_in_the_token_and_it_cannot_be_exported(
    token: Token, token_keys: dict[str, Path]
) -> None:
    """CKA_EXTRACTABLE false and sensitive; reading its value, wrapping it out under
    another key and our PEM writer all fail; the JWK keygen wrote is the token's public key."""
    with token.session() as session:
        private = session.get_key(ObjectClass.PRIVATE_KEY, label="gw-ecdsa-p256")
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.LOCAL] is True  # generated in the token, not imported
        with pytest.raises(pkcs11.AttributeSensitive):
            private[Attribute.VALUE]
        # The export PKCS#11 has: wrap it under a key of ours. The token refuses.
        wrapper = session.generate_key(KeyType.AES, 256, capabilities=MechanismFlag.WRAP)
        with pytest.raises((pkcs11.KeyUnextractable, pkcs11.KeyNotWrappable)):
            wrapper.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    pair = load_key(token.uri("gw-ecdsa-p256"), token_keys["ecdsa-p256"])
    with pytest.raises(ConfigError, match="never leaves"):
        private_pem(pair.private)
    jwk = json.loads(token_keys["ecdsa-p256"].read_text(encoding="utf-8"))
    assert jwk == public_to_jwk(token.public_key("gw-ecdsa-p256"))
    assert pair.kid == jwk["kid"]
    assert "d" not in jwk


def test_a_token_key_that_could_be_extracted_is_refused(token: Token) -> None:
    """A key the token would hand out (CKA_EXTRACTABLE true) is not used to sign."""
    with token.session(rw=True) as session:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        params.generate_keypair(
            label="leaky",
            id=b"leaky",
            store=True,
            private_template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
    with pytest.raises(ConfigError, match="would let this private key out"):
        load_key(token.uri("leaky"))


def test_sm2_in_a_token_is_refused_with_the_reason(
    token: Token, capsys: pytest.CaptureFixture[str]
) -> None:
    """SoftHSM2 has no SM2 (nor does PKCS#11 define one): keygen says so and exits 2."""
    assert main(["keygen", "--pkcs11", token.uri("gw-sm2"), "--alg", "sm2"]) == 2
    assert "PKCS#11 defines no SM2 mechanism" in capsys.readouterr().err


@pytest.mark.integration  # a `gateway keygen` process of its own
def test_a_wrong_pin_is_refused_without_showing_it(token: Token, tmp_path: Path) -> None:
    """A wrong PIN: the token refuses the login, the error names the token, not the PIN."""
    wrong = tmp_path / "wrong.pin"
    fd = os.open(wrong, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("not-the-pin\n")
    uri = token.uri("gw-never").replace(str(token.pin_file), str(wrong))
    env = {**os.environ, "SOFTHSM2_CONF": str(token.conf)}
    ran = subprocess.run(  # its own process: this one is logged in already
        [sys.executable, "-m", "gateway.cli", "keygen", "--pkcs11", uri],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert ran.returncode != 0
    assert "cannot log in to the token" in ran.stderr
    assert "not-the-pin" not in ran.stderr


# The token signs what independent verifiers accept --------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa-p256", "rsa-pss"])
def test_a_token_key_signs_requests_the_reference_library_verifies(
    token: Token, token_keys: dict[str, Path], kind: str
) -> None:
    """Ed25519, P-256 and RSA-PSS in the token: our signer's signatures verify under the
    reference library with the public key pkcs11-tool read."""
    pair = load_key(token.uri(f"gw-{kind}"), token_keys[kind])
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "application/json", "Gw-Client": PORTAL_ID, "Gw-Message-Id": "m-1"}
    )
    url = "http://127.0.0.1/v1/exchange/credit.query"
    Signer(pair).sign_request("POST", url, headers, b"{}")
    public = token.public_key(f"gw-{kind}")
    algorithm = {"ed25519": "ed25519", "ecdsa-p256": "ecdsa-p256-sha256"}.get(
        kind, "rsa-pss-sha512"
    )

    @dataclass
    class Request:
        method: str
        url: str
        headers: CIMultiDict[str]

    verifier = HTTPMessageVerifier(
        signature_algorithm=ALGORITHM_CLASSES[algorithm], key_resolver=_Resolver(public)
    )
    assert verifier.verify(Request("POST", url, headers))[0].parameters["keyid"] == pair.kid


def test_a_directory_signed_with_a_token_key_verifies(
    token: Token, token_keys: dict[str, Path], tmp_path: Path
) -> None:
    """sign_directory, the national Publisher and `gateway directory sign --key pkcs11:…`
    with a token key: each directory verifies against that key's public JWK."""
    from tests.test_directory import payload

    pair = load_key(token.uri("gw-ecdsa-p256"), token_keys["ecdsa-p256"])
    pairs = dict.fromkeys(("a", "b", "b2", "other"), pair)
    doc = payload(pairs)
    assert read_directory(sign_directory(pair, doc), [dict(pair.jwk)]).version == doc["version"]
    publisher = Publisher(keypair=pair, national=doc["national"], validity_s=600)
    publisher.register("440000", doc["regions"][1]["gateway"])
    assert read_directory(publisher.current(), [dict(pair.jwk)]).kid == pair.kid
    source, out = tmp_path / "payload.json", tmp_path / "directory.jws"
    source.write_text(json.dumps(doc), encoding="utf-8")
    key_uri = token.uri("gw-ed25519")
    assert (
        main(["directory", "sign", "--key", key_uri, "--in", str(source), "--out", str(out)]) == 0
    )
    assert main(["directory", "verify", str(out), "--keys", str(token_keys["ed25519"])]) == 0


def _signs_in_a_thread(pair: KeyPair) -> list[bytes]:
    assert isinstance(pair.private, HardwareKey)
    return [pair.private.sign(b"x") for _ in range(20)]


async def test_several_threads_sign_with_one_token_key_at_once(
    token: Token, token_keys: dict[str, Path]
) -> None:
    """Threads signing at once with one token key (checkpoints beside answers): every
    signature is made and verifies."""
    pair = load_key(token.uri("gw-ed25519"), token_keys["ed25519"])
    results = await asyncio.gather(*(asyncio.to_thread(_signs_in_a_thread, pair) for _ in range(4)))
    public = token.public_key("gw-ed25519")
    for signature in (s for batch in results for s in batch):
        public.verify(signature, b"x")


def test_keys_rotate_refuses_a_token_key(
    token: Token, token_keys: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    """Rotation writes PEMs: with the key in a token it refuses and says what to do."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    doc["gateway"]["key"] = token.uri("gw-ed25519")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert main(["keys", "rotate", "--config", str(config)]) == 1
    assert not list(tmp_path.glob("*.pem"))


# A real `gateway serve` whose key is in SoftHSM2 -----------------------------------------


@dataclass
class Served:
    url: str
    public: Any
    jwk: dict[str, Any]
    national: NationalPlatform


@pytest.fixture(scope="module")
def served_config(
    token: Token, token_keys: dict[str, Path], keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], int, int]:
    tmp = tmp_path_factory.mktemp("served")
    nat_port, gw_port = unused_port(), unused_port()
    doc = config_document(keys, store=tmp / "gw.db", national_url=f"http://127.0.0.1:{nat_port}")
    doc["gateway"] = {
        "member_id": doc["gateway"]["member_id"],
        "key": token.uri("gw-ecdsa-p256"),
        "public_jwk": str(token_keys["ecdsa-p256"]),
    }
    doc["listen"] = {"ingress": {"port": gw_port}, "admin": {"port": unused_port()}}
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return config, doc, nat_port, gw_port


@pytest.fixture
async def served(
    token: Token, token_keys: dict[str, Path], keys: Keys, served_config: Any
) -> AsyncIterator[Served]:
    """`gateway serve` as a real process, its key in SoftHSM2, with the national platform
    (which checks the gateway's outbound signatures with the token's public key)."""
    config, _, nat_port, gw_port = served_config
    jwk = json.loads(token_keys["ecdsa-p256"].read_text(encoding="utf-8"))
    national = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted={jwk["kid"]: VerificationKey.from_jwk(jwk)},
        callback_base=f"http://127.0.0.1:{gw_port}",
        callback_delay_s=0.05,
    )
    server = TestServer(create_national_app(national), port=nat_port)
    await server.start_server()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error", "SOFTHSM2_CONF": str(token.conf)},
    )
    try:
        assert process.stdout is not None
        seen = b""
        async with asyncio.timeout(60):
            while not seen.splitlines()[-1:] or not seen.splitlines()[-1].startswith(b"Ready"):
                line = await process.stdout.readline()
                if not line:
                    break
                seen += line
        assert b"Ready" in seen, seen + await process.stderr.read()  # type: ignore[union-attr]
        yield Served(
            f"http://127.0.0.1:{gw_port}", token.public_key("gw-ecdsa-p256"), jwk, national
        )
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.wait()
        await server.close()


@pytest.mark.integration
async def test_a_gateway_serve_with_its_key_in_softhsm_signs_what_others_verify(
    served: Served, keys: Keys
) -> None:
    """The real process: its JWKS publishes the token's key, its signed answer verifies
    under the reference library with the key pkcs11-tool read, the national platform
    accepted its outbound signature, and /readyz is ready."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{served.url}/.well-known/jwks.json") as resp:
            published = (await resp.json())["keys"]
        assert published[0] == public_to_jwk(served.public) == served.jwk
        client = ExchangeClient(
            member_id=PORTAL_ID,
            signer=Signer(keys.pairs["portal"]),
            base_url=served.url,
            session=session,
        )
        reply = await client.exchange("credit.query", CREDIT_EXAMPLE)
        assert reply.status == 200, reply.body
        independent_verify(reply, served.public)
        assert verify_reply(reply, {served.jwk["kid"]: VerificationKey.from_jwk(served.jwk)})
        async with session.get(f"{served.url}/readyz") as resp:
            ready = await resp.json()
        assert resp.status == 200, ready
    assert isinstance(served.public, ec.EllipticCurvePublicKey)


def test_a_lost_token_session_fails_one_signature_and_is_opened_again(
    token: Token, token_keys: dict[str, Path]
) -> None:
    """The token dropped our session (a restarted HSM): that signature is an `internal`
    GatewayError, never a crash, and the next one opens a new session and signs."""
    pair = load_key(token.uri("gw-ed25519"), token_keys["ed25519"])
    key = pair.private
    assert isinstance(key, HardwareKey)
    key.sign(b"before")
    held = key._session
    assert held is not None
    held[1].close()  # the handle the key holds is gone, as after an HSM restart
    with pytest.raises(InternalError, match="the token did not sign"):
        key.sign(b"lost")
    token.public_key("gw-ed25519").verify(key.sign(b"after"), b"after")
