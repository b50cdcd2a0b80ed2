"""Shared fixtures: keys generated per session, real servers on loopback, real SQLite files,
a real PostgreSQL the suite starts itself (tests/pg.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import errno
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import AdapterContext
from gateway.admin import create_admin_app, create_token
from gateway.audit import Report, verify_store
from gateway.config.model import Config, StoreConfig, jwk_path_for, parse_config
from gateway.crypto.keys import KeyPair, KeyType, VerificationKey, generate, write_keypair
from gateway.exchange.app import DELIVERY, PIPELINE, STORE, create_app
from gateway.exchange.client import ExchangeClient
from gateway.exchange.limits import GatewayRunner
from gateway.observe.tracing import Tracing
from gateway.serve.ports import free_port
from gateway.signing import Signer
from gateway.store import Store, create_store
from gateway.store.sqlite import SQLiteStore
from simulators.national import NationalPlatform, create_national_app
from simulators.portal import Portal, create_portal_app
from tests.pg import PostgresServer, unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas" / "services"

PORTAL_ID = "330000:one-stop-portal"
TAX_ID = "330000:tax-system"
DISABLED_ID = "330000:retired-system"
NATIONAL_ID = "100000:national-platform"
PEER_ID = "440000:gateway"
GATEWAY_ID = "330000:gateway"


# The fast loop (`pytest --fast`, `python3 dev.py test --fast`): unit-level tests only.
# A test using one of these fixtures starts a gateway or a peer of it, or the suite's
# PostgreSQL, so it is marked `integration` here, as is a case parametrized onto the
# "postgres" backend; a test that starts a subprocess itself carries the marker.
INTEGRATION_FIXTURES = frozenset(
    {"harness", "make_harness", "serve_tls", "start_b", "pg_server", "pg_url"}
)
FAST = False  # set from --fast before any test module is imported


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast",
        action="store_true",
        help="unit-level tests only (not `integration`); property tests run a tenth of "
        "their examples",
    )


def pytest_configure(config: pytest.Config) -> None:
    global FAST
    FAST = bool(config.getoption("--fast"))


def examples(count: int) -> int:
    """A property test's example count: all of them, or a tenth in the fast loop."""
    return max(10, count // 10) if FAST else count


def _starts_something(item: pytest.Item) -> bool:
    """Whether ``item`` starts a gateway, a peer of it or PostgreSQL (by its fixtures, or by
    a backend parameter that reaches ``pg_url`` through ``getfixturevalue``)."""
    if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "postgres" in callspec.params.values()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark integration tests by their fixtures (new ones need no marker); --fast drops them."""
    for item in items:
        if _starts_something(item):
            item.add_marker(pytest.mark.integration)
    if config.getoption("--fast"):
        dropped = [item for item in items if item.get_closest_marker("integration")]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if not item.get_closest_marker("integration")]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The command line configures the root logger: give pytest its handlers back after."""
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    handlers, level, access_level = root.handlers[:], root.level, access.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.setLevel(access_level)


def unused_port() -> int:
    """A free loopback port outside the ephemeral range (gateway/serve/ports.py says why)."""
    return free_port()


def reserve_port(stack: AsyncExitStack) -> tuple[int, SocketFactory]:
    """A free loopback port, bound and listening now, and the socket factory that hands it
    to a TestServer: between choosing the port and the server's start nothing (another
    process binding loopback ports) can take it. Closed by ``stack`` if never handed over."""
    for _ in range(20):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", free_port()))
        except OSError as exc:  # taken since free_port looked; nothing knows the port yet
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        sock.listen()
        stack.callback(sock.close)
        return sock.getsockname()[1], lambda host, port, family, sock=sock: sock
    raise RuntimeError("no free port to reserve")


SocketFactory = Callable[[str, int, socket.AddressFamily], socket.socket]
Startable = TestServer | TestClient[web.Request, web.Application]


async def start_on(stack: AsyncExitStack, server: Startable) -> None:
    """Start ``server``, closed by ``stack`` even if the start fails half-way (its app's
    cleanup contexts entered, the bind refused): one failure stays one failure."""
    stack.push_async_callback(server.close)
    await server.start_server()


CREDIT_EXAMPLE = json.loads((SCHEMAS / "credit.query" / "request.json").read_text())["examples"][0]
APPLY_EXAMPLE = json.loads((SCHEMAS / "crossregion.apply" / "request.json").read_text())[
    "examples"
][0]


class GatewayTestServer(TestServer):
    """A test server run as ``gateway serve`` runs the ingress: by ``GatewayRunner``, so
    HTTP-level errors (too many or too long headers, garbage) come as problem+json."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The suite's own PostgreSQL (tests/pg.py), started once, on first use.

    Under ``CI=true`` a PostgreSQL that cannot be started fails the tests: they never skip
    there."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        server = PostgresServer.start()
    except RuntimeError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A ``postgresql://`` URL of a fresh database for this test alone."""
    with pg_server.database() as url:
        yield url


def store_at(url: str, *, instance: str | None = None) -> Store:
    """A store (not yet opened) at ``url``: a SQLite file path or a postgresql:// URL."""
    if url.startswith("postgresql://"):
        return create_store(StoreConfig(path=Path("unused.db"), url=url), instance=instance)
    return create_store(StoreConfig(path=Path(url)), instance=instance)


def verify_file(path: Path, jwks: dict[str, Any], gateway: str = GATEWAY_ID) -> Report:
    """``gateway audit verify`` on a SQLite file, through a read-only store; callable from a
    running test loop (it runs its own, in a thread)."""

    async def run() -> Report:
        store = SQLiteStore(path, readonly=True)
        await store.open()
        try:
            return await verify_store(store, jwks, gateway=gateway)
        finally:
            await store.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives, once per backend: a SQLite file, then a PostgreSQL database
    (``gateway.store.connect`` opens either)."""
    if request.param == "sqlite":
        return str(tmp_path / "db" / "gateway.db")
    url: str = request.getfixturevalue("pg_url")
    return url


@dataclass(frozen=True)
class Keys:
    directory: Path
    pairs: dict[str, KeyPair]

    def jwk_file(self, name: str) -> str:
        return str(jwk_path_for(self.directory / f"{name}.pem"))

    def verification(self, name: str) -> dict[str, VerificationKey]:
        key = VerificationKey.from_jwk(self.pairs[name].jwk)
        return {key.kid: key}


# The suite's parties and their key types (tests/test_signing_sm2.py makes some SM2).
KEY_KINDS: dict[str, KeyType] = {
    **dict.fromkeys(("gateway", "portal", "disabled", "national", "peer", "stranger"), "ed25519"),
    "tax": "ecdsa-p256",
}


def make_keys(directory: Path, kinds: Mapping[str, KeyType]) -> Keys:
    """A fresh key pair per name, of its kind: ``NAME.pem`` and its JWK in ``directory``."""
    pairs = {
        name: write_keypair(
            generate(kind), directory / f"{name}.pem", jwk_path_for(directory / f"{name}.pem")
        )
        for name, kind in kinds.items()
    }
    return Keys(directory, pairs)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Fresh keys for every test session; never committed anywhere."""
    return make_keys(tmp_path_factory.mktemp("keys"), KEY_KINDS)


@pytest.fixture
async def context(keys: Keys, tmp_path: Path) -> AsyncIterator[AdapterContext]:
    """What an adapter is built with: the gateway's signer, a client session, and the
    test's tmp dir as the base of relative paths."""
    async with aiohttp.ClientSession() as session:
        yield AdapterContext(
            member_id=GATEWAY_ID,
            signer=Signer(keys.pairs["gateway"]),
            session=session,
            base_dir=str(tmp_path),
        )


def config_document(keys: Keys, *, store: Path, national_url: str) -> dict[str, Any]:
    """A complete config as ``config.yaml`` would hold it, pointing at test keys."""
    return {
        "gateway": {"member_id": GATEWAY_ID, "key": str(keys.directory / "gateway.pem")},
        "store": {"path": str(store)},
        "security": {"clock_skew_s": 300, "max_body_bytes": 262144},
        "delivery": {
            "workers": 8,
            "poll_interval_s": 0.05,
            "base_delay_s": 0.05,
            "max_delay_s": 0.2,
            "max_attempts": 4,
            "shutdown_grace_s": 2,
        },
        "members": [
            {
                "id": PORTAL_ID,
                "kind": "system",
                "keys": [keys.jwk_file("portal")],
                "services": ["credit.query", "crossregion.apply"],
                "callback_url": "http://127.0.0.1:1/callbacks",
            },
            {
                "id": TAX_ID,
                "kind": "system",
                "keys": [keys.jwk_file("tax")],
                "services": [],
            },
            {
                "id": DISABLED_ID,
                "kind": "system",
                "enabled": False,
                "keys": [keys.jwk_file("disabled")],
                "services": ["credit.query"],
            },
            {
                "id": NATIONAL_ID,
                "kind": "platform",
                "keys": [keys.jwk_file("national")],
                "regions": ["100000"],
            },
            {
                "id": PEER_ID,
                "kind": "gateway",
                "keys": [keys.jwk_file("peer")],
                "regions": ["440000"],
                "services": ["credit.query"],
            },
        ],
        "services": [
            {
                "code": "credit.query",
                "mode": "sync",
                "allow_async": True,
                "request_schema": str(SCHEMAS / "credit.query" / "request.json"),
                "response_schema": str(SCHEMAS / "credit.query" / "response.json"),
                "callback_schema": str(SCHEMAS / "credit.query" / "response.json"),
                "timeout_s": 2,
                "max_body_bytes": 4096,
            },
            {
                "code": "crossregion.apply",
                "mode": "async",
                "request_schema": str(SCHEMAS / "crossregion.apply" / "request.json"),
                "response_schema": str(SCHEMAS / "crossregion.apply" / "response.json"),
                "callback_schema": str(SCHEMAS / "crossregion.apply" / "callback.json"),
                "timeout_s": 2,
            },
        ],
        "adapters": [
            {
                "name": "national",
                "type": "http",
                "config": {
                    "url": f"{national_url}/api/exchange/{{service}}",
                    "health_url": f"{national_url}/health",
                    "timeout_s": 5,
                    "verify_response": {"keys": [keys.jwk_file("national")]},
                    "receiver": NATIONAL_ID,  # its callbacks are the ones taken
                },
            },
        ],
        "routes": [
            {"service": "credit.query", "adapter": "national"},
            {"service": "crossregion.apply", "adapter": "national"},
        ],
    }


@dataclass
class Harness:
    """A gateway with the national platform and the portal, all real servers on loopback."""

    config: Config
    keys: Keys
    gateway: TestClient[web.Request, web.Application]
    national: NationalPlatform
    portal: Portal
    portal_url: str
    admin: TestClient[web.Request, web.Application]
    tokens: dict[str, str] = field(default_factory=dict)  # role → bearer token

    def auth(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    @property
    def app(self) -> web.Application:
        app = self.gateway.app
        assert app is not None
        return app

    @property
    def url(self) -> str:
        return str(self.gateway.make_url("")).rstrip("/")

    def client(self, name: str, member_id: str | None = None) -> ExchangeClient:
        """A signed client using key ``name`` and claiming ``member_id``."""
        ids = {
            "portal": PORTAL_ID,
            "tax": TAX_ID,
            "disabled": DISABLED_ID,
            "national": NATIONAL_ID,
            "peer": PEER_ID,
            "stranger": "330000:stranger",
        }
        return ExchangeClient(
            member_id=member_id or ids[name],
            signer=Signer(self.keys.pairs[name], label="sig1"),
            base_url=self.url,
            session=self.gateway.session,
        )

    async def wait_for(
        self, predicate: Callable[[], Awaitable[bool]], within_s: float = 10.0
    ) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not await predicate():
            if loop.time() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.05)

    async def state_of(self, message_id: str, client: str = PORTAL_ID) -> str | None:
        record = await self.app[STORE].get_message(client, message_id)
        return record.state if record else None


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
def harness_store_url() -> str | None:
    """Where harnesses keep their store: None is a SQLite file in the test's tmp dir. A test
    module overrides this fixture to run its harness tests on PostgreSQL too."""
    return None


@pytest.fixture(params=["sqlite", "postgres"])
def both_backends(request: pytest.FixtureRequest) -> str | None:
    """``harness_store_url`` once per backend (a module sets ``harness_store_url`` to it)."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def make_harness(
    keys: Keys, tmp_path: Path, harness_store_url: str | None
) -> AsyncIterator[HarnessFactory]:
    """Build a harness; ``edit`` may change the config document before it is parsed."""
    stack = AsyncExitStack()
    harnesses = 0

    async def factory(
        edit: Callable[[dict[str, Any]], None] | None = None,
        *,
        start_delivery: bool = True,
        store: Path | None = None,
        tracing: Tracing | None = None,
    ) -> Harness:
        nonlocal harnesses
        (gw_port, gw_socket), (nat_port, nat_socket), (portal_port, portal_socket) = (
            reserve_port(stack),
            reserve_port(stack),
            reserve_port(stack),
        )
        national_url = f"http://127.0.0.1:{nat_port}"
        portal_url = f"http://127.0.0.1:{portal_port}"
        doc = config_document(
            keys, store=store or tmp_path / "gateway.db", national_url=national_url
        )
        doc["members"][0]["callback_url"] = f"{portal_url}/callbacks"
        if harness_store_url is not None:
            doc["store"]["url"] = harness_store_url
        if edit is not None:
            edit(doc)
        config = parse_config(copy.deepcopy(doc), base=tmp_path)
        gateway_keys = keys.verification("gateway")
        national = NationalPlatform(
            member_id=NATIONAL_ID,
            keypair=keys.pairs["national"],
            trusted=gateway_keys,
            callback_base=f"http://127.0.0.1:{gw_port}",
            callback_delay_s=0.05,
        )
        portal = Portal(
            member_id=PORTAL_ID,
            keypair=keys.pairs["portal"],
            gateway_keys=gateway_keys,
            gateway_url=f"http://127.0.0.1:{gw_port}",
        )
        nat_app, portal_app = create_national_app(national), create_portal_app(portal)
        await start_on(stack, TestServer(nat_app, port=nat_port, socket_factory=nat_socket))
        await start_on(
            stack, TestServer(portal_app, port=portal_port, socket_factory=portal_socket)
        )
        app = create_app(config, start_delivery=start_delivery, tracing=tracing)
        client: TestClient[web.Request, web.Application] = TestClient(
            GatewayTestServer(app, port=gw_port, socket_factory=gw_socket)
        )
        # A gateway that fails to start has opened its store: close() still releases it
        # (an open aiosqlite thread would keep pytest from exiting).
        await start_on(stack, client)
        admin: TestClient[web.Request, web.Application] = TestClient(
            TestServer(create_admin_app(app))
        )
        await start_on(stack, admin)
        harnesses += 1
        suffix = f"-{harnesses}" if harnesses > 1 else ""  # names stay unique per store
        tokens = {
            role: await create_token(app[STORE], f"test-{role}{suffix}", role)
            for role in ("admin", "operator", "auditor")
        }
        return Harness(config, keys, client, national, portal, portal_url, admin, tokens)

    async with stack:  # closes in reverse: admin, gateway, portal, national
        yield factory


@pytest.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


__all__ = [
    "APPLY_EXAMPLE",
    "CREDIT_EXAMPLE",
    "DELIVERY",
    "PIPELINE",
    "GatewayTestServer",
    "Harness",
    "HarnessFactory",
    "Keys",
    "reserve_port",
    "start_on",
]
